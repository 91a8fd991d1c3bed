"""Latency measured on the real device: warm-up, then the median of timed repeats.

The protocol of the benchmarks: eval mode, ``torch.no_grad()``, a fixed batch size, CUDA
synchronised around every timed call, ``time.perf_counter``, and optionally a fixed number of
CPU threads (``torch.set_num_threads(2)`` in the benchmarks).

On CPU, denormal (subnormal) floats are flushed to zero while timing, by default: trained and
merged weights can carry denormal values, and x86 arithmetic on them is much slower, which made a
fine-tuned merged MobileNetV2 look slower than the original (batch 64, measured once: merged 35.5 ms
without flushing and 22.7 ms with it; the original 34.4 and 30.5 ms). Flushing is the setting CPU
inference is normally deployed with (``torch.set_flush_denormal(True)``); ``flush_denormal=False``
times the arithmetic as it is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lit_compress.errors import allowed
from lit_compress.inputs import ExampleInputs, batch_size_of, describe_inputs, inputs_to, rebatch, split_inputs
from lit_compress.surgery.modules import module_device_dtype, preserve_mode


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    warmup: int = 5,
    repeats: int = 20,
    num_threads: int | None = None,
    flush_denormal: bool = True,
) -> dict[str, Any]:
    """Time ``model``'s forward pass; return the median and the 10th/90th percentiles in ms.

    Give either ``example_inputs`` (a tensor, tuple/list of arguments or dict of kwargs) or
    ``input_shape`` (one sample's shape *without* the batch dimension, e.g. ``(1, 28, 28)``;
    random inputs of the model's dtype are drawn). Train/eval flags, the model's device and
    the thread count are restored afterwards.

    Args:
        model: The model to time.
        example_inputs: Inputs for ``model(...)``.
        input_shape: Shape of one sample, instead of ``example_inputs``.
        batch_size: Batch to time at. ``None``: ``example_inputs`` as given, or 1 with
            ``input_shape``. With ``example_inputs``, the tensors whose first dimension is the
            batch (that of the first tensor) are sliced or repeated along it to this size.
        device: Where to time it; ``None`` is the model's device. The model is moved there
            for the measurement only.
        warmup: Untimed calls before the timed ones (>= 0).
        repeats: Timed calls (>= 1).
        num_threads: ``torch.set_num_threads`` during the measurement (``None``: unchanged).
        flush_denormal: Flush denormal floats to zero during the measurement on CPU (see the
            module docstring); the previous setting is restored afterwards.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms"}`` (float), ``"batch_size"``, ``"repeats"``,
        ``"num_threads"`` (int) and ``"device"`` (str).

    Raises:
        ConfigError: For a bad argument, or if the forward pass fails on the inputs.
    """
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if (example_inputs is None) == (input_shape is None):
        raise allowed(
            "input_shape", input_shape, "exactly one of `example_inputs` and `input_shape` (shape without batch dim)"
        )
    target = _resolve_device(device, model)

    if input_shape is not None:
        shape = _check_shape(input_shape)
        _, dtype = module_device_dtype(model)
        batch = 1 if batch_size is None else batch_size
        # a private generator: measuring must not draw from (and so shift) the global RNG of training
        generator = torch.Generator(device=target).manual_seed(0)
        inputs: ExampleInputs = torch.randn(batch, *shape, dtype=dtype, device=target, generator=generator)
    else:
        inputs = example_inputs if batch_size is None else rebatch(example_inputs, batch_size)
        inputs = inputs_to(inputs, target, module_device_dtype(model)[1])
        batch = batch_size_of(inputs) if batch_size is None else batch_size
    args, kwargs = split_inputs(inputs)
    flush = _flush_denormal(flush_denormal and target.type == "cpu")
    with _on_device(model, target), _threads(num_threads), flush:
        threads = torch.get_num_threads()
        times = _timed_calls(model, inputs, args, kwargs, target, warmup, repeats)
    return {
        "median_ms": percentile(times, 50.0),
        "p10_ms": percentile(times, 10.0),
        "p90_ms": percentile(times, 90.0),
        "batch_size": int(batch),
        "device": str(target),
        "repeats": int(repeats),
        "num_threads": int(threads),
    }


def measure_interleaved(
    models: Sequence[nn.Module],
    example_inputs: ExampleInputs,
    *,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    flush_denormal: bool = True,
) -> list[dict[str, Any]]:
    """Time several models on the same input *together*, in interleaved rounds; one result per model.

    In each of ``rounds`` rounds every model runs ``warmup`` untimed and ``repeats`` timed calls, in
    an order that rotates from round to round (A B, B A, A B, ...). Whatever else loads the machine
    then falls on every model alike, so their latencies can be compared; a model timed alone, minutes
    apart from the other, can come out several times slower or faster on a shared machine.

    Args:
        models: The models (all must accept ``example_inputs``); each is moved to ``device`` for the
            measurement and back afterwards.
        example_inputs: Inputs for ``model(...)`` (see :func:`measure_latency`).
        rounds: Rounds (>= 1).
        repeats: Timed calls per model and round (>= 1).
        warmup: Untimed calls per model and round (>= 0).
        batch_size, device, num_threads, flush_denormal: As in :func:`measure_latency` (``device``
            ``None``: the first model's device).

    Returns:
        Per model: ``"median_ms"``, ``"p10_ms"``, ``"p90_ms"`` over all its ``rounds × repeats``
        timed calls, ``"round_medians_ms"`` (list), ``"rounds"``, ``"repeats"``, ``"batch_size"``,
        ``"num_threads"`` and ``"device"``.
    """
    _check_int("rounds", rounds, 1)
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if not models:
        raise allowed("models", list(models), "at least one model")
    target = _resolve_device(device, models[0])
    inputs = example_inputs if batch_size is None else rebatch(example_inputs, batch_size)
    inputs = inputs_to(inputs, target, module_device_dtype(models[0])[1])
    batch = batch_size_of(inputs) if batch_size is None else batch_size
    args, kwargs = split_inputs(inputs)
    times: list[list[float]] = [[] for _ in models]
    medians: list[list[float]] = [[] for _ in models]
    flush = _flush_denormal(flush_denormal and target.type == "cpu")
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_on_device(model, target))
        stack.enter_context(_threads(num_threads))
        stack.enter_context(flush)
        threads = torch.get_num_threads()
        for r in range(rounds):
            for i in (r + k for k in range(len(models))):
                index = i % len(models)
                calls = _timed_calls(models[index], inputs, args, kwargs, target, warmup, repeats)
                times[index] += calls
                medians[index].append(percentile(calls, 50.0))
    return [
        {
            "median_ms": percentile(t, 50.0),
            "p10_ms": percentile(t, 10.0),
            "p90_ms": percentile(t, 90.0),
            "round_medians_ms": m,
            "rounds": int(rounds),
            "repeats": int(repeats),
            "batch_size": int(batch),
            "device": str(target),
            "num_threads": int(threads),
        }
        for t, m in zip(times, medians)
    ]


def _timed_calls(
    model: nn.Module,
    inputs: ExampleInputs,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    target: torch.device,
    warmup: int,
    repeats: int,
) -> list[float]:
    """Milliseconds of ``repeats`` forward calls after ``warmup`` untimed ones (eval mode, no grad, mode restored)."""

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    times: list[float] = []
    with preserve_mode(model), torch.no_grad():
        model.eval()
        try:
            for _ in range(warmup):
                model(*args, **kwargs)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(*args, **kwargs)
                sync()
                times.append((time.perf_counter() - start) * 1000.0)
        except Exception as err:
            raise allowed(
                "example_inputs",
                describe_inputs(inputs),
                f"inputs that {type(model).__name__}.forward accepts; it raised {type(err).__name__}: {err}",
            ) from err
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise allowed(name, value, f"an integer >= {minimum}")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise allowed("input_shape", shape, "a sequence of positive ints, one sample's shape without the batch dim")
    return tuple(shape)


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return module_device_dtype(model)[0]
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise allowed("device", device, f"a torch device such as 'cpu' or 'cuda:0' ({err})") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise allowed("device", device, "'cpu' on this machine (CUDA is not available)")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    return target


@contextlib.contextmanager
def _on_device(model: nn.Module, target: torch.device) -> Iterator[None]:
    """Move ``model`` to ``target`` for the block (if it is elsewhere) and back afterwards."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices or devices == {target}:
        yield
        return
    if len(devices) > 1:
        raise allowed("device", str(target), f"the model's own device; it spans {sorted(map(str, devices))}")
    (original,) = devices
    model.to(target)
    try:
        yield
    finally:
        model.to(original)


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def denormals_flushed() -> bool:
    """Whether CPU arithmetic currently flushes denormal floats to zero (probed, torch has no getter)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    return bool((tiny * 1.0).item() == 0.0)


@contextlib.contextmanager
def _flush_denormal(enable: bool) -> Iterator[None]:
    if not enable:
        yield
        return
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


__all__ = ["denormals_flushed", "measure_interleaved", "measure_latency", "percentile"]
