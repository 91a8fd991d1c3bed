"""LayerMerge's ``latency_target="network"``: the conv budget is lowered until the merged network meets the budget.

The timing of the merged network is scripted in the callback tests (a real timing depends on the
machine and its load); one test times a real merged copy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lit_compress.callbacks._layer_merge_network as network
from lit_compress.callbacks._layer_merge_network import NetworkStep, deployed_copy, next_conv_budget
from lit_compress.errors import ConfigError
from lit_compress.measure.latency_table import LatencyTableWarning
from lit_compress.surgery import applied_events
from tests.callbacks._toy import HashRecorder
from tests.callbacks.test_layer_merge import lm, loaders, tiny_model, trainer_for


def step(conv_budget: float, network_fraction: float, dense_ms: float = 10.0) -> NetworkStep:
    return {
        "conv_budget": conv_budget,
        "table_fraction": conv_budget,
        "network_ms": network_fraction * dense_ms,
        "dense_ms": dense_ms,
        "network_fraction": network_fraction,
    }


def test_the_first_correction_removes_the_excess_milliseconds_from_the_conv_budget() -> None:
    # network 10 ms, 0.79 of it measured against a target of 0.7: 0.9 ms too slow; the table sums 7 ms
    assert next_conv_budget([step(0.7, 0.79)], 0.7, table_ms=7.0, floor=0.2) == pytest.approx(0.7 - 0.9 / 7.0)


def test_later_corrections_follow_the_secant_and_stop_at_the_floor() -> None:
    # (0.7, 0.79) and (0.6, 0.72): slope 0.7 per unit of conv budget; 0.02 over target -> 0.6 - 0.02 / 0.7
    steps = [step(0.7, 0.79), step(0.6, 0.72)]
    assert next_conv_budget(steps, 0.7, table_ms=7.0, floor=0.2) == pytest.approx(0.6 - 0.02 / 0.7)
    assert next_conv_budget(steps, 0.7, table_ms=7.0, floor=0.59) == pytest.approx(0.59)
    assert next_conv_budget([step(0.4, 0.9)], 0.7, table_ms=7.0, floor=0.4) is None


def test_a_secant_that_does_not_fall_falls_back_to_the_excess_rule() -> None:
    # timing noise: the lower budget measured slower; the secant would go up, so the excess rule applies
    steps = [step(0.7, 0.79), step(0.6, 0.80)]
    assert next_conv_budget(steps, 0.7, table_ms=7.0, floor=0.2) == pytest.approx(0.6 - 1.0 / 7.0)


def scripted_timing(monkeypatch: pytest.MonkeyPatch, fractions: list[float], dense_ms: float = 0.1) -> list[Any]:
    """Time the merged plans as ``fractions`` of a ``dense_ms`` network, in turn; returns the plans timed."""
    timed: list[Any] = []

    def fake(model: Any, blocks: Any, example: Any, **kwargs: Any) -> tuple[float, float]:
        timed.append(blocks)
        return fractions[len(timed) - 1] * dense_ms, dense_ms

    monkeypatch.setattr(network, "time_against_original", fake)
    return timed


def network_lm(tmp_path: Path, **kwargs: Any) -> Any:
    """No importance table (``uniform``): these tests are about the budget, not the scores."""
    return lm(tmp_path, importance="uniform", latency_target="network", merge_at_end=False, **kwargs)


def test_the_plan_is_re_solved_until_the_network_meets_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed = scripted_timing(monkeypatch, [0.9, 0.84, 0.81])  # 0.81 <= 0.8 × 1.02: the third plan is kept
    L.seed_everything(0, verbose=False)
    model = tiny_model()
    cb = network_lm(tmp_path, budget=0.8)
    trainer_for(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(model, loaders())
    steps = cb.summary["network_calibration"]
    table_ms = cb.summary["original_table_ms"]
    assert [s["network_fraction"] for s in steps] == pytest.approx([0.9, 0.84, 0.81])
    # round 2: the 0.1 × 0.1 ms over budget come off the conv budget; round 3: the secant through both
    second = 0.8 - 0.1 * 0.1 / table_ms
    third = second - 0.04 * (second - 0.8) / (0.84 - 0.9)
    assert [s["conv_budget"] for s in steps] == pytest.approx([0.8, second, third])
    assert cb.summary["network_fraction"] == pytest.approx(0.81)
    assert applied_events(model)[0]["blocks"] == timed[-1]  # the plan applied is the last one timed
    assert cb.summary["planned_fraction"] == pytest.approx(steps[-1]["table_fraction"])
    # the DP floors each entry's time to the unit: a plan may exceed its conv budget by < 1 unit per block
    slack = len(timed[-1]) * cb.summary["time_unit_ms"] / table_ms
    assert steps[-1]["table_fraction"] <= third + slack
    assert cb.summary["latency_target"] == "network"


def test_an_unreachable_network_budget_keeps_the_last_plan_tried_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed = scripted_timing(monkeypatch, [0.95, 0.9, 0.85])
    model = tiny_model()
    cb = network_lm(tmp_path, budget=0.7, network_rounds=3)
    with pytest.warns(LatencyTableWarning, match=r"no plan found meets the network latency budget of 70%"):
        trainer_for(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(model, loaders())
    assert len(cb.summary["network_calibration"]) == 3 and applied_events(model)[0]["blocks"] == timed[-1]


def test_the_convs_target_times_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the network was timed with latency_target='convs'")

    monkeypatch.setattr(network, "time_against_original", forbidden)
    cb = lm(tmp_path, budget=0.8, importance="uniform", merge_at_end=False)
    trainer_for(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(tiny_model(), loaders())
    assert cb.summary["latency_target"] == "convs" and "network_calibration" not in cb.summary


def test_the_timed_copy_is_the_merged_plan_and_the_rng_is_left_alone() -> None:
    """A real timing on a tiny ResNet: the model is unchanged, the RNG untouched, and the copy timed is the
    planned network merged (its outputs equal the planned network's, eval mode)."""
    from lit_compress.surgery.layermerge.blocks import analyze_merge_space
    from lit_compress.surgery.layermerge.plan import apply_merge_plan_

    torch.manual_seed(0)
    model = tiny_model().double().eval()  # float64: the merge is exact up to round-off
    space = analyze_merge_space(model)
    blocks = [[0, 2, [1, 2]]] + [[i - 1, i, [i]] for i in range(3, space.depth + 1)]  # unit 1 merged
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    rng = torch.get_rng_state()
    plan_ms, dense_ms = network.time_against_original(
        model, blocks, x[:1], device=torch.device("cpu"), batch_size=2, warmup=0, repeats=2, rounds=2
    )
    assert plan_ms > 0 and dense_ms > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    merged = deployed_copy(model, x[:1], blocks)
    planned = copy.deepcopy(model)
    apply_merge_plan_(planned, blocks)
    planned.eval()
    with torch.no_grad():
        expected = planned(x)
        torch.testing.assert_close(merged(x), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_bad_network_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`latency_target`='layers' is not allowed"):
        lm(tmp_path, latency_target="layers")
    with pytest.raises(ConfigError, match=r"`network_rounds`=0"):
        lm(tmp_path, network_rounds=0)


def test_a_network_budget_planned_on_rank_0_keeps_ddp_ranks_identical(tmp_path: Path) -> None:
    """Real timing of the merged copies on rank 0 only: the plan is broadcast and rank 0's RNG left alone."""
    L.seed_everything(0, verbose=False)
    callback = lm(
        tmp_path, importance="uniform", latency_target="network", budget=0.8, network_rounds=2, latency_rounds=1
    )  # merged at the end: BatchNorm buffers are per rank between events (DDP broadcasts them at each forward)
    trainer = trainer_for(
        tmp_path, [callback, HashRecorder(str(tmp_path))], max_epochs=1, devices=2, strategy="ddp_spawn"
    )
    trainer.fit(tiny_model(), loaders())
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1]


def test_a_network_budget_under_bf16_mixed(tmp_path: Path) -> None:
    model = tiny_model()
    callback = network_lm(tmp_path, budget=0.8, network_rounds=2, latency_repeats=1, latency_rounds=1)
    trainer_for(tmp_path, [callback], max_epochs=1, limit_train_batches=2, precision="bf16-mixed").fit(model, loaders())
    steps = callback.summary["network_calibration"]
    assert 1 <= len(steps) <= 2 and all(s["network_ms"] > 0 and s["dense_ms"] > 0 for s in steps)
    assert [e["op"] for e in applied_events(model)] == ["layer_merge_plan"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
