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

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from lit_compress.errors import SurgeryError
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


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer: ``nn.Linear`` (weight ``(out, in)``) or a
    GPT-2 style ``Conv1D`` (weight ``(in, out)``, attributes ``nx``/``nf``).

    Raises:
        SurgeryError: For any other module (its type named).
    """
    layout = linear_layout(module)
    if layout == "linear":
        assert isinstance(module, nn.Linear)
        return module.in_features, module.out_features
    if layout == "transposed":
        weight = module.get_parameter("weight")
        return int(weight.shape[0]), int(weight.shape[1])
    raise SurgeryError(
        f"A {type(module).__name__} is not a linear-like layer (allowed: nn.Linear, a GPT-2 style Conv1D)."
    )


def is_passthrough(module: nn.Module) -> bool:
    """Whether ``module`` is the identity in every mode: ``nn.Identity`` or a dropout with ``p = 0``."""
    return isinstance(module, nn.Identity) or (isinstance(module, _DropoutNd) and float(module.p) == 0.0)


@dataclass(frozen=True)
class ChainLink:
    """One step ``first → … → second`` of a :class:`LinearChain`: one ``activation``, at most one
    ``dropout`` with ``p > 0`` and at most one ``BatchNorm1d`` (``norm``, before or after the
    activation) in any order; ``nn.Identity`` and ``p = 0`` dropouts may sit anywhere in between
    (``dropout`` names one of them when there is no ``p > 0`` dropout)."""

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
        dropouts: The ``k`` dropouts of each link (``None`` where there is none).
        norms: The ``k`` ``BatchNorm1d`` of each link, before or after its activation (or ``None``).
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
class GatedMLP:
    """A gated MLP ``down(act(gate(x)) * up(x))`` (Llama, Mistral, SmolLM).

    It cannot collapse into one Linear: at slope 1 it is ``down(gate(x) * up(x))``, quadratic in ``x``.
    """

    gate: str
    activation: str
    up: str
    down: str

    def describe(self) -> str:
        """A one-line description naming the gate."""
        return (
            f"`{self.down}`(`{self.activation}`(`{self.gate}`(x)) * `{self.up}`(x)) is a gated MLP: the gate "
            f"`{self.gate}` multiplies with `{self.up}`, so even with a linear activation the MLP is quadratic "
            "in x and cannot collapse into one Linear"
        )


@dataclass
class MLPDiscovery:
    """What :func:`discover_mlps` found: collapsible chains, gated MLPs, and notes on near misses."""

    chains: list[LinearChain]
    gated: list[GatedMLP]
    skipped: list[str]
    called: frozenset[str] = frozenset()  # the leaf modules the trace saw called


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
    link must be called exactly once. Linear layers are ``nn.Linear`` or GPT-2 style ``Conv1D``. The
    BatchNorm1d may sit before or after the activation, dropout and BatchNorm in either order, and
    ``nn.Identity`` / ``p = 0`` dropouts anywhere in between (timm's ``Mlp`` with ``norm=Identity``).
    Gated MLPs and other near misses are named in one warning.

    Args:
        model: The model (run once on ``example_inputs`` in eval mode; nothing is changed).
        example_inputs: As for :func:`~lit_compress.surgery.trace.trace_dataflow`.
        leaf_types: Extra module classes to trace as one call.

    Returns:
        The chains, ordered by the first call of their first linear.
    """
    found = discover_mlps(model, example_inputs, leaf_types)
    notes = found.skipped + [g.describe() for g in found.gated]
    if notes:
        warnings.warn(f"find_linear_chains skipped: {'; '.join(notes)}.", stacklevel=2)
    return found.chains


def discover_mlps(model: nn.Module, example_inputs: Any, leaf_types: Sequence[type[nn.Module]] = ()) -> MLPDiscovery:
    """:func:`find_linear_chains` without the warning: the chains, the gated MLPs and the near misses."""
    return _discover(model, trace_dataflow(model, example_inputs, leaf_types))


def _discover(model: nn.Module, graph: DataflowGraph) -> MLPDiscovery:
    modules = dict(model.named_modules())
    links: dict[str, ChainLink] = {}
    gated: list[GatedMLP] = []
    skipped: list[str] = []
    for node in graph.module_calls():
        if linear_layout(modules[node.name]) is None:
            continue
        link, path = _link_from(graph, modules, node)
        if isinstance(link, GatedMLP):
            gated.append(link)
            continue
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
    return MLPDiscovery(chains, gated, skipped, frozenset(n.name for n in graph.module_calls()))


