"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

With ``s = gamma / sqrt(running_var + eps)`` (shape ``(C_out,)``), a layer ``y = W x + b`` followed
by BN becomes ``W' = s * W`` (per output channel) and ``b' = s * (b - running_mean) + beta``. The
math runs in float64 and is cast back to the layer's dtype on its device.

The model-wide :func:`fold_batchnorm_` replaces each layer by its folded copy (same name, same
registration position) and each BN by ``nn.Identity``, and logs one ``"fold_batchnorm"`` record::

    {"op": "fold_batchnorm", "pairs": [["layer1.0.conv1", "layer1.0.bn1"], ...]}
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery.chains import find_foldable_batchnorms
from lit_compress.surgery.log import make_record
from lit_compress.surgery.modules import SurgeryTransaction, get_submodule, replace_submodule
from lit_compress.surgery.replay import register_replay
from lit_compress.surgery.select import name_matches

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


_LayerT = TypeVar("_LayerT", bound=nn.Module)


@torch.no_grad()
def fold_conv_bn(conv: _LayerT, bn: nn.Module) -> _LayerT:
    """A new convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode; inputs are not modified.

    ``conv`` must be a ``Conv1d``/``Conv2d``/``Conv3d`` and ``bn`` a BatchNorm; the result has the
    class of ``conv``.

    Works for grouped and depthwise convolutions and convolutions without bias (the result always
    has a bias). The weight ``(C_out, C_in / groups, *kernel)`` is scaled per output channel.

    Raises:
        SurgeryError: For another module than a conv (transposed ones included), a BN without
            running statistics or with a different number of channels.
    """
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise SurgeryError(
            f"Cannot fold BatchNorm into `{type(conv).__name__}`: transposed convolutions are not supported "
            "(supported: Conv1d, Conv2d, Conv3d)."
        )
    if not isinstance(conv, _CONV_TYPES):
        raise SurgeryError(f"Cannot fold BatchNorm into `{type(conv).__name__}`: expected Conv1d, Conv2d or Conv3d.")
    return _fold(conv, bn, conv.out_channels)


@torch.no_grad()
def fold_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Linear:
    """A new ``nn.Linear`` equal to ``bn(linear(x))`` for 2-D ``x`` of shape ``(N, in_features)``, BN in eval mode.

    Raises:
        SurgeryError: If ``linear`` is not an ``nn.Linear``, or ``bn`` keeps no running statistics or
            has a different number of features.
    """
    if not isinstance(linear, nn.Linear):
        raise SurgeryError(
            f"Cannot fold BatchNorm into `{type(linear).__name__}` with fold_linear_bn: expected nn.Linear."
        )
    return _fold(linear, bn, linear.out_features)


def _fold(layer: Any, bn: nn.Module, channels: int) -> Any:
    kind = type(layer).__name__
    if not isinstance(bn, _BatchNorm):
        raise SurgeryError(f"Cannot fold `{type(bn).__name__}` into `{kind}`: expected a BatchNorm module.")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise SurgeryError(
            f"Cannot fold `{type(bn).__name__}` into `{kind}`: the BatchNorm was built with "
            "`track_running_stats=False`, so there are no statistics to fold."
        )
    if bn.num_features != channels:
        raise SurgeryError(
            f"Cannot fold `{type(bn).__name__}` ({bn.num_features} features) into `{kind}` "
            f"({channels} output channels)."
        )
    if parametrize.is_parametrized(layer):
        raise SurgeryError(f"Cannot fold BatchNorm into a parametrized `{kind}`; remove its parametrizations first.")
    weight = layer.weight
    f64 = torch.float64
    mean = bn.running_mean.to(weight.device, f64)  # (C,)
    var = bn.running_var.to(weight.device, f64)  # (C,)
    gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma.to(weight.device) / torch.sqrt(var + bn.eps)  # (C,)
    bias = layer.bias.to(f64) if layer.bias is not None else torch.zeros_like(mean)
    new_weight = weight.to(f64) * scale.view(-1, *([1] * (weight.dim() - 1)))  # (C_out, ...)
    new_bias = (bias - mean) * scale + beta.to(weight.device)  # (C_out,)
    folded = _with_bias(layer)
    folded.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    folded.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
    return folded


