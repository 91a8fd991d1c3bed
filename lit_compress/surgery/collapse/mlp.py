"""LayerCollapse (Zibakhsh Shabgahi, Shariff, Koushanfar): make MLP activations linear, then merge.

A *collapsible MLP* is ``y = W2 · φ_a(W1 x + b1) + b2`` with the PReLU form

    φ_a(h) = max(0, h) + a · min(0, h)

and **one scalar slope ``a`` per MLP**. Training adds ``λ · Σ_l (a_l − 1)²`` (see
:func:`collapse_penalty`; ``λ`` is applied by the caller, and under Adam the authors use a
decoupled step on the slopes instead of putting the penalty in the loss). When ``|a − 1| < τ`` the
slope is set to 1, φ becomes the identity and the two linears merge:

    W = W2 · W1,   b = W2 · b1 + b2

A ``BatchNorm1d`` between the activation and ``W2`` (eval statistics) is folded into ``W1`` first
(``s = γ/√(σ² + ε)``: ``W = W2 · diag(s) · W1``, ``b = W2 (s ⊙ (b1 − μ) + β) + b2``); a dropout
between the layers is dropped. Collapsing early (``a ≠ 1``) changes the output by at most
``|1 − a| · ‖W2‖ · ‖min(0, h)‖``.

Log records (plain data, replayable; :class:`MakeCollapsibleRecord` and :class:`CollapseRecord`)::

    {"op": "make_collapsible", "activations": ["classifier.1", ...], "kinds": ["relu", ...],
     "init_slopes": [0.0, ...]}
    {"op": "collapse",
     "links": [{"first": "classifier.0", "activation": "classifier.1", "dropout": "classifier.2",
                "norm": None, "second": "classifier.3", "into": "classifier.0"}, ...],
     "metrics": {"slopes": [...], "tau": 0.05, "params_before": int, "params_after": int,
                 "skipped": [{"activation": ..., "slope": ...}, ...]}}

``"into"`` is the linear that receives the merged layer: the link's ``first``, or, in a stacked
chain whose earlier link collapsed already, the layer that the earlier link merged into.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import nn
from typing_extensions import NotRequired

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery.bn_fold import fold_linear_bn
from lit_compress.surgery.bn_stats import default_forward
from lit_compress.surgery.chains import (
    ChainLink,
    GatedMLP,
    LinearChain,
    MLPDiscovery,
    linear_features,
    linear_layout,
    probe_mlps,
)
from lit_compress.surgery.log import plain_record
from lit_compress.surgery.modules import (
    SurgeryTransaction,
    get_submodule,
    module_device_dtype,
    preserve_mode,
    replace_submodule,
)
from lit_compress.surgery.replay import register_replay

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "CollapseMetrics",
    "CollapseRecord",
    "CollapsedLayer",
    "CollapsedLink",
    "CollapsibleActivation",
    "MakeCollapsibleRecord",
    "SkippedLink",
    "collapse_",
    "collapse_linear_pair",
    "collapse_penalty",
    "collapse_post_training_",
    "collapsible_activations",
    "make_collapsible_",
    "resolve_into",
    "slope_parameters",
]

#: Activation types :func:`make_collapsible_` converts, with their kind names.
SUPPORTED_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
}
#: Initial slope per kind (``None``: taken from the module being replaced).
_DEFAULT_INIT: dict[str, float | None] = {
    "relu": 0.0,
    "leaky_relu": None,
    "prelu": None,
    "gelu": 0.01,
    "silu": 0.01,
}

LinkLike = ChainLink | LinearChain | str


class MakeCollapsibleRecord(TypedDict):
    """Log record of :func:`make_collapsible_`: one entry per converted activation in each list."""

    op: Literal["make_collapsible"]
    activations: list[str]
    kinds: list[str]
    init_slopes: NotRequired[list[float]]  # absent in early logs: each kind's default then


class CollapsedLink(TypedDict):
    """One collapsed link; ``into`` is the linear that holds the merged layer."""

    first: str
    activation: str
    dropout: str | None
    norm: str | None
    second: str
    into: str


class SkippedLink(TypedDict):
    """A link left as it was: its slope was not within ``tau`` of 1."""

    activation: str
    slope: float


class CollapseMetrics(TypedDict):
    """What a collapse measured: not needed to replay it."""

    slopes: list[float]  # of the collapsed links (NaN for a plain activation linearised post-training)
    tau: float
    params_before: int
    params_after: int
    skipped: list[SkippedLink]
    max_abs_output_error: NotRequired[float]  # post-training collapse only
    post_training: NotRequired[bool]


class CollapseRecord(TypedDict):
    """Log record of :func:`collapse_` and :func:`collapse_post_training_`."""

    op: Literal["collapse"]
    links: list[CollapsedLink]
    metrics: CollapseMetrics


class CollapsibleActivation(nn.Module):
    """``φ_a(h) = max(0, h) + a · min(0, h)`` with one learnable scalar slope ``a`` (``self.slope``).

    * ``a = 0`` is ReLU (the start for ``kind="relu"``, as for torchvision VGG's classifier ReLUs);
      a ``LeakyReLU``/single-parameter ``PReLU`` starts at its own negative slope, so conversion
      leaves the function unchanged.
    * ``a = 1`` is exactly the identity (``h`` is returned bit for bit).
    * ``kind="gelu"`` / ``"silu"``: the authors' code replaces GELU by this PReLU
      initialised at ``a = 0.01``. That **changes the pretrained function** (φ_0.01 is not GELU),
      so the model must be fine-tuned with the slope penalty (1–46 epochs in the paper's runs)
      before the slope approaches 1 and the MLP can be collapsed without loss. SiLU is treated the
      same way.

    Attributes:
        slope: 0-dim ``nn.Parameter``; exclude it from weight decay (see :func:`slope_parameters`).
        kind: Kind of the replaced activation (``"relu"``, ``"leaky_relu"``, ``"prelu"``, ``"gelu"``, ``"silu"``).
        collapsible: Always ``True``; marks the module for chain discovery and callbacks.
    """

    collapsible = True

    def __init__(
        self,
        kind: str = "relu",
        init_slope: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in _DEFAULT_INIT:
            raise ConfigError(f"`kind`={kind!r} is not allowed: expected one of {', '.join(_DEFAULT_INIT)}.")
        if init_slope is None:
            init_slope = _DEFAULT_INIT[kind]
        if init_slope is None or not math.isfinite(float(init_slope)):
            raise ConfigError(
                f"`init_slope`={init_slope!r} is not allowed: a finite float is needed for kind {kind!r}."
            )
        self.kind = kind
        self.init_slope = float(init_slope)
        self.slope = nn.Parameter(torch.tensor(self.init_slope, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # where(h >= 0, h, a*h) == max(0,h) + a*min(0,h); at a = 1, a*h == h exactly.
        return torch.where(h >= 0, h, self.slope.to(h.dtype) * h)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, slope={float(self.slope.detach()):.4g}"


class CollapsedLayer(nn.Identity):
    """The identity left where a collapse merged a linear (``own_name``) into another layer (``into``).

    Stacked links resolve through it (:func:`resolve_into`), across calls of :func:`collapse_`
    and across callback events: the moved-layer map lives in the model. No parameters, no state.
    """

    def __init__(self, own_name: str, into: str) -> None:
        super().__init__()
        self.own_name = own_name
        self.into = into

    def extra_repr(self) -> str:
        return f"merged into {self.into!r}"


# --------------------------------------------------------------------------------------------- helpers


#: Hugging Face activation classes (matched by name, so transformers need not be installed).
HF_GELU_CLASSES = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh")


def kind_and_init_slope(name: str, module: nn.Module) -> tuple[str, float]:
    """The kind of activation ``module`` and the slope a :class:`CollapsibleActivation` replacing it starts at."""
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        if module.weight.numel() != 1:
            raise ConfigError(
                f"Cannot make `{name}` collapsible: its PReLU has {module.weight.numel()} slopes; LayerCollapse "
                "needs one scalar slope per MLP (supported: PReLU with num_parameters=1)."
            )
        return "prelu", float(module.weight.detach().reshape(()))
    kind = next((k for cls, k in SUPPORTED_ACTIVATIONS.items() if isinstance(module, cls)), None)
    if kind is None and type(module).__name__ in HF_GELU_CLASSES:
        kind = "gelu"
    if kind is None and type(module).__name__ == "SiLUActivation":
        kind = "silu"
    slope = None if kind is None else _DEFAULT_INIT[kind]
    if kind is None or slope is None:
        supported = ", ".join([c.__name__ for c in SUPPORTED_ACTIVATIONS] + list(HF_GELU_CLASSES))
        raise ConfigError(
            f"Cannot make `{name}` collapsible: its type {type(module).__name__} is not supported "
            f"(supported: {supported})."
        )
    return kind, float(slope)


def _as_links(items: Any, what: str) -> list[ChainLink]:
    if isinstance(items, (ChainLink, LinearChain, str)):
        items = [items]
    links: list[ChainLink] = []
    for item in items:
        if isinstance(item, LinearChain):
            links.extend(item.links())
        elif isinstance(item, ChainLink):
            links.append(item)
        else:
            raise ConfigError(f"`{what}` entry {item!r} is not allowed: expected a LinearChain or ChainLink.")
    return links


def _given_links(targets: Any) -> list[ChainLink]:
    if isinstance(targets, (ChainLink, LinearChain, str)):
        targets = [targets]
    links: list[ChainLink] = []
    for item in targets:
        if isinstance(item, LinearChain):
            links.extend(item.links())
        elif isinstance(item, ChainLink):
            links.append(item)
    return links


def _activation_names(targets: Any) -> list[str]:
    if isinstance(targets, (ChainLink, LinearChain, str)):
        targets = [targets]
    names: list[str] = []
    for item in targets:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, LinearChain):
            names.extend(item.activations)
        elif isinstance(item, ChainLink):
            names.append(item.activation)
        else:
            raise ConfigError(
                f"`targets` entry {item!r} is not allowed: expected a LinearChain, ChainLink or activation name."
            )
    return list(dict.fromkeys(names))


def as_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` itself if it is an ``nn.Linear``; a GPT-2 style ``Conv1D`` (weight ``(in, out)``,
    ``y = x @ W + b``) as the equivalent ``nn.Linear`` (weight transposed); else ``SurgeryError``."""
    if isinstance(layer, nn.Linear):
        return layer
    if linear_layout(layer) == "transposed":
        weight = layer.get_parameter("weight")  # (in, out)
        bias = getattr(layer, "bias", None)
        linear = nn.Linear(
            weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.train(layer.training)
    raise SurgeryError(f"Cannot collapse a {type(layer).__name__}: expected nn.Linear or a GPT-2 style Conv1D.")


def resolve_into(model: nn.Module, name: str) -> str:
    """The layer that holds ``name``'s weights now: ``name`` itself, or, where a collapse merged it away
    (a :class:`CollapsedLayer`), the layer it went into, followed through later collapses.

    The names recorded at the collapse are re-aligned when ``model`` is a parent or a child of the
    module the collapse ran on (``"model.mlp.fc2"`` vs ``"mlp.fc2"``).

    Raises:
        SurgeryError: When the recorded target cannot be named in ``model``.
    """
    seen: set[str] = set()
    while True:
        module = get_submodule(model, name)
        if not isinstance(module, CollapsedLayer):
            return name
        if name in seen:
            raise SurgeryError(f"Collapsed layers form a cycle at `{name}`.")
        seen.add(name)
        recorded, into = module.own_name, module.into
        if name == recorded or name.endswith("." + recorded):
            name = name[: len(name) - len(recorded)] + into
        elif recorded.endswith("." + name) and into.startswith(recorded[: len(recorded) - len(name)]):
            name = into[len(recorded) - len(name) :]
        else:
            raise SurgeryError(
                f"`{name}` was merged into `{into}` (recorded as `{recorded}`), which cannot be named in this model."
            )


class _Structure:
    """Checks activations and links against the traced structure of their parent module
    (:func:`~lit_compress.surgery.chains.probe_mlps`); a probe that cannot run checks nothing."""

    def __init__(self, model: nn.Module, cache: bool = True) -> None:
        self.model, self.use_cache = model, cache
        self.cache: dict[str, tuple[str, MLPDiscovery] | None] = {}

    def found(self, name: str) -> tuple[str, MLPDiscovery] | None:
        parent = name.rpartition(".")[0]
        if not self.use_cache or parent not in self.cache:
            self.cache[parent] = probe_mlps(self.model, name)
        return self.cache[parent]

    def gated(self, activation: str, linears: Sequence[str] = ()) -> GatedMLP | None:
        """The gated MLP that ``activation`` (or one of ``linears``) belongs to, if any."""
        found = self.found(activation)
        if found is None:
            return None
        return next(
            (g for g in found[1].gated if g.activation == activation or {g.gate, g.up, g.down} & set(linears)),
            None,
        )

    def link_problem(self, link: ChainLink, into: str) -> str | None:
        """Why ``into → … → link.second`` is not the link the model computes, or ``None``."""
        gated = self.gated(link.activation, (into, link.first, link.second))
        if gated is not None:
            return gated.describe()
        found = self.found(link.activation)
        if found is None:
            return None
        parent, discovery = found
        if not {into, link.activation, link.second} <= discovery.called:
            return None  # the probe did not see the whole link: nothing to compare
        traced = {t.activation: t for c in discovery.chains for t in c.links()}.get(link.activation)
        expected = ChainLink(into, link.activation, link.dropout, link.norm, link.second)
        if traced == expected:
            return None
        where = f"`{parent}`" if parent else "the model"
        seen = f"; the trace shows {_arrow(traced)}" if traced is not None else ""
        return f"tracing {where} on a probe input finds no MLP {_arrow(expected)}{seen}"


def _arrow(link: ChainLink) -> str:
    parts = [link.first, link.activation, link.dropout, link.norm, link.second]
    return " -> ".join(f"`{p}`" for p in parts if p)


def _linear_params(layer: nn.Linear) -> int:
    return layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def collapsible_activations(model: nn.Module) -> list[tuple[str, CollapsibleActivation]]:
    """``(name, module)`` of every :class:`CollapsibleActivation` in ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CollapsibleActivation)]


def slope_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The slope parameters (for a separate, weight-decay-free optimizer group or a decoupled step)."""
    return [m.slope for _, m in collapsible_activations(model)]


# --------------------------------------------------------------------------------------------- convert


def make_collapsible_(
    model: nn.Module, targets: Sequence[LinkLike] | LinkLike, init_slope: float | None = None
) -> list[dict[str, Any]]:
    """Replace the activation of each selected ``Linear → act [→ Dropout] [→ BatchNorm1d] → Linear`` link
    by a :class:`CollapsibleActivation`, in place; all or nothing.

    Args:
        model: The model.
        targets: :class:`LinearChain` s (every link), :class:`ChainLink` s, or activation names.
            Activations that already are collapsible are skipped.
        init_slope: Initial slope for every converted activation; ``None`` uses the kind's default
            (0 for ReLU, the module's own slope for LeakyReLU/PReLU, 0.01 for GELU/SiLU).

    Returns:
        One :class:`MakeCollapsibleRecord`, or ``[]`` when nothing was converted.

    Raises:
        ConfigError: For an unsupported activation type (module name, type and supported types named),
            or an activation that sits in a gated MLP ``down(act(gate(x)) * up(x))`` (the gate named)
            or, for a given link, in a structure other than the link (checked by tracing the
            activation's parent module on a probe input). Nothing is changed then.
    """
    names = _activation_names(targets)
    given = {link.activation: link for link in _given_links(targets)}
    structure = _Structure(model)
    plan: list[tuple[str, str, float, nn.Module]] = []
    for name in names:
        module = get_submodule(model, name)
        if isinstance(module, CollapsibleActivation):
            continue
        kind, slope = kind_and_init_slope(name, module)
        link = given.get(name)
        problem = (
            structure.link_problem(link, resolve_into(model, link.first))
            if link is not None
            else (g.describe() if (g := structure.gated(name)) is not None else None)
        )
        if problem:
            raise ConfigError(f"Cannot make `{name}` collapsible: {problem}. Nothing was changed.")
        plan.append((name, kind, slope if init_slope is None else float(init_slope), module))
    if not plan:
        return []
    with SurgeryTransaction():
        for name, kind, slope, old in plan:
            device, dtype = _param_device_dtype(model, old)
            new = CollapsibleActivation(kind, slope, device=device, dtype=dtype).train(old.training)
            replace_submodule(model, name, new)
    record: MakeCollapsibleRecord = {
        "op": "make_collapsible",
        "activations": [p[0] for p in plan],
        "kinds": [p[1] for p in plan],
        "init_slopes": [p[2] for p in plan],
    }
    return [plain_record(record)]


def _param_device_dtype(model: nn.Module, module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(module.parameters()) + list(model.parameters()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@register_replay("make_collapsible")
def _replay_make_collapsible(model: nn.Module, record: MakeCollapsibleRecord) -> None:
    inits: list[float | None] = [*record.get("init_slopes", [])] or [None] * len(record["activations"])
    for name, kind, slope in zip(record["activations"], record["kinds"], inits):
        old = get_submodule(model, name)
        device, dtype = _param_device_dtype(model, old)
        new = CollapsibleActivation(kind, slope, device=device, dtype=dtype).train(old.training)
        replace_submodule(model, name, new)


def collapse_penalty(model: nn.Module) -> torch.Tensor:
    """``Σ (a − 1)²`` over every :class:`CollapsibleActivation` slope (0-dim; 0 if there is none).

    Multiply by ``λ`` yourself. Gradients flow to the slopes only.
    """
    slopes = slope_parameters(model)
    if not slopes:
        return torch.zeros(())
    return torch.stack([(a - 1) ** 2 for a in slopes]).sum()


# --------------------------------------------------------------------------------------------- merge


@torch.no_grad()
def collapse_linear_pair(first: nn.Linear, second: nn.Linear, norm: nn.BatchNorm1d | None = None) -> nn.Linear:
    """One ``nn.Linear`` equal to ``second(norm(first(x)))`` (``norm`` in eval mode), inputs unchanged.

    ``W = W2 · W1``, ``b = W2 · b1 + b2`` (missing biases count as 0), with ``norm`` folded into
    ``first`` beforehand. The math runs in float64; the result has ``first``'s dtype and device.

    Raises:
        SurgeryError: For non-``nn.Linear`` layers, mismatched shapes, a BN that cannot be folded, or
            when the merged layer (``in·out + out`` parameters) would not be smaller than the pair.
    """
    for role, layer in (("first", first), ("second", second)):
        if not isinstance(layer, nn.Linear):
            raise SurgeryError(f"Cannot collapse: `{role}` is a {type(layer).__name__}, expected nn.Linear.")
    if first.out_features != second.in_features:
        raise SurgeryError(
            f"Cannot collapse Linear({first.in_features}, {first.out_features}) into "
            f"Linear({second.in_features}, {second.out_features}): {first.out_features} outputs vs "
            f"{second.in_features} inputs."
        )
    d_in, d_out = first.in_features, second.out_features
    merged_params = d_in * d_out + d_out
    pair_params = _linear_params(first) + _linear_params(second)
    if merged_params >= pair_params:
        raise SurgeryError(
            f"Refusing to collapse Linear({d_in}, {first.out_features}) -> Linear({second.in_features}, {d_out}): "
            f"the merged layer would have {d_in}*{d_out} + {d_out} = {merged_params} parameters, not fewer than "
            f"the pair's {pair_params}."
        )
    if norm is not None:
        first = fold_linear_bn(first, norm)
    device, dtype = first.weight.device, first.weight.dtype
    f64 = torch.float64
    w1 = first.weight.to(f64)  # (h, in)
    b1 = first.bias.to(f64) if first.bias is not None else torch.zeros(w1.shape[0], dtype=f64, device=device)
    w2 = second.weight.to(device, f64)  # (out, h)
    b2 = second.bias.to(device, f64) if second.bias is not None else torch.zeros(d_out, dtype=f64, device=device)
    merged = nn.Linear(d_in, d_out, bias=True, device=device, dtype=dtype)
    merged.weight = nn.Parameter((w2 @ w1).to(dtype), requires_grad=first.weight.requires_grad)
    merged.bias = nn.Parameter((w2 @ b1 + b2).to(dtype), requires_grad=first.weight.requires_grad)
    return merged.train(first.training)


def _link_record(link: ChainLink, into: str) -> CollapsedLink:
    return {
        "first": link.first,
        "activation": link.activation,
        "dropout": link.dropout,
        "norm": link.norm,
        "second": link.second,
        "into": into,
    }


def _identity_like(old: nn.Module) -> nn.Identity:
    return nn.Identity().train(old.training)


def _collapse(
    model: nn.Module, links: list[ChainLink], tau: float, force: bool
) -> tuple[CollapseRecord, list[nn.Module]] | None:
    if not force and not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0):
        raise ConfigError(f"`tau`={tau!r} is not allowed: a positive float (the authors' default: 0.05).")
    seen: set[str] = set()
    for link in links:
        if link.activation in seen:
            raise ConfigError(f"`links` is not allowed to name activation `{link.activation}` twice.")
        seen.add(link.activation)
    chosen: list[ChainLink] = []
    slopes: list[float] = []
    skipped: list[SkippedLink] = []
    for link in links:
        if isinstance(get_submodule(model, link.second), CollapsedLayer):
            continue  # collapsed by an earlier call
        act = get_submodule(model, link.activation)
        if isinstance(act, CollapsibleActivation):
            a = float(act.slope.detach())
        elif force:
            a = float("nan")  # a plain activation, linearised without a slope
        else:
            raise SurgeryError(
                f"Cannot collapse at `{link.activation}`: it is a {type(act).__name__}, not a "
                "CollapsibleActivation; call make_collapsible_ and train with collapse_penalty first "
                "(or use collapse_post_training_)."
            )
        if force or abs(a - 1.0) < tau:
            chosen.append(link)
            slopes.append(a)
        else:
            skipped.append({"activation": link.activation, "slope": a})
    if not chosen:
        return None
    params_before = _num_params(model)
    entries: list[CollapsedLink] = []
    removed_acts: list[nn.Module] = []
    structure = _Structure(model, cache=False)  # each merge changes what the next probe sees
    with SurgeryTransaction():
        for link in chosen:
            into = resolve_into(model, link.first)  # through collapses of earlier calls and this one
            problem = structure.link_problem(link, into)
            if problem:
                raise SurgeryError(
                    f"Cannot collapse the MLP at `{link.activation}`: {problem}. The model was left unchanged."
                )
            first, second = as_linear(get_submodule(model, into)), as_linear(get_submodule(model, link.second))
            norm = get_submodule(model, link.norm) if link.norm else None
            if norm is not None and type(norm) is not nn.BatchNorm1d:
                raise SurgeryError(f"`{link.norm}` is a {type(norm).__name__}, expected BatchNorm1d.")
            try:
                merged = collapse_linear_pair(first, second, norm)
            except SurgeryError as err:
                raise SurgeryError(
                    f"Cannot collapse `{into}` -> `{link.second}` (link at `{link.activation}`): {err}"
                ) from None
            replace_submodule(model, into, merged)
            act = get_submodule(model, link.activation)
            removed_acts.append(act)
            for name in (link.activation, link.dropout, link.norm):
                if name:
                    replace_submodule(model, name, _identity_like(get_submodule(model, name)))
            old = get_submodule(model, link.second)
            replace_submodule(model, link.second, CollapsedLayer(link.second, into).train(old.training))
            entries.append(_link_record(link, into))
    metrics: CollapseMetrics = {
        "slopes": slopes,
        "tau": float(tau),
        "params_before": params_before,
        "params_after": _num_params(model),
        "skipped": skipped,
    }
    return {"op": "collapse", "links": entries, "metrics": metrics}, removed_acts


@torch.no_grad()
def _set_removed_slopes(removed: list[nn.Module]) -> None:
    """The authors set ``a := 1`` before merging (the merge used the identity); for references kept elsewhere."""
    for act in removed:
        if isinstance(act, CollapsibleActivation):
            act.slope.fill_(1.0)


def collapse_(model: nn.Module, links: Sequence[LinkLike] | LinkLike, tau: float = 0.05) -> list[dict[str, Any]]:
    """Collapse every link whose slope satisfies ``|a − 1| < tau``, in place; all or nothing.

    The merged ``nn.Linear`` replaces the link's ``first`` (same name and registration position);
    its activation, dropout and BatchNorm become ``nn.Identity``, and ``second`` a
    :class:`CollapsedLayer` that remembers where its weights went. In a stacked chain (3 linears)
    the links may collapse in one call or in several, in any order: a link whose ``first`` was merged
    away by an earlier collapse merges into the layer that holds it now, so the whole chain ends as
    one Linear at ``linears[0]``. Each link is first checked against the traced structure of its
    parent module (a gated MLP ``down(act(gate(x)) * up(x))`` is refused, naming the gate).
    Links that do not qualify are left as they are (listed under ``metrics.skipped``); links that
    collapsed in an earlier call are passed over, so a chain may be given again each time. BatchNorms
    are folded with their running statistics (eval-mode semantics). Rebuild the optimizer afterwards.

    Args:
        model: The model.
        links: :class:`LinearChain` s or :class:`ChainLink` s whose activations are
            :class:`CollapsibleActivation`.
        tau: Collapse threshold (the authors' default: 0.05).

    Returns:
        One :class:`CollapseRecord` (see the module docstring), or ``[]`` if nothing qualified.

    Raises:
        SurgeryError: If an activation is not collapsible, a link is not what the model computes (a
            gated MLP), or a merge is impossible or would not save parameters; the model is then unchanged.
    """
    done = _collapse(model, _as_links(links, "links"), tau, force=False)
    if done is None:
        return []
    record, removed = done
    _set_removed_slopes(removed)
    return [plain_record(record)]


@torch.no_grad()
def collapse_post_training_(
    model: nn.Module, links: Sequence[LinkLike] | LinkLike, example_inputs: Any
) -> tuple[list[dict[str, Any]], float]:
    """Collapse every link regardless of its slope (no fine-tuning) and measure the damage.

    Plain activations (e.g. ``nn.ReLU``) are linearised as well. The output change is measured in
    eval mode on ``example_inputs`` (called as :func:`~lit_compress.surgery.bn_stats.default_forward`:
    ``model(batch[0])`` for a tuple/list, ``model(**batch)`` for a dict, else ``model(batch)``).

    Returns:
        ``(records, max_abs_output_error)``; the error is also stored in the record's
        ``metrics["max_abs_output_error"]``.
    """
    link_list = _as_links(links, "links")
    with preserve_mode(model):
        model.eval()
        before = _flat_outputs(default_forward(model, example_inputs))
        with SurgeryTransaction():  # a failure after the merge (the forward below) restores the model
            done = _collapse(model, link_list, math.inf, force=True)
            try:
                after = _flat_outputs(default_forward(model, example_inputs))
            except Exception as err:
                raise SurgeryError(
                    f"The collapsed model failed on `example_inputs` ({type(err).__name__}: {err}); "
                    "the model was restored."
                ) from err
            if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
                raise SurgeryError(
                    "The collapsed model's outputs differ in structure or shape from the original's; "
                    "the model was restored."
                )
    error = max((float((a.double() - b.double()).abs().max()) for a, b in zip(before, after) if a.numel()), default=0.0)
    if done is None:
        return [], error
    record, removed = done
    _set_removed_slopes(removed)
    record["metrics"]["max_abs_output_error"] = error
    record["metrics"]["post_training"] = True
    return [plain_record(record)], error


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


@register_replay("collapse")
def _replay_collapse(model: nn.Module, record: CollapseRecord) -> None:
    """Rebuild the shapes: each ``into`` becomes ``Linear(into.in_features, second.out_features)``
    with a bias; activation, dropout, norm and ``second`` become ``nn.Identity``."""
    for entry in record["links"]:
        into, second_name = entry["into"], entry["second"]
        first = get_submodule(model, into)
        (d_in, _), (_, d_out) = linear_features(first), linear_features(get_submodule(model, second_name))
        device, dtype = module_device_dtype(first)
        merged = nn.Linear(d_in, d_out, device=device, dtype=dtype).train(first.training)
        replace_submodule(model, into, merged)
        for name in (entry["activation"], entry["dropout"], entry["norm"]):
            if name:
                replace_submodule(model, name, _identity_like(get_submodule(model, name)))
        old = get_submodule(model, second_name)
        replace_submodule(model, second_name, CollapsedLayer(second_name, into).train(old.training))
