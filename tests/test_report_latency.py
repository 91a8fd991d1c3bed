"""Latency in the report is a result only when it is one (issue 19, case 3).

The original and the final model are timed together in interleaved rounds; a speed-up is printed
only when their p10–p90 ranges do not overlap, otherwise "within noise"; the PNG draws the ranges.
No test here reads the real clock: the models advance a fake clock by a cost fixed by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lit_compress.measure.latency as latency_module
from lit_compress.callbacks import CompressionReport
from lit_compress.measure import measure_interleaved
from lit_compress.report import format_report_markdown, latency_verdict, plot_report
from tests.callbacks._toy import SplitLinear, ToyNet


class FakeClock:
    """``perf_counter`` in seconds, advanced only by the models' forward calls; ``calls`` logs each call's cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[float] = []
        self.jitter: list[float] = [1.0]

    def advance(self, cost_ms: float) -> None:
        cost_ms *= self.jitter[len(self.calls) % len(self.jitter)]
        self.calls.append(cost_ms)
        self.now += cost_ms / 1000.0


CLOCK = FakeClock()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    global CLOCK
    CLOCK = FakeClock()
    monkeypatch.setattr(latency_module, "time", SimpleNamespace(perf_counter=lambda: CLOCK.now))
    return CLOCK


class Fixed(nn.Module):
    """A model whose every forward takes ``cost_ms`` on the fake clock."""

    def __init__(self, cost_ms: float) -> None:
        super().__init__()
        self.cost_ms = cost_ms
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CLOCK.advance(self.cost_ms)
        return self.layer(x)


