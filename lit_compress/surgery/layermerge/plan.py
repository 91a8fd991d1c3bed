"""Apply a LayerMerge plan for fine-tuning, and the final merge.

A **plan** is plain data: ``{"blocks": [[s, e, [kept sites]], ...]}`` tiling positions 0..L
(see :mod:`lit_compress.surgery.layermerge.blocks`). :func:`apply_merge_plan_` turns the network into
the *unmerged* fine-tuning network of that plan:

- activations strictly inside a block become ``nn.Identity``; a block spanning more than one
  position ends with an activation (the original one, or a forced one where there was none);
- pruned convs and their BNs become ``nn.Identity``;
- all padding of each block's kept chain moves to its first conv, and a skip whose input or
  output lies inside a chain is zero-padded (or centre-cropped) by the difference of the chain's
  spatial margins, so the trained network equals the merged one exactly;
- residual units (torchvision BasicBlock/Bottleneck, cifar BasicBlock, InvertedResidual) are
  replaced by a :class:`PlannedUnit` (``body`` Sequential of ``conv{j}``/``bn{j}``/``act{j}``,
  ``post`` activation after the skip add, ``shortcut``). Plain sequential nets are edited leaf by leaf.

:func:`merge_planned_` then folds every BN of the trunk into its conv, composes each chain into
one conv (exact composition, kernel ``1 + Σ (k_i - 1)``) placed at the first kept conv, and fuses
the skips of covered residual units into it (identity: +1 at the centre tap; 1x1 shortcut: its
BN-folded weight at the centre tap). In eval mode the merged network equals the planned one.

Records (:class:`LayerMergePlanRecord`, :class:`LayerMergeFinalRecord`)::

    {"op": "layer_merge_plan", "blocks": [...], "layout": {...}}
    {"op": "layer_merge_final", "blocks": [...], "layout": {...}, "kernels": [...]}

``layout`` (:class:`MergeLayout`) is plain data describing the planned network (names, original
paddings, residual spans), so both ops replay on a fresh model without re-analysing it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery.bn_fold import fold_conv_bn
from lit_compress.surgery.layermerge.blocks import ACTIVATION_CLASSES, MergeSpace, _block_valid, analyze_merge_space
from lit_compress.surgery.layermerge.conv import compose_convs, fuse_downsample_skip, fuse_identity_skip
from lit_compress.surgery.log import plain_record
from lit_compress.surgery.modules import SurgeryTransaction, get_submodule, replace_submodule
from lit_compress.surgery.replay import register_replay

__all__ = [
    "LayerMergeFinalRecord",
    "LayerMergePlanRecord",
    "LayoutResidual",
    "LayoutSite",
    "MergeBlock",
    "MergeLayout",
    "PlannedUnit",
    "apply_merge_plan_",
    "check_plan",
    "identity_plan",
    "merge_planned_",
    "single_block_plan",
]


#: ``[start, end, [kept site indices]]``: the block ``(start, end]`` merged into one conv, keeping the
#: listed sites (1-based, sorted). A list, not a tuple, so plan files and the log hold the same value.
MergeBlock = list[Any]


class LayoutSite(TypedDict):
    """One conv site of the planned network (names there) and what the merge needs of the original."""

    conv: str
    bn: str | None
    act: str | None
    had_act: bool  # the original site had an activation
    padding: int  # the original padding
    stride: int
    unit: str


class LayoutResidual(TypedDict):
    """A residual unit of the planned network: its skip spans positions ``start`` to ``end``."""

    start: int
    end: int
    unit: str
    skip: str  # "identity" | "conv"
    shortcut: str | None  # the shortcut module for skip == "conv"


class MergeLayout(TypedDict):
    """The planned network as plain data, so that a log replays without analysing the model again."""

    arch: str
    root: str
    act_class: str
    sites: list[LayoutSite]  # site i (1-based) is sites[i - 1]
    residuals: list[LayoutResidual]
    units: list[str]


class LayerMergePlanRecord(TypedDict):
    """Log record of :func:`apply_merge_plan_`."""

    op: Literal["layer_merge_plan"]
    blocks: list[MergeBlock]
    layout: MergeLayout


class LayerMergeFinalRecord(TypedDict):
    """Log record of :func:`merge_planned_`: ``kernels`` is each merged conv's kernel size."""

    op: Literal["layer_merge_final"]
    blocks: list[MergeBlock]
    layout: MergeLayout
    kernels: list[int]


