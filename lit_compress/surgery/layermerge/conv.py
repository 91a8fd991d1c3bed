"""Exact composition of consecutive 2-D convolutions (LayerMerge's merge step).

Two convolutions A then B with nothing in between (no activation, BN already folded) are one
convolution. Per spatial dimension, with kernel ``k``, stride ``s``, padding ``p``, dilation ``d``::

    kernel  K = d_A (k_A - 1) + s_A d_B (k_B - 1) + 1      (dilation of the result is 1)
    stride  S = s_A s_B
    padding P = p_A + s_A p_B
    weight  W[q, c, s_A d_B v + d_A u] += sum_o W_B[q, o, v] W_A[o, c, u]
    bias    b[q] = sum_o (sum_v W_B[q, o, v]) b_A[o] + b_B[q]

When is this exact? The composed conv equals the chain **with its padding moved to the first
conv** (:func:`move_padding_to_first`: A pads by ``p_A + s_A p_B``, B pads by 0), for every input
size, and that chain has the same output size as the original one. It is *not* equal to the
original chain when ``p_B > 0``: there B zero-pads the intermediate map, whose border would
otherwise hold ``A``'s response to padded input (at least ``b_A``), so the two differ on a border
of the output. LayerMerge therefore fine-tunes with the padding already moved (``adjust_padding``)
and merges afterwards; the callback should do the same (:func:`move_chain_padding_`, then
:func:`merge_conv_chain_`). Only ``padding_mode="zeros"`` is supported.

Groups: both convs are expanded to dense block-diagonal kernels; the result keeps ``groups=g``
when both have the same ``g`` (depthwise∘depthwise stays depthwise), else it is dense
(depthwise∘pointwise, pointwise∘depthwise, ...). All math runs in float64 and is cast back to the
first conv's dtype and device.

Model-wide functions and their records::

    {"op": "move_padding", "names": [...], "paddings": [[ph, pw], ...]}
    {"op": "merge_convs", "names": [...], "in_channels": int, "out_channels": int,
     "kernel_size": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "groups": int, "bias": bool}
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery.log import make_record
from lit_compress.surgery.modules import SurgeryTransaction, get_submodule, replace_submodule
from lit_compress.surgery.replay import register_replay

__all__ = [
    "compose_conv_chain",
    "compose_convs",
    "fuse_downsample_skip",
    "fuse_identity_skip",
    "merge_conv_chain_",
    "move_chain_padding_",
    "move_padding_to_first",
]

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# checks and helpers
# --------------------------------------------------------------------------------------------


def _check_conv(conv: Any, what: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise SurgeryError(f"Cannot merge {what}: expected nn.Conv2d, got {type(conv).__name__}.")
    if conv.padding_mode != "zeros":
        raise SurgeryError(
            f"Cannot merge {what}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros' composes exactly)."
        )
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise SurgeryError(
            f"Cannot merge {what}: padding={conv.padding!r}; give explicit integer paddings instead of 'same'."
        )
    if parametrize.is_parametrized(conv):
        raise SurgeryError(f"Cannot merge {what}: it is parametrized; remove its parametrizations first.")
    return conv


def _pad(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # only "valid" gets here
        return (0, 0)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1]))


def _dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The float64 weight as a dense ``(C_out, C_in, kh', kw')`` kernel with dilation 1 (block-diagonal for groups)."""
    w = conv.weight.detach().to(_F64)
    cout, cin_g, kh, kw = w.shape
    g = conv.groups
    cout_g = cout // g
    dh, dw = _pair(conv.dilation)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    dense = torch.zeros(g, cout_g, g, cin_g, eh, ew, dtype=_F64, device=w.device)
    idx = torch.arange(g, device=w.device)
    # advanced indices on dims 0 and 2 go first: the target view is (g, cout_g, cin_g, kh, kw)
    dense[idx, :, idx, :, ::dh, ::dw] = w.view(g, cout_g, cin_g, kh, kw)
    return dense.view(cout, cin_g * g, eh, ew)


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=_F64, device=conv.weight.device)
    return conv.bias.detach().to(_F64)


