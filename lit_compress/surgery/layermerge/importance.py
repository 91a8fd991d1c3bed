"""LayerMerge's importance table I(s, e, c): how much a merged block costs in accuracy.

For every candidate that changes the network, a copy of the model gets that one block
(:func:`~lit_compress.surgery.layermerge.plan.single_block_plan`) and is scored on held-out
batches against the unmodified model:

- ``"finetune"`` (the paper's): fine-tune the copy for ``steps`` SGD steps (Nesterov, momentum 0.9),
  then ``I = exp(Δacc / 100)`` with accuracies in points (``exp(-Δloss / base_loss)`` when the
  batches have no class labels);
- ``"loss_proxy"`` (cheap): re-estimate the copy's BatchNorm statistics on a few training batches,
  no gradient step, then ``I = exp(-Δloss / base_loss)``.

Unmodified single-conv blocks have ``I = 1`` (Δ = 0) without any computation. The latency table
lives in :mod:`lit_compress.measure.latency_table`.

The DP adds its entries' values over a plan's blocks, so it takes ``log I`` (:func:`dp_value`: the
accuracy change in hundredths, or the relative loss change), not ``I``: a plan's value is then the
sum of its blocks' changes, the same for any number of blocks, and every unmodified block adds 0.
Summing ``I`` itself (every block worth about 1) made the DP maximise the number of blocks kept:
a nearly harmless 4-conv merge lost against three unmodified blocks plus a harmful 2-conv merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.bn_stats import reestimate_batchnorm_
from lit_compress.surgery.layermerge.blocks import Candidate, MergeSpace
from lit_compress.surgery.layermerge.plan import apply_merge_plan_, single_block_plan

__all__ = ["IMPORTANCE_METHODS", "ForwardLoss", "dp_value", "importance_table"]

IMPORTANCE_METHODS = ("finetune", "loss_proxy")

# forward_loss(model, batch) -> (mean loss tensor, number correct or None, number of samples)
ForwardLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int | None, int]]


# The DP value of a block that broke the network (I = 0: non-finite loss): worse than any real change.
WORST_DP_VALUE = -1e3


def dp_value(importance: float) -> float:
    """The additive DP value of a block of importance ``I``: ``log I`` (0 for an unmodified block).

    Blocks of any depth compare fairly: a plan's value is its summed accuracy (or relative loss)
    change, whatever the number of blocks. ``I <= 0`` (a broken block) is :data:`WORST_DP_VALUE`.

    Raises:
        ConfigError: For a negative or non-finite ``importance``.
    """
    if not (isinstance(importance, (int, float)) and math.isfinite(importance) and importance >= 0):
        raise ConfigError(f"`importance`={importance!r} is not allowed: must be a finite number >= 0.")
    return math.log(importance) if importance > 0 else WORST_DP_VALUE


# --------------------------------------------------------------------------------------------


def _evaluate(model: nn.Module, batches: Sequence[Any], forward_loss: ForwardLoss) -> tuple[float, float | None]:
    model.eval()
    total, correct, n_all, has_acc = 0.0, 0, 0, True
    with torch.no_grad():
        for batch in batches:
            loss, n_correct, n = forward_loss(model, batch)
            total += float(loss) * n
            n_all += n
            if n_correct is None:
                has_acc = False
            else:
                correct += int(n_correct)
    n_all = max(n_all, 1)
    return total / n_all, (100.0 * correct / n_all if has_acc else None)


def _score(base: tuple[float, float | None], new: tuple[float, float | None], use_acc: bool) -> float:
    if use_acc and base[1] is not None and new[1] is not None:
        return math.exp((new[1] - base[1]) / 100.0)
    if not math.isfinite(new[0]):
        return 0.0
    return math.exp(-(new[0] - base[0]) / max(base[0], 1e-8))


def importance_table(
    model: nn.Module,
    space: MergeSpace,
    candidates: Sequence[Candidate],
    *,
    train_batches: Sequence[Any],
    holdout_batches: Sequence[Any],
    forward_loss: ForwardLoss,
    method: str = "loss_proxy",
    steps: int = 50,
    lr: float = 0.01,
    weight_decay: float = 1e-5,
    bn_batches: int = 5,
    progress: bool = True,
) -> dict[str, float]:
    """``{candidate.key: importance}``; see the module docstring for the two methods.

    ``model`` is not modified (each candidate is scored on a deep copy).

    Raises:
        ConfigError: For an unknown ``method`` or empty batch lists.
    """
    if method not in IMPORTANCE_METHODS:
        raise ConfigError(f"`importance`={method!r} is not allowed: must be one of {', '.join(IMPORTANCE_METHODS)}.")
    if not train_batches or not holdout_batches:
        raise ConfigError("LayerMerge importance: needs at least one training and one held-out batch.")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"`importance_steps`={steps!r} is not allowed: must be an int >= 1.")
    was_training = model.training
    base = _evaluate(model, holdout_batches, forward_loss)
    model.train(was_training)
    table: dict[str, float] = {}
    todo = [c for c in candidates if not c.is_original(space)]
    for c in candidates:
        if c.is_original(space):
            table[c.key] = 1.0
    iterator: Iterable[Candidate] = todo
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(todo, desc=f"LayerMerge importance ({method})", unit="entry")
        except ImportError:  # pragma: no cover
            pass
    for c in iterator:
        trial = copy.deepcopy(model)
        apply_merge_plan_(trial, single_block_plan(space, c.start, c.end, list(c.kept)), space=space)
        if method == "loss_proxy":
            reestimate_batchnorm_(
                trial, list(train_batches)[:bn_batches], forward=lambda m, b: forward_loss(m, b), num_batches=bn_batches
            )
        else:
            trial.train()
            params = [p for p in trial.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for step in range(steps):
                loss, _, _ = forward_loss(trial, train_batches[step % len(train_batches)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        table[c.key] = _score(base, _evaluate(trial, holdout_batches, forward_loss), method == "finetune")
        del trial
    return table
