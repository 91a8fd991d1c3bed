"""``benchmarks.run_all``: aggregation over seeds, verdicts against every baseline, the pictures, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run_all import aggregate, headline_rows, render, thin_at, thin_curve

ROOT = Path(__file__).resolve().parents[2]
TASK = "mnist/resnet20"


def _row(method: str, variant: str, seed: int, acc: float, params: int, speedup: float, **extra: Any) -> dict:
    return {
        "task": TASK, "method": method, "variant": variant, "seed": seed, "acc": acc, "params": params,
        "nonzero": params, "flops": 1_000_000, "lat_b1_ms": 1.0, "lat_b64_ms": 10.0 / speedup, "speedup_b64": speedup,
        "wall_s": 1.0, **extra,
    }  # fmt: skip


def _thin(seed: int, width: float, full: bool, acc: float, params: int, speedup: float) -> dict:
    budget = "full" if full else "recovery"
    return _row(
        "thin", f"thin w{width}, {budget}", seed, acc, params, speedup, width=width, full_budget=full, distilled=False
    )


def _rows() -> list[dict]:
    rows = []
    for seed, jitter in ((0, -0.1), (1, 0.1)):
        rows += [
            _row("dense", "converged start", seed, 96.0 + jitter, 272_000, 1.0),
            _row("dense", "dense fine-tuned (recovery budget)", seed, 96.2 + jitter, 272_000, 1.0),
            _thin(seed, 0.5, False, 93.0 + jitter, 68_000, 2.5),
            _thin(seed, 0.75, False, 95.0 + jitter, 150_000, 1.5),
            _thin(seed, 0.5, True, 95.5 + jitter, 68_000, 2.5),
            _thin(seed, 0.75, True, 96.5 + jitter, 150_000, 1.5),
            _row("LayerMerge", "LayerMerge-50%", seed, 95.9 + jitter, 140_000, 2.0, distilled=False),
            _row("magnitude pruning", "global L1 to LayerMerge-50% params", seed, 95.0 + jitter, 272_000, 1.0),
        ]  # fmt: skip
    return rows


def test_aggregation_interpolation_and_verdicts() -> None:
    aggs = aggregate(_rows())
    merge = next(a for a in aggs if a["method"] == "LayerMerge")
    assert (
        merge["n"] == 2 and merge["acc"] == pytest.approx(95.9) and merge["acc_std"] == pytest.approx(0.1414, abs=1e-3)
    )
    # latency ratio 0.5 lies between the thin widths' 0.4 (w0.5) and 0.667 (w0.75): interpolated
    point, note = thin_at(thin_curve(aggs, TASK, False, False), 0.5)
    assert point is not None and "interpolated" in note
    assert point["acc"] == pytest.approx(93.0 + (0.5 - 0.4) / (2 / 3 - 0.4) * 2.0)
    (head,) = headline_rows(aggs)
    assert head["vs dense fine-tuned"].startswith("loss")  # 95.9 vs 96.2, std 0.14 each
    assert head["vs magnitude / SVD, same params"].startswith("win")
    assert head["vs thin, recovery budget"].startswith("win")
    assert head["vs thin, full budget"].startswith("tie") or head["vs thin, full budget"].startswith("loss")
    # outside the thin curve: the nearest width and a note saying it is faster
    _, note = thin_at(thin_curve(aggs, TASK, False, False), 0.9)
    assert "is faster" in note


def test_render_writes_tables_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"date": "today", "machine": "cpu", "cpu_count": 2, "torch": "x", "lightning": "y", "python": "3"}
    payload = {"name": "layer_merge", "env": env, "seeds": [0, 1], "quick": False, "config": {}, "rows": _rows()}
    (out / "layer_merge.json").write_text(json.dumps(payload))
    results = tmp_path / "RESULTS.md"
    text = render(out, results)
    assert results.read_text() == text
    assert "## Headline" in text and "LayerMerge-50%" in text and "95.90 ± 0.14" in text
    assert (tmp_path / "results_pareto_mnist_resnet20.png").stat().st_size > 5000
    assert "refused" not in text


def test_render_lists_refused_operating_points(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"date": "today", "machine": "cpu", "cpu_count": 2, "torch": "x", "lightning": "y", "python": "3"}
    refusal = {"task": TASK, "seed": 1, "point": "ALDS latency 70 %", "reason": "must be at least 0.7795"}
    config = {"refused": [refusal]}
    payload = {"name": "alds", "env": env, "seeds": [0, 1], "quick": False, "config": config, "rows": _rows()}
    (out / "alds.json").write_text(json.dumps(payload))
    text = render(out, tmp_path / "RESULTS.md")
    assert "- `alds` mnist/resnet20 seed 1, ALDS latency 70 %: must be at least 0.7795" in text
    assert "--extend" not in text


def test_render_says_which_results_were_extended(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"date": "today", "machine": "cpu", "cpu_count": 2, "torch": "x", "lightning": "y", "python": "3"}
    payload = {"name": "alds", "env": env, "seeds": [0, 1], "quick": False, "config": {}, "rows": _rows()}
    (out / "alds.json").write_text(json.dumps({**payload, "rows_replaced": 2}))
    text = render(out, tmp_path / "RESULTS.md")
    assert "Extended with `benchmarks.merge_runs --extend`" in text and "alds (2 row(s) replaced)" in text


def test_render_only_without_results_refuses_and_keeps_results(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("committed results\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--render-only", "--out", str(tmp_path / "empty"),
         "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "no benchmark results" in proc.stderr
    assert results.read_text() == "committed results\n"


def test_the_quick_path_of_a_benchmark_runs_and_renders(tmp_path: Path) -> None:
    """LayerCollapse on the VGG-style CNN at smoke settings: every row of the protocol, then RESULTS.md."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.layer_collapse", "--quick", "--tasks", "mnist/vgg", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "layer_collapse.json").read_text())
    variants = {r["variant"] for r in data["rows"]}
    assert {"LayerCollapse", "LayerCollapse, distilled"} <= variants
    assert any("from scratch" in v for v in variants) and any(r["method"] == "magnitude pruning" for r in data["rows"])
    assert all(r["speedup_b64"] > 0 and r["acc"] >= 0 for r in data["rows"])
    assert data["quick"] is True and data["env"]["torch"]
    text = render(out, tmp_path / "RESULTS.md")
    assert "QUICK SMOKE SETTINGS" in text


