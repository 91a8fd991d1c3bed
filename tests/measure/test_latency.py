"""measure_latency: sane numbers, honoured repeats and batch size, state restored.

Only the test marked ``slow`` asserts on times read from the real clock; the others either do not
look at the times or run on a fake clock.
"""

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lit_compress.measure.latency as latency_module
from lit_compress.errors import ConfigError
from lit_compress.inputs import rebatch
from lit_compress.measure import measure_latency, percentile

KEYS = {"median_ms", "p10_ms", "p90_ms", "batch_size", "device", "repeats", "num_threads"}


def make() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 2))


def fake_clock(durations_ms: list[float]) -> Iterator[float]:
    """``perf_counter`` values in seconds: one (start, stop) pair per timed call, ``durations_ms`` apart."""
    for i, ms in enumerate(durations_ms):
        yield float(i)
        yield i + ms / 1000.0


def test_statistics_of_the_timed_calls_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = fake_clock([5.0, 1.0, 3.0, 2.0, 4.0])
    monkeypatch.setattr(latency_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    result = measure_latency(make(), torch.randn(3, 8), warmup=2, repeats=5)
    assert next(clock, None) is None  # exactly the 5 timed calls read the clock, twice each
    assert set(result) == KEYS
    assert result["median_ms"] == pytest.approx(3.0)
    assert result["p10_ms"] == pytest.approx(1.4) and result["p90_ms"] == pytest.approx(4.6)
    assert all(type(result[k]) is float for k in ("median_ms", "p10_ms", "p90_ms"))
    assert result["batch_size"] == 3 and result["device"] == "cpu" and result["repeats"] == 5


@pytest.mark.slow
def test_sane_numbers_and_plain_types():
    result = measure_latency(make(), torch.randn(3, 8), warmup=1, repeats=5)
    assert set(result) == KEYS
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"] < 1000
    assert all(type(result[k]) is float for k in ("median_ms", "p10_ms", "p90_ms"))
    assert result["batch_size"] == 3 and result["device"] == "cpu"


def test_repeats_and_warmup_honoured():
    model = make()
    calls, grad = [], []
    model.register_forward_hook(lambda m, a, o: (calls.append(1), grad.append(torch.is_grad_enabled())))
    result = measure_latency(model, input_shape=(8,), batch_size=4, warmup=2, repeats=7)
    assert len(calls) == 2 + 7 and not any(grad)
    assert result["repeats"] == 7 and result["batch_size"] == 4


def test_modes_and_threads_restored():
    model = make().train()
    model[1].eval()
    threads = torch.get_num_threads()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.get_num_threads())))
    result = measure_latency(model, torch.randn(1, 8), warmup=0, repeats=2, num_threads=1)
    assert seen == [(False, 1), (False, 1)] and result["num_threads"] == 1
    assert model.training and model[0].training and not model[1].training
    assert torch.get_num_threads() == threads


def test_rebatch_slices_and_repeats_batched_tensors_only():
    x, table = torch.arange(6.0).reshape(3, 2), torch.zeros(5, 5)
    small, big = rebatch((x, table), 1), rebatch({"x": x, "t": table}, 7)
    assert small[0].shape == (1, 2) and small[1] is table
    assert big["x"].shape == (7, 2) and torch.equal(big["x"][3], x[0]) and big["t"] is table
    assert measure_latency(make(), torch.randn(5, 8), batch_size=2, warmup=0, repeats=1)["batch_size"] == 2


def test_percentile_interpolates():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0 and percentile(values, 10) == pytest.approx(1.4)
    assert percentile(values, 90) == pytest.approx(4.6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_threads": 0}, "num_threads"),
        ({"device": "nonsense"}, "device"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        measure_latency(make(), torch.randn(1, 8), **kwargs)


def test_needs_exactly_one_input_source():
    with pytest.raises(ConfigError, match="exactly one"):
        measure_latency(make())
    with pytest.raises(ConfigError, match="exactly one"):
        measure_latency(make(), torch.randn(1, 8), input_shape=(8,))


def test_denormals_are_flushed_while_timing_and_the_setting_is_restored() -> None:
    from lit_compress.measure.latency import denormals_flushed

    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(denormals_flushed())
            return x

    torch.set_flush_denormal(False)
    assert not denormals_flushed()
    measure_latency(Probe(), input_shape=(3,), warmup=0, repeats=2)
    assert seen and all(seen)  # flushed during the measurement
    assert not denormals_flushed()  # restored
    seen.clear()
    measure_latency(Probe(), input_shape=(3,), warmup=0, repeats=2, flush_denormal=False)
    assert seen and not any(seen)


def test_a_drawn_input_does_not_touch_the_global_rng() -> None:
    layer = nn.Linear(4, 2)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    measure_latency(layer, input_shape=(4,), batch_size=2, warmup=0, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)
