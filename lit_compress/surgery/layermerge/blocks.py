"""LayerMerge's search space: conv sites, residual spans, valid blocks and their candidates.

A supported network is read as a line of **conv sites** 1..L inside a trunk (the stem before it
and the head after it are outside the search). Activation position ``p`` follows site ``p``
(position 0 is the trunk's input). A **block** ``(s, e]`` keeps the activations at ``s`` and
``e``, deletes those in between, and replaces sites ``s+1..e`` by one conv composed from a
subset of them (the others are pruned to the identity).

Validity (the official ``valid_blks``):

- a block never has a **stride break** strictly inside (``s < p < e``): a break sits at every
  strided conv, moved one position on when the next site of the same unit is a 1x1 conv (so that
  MobileNetV2's stride-2 depthwise conv merges with its projection); in plain sequential nets a
  pooling layer (anything but conv/BN/activation) between two sites is a break too;
- a block lies inside one residual branch, or covers whole residual units (then the skip is fused
  into the merged kernel); it never cuts a residual span partially;
- a site may be pruned only if ``in == out`` channels and stride 1; inside a kept chain only 1x1
  convs may follow a strided conv; at least one site is kept. A covered identity-skip unit whose
  convs are all pruned becomes ``2x``, folded into the merged kernel as a factor 2.

Candidates of a block: every reachable merged kernel ``K = 1 + Σ_kept (k_i - 1)`` and depthwise
flag; among subsets with the same ``(K, dw)`` the one with the largest total L1 weight norm.

Supported: networks whose residual units have an adapter (:mod:`~lit_compress.surgery.layermerge.adapters`;
built in: torchvision ResNet BasicBlock/Bottleneck and MobileNetV2 InvertedResidual; our
``cifar_resnet*`` registers its own), and plain sequential CNNs (an ``nn.Sequential`` of
Conv2d/BatchNorm2d/activation/pooling, e.g. ``small_cnn``, ``vgg_cnn``). Anything else raises
:class:`ConfigError` naming what is unsupported and how to register it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.inputs import call_with
from lit_compress.surgery.layermerge.adapters import registered_trunk, registered_unit, unit_layout

__all__ = [
    "ACTIVATION_CLASSES",
    "Candidate",
    "ConvSite",
    "MergeSpace",
    "ResidualSpan",
    "analyze_merge_space",
    "block_candidates",
    "enumerate_candidates",
    "original_latency",
    "site_input_shapes",
    "valid_blocks",
]

_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Tanh, nn.Sigmoid)
#: Activation classes a merged block may end with, by class name (the trunk's ``act_class``).
ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    c.__name__: c for c in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU)
}
_PASS = (nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class ConvSite:
    """One searchable conv (1-based ``index``) with the BN and activation that follow it.

    Names are qualified names in the *original* model. ``act`` is ``None`` where the conv has no
    activation (MobileNetV2's linear projection, or the last conv of a residual unit, whose act
    comes after the skip add: that one is named by ``act`` too).
    """

    index: int
    conv: str
    bn: str | None
    act: str | None
    unit: str
    local: int  # index of the site inside its unit
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def prunable(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1


@dataclass(frozen=True)
class ResidualSpan:
    """A residual unit whose skip goes from position ``start`` to position ``end``."""

    start: int
    end: int
    unit: str
    skip: str  # "identity" | "conv"
    shortcut: str | None = None  # the shortcut module (Sequential(conv, bn)) for skip == "conv"


@dataclass
class MergeSpace:
    """The analysed network: sites 1..L, residual spans, stride breaks, unit layout."""

    arch: str
    root: str
    sites: list[ConvSite]
    residuals: list[ResidualSpan]
    breaks: list[int]
    act_class: str  # activation forced at the end of merged blocks: "ReLU" | "ReLU6" | ...
    units: list[str] = field(default_factory=list)  # residual archs: unit names in order
    force_allowed: bool = True  # sequential nets cannot add an activation where there is none
    input_shapes: dict[int, list[int]] = field(default_factory=dict)  # site -> (C, H, W)

    @property
    def depth(self) -> int:
        return len(self.sites)

    def site(self, index: int) -> ConvSite:
        return self.sites[index - 1]

    def has_act(self, position: int) -> bool:
        return 1 <= position <= self.depth and self.site(position).act is not None

    def to_plain(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "root": self.root,
            "depth": self.depth,
            "sites": [asdict(s) for s in self.sites],
            "residuals": [asdict(r) for r in self.residuals],
            "breaks": list(self.breaks),
        }


@dataclass(frozen=True)
class Candidate:
    """One entry of the tables: block ``(start, end]`` merged into a ``kernel``x``kernel`` conv."""

    start: int
    end: int
    kernel: int
    depthwise: bool
    stride: int
    kept: tuple[int, ...]
    l1: float
    in_channels: int
    out_channels: int

    @property
    def key(self) -> str:
        return f"{self.start}-{self.end}-k{self.kernel}-{'dw' if self.depthwise else 'dense'}"

    def is_original(self, space: MergeSpace) -> bool:
        """Whether this is the unmodified single-conv block ``(p - 1, p]``."""
        return self.end == self.start + 1 and self.kept == (self.end,)


# --------------------------------------------------------------------------------------------
# architecture analysis
# --------------------------------------------------------------------------------------------


def _conv_info(module: nn.Module, name: str) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d):
        raise ConfigError(f"LayerMerge: `{name}` is a {type(module).__name__}, expected nn.Conv2d.")
    k, s, p = module.kernel_size, module.stride, module.padding
    if isinstance(p, str) or k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or module.dilation != (1, 1):
        raise ConfigError(
            f"LayerMerge: `{name}` has kernel {k}, stride {s}, padding {p}, dilation {module.dilation}; only square "
            "kernels with integer, symmetric padding and dilation 1 are supported."
        )
    if module.padding_mode != "zeros":
        raise ConfigError(
            f"LayerMerge: `{name}` uses padding_mode={module.padding_mode!r}; only 'zeros' merges exactly."
        )
    return module


def _conv_site(
    index: int, name: str, conv: nn.Conv2d, bn: str | None, act: str | None, unit: str, local: int
) -> ConvSite:
    """A :class:`ConvSite` for ``conv`` (checked by :func:`_conv_info`), named ``name`` in the model."""
    return ConvSite(
        index=index,
        conv=name,
        bn=bn,
        act=act,
        unit=unit,
        local=local,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=conv.kernel_size[0],
        stride=conv.stride[0],
        padding=int(conv.padding[0]),
        groups=conv.groups,
    )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _unit_entries(unit: nn.Module, uname: str) -> tuple[list[tuple[str, str | None, str | None]], Any, str]:
    """``[(conv, bn, act)]`` of a residual unit (qualified names), its skip and its activation class."""
    layout = unit_layout(unit, uname)
    entries = [
        (_join(uname, c), _join(uname, b) if b else None, _join(uname, a) if a else None) for c, b, a in layout.convs
    ]
    if layout.skip == "conv":
        shortcut = _join(uname, layout.shortcut or "")
        _check_shortcut(unit.get_submodule(layout.shortcut or ""), shortcut)
        return entries, ("conv", shortcut), layout.act_class
    return entries, (layout.skip, None), layout.act_class


def _check_shortcut(module: nn.Module, name: str) -> None:
    kids = list(module.children())
    if not (
        len(kids) == 2
        and isinstance(kids[0], nn.Conv2d)
        and kids[0].kernel_size == (1, 1)
        and isinstance(kids[1], nn.BatchNorm2d)
    ):
        raise ConfigError(f"LayerMerge: the shortcut `{name}` is not (1x1 conv, BatchNorm); it cannot be fused.")


def _registered_units(module: nn.Module) -> list[str] | None:
    """Unit names of a trunk: a registered trunk class, or an ``nn.Sequential`` of registered units."""
    trunk = registered_trunk(module)
    if trunk is not None:
        return trunk[1](module)
    kids = list(module.named_children())
    if isinstance(module, nn.Sequential) and kids and all(registered_unit(m) is not None for _, m in kids):
        return [n for n, _ in kids]
    return None


def _find_root(model: nn.Module) -> tuple[str, nn.Module, str, list[str]]:
    for name, module in model.named_modules():
        trunk = registered_trunk(module)
        if trunk is not None:
            return name, module, trunk[0], [_join(name, u) for u in trunk[1](module)]
    for name, module in model.named_modules():
        units = _registered_units(module)
        if units is not None:
            return name, module, "residual_sequential", [_join(name, u) for u in units]
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Sequential)
            and sum(isinstance(c, nn.Conv2d) for c in module.children()) >= 2
            and all(
                isinstance(c, (nn.Conv2d, nn.BatchNorm2d, *_ACTS, *_PASS, nn.MaxPool2d, nn.AvgPool2d))
                for c in module.children()
            )
        ):
            return name, module, "sequential", []
    raise ConfigError(
        f"LayerMerge does not support {type(model).__name__}: no supported trunk found. Supported: networks whose "
        "residual units have a LayerMerge adapter (built in: torchvision ResNet BasicBlock/Bottleneck and "
        "MobileNetV2 InvertedResidual, lit_compress cifar_resnet*; register your own block with "
        "`lit_compress.surgery.layermerge.register_merge_unit`), and plain nn.Sequential CNNs of "
        "Conv2d/BatchNorm2d/activation/pooling layers."
    )


def analyze_merge_space(model: nn.Module) -> MergeSpace:
    """Find the supported trunk in ``model`` and describe its sites, residual spans and breaks.

    Raises:
        ConfigError: For an unsupported architecture or layer, naming it.
    """
    root, net, arch, unit_names = _find_root(model)
    if arch == "sequential":
        return _analyze_sequential(model, root, net)
    if not unit_names:
        raise ConfigError(f"LayerMerge: the {type(net).__name__} at `{root or '<model>'}` has no residual units.")
    sites: list[ConvSite] = []
    residuals: list[ResidualSpan] = []
    breaks: list[int] = [0]
    act_cls = "ReLU"
    for uname in unit_names:
        unit = model.get_submodule(uname)
        entries, (skip, shortcut), act_cls = _unit_entries(unit, uname)
        start = len(sites)
        for local, (cname, bn, act) in enumerate(entries):
            conv = _conv_info(model.get_submodule(cname), cname)
            if bn is not None and not isinstance(model.get_submodule(bn), nn.BatchNorm2d):
                raise ConfigError(f"LayerMerge: `{bn}` is not a BatchNorm2d.")
            sites.append(_conv_site(len(sites) + 1, cname, conv, bn, act, uname, local))
        for local in range(len(entries)):
            site = sites[start + local]
            if site.stride > 1:
                pos = site.index
                nxt = start + local + 1
                if nxt < len(sites) and sites[nxt].kernel == 1 and sites[nxt].unit == uname:
                    pos += 1
                breaks.append(pos)
        if skip != "none":
            residuals.append(ResidualSpan(start, len(sites), uname, skip, shortcut))
    breaks.append(len(sites))
    return MergeSpace(arch, root, sites, residuals, sorted(set(breaks)), act_cls, units=unit_names)


def _analyze_sequential(model: nn.Module, root: str, seq: nn.Module) -> MergeSpace:
    children = list(seq.named_children())
    sites: list[ConvSite] = []
    breaks = {0}
    pending: dict[str, Any] = {}
    act_cls = "ReLU"

    def flush() -> None:
        if pending:
            conv = pending["conv_mod"]
            sites.append(
                _conv_site(
                    len(sites) + 1, pending["conv"], conv, pending.get("bn"), pending.get("act"), root, len(sites)
                )
            )
            pending.clear()

    for cname, child in children:
        qual = _join(root, cname)
        if isinstance(child, nn.Conv2d):
            flush()
            pending.update(conv=qual, conv_mod=_conv_info(child, qual))
        elif isinstance(child, nn.BatchNorm2d) and pending and "bn" not in pending and "act" not in pending:
            pending["bn"] = qual
        elif isinstance(child, _ACTS) and pending and "act" not in pending:
            pending["act"] = qual
            act_cls = type(child).__name__
        elif isinstance(child, _PASS) and not isinstance(child, nn.Dropout):
            continue
        else:  # pooling, dropout or a second BN/act: nothing may merge across it
            flush()
            breaks.add(len(sites))
    flush()
    for site in sites:
        if site.stride > 1:
            breaks.add(site.index)
        if site.act is None:  # cannot add an activation inside a plain Sequential
            breaks.add(site.index)
    breaks.add(len(sites))
    if len(sites) < 2:
        raise ConfigError(f"LayerMerge: the sequential trunk `{root}` has fewer than two convs; nothing to merge.")
    return MergeSpace("sequential", root, sites, [], sorted(breaks), act_cls, force_allowed=False)


@torch.no_grad()
def site_input_shapes(model: nn.Module, space: MergeSpace, inputs: Any) -> dict[int, list[int]]:
    """``{site: [C, H, W]}``: the input shape of every site's conv on ``inputs`` (one forward pass)."""
    shapes: dict[int, list[int]] = {}
    handles = []
    for site in space.sites:
        conv = model.get_submodule(site.conv)

        def hook(mod: nn.Module, args: Any, _i: int = site.index) -> None:
            shapes.setdefault(_i, list(args[0].shape[1:]))

        handles.append(conv.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        call_with(model, inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    missing = [s.index for s in space.sites if s.index not in shapes]
    if missing:
        raise ConfigError(f"LayerMerge: sites {missing} were not reached by a forward pass on the example inputs.")
    space.input_shapes = shapes
    return shapes


# --------------------------------------------------------------------------------------------
# blocks and candidates
# --------------------------------------------------------------------------------------------


def _block_valid(space: MergeSpace, s: int, e: int) -> bool:
    if any(s < p < e for p in space.breaks):
        return False
    for r in space.residuals:
        disjoint = e <= r.start or s >= r.end
        inside = r.start <= s and e <= r.end and not (s == r.start and e == r.end)
        covers = s <= r.start and r.end <= e
        if not (disjoint or inside or covers):
            return False
    return not (not space.force_allowed and e - s > 1 and not space.has_act(e))


def valid_blocks(space: MergeSpace) -> list[tuple[int, int]]:
    """Every valid block ``(s, e]``, sorted by end then start."""
    return [(s, e) for e in range(1, space.depth + 1) for s in range(e) if _block_valid(space, s, e)]


def block_candidates(space: MergeSpace, s: int, e: int, l1: dict[int, float]) -> list[Candidate]:
    """The candidates of block ``(s, e]``: one per reachable ``(K, dw)``, the max-L1 kept subset.

    ``l1`` maps site index to the L1 norm of its conv weight.
    """
    idx = list(range(s + 1, e + 1))
    required = [i for i in idx if not space.site(i).prunable]
    optional = [i for i in idx if space.site(i).prunable]
    best: dict[tuple[int, bool], Candidate] = {}
    for r in range(len(optional) + 1):
        for extra in itertools.combinations(optional, r):
            kept = tuple(sorted(required + list(extra)))
            if not kept:
                continue
            strided = False
            ok = True
            for i in kept:
                site = space.site(i)
                if strided and site.kernel != 1:
                    ok = False
                    break
                strided = strided or site.stride > 1
            if not ok:
                continue
            sites = [space.site(i) for i in kept]
            kernel = 1 + sum(x.kernel - 1 for x in sites)
            dw = all(x.depthwise for x in sites)
            stride = 1
            for x in sites:
                stride *= x.stride
            total = float(sum(l1[i] for i in kept))
            key = (kernel, dw)
            if key not in best or total > best[key].l1:
                best[key] = Candidate(
                    s, e, kernel, dw, stride, kept, total, space.site(s + 1).in_channels, space.site(e).out_channels
                )
    return [best[k] for k in sorted(best)]


def enumerate_candidates(model: nn.Module, space: MergeSpace) -> list[Candidate]:
    """All table entries of ``model``'s search space (the rows of the latency/importance tables)."""
    l1 = {s.index: float(model.get_parameter(f"{s.conv}.weight").detach().abs().sum()) for s in space.sites}
    out: list[Candidate] = []
    for s, e in valid_blocks(space):
        out.extend(block_candidates(space, s, e, l1))
    return out


def original_latency(space: MergeSpace, candidates: Sequence[Candidate], table: dict[str, float]) -> float:
    """The summed table latency of the unmodified network (every site its own, unchanged block)."""
    originals = {c.end: c for c in candidates if c.is_original(space)}
    if len(originals) != space.depth:
        raise ConfigError("LayerMerge: the table lacks an unmodified single-conv entry for some site.")
    return float(sum(table[originals[p].key] for p in range(1, space.depth + 1)))