def _pack(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of the block-diagonal expansion: ``(C_out, C_in, k, k)`` -> ``(C_out, C_in / g, k, k)``."""
    if groups == 1:
        return dense
    cout, cin = dense.shape[:2]
    cout_g, cin_g = cout // groups, cin // groups
    idx = torch.arange(groups, device=dense.device)
    blocks = dense.reshape(groups, cout_g, groups, cin_g, *dense.shape[2:])[idx, :, idx]  # (g, cout_g, cin_g, k, k)
    return blocks.reshape(cout, cin_g, *dense.shape[2:])


def _build(
    ref: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
) -> nn.Conv2d:
    """A new Conv2d with the given float64 dense weight packed for ``groups``, on ``ref``'s device/dtype."""
    packed = _pack(weight, groups)
    cout, cin_g, kh, kw = packed.shape
    dtype, device = ref.weight.dtype, ref.weight.device
    new = nn.Conv2d(
        cin_g * groups,
        cout,
        (kh, kw),
        stride=stride,
        padding=padding,
        groups=groups,
        bias=bias is not None,
        device=device,
        dtype=dtype,
    )
    rg = ref.weight.requires_grad
    new.weight = nn.Parameter(packed.to(device=device, dtype=dtype), requires_grad=rg)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=rg)
    new.train(ref.training)
    return new