def _resize(x: torch.Tensor, margin_in: int, margin_out: int) -> torch.Tensor:
    """Zero-pad (``margin_out > margin_in``) or centre-crop ``x`` spatially by the difference."""
    d = margin_out - margin_in
    if d > 0:
        return nn.functional.pad(x, (d, d, d, d))
    if d < 0:
        return x[..., -d : x.shape[-2] + d, -d : x.shape[-1] + d]
    return x


class PlannedUnit(nn.Module):
    """A residual (or plain) unit of a planned network: ``post(body(x) + skip(x))``.

    ``skip`` is ``"identity"``, ``"conv"`` (``shortcut`` applied to the input) or ``"none"``. The
    skip input is resized from the input's chain margin ``margin_in`` to the output's
    ``margin_out`` (times the shortcut's stride before a strided 1x1 shortcut).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')`` as the unit it replaces.
    """

    def __init__(
        self,
        body: nn.Sequential,
        post: nn.Module,
        skip: str = "none",
        shortcut: nn.Module | None = None,
        margin_in: int = 0,
        margin_out: int = 0,
        shortcut_stride: int = 1,
    ) -> None:
        super().__init__()
        if skip not in ("none", "identity", "conv"):
            raise SurgeryError(f"PlannedUnit: skip={skip!r}, expected 'none', 'identity' or 'conv'.")
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post
        self.skip = skip
        self.margin_in = int(margin_in)
        self.margin_out = int(margin_out)
        self.shortcut_stride = int(shortcut_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.skip == "identity":
            y = y + _resize(x, self.margin_in, self.margin_out)
        elif self.skip == "conv":
            y = y + self.shortcut(_resize(x, self.margin_in, self.margin_out * self.shortcut_stride))
        return self.post(y)

    def extra_repr(self) -> str:
        return f"skip={self.skip!r}, margin_in={self.margin_in}, margin_out={self.margin_out}"


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------


def identity_plan(space: MergeSpace) -> list[MergeBlock]:
    """The plan that changes nothing: every site its own block."""
    return [[p - 1, p, [p]] for p in range(1, space.depth + 1)]


def single_block_plan(space: MergeSpace, start: int, end: int, kept: list[int]) -> list[MergeBlock]:
    """The plan with one block ``(start, end]`` and every other site unchanged."""
    blocks = [[p - 1, p, [p]] for p in range(1, start + 1)]
    blocks.append([start, end, list(kept)])
    blocks += [[p - 1, p, [p]] for p in range(end + 1, space.depth + 1)]
    return blocks


def check_plan(space: MergeSpace, blocks: Any) -> list[MergeBlock]:
    """Validate ``blocks`` against ``space``: a tiling of 0..L by valid blocks with valid kept sets.

    Raises:
        ConfigError: Naming the first problem.
    """
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ConfigError(f"LayerMerge plan: `blocks` must be a non-empty list of [start, end, kept], got {blocks!r}.")
    out: list[MergeBlock] = []
    pos = 0
    for blk in blocks:
        try:
            s, e, kept = int(blk[0]), int(blk[1]), [int(i) for i in blk[2]]
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"LayerMerge plan: block {blk!r} is not [start, end, [kept sites]].") from None
        if s != pos or e <= s:
            raise ConfigError(f"LayerMerge plan: block ({s}, {e}] does not continue the tiling at position {pos}.")
        if not _block_valid(space, s, e):
            raise ConfigError(f"LayerMerge plan: block ({s}, {e}] is not valid for this network (breaks/residuals).")
        if not kept or sorted(set(kept)) != kept or kept[0] <= s or kept[-1] > e:
            raise ConfigError(f"LayerMerge plan: kept sites {kept} of block ({s}, {e}] must be sorted, inside it.")
        for i in range(s + 1, e + 1):
            if i not in kept and not space.site(i).prunable:
                raise ConfigError(
                    f"LayerMerge plan: site {i} (`{space.site(i).conv}`) cannot be pruned (channels or stride change)."
                )
        strided = False
        for i in kept:
            if strided and space.site(i).kernel != 1:
                raise ConfigError(
                    f"LayerMerge plan: site {i} is not 1x1 but follows a strided conv in block ({s}, {e}]."
                )
            strided = strided or space.site(i).stride > 1
        out.append([s, e, kept])
        pos = e
    if pos != space.depth:
        raise ConfigError(f"LayerMerge plan: the blocks end at position {pos}, the network has {space.depth}.")
    return out


