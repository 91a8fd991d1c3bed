"""One call for the numbers that every structural event logs before and after."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_compress.errors import allowed
from lit_compress.measure.flops import ExampleInputs, count_flops
from lit_compress.measure.latency import measure_latency
from lit_compress.measure.params import count_parameters
from lit_compress.surgery.modules import module_device_dtype


def model_stats(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    latency: bool = False,
    latency_batch_size: int | None = 1,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    warmup: int = 5,
    repeats: int = 20,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs and (if asked) latency of ``model``, as plain Python numbers.

    Args:
        model: The model to measure.
        example_inputs: Inputs for FLOPs (at their own batch size) and latency; a tensor, a
            tuple/list of arguments or a dict of kwargs.
        latency: Also time the forward pass (see :func:`measure_latency`).
        latency_batch_size: Batch size for the latency (``None``: that of ``example_inputs``).
        input_shape: One sample's shape without the batch dim, used when ``example_inputs`` is
            ``None`` (FLOPs are then for a batch of 1).
        device, warmup, repeats, num_threads: Passed to :func:`measure_latency`.

    Returns:
        ``{"params": int (unique storage), "params_all": int (every registered use),
        "flops": int | None (None without inputs), "latency_ms": float | None (median; None
        unless ``latency``)}``.

    Raises:
        ConfigError: If ``latency`` is asked without inputs, or a measurement fails.
    """
    if example_inputs is None and input_shape is not None:
        shape = tuple(input_shape)
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise allowed("input_shape", input_shape, "a sequence of positive ints without the batch dim")
        dev, dtype = module_device_dtype(model)
        example_inputs = torch.randn(1, *shape, dtype=dtype, device=dev)
    if latency and example_inputs is None:
        raise allowed("latency", latency, "False when neither `example_inputs` nor `input_shape` is given")
    stats: dict[str, Any] = {
        "params": count_parameters(model),
        "params_all": count_parameters(model, unique_storage=False),
        "flops": None if example_inputs is None else count_flops(model, example_inputs),
        "latency_ms": None,
    }
    if latency:
        result = measure_latency(
            model,
            example_inputs,
            batch_size=latency_batch_size,
            device=device,
            warmup=warmup,
            repeats=repeats,
            num_threads=num_threads,
        )
        stats["latency_ms"] = float(result["median_ms"])
    return stats


__all__ = ["model_stats"]