# --------------------------------------------------------------------------------------------
# leaf functions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compose_convs(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """A new Conv2d equal to ``second(first(x))`` once the chain's padding is moved to ``first``.

    Exactly: ``compose_convs(a, b)(x) == b'(a'(x))`` with ``[a', b'] = move_padding_to_first([a, b])``,
    for every input size; the output size equals that of the original chain ``b(a(x))``. If
    ``second`` has no padding, this is simply ``second(first(x))``. Inputs are not modified.

    The result has dilation 1 (dilated kernels are expanded), a bias if either input has one, and
    ``groups=g`` when both have ``groups=g`` (e.g. depthwise∘depthwise), else ``groups=1``.

    Raises:
        SurgeryError: If either is not a zero-padded, unparametrized nn.Conv2d, or the channels
            do not chain (``first.out_channels != second.in_channels``).
    """
    _check_conv(first, "the first conv")
    _check_conv(second, "the second conv")
    if first.out_channels != second.in_channels:
        raise SurgeryError(
            f"Cannot compose convs: the first has {first.out_channels} output channels but the second expects "
            f"{second.in_channels} input channels."
        )
    device = first.weight.device
    wa = _dense_weight(first)  # (M, C, ea_h, ea_w)
    wb = _dense_weight(second).to(device)  # (Q, M, eb_h, eb_w); dilation of B already in the spacing
    sa, sb = _pair(first.stride), _pair(second.stride)
    pa, pb = _pad(first), _pad(second)
    eah, eaw = wa.shape[2:]
    ebh, ebw = wb.shape[2:]
    kh, kw = eah + sa[0] * (ebh - 1), eaw + sa[1] * (ebw - 1)
    weight = torch.zeros(wb.shape[0], wa.shape[1], kh, kw, dtype=_F64, device=device)
    for vh in range(ebh):
        for vw in range(ebw):
            tap = wb[:, :, vh, vw]  # (Q, M)
            if not torch.any(tap):
                continue  # dilation holes
            weight[:, :, sa[0] * vh : sa[0] * vh + eah, sa[1] * vw : sa[1] * vw + eaw] += torch.einsum(
                "qm,mchw->qchw", tap, wa
            )
    has_bias = first.bias is not None or second.bias is not None
    bias = None
    if has_bias:
        bias = wb.sum(dim=(2, 3)) @ _bias(first).to(device) + _bias(second).to(device)
    groups = first.groups if first.groups == second.groups else 1
    stride = (sa[0] * sb[0], sa[1] * sb[1])
    padding = (pa[0] + sa[0] * pb[0], pa[1] + sa[1] * pb[1])
    return _build(first, weight, bias, stride, padding, groups)


def compose_conv_chain(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    """Fold :func:`compose_convs` left to right over a chain of at least one conv (one conv: a copy)."""
    convs = list(convs)
    if not convs:
        raise SurgeryError("Cannot compose an empty chain of convs.")
    out = _check_conv(convs[0], "the first conv")
    if len(convs) == 1:
        return copy.deepcopy(out)
    for nxt in convs[1:]:
        out = compose_convs(out, nxt)
    return out


def _moved_paddings(convs: Sequence[nn.Conv2d]) -> list[tuple[int, int]]:
    """Total padding ``P = p_1 + s_1 p_2 + s_1 s_2 p_3 + ...`` on the first conv, 0 elsewhere."""
    total = [0, 0]
    scale = [1, 1]
    for conv in convs:
        p, s = _pad(conv), _pair(conv.stride)
        for i in range(2):
            total[i] += scale[i] * p[i]
            scale[i] *= s[i]
    return [(total[0], total[1])] + [(0, 0)] * (len(convs) - 1)


def move_padding_to_first(convs: Sequence[nn.Conv2d]) -> list[nn.Conv2d]:
    """Copies of the chain with all padding accumulated on the first conv and zero on the others.

    The first conv gets ``p_1 + s_1 p_2 + s_1 s_2 p_3 + ...`` (per dimension). The chain's output size
    is unchanged, and the new chain equals :func:`compose_conv_chain` of it exactly (the original
    chain differs on an output border whenever a later conv had padding). Inputs are not modified.

    Raises:
        SurgeryError: If a conv is not a zero-padded nn.Conv2d, or the channels do not chain.
    """
    convs = [_check_conv(c, f"conv #{i} of the chain") for i, c in enumerate(convs)]
    for i, (a, b) in enumerate(itertools.pairwise(convs)):
        if a.out_channels != b.in_channels:
            raise SurgeryError(
                f"Cannot move padding: conv #{i} has {a.out_channels} output channels but conv #{i + 1} expects "
                f"{b.in_channels}."
            )
    out = []
    for conv, p in zip(convs, _moved_paddings(convs)):
        new = copy.deepcopy(conv)
        new.padding = p
        out.append(new)
    return out


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise SurgeryError(msg)


@torch.no_grad()
def fuse_identity_skip(conv: nn.Conv2d) -> nn.Conv2d:
    """A new Conv2d equal to ``conv(x) + x``: 1 is added at the centre tap of ``W[i, i]``.

    Requires ``in_channels == out_channels``, stride 1, odd kernel and "same" padding
    (``padding == dilation * (k - 1) / 2``) so that the output has the input's size.

    Raises:
        SurgeryError: Naming the requirement that does not hold.
    """
    _check_conv(conv, "an identity skip into the conv")
    c = conv.out_channels
    _require(
        conv.in_channels == c, f"Cannot fuse an identity skip: in_channels={conv.in_channels} != out_channels={c}."
    )
    _require(_pair(conv.stride) == (1, 1), f"Cannot fuse an identity skip: stride={tuple(conv.stride)}, need (1, 1).")
    k, d, p = _pair(conv.kernel_size), _pair(conv.dilation), _pad(conv)
    _require(all(x % 2 == 1 for x in k), f"Cannot fuse an identity skip: kernel_size={k} is not odd.")
    same = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    _require(p == same, f"Cannot fuse an identity skip: padding={p}, need {same} so the output keeps the input size.")
    weight = conv.weight.detach().to(_F64).clone()
    cin_g = c // conv.groups
    idx = torch.arange(c, device=weight.device)
    weight[idx, idx % cin_g, k[0] // 2, k[1] // 2] += 1.0
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return new


@torch.no_grad()
def fuse_downsample_skip(conv: nn.Conv2d, downsample: nn.Conv2d) -> nn.Conv2d:
    """A new Conv2d equal to ``conv(x) + downsample(x)`` for a 1x1 (possibly strided) shortcut conv.

    Fold the shortcut's BN into it first. The shortcut's weight (and bias) is added at the tap of
    ``conv`` that reads the same input pixel: that is the centre tap, and it requires equal strides
    and channels, an odd kernel and ``padding(conv) - padding(ds) == dilation * (k - 1) / 2`` (then
    both outputs have the same size for every input). The result is dense unless both convs have
    the same groups.

    Raises:
        SurgeryError: If the shortcut is not 1x1, or channels, strides or paddings do not line up.
    """
    _check_conv(conv, "a downsample skip into the conv")
    _check_conv(downsample, "the downsample shortcut")
    _require(
        _pair(downsample.kernel_size) == (1, 1),
        f"Cannot fuse a downsample skip: the shortcut has kernel_size={tuple(downsample.kernel_size)}, need (1, 1).",
    )
    _require(
        (conv.in_channels, conv.out_channels) == (downsample.in_channels, downsample.out_channels),
        f"Cannot fuse a downsample skip: channels {conv.in_channels}->{conv.out_channels} of the conv do not match "
        f"{downsample.in_channels}->{downsample.out_channels} of the shortcut.",
    )
    _require(
        _pair(conv.stride) == _pair(downsample.stride),
        f"Cannot fuse a downsample skip: strides differ (conv {tuple(conv.stride)}, shortcut "
        f"{tuple(downsample.stride)}).",
    )
    k, d, p, pd = _pair(conv.kernel_size), _pair(conv.dilation), _pad(conv), _pad(downsample)
    _require(all(x % 2 == 1 for x in k), f"Cannot fuse a downsample skip: kernel_size={k} is not odd.")
    offset = tuple(pi - qi for pi, qi in zip(p, pd))
    centre = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    _require(
        offset == centre,
        f"Cannot fuse a downsample skip: paddings do not line up (conv padding {p} minus shortcut padding {pd} "
        f"= {offset}, need {centre}, the centre tap).",
    )
    dense = _dense_weight(conv)  # dilation expanded; centre tap at `centre`
    dense[:, :, centre[0], centre[1]] += _dense_weight(downsample).to(dense.device)[:, :, 0, 0]
    has_bias = conv.bias is not None or downsample.bias is not None
    bias = _bias(conv) + _bias(downsample).to(conv.weight.device) if has_bias else None
    groups = conv.groups if conv.groups == downsample.groups else 1
    return _build(conv, dense, bias, _pair(conv.stride), p, groups)


# --------------------------------------------------------------------------------------------
# model-wide functions
# --------------------------------------------------------------------------------------------


def _check_names(names: Any, minimum: int) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"`names`={names!r} is not allowed: give a list of conv module names.")
    names = list(names)
    if len(names) < minimum or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"`names`={names!r} is not allowed: need at least {minimum} distinct, non-empty module names."
        )
    return names


def _chain(model: nn.Module, names: list[str]) -> list[nn.Conv2d]:
    convs = []
    for name in names:
        module = get_submodule(model, name)
        if not isinstance(module, nn.Conv2d):
            raise SurgeryError(f"`{name}` is a {type(module).__name__}, expected nn.Conv2d.")
        convs.append(module)
    for (na, a), (nb, b) in zip(zip(names, convs), zip(names[1:], convs[1:])):
        if a.out_channels != b.in_channels:
            raise SurgeryError(
                f"`{na}` has {a.out_channels} output channels but `{nb}` expects {b.in_channels}: not a conv chain."
            )
    return convs


def move_chain_padding_(model: nn.Module, names: Sequence[str]) -> list[dict[str, Any]]:
    """Move all padding of the conv chain ``names`` onto its first conv, in place (LayerMerge ``adjust_padding``).

    Do this before fine-tuning a chain that will be merged: the trained chain then equals the
    merged conv exactly. Each conv is replaced by a copy (same weights) with its new padding.

    Returns:
        ``[make_record("move_padding", names=[...], paddings=[[ph, pw], ...])]``.

    Raises:
        ConfigError: If ``names`` is not a list of at least two distinct names.
        SurgeryError: If a name is not a zero-padded nn.Conv2d or the channels do not chain.
    """
    names = _check_names(names, 2)
    moved = move_padding_to_first(_chain(model, names))
    with SurgeryTransaction():
        for name, conv in zip(names, moved):
            replace_submodule(model, name, conv)
    return [make_record("move_padding", names=names, paddings=[list(_pad(c)) for c in moved])]


@register_replay("move_padding")
def _replay_move_padding(model: nn.Module, record: dict[str, Any]) -> None:
    names = _check_names(record["names"], 2)
    convs = _chain(model, names)
    for name, conv, pad in zip(names, convs, record["paddings"]):
        new = copy.deepcopy(conv)
        new.padding = (int(pad[0]), int(pad[1]))
        replace_submodule(model, name, new)


@torch.no_grad()
def merge_conv_chain_(model: nn.Module, names: Sequence[str]) -> list[dict[str, Any]]:
    """Replace a chain of directly consecutive convs by one composed conv, in place; all or nothing.

    The first name gets :func:`compose_conv_chain` of the chain, the others become ``nn.Identity``.
    The caller guarantees that the convs feed each other directly (no activation, no un-folded BN,
    no other consumer of the intermediate maps); only channel counts are checked here. The merged
    model equals the chain exactly when its padding was moved first (:func:`move_chain_padding_`),
    and keeps the output size in any case.

    Returns:
        ``[make_record("merge_convs", names, in_channels, out_channels, kernel_size, stride,
        padding, groups, bias)]``.

    Raises:
        ConfigError: If ``names`` is not a list of at least two distinct names.
        SurgeryError: If the chain cannot be composed; the model is then unchanged.
    """
    names = _check_names(names, 2)
    convs = _chain(model, names)
    try:
        merged = compose_conv_chain(convs)
    except SurgeryError as err:
        raise SurgeryError(f"Cannot merge {names}: {err}") from None
    with SurgeryTransaction():
        replace_submodule(model, names[0], merged)
        for name, conv in zip(names[1:], convs[1:]):
            replace_submodule(model, name, nn.Identity().train(conv.training))
    return [
        make_record(
            "merge_convs",
            names=names,
            in_channels=merged.in_channels,
            out_channels=merged.out_channels,
            kernel_size=list(merged.kernel_size),
            stride=list(merged.stride),
            padding=list(_pad(merged)),
            groups=merged.groups,
            bias=merged.bias is not None,
        )
    ]


@register_replay("merge_convs")
def _replay_merge_convs(model: nn.Module, record: dict[str, Any]) -> None:
    """Rebuild the merged structure (shapes only; the checkpoint's weights are loaded afterwards)."""
    names = _check_names(record["names"], 2)
    convs = _chain(model, names)
    first, last = convs[0], convs[-1]
    if (first.in_channels, last.out_channels) != (record["in_channels"], record["out_channels"]):
        raise SurgeryError(
            f"the chain {names} maps {first.in_channels}->{last.out_channels} channels, the record "
            f"{record['in_channels']}->{record['out_channels']}."
        )
    merged = nn.Conv2d(
        record["in_channels"],
        record["out_channels"],
        tuple(record["kernel_size"]),
        stride=tuple(record["stride"]),
        padding=tuple(record["padding"]),
        groups=int(record["groups"]),
        bias=bool(record["bias"]),
        device=first.weight.device,
        dtype=first.weight.dtype,
    ).train(first.training)
    replace_submodule(model, names[0], merged)
    for name, conv in zip(names[1:], convs[1:]):
        replace_submodule(model, name, nn.Identity().train(conv.training))
