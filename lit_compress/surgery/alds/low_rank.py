"""ALDS layer surgery: a k-group low-rank decomposition of ``Conv2d``/``Linear`` layers, and back.

A layer with weight ``W`` (``f × c × κ1 × κ2``; a ``Linear`` is ``f × c``) is cut along its input
channels into ``k`` contiguous groups of ``c/k`` channels (``k`` divides ``c``). Each group is
folded into a matrix ``W_i`` of shape ``f × (c/k·κ1κ2)`` (plain reshape, ALDS fold scheme 0) and
replaced by its top-``j`` SVD factors, balanced as ``U·S^½`` and ``S^½·Vᵀ``; ``j`` is the same for
every group. The layer becomes

- an **encoder**: ``Conv2d(c → k·j, κ1×κ2, groups=k, bias=False)`` with the original stride,
  padding, dilation and padding mode (a ``Linear`` gets a :class:`GroupedLinear`, or a plain
  bias-free ``Linear`` when ``k = 1``);
- a **decoder**: ``Conv2d(k·j → f, 1×1)`` (``Linear(k·j → f)``) that keeps the original bias.

Parameters go from ``f·c·κ1κ2`` to ``j·(k·f + c·κ1κ2)``. :func:`recompose_layer` multiplies the
factors back into one dense layer (``W_i = A_i·B_i``), as the ALDS cascade does before each new
compression. Math runs in float64 and is cast back to the layer's dtype.

Decomposed layers get new parameter names (``<name>.encoder.weight``, ``<name>.decoder.weight``,
``<name>.decoder.bias``); after an event the optimizer state of these parameters starts fresh.

A plan is ``{layer name: {"groups": k, "rank": j}}`` (:data:`LowRankPlan`); the log records are
:class:`LowRankDecomposeRecord` and :class:`LowRankRecomposeRecord`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from lit_compress.errors import SurgeryError
from lit_compress.surgery.log import plain_record
from lit_compress.surgery.modules import (
    SurgeryTransaction,
    get_submodule,
    module_device_dtype,
    replace_submodule,
    split_name,
)
from lit_compress.surgery.replay import register_replay

Dense = nn.Conv2d | nn.Linear


class RankChoice(TypedDict):
    """The decomposition of one layer: ``k`` input-channel groups, rank ``j`` in each."""

    groups: int
    rank: int


#: ``{layer name: {"groups": k, "rank": j}}``: the layers to decompose (all others stay as they are).
LowRankPlan = dict[str, RankChoice]


class LowRankSpec(TypedDict):
    """One decomposed layer in a :class:`LowRankDecomposeRecord`."""

    name: str
    groups: int
    rank: int


class LowRankDecomposeRecord(TypedDict):
    """Log record of :func:`low_rank_decompose_`."""

    op: Literal["low_rank_decompose"]
    layers: list[LowRankSpec]


class LowRankRecomposeRecord(TypedDict):
    """Log record of :func:`low_rank_recompose_`: the names of the layers made dense again."""

    op: Literal["low_rank_recompose"]
    layers: list[str]


class GroupedLinear(nn.Module):
    """A bias-free linear map with ``groups`` independent blocks (the Linear analogue of a grouped conv).

    ``weight`` has shape ``(out_features, in_features // groups)``, laid out like a grouped conv's:
    rows ``g·o … (g+1)·o − 1`` (``o = out_features // groups``) read input features
    ``g·i … (g+1)·i − 1`` (``i = in_features // groups``).

    Shapes: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise SurgeryError(
                f"GroupedLinear: groups={groups} must divide in ({in_features}) and out ({out_features})."
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        g = self.groups
        xs = x.reshape(*x.shape[:-1], g, self.in_features // g)
        w = self.weight.reshape(g, self.out_features // g, self.in_features // g)
        return torch.einsum("...gi,goi->...go", xs, w).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, bias=False"


class LowRankLayer(nn.Module):
    """``decoder(encoder(x))``: the ALDS replacement of one dense layer (see the module docstring).

    Attributes:
        groups: ``k``, the number of input-channel groups.
        rank: ``j``, the rank kept in every group.
        kind: ``"conv2d"`` or ``"linear"``.
    """

    encoder: nn.Conv2d | nn.Linear | GroupedLinear
    decoder: nn.Conv2d | nn.Linear

    def __init__(
        self,
        encoder: nn.Conv2d | nn.Linear | GroupedLinear,
        decoder: nn.Conv2d | nn.Linear,
        groups: int,
        rank: int,
        kind: str,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.groups, self.rank, self.kind = int(groups), int(rank), kind

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, groups={self.groups}, rank={self.rank}"


# ------------------------------------------------------------------------------------------ geometry


def layer_shape(layer: nn.Module) -> tuple[int, int, int]:
    """``(f, c, κ1·κ2)`` of a dense ``Conv2d``/``Linear`` or of a :class:`LowRankLayer`."""
    if isinstance(layer, LowRankLayer):
        enc, dec = layer.encoder, layer.decoder
        if isinstance(enc, nn.Conv2d) and isinstance(dec, nn.Conv2d):
            return dec.out_channels, enc.in_channels, enc.kernel_size[0] * enc.kernel_size[1]
        if isinstance(enc, (nn.Linear, GroupedLinear)) and isinstance(dec, nn.Linear):
            return dec.out_features, enc.in_features, 1
        raise SurgeryError(
            f"LowRankLayer with a {type(enc).__name__} encoder and a {type(dec).__name__} decoder: "
            "expected two Conv2d, or a Linear/GroupedLinear and a Linear."
        )
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels, layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1
    raise SurgeryError(f"{type(layer).__name__} is not a Conv2d, Linear or LowRankLayer.")


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (the allowed group counts ``k`` for ``c = n``)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def max_rank(f: int, c: int, kk: int, k: int) -> int:
    """The full rank of one group's folded matrix: ``min(f, c/k·κ1κ2)``."""
    return min(f, (c // k) * kk)


def low_rank_size(f: int, c: int, kk: int, k: int, j: int) -> int:
    """Weight parameters of the decomposition: ``j·(k·f + c·κ1κ2)`` (biases are not counted)."""
    return j * (k * f + c * kk)


def undecomposable_reason(layer: nn.Module) -> str | None:
    """Why ALDS cannot decompose ``layer`` (``None`` when it can)."""
    if isinstance(layer, LowRankLayer):
        return "it is already decomposed"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
            return f"it is a {kind} conv (groups={layer.groups}); ALDS decomposes only groups=1 convs"
        return None
    if isinstance(layer, nn.Linear):
        return None
    return f"{type(layer).__name__} is not a Conv2d or Linear"


#: ``(parent class, child names, what the parent does)``: parents that read a child's ``.weight``
#: directly instead of calling it, so that child must stay a dense layer.
_READ_BY_PARENT: tuple[tuple[type[nn.Module], tuple[str, ...], str], ...] = (
    (
        nn.MultiheadAttention,
        ("out_proj",),
        "reads `out_proj.weight`/`.bias` directly (F.multi_head_attention_forward) instead of calling the layer",
    ),
    (
        nn.TransformerEncoderLayer,
        ("linear1", "linear2"),
        "reads `linear1.weight`/`linear2.weight` directly in its inference fast path (eval mode, no grad)",
    ),
)


def read_by_parent_reason(model: nn.Module, name: str) -> str | None:
    """Why the layer ``name`` must stay a dense module in ``model`` although it is a ``Linear``
    (``None`` when nothing outside it depends on its class).

    ``nn.MultiheadAttention`` computes with ``out_proj.weight``/``.bias`` instead of calling
    ``out_proj``, and ``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1.weight``
    and ``linear2.weight``: a decomposed layer there has no ``.weight`` and the forward fails.
    """
    if not name:
        return None
    parent_name, child = split_name(name)
    parent = get_submodule(model, parent_name)
    for kind, children, what in _READ_BY_PARENT:
        if isinstance(parent, kind) and child in children:
            return (
                f"its parent `{parent_name or '(model)'}` is an nn.{kind.__name__}, which {what}, so a decomposed "
                f"`{child}` would break it"
            )
    return None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run LAPACK calls on one thread: on a busy 2-core machine, two-thread MKL SVD/eigensolvers stalled
    for seconds per call (measured: 0.035 s for a 512×512 eigvalsh on one thread, 0.1-10 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ weights


def dense_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The dense weight (``f × c × κ1 × κ2`` or ``f × c``) and bias a layer computes, as float64.

    For a :class:`LowRankLayer` this is the recomposed weight ``W_i = A_i·B_i``.
    """
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        bias = None if layer.bias is None else layer.bias.detach().double()
        return layer.weight.detach().double(), bias
    if not isinstance(layer, LowRankLayer):
        raise SurgeryError(f"{type(layer).__name__} has no dense weight.")
    f, c, kk = layer_shape(layer)
    k, j = layer.groups, layer.rank
    enc = layer.encoder.weight.detach().double().reshape(k, j, (c // k) * kk)  # B_i: j × (c/k·κκ)
    dec = layer.decoder.weight.detach().double().reshape(f, k, j).permute(1, 0, 2)  # A_i: f × j
    groups = torch.bmm(dec, enc)  # k × f × (c/k·κκ)
    if isinstance(layer.encoder, nn.Conv2d):
        ks = layer.encoder.kernel_size
        weight = groups.reshape(k, f, c // k, ks[0], ks[1]).permute(1, 0, 2, 3, 4).reshape(f, c, ks[0], ks[1])
    else:
        weight = groups.permute(1, 0, 2).reshape(f, c)
    bias = None if layer.decoder.bias is None else layer.decoder.bias.detach().double()
    return weight, bias


def folded_groups(weight: Tensor, k: int) -> Tensor:
    """The ``k`` folded group matrices of a dense weight: ``k × f × (c/k·κ1κ2)`` (scheme 0, a reshape)."""
    f, c = weight.shape[0], weight.shape[1]
    if c % k:
        raise SurgeryError(f"k={k} does not divide the {c} input channels.")
    kk = weight[0, 0].numel()
    return weight.reshape(f, k, (c // k) * kk).permute(1, 0, 2)


# ------------------------------------------------------------------------------------------ leaf ops


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A ``Conv2d`` attribute (kernel size, stride, dilation, padding) as the pair its constructor takes."""
    return values[0], values[1]


def _conv2d_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int, bias: bool) -> nn.Conv2d:
    """A new ``Conv2d`` with ``conv``'s kernel size, stride, padding, dilation and padding mode."""
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    return nn.Conv2d(
        in_channels,
        out_channels,
        _pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=padding,
        dilation=_pair(conv.dilation),
        groups=groups,
        bias=bias,
        padding_mode=conv.padding_mode,
    )


def _empty_low_rank(layer: Dense, k: int, j: int) -> LowRankLayer:
    """The encoder/decoder structure for ``layer`` with ``k`` groups and rank ``j`` (values unset)."""
    device, dtype = module_device_dtype(layer)
    has_bias = layer.bias is not None
    encoder: nn.Conv2d | nn.Linear | GroupedLinear
    decoder: nn.Conv2d | nn.Linear
    if isinstance(layer, nn.Conv2d):
        encoder = _conv2d_like(layer, layer.in_channels, k * j, groups=k, bias=False)
        decoder = nn.Conv2d(k * j, layer.out_channels, 1, bias=has_bias)
        kind = "conv2d"
    else:
        encoder = nn.Linear(layer.in_features, j, bias=False) if k == 1 else GroupedLinear(layer.in_features, k * j, k)
        decoder = nn.Linear(k * j, layer.out_features, bias=has_bias)
        kind = "linear"
    return LowRankLayer(encoder, decoder, k, j, kind).to(device=device, dtype=dtype)


def low_rank_like(layer: Dense, groups: int, rank: int) -> LowRankLayer:
    """A :class:`LowRankLayer` with ``layer``'s geometry, ``groups`` (k) and ``rank`` (j), freshly
    initialised (no SVD): for timing a candidate decomposition."""
    _check_geometry(layer, groups, rank)
    return _empty_low_rank(layer, groups, rank)


def _check_geometry(layer: nn.Module, k: int, j: int) -> None:
    reason = undecomposable_reason(layer)
    if reason:
        raise SurgeryError(f"cannot decompose {type(layer).__name__}: {reason}.")
    f, c, kk = layer_shape(layer)
    if k < 1 or c % k:
        raise SurgeryError(f"groups k={k} must divide the {c} input channels (allowed: {divisors(c)}).")
    if not 1 <= j <= max_rank(f, c, kk, k):
        raise SurgeryError(f"rank j={j} must be in [1, {max_rank(f, c, kk, k)}] for k={k}.")


@torch.no_grad()
def decompose_layer(layer: Dense, groups: int, rank: int) -> LowRankLayer:
    """Replace-ready ALDS decomposition of ``layer`` with ``groups`` (k) and ``rank`` (j).

    Exact (up to float rounding) at full rank ``j = min(f, c/k·κ1κ2)``.

    Shapes: the result maps the same inputs to the same output shape as ``layer``.
    """
    _check_geometry(layer, groups, rank)
    k, j = groups, rank
    new = _empty_low_rank(layer, k, j)
    weight, bias = dense_weight(layer)
    _f, _c, _kk = layer_shape(layer)
    with single_thread():
        u, s, vh = torch.linalg.svd(folded_groups(weight, k), full_matrices=False)  # k×f×m, k×m, k×m×n
    root = s[:, :j].sqrt()
    a = u[:, :, :j] * root[:, None, :]  # k × f × j
    b = root[:, :, None] * vh[:, :j, :]  # k × j × (c/k·κκ)
    dtype = new.decoder.weight.dtype
    new.encoder.weight.copy_(b.reshape(new.encoder.weight.shape).to(dtype))
    new.decoder.weight.copy_(a.permute(1, 0, 2).reshape(new.decoder.weight.shape).to(dtype))
    if bias is not None and new.decoder.bias is not None:
        new.decoder.bias.copy_(bias.to(dtype))
    new.train(layer.training)
    return new


def _empty_dense(layer: LowRankLayer) -> Dense:
    f, c, _ = layer_shape(layer)
    device, dtype = module_device_dtype(layer)
    has_bias = layer.decoder.bias is not None
    dense: Dense
    if isinstance(layer.encoder, nn.Conv2d):
        dense = _conv2d_like(layer.encoder, c, f, groups=1, bias=has_bias)
    else:
        dense = nn.Linear(c, f, bias=has_bias)
    return dense.to(device=device, dtype=dtype)


@torch.no_grad()
def recompose_layer(layer: LowRankLayer) -> Dense:
    """The dense ``Conv2d``/``Linear`` that computes what ``layer`` computes (``W_i = A_i·B_i``)."""
    if not isinstance(layer, LowRankLayer):
        raise SurgeryError(f"recompose_layer expects a LowRankLayer, got {type(layer).__name__}.")
    dense = _empty_dense(layer)
    weight, bias = dense_weight(layer)
    dense.weight.copy_(weight.to(dense.weight.dtype))
    if bias is not None and dense.bias is not None:
        dense.bias.copy_(bias.to(dense.bias.dtype))
    dense.train(layer.training)
    return dense


# ------------------------------------------------------------------------------------------ model-wide


def _dense_layer(model: nn.Module, name: str) -> Dense:
    layer = get_submodule(model, name)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise SurgeryError(f"cannot decompose {type(layer).__name__}: {undecomposable_reason(layer)}.")
    return layer


def check_decomposable(model: nn.Module, plan: Mapping[str, RankChoice]) -> None:
    """Check every layer of ``plan`` in ``model`` (class, geometry, what reads it) without changing anything.

    Raises:
        SurgeryError: Naming the first layer that cannot be decomposed as planned, and why.
    """
    for name, spec in plan.items():
        try:
            reason = read_by_parent_reason(model, name)
            if reason:
                raise SurgeryError(f"cannot decompose {type(get_submodule(model, name)).__name__}: {reason}.")
            _check_geometry(_dense_layer(model, name), int(spec["groups"]), int(spec["rank"]))
        except SurgeryError as err:
            raise SurgeryError(f"`{name}`: {err}") from None


def low_rank_decompose_(model: nn.Module, plan: Mapping[str, RankChoice]) -> list[dict[str, Any]]:
    """Decompose every layer of ``plan`` (``{name: {"groups": k, "rank": j}}``) in place.

    All or nothing: every layer is checked first (:func:`check_decomposable`); a failure while
    replacing puts back the layers already replaced.

    Returns:
        One :class:`LowRankDecomposeRecord`.
    """
    check_decomposable(model, plan)
    layers: list[LowRankSpec] = []
    with SurgeryTransaction():
        for name, spec in plan.items():
            k, j = int(spec["groups"]), int(spec["rank"])
            try:
                new = decompose_layer(_dense_layer(model, name), k, j)
            except SurgeryError as err:
                raise SurgeryError(f"`{name}`: {err}") from None
            replace_submodule(model, name, new)
            layers.append({"name": name, "groups": k, "rank": j})
    record: LowRankDecomposeRecord = {"op": "low_rank_decompose", "layers": layers}
    return [plain_record(record)]


def low_rank_layers(model: nn.Module) -> list[str]:
    """Names of the :class:`LowRankLayer` modules of ``model``, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, LowRankLayer)]


def _low_rank_layer(model: nn.Module, name: str) -> LowRankLayer:
    layer = get_submodule(model, name)
    if not isinstance(layer, LowRankLayer):
        raise SurgeryError(f"`{name}` is a {type(layer).__name__}, not a decomposed layer.")
    return layer


def low_rank_recompose_(model: nn.Module, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Recompose the named (default: all) decomposed layers into dense layers in place.

    Returns:
        One :class:`LowRankRecomposeRecord`, or ``[]`` when there is nothing to recompose.
    """
    names = low_rank_layers(model) if names is None else list(names)
    if not names:
        return []
    for name in names:
        _low_rank_layer(model, name)  # every name checked before anything changes
    with SurgeryTransaction():
        for name in names:
            replace_submodule(model, name, recompose_layer(_low_rank_layer(model, name)))
    record: LowRankRecomposeRecord = {"op": "low_rank_recompose", "layers": list(names)}
    return [plain_record(record)]


@register_replay("low_rank_decompose")
def _replay_decompose(model: nn.Module, record: LowRankDecomposeRecord) -> None:
    check_decomposable(model, {s["name"]: {"groups": s["groups"], "rank": s["rank"]} for s in record["layers"]})
    for spec in record["layers"]:
        k, j = int(spec["groups"]), int(spec["rank"])
        layer = get_submodule(model, spec["name"])
        _check_geometry(layer, k, j)
        replace_submodule(model, spec["name"], _empty_low_rank(_dense_layer(model, spec["name"]), k, j))


@register_replay("low_rank_recompose")
def _replay_recompose(model: nn.Module, record: LowRankRecomposeRecord) -> None:
    for name in record["layers"]:
        layer = get_submodule(model, name)
        if not isinstance(layer, LowRankLayer):
            raise SurgeryError(f"`{name}` is a {type(layer).__name__}, not a decomposed layer.")
        replace_submodule(model, name, _empty_dense(layer))


__all__ = [
    "GroupedLinear",
    "LowRankDecomposeRecord",
    "LowRankLayer",
    "LowRankPlan",
    "LowRankRecomposeRecord",
    "LowRankSpec",
    "RankChoice",
    "check_decomposable",
    "decompose_layer",
    "dense_weight",
    "divisors",
    "folded_groups",
    "layer_shape",
    "low_rank_decompose_",
    "low_rank_layers",
    "low_rank_like",
    "low_rank_recompose_",
    "low_rank_size",
    "max_rank",
    "read_by_parent_reason",
    "recompose_layer",
    "undecomposable_reason",
]
