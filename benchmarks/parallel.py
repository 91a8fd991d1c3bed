"""Run the benchmarks as one process per (benchmark, seed), ``jobs`` at a time, then join and re-time.

``python -m benchmarks.run_all --jobs N`` uses it. The steps:

1. the converged dense starts, one process per seed (``benchmarks.starts``), so that no two
   processes ever train the same start;
2. every benchmark × seed in its own process (``--seed-list s --save-models``, one training thread,
   its own folder ``<out>/parts/<name>_s<seed>/`` whose ``cache`` is a link to ``<out>/cache``);
3. the parts of each benchmark joined into ``<out>/<name>.json`` (:mod:`benchmarks.merge_runs`) and
   their kept models gathered in ``<out>/models/``;
4. every table timed again on the now quiet machine (:mod:`benchmarks.retime`), so the speed-ups
   are as good as those of a sequential run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import merge_runs, retime

#: The task families whose starts are trained first (every family a benchmark uses).
START_FAMILIES = ("mnist/resnet20", "mnist/vgg", "shakespeare/transformer")


def run_pool(commands: Sequence[tuple[str, list[str]]], logs: Path, jobs: int, cwd: Path) -> dict[str, dict[str, Any]]:
    """Run ``(label, argv)`` commands, ``jobs`` at once, one training thread each; logs in ``logs/<label>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, done = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            label, argv = pending.pop(0)
            log = open(logs / f"{label}.log", "w")  # noqa: SIM115 (closed when the process ends)
            print(f"[run_all] {label}: {' '.join(argv[1:])}", flush=True)
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[label] = (proc, log, time.perf_counter())
        time.sleep(0.5)
        for label, (proc, log, start) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                wall = time.perf_counter() - start
                done[label] = {"exit_code": proc.returncode, "wall_s": round(wall, 1), "log": log.name}
                print(f"[run_all] {label}: exit {proc.returncode} after {wall / 60:.1f} min", flush=True)
                del running[label]
    return done


def run_parallel(
    benchmarks: dict[str, str],
    out: Path,
    quick: bool,
    seeds: int,
    jobs: int,
    cwd: Path,
    start_families: Sequence[str] = START_FAMILIES,
    extra_args: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Steps 1–4 of the module for ``{name: module}``; returns ``{name: {exit_code, wall_s, log, parts}}``.

    ``extra_args``: more arguments per benchmark name (e.g. ``--tasks``).
    """
    seed_list = [0] if quick else list(range(seeds))
    flags = ["--quick"] if quick else []
    if start_families:
        starts = [
            (f"starts_s{s}", [sys.executable, "-m", "benchmarks.starts", "--out", str(out), "--seed-list", str(s),
                              "--tasks", *start_families, *flags])
            for s in seed_list
        ]  # fmt: skip
        failed = [label for label, r in run_pool(starts, out / "logs", jobs, cwd).items() if r["exit_code"]]
        if failed:
            raise SystemExit(f"run_all: the dense starts failed ({', '.join(failed)}; see {out / 'logs'})")
    commands = []
    for name, module in benchmarks.items():
        for s in seed_list:
            part = out / "parts" / f"{name}_s{s}"
            part.mkdir(parents=True, exist_ok=True)
            if not (part / "cache").exists():
                (part / "cache").symlink_to((out / "cache").resolve(), target_is_directory=True)
            argv = [sys.executable, "-m", module, "--out", str(part), "--seed-list", str(s), "--save-models", *flags]
            argv += (extra_args or {}).get(name, [])
            commands.append((f"{name}_s{s}", argv))
    parts = run_pool(commands, out / "logs", jobs, cwd)
    runs = {}
    for name in benchmarks:
        mine = {label: r for label, r in parts.items() if label.rsplit("_s", 1)[0] == name}
        folders = [out / "parts" / label for label, r in mine.items() if r["exit_code"] == 0]
        if folders:
            merge_runs.main(["--out", str(out), *map(str, folders)])
            (out / "models").mkdir(exist_ok=True)
            for folder in folders:
                for f in (folder / "models").glob("*.pt"):
                    shutil.copy2(f, out / "models" / f.name)
        runs[name] = {
            "name": name,
            "exit_code": max((r["exit_code"] for r in mine.values()), default=1),
            "wall_s": round(sum(r["wall_s"] for r in mine.values()), 1),  # summed over the parts
            "log": str(out / "logs"),
            "quick": quick,
            "parts": len(mine),
        }
    try:
        retime.main(["--out", str(out)])
    except SystemExit as nothing:  # every part failed: nothing to time; the failures are reported by run_all
        print(f"[run_all] {nothing}", flush=True)
    return runs
