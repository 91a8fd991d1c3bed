"""Layer Fusion candidates: layers grouped by ROLE and SHAPE (only same-group layers may be tied).

A *unit* is one layer whose parameters are tied as a whole: a conv or linear (weight and bias), a
packed attention input projection, a norm (behind ``include_norms``) or an embedding (behind
``include_embeddings``). Roles follow the Layer Fusion code: in a transformer the
query, key, value, attention-output, FFN-in and FFN-out projections are separate groups, so a
query projection is never tied to a key projection even if their shapes agree; in a CNN every
conv is role ``conv`` and every other linear role ``linear``. A group is
``(role, module type, parameter names, shapes)``.

Roles are read from the qualified name, which covers PyTorch's ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (``self_attn``, cross-attention ``multihead_attn`` → ``xattn_*``,
``linear1`` → ``ffn_in``, ``linear2`` → ``ffn_out``), Hugging Face Llama-family models (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj`` → ``ffn_gate``, ``up_proj``, ``down_proj``), our
:class:`~lit_compress.models.transformer.TransformerLM`
(``attn.q_proj``/``k_proj``/``v_proj``/``out_proj``, ``mlp.fc_in``/``fc_out``), Hugging Face GPT-2
(``attn.c_attn``/``attn.c_proj``/``mlp.c_fc``/``mlp.c_proj``, all ``Conv1D``), Hugging Face BERT
(``attention.self.query``/``key``/``value``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) and ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``).

GPT-2's ``c_attn`` is ONE ``Conv1D`` computing Q, K and V together (weight ``(C, 3C)``). It is
role ``attn_qkv`` and is tied as one unit with the ``c_attn`` of other blocks, never split into
Q/K/V or heads (the authors fuse GPT-2's packed QKV as one unit); the same holds for the
packed ``in_proj_weight`` of ``nn.MultiheadAttention``.

BatchNorm is never a candidate (it carries running statistics; a BN after a fused conv keeps its
own). Biases are tied together with their weight but play no part in the similarity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lit_compress.errors import SurgeryError
from lit_compress.surgery.select import name_matches

_Q = {"q_proj", "query", "q", "wq", "q_lin"}
_K = {"k_proj", "key", "k", "wk", "k_lin"}
_V = {"v_proj", "value", "v", "wv", "v_lin"}
_QKV = {"c_attn", "qkv", "qkv_proj", "in_proj", "wqkv", "query_key_value"}
_ATTN_OUT = {"out_proj", "o_proj", "out_lin", "wo"}
_FFN_IN = {"fc_in", "c_fc", "fc1", "up_proj", "lin1", "linear1", "w1", "dense_h_to_4h"}
_FFN_GATE = {"gate_proj"}
_FFN_OUT = {"fc_out", "fc2", "down_proj", "lin2", "linear2", "w2", "dense_4h_to_h"}
#: Path components that mark cross-attention (decoder attending to an encoder): its projections are
#: separate roles (``xattn_*``), never tied to self-attention's.
_CROSS = {"multihead_attn", "encoder_attn", "cross_attn", "crossattention", "src_attn", "enc_dec_attn"}
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

ROLES = (
    "conv",
    "linear",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_out",
    "xattn_q",
    "xattn_k",
    "xattn_v",
    "xattn_qkv",
    "xattn_out",
    "ffn_in",
    "ffn_gate",
    "ffn_out",
    "norm",
    "embedding",
)


#: ``(role, module type, parameter names, shapes)``: units may be tied only within one group.
FusionGroup = tuple[str, str, tuple[str, ...], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class FusionUnit:
    """One layer that can be tied as a whole to another unit of the same :attr:`group`."""

    name: str  # qualified module name
    role: str  # one of ROLES ("norm:<position>" for norms, so ln_1 and ln_2 are separate groups)
    kind: str  # module class name (a Linear is never tied to a Conv1D: their layouts differ)
    params: tuple[str, ...]  # parameter attribute names, the weight first (the similarity uses it)
    shapes: tuple[tuple[int, ...], ...]

    @property
    def group(self) -> FusionGroup:
        """Units may be tied only within one group."""
        return (self.role, self.kind, self.params, self.shapes)

    @property
    def numel(self) -> int:
        """Parameters stored by one unit (what one more tie saves)."""
        total = 0
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def group_label(self) -> str:
        return f"{self.role} {self.kind} {'x'.join(map(str, self.shapes[0]))}"


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _cross(role: str, name: str) -> str:
    """``attn_*`` → ``xattn_*`` when ``name`` lies inside a cross-attention module."""
    if role.startswith("attn_") and any(part in _CROSS for part in name.lower().split(".")):
        return "x" + role
    return role


def linear_role(name: str) -> str:
    """The role of a linear-like layer (``nn.Linear`` or HF ``Conv1D``) from its qualified name.

    Cross-attention projections (inside ``multihead_attn`` of ``nn.TransformerDecoderLayer``, HF
    ``crossattention``/``encoder_attn``) get ``xattn_*`` roles.
    """
    return _cross(_self_role(name), name)


def _self_role(name: str) -> str:
    parts = name.lower().split(".")
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf in _QKV:
        return "attn_qkv"
    if leaf in _Q:
        return "attn_q"
    if leaf in _K:
        return "attn_k"
    if leaf in _V:
        return "attn_v"
    if leaf in _ATTN_OUT or (leaf == "c_proj" and parent in ("attn", "attention", "self_attn")):
        return "attn_out"
    if leaf == "dense" and parent == "output" and len(parts) > 2 and parts[-3] in ("attention", "crossattention"):
        return "attn_out"  # BERT attention.output.dense
    if leaf in _FFN_GATE:
        return "ffn_gate"
    if leaf in _FFN_IN or (leaf == "dense" and parent == "intermediate"):
        return "ffn_in"
    if leaf in _FFN_OUT or (leaf == "c_proj" and parent in ("mlp", "ffn", "feed_forward")):
        return "ffn_out"
    if leaf == "dense" and parent == "output":
        return "ffn_out"  # BERT layer.N.output.dense
    return "linear"


def _position(name: str) -> str:
    """The name with its numeric path components (block indices) replaced by ``*``."""
    return ".".join("*" if re.fullmatch(r"\d+", part) else part for part in name.split("."))


def _present(module: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(n for n in names if isinstance(module._parameters.get(n), nn.Parameter))


def unit_parameter(module: nn.Module, pname: str) -> nn.Parameter:
    """The parameter ``pname`` registered on ``module`` itself (not a submodule's).

    Raises:
        SurgeryError: If ``module`` has no such parameter (or it is ``None``).
    """
    param = module._parameters.get(pname)
    if param is None:
        raise SurgeryError(f"{type(module).__name__} has no parameter `{pname}`.")
    return param


def unit_of(
    name: str, module: nn.Module, *, include_norms: bool = False, include_embeddings: bool = False
) -> FusionUnit | None:
    """The fusion unit of ``module`` (named ``name``), or ``None`` if it is not a candidate."""
    role: str | None = None
    params: tuple[str, ...] = ()
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            role, params = _cross("attn_qkv", name), _present(module, ("in_proj_weight", "in_proj_bias"))
    elif isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        role, params = linear_role(name), _present(module, ("weight", "bias"))
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        role, params = "conv", _present(module, ("weight", "bias"))
    elif include_norms and isinstance(module, _NORMS):
        role, params = "norm:" + _position(name), _present(module, ("weight", "bias"))
    elif include_embeddings and isinstance(module, nn.Embedding):
        role, params = "embedding", _present(module, ("weight",))
    if role is None or not params or not params[0].endswith("weight"):
        return None
    shapes = tuple(tuple(unit_parameter(module, p).shape) for p in params)
    return FusionUnit(name=name, role=role, kind=type(module).__name__, params=params, shapes=shapes)


def fusion_units(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    include_norms: bool = False,
    include_embeddings: bool = False,
) -> list[FusionUnit]:
    """Every candidate unit of ``model`` whose name matches ``targets`` (all if None), in model order."""
    units = []
    for name, module in model.named_modules():
        if not name or (targets and not name_matches(name, targets)):
            continue
        unit = unit_of(name, module, include_norms=include_norms, include_embeddings=include_embeddings)
        if unit is not None:
            units.append(unit)
    return units


def candidate_groups(units: Sequence[FusionUnit]) -> dict[FusionGroup, list[FusionUnit]]:
    """Units grouped by :attr:`FusionUnit.group`, keeping only groups with at least two units."""
    groups: dict[FusionGroup, list[FusionUnit]] = {}
    for unit in units:
        groups.setdefault(unit.group, []).append(unit)
    return {k: v for k, v in groups.items() if len(v) >= 2}


def clusters(model: nn.Module, units: Sequence[FusionUnit]) -> list[list[FusionUnit]]:
    """Units partitioned by the identity of their weight: units already tied form one cluster."""
    found: dict[int, list[FusionUnit]] = {}
    for unit in units:
        weight = unit_parameter(model.get_submodule(unit.name), unit.params[0])
        found.setdefault(id(weight), []).append(unit)
    return list(found.values())


def max_removable(model: nn.Module, units: Sequence[FusionUnit]) -> int:
    """How many stored parameters tying could still remove: every group down to one cluster."""
    total = 0
    for members in candidate_groups(units).values():
        total += (len(clusters(model, members)) - 1) * members[0].numel
    return total


def unit_weight(model: nn.Module, unit: FusionUnit) -> torch.Tensor:
    """The weight the similarity measures compare (biases are left out, as in the paper)."""
    return unit_parameter(model.get_submodule(unit.name), unit.params[0]).detach()


__all__ = [
    "ROLES",
    "FusionGroup",
    "FusionUnit",
    "candidate_groups",
    "clusters",
    "fusion_units",
    "linear_role",
    "max_removable",
    "unit_of",
    "unit_parameter",
    "unit_weight",
]