def test_each_benchmarks_task_list_matches_its_module() -> None:
    import importlib

    from benchmarks.run_all import BENCHMARK_TASKS, BENCHMARKS

    for name, (module_name, _) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        if hasattr(module, "FAMILIES"):
            labels = tuple(module.FAMILIES)
        elif hasattr(module, "TASKS"):
            labels = tuple(t.label for t in module.TASKS)
        else:
            labels = (module.TASK.label,)
        assert BENCHMARK_TASKS[name] == labels, name


def test_tasks_option_keeps_only_the_benchmarks_that_run_them() -> None:
    from benchmarks.run_all import task_args

    names = ["baselines", "layer_collapse", "layer_merge"]
    assert task_args(names, None) == {name: [] for name in names}
    assert task_args(names, ["mnist/resnet20"]) == {
        "baselines": ["--tasks", "mnist/resnet20"],
        "layer_merge": ["--tasks", "mnist/resnet20"],
    }
    assert task_args(names, ["shakespeare/transformer", "mnist/vgg"]) == {
        "baselines": ["--tasks", "mnist/vgg", "shakespeare/transformer"],
        "layer_collapse": ["--tasks", "mnist/vgg", "shakespeare/transformer"],
    }


def test_rows_not_retimed_in_a_retimed_run_are_marked() -> None:
    from benchmarks.run_all import mark_timing, timing_mark

    rows = [
        _row("ALDS", "kept", 0, 95.0, 100, 1.2, retimed=True),
        _row("ALDS", "kept", 1, 95.2, 100, 1.3, retimed=True),
        _row("ALDS", "gone", 0, 95.0, 100, 2.0),
        _row("ALDS", "gone", 1, 95.0, 100, 2.1, retimed=True),
    ]
    aggs = {a["variant"]: a for a in aggregate(rows)}
    assert mark_timing(list(aggs.values()))
    assert timing_mark(aggs["kept"]) == "" and timing_mark(aggs["gone"]) == "†"
    quiet = aggregate([_row("ALDS", "sequential run", 0, 95.0, 100, 1.2)])
    assert not mark_timing(quiet) and timing_mark(quiet[0]) == ""


def test_rows_far_below_the_best_are_left_off_the_picture() -> None:
    from benchmarks.run_all import on_axis

    rows = aggregate([_row("m", "trained", 0, 96.0, 100, 1.0), _row("m", "one shot", 0, 10.0, 100, 1.0)])
    kept, off = on_axis(rows, "acc")
    assert [a["variant"] for a in kept] == ["trained"] and off == 1