def probe_mlps(model: nn.Module, name: str) -> tuple[str, MLPDiscovery] | None:
    """Discover the MLPs around module ``name`` without example inputs: trace its parent module on a
    probe input of shape ``(2, d)``, ``d`` each distinct ``in_features`` of the parent's linear-like
    layers in turn, until one runs.

    Returns:
        ``(parent name, discovery)`` with every name qualified in ``model``, or ``None`` when no
        probe runs (the structure cannot be checked this way).
    """
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    tensors = [t for t in itertools.chain(parent.parameters(), parent.buffers()) if t.is_floating_point()]
    if not tensors:
        return None
    dims = list(dict.fromkeys(linear_features(m)[0] for m in parent.modules() if linear_layout(m) is not None))
    for d in dims[:3]:
        probe = torch.zeros(2, d, device=tensors[0].device, dtype=tensors[0].dtype)
        try:
            graph = trace_dataflow(parent, probe)
        except SurgeryError:
            continue
        found = _discover(parent, graph)
        return parent_name, _qualified(found, parent_name)
    return None


def _qualified(found: MLPDiscovery, prefix: str) -> MLPDiscovery:
    if not prefix:
        return found

    def q(n: str | None) -> str | None:
        return None if n is None else f"{prefix}.{n}"

    def qs(n: str) -> str:
        return f"{prefix}.{n}"

    chains = [
        LinearChain(
            [qs(n) for n in c.linears],
            [qs(n) for n in c.activations],
            [q(n) for n in c.dropouts],
            [q(n) for n in c.norms],
            list(c.transposed),
        )
        for c in found.chains
    ]
    gated = [GatedMLP(qs(g.gate), qs(g.activation), qs(g.up), qs(g.down)) for g in found.gated]
    return MLPDiscovery(chains, gated, found.skipped, frozenset(qs(n) if n else prefix for n in found.called))


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


_MUL_FUNCTIONS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}


def _link_from(
    graph: DataflowGraph, modules: dict[str, nn.Module], node: CallNode
) -> tuple[ChainLink | GatedMLP | None, str | None]:
    """The link (or gated MLP) that starts at linear call ``node``; else ``(None, note)`` with a note
    for near misses.

    From ``node`` the walk follows single-reader module calls: one activation, at most one dropout
    and one ``BatchNorm1d`` (over a 2-D value), any number of pass-throughs (:func:`is_passthrough`),
    up to the next linear-like layer.
    """
    if len(node.outputs) != 1:
        return None, None
    act = dropout = norm = None
    value = node.outputs[0]
    while True:
        step = _single_input_reader(graph, value)
        if step is None:
            break
        module = modules[step.name]
        if linear_layout(module) is not None:
            if act is None:
                return None, None
            return ChainLink(node.name, act, dropout, norm, step.name), None
        if isinstance(module, _DropoutNd) and (dropout is None or is_passthrough(modules[dropout])):
            dropout = step.name  # one dropout is named (removed at collapse): p > 0 preferred; others p = 0
        elif is_passthrough(module):
            pass
        elif type(module) is nn.BatchNorm1d and norm is None and len(graph.shapes[value]) == 2:
            norm = step.name
        elif is_activation(module) and act is None:
            act = step.name
        else:
            return None, None
        value = step.outputs[0]
    fn = graph.sole_consumer(value)
    if fn is None or fn.is_module:
        return None, None
    short = fn.name.rsplit(".", 1)[-1]
    if act is None and short in _FUNCTIONAL_ACTIVATIONS and len(fn.outputs) == 1:
        nxt = _single_input_reader(graph, fn.outputs[0])
        if nxt is not None and linear_layout(modules[nxt.name]) is not None:
            return None, f"`{node.name}` -> {fn.name} -> `{nxt.name}` (activation is a function call, not a module)"
    if act is not None and short in _MUL_FUNCTIONS and len(fn.inputs) == 2 and len(fn.outputs) == 1:
        return _gated(graph, modules, node.name, act, value, fn), None
    return None, None


def _gated(
    graph: DataflowGraph, modules: dict[str, nn.Module], gate: str, act: str, value: int, mul: CallNode
) -> GatedMLP | None:
    """``down(act(gate(x)) * up(x))`` around the product ``mul`` of ``value`` and an ``up`` projection."""
    other = next(v for v in mul.inputs if v != value)
    producer = graph.producer(other)
    while producer is not None and producer.is_module and is_passthrough(modules[producer.name]):
        producer = graph.producer(producer.inputs[0]) if producer.inputs else None
    if producer is None or not producer.is_module or linear_layout(modules[producer.name]) is None:
        return None
    out = mul.outputs[0]
    while True:
        step = _single_input_reader(graph, out)
        if step is None:
            return None
        module = modules[step.name]
        if linear_layout(module) is not None:
            return GatedMLP(gate, act, producer.name, step.name)
        if not isinstance(module, (nn.Identity, _DropoutNd)):
            return None
        out = step.outputs[0]


def _arrow(link: ChainLink) -> str:
    parts = [link.first, link.activation, link.dropout, link.norm, link.second]
    return " -> ".join(f"`{p}`" for p in parts if p)
