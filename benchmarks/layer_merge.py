"""LayerMerge (Kim, El Halabi, Ji, Song, ICML 2024) under the benchmark protocol (``benchmarks/PROTOCOL.md``).

Task: MNIST-5k, ResNet-20 (``mnist/resnet20``). For each seed, from the converged dense model:

- ``LayerMerge-X%`` for each latency budget X (the paper's: a fraction of the latency table's sum over
  the convs) and ``LayerMerge-X%-network`` (``latency_target="network"``: a fraction of the whole merged
  network's measured latency, the budget a user means): plan at the start of the recovery fit (latency table
  measured on this CPU, importance table, DP), fine-tune the planned network for the recovery
  budget, merge exactly at fit end; every budget also with distillation from the dense model, and the
  main one with "every block worth 1" (``importance="uniform"``: the DP keeps as many blocks as the budget
  allows, no data), which shows whether the measured importance beats a data-free plan at equal budget;
- the merged architecture trained from scratch with the dense model's pretraining + recovery budget
  (the plan applied to a fresh network, fine-tuned, then merged);
- global magnitude pruning to the same parameter count, with the recovery budget.

The dense model, its fine-tuned version and the thin networks at matched latency come from
``python -m benchmarks.baselines`` (same seeds, same converged starts); ``run_all`` puts them side by side.

    python -m benchmarks.layer_merge [--quick] [--seeds 3] [--out benchmarks/out]
        [--points LayerMerge-70% LayerMerge-70%-network]
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import protocol as P
from benchmarks.tasks import Task
from lit_compress.callbacks import LayerMerge
from lit_compress.callbacks.layer_merge import ImportanceMethod, LatencyTarget
from lit_compress.surgery import applied_events

TASK = Task("mnist", "resnet20", "acc")
BUDGETS = (0.7, 0.5)
#: Budgets also run with ``latency_target="network"`` (a fraction of the whole merged network's latency).
NETWORK_BUDGETS = (0.7,)
MAIN = 0.5
IMPORTANCE: ImportanceMethod = "loss_proxy"  # the importance of every LayerMerge row but the uniform one


def budget_label(budget: float, target: LatencyTarget = "convs") -> str:
    """The operating point's label (``--points``): ``LayerMerge-50%``, ``LayerMerge-70%-network``."""
    return f"LayerMerge-{budget:.0%}" + ("-network" if target == "network" else "")


def operating_points() -> list[tuple[str, tuple[float, LatencyTarget]]]:
    """``(label, (budget, latency_target))`` of every operating point, the paper's conv budgets first."""
    points: list[tuple[float, LatencyTarget]] = [(b, "convs") for b in BUDGETS]
    points += [(b, "network") for b in NETWORK_BUDGETS]
    return [(budget_label(b, t), (b, t)) for b, t in points]


def layer_merge(
    settings: P.Settings,
    budget: float,
    importance: ImportanceMethod = IMPORTANCE,
    latency_target: LatencyTarget = "convs",
    **kwargs: Any,
) -> LayerMerge:
    return LayerMerge(
        budget=budget,
        importance=importance,
        latency_target=latency_target,
        latency_batch_size=64,
        latency_cache=str(settings.out / "cache" / "layermerge_latency.json"),
        progress=False,
        **kwargs,
    )


def run(settings: P.Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed in settings.seeds:
        start = P.dense_start(TASK, settings, seed)
        dense = start.load(TASK, settings)
        timed: list[tuple[dict[str, Any], torch.nn.Module]] = []
        for _, _, (budget, target) in P.chosen_points(settings, operating_points()):
            main = budget == MAIN and target == "convs"
            variants: list[tuple[bool, ImportanceMethod]] = [(False, IMPORTANCE), (True, IMPORTANCE)]
            if main:
                variants.append((False, "uniform"))
            for kd, importance in variants:
                plan = settings.out / "cache" / f"layermerge_plan_s{seed}_b{budget}.json"
                if target == "network":
                    plan = plan.with_name(f"{plan.stem}_network.json")
                if importance != IMPORTANCE:
                    plan = plan.with_name(f"{plan.stem}_{importance}.json")
                cb = layer_merge(settings, budget, importance, target, save_plan=str(plan))
                variant = budget_label(budget, target)
                if importance != IMPORTANCE:
                    variant += f", {importance} importance"
                r, model = P.compressed(TASK, settings, start, seed, "LayerMerge", variant, [cb], kd)
                summary = cb.summary
                r.update(
                    budget=budget,
                    importance=importance,
                    latency_target=target,
                    planned_fraction=summary.get("planned_fraction"),
                    network_fraction=summary.get("network_fraction"),
                    blocks=len(summary.get("kernels", [])),
                )
                timed.append((r, model))
                if kd or importance != IMPORTANCE or settings.method_only:
                    continue
                params = r["params"]
                timed.append(
                    P.magnitude_at(TASK, settings, start, seed, params, f"{budget_label(budget, target)} params")
                )
                if main and not settings.skip_scratch:
                    timed.append(scratch_merged(settings, start, seed, plan, budget))
        P.measure_rows(TASK, settings, timed, dense)
        for r, _ in timed:
            r["label"] = f"{r['variant']} ({r['params'] / 1000:.0f}k params, {r['speedup_b64']:.2f}x b64)"
        rows += [r for r, _ in timed]
    return rows


def scratch_merged(
    settings: P.Settings, start: P.DenseStart, seed: int, plan: Any, budget: float
) -> tuple[dict[str, Any], torch.nn.Module]:
    """The merged architecture from scratch: the same plan applied to a freshly initialised network at
    the start of a fit with the dense model's pretraining + recovery budget, then merged."""
    model = P.build(TASK, settings)
    cb = layer_merge(settings, budget, load_plan=str(plan))
    wall = P.recover(TASK, settings, model, seed, [cb], budget=P.training_budget(TASK, settings, start, full=True))
    assert [e["op"] for e in applied_events(model)] == ["layer_merge_plan", "layer_merge_final"]
    variant = f"LayerMerge-{budget:.0%} architecture from scratch, pretrain + recovery budget"
    return P.row(TASK, settings, "LayerMerge", variant, seed, model, wall, from_scratch=True), model


def main(argv: list[str] | None = None) -> None:
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_namespace(args)
    clock = P.timer()
    P.select([TASK], args.tasks)
    rows = run(settings)
    config = {
        "task": TASK.label,
        "budget": settings.budget(TASK),
        "budgets": BUDGETS,
        "network_budgets": NETWORK_BUDGETS,
        "main": MAIN,
    }
    P.write("layer_merge", settings, rows, {**config, "wall_s": round(clock(), 1)})


if __name__ == "__main__":
    main()
