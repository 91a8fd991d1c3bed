"""Time again, on a quiet machine, the models a benchmark run kept (``--save-models``).

Benchmarks run side by side (one process per seed or per benchmark, to use every core) time their
models while the others train, so their speed-ups are rough. With ``--save-models`` every timed model
is kept, deployed (eval, BatchNorm folded, masks permanent), under ``<out>/models/``; this command
then times each table again exactly as the protocol does — interleaved with that table's dense
model, best of rounds of medians, the protocol's threads and batches — and rewrites the latency
columns of every row in ``<out>/*.json``, with the load average and ``"retimed": true``.

    python -m benchmarks.retime --out benchmarks/out [--rounds 5] [--repeats 10]
    python -m benchmarks.run_all --render-only --out benchmarks/out --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import protocol as P


def _load(folder: Path, name: str) -> dict[str, Any]:
    return torch.load(folder / name, weights_only=False)  # our own pickles, written by save_timed_models


def retime_file(path: Path, rounds: int, repeats: int) -> int:
    """Re-time every row of one benchmark JSON that names its model files; returns how many rows."""
    data = json.loads(path.read_text())
    folder = path.parent / "models"
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    missing = 0
    for r in data.get("rows", []):
        if r.get("model_file") and r.get("dense_model_file"):
            if (folder / r["model_file"]).exists() and (folder / r["dense_model_file"]).exists():
                tables[r["dense_model_file"]].append(r)
            else:  # e.g. a row merged in from an earlier run whose models were not kept: its timing stands
                missing += 1
    if missing:
        print(f"[retime] {path.name}: {missing} row(s) left as timed (their model files are not in {folder})")
    for dense_file, rows in tables.items():
        dense = _load(folder, dense_file)
        models = [dense["model"]] + [_load(folder, r["model_file"])["model"] for r in rows]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        columns = P.latency_columns(P.time_interleaved(models, dense["example"], rounds, repeats))
        for r, cols in zip(rows, columns):
            r.update(cols, load_avg_1min=None if load is None else round(load, 2), retimed=True)
        print(f"[retime] {path.name}: {len(rows)} row(s) against {dense_file} (load {load})", flush=True)
    if tables:
        path.write_text(json.dumps(data, indent=1, default=str))
    return sum(len(rows) for rows in tables.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="the run's folder (its JSON files and models/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    done = sum(retime_file(p, args.rounds, args.repeats) for p in sorted(Path(args.out).glob("*.json")))
    if not done:
        raise SystemExit(
            f"retime: no row in {args.out}/*.json names a saved model (run the benchmarks with --save-models)"
        )
    print(f"[retime] {done} row(s) re-timed", flush=True)


if __name__ == "__main__":
    main()
