"""Layer Fusion (O'Neill, Ver Steeg, Galstyan 2020) under the benchmark protocol (``benchmarks/PROTOCOL.md``).

Tasks: MNIST-5k ResNet-20 (``mnist/resnet20``) and the Shakespeare character transformer
(``shakespeare/transformer``). For each seed, from the converged dense model:

- Layer Fusion at each operating point: the fusion steps inside the recovery fit (the first at its
  start, then one per epoch / every few hundred steps), the rest of the budget to recover; the main
  point also with distillation from the dense model;
- global magnitude pruning to the same number of (unique) parameters, with the recovery budget;
- the tied architecture (the same ties on a fresh network) trained from scratch with the
  pretraining + recovery budget;
- one-shot fusion (no retraining) at each ``layers_per_group`` point, with and without alignment.

Points use the paper's budget unit (``budget="layers_per_group"``: ⌊p·n⌋ layers of each group of
``n`` same-role, same-shape layers) and, for comparison, the share of parameters; every row gives
the achieved CR and unique-parameter reduction (labels say the p asked for, not a CR).
Tying shrinks storage, not time: every layer still runs. Compare it on the parameter axis.

    python -m benchmarks.layer_fusion [--quick] [--seeds 3] [--out benchmarks/out]
    python -m benchmarks.layer_fusion --llm-step [wasserstein] [--align]   # one step on a 135 M Llama shape
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks import protocol as P
from benchmarks.tasks import Task
from lit_compress.callbacks import LayerFusion

TASKS = (Task("mnist", "resnet20", "acc"), Task("shakespeare", "transformer", "ppl"))
#: (label, LayerFusion keyword arguments); the first is the main point (also run with distillation).
PER_GROUP = {"budget": "layers_per_group"}
POINTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mnist": [
        ("Layer Fusion p 0.7 per group", {"fraction": 0.7, **PER_GROUP}),
        ("Layer Fusion p 0.7 per group, aligned", {"fraction": 0.7, "align": True, **PER_GROUP}),
        ("Layer Fusion p 0.5 per group", {"fraction": 0.5, **PER_GROUP}),
        ("Layer Fusion 50 % of parameters", {"fraction": 0.5, "budget": "parameters"}),
    ],
    "shakespeare": [
        ("Layer Fusion p 0.8 per group", {"fraction": 0.8, **PER_GROUP}),
        ("Layer Fusion p 0.8 per group, aligned", {"fraction": 0.8, "align": True, **PER_GROUP}),
        ("Layer Fusion 50 % of parameters", {"fraction": 0.5, "budget": "parameters", "include_norms": True}),
    ],
}
INCREMENTS = 4


def fusion(task: Task, settings: P.Settings, **kwargs: Any) -> LayerFusion:
    schedule: dict[str, Any]
    if task.name == "mnist":
        schedule = {"at_epoch": 0, "every_n_epochs": 1}
    else:
        schedule = {"at_step": 1, "every_n_steps": max(1, settings.text.recovery_steps // (2 * INCREMENTS))}
    return LayerFusion(increments=INCREMENTS, measure="wasserstein", policy="mean", **schedule, **kwargs)


def run(task: Task, settings: P.Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed in settings.seeds:
        start = P.dense_start(task, settings, seed)
        dense = start.load(task, settings)
        timed: list[tuple[dict[str, Any], nn.Module]] = []
        for main, label, kwargs in P.chosen_points(settings, POINTS[task.name]):
            for kd in (False, True) if main else (False,):
                cb = fusion(task, settings, **kwargs)
                r, model = P.compressed(task, settings, start, seed, "Layer Fusion", label, [cb], kd, **kwargs)
                r["achieved_cr"] = round(P.count_parameters(dense) / r["params"], 3)
                r["unique_param_reduction"] = round(cb.achieved_reduction, 4)
                timed.append((r, model))
                if kd or settings.method_only:
                    continue
                timed.append(P.magnitude_at(task, settings, start, seed, r["params"], f"{label} params"))
                if main and not settings.skip_scratch:
                    fresh = P.own_architecture(task, settings, model)
                    wall = P.recover(task, settings, fresh, seed, budget=P.training_budget(task, settings, start, True))
                    variant = f"{label} tied architecture from scratch, pretrain + recovery budget"
                    timed.append((P.row(task, settings, "Layer Fusion", variant, seed, fresh, wall), fresh))
            if kwargs.get("budget") == "layers_per_group" and not kwargs.get("align"):
                for align in (False, True):
                    timed += one_shot(task, settings, start, seed, label, kwargs["fraction"], align, dense)
        P.measure_rows(task, settings, timed, dense)
        rows += [r for r, _ in timed]
    return rows


#: Training batches the one-shot rows re-estimate BatchNorm statistics on (the callback's default after an event).
ONE_SHOT_BN_BATCHES = 20


def one_shot(
    task: Task, settings: P.Settings, start: Any, seed: int, label: str, p: float, align: bool, dense: nn.Module
) -> list[tuple[dict[str, Any], nn.Module]]:
    """Fuse ⌊p·n⌋ layers of every group at once from the converged start and score it without training.

    A model with BatchNorm is also scored after its statistics are re-estimated on
    ``ONE_SHOT_BN_BATCHES`` training batches (forward passes only, as the callback does after each
    event): tied weights change every activation's scale, so the old statistics alone say little.
    """
    from lit_compress.surgery.bn_stats import has_batchnorm, reestimate_batchnorm_
    from lit_compress.surgery.fusion import candidate_groups, fuse_layers_, fusion_units, plan_group_fusions

    model = start.load(task, settings)
    clock = P.timer()
    units = fusion_units(model)
    counts = {g: int(p * len(m)) for g, m in candidate_groups(units).items()}
    fuse_layers_(model, plan_group_fusions(model, units, "wasserstein", counts, "mean"), "mean", align=align)
    aligned = ", aligned" if align else ""
    r = P.row(task, settings, "Layer Fusion", f"{label}, one shot (no retraining){aligned}", seed, model, clock())
    r["achieved_cr"] = round(P.count_parameters(dense) / r["params"], 3)
    rows = [(r, model)]
    if has_batchnorm(model):
        recalibrated = copy.deepcopy(model)
        torch.manual_seed(seed)
        train, _ = P.loaders(task, settings)
        used = reestimate_batchnorm_(
            recalibrated, (batch[0] for batch in train), forward=lambda m, x: m(x), num_batches=ONE_SHOT_BN_BATCHES
        )
        variant = f"{label}, one shot + BatchNorm statistics re-estimated ({used} batches){aligned}"
        rb = P.row(task, settings, "Layer Fusion", variant, seed, recalibrated, clock())
        rb["achieved_cr"] = r["achieved_cr"]
        rows.append((rb, recalibrated))
    return rows


def llm_step(measure: str = "wasserstein", p: float = 0.5, align: bool = False) -> dict[str, Any]:
    """Time one fusion step (plan + tie, ⌊p·n⌋ layers of every group at once) on a SmolLM-135M-shaped
    Llama built from config (random weights: the time does not depend on them)."""
    import os

    import transformers

    from lit_compress.measure import count_parameters
    from lit_compress.surgery.fusion import candidate_groups, fuse_layers_, fusion_units, plan_group_fusions

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    base = count_parameters(model)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    units = fusion_units(model)
    counts = {g: int(p * len(m)) for g, m in candidate_groups(units).items()}
    plan = plan_group_fusions(model, units, measure, counts, "mean")
    planned = time.perf_counter()
    fuse_layers_(model, plan, "mean", align=align)
    done = time.perf_counter()
    return {
        "params": base,
        "measure": measure,
        "align": align,
        "fusions": len(plan),
        "removed": base - count_parameters(model),
        "plan_s": round(planned - start, 1),
        "tie_s": round(done - planned, 1),
        "step_s": round(done - start, 1),
        "threads": torch.get_num_threads(),
        "load_1min": round(load, 2),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--llm-step":
        measures = [a for a in argv[1:] if not a.startswith("--")]
        print(llm_step(measures[0] if measures else "wasserstein", align="--align" in argv))
        return
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_namespace(args)
    clock = P.timer()
    tasks = P.select(TASKS, args.tasks)
    rows = [r for task in tasks for r in run(task, settings)]
    config: dict[str, Any] = {"tasks": [t.label for t in tasks]}
    config["budgets"] = {t.label: settings.budget(t) for t in tasks}
    config["points"] = {k: [label for label, _ in v] for k, v in POINTS.items()}
    config["increments"] = INCREMENTS
    P.write("layer_fusion", settings, rows, {**config, "wall_s": round(clock(), 1)})


if __name__ == "__main__":
    main()
