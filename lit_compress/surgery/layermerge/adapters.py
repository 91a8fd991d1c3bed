"""How LayerMerge reads a network: adapters that declare a residual unit's conv chain and skip.

LayerMerge searches a *trunk*: a line of residual units (or a plain ``nn.Sequential`` CNN). A unit
computes ``post(chain(x) + skip(x))`` where ``chain`` is ``conv → BN → act → … → conv → BN``; the
adapter of a unit class says which of its submodules play these roles. A trunk adapter lists the
units of a network class in order. Built in: torchvision ResNet (BasicBlock, Bottleneck) and
MobileNetV2 (InvertedResidual); other model files register their own classes when imported (a
model of a class can only exist once its module is imported), so nothing here looks upwards.

Register your own residual block (Torch-Pruning's ``register_customized_layer`` is the precedent)::

    from lit_compress.surgery.layermerge import UnitLayout, register_merge_unit

    register_merge_unit(
        MyBlock,
        lambda block: UnitLayout(
            convs=(("conv_a", "bn_a", "act_a"), ("conv_b", "bn_b", "act_out")),
            skip="identity" if block.proj is None else "conv",
            shortcut=None if block.proj is None else "proj",   # an (1x1 Conv2d, BatchNorm2d) Sequential
            act_class="ReLU",
        ),
    )

The block must compute exactly ``act_out(bn_b(conv_b(act_a(bn_a(conv_a(x))))) + skip(x))``; the
last conv's activation is the one after the addition (``None`` when there is none, as in
MobileNetV2). A network whose trunk is an ``nn.Sequential`` of registered units needs no trunk
adapter; otherwise register one with :func:`register_merge_trunk`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from lit_compress.errors import ConfigError

__all__ = [
    "TrunkAdapter",
    "UnitAdapter",
    "UnitLayout",
    "register_merge_trunk",
    "register_merge_unit",
    "registered_trunk",
    "registered_unit",
    "unit_layout",
]

ConvEntry = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class UnitLayout:
    """A residual unit ``post(chain(x) + skip(x))``, named relative to the unit.

    Attributes:
        convs: ``(conv, bn, act)`` per conv of the chain, in order; ``bn`` / ``act`` may be ``None``.
            The last entry's ``act`` is the activation applied after the skip addition.
        skip: ``"identity"``, ``"conv"`` (a 1x1 conv + BatchNorm shortcut) or ``"none"``.
        shortcut: The shortcut module (a ``Sequential(Conv2d 1x1, BatchNorm2d)``) for ``skip="conv"``.
        act_class: Class name of the unit's activation (a merged block that needs one gets this).
    """

    convs: tuple[ConvEntry, ...]
    skip: Literal["identity", "conv", "none"] = "identity"
    shortcut: str | None = None
    act_class: str = "ReLU"


#: ``describe(unit) -> UnitLayout``; registered for a class, it is called with instances of it.
UnitAdapter = Callable[[Any], UnitLayout]
#: ``units(net) -> [unit names]``; registered for a class, it is called with instances of it.
TrunkAdapter = Callable[[Any], list[str]]
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)
_EntryT = TypeVar("_EntryT")

_UNITS: dict[type, UnitAdapter] = {}
_TRUNKS: dict[type, tuple[str, TrunkAdapter]] = {}
_BUILTINS_LOADED = False


def register_merge_unit(cls: type[_ModuleT], describe: Callable[[_ModuleT], UnitLayout]) -> None:
    """Declare how instances of ``cls`` (and its subclasses) compute; see the module docstring."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_merge_unit: `cls`={cls!r} is not an nn.Module subclass.")
    if not callable(describe):
        raise ConfigError(f"register_merge_unit: `describe`={describe!r} is not callable (module -> UnitLayout).")
    _UNITS[cls] = describe


def register_merge_trunk(cls: type[_ModuleT], units: Callable[[_ModuleT], list[str]], arch: str | None = None) -> None:
    """Declare the residual units of networks of class ``cls``: ``units(net)`` returns their names in order.

    ``arch`` names the architecture in plans and reports (default: the class name in lower case).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_merge_trunk: `cls`={cls!r} is not an nn.Module subclass.")
    if not callable(units):
        raise ConfigError(f"register_merge_trunk: `units`={units!r} is not callable (module -> list of names).")
    _TRUNKS[cls] = (arch or cls.__name__.lower(), units)


def _lookup(registry: dict[type, _EntryT], module: nn.Module) -> _EntryT | None:
    _load_builtins()
    for klass in type(module).__mro__:
        if klass in registry:
            return registry[klass]
    return None


def registered_unit(module: nn.Module) -> UnitAdapter | None:
    """The adapter of ``module``'s class (or of its nearest registered base), or ``None``."""
    return _lookup(_UNITS, module)


