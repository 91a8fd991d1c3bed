"""``benchmarks.run_all`` renders RESULTS.md and the headline plot from the benchmarks' JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks._common import headline, write_results
from benchmarks.run_all import render


def test_render_puts_headlines_first_and_marks_paper_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = [{"variant": "dense", "acc": 96.5, "max |Δ|": 0.1}, {"variant": "compressed", "acc": 96.0}]
    heads = [
        headline(
            "ALDS",
            "MNIST-5k ResNet-20",
            "keep 0.3",
            "test acc %",
            96.0,
            96.5,
            30_000,
            100_000,
            latency_b64_ms=10.0,
            baseline_latency_b64_ms=20.0,
        )
    ]
    write_results("alds_mnist5k", rows, {"seed": 0, "per_seed": [1, 2]}, out, headlines=heads)
    write_results("alds_paper", [{"paper's result": "ResNet-20 CIFAR-10", "delta": "-0.47"}], {}, out)
    results = tmp_path / "RESULTS.md"
    text = render(
        out, ["alds", "layer_merge"], {"alds": {"exit_code": 0, "wall_s": 60.0, "log": "x", "quick": True}}, results
    )

    assert results.read_text() == text
    head, _, body = text.partition("## ALDS")
    assert "keep 0.3" in head and "-0.50" in head and "30.0 % (30,000)" in head and "2.00×" in head
    assert "### alds_paper (the paper's numbers, not ours)" in body
    assert "max \\|Δ\\|" in body  # a '|' inside a cell does not break the table
    assert "per_seed" not in body  # raw per-seed data stays in the JSON
    assert "No results found" in body.partition("## LayerMerge")[2]
    assert (tmp_path / "results_headline.png").stat().st_size > 1000
    assert json.loads((out / "alds_mnist5k.json").read_text())["headlines"][0]["params"] == 30_000