def _layout(space: MergeSpace) -> MergeLayout:
    """Plain-data description of the planned network: per site its names there, per unit its skip."""
    residual = space.arch != "sequential"
    unit_sizes: dict[str, int] = {}
    for site in space.sites:
        unit_sizes[site.unit] = unit_sizes.get(site.unit, 0) + 1
    sites: list[LayoutSite] = []
    for site in space.sites:
        conv: str
        bn: str | None
        act: str | None
        if residual:
            last = site.local == unit_sizes[site.unit] - 1
            conv = f"{site.unit}.body.conv{site.local}"
            bn = f"{site.unit}.body.bn{site.local}" if site.bn else None
            act = f"{site.unit}.post" if last else f"{site.unit}.body.act{site.local}"
        else:
            conv, bn, act = site.conv, site.bn, site.act
        sites.append(
            {
                "conv": conv,
                "bn": bn,
                "act": act,
                "had_act": site.act is not None,
                "padding": site.padding,
                "stride": site.stride,
                "unit": site.unit,
            }
        )
    return {
        "arch": space.arch,
        "root": space.root,
        "act_class": space.act_class,
        "sites": sites,
        "residuals": [
            {
                "start": r.start,
                "end": r.end,
                "unit": r.unit,
                "skip": r.skip,
                "shortcut": f"{r.unit}.shortcut" if residual else r.shortcut,
            }
            for r in space.residuals
        ],
        "units": list(space.units),
    }


def _position_settings(
    layout: MergeLayout, blocks: list[MergeBlock]
) -> tuple[dict[int, str], dict[int, int], dict[int, int]]:
    """Per position: activation ("keep" / "force" / "drop"); per position: chain margin; per site: new padding."""
    sites = layout["sites"]
    act: dict[int, str] = {}
    margin: dict[int, int] = {0: 0}
    padding: dict[int, int] = {}
    for s, e, kept in blocks:
        for p in range(s + 1, e):
            act[p] = "drop"
        act[e] = "keep" if sites[e - 1]["had_act"] else ("force" if e - s > 1 else "none")
        # padding moved to the first kept conv: P = p1 + s1 p2 + s1 s2 p3 + ...
        total, scale = 0, 1
        for i in kept:
            total += scale * sites[i - 1]["padding"]
            scale *= sites[i - 1]["stride"]
        for i in range(s + 1, e + 1):
            padding[i] = 0
        padding[kept[0]] = total
        # margin at position q: paddings still owed by the kept convs after q (the map is that much larger)
        for q in range(s, e + 1):
            rest, scale = 0, 1
            for i in kept:
                if i > q:
                    rest += scale * sites[i - 1]["padding"]
                    scale *= sites[i - 1]["stride"]
            # before the first kept conv nothing is padded yet
            margin[q] = 0 if q in (s, e) or q < kept[0] else rest
    return act, margin, padding


def _new_act(layout: MergeLayout) -> nn.Module:
    cls = ACTIVATION_CLASSES.get(layout["act_class"], nn.ReLU)
    return cls()


def _out_of_place(act: nn.Module) -> nn.Module:
    """``act`` with ``inplace=False`` where it has the flag (an in-place activation would overwrite
    the tensor a skip connection still reads)."""
    if hasattr(act, "inplace"):
        flagged: Any = act  # the flag is a plain attribute that nn.Module does not declare
        flagged.inplace = False
    return act


def _shortcut_name(name: str | None, unit: str) -> str:
    if name is None:
        raise SurgeryError(f"LayerMerge: the residual unit `{unit}` has a conv skip but no shortcut module.")
    return name


def _with_padding(conv: nn.Module, pad: int) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise SurgeryError(f"LayerMerge: a kept site is a {type(conv).__name__}, expected nn.Conv2d.")
    if tuple(conv.padding) == (pad, pad):
        return conv
    new = copy.deepcopy(conv)
    new.padding = (pad, pad)
    return new


def apply_merge_plan_(model: nn.Module, blocks: Any, space: MergeSpace | None = None) -> list[dict[str, Any]]:
    """Turn ``model`` into the unmerged fine-tuning network of the plan ``blocks``, in place.

    Returns:
        One :class:`LayerMergePlanRecord`.

    Raises:
        ConfigError: For an unsupported architecture or an invalid plan; the model is then unchanged.
    """
    space = space if space is not None else analyze_merge_space(model)
    blocks = check_plan(space, blocks)
    layout = _layout(space)
    with SurgeryTransaction():
        _apply(model, space, layout, blocks)
    record: LayerMergePlanRecord = {"op": "layer_merge_plan", "blocks": blocks, "layout": layout}
    return [plain_record(record)]