def _with_bias(layer: nn.Module) -> Any:
    """A deep copy of ``layer`` (same class, hyper-parameters, device, dtype) that has a bias parameter."""
    new = copy.deepcopy(layer)
    if new.bias is None:
        new.bias = nn.Parameter(torch.zeros(new.weight.shape[0], device=new.weight.device, dtype=new.weight.dtype))
    return new


def _fold_any(layer: nn.Module, bn: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return fold_linear_bn(layer, bn)
    return fold_conv_bn(layer, bn)


def _check_pairs(pairs: Any) -> list[tuple[str, str]]:
    checked: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
            raise ConfigError(
                f"`pairs` entry {pair!r} is not allowed: each entry must be two module names (layer, batchnorm)."
            )
        twice = [n for n in pair if n in seen]
        if twice or pair[0] == pair[1]:
            raise ConfigError(f"`pairs` entry {list(pair)!r} is not allowed: each module may appear in one pair only.")
        seen.update(pair)
        checked.append((pair[0], pair[1]))
    return checked


def fold_batchnorm_(
    model: nn.Module,
    pairs: Sequence[Sequence[str]] | None = None,
    example_inputs: Any = None,
    targets: Sequence[str] = ("*",),
) -> list[dict[str, Any]]:
    """Fold BatchNorms into the layers before them, in place; all or nothing.

    Args:
        model: The model. Fold only a model whose BN statistics are final (eval-mode semantics).
        pairs: ``(layer_name, bn_name)`` pairs (tuples or lists); ``None`` discovers them with
            :func:`~lit_compress.surgery.chains.find_foldable_batchnorms` (traced when
            ``example_inputs`` is given, else ``nn.Sequential`` adjacency only).
        example_inputs: Inputs for discovery; ignored when ``pairs`` is given.
        targets: Globs or ``re:`` patterns; a pair is folded when its layer or BN name matches.

    Returns:
        ``[make_record("fold_batchnorm", pairs=[[layer, bn], ...])]``, or ``[]`` if nothing was folded.

    Raises:
        ConfigError: If ``pairs`` is malformed or names a module twice.
        SurgeryError: If a pair cannot be folded; the model is then left unchanged.
    """
    if isinstance(targets, str):
        targets = [targets]
    chosen = _check_pairs(find_foldable_batchnorms(model, example_inputs) if pairs is None else pairs)
    chosen = [p for p in chosen if name_matches(p[0], targets) or name_matches(p[1], targets)]
    if not chosen:
        return []
    with SurgeryTransaction():
        for layer_name, bn_name in chosen:
            layer, bn = get_submodule(model, layer_name), get_submodule(model, bn_name)
            try:
                folded = _fold_any(layer, bn)
            except SurgeryError as err:
                raise SurgeryError(f"Cannot fold `{bn_name}` into `{layer_name}`: {err}") from None
            replace_submodule(model, layer_name, folded)
            replace_submodule(model, bn_name, nn.Identity().train(bn.training))
    return [make_record("fold_batchnorm", pairs=[[a, b] for a, b in chosen])]


@register_replay("fold_batchnorm")
def _replay_fold_batchnorm(model: nn.Module, record: dict[str, Any]) -> None:
    """Rebuild the folded structure: each layer gains a bias, each BN becomes ``nn.Identity``."""
    for layer_name, bn_name in _check_pairs(record["pairs"]):
        layer, bn = get_submodule(model, layer_name), get_submodule(model, bn_name)
        if not isinstance(layer, (*_CONV_TYPES, nn.Linear)) or isinstance(layer, nn.modules.conv._ConvTransposeNd):
            raise SurgeryError(f"`{layer_name}` is a {type(layer).__name__}, expected a Conv1d/2d/3d or Linear.")
        if not isinstance(bn, _BatchNorm):
            raise SurgeryError(f"`{bn_name}` is a {type(bn).__name__}, expected a BatchNorm.")
        replace_submodule(model, layer_name, _with_bias(layer))
        replace_submodule(model, bn_name, nn.Identity().train(bn.training))
