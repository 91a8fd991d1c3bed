"""Find Linear→act→Linear chains, Conv→BN→act patterns and foldable BatchNorms in real models.

Discovery uses :func:`~lit_compress.surgery.trace.trace_dataflow`, so functional code in a
``forward`` (residual adds, ``torch.flatten``) is seen: a layer whose output is read by anything
besides the next element of a pattern is never part of it. Leaf modules whose type is not
recognised simply end a pattern. Candidates that are skipped for a reason a user may not expect
(a shared module, a second reader of an output) are named in one ``warnings.warn`` per call.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from lit_compress.surgery.trace import CallNode, DataflowGraph, trace_dataflow

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.ELU,
    nn.Identity,
)
_FUNCTIONAL_ACTIVATIONS = {"relu", "relu_", "gelu", "silu", "tanh", "relu6", "hardswish", "elu", "leaky_relu", "prelu"}

# (conv/linear type, BatchNorm type) pairs whose BN normalises the layer's output channels (dim 1).
_FOLDABLE_TYPES: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an elementwise activation a chain may pass through.

    The built-in :data:`ACTIVATION_TYPES`, any class whose name ends in ``"Act"`` or ``"Activation"``
    (e.g. Hugging Face's ``NewGELUActivation``), and any module with a ``collapsible`` attribute.
    """
    name = type(module).__name__
    if isinstance(module, ACTIVATION_TYPES) or hasattr(module, "collapsible"):
        return True
    return name.endswith(("Act", "Activation"))


def linear_layout(module: nn.Module) -> str | None:
    """``"linear"`` for ``nn.Linear`` (weight ``(out, in)``), ``"transposed"`` for a GPT-2 style
    ``Conv1D`` (weight ``(in, out)``, ``y = x @ W + b``), else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return "transposed"
    return None


@dataclass(frozen=True)
class ChainLink:
    """One ``first → activation [→ dropout] [→ norm] → second`` step of a :class:`LinearChain`."""

    first: str
    activation: str
    dropout: str | None
    norm: str | None
    second: str


@dataclass
class LinearChain:
    """Linear layers joined by activations.

    Link ``i`` is ``linears[i] → activations[i] [→ dropouts[i]] [→ norms[i]] → linears[i + 1]``.

    Attributes:
        linears: Qualified names of the ``k + 1`` linear layers, in dataflow order.
        activations: The ``k`` activations between them.
        dropouts: The ``k`` dropouts after each activation (``None`` where there is none).
        norms: The ``k`` ``BatchNorm1d`` before each next linear (``None`` where there is none).
        transposed: Per linear, whether its weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    linears: list[str]
    activations: list[str]
    dropouts: list[str | None]
    norms: list[str | None]
    transposed: list[bool]

    def links(self) -> list[ChainLink]:
        """The chain as ``k`` two-linear links, in dataflow order."""
        return [
            ChainLink(self.linears[i], self.activations[i], self.dropouts[i], self.norms[i], self.linears[i + 1])
            for i in range(len(self.activations))
        ]


@dataclass(frozen=True)
class ConvBNAct:
    """A ``Conv2d → BatchNorm2d [→ activation]`` pattern.

    Attributes:
        conv: The convolution, whose output only the BN reads.
        bn: The BatchNorm.
        activation: The activation that alone reads the BN output, or ``None``.
        next_conv: The ``Conv2d`` that alone reads the pattern's output (activation output, or BN
            output without one), or ``None``.
        activation_shared: Whether the activation module is also called elsewhere (torchvision's
            ``BasicBlock`` calls one ``relu`` twice), so replacing it changes other places too.
    """

    conv: str
    bn: str
    activation: str | None
    next_conv: str | None
    activation_shared: bool

    @property
    def feeds_conv(self) -> bool:
        """Whether the pattern's output goes straight into another ``Conv2d``."""
        return self.next_conv is not None


