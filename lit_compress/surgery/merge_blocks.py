"""LayerMerge's search space: conv sites, residual spans, valid blocks and their candidates (spec §2.2).

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

Supported: torchvision ResNet (BasicBlock, Bottleneck), our ``cifar_resnet*`` (conv shortcuts or
identity), torchvision MobileNetV2 (InvertedResidual), and plain sequential CNNs (an
``nn.Sequential`` of Conv2d/BatchNorm2d/activation/pooling, e.g. ``small_cnn``, ``vgg_cnn``).
Anything else raises :class:`ConfigError` naming what is unsupported.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError

__all__ = [
    "Candidate",
    "ConvSite",
    "MergeSpace",
    "ResidualSpan",
    "analyze_merge_space",
    "block_candidates",
    "enumerate_candidates",
    "site_input_shapes",
    "valid_blocks",
]

_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Tanh, nn.Sigmoid)
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


def _act_name(module: nn.Module | None) -> str:
    return type(module).__name__ if module is not None else "ReLU"


def _unit_entries(unit: nn.Module, uname: str) -> tuple[list[tuple[str, str | None, str | None]], Any, str]:
    """``[(conv, bn, act)]`` of a residual-arch unit, its skip description and its activation class."""
    import torchvision.models.mobilenetv2 as tv_mbv2
    import torchvision.models.resnet as tv_resnet

    cifar = _cifar_module()

    if isinstance(unit, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
        n = 2 if isinstance(unit, tv_resnet.BasicBlock) else 3
        relu = _join(uname, "relu")
        entries = [(_join(uname, f"conv{i}"), _join(uname, f"bn{i}"), relu) for i in range(1, n + 1)]
        skip = ("identity", None) if unit.downsample is None else ("conv", _join(uname, "downsample"))
        if skip[0] == "conv":
            _check_shortcut(unit.downsample, skip[1])
        return entries, skip, _act_name(unit.relu)
    if cifar is not None and isinstance(unit, cifar.BasicBlock):
        entries = [
            (_join(uname, "conv1"), _join(uname, "bn1"), _join(uname, "relu1")),
            (_join(uname, "conv2"), _join(uname, "bn2"), _join(uname, "relu2")),
        ]
        if len(unit.shortcut) == 0:
            skip = ("identity", None)
        elif any(isinstance(m, cifar.PadShortcut) for m in unit.shortcut):
            raise ConfigError(
                f"LayerMerge: `{uname}` has a zero-padding shortcut (shortcut='pad'); only identity and 1x1-conv "
                "shortcuts are supported (build the CIFAR ResNet with shortcut='conv')."
            )
        else:
            skip = ("conv", _join(uname, "shortcut"))
            _check_shortcut(unit.shortcut, skip[1])
        return entries, skip, _act_name(unit.relu1)
    if isinstance(unit, tv_mbv2.InvertedResidual):
        entries = []
        act_cls = "ReLU6"
        layers = list(unit.conv.named_children())
        i = 0
        while i < len(layers):
            cname, child = layers[i]
            if isinstance(child, nn.Sequential):  # Conv2dNormActivation: conv, bn, act
                kids = list(child.named_children())
                if len(kids) != 3 or not isinstance(kids[0][1], nn.Conv2d):
                    raise ConfigError(f"LayerMerge: unexpected layout of `{_join(uname, 'conv', cname)}`.")
                base = _join(uname, "conv", cname)
                entries.append((_join(base, kids[0][0]), _join(base, kids[1][0]), _join(base, kids[2][0])))
                act_cls = type(kids[2][1]).__name__
                i += 1
            elif isinstance(child, nn.Conv2d):
                bn = None
                if i + 1 < len(layers) and isinstance(layers[i + 1][1], nn.BatchNorm2d):
                    bn = _join(uname, "conv", layers[i + 1][0])
                    i += 1
                entries.append((_join(uname, "conv", cname), bn, None))
                i += 1
            else:
                raise ConfigError(f"LayerMerge: unexpected module {type(child).__name__} in `{uname}`.")
        skip = ("identity", None) if unit.use_res_connect else ("none", None)
        return entries, skip, act_cls
    raise ConfigError(f"LayerMerge: unsupported block type {type(unit).__name__} at `{uname}`.")


def _check_shortcut(module: nn.Module, name: str) -> None:
    kids = list(module.children())
    if not (
        len(kids) == 2
        and isinstance(kids[0], nn.Conv2d)
        and kids[0].kernel_size == (1, 1)
        and isinstance(kids[1], nn.BatchNorm2d)
    ):
        raise ConfigError(f"LayerMerge: the shortcut `{name}` is not (1x1 conv, BatchNorm); it cannot be fused.")


def _cifar_module() -> Any:
    """``lit_compress.models.cifar_resnet`` if imported (a model of it can exist only then); no Lightning import."""
    return sys.modules.get("lit_compress.models.cifar_resnet")


def _find_root(model: nn.Module) -> tuple[str, nn.Module, str]:
    import torchvision.models as tvm

    cifar = _cifar_module()
    for name, module in model.named_modules():
        if isinstance(module, tvm.ResNet):
            return name, module, "resnet"
        if cifar is not None and isinstance(module, cifar.CifarResNet):
            return name, module, "cifar_resnet"
        if isinstance(module, tvm.MobileNetV2):
            return name, module, "mobilenetv2"
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and sum(isinstance(c, nn.Conv2d) for c in module.children()) >= 2:
            if all(
                isinstance(c, (nn.Conv2d, nn.BatchNorm2d, *_ACTS, *_PASS, nn.MaxPool2d, nn.AvgPool2d))
                for c in module.children()
            ):
                return name, module, "sequential"
    raise ConfigError(
        f"LayerMerge does not support {type(model).__name__}: no supported trunk found. Supported: torchvision "
        "ResNet (BasicBlock/Bottleneck), lit_compress cifar_resnet* (conv or identity shortcuts), torchvision "
        "MobileNetV2 (InvertedResidual, e.g. small_mobilenet_v2), and plain nn.Sequential CNNs of "
        "Conv2d/BatchNorm2d/activation/pooling layers."
    )


def analyze_merge_space(model: nn.Module) -> MergeSpace:
    """Find the supported trunk in ``model`` and describe its sites, residual spans and breaks.

    Raises:
        ConfigError: For an unsupported architecture or layer, naming it.
    """
    root, net, arch = _find_root(model)
    if arch == "sequential":
        return _analyze_sequential(model, root, net)
    if arch == "mobilenetv2":
        unit_names = [_join(root, "features", n) for n, m in net.features.named_children()][1:-1]
        if not unit_names:
            raise ConfigError("LayerMerge: the MobileNetV2 has no inverted residual blocks.")
    else:
        unit_names = [
            _join(root, lname, bname)
            for lname in ("layer1", "layer2", "layer3", "layer4")
            if hasattr(net, lname)
            for bname, _ in getattr(net, lname).named_children()
        ]
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
        if isinstance(inputs, dict):
            model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            model(*inputs)
        else:
            model(inputs)
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


def _covered(space: MergeSpace, s: int, e: int) -> list[ResidualSpan]:
    return [r for r in space.residuals if s <= r.start and r.end <= e]


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
    l1 = {s.index: float(model.get_submodule(s.conv).weight.detach().abs().sum()) for s in space.sites}
    out: list[Candidate] = []
    for s, e in valid_blocks(space):
        out.extend(block_candidates(space, s, e, l1))
    return out