def _apply(model: nn.Module, space: MergeSpace, layout: MergeLayout, blocks: list[MergeBlock]) -> None:
    act, margin, padding = _position_settings(layout, blocks)
    kept = {i for _, _, k in blocks for i in k}
    if space.arch == "sequential":
        for site in space.sites:
            i = site.index
            conv = get_submodule(model, site.conv)
            if i in kept:
                replace_submodule(model, site.conv, _with_padding(conv, padding[i]))
            else:
                replace_submodule(model, site.conv, nn.Identity())
                if site.bn:
                    replace_submodule(model, site.bn, nn.Identity())
            if act[i] == "drop" and site.act:
                replace_submodule(model, site.act, nn.Identity())
            elif act[i] == "force":  # excluded by the space (sequential nets cannot force)
                raise SurgeryError(f"LayerMerge: cannot add an activation after `{site.conv}` in a plain Sequential.")
        return
    residual_of = {r.unit: r for r in space.residuals}
    for uname in space.units:
        usites = [s for s in space.sites if s.unit == uname]
        body: OrderedDict[str, nn.Module] = OrderedDict()
        post: nn.Module = nn.Identity()
        for site in usites:
            i, j = site.index, site.local
            conv = get_submodule(model, site.conv)
            if i in kept:
                body[f"conv{j}"] = _with_padding(conv, padding[i])
                if site.bn:
                    body[f"bn{j}"] = get_submodule(model, site.bn)
            else:
                body[f"conv{j}"] = nn.Identity()
                if site.bn:
                    body[f"bn{j}"] = nn.Identity()
            a = _new_act(layout) if site.act is None else type(get_submodule(model, site.act))()
            a = _out_of_place(a) if act[i] in ("keep", "force") else nn.Identity()
            if j == len(usites) - 1:
                post = a
            else:
                body[f"act{j}"] = a
        res = residual_of.get(uname)
        shortcut, stride = None, 1
        if res is not None and res.skip == "conv":
            shortcut = get_submodule(model, _shortcut_name(res.shortcut, uname))
            stride = int(next(m for m in shortcut.modules() if isinstance(m, nn.Conv2d)).stride[0])
        unit = PlannedUnit(
            nn.Sequential(body),
            post,
            skip=res.skip if res is not None else "none",
            shortcut=shortcut,
            margin_in=margin[usites[0].index - 1] if res is not None else 0,
            margin_out=margin[usites[-1].index] if res is not None else 0,
            shortcut_stride=stride,
        )
        unit.train(get_submodule(model, uname).training)
        replace_submodule(model, uname, unit)


@register_replay("layer_merge_plan")
def _replay_plan(model: nn.Module, record: LayerMergePlanRecord) -> None:
    space = analyze_merge_space(model)
    blocks = check_plan(space, record["blocks"])
    _apply(model, space, _layout(space), blocks)


# --------------------------------------------------------------------------------------------
# the final merge
# --------------------------------------------------------------------------------------------


def _folded(model: nn.Module, site: LayoutSite) -> nn.Conv2d:
    """The site's conv with its BN folded (eval statistics) and its ORIGINAL padding, in float64."""
    conv = get_submodule(model, site["conv"])
    if not isinstance(conv, nn.Conv2d):
        raise SurgeryError(f"LayerMerge merge: `{site['conv']}` is a {type(conv).__name__}, expected a kept Conv2d.")
    conv = copy.deepcopy(conv).to(torch.float64)
    conv.padding = (site["padding"], site["padding"])
    if site["bn"]:
        bn = get_submodule(model, site["bn"])
        if isinstance(bn, nn.BatchNorm2d):
            conv = fold_conv_bn(conv, copy.deepcopy(bn).to(torch.float64).eval())
    return conv


def _fold_shortcut(model: nn.Module, name: str) -> nn.Conv2d:
    seq = get_submodule(model, name)
    conv, bn = list(seq.children())
    if not isinstance(conv, nn.Conv2d):
        raise SurgeryError(
            f"LayerMerge merge: the shortcut `{name}` starts with a {type(conv).__name__}, expected Conv2d."
        )
    return fold_conv_bn(copy.deepcopy(conv).to(torch.float64), copy.deepcopy(bn).to(torch.float64).eval())


