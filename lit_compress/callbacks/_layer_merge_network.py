"""LayerMerge's ``latency_target="network"``: a budget on the whole network's measured latency.

The paper's budget is a fraction of the latency table's sum over the conv sites. The network around
them (kept activations, residual adds, pooling, the head) does not shrink with the plan, so a plan at
70 % of the table runs at more than 70 % of the network's latency (ResNet-20 on MNIST, CPU, batch 64:
about 80 %). Here the plan is built on a copy, merged and deployed (eval mode, BatchNorm folded),
timed interleaved with the original, and the conv budget lowered until the network meets its budget.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from typing import Any, TypedDict

import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.measure.latency import measure_interleaved

#: A plan meets its network budget when it measures at most this much (relative) over it: timing noise.
NETWORK_TOLERANCE = 0.02


class NetworkStep(TypedDict):
    """One round of the calibration: the conv-table budget tried and what the merged network measured."""

    conv_budget: float  # fraction of the table's original sum given to the DP
    table_fraction: float  # the plan's share of the table's original sum
    network_ms: float  # the merged, deployed plan, best round median
    dense_ms: float  # the original network in the same rounds
    network_fraction: float  # network_ms / dense_ms


def deployed_copy(model: nn.Module, example: torch.Tensor, blocks: Sequence[Sequence[Any]] | None) -> nn.Module:
    """A copy of ``model`` in eval mode, planned with ``blocks`` and merged (``None``: as it is), BatchNorm folded.

    Args:
        model: The network LayerMerge plans (unplanned); it is not changed.
        example: An input batch ``[N, C, H, W]`` used to trace the BatchNorm pairs.
        blocks: A plan's ``[start, end, kept]`` blocks.
    """
    from lit_compress.surgery import fold_batchnorm_
    from lit_compress.surgery.layermerge.plan import apply_merge_plan_, merge_planned_

    trainer = model.__dict__.get("_trainer")
    model.__dict__["_trainer"] = None
    try:
        result = copy.deepcopy(model)
    finally:
        model.__dict__["_trainer"] = trainer
    if blocks is not None:
        record = apply_merge_plan_(result, [list(b) for b in blocks])[0]
        merge_planned_(result, record)
    result.eval()
    with contextlib.suppress(ConfigError, SurgeryError):  # nothing left to fold: timed as it is
        fold_batchnorm_(result, example_inputs=example)
    return result


def time_against_original(
    model: nn.Module,
    blocks: Sequence[Sequence[Any]],
    example: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    warmup: int,
    repeats: int,
    rounds: int,
) -> tuple[float, float]:
    """``(plan_ms, original_ms)``: the merged plan and the original, deployed, timed in interleaved rounds.

    Each is its best round's median (a burst of load hits one round, not both models' best). The global
    RNG is left as it was.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():  # new layers draw weights: rank 0's RNG is left alone
        original = deployed_copy(model, example, None)
        planned = deployed_copy(model, example, blocks)
        stats = measure_interleaved(
            [original, planned],
            example,
            rounds=rounds,
            repeats=repeats,
            warmup=warmup,
            batch_size=batch_size,
            device=device,
        )
    return min(stats[1]["round_medians_ms"]), min(stats[0]["round_medians_ms"])


def next_conv_budget(steps: Sequence[NetworkStep], target: float, table_ms: float, floor: float) -> float | None:
    """The conv budget to try after ``steps`` missed ``target``; ``None`` when nothing lower can be tried.

    The first correction removes the network's excess milliseconds from the conv budget (the layers
    outside the table do not shrink); later ones follow the secant through the last two steps, the
    network fraction being close to affine in the conv budget. Never below ``floor`` (the fastest
    plan's share), always below the last budget tried.

    Args:
        steps: The rounds so far, the last one over its budget.
        target: The network budget, a fraction of the original's latency.
        table_ms: The table's original sum, ms.
        floor: The fastest plan's share of ``table_ms``.
    """
    last = steps[-1]
    excess_ms = (last["network_fraction"] - target) * last["dense_ms"]
    guess = last["conv_budget"] - excess_ms / table_ms
    if len(steps) >= 2:
        prev = steps[-2]
        rise = last["network_fraction"] - prev["network_fraction"]
        run = last["conv_budget"] - prev["conv_budget"]
        if run != 0 and rise / run > 0:
            guess = last["conv_budget"] - (last["network_fraction"] - target) * run / rise
    guess = min(guess, last["conv_budget"] - 1e-3)
    if last["conv_budget"] <= floor + 1e-9 or not math.isfinite(guess):
        return None
    return max(guess, floor)


__all__ = ["NETWORK_TOLERANCE", "NetworkStep", "deployed_copy", "next_conv_budget", "time_against_original"]
