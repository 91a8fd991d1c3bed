"""LayerMerge's importance table I(s, e, c): how much a merged block costs in accuracy.

For every candidate that changes the network, a copy of the model gets that one block
(:func:`~lit_compress.surgery.layermerge.plan.single_block_plan`), is given a *treatment* and is
scored on held-out batches against the **baseline: the unmodified model given the same treatment**
(computed once per table), so that the treatment itself never counts as a gain of the candidate:

- ``"finetune"`` (the paper's): the treatment is ``steps`` SGD steps (Nesterov, momentum 0.9,
  cosine to 0) on the training batches, then ``I = exp(Δacc / 100)`` with accuracies in points
  (``exp(-Δloss / base_loss)`` when the batches have no class labels);
- ``"loss_proxy"`` (cheap): the treatment is re-estimating the BatchNorm statistics on a few training
  batches, no gradient step; ``I = exp(-Δloss / base_loss)``.

Every treatment starts from the same random seed, so an unmodified block would reproduce the
baseline exactly: it gets ``I = 1`` without computation. With ``reset_layers`` (``"finetune"`` only;
the authors' ``reset_layers``), the single-conv block ``(p - 1, p]`` of each site is scored too: its
conv and BatchNorm are re-initialised, then fine-tuned like any candidate, so ``I`` measures what the
layer's trained weights are worth. A site that no other candidate covers is in every plan, so its
value cannot change the plan and it keeps ``I = 1`` (no fine-tune). The latency table lives in
:mod:`lit_compress.measure.latency_table`.

The DP adds its entries' values over a plan's blocks, so it takes ``log I`` (:func:`dp_value`: the
accuracy change in hundredths, or the relative loss change), not ``I``: a plan's value is then the
sum of its blocks' changes, the same for any number of blocks, and every unmodified block adds 0.
Summing ``I`` itself (every block worth about 1) made the DP maximise the number of blocks kept:
a nearly harmless 4-conv merge lost against three unmodified blocks plus a harmful 2-conv merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.bn_stats import reestimate_batchnorm_
from lit_compress.surgery.layermerge.blocks import Candidate, MergeSpace
from lit_compress.surgery.layermerge.plan import apply_merge_plan_, single_block_plan
from lit_compress.surgery.modules import get_submodule

__all__ = ["IMPORTANCE_METHODS", "ForwardLoss", "ImportanceScorer", "dp_value", "importance_table"]

IMPORTANCE_METHODS = ("finetune", "loss_proxy")

# forward_loss(model, batch) -> (mean loss tensor, number correct or None, number of samples)
ForwardLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int | None, int]]
# (mean held-out loss, held-out accuracy in points or None)
Evaluation = tuple[float, float | None]


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


def _evaluate(model: nn.Module, batches: Sequence[Any], forward_loss: ForwardLoss) -> Evaluation:
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


def _score(base: Evaluation, new: Evaluation, use_acc: bool) -> float:
    if use_acc and base[1] is not None and new[1] is not None:
        return math.exp((new[1] - base[1]) / 100.0)
    if not math.isfinite(new[0]):
        return 0.0
    return math.exp(-(new[0] - base[0]) / max(base[0], 1e-8))


@contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Run with torch's RNGs (CPU and the model's CUDA devices) seeded, restoring them afterwards."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ImportanceScorer:
    """Scores single-block plans of one ``model`` against one baseline: the unmodified model, treated alike.

    The baseline (the model with every site's original single-conv block, given the method's
    treatment, evaluated on ``holdout_batches``) is computed on first use and kept; ``baseline_runs``
    counts how often it was computed (once). ``model`` is never modified: each score works on a deep copy.

    Args:
        model: The pretrained network.
        space: Its merge space.
        train_batches: Batches of the treatment (fine-tune steps or BN re-estimation).
        holdout_batches: Batches the candidates are scored on (disjoint from ``train_batches``).
        forward_loss: ``forward_loss(model, batch) -> (mean loss, number correct or None, batch size)``.
        method: ``"finetune"`` or ``"loss_proxy"`` (see the module docstring).
        steps: Fine-tune steps (``"finetune"``).
        lr: Fine-tune learning rate (cosine to 0).
        weight_decay: Fine-tune weight decay.
        bn_batches: Batches of the BN re-estimation (``"loss_proxy"``).
        seed: Every treatment (and every re-initialisation) starts from this seed.

    Raises:
        ConfigError: For an unknown ``method``, empty batch lists or ``steps < 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        space: MergeSpace,
        *,
        train_batches: Sequence[Any],
        holdout_batches: Sequence[Any],
        forward_loss: ForwardLoss,
        method: str = "loss_proxy",
        steps: int = 50,
        lr: float = 0.01,
        weight_decay: float = 1e-5,
        bn_batches: int = 5,
        seed: int = 0,
    ) -> None:
        if method not in IMPORTANCE_METHODS:
            raise ConfigError(
                f"`importance`={method!r} is not allowed: must be one of {', '.join(IMPORTANCE_METHODS)}."
            )
        if not train_batches or not holdout_batches:
            raise ConfigError("LayerMerge importance: needs at least one training and one held-out batch.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"`importance_steps`={steps!r} is not allowed: must be an int >= 1.")
        self.model, self.space, self.method = model, space, method
        self.train_batches, self.holdout_batches = list(train_batches), list(holdout_batches)
        self.forward_loss = forward_loss
        self.steps, self.lr, self.weight_decay, self.bn_batches, self.seed = steps, lr, weight_decay, bn_batches, seed
        self.baseline_runs = 0
        self._baseline: Evaluation | None = None

    def baseline(self) -> Evaluation:
        """The treated unmodified model's held-out ``(loss, accuracy or None)``; computed once."""
        if self._baseline is None:
            self._baseline = self._run(single_block_plan(self.space, 0, 1, [1]), reset=None)
            self.baseline_runs += 1
        return self._baseline

    def score(self, candidate: Candidate, *, reset: bool = False) -> float:
        """``I`` of ``candidate``'s single-block plan against :meth:`baseline`.

        ``reset`` re-initialises the conv and BatchNorm of a single-conv candidate ``(p - 1, p]``
        before the treatment (the paper's ``reset_layers``; ``"finetune"`` only).

        Raises:
            ConfigError: ``reset`` for a candidate that is not a single-conv block, or with ``"loss_proxy"``.
        """
        if reset and (candidate.end != candidate.start + 1 or self.method != "finetune"):
            raise ConfigError(
                f"LayerMerge importance: `reset_layers` re-initialises single-conv blocks under importance='finetune' "
                f"only (got block ({candidate.start}, {candidate.end}] with importance={self.method!r})."
            )
        base = self.baseline()
        plan = single_block_plan(self.space, candidate.start, candidate.end, list(candidate.kept))
        new = self._run(plan, reset=candidate.end if reset else None)
        return _score(base, new, self.method == "finetune")

    def _run(self, plan: list[Any], reset: int | None) -> Evaluation:
        """Copy the model, re-initialise site ``reset`` (if any), apply ``plan``, treat it and evaluate it."""
        trial = copy.deepcopy(self.model)
        with _seeded(trial, self.seed + (reset or 0)):
            if reset is not None:
                site = self.space.site(reset)
                for name in (site.conv, site.bn):
                    reset_parameters = getattr(get_submodule(trial, name), "reset_parameters", None) if name else None
                    if callable(reset_parameters):
                        reset_parameters()  # nn.Conv2d: kaiming init; BatchNorm: weight 1, bias 0, fresh statistics
        apply_merge_plan_(trial, plan, space=self.space)
        with _seeded(trial, self.seed):
            if self.method == "loss_proxy":
                reestimate_batchnorm_(
                    trial, self.train_batches[: self.bn_batches], forward=self.forward_loss, num_batches=self.bn_batches
                )
            else:
                self._finetune(trial)
        result = _evaluate(trial, self.holdout_batches, self.forward_loss)
        del trial
        return result

    def _finetune(self, trial: nn.Module) -> None:
        trial.train()
        params = [p for p in trial.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        for step in range(self.steps):
            loss, _, _ = self.forward_loss(trial, self.train_batches[step % len(self.train_batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


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
    reset_layers: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """``{candidate.key: importance}``; see the module docstring for the methods and the baseline.

    Cost: one treatment for the baseline plus one per candidate that changes the network; with
    ``reset_layers``, one more per site that some other candidate covers (ResNet-20: 14 of 18 sites,
    on top of 36 candidates).
    ``model`` is not modified (each candidate is scored on a deep copy).

    Raises:
        ConfigError: For an unknown ``method``, empty batch lists, or ``reset_layers`` without
            ``method="finetune"``.
    """
    if not isinstance(reset_layers, bool):
        raise ConfigError(f"`reset_layers`={reset_layers!r} is not allowed: must be True or False.")
    if reset_layers and method != "finetune":
        raise ConfigError(
            f"`reset_layers`=True is not allowed with importance={method!r}: a re-initialised layer must be "
            "fine-tuned to be scored (use importance='finetune')."
        )
    scorer = ImportanceScorer(
        model,
        space,
        train_batches=train_batches,
        holdout_batches=holdout_batches,
        forward_loss=forward_loss,
        method=method,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        bn_batches=bn_batches,
    )
    changed = [c for c in candidates if not c.is_original(space)]
    covered = {i for c in changed for i in range(c.start + 1, c.end + 1)}
    table: dict[str, float] = {}
    todo: list[tuple[Candidate, bool]] = [(c, False) for c in changed]
    for c in candidates:
        if c.is_original(space):
            if reset_layers and c.end in covered:
                todo.append((c, True))
            else:
                table[c.key] = 1.0
    was_training = model.training
    iterator: Iterable[tuple[Candidate, bool]] = todo
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(todo, desc=f"LayerMerge importance ({method})", unit="entry")
        except ImportError:  # pragma: no cover
            pass
    try:
        if todo:
            scorer.baseline()
        for c, reset in iterator:
            table[c.key] = scorer.score(c, reset=reset)
    finally:
        model.train(was_training)
    return table