def find_linear_chains(
    model: nn.Module, example_inputs: Any, leaf_types: Sequence[type[nn.Module]] = ()
) -> list[LinearChain]:
    """Find ``Linear → act [→ Dropout] [→ BatchNorm1d] → Linear`` chains, stacked ones as one chain.

    Each intermediate value must have exactly one reader (the next element), and every module of a
    link must be called exactly once. Linear layers are ``nn.Linear`` or GPT-2 style ``Conv1D``.

    Args:
        model: The model (run once on ``example_inputs`` in eval mode; nothing is changed).
        example_inputs: As for :func:`~lit_compress.surgery.trace.trace_dataflow`.
        leaf_types: Extra module classes to trace as one call.

    Returns:
        The chains, ordered by the first call of their first linear.
    """
    graph = trace_dataflow(model, example_inputs, leaf_types)
    modules = dict(model.named_modules())
    links: dict[str, ChainLink] = {}
    skipped: list[str] = []
    for node in graph.module_calls():
        if linear_layout(modules[node.name]) is None:
            continue
        link, path = _link_from(graph, modules, node)
        if link is None:
            if path:
                skipped.append(path)
            continue
        members = (link.first, link.activation, link.dropout, link.norm, link.second)
        shared = [n for n in members if n and len(graph.calls(n)) != 1]
        if shared:
            skipped.append(f"{_arrow(link)} (called more than once: {', '.join(dict.fromkeys(shared))})")
            continue
        links[link.first] = link
    if skipped:
        warnings.warn(f"find_linear_chains skipped: {'; '.join(skipped)}.", stacklevel=2)
    targets = {link.second for link in links.values()}
    chains: list[LinearChain] = []
    for first in links:
        if first in targets:
            continue  # inside a chain that starts earlier
        chain = LinearChain([first], [], [], [], [linear_layout(modules[first]) == "transposed"])
        current = first
        while current in links:
            link = links[current]
            chain.activations.append(link.activation)
            chain.dropouts.append(link.dropout)
            chain.norms.append(link.norm)
            chain.linears.append(link.second)
            chain.transposed.append(linear_layout(modules[link.second]) == "transposed")
            current = link.second
        chains.append(chain)
    return chains


def find_conv_bn_act(
    model: nn.Module, example_inputs: Any, leaf_types: Sequence[type[nn.Module]] = ()
) -> list[ConvBNAct]:
    """Find ``Conv2d → BatchNorm2d [→ activation]`` where only the BN reads the conv output.

    Conv and BN must each be called once. The activation is included when it alone reads the BN
    output (it may be a module called elsewhere too; see :attr:`ConvBNAct.activation_shared`).

    Returns:
        The patterns in execution order.
    """
    graph = trace_dataflow(model, example_inputs, leaf_types)
    modules = dict(model.named_modules())
    found: list[ConvBNAct] = []
    skipped: list[str] = []
    for node in graph.module_calls():
        if not isinstance(modules[node.name], nn.Conv2d) or len(node.outputs) != 1:
            continue
        bn_node, reason = _bn_after(graph, modules, node, nn.BatchNorm2d)
        if bn_node is None:
            if reason:
                skipped.append(reason)
            continue
        out = bn_node.outputs[0]
        activation = None
        act_node = _single_input_reader(graph, out)
        if act_node is not None and is_activation(modules[act_node.name]):
            activation = act_node.name
            out = act_node.outputs[0]
        after = _single_input_reader(graph, out)
        next_conv = after.name if after is not None and isinstance(modules[after.name], nn.Conv2d) else None
        shared = activation is not None and len(graph.calls(activation)) > 1
        found.append(ConvBNAct(node.name, bn_node.name, activation, next_conv, shared))
    if skipped:
        warnings.warn(f"find_conv_bn_act skipped: {'; '.join(skipped)}.", stacklevel=2)
    return found


def find_foldable_batchnorms(
    model: nn.Module, example_inputs: Any = None, leaf_types: Sequence[type[nn.Module]] = ()
) -> list[tuple[str, str]]:
    """``(conv_or_linear, bn)`` pairs whose BatchNorm can be folded into the layer before it.

    A pair qualifies when only the BN reads the layer's output, each is called exactly once, the BN
    tracks running statistics and the types match: ``Conv1d/2d/3d`` with ``BatchNorm1d/2d/3d``,
    ``Linear`` (2-D output) with ``BatchNorm1d``, any of them with ``SyncBatchNorm``.

    Args:
        model: The model (nothing is changed).
        example_inputs: Inputs for a trace. ``None`` uses :func:`sequential_conv_bn_pairs`, which only
            sees adjacent children of an ``nn.Sequential``.
        leaf_types: Extra module classes to trace as one call.

    Returns:
        The pairs in execution order (model order for the structural fallback).
    """
    if example_inputs is None:
        return sequential_conv_bn_pairs(model)
    graph = trace_dataflow(model, example_inputs, leaf_types)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    for node in graph.module_calls():
        layer = modules[node.name]
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or len(node.outputs) != 1:
            continue
        bn_node, reason = _bn_after(graph, modules, node, _BatchNorm)
        if bn_node is None:
            if reason:
                skipped.append(reason)
            continue
        bn = modules[bn_node.name]
        if not _types_fold(layer, bn):
            continue  # e.g. Conv2d -> BatchNorm1d: not a per-channel BN of this layer
        if isinstance(layer, nn.Linear) and len(graph.shapes[node.outputs[0]]) != 2:
            skipped.append(f"`{node.name}` -> `{bn_node.name}` (BatchNorm1d over a non-2-D Linear output)")
            continue
        problem = _bn_problem(layer, bn)
        if problem:
            skipped.append(f"`{node.name}` -> `{bn_node.name}` ({problem})")
            continue
        pairs.append((node.name, bn_node.name))
    if skipped:
        warnings.warn(f"find_foldable_batchnorms did not fold: {'; '.join(skipped)}.", stacklevel=2)
    return pairs


