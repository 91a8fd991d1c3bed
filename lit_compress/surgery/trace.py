"""Dynamic dataflow tracing: which call produced each tensor, and which calls read it.

:func:`trace_dataflow` runs the model once on example inputs, under ``torch.no_grad()`` and in
eval mode (every module's train/eval flag is restored afterwards). Forward hooks on *leaf* modules
record each module call; a :class:`~torch.overrides.TorchFunctionMode` records the torch functions
called *outside* leaf modules (``x + identity``, ``torch.flatten(x, 1)``, ``F.relu(x)`` in a
``forward``). Every tensor a call returns becomes a new *value* (an ``int``), even when an in-place
op such as ``ReLU(inplace=True)`` or ``out += identity`` returns its input object, so each value has
at most one producer and a list of consumers.

>>> graph = trace_dataflow(model, torch.randn(1, 3, 32, 32))  # doctest: +SKIP
>>> [c.name for c in graph.consumers(graph.calls("layer1.0.conv1")[0].outputs[0])]  # doctest: +SKIP
['layer1.0.bn1']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from lit_compress.errors import SurgeryError
from lit_compress.inputs import call_with, inputs_to, tensors_of
from lit_compress.surgery.modules import module_device_dtype, preserve_mode

# Modules with children that are still traced as one opaque call: MultiheadAttention uses its
# ``out_proj`` weights functionally and never calls the submodule.
DEFAULT_LEAF_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclass(frozen=True)
class CallNode:
    """One recorded call: a leaf module call, or a torch function called outside leaf modules.

    Attributes:
        name: Qualified module name, or the function's name (``"torch.flatten"``, ``"torch.Tensor.add_"``).
        module_type: The module's class; ``None`` for a function call.
        inputs: Values the call reads, in argument order, each once.
        outputs: Values the call produces.
        index: Position of the call in execution order.
    """

    name: str
    module_type: type[nn.Module] | None
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    index: int

    @property
    def is_module(self) -> bool:
        """Whether this is a leaf module call (not a torch function)."""
        return self.module_type is not None


@dataclass
class DataflowGraph:
    """The calls of one traced forward pass and the values that flow between them.

    Attributes:
        nodes: Every recorded call, in execution order (``nodes[i].index == i``).
        inputs: Values of the example inputs' tensors.
        outputs: Values of the tensors the model returned.
        shapes: ``shapes[v]`` is the shape of value ``v``.
        sources: For each value with no producer: ``"input"``, ``"param:<name>"``, ``"buffer:<name>"``
            or ``"constant"`` (a tensor first seen as an input to a call, e.g. made in ``forward``).
    """

    nodes: list[CallNode]
    inputs: list[int]
    outputs: list[int]
    shapes: list[tuple[int, ...]]
    sources: dict[int, str]
    _producer: dict[int, CallNode] = field(default_factory=dict, init=False, repr=False)
    _consumers: dict[int, list[CallNode]] = field(default_factory=dict, init=False, repr=False)
    _calls: dict[str, list[CallNode]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for node in self.nodes:
            for v in node.outputs:
                self._producer[v] = node
            for v in node.inputs:
                self._consumers.setdefault(v, []).append(node)
            if node.is_module:
                self._calls.setdefault(node.name, []).append(node)

    @property
    def num_values(self) -> int:
        return len(self.shapes)

    def producer(self, value: int) -> CallNode | None:
        """The call that produced ``value`` (``None`` for inputs, parameters and constants)."""
        return self._producer.get(value)

    def consumers(self, value: int) -> list[CallNode]:
        """Every call that reads ``value``, in execution order."""
        return list(self._consumers.get(value, ()))

    def is_output(self, value: int) -> bool:
        """Whether the model returns ``value``."""
        return value in self.outputs

    def sole_consumer(self, value: int) -> CallNode | None:
        """The only reader of ``value``, or ``None`` if it has several, none, or is also a model output."""
        readers = self._consumers.get(value, ())
        if len(readers) != 1 or self.is_output(value):
            return None
        return readers[0]

    def calls(self, module_name: str) -> list[CallNode]:
        """The calls of the leaf module ``module_name`` (several if the module is shared)."""
        return list(self._calls.get(module_name, ()))

    def module_calls(self) -> Iterator[CallNode]:
        """Every leaf module call, in execution order."""
        return (n for n in self.nodes if n.is_module)


def leaf_module_names(model: nn.Module, leaf_types: Sequence[type[nn.Module]] = ()) -> dict[int, str]:
    """``id(module) -> qualified name`` of the leaves: modules without children, or of ``leaf_types``.

    Descendants of a leaf are not leaves; a module registered under several names keeps the first.
    The root is a leaf (named ``""``) only if it is of ``leaf_types``: a childless root is traced
    through its functions.
    """
    types = tuple(DEFAULT_LEAF_TYPES) + tuple(leaf_types)
    if isinstance(model, types):
        return {id(model): ""}
    leaves: dict[int, str] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside[-1] + ".")):  # preorder: descendants follow
            continue
        if isinstance(module, types) or next(module.children(), None) is None:
            leaves[id(module)] = name
            inside.append(name)
    return leaves


def trace_dataflow(
    model: nn.Module,
    example_inputs: Any,
    leaf_types: Sequence[type[nn.Module]] = (),
) -> DataflowGraph:
    """Run ``model`` once on ``example_inputs`` and record its dataflow between leaf calls and functions.

    Args:
        model: The model; its train/eval flags are restored, its weights and buffers are not changed.
        example_inputs: A tensor (``model(x)``), a tuple/list (``model(*args)``) or a dict
            (``model(**kwargs)``), already on the model's device (:mod:`lit_compress.inputs`); floating tensors
            are cast to the model's dtype.
        leaf_types: Extra module classes to record as one call (their insides are not traced).

    Returns:
        The :class:`DataflowGraph` of the call.

    Raises:
        SurgeryError: If the forward pass fails.
    """
    example_inputs = inputs_to(example_inputs, None, module_device_dtype(model)[1])  # `*-true` precision
    leaves = leaf_module_names(model, leaf_types)
    labels = {id(p): f"param:{n}" for n, p in model.named_parameters()}
    labels.update({id(b): f"buffer:{n}" for n, b in model.named_buffers()})
    recorder = _Recorder(labels)
    handles = []
    for module in model.modules():
        if id(module) in leaves:
            name, kind = leaves[id(module)], type(module)
            handles.append(module.register_forward_pre_hook(recorder.pre_hook(name, kind), with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook()))
    input_values = [recorder.value(t, "input") for t in tensors_of(example_inputs)]
    try:
        with preserve_mode(model), torch.no_grad():
            model.eval()
            with recorder:
                result = call_with(model, example_inputs)
    except Exception as err:
        raise SurgeryError(
            f"Tracing {type(model).__name__} on `example_inputs` failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    outputs = [recorder.value(t, "constant") for t in tensors_of(result)]
    return DataflowGraph(recorder.nodes, input_values, outputs, recorder.shapes, recorder.sources)


def _unique(values: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))


class _Recorder(TorchFunctionMode):
    """Builds the node list; holds a reference to every tensor seen so ``id()`` is never reused."""

    def __init__(self, labels: dict[int, str]) -> None:
        super().__init__()
        self.labels = labels
        self.nodes: list[CallNode] = []
        self.shapes: list[tuple[int, ...]] = []
        self.sources: dict[int, str] = {}
        self._value_of: dict[int, int] = {}  # id(tensor) -> its current value
        self._keep: list[torch.Tensor] = []
        self._stack: list[tuple[str, type[nn.Module], tuple[int, ...]] | None] = []  # open leaf calls

    def value(self, t: torch.Tensor, source: str) -> int:
        """The current value of ``t``, creating a source value if ``t`` was never seen."""
        v = self._value_of.get(id(t))
        if v is None:
            v = self._new_value(t)
            self.sources[v] = self.labels.get(id(t), source)
        return v

    def _new_value(self, t: torch.Tensor) -> int:
        v = len(self.shapes)
        self.shapes.append(tuple(t.shape))
        self._value_of[id(t)] = v
        self._keep.append(t)
        return v

    def _record(
        self, name: str, kind: type[nn.Module] | None, inputs: tuple[int, ...], outs: list[torch.Tensor]
    ) -> None:
        outputs = tuple(self._new_value(t) for t in dict.fromkeys(outs))  # same object twice: one value
        self.nodes.append(CallNode(name, kind, inputs, outputs, len(self.nodes)))

    def pre_hook(self, name: str, kind: type[nn.Module]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._stack:  # a leaf called inside another leaf (a caller-named leaf type)
                self._stack.append(None)
                return
            self._stack.append(None)  # mark "busy" so the torch-function handler passes through
            inputs = _unique([self.value(t, "constant") for t in tensors_of((args, kwargs))])
            self._stack[-1] = (name, kind, inputs)

        return hook

    def post_hook(self) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            frame = self._stack[-1]
            if frame is not None and len(self._stack) == 1:
                name, kind, inputs = frame
                self._record(name, kind, inputs, tensors_of(output))
            self._stack.pop()

        return hook

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._stack:  # inside a leaf module (or one of our hooks)
            return func(*args, **kwargs)
        inputs = _unique([self.value(t, "constant") for t in tensors_of((args, kwargs))])
        result = func(*args, **kwargs)
        outs = tensors_of(result)
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        if not outs and name.endswith("__setitem__") and args and isinstance(args[0], torch.Tensor):
            outs = [args[0]]  # x[idx] = y mutates x: the new x is a new value
        if outs:  # calls returning no tensor (x.shape, x.dim()) read metadata, not data
            self._record(name, None, inputs, outs)
        return result
