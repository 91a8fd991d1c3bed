"""ALDS (Liebenwein, Maalouf et al., NeurIPS 2021) under the benchmark protocol (``benchmarks/PROTOCOL.md``).

Tasks: MNIST-5k ResNet-20 (``mnist/resnet20``) and the Shakespeare character transformer
(``shakespeare/transformer``). For each seed, from the converged dense model:

- ALDS at each operating point, the decomposition at the start of the recovery fit (LR rewinding
  off: the recovery fit is its own schedule, re-warmed to the training learning rate); the main
  point also with distillation from the dense model; on MNIST also the latency budget
  (``budget="latency"``, 0.7 and 0.85 of the targets' dense latency, table timed at batch 64 with
  the protocol's threads on the machine that trains); a point the callback refuses (a ratio below
  what the fastest measured decompositions reach here) is recorded under ``config["refused"]``;
- uniform-rank SVD (``ALDS(method="uniform")``) and global magnitude pruning at the same parameter count;
- the ALDS architecture (the same decomposition) trained from scratch with the pretraining + recovery budget.

Plus the allocator's wall time on a torchvision ResNet-18 (random weights, keep 0.3, 2 threads), and
for the latency budget the table build (timed, then cached) and the allocation separately.

    python -m benchmarks.alds [--quick] [--seeds 3] [--out benchmarks/out]
    python -m benchmarks.alds --latency-floor [--out benchmarks/out]   # the fastest any decomposition gets here
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks import protocol as P
from benchmarks.tasks import Task
from lit_compress.callbacks import ALDS
from lit_compress.errors import ConfigError
from lit_compress.surgery.alds.allocate import allocate

TASKS = (Task("mnist", "resnet20", "acc"), Task("shakespeare", "transformer", "ppl"))
#: (label, ALDS keyword arguments); the first is the main point (also run with distillation).
POINTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mnist": [
        ("ALDS keep 50 %", {"keep_ratio": 0.5}),
        ("ALDS keep 25 %", {"keep_ratio": 0.25}),
        ("ALDS latency 70 %", {"budget": "latency", "latency_ratio": 0.7, "latency_batch_size": 64}),
        ("ALDS latency 85 %", {"budget": "latency", "latency_ratio": 0.85, "latency_batch_size": 64}),
        ("ALDS keep 50 %, latency guard", {"keep_ratio": 0.5, "latency_guard": True, "latency_batch_size": 64}),
    ],
    "shakespeare": [("ALDS keep 50 %", {"keep_ratio": 0.5})],
}
ALDS_DEFAULTS: dict[str, Any] = {"at_epoch": 0, "rewind_lr": False, "progress": False}


def alds(task: Task, **kwargs: Any) -> ALDS:
    options = dict(ALDS_DEFAULTS)
    if task.name == "shakespeare":  # the transformer's Linear layers (embeddings and the head stay dense)
        options["targets"] = ["re:.*blocks.*"]
    if kwargs.get("budget") == "latency" or kwargs.get("latency_guard"):
        options["latency_threads"] = P.LATENCY_THREADS
    options.update(kwargs)
    return ALDS(**options)


#: Operating points the callback refused before training (e.g. a latency ratio below what the
#: fastest measured decompositions reach on this machine): ``{task, seed, point, reason}``.
REFUSED: list[dict[str, Any]] = []


def run(task: Task, settings: P.Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed in settings.seeds:
        start = P.dense_start(task, settings, seed)
        dense = start.load(task, settings)
        timed: list[tuple[dict[str, Any], nn.Module]] = []
        for main, label, kwargs in P.chosen_points(settings, POINTS[task.name]):
            for kd in (False, True) if main else (False,):
                cb = alds(task, **kwargs)
                try:
                    r, model = P.compressed(task, settings, start, seed, "ALDS", label, [cb], kd, **kwargs)
                except ConfigError as refusal:  # recorded, not a crash: the refusal is the finding
                    print(f"[alds] {task.label} seed {seed}: {label} refused: {refusal}", flush=True)
                    REFUSED.append({"task": task.label, "seed": seed, "point": label, "reason": str(refusal)})
                    break
                r["max_error"] = cb.allocations[-1]["max_error"] if cb.allocations else None
                if cb.allocations and cb.allocations[-1].get("budget") == "latency":
                    a = cb.allocations[-1]
                    r["table_latency_ratio"] = round(a["latency_ms_after"] / a["latency_ms_dense"], 4)
                    r["latency_table_s"] = a.get("latency_table_s")
                timed.append((r, model))
                if kd or settings.method_only:
                    continue
                keep = r["params"] / P.count_parameters(dense)
                svd = alds(task, keep_ratio=min(1.0, keep), method="uniform")
                svd_row = P.compressed(task, settings, start, seed, "uniform SVD", f"uniform SVD to {label}", [svd])
                svd_row[0]["max_error"] = svd.allocations[-1]["max_error"] if svd.allocations else None  # also exact
                timed.append(svd_row)
                timed.append(P.magnitude_at(task, settings, start, seed, r["params"], f"{label} params"))
                if main and not settings.skip_scratch:
                    fresh = P.own_architecture(task, settings, model)
                    wall = P.recover(task, settings, fresh, seed, budget=P.training_budget(task, settings, start, True))
                    variant = f"{label} architecture from scratch, pretrain + recovery budget"
                    timed.append((P.row(task, settings, "ALDS", variant, seed, fresh, wall, from_scratch=True), fresh))
        P.measure_rows(task, settings, timed, dense)
        rows += [r for r, _ in timed]
    return rows


def allocator_time(repeats: int) -> list[dict[str, Any]]:
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.resnet18()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rows = []
    for i in range(repeats):
        t = time.perf_counter()
        alloc = allocate(model, names, 0.3, progress=False)
        rows.append(
            {
                "task": "torchvision ResNet-18 (random init, 11.7M params), allocation only",
                "method": "ALDS allocator",
                "variant": f"keep 0.3, run {i}",
                "wall_s": round(time.perf_counter() - t, 2),
                "decomposed": len(alloc.plan),
                "achieved_keep": alloc.achieved_ratio,
                "max_error": alloc.max_error,
            }
        )
    return rows


def latency_allocator_time(cache: str) -> list[dict[str, Any]]:
    """ResNet-18, ``budget="latency"`` at 0.7: the table build (batch 1, 2 threads; cached) and the allocation."""
    import torchvision

    from lit_compress.measure.alds_latency import alds_latency_table
    from lit_compress.surgery.alds.latency_budget import allocate_latency

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rows = []
    for run in ("measured", "cached"):
        t = time.perf_counter()
        table, info = alds_latency_table(
            model, names, torch.randn(1, 3, 224, 224), num_threads=2, cache=cache, progress=False
        )
        table_s = time.perf_counter() - t
        row = {
            "task": "torchvision ResNet-18 (random init, 11.7M params), allocation only",
            "method": "ALDS allocator, budget='latency'",
            "variant": f"latency 0.7, table {run}",
            "table_s": round(table_s, 2),
            "table_configs_timed": info["measured"],
        }
        rows.append(row)
        t = time.perf_counter()
        try:
            alloc = allocate_latency(model, names, 0.7, table, progress=False)
        except ConfigError as refused:  # this machine's table cannot reach 0.7: the timing of the table stands
            print(f"[alds] ResNet-18 allocation timing, table {run}: refused: {refused}", flush=True)
            row["refused"] = str(refused)
            continue
        row.update(
            wall_s=round(time.perf_counter() - t, 2),
            decomposed=len(alloc.plan),
            achieved_keep=alloc.achieved_ratio,
            table_latency_ratio=(alloc.latency_ms_after or 0.0) / (alloc.latency_ms_dense or 1.0),
            max_error=alloc.max_error,
        )
    return rows


def latency_floor(settings: P.Settings) -> list[dict[str, Any]]:
    """How fast can a decomposed ResNet-20 (MNIST input, batch 64, the protocol's threads) be on this machine?

    Every target layer is timed densely and decomposed at ``k`` in 1, 2, 4, 8, 16 and ranks from 1 up
    (wider than the callback's defaults). Two networks are then built and timed interleaved with the
    dense one: each layer at its fastest measured decomposition (dense where none is faster), and every
    layer at ``k = 1``, rank 1. No accuracy can survive either; they bound the speed-up any ALDS plan
    (or any SVD of these layers) can reach here, whatever its error.
    """
    from lit_compress.measure.alds_latency import alds_latency_table
    from lit_compress.surgery.alds.low_rank import low_rank_decompose_

    torch.manual_seed(0)
    task = TASKS[0]
    dense = P.build(task, settings).eval()
    names = [n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = P.example(task, settings)
    table, info = alds_latency_table(
        dense, names, x, groups=(1, 2, 4, 8, 16), min_rank=1, batch_size=64, num_threads=P.LATENCY_THREADS,
        rounds=settings.latency_rounds, repeats=settings.latency_repeats, progress=False,
    )  # fmt: skip
    fastest: dict[str, Any] = {}
    for name, lat in table.items():
        options = [(ms, k, j) for k, pts in lat.points.items() for j, ms in pts]
        if options and min(options)[0] < lat.dense:
            _, k, j = min(options)
            fastest[name] = {"groups": k, "rank": j}
    table_dense = sum(lat.dense for lat in table.values())
    table_fastest = sum(lat.time(**_kj(fastest[n])) if n in fastest else lat.dense for n, lat in table.items())
    nets = {"fastest decomposition per layer": fastest, "k 1, rank 1 everywhere": dict.fromkeys(names)}
    rows = []
    for variant, plan in nets.items():
        model = P.copy_model(dense)
        low_rank_decompose_(model, {n: c or {"groups": 1, "rank": 1} for n, c in plan.items()})
        r = {"task": task.label, "method": "ALDS latency floor", "variant": variant}  # no seed: not a table row
        r["decomposed"] = len(plan)
        if variant.startswith("fastest"):
            r["table_latency_ratio"] = round(table_fastest / table_dense, 4)
            r["plan"] = {n: [c["groups"], c["rank"]] for n, c in plan.items()}
        P.measure_rows(task, settings, [(r, model)], dense)
        rows.append(r)
        print(f"[alds] latency floor, {variant}: b64 speed-up {r['speedup_b64']:.3f}x", flush=True)
    rows[0]["table_s"] = round(float(info["seconds"]), 1)
    return rows


def _kj(choice: dict[str, int]) -> dict[str, int]:
    return {"k": choice["groups"], "j": choice["rank"]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--latency-floor" in argv:
        settings = P.Settings.from_namespace(P.parse_args(__doc__, [a for a in argv if a != "--latency-floor"]))
        P.write("alds_latency_floor", settings, latency_floor(settings), {"task": TASKS[0].label})
        return
    args = P.parse_args(__doc__, argv)
    settings = P.Settings.from_namespace(args)
    clock = P.timer()
    tasks = P.select(TASKS, args.tasks)
    rows = [r for task in tasks for r in run(task, settings)]
    rows += allocator_time(1 if settings.quick else 3)
    if not settings.quick:
        rows += latency_allocator_time(str(settings.out / "alds_latency_resnet18.json"))
    config = {"tasks": [t.label for t in tasks], "budgets": {t.label: settings.budget(t) for t in tasks}}
    config["points"] = {k: [label for label, _ in v] for k, v in POINTS.items()}
    config["refused"] = REFUSED
    P.write("alds", settings, rows, {**config, "wall_s": round(clock(), 1)})


if __name__ == "__main__":
    main()
