"""``benchmarks.merge_runs``: per-seed runs made side by side join into one result, and mismatches are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.merge_runs import main, merge


def _payload(seeds: list[int], quick: bool = False, wall: float = 10.0) -> dict[str, Any]:
    rows = [{"task": "t", "method": "m", "variant": "v", "seed": s, "acc": 90.0 + s} for s in seeds]
    env = {"date": "d", "machine": "x"}
    config = {"wall_s": wall}
    payload = {"name": "b", "env": env, "seeds": seeds, "quick": quick, "skip_scratch": True}
    return {**payload, "config": config, "rows": rows}


def test_parts_join_rows_and_seeds_and_keep_each_parts_wall_time() -> None:
    merged = merge([_payload([0], wall=5.0), _payload([2], wall=7.0), _payload([1], wall=6.0)])
    assert merged["seeds"] == [0, 1, 2]
    assert sorted(r["seed"] for r in merged["rows"]) == [0, 1, 2]
    assert merged["config"]["wall_s"] == 7.0
    assert [p["wall_s"] for p in merged["parts"]] == [5.0, 7.0, 6.0]
    assert merged["skip_scratch"] is True


@pytest.mark.parametrize(
    ("second", "message"),
    [(_payload([1], quick=True), "'quick' differs"), (_payload([0]), "a seed appears in more than one part")],
)
def test_mismatched_parts_are_refused(second: dict[str, Any], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        merge([_payload([0]), second])


def test_the_command_merges_every_benchmark_found(tmp_path: Path) -> None:
    for seed in (0, 1):
        part = tmp_path / f"s{seed}"
        part.mkdir()
        (part / "b.json").write_text(json.dumps(_payload([seed])))
        (part / "notes.json").write_text(json.dumps([1, 2]))  # not a benchmark result: ignored
    main(["--out", str(tmp_path / "joined"), str(tmp_path / "s0"), str(tmp_path / "s1")])
    joined = json.loads((tmp_path / "joined" / "b.json").read_text())
    assert [r["seed"] for r in joined["rows"]] == [0, 1]
    assert not (tmp_path / "joined" / "notes.json").exists()


def test_refused_points_of_every_part_are_kept() -> None:
    first, second = _payload([0]), _payload([1])
    first["config"]["refused"] = [{"task": "t", "seed": 0, "point": "p", "reason": "floor 0.78"}]
    second["config"]["refused"] = [{"task": "t", "seed": 1, "point": "p", "reason": "floor 0.79"}]
    merged = merge([first, second])
    assert [r["seed"] for r in merged["config"]["refused"]] == [0, 1]


def test_extend_adds_rows_of_the_same_seeds_and_a_row_run_again_replaces_the_earlier() -> None:
    earlier = _payload([0, 1])
    earlier["points"] = ["p1"]
    later = _payload([0])
    later.update(points=["p2"], skip_scratch=False)
    later["rows"] = [
        {"task": "t", "method": "m", "variant": "v", "seed": 0, "acc": 95.0},  # run again: replaces 90.0
        {"task": "t", "method": "m", "variant": "new point", "seed": 0, "acc": 93.0},
    ]
    with pytest.raises(SystemExit, match="'skip_scratch' differs"):
        merge([earlier, later])
    merged = merge([earlier, later], extend=True)
    assert merged["seeds"] == [0, 1]
    assert sorted((r["variant"], r["seed"], r["acc"]) for r in merged["rows"]) == [
        ("new point", 0, 93.0), ("v", 0, 95.0), ("v", 1, 91.0)
    ]  # fmt: skip
    assert merged["rows_replaced"] == 1
    assert merged["points"] == ["p1", "p2"] and merged["skip_scratch"] is False
    assert [p["points"] for p in merged["parts"]] == [["p1"], ["p2"]]