def registered_trunk(module: nn.Module) -> tuple[str, TrunkAdapter] | None:
    """``(arch, units)`` for ``module``'s class if a trunk adapter is registered, else ``None``."""
    return _lookup(_TRUNKS, module)


def unit_layout(unit: nn.Module, name: str) -> UnitLayout:
    """The registered layout of the unit ``name``.

    Raises:
        ConfigError: If its class has no adapter (the message says how to register one).
    """
    adapter = registered_unit(unit)
    if adapter is None:
        raise ConfigError(
            f"LayerMerge: the residual unit `{name}` is a {type(unit).__name__}, which has no LayerMerge adapter. "
            "Register one with `lit_compress.surgery.layermerge.register_merge_unit("
            f"{type(unit).__name__}, describe)`, where describe(block) returns a UnitLayout naming its "
            "(conv, bn, act) chain and its skip (see the LayerMerge section of the README)."
        )
    layout = adapter(unit)
    if not isinstance(layout, UnitLayout) or not layout.convs:
        raise ConfigError(
            f"LayerMerge: the adapter of {type(unit).__name__} returned {layout!r} for `{name}`; expected a "
            "UnitLayout with at least one (conv, bn, act) entry."
        )
    if layout.skip not in ("identity", "conv", "none"):
        raise ConfigError(f"LayerMerge: `{name}`: skip={layout.skip!r}, expected 'identity', 'conv' or 'none'.")
    if (layout.skip == "conv") != (layout.shortcut is not None):
        raise ConfigError(f"LayerMerge: `{name}`: a shortcut module is named exactly when skip='conv'.")
    return layout


# --------------------------------------------------------------------------------------------
# built-in adapters (torchvision); loaded on first lookup so that importing surgery stays light
# --------------------------------------------------------------------------------------------


def _resnet_block(block: nn.Module) -> UnitLayout:
    import torchvision.models.resnet as tv

    n = 2 if isinstance(block, tv.BasicBlock) else 3
    convs = tuple((f"conv{i}", f"bn{i}", "relu") for i in range(1, n + 1))
    downsample = getattr(block, "downsample", None)
    return UnitLayout(
        convs=convs,
        skip="identity" if downsample is None else "conv",
        shortcut=None if downsample is None else "downsample",
        act_class=type(block.relu).__name__,
    )


def _inverted_residual(unit: nn.Module) -> UnitLayout:
    convs: list[ConvEntry] = []
    layers = list(unit.get_submodule("conv").named_children())
    i = 0
    while i < len(layers):
        cname, child = layers[i]
        if isinstance(child, nn.Sequential):  # Conv2dNormActivation: conv, bn, act
            kids = list(child.named_children())
            if len(kids) != 3 or not isinstance(kids[0][1], nn.Conv2d):
                raise ConfigError(f"LayerMerge: unexpected layout of `conv.{cname}` in an InvertedResidual.")
            convs.append((f"conv.{cname}.{kids[0][0]}", f"conv.{cname}.{kids[1][0]}", f"conv.{cname}.{kids[2][0]}"))
            i += 1
        elif isinstance(child, nn.Conv2d):
            bn = None
            if i + 1 < len(layers) and isinstance(layers[i + 1][1], nn.BatchNorm2d):
                bn = f"conv.{layers[i + 1][0]}"
                i += 1
            convs.append((f"conv.{cname}", bn, None))
            i += 1
        else:
            raise ConfigError(f"LayerMerge: unexpected module {type(child).__name__} in an InvertedResidual.")
    return UnitLayout(convs=tuple(convs), skip="identity" if unit.use_res_connect else "none", act_class="ReLU6")


def _resnet_units(net: nn.Module) -> list[str]:
    return [
        f"{layer}.{block}"
        for layer in ("layer1", "layer2", "layer3", "layer4")
        if hasattr(net, layer)
        for block, _ in getattr(net, layer).named_children()
    ]


def _mobilenet_v2_units(net: nn.Module) -> list[str]:
    # features[0] is the stem conv, features[-1] the last 1x1 conv: both stay outside the search
    return [f"features.{n}" for n, _ in net.get_submodule("features").named_children()][1:-1]


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import torchvision.models as tvm
    import torchvision.models.mobilenetv2 as tv_mbv2
    import torchvision.models.resnet as tv_resnet

    _UNITS.setdefault(tv_resnet.BasicBlock, _resnet_block)
    _UNITS.setdefault(tv_resnet.Bottleneck, _resnet_block)
    _UNITS.setdefault(tv_mbv2.InvertedResidual, _inverted_residual)
    _TRUNKS.setdefault(tvm.ResNet, ("resnet", _resnet_units))
    _TRUNKS.setdefault(tvm.MobileNetV2, ("mobilenetv2", _mobilenet_v2_units))
