"""The baselines every method is compared with, per task and model family (one run, shared by all methods).

For each seed, from the converged dense model of that seed (:func:`benchmarks.protocol.dense_start`):

- ``dense`` — the converged dense model as it is, and fine-tuned with the recovery budget (``dense-ft``);
- ``thin`` — the same family at smaller widths, chosen so that their measured batch-64 latency is
  about 45 % and 70 % of the dense model's, trained from scratch with (a) the recovery budget only
  and (b) the dense model's pretraining budget plus the recovery budget, each without and with
  distillation from the dense model.

    python -m benchmarks.baselines [--quick] [--seeds 3] [--out benchmarks/out] [--tasks mnist/resnet20 ...]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from benchmarks import protocol as P
from benchmarks.tasks import Task

#: Task and model families whose baselines are run; each method benchmark uses one of them.
FAMILIES = {
    "mnist/resnet20": Task("mnist", "resnet20", "acc"),
    "mnist/vgg": Task("mnist", "vgg", "acc"),
    "shakespeare/transformer": Task("shakespeare", "transformer", "ppl"),
}
LATENCY_TARGETS = (0.45, 0.7)
WIDTHS = {"mnist": [0.375, 0.5, 0.625, 0.75, 0.875], "shakespeare": [0.5, 0.625, 0.75, 0.875]}


def thin_widths(task: Task, settings: P.Settings) -> dict[float, float]:
    """For each latency target, the candidate width whose measured b64 latency ratio is closest to it.

    The choice is made once per run folder and kept in ``<out>/cache/thin_widths_<task>.json``: the
    processes of one run (one per seed with ``run_all --jobs``) all train the same widths, even when
    two candidates time within noise of a target.
    """
    path = settings.out / "cache" / f"thin_widths_{task.name}_{task.model}{'_quick' if settings.quick else ''}.json"
    if path.exists():
        return {float(k): float(v) for k, v in json.loads(path.read_text()).items()}
    chosen = measure_thin_widths(task, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:  # the first process of the run to finish measuring decides
            json.dump(chosen, f)
    except FileExistsError:
        return {float(k): float(v) for k, v in json.loads(path.read_text()).items()}
    return chosen


def measure_thin_widths(task: Task, settings: P.Settings) -> dict[float, float]:
    """Time every candidate width against the dense model; the closest width to each latency target."""
    dense = P.build(task, settings)
    candidates = [P.build(task, settings, w) for w in WIDTHS[task.name]]
    rows: list[tuple[dict[str, Any], torch.nn.Module]] = [({}, m) for m in candidates]
    P.measure_rows(task, settings, rows, dense)
    ratios = [1.0 / r["speedup_b64"] for r, _ in rows]
    chosen = {}
    for target in LATENCY_TARGETS:
        i = min(range(len(ratios)), key=lambda k: abs(ratios[k] - target))
        chosen[target] = WIDTHS[task.name][i]
    print(f"[baselines] {task.label}: latency ratio by width {dict(zip(WIDTHS[task.name], ratios))} -> {chosen}")
    return chosen


def run_family(task: Task, settings: P.Settings, thin: list[float] | None = None) -> list[dict[str, Any]]:
    """The dense rows and the thin networks of one family; ``thin``: these widths instead of the measured choice."""
    rows: list[dict[str, Any]] = []
    widths: list[tuple[float | None, float]]  # (latency target, width)
    if settings.skip_scratch:
        widths = []
    elif thin:
        widths = [(None, w) for w in thin]
    else:
        widths = list(thin_widths(task, settings).items())
    for seed in settings.seeds:
        start = P.dense_start(task, settings, seed)
        print(f"[baselines] {task.label} seed {seed}: dense {task.metric} {start.metric:.3f} "
              f"(stopped after {start.steps_trained} steps, cached={start.cached})", flush=True)  # fmt: skip
        dense = start.load(task, settings)
        timed: list[tuple[dict[str, Any], torch.nn.Module]] = []
        r = P.row(
            task, settings, "dense", "converged start", seed, dense, start.wall_s, steps_trained=start.steps_trained
        )
        timed.append((r, dense))
        tuned = start.load(task, settings)
        wall = P.recover(task, settings, tuned, seed)
        timed.append((P.row(task, settings, "dense", "dense fine-tuned (recovery budget)", seed, tuned, wall), tuned))
        for target, width in widths:
            for full in (False, True):
                for kd in (False, True):
                    model = P.build(task, settings, width)
                    wall = P.scratch(task, settings, model, seed, start, full=full, kd=kd)
                    budget = "pretrain + recovery budget" if full else "recovery budget"
                    variant = f"thin w{width:g} from scratch, {budget}{', distilled' if kd else ''}"
                    extra = {"width": width, "latency_target": target, "full_budget": full, "distilled": kd}
                    timed.append((P.row(task, settings, "thin", variant, seed, model, wall, **extra), model))
        P.measure_rows(task, settings, timed, dense)
        rows += [r for r, _ in timed]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="*", choices=sorted(FAMILIES), default=None, help="only these families")
    parser.add_argument(
        "--thin-widths",
        nargs="+",
        type=float,
        default=None,
        help="train the thin networks at these widths (0, 1) instead of the two closest to the latency targets",
    )
    P.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.thin_widths and not all(0 < w < 1 for w in args.thin_widths):
        parser.error(f"--thin-widths {args.thin_widths}: every width must be in (0, 1)")
    settings = P.Settings.from_namespace(args)
    for name in args.tasks or FAMILIES:
        task = FAMILIES[name]
        clock = P.timer()
        rows = run_family(task, settings, args.thin_widths)
        config = {"budget": settings.budget(task), "latency_targets": LATENCY_TARGETS, "wall_s": round(clock(), 1)}
        config["thin_widths"] = args.thin_widths or "measured"
        P.write(f"baselines_{name.replace('/', '_')}", settings, rows, config)


if __name__ == "__main__":
    main()
