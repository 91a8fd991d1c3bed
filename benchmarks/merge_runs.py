"""Combine benchmark runs made in parallel (e.g. one process per seed, each with its own ``--out``).

Every ``<dir>/<name>.json`` of the given folders is merged into ``<out>/<name>.json``: rows concatenated,
seeds joined, each part's machine, versions and wall time kept under ``parts``. The cache folders are
not touched.

    python -m benchmarks.merge_runs --out benchmarks/out RUN_SEED0 RUN_SEED1 RUN_SEED2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload from several of the same benchmark; a mismatch in name, quick or config is an error."""
    first = parts[0]
    for p in parts[1:]:
        for key in ("name", "quick", "skip_scratch", "method_only", "points"):
            if p.get(key) != first.get(key):
                raise SystemExit(f"cannot merge {first['name']}: '{key}' differs ({first.get(key)} vs {p.get(key)})")
    seeds = sorted({s for p in parts for s in p["seeds"]})
    if sum(len(p["seeds"]) for p in parts) != len(seeds):
        raise SystemExit(f"cannot merge {first['name']}: a seed appears in more than one part")
    config = dict(first["config"])
    config["wall_s"] = max(float(p["config"].get("wall_s", 0.0)) for p in parts)
    refused = [r for p in parts for r in p["config"].get("refused", [])]
    if refused:  # per-seed refusals (e.g. ALDS points below this machine's latency floor) are kept, all of them
        config["refused"] = refused
    return {
        **{k: v for k, v in first.items() if k not in ("rows", "seeds", "config")},
        "seeds": seeds,
        "config": config,
        "rows": [r for p in parts for r in p["rows"]],
        "parts": [{"seeds": p["seeds"], "env": p["env"], "wall_s": p["config"].get("wall_s")} for p in parts],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="where the merged JSON files go")
    parser.add_argument("runs", nargs="+", help="the folders of the runs to merge")
    args = parser.parse_args(argv)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in args.runs:
        for path in sorted(Path(run).glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "rows" in data:
                by_name.setdefault(path.stem, []).append(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, parts in by_name.items():
        (out / f"{name}.json").write_text(json.dumps(merge(parts), indent=1, default=str))
        print(f"[merge_runs] {name}: {len(parts)} part(s) -> {out / (name + '.json')}")


if __name__ == "__main__":
    main()