class CostlyToyNet(ToyNet):
    """ToyNet whose forward costs 1 ms per 1,000 parameters on the fake clock (a split of `mid` makes it faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CLOCK.advance(sum(p.numel() for p in self.parameters()) / 1000.0)
        return super().forward(x)


def test_models_are_timed_together_in_rotating_rounds(clock: FakeClock) -> None:
    a, b = Fixed(2.0), Fixed(1.0)
    before, after = measure_interleaved([a, b], torch.zeros(3, 4), rounds=4, repeats=5, warmup=1)
    assert before["median_ms"] == pytest.approx(2.0) and after["median_ms"] == pytest.approx(1.0)
    assert before["p10_ms"] == pytest.approx(2.0) and before["p90_ms"] == pytest.approx(2.0)
    assert before["round_medians_ms"] == pytest.approx([2.0] * 4) and before["rounds"] == 4
    assert before["repeats"] == 5 and before["batch_size"] == 3 and before["device"] == "cpu"
    # 6 calls (1 warm-up + 5 timed) per model and round; the order rotates: a b, b a, a b, b a
    blocks = [clock.calls[i] for i in range(0, len(clock.calls), 6)]
    assert len(clock.calls) == 4 * 2 * 6 and blocks == [2.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0]
    assert latency_verdict(before, after) == {"verdict": "faster", "speedup": pytest.approx(2.0)}


def test_the_verdict_needs_ranges_that_do_not_overlap() -> None:
    def t(median: float, p10: float, p90: float) -> dict[str, float]:
        return {"median_ms": median, "p10_ms": p10, "p90_ms": p90}

    assert latency_verdict(t(10, 9, 11), t(5, 4.5, 6))["verdict"] == "faster"
    assert latency_verdict(t(5, 4.5, 6), t(10, 9, 11)) == {"verdict": "slower", "speedup": pytest.approx(0.5)}
    assert latency_verdict(t(442, 80, 500), t(82, 70, 90))["verdict"] == "within noise"  # issue 19: "×5.39"
    assert latency_verdict({"latency_ms": 2.0}, {"latency_ms": 1.0}) == {"verdict": "no spread", "speedup": 2.0}
    assert latency_verdict({}, t(1, 1, 1)) == {"verdict": None, "speedup": None}


def _markdown(latency: dict[str, Any] | None, events: list[dict[str, Any]] | None = None) -> str:
    initial = {"params": 100, "latency_ms": 442.0, "latency_p10_ms": 80.0, "latency_p90_ms": 500.0}
    final = {"params": 90, "latency_ms": 82.0, "latency_p10_ms": 70.0, "latency_p90_ms": 90.0}
    events = [{"op": "fold_batchnorm", "after": final}] if events is None else events
    return format_report_markdown(events=events, initial=initial, final=final, latency=latency)


def test_the_summary_claims_a_speed_up_only_outside_the_noise() -> None:
    noisy = _markdown(None)  # the 442 ms → 82 ms, timed minutes apart: the ranges overlap
    assert "within noise" in noisy and "speed-up ×" not in noisy and "not together" in noisy
    together = {
        "original": {"median_ms": 13.0, "p10_ms": 12.5, "p90_ms": 13.6},
        "final": {"median_ms": 6.5, "p10_ms": 6.2, "p90_ms": 6.9},
        "rounds": 5,
        "batch_size": 64,
        "device": "cpu",
    }
    text = _markdown(together)
    assert "original and final timed together in 5 interleaved rounds, batch 64, cpu" in text
    assert "13 ms (p10–p90 12.5–13.6) → 6.5 ms (p10–p90 6.2–6.9): speed-up ×2" in text
    together["final"] = {"median_ms": 12.0, "p10_ms": 11.0, "p90_ms": 12.6}
    assert "within noise" in _markdown(together) and "speed-up ×" not in _markdown(together)


def test_no_event_means_no_comparison() -> None:
    text = _markdown(None, events=[])
    assert "**no structural change**" in text and "nothing to compare" in text
    assert "speed-up" not in text and "within noise" not in text
    table_row = next(line for line in text.splitlines() if line.startswith("| – | original"))
    assert "442 (80–500)" in table_row  # the table shows each median with its p10–p90 range


def trainer_for(tmp_path: Path, callbacks: list[Any]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


def run(tmp_path: Path, **report_args: Any) -> dict[str, Any]:
    report = CompressionReport(
        measure_latency=True, latency_repeats=4, latency_rounds=3, output_dir=str(tmp_path), **report_args
    )
    trainer_for(tmp_path, [SplitLinear(target="mid", rank=8, at_epoch=1), report]).fit(CostlyToyNet())
    return json.loads((tmp_path / "compression_report.json").read_text())


def test_the_report_times_the_original_copy_with_the_final_model(tmp_path: Path, clock: FakeClock) -> None:
    doc = run(tmp_path)
    original, final = 1796 / 1000.0, 1284 / 1000.0  # ToyNet's parameters before and after the rank-8 split
    latency = doc["latency"]
    assert latency["original"]["median_ms"] == pytest.approx(original)
    assert latency["final"]["median_ms"] == pytest.approx(final)
    assert latency["rounds"] == 3 and latency["repeats"] == 4
    assert doc["final"]["latency_ms"] == pytest.approx(final)
    assert doc["summary"]["latency_verdict"] == "faster" and doc["summary"]["latency_timed_together"] is True
    assert doc["summary"]["latency_speedup"] == pytest.approx(original / final)
    markdown = (tmp_path / "compression_report.md").read_text()
    assert "timed together in 3 interleaved rounds" in markdown and "speed-up ×1.4" in markdown


def test_jitter_wider_than_the_change_is_reported_as_noise(tmp_path: Path, clock: FakeClock) -> None:
    clock.jitter = [0.6, 1.0, 1.4, 0.8, 1.2]
    doc = run(tmp_path)
    assert doc["summary"]["latency_verdict"] == "within noise"
    markdown = (tmp_path / "compression_report.md").read_text()
    assert "within noise" in markdown and "speed-up ×" not in markdown


def test_without_the_copy_the_report_says_the_timings_were_apart(tmp_path: Path, clock: FakeClock) -> None:
    doc = run(tmp_path, latency_compare=False)
    assert doc["latency"] is None and doc["summary"]["latency_timed_together"] is False
    assert doc["initial"]["latency_ms"] == pytest.approx(1.796) and doc["summary"]["latency_verdict"] == "faster"
    assert "not together" in (tmp_path / "compression_report.md").read_text()


def test_the_png_draws_the_p10_p90_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    drawn: list[Any] = []
    real = Axes.errorbar

    def recording(self: Axes, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append((list(x), kwargs.get("yerr"), kwargs.get("label")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", recording)
    initial = {"latency_ms": 10.0, "latency_p10_ms": 9.0, "latency_p90_ms": 12.0}
    final = {"latency_ms": 5.0, "latency_p10_ms": 4.0, "latency_p90_ms": 6.0}
    latency = {"original": {"median_ms": 11.0, "p10_ms": 10.0, "p90_ms": 12.0}, "final": dict(final)}
    plot_report(tmp_path / "r.png", events=[], initial=initial, final=final, latency=latency)
    (xs, (low, high), _), (_, (o_low, o_high), label) = drawn
    assert xs == [0, 1] and low == pytest.approx([0.1, 0.1]) and high == pytest.approx([0.2, 0.1])
    assert label == "original, timed with final" and o_low == pytest.approx([0.1]) and o_high == pytest.approx([0.1])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