def sequential_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Structural fallback of :func:`find_foldable_batchnorms` when no example input is available.

    Returns adjacent ``(layer, bn)`` children of plain ``nn.Sequential`` containers (subclasses
    that override ``forward`` are skipped). It cannot see functional uses of a tensor, so it only
    trusts ``Sequential`` adjacency, and it skips modules registered under more than one name.
    A ``Linear → BatchNorm1d`` pair is assumed to see 2-D ``(N, C)`` activations.
    """
    registrations: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        registrations[id(module)] = registrations.get(id(module), 0) + 1
    pairs: list[tuple[str, str]] = []
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential) or type(container).forward is not nn.Sequential.forward:
            continue
        children = list(container.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(children):
            if not _types_fold(a, b) or _bn_problem(a, b) or registrations[id(a)] > 1 or registrations[id(b)] > 1:
                continue
            prefix = f"{name}." if name else ""
            pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def _types_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if isinstance(bn, nn.SyncBatchNorm):
        return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    return any(isinstance(layer, lt) and type(bn) is bt for lt, bt in _FOLDABLE_TYPES)


def _bn_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
        return "BatchNorm keeps no running statistics"
    channels = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, "out_channels", None)
    if channels != bn.num_features:
        return f"{channels} output channels vs {bn.num_features} BatchNorm features"
    return None


def _single_input_reader(graph: DataflowGraph, value: int) -> CallNode | None:
    """The only reader of ``value`` if it is a module call with ``value`` as its only input and one output."""
    node = graph.sole_consumer(value)
    if node is None or not node.is_module or node.inputs != (value,) or len(node.outputs) != 1:
        return None
    return node


def _bn_after(
    graph: DataflowGraph, modules: dict[str, nn.Module], node: CallNode, bn_type: type[nn.Module]
) -> tuple[CallNode | None, str | None]:
    """The BN call that alone reads ``node``'s output, or ``(None, reason)`` (reason ``None`` if no BN reads it)."""
    value = node.outputs[0]
    readers = graph.consumers(value)
    bn_readers = [r for r in readers if r.is_module and isinstance(modules[r.name], bn_type) and r.inputs == (value,)]
    if not bn_readers:
        return None, None
    bn_node = bn_readers[0]
    others = [r.name for r in readers if r is not bn_node]
    if others or graph.is_output(value):
        used = ", ".join(f"`{n}`" for n in dict.fromkeys(others)) or "the model output"
        return None, f"`{node.name}` -> `{bn_node.name}` (output of `{node.name}` also read by {used})"
    shared = [n for n in (node.name, bn_node.name) if len(graph.calls(n)) != 1]
    if shared:
        return None, f"`{node.name}` -> `{bn_node.name}` (called more than once: {', '.join(shared)})"
    return bn_node, None


def _link_from(
    graph: DataflowGraph, modules: dict[str, nn.Module], node: CallNode
) -> tuple[ChainLink | None, str | None]:
    """The link that starts at linear call ``node``; else ``(None, note)`` with a note for near misses."""
    if len(node.outputs) != 1:
        return None, None
    act = _single_input_reader(graph, node.outputs[0])
    if act is None:
        fn = graph.sole_consumer(node.outputs[0])
        if fn is not None and not fn.is_module and fn.name.rsplit(".", 1)[-1] in _FUNCTIONAL_ACTIVATIONS:
            nxt = _single_input_reader(graph, fn.outputs[0]) if len(fn.outputs) == 1 else None
            if nxt is not None and linear_layout(modules[nxt.name]) is not None:
                return None, f"`{node.name}` -> {fn.name} -> `{nxt.name}` (activation is a function call, not a module)"
        return None, None
    if not is_activation(modules[act.name]):
        return None, None
    step = _single_input_reader(graph, act.outputs[0])
    dropout = norm = None
    if step is not None and isinstance(modules[step.name], _DropoutNd):
        dropout = step.name
        step = _single_input_reader(graph, step.outputs[0])
    if step is not None and type(modules[step.name]) is nn.BatchNorm1d:
        norm = step.name
        step = _single_input_reader(graph, step.outputs[0])
    if step is None or linear_layout(modules[step.name]) is None:
        return None, None
    return ChainLink(node.name, act.name, dropout, norm, step.name), None


def _arrow(link: ChainLink) -> str:
    parts = [link.first, link.activation, link.dropout, link.norm, link.second]
    return " -> ".join(f"`{p}`" for p in parts if p)