def _compose(a: nn.Conv2d | None, b: nn.Conv2d) -> nn.Conv2d:
    return b if a is None else compose_convs(a, b)


def _absorb(merged: nn.Conv2d | None, conv: nn.Conv2d, pending: float) -> tuple[nn.Conv2d, float]:
    """Append ``conv`` to the merged chain; a pending input factor scales the first conv's weight."""
    if merged is None:
        if pending != 1.0:
            conv.weight.mul_(pending)
        return conv, 1.0
    return compose_convs(merged, conv), pending


@torch.no_grad()
def merge_planned_(model: nn.Module, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Merge a network planned by :func:`apply_merge_plan_` into one conv per block.

    Args:
        model: The planned network.
        record: Its :class:`LayerMergePlanRecord` (or, on replay, a :class:`LayerMergeFinalRecord`).

    Returns:
        One :class:`LayerMergeFinalRecord`.

    Raises:
        SurgeryError: If the model does not have the planned structure; it is then unchanged.
    """
    blocks: list[MergeBlock] = record["blocks"]
    layout: MergeLayout = record["layout"]
    sites = layout["sites"]
    finals: list[tuple[MergeBlock, list[LayoutResidual], nn.Conv2d]] = []
    for s, e, kept in blocks:  # compute everything first: the model is edited only if all blocks merge
        covered = [r for r in layout["residuals"] if s <= r["start"] and r["end"] <= e]
        ref = get_submodule(model, sites[kept[0] - 1]["conv"])
        if not isinstance(ref, nn.Conv2d):
            raise SurgeryError(f"LayerMerge merge: `{sites[kept[0] - 1]['conv']}` is not a Conv2d; already merged?")
        merged: nn.Conv2d | None = None
        segment: nn.Conv2d | None = None
        pending = 1.0  # a factor on the block's input (from an all-pruned identity unit: x + x = 2x)
        for i in range(s + 1, e + 1):
            res = next((r for r in covered if r["start"] < i <= r["end"]), None)
            if i in kept:
                conv = _folded(model, sites[i - 1])
                if res is None:
                    merged, pending = _absorb(merged, conv, pending)
                else:
                    segment = _compose(segment, conv)
            if res is not None and i == res["end"]:
                if segment is None:  # every conv of the unit pruned: x + x
                    if res["skip"] != "identity":
                        raise SurgeryError(f"LayerMerge merge: no kept conv in the residual unit `{res['unit']}`.")
                    if merged is None:
                        pending *= 2.0
                    else:
                        merged.weight.mul_(2.0)
                        if merged.bias is not None:
                            merged.bias.mul_(2.0)
                    continue
                if res["skip"] == "identity":
                    segment = fuse_identity_skip(segment)
                else:
                    shortcut = _fold_shortcut(model, _shortcut_name(res["shortcut"], res["unit"]))
                    segment = fuse_downsample_skip(segment, shortcut)
                merged, pending = _absorb(merged, segment, pending)
                segment = None
        if merged is None:
            raise SurgeryError(f"LayerMerge merge: block ({s}, {e}] has no kept conv.")
        final = merged.to(device=ref.weight.device, dtype=ref.weight.dtype)
        for param in final.parameters():  # weight and bias
            param.requires_grad_(ref.weight.requires_grad)
        final.train(ref.training)
        finals.append(([s, e, kept], covered, final))
    kernels: list[int] = []
    with SurgeryTransaction():
        for (s, e, kept), covered, final in finals:
            kernels.append(int(final.kernel_size[0]))
            for i in range(s + 1, e + 1):
                site = sites[i - 1]
                replace_submodule(model, site["conv"], final if i == kept[0] else nn.Identity())
                if site["bn"]:
                    replace_submodule(model, site["bn"], nn.Identity())
            for r in covered:
                if r["skip"] == "conv":
                    replace_submodule(model, _shortcut_name(r["shortcut"], r["unit"]), nn.Identity())
        for _, covered, _ in finals:
            for r in covered:
                unit = get_submodule(model, r["unit"])
                if isinstance(unit, PlannedUnit):
                    unit.skip = "none"
                    unit.margin_in = unit.margin_out = 0
    final_record: LayerMergeFinalRecord = {
        "op": "layer_merge_final",
        "blocks": blocks,
        "layout": layout,
        "kernels": kernels,
    }
    return [plain_record(final_record)]


@register_replay("layer_merge_final")
def _replay_final(model: nn.Module, record: LayerMergeFinalRecord) -> None:
    merge_planned_(model, record)
