"""Layer Fusion (O'Neill, Ver Steeg, Galstyan 2020) under the benchmark protocol (``benchmarks/PROTOCOL.md``).

Tasks: MNIST-5k ResNet-20 (``mnist/resnet20``) and the Shakespeare character transformer
(``shakespeare/transformer``). For each seed, from the converged dense model:

- Layer Fusion at each operating point: the fusion steps inside the recovery fit (the first at its
  start, then one per epoch / every few hundred steps), the rest of the budget to recover; the main
  point also with distillation from the dense model;
- global magnitude pruning to the same number of (unique) parameters, with the recovery budget;
- the tied architecture (the same ties on a fresh network) trained from scratch with the
  pretraining + recovery budget.

Tying shrinks storage, not time: every layer still runs. Compare it on the parameter axis.

    python -m benchmarks.layer_fusion [--quick] [--seeds 3] [--out benchmarks/out]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmarks import protocol as P
from benchmarks.tasks import Task
from lit_compress.callbacks import LayerFusion

TASKS = (Task("mnist", "resnet20", "acc"), Task("shakespeare", "transformer", "ppl"))
#: (label, LayerFusion keyword arguments); the first is the main point (also run with distillation).
POINTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mnist": [("Layer Fusion p 0.5", {"fraction": 0.5}), ("Layer Fusion p 0.7", {"fraction": 0.7})],
    "shakespeare": [("Layer Fusion p 0.5", {"fraction": 0.5, "include_norms": True})],
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
        for i, (label, kwargs) in enumerate(POINTS[task.name]):
            for kd in (False, True) if i == 0 else (False,):
                cb = fusion(task, settings, **kwargs)
                r, model = P.compressed(task, settings, start, seed, "Layer Fusion", label, [cb], kd, **kwargs)
                r["achieved_cr"] = round(P.count_parameters(dense) / r["params"], 3)
                timed.append((r, model))
                if kd:
                    continue
                timed.append(P.magnitude_at(task, settings, start, seed, r["params"], f"{label} params"))
                if i == 0:
                    fresh = P.own_architecture(task, settings, model)
                    wall = P.recover(task, settings, fresh, seed, budget=P.training_budget(task, settings, start, True))
                    variant = f"{label} tied architecture from scratch, pretrain + recovery budget"
                    timed.append((P.row(task, settings, "Layer Fusion", variant, seed, fresh, wall), fresh))
        P.measure_rows(task, settings, timed, dense)
        rows += [r for r, _ in timed]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_args(args.out, args.seeds, args.quick)
    clock = P.timer()
    tasks = P.select(TASKS, args.tasks)
    rows = [r for task in tasks for r in run(task, settings)]
    config = {"tasks": [t.label for t in tasks], "budgets": {t.label: settings.budget(t) for t in tasks}}
    config["points"] = {k: [label for label, _ in v] for k, v in POINTS.items()}
    config["increments"] = INCREMENTS
    P.write("layer_fusion", settings, rows, {**config, "wall_s": round(clock(), 1)})


if __name__ == "__main__":
    main()
