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
from lit_compress.surgery.chains import ChainLink, LinearChain, linear_layout
from lit_compress.surgery.log import plain_record
from lit_compress.surgery.modules import SurgeryTransaction, get_submodule, preserve_mode, replace_submodule
from lit_compress.surgery.replay import register_replay

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "CollapseMetrics",
    "CollapseRecord",
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


# --------------------------------------------------------------------------------------------- helpers


#: Hugging Face activation classes (matched by name, so transformers need not be installed).
HF_GELU_CLASSES = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh")


def _kind_and_slope(name: str, module: nn.Module) -> tuple[str, float]:
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
        ConfigError: For an unsupported activation type (module name, type and supported types named).
    """
    names = _activation_names(targets)
    plan: list[tuple[str, str, float, nn.Module]] = []
    for name in names:
        module = get_submodule(model, name)
        if isinstance(module, CollapsibleActivation):
            continue
        kind, slope = _kind_and_slope(name, module)
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


def _collapse(model: nn.Module, links: list[ChainLink], tau: float, force: bool) -> CollapseRecord | None:
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
    moved: dict[str, str] = {}  # a linear turned Identity -> the linear that holds its weights now
    entries: list[CollapsedLink] = []
    removed_acts: list[nn.Module] = []
    with SurgeryTransaction():
        for link in chosen:
            into = link.first
            while into in moved:
                into = moved[into]
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
            for name in (link.activation, link.dropout, link.norm, link.second):
                if name:
                    replace_submodule(model, name, _identity_like(get_submodule(model, name)))
            moved[link.second] = into
            entries.append(_link_record(link, into))
    with torch.no_grad():  # the authors set a := 1 before merging; the merge used the identity
        for act in removed_acts:
            if isinstance(act, CollapsibleActivation):
                act.slope.fill_(1.0)
    metrics: CollapseMetrics = {
        "slopes": slopes,
        "tau": float(tau),
        "params_before": params_before,
        "params_after": _num_params(model),
        "skipped": skipped,
    }
    return {"op": "collapse", "links": entries, "metrics": metrics}


def collapse_(model: nn.Module, links: Sequence[LinkLike] | LinkLike, tau: float = 0.05) -> list[dict[str, Any]]:
    """Collapse every link whose slope satisfies ``|a − 1| < tau``, in place; all or nothing.

    The merged ``nn.Linear`` replaces the link's ``first`` (same name and registration position);
    its activation, dropout, BatchNorm and ``second`` become ``nn.Identity``. In a stacked chain
    (3 linears) whose slopes all qualify, the whole chain becomes one Linear at ``linears[0]``.
    Links that do not qualify are left as they are (listed under ``metrics.skipped``). BatchNorms
    are folded with their running statistics (eval-mode semantics). Rebuild the optimizer afterwards.

    Args:
        model: The model.
        links: :class:`LinearChain` s or :class:`ChainLink` s whose activations are
            :class:`CollapsibleActivation`.
        tau: Collapse threshold (the authors' default: 0.05).

    Returns:
        One :class:`CollapseRecord` (see the module docstring), or ``[]`` if nothing qualified.

    Raises:
        SurgeryError: If an activation is not collapsible, or a merge is impossible or would not save
            parameters; the model is then unchanged.
    """
    record = _collapse(model, _as_links(links, "links"), tau, force=False)
    return [] if record is None else [plain_record(record)]


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
        record = _collapse(model, link_list, math.inf, force=True)
        after = _flat_outputs(default_forward(model, example_inputs))
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        raise SurgeryError("The collapsed model's outputs differ in structure or shape from the original's.")
    error = max((float((a.double() - b.double()).abs().max()) for a, b in zip(before, after) if a.numel()), default=0.0)
    if record is None:
        return [], error
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
        first, second = as_linear(get_submodule(model, into)), as_linear(get_submodule(model, second_name))
        device, dtype = first.weight.device, first.weight.dtype
        merged = nn.Linear(first.in_features, second.out_features, device=device, dtype=dtype).train(first.training)
        replace_submodule(model, into, merged)
        for name in (entry["activation"], entry["dropout"], entry["norm"], second_name):
            if name:
                replace_submodule(model, name, _identity_like(get_submodule(model, name)))
