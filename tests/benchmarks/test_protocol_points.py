"""``--points``: a benchmark runs only the operating points named, the main point keeps its role."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import protocol as P

POINTS = [("main", {"a": 1}), ("second", {"a": 2}), ("third", {"a": 3})]


def _settings(argv: list[str]) -> P.Settings:
    return P.Settings.from_namespace(P.parse_args("doc", ["--out", "x", *argv]))


def test_all_points_without_the_option_and_the_first_is_main() -> None:
    chosen = P.chosen_points(_settings([]), POINTS)
    assert [(main, label) for main, label, _ in chosen] == [(True, "main"), (False, "second"), (False, "third")]


def test_only_the_named_points_and_main_stays_main() -> None:
    assert [(m, label) for m, label, _ in P.chosen_points(_settings(["--points", "third"]), POINTS)] == [
        (False, "third")
    ]
    chosen = P.chosen_points(_settings(["--points", "third", "main"]), POINTS)
    assert [(m, label, o["a"]) for m, label, o in chosen] == [(True, "main", 1), (False, "third", 3)]


def test_an_unknown_point_names_the_known_ones() -> None:
    with pytest.raises(SystemExit, match=r"--points \['fourth'\].*'main', 'second', 'third'"):
        P.chosen_points(_settings(["--points", "fourth"]), POINTS)


def test_the_points_are_recorded_in_the_json(tmp_path: Path) -> None:
    settings = _settings(["--points", "second"])
    settings.out = tmp_path
    path = P.write("b", settings, [], {})
    assert '"points": [\n  "second"\n ]' in path.read_text()


def test_layer_merge_points_are_its_latency_budgets() -> None:
    from benchmarks.layer_merge import operating_points

    points = operating_points()
    assert [label for label, _ in points] == ["LayerMerge-70%", "LayerMerge-50%", "LayerMerge-70%-network"]
    chosen = P.chosen_points(_settings(["--points", "LayerMerge-50%", "LayerMerge-70%-network"]), points)
    assert [(label, point) for _, label, point in chosen] == [
        ("LayerMerge-50%", (0.5, "convs")),
        ("LayerMerge-70%-network", (0.7, "network")),
    ]
