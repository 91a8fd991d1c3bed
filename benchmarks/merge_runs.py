"""Combine benchmark runs made in parallel (e.g. one process per seed, each with its own ``--out``).

Every ``<dir>/<name>.json`` of the given folders is merged into ``<out>/<name>.json``: rows concatenated,
seeds joined, each part's machine, versions and wall time kept under ``parts``. The cache folders are
not touched.

    python -m benchmarks.merge_runs --out benchmarks/out RUN_SEED0 RUN_SEED1 RUN_SEED2
    python -m benchmarks.merge_runs --extend --out benchmarks/out EARLIER_RUN RUN_WITH_MORE_POINTS
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row.get("task"), row.get("method"), row.get("variant"), row.get("seed")


def extended_rows(parts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of every part, a later part's row replacing an earlier one of the same task, method,
    variant and seed; returns the rows and how many were replaced."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    replaced = 0
    for p in parts:
        for r in p["rows"]:
            replaced += _key(r) in rows
            rows[_key(r)] = r
    return list(rows.values()), replaced


def merge(parts: list[dict[str, Any]], extend: bool = False) -> dict[str, Any]:
    """One payload from several of the same benchmark; a mismatch in name, quick or config is an error.

    ``extend``: the parts may share seeds (later runs adding operating points or rows to an earlier one
    made from the same dense starts) and differ in ``skip_scratch``, ``method_only`` and ``points``
    (each part's are kept under ``parts``); a row measured again replaces the earlier one.
    """
    first = parts[0]
    keys = ("name", "quick") if extend else ("name", "quick", "skip_scratch", "method_only", "points")
    for p in parts[1:]:
        for key in keys:
            if p.get(key) != first.get(key):
                raise SystemExit(f"cannot merge {first['name']}: '{key}' differs ({first.get(key)} vs {p.get(key)})")
    seeds = sorted({s for p in parts for s in p["seeds"]})
    if not extend and sum(len(p["seeds"]) for p in parts) != len(seeds):
        raise SystemExit(f"cannot merge {first['name']}: a seed appears in more than one part (see --extend)")
    rows, replaced = extended_rows(parts) if extend else ([r for p in parts for r in p["rows"]], 0)
    config = dict(first["config"])
    config["wall_s"] = max(float(p["config"].get("wall_s", 0.0)) for p in parts)
    refused = [r for p in parts for r in p["config"].get("refused", [])]
    if refused:  # per-seed refusals (e.g. ALDS points below this machine's latency floor) are kept, all of them
        config["refused"] = refused
    merged = {
        **{k: v for k, v in first.items() if k not in ("rows", "seeds", "config")},
        "seeds": seeds,
        "config": config,
        "rows": rows,
        "parts": [
            {"seeds": p["seeds"], "env": p["env"], "wall_s": p["config"].get("wall_s")}
            | ({k: p.get(k) for k in ("skip_scratch", "method_only", "points")} if extend else {})
            for p in parts
        ],
    }
    if extend:
        merged["skip_scratch"] = all(p.get("skip_scratch") for p in parts)
        merged["method_only"] = all(p.get("method_only") for p in parts)
        every = [p.get("points") for p in parts]
        merged["points"] = None if any(x is None for x in every) else sorted({x for pts in every for x in pts})
        merged["rows_replaced"] = replaced
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="where the merged JSON files go")
    parser.add_argument("runs", nargs="+", help="the folders of the runs to merge")
    parser.add_argument(
        "--extend",
        action="store_true",
        help="later runs add rows to earlier ones of the same seeds (same dense starts); a row run again replaces",
    )
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
        (out / f"{name}.json").write_text(json.dumps(merge(parts, args.extend), indent=1, default=str))
        print(f"[merge_runs] {name}: {len(parts)} part(s) -> {out / (name + '.json')}")


if __name__ == "__main__":
    main()
