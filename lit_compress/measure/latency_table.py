"""Latency tables measured on the training device, cached per device and context (LayerMerge's T(s, e, c)).

Each LayerMerge candidate is timed as ``Conv2d(C_in, C_out, K, stride, padding=K // 2, groups=C if
depthwise, bias) -> activation`` on the block's real input shape at a configurable batch, on the
device given (the one the user trains on). Equal configurations are timed once. Results are cached
in a JSON file under a *context* key (device name, torch version, dtype, batch, threads); entries
are keyed by the layer configuration and input shape, so a table measured on another device or for
another shape is never reused: it simply does not match (and a message says so).

This module sits above :mod:`lit_compress.surgery` (it reads LayerMerge's candidates); surgery
itself only consumes the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.measure.latency import measure_latency
from lit_compress.surgery.layermerge.blocks import ACTIVATION_CLASSES, Candidate, MergeSpace

__all__ = [
    "CACHE_FORMAT",
    "device_name",
    "latency_context",
    "latency_key",
    "latency_table",
    "time_layer",
]

CACHE_FORMAT = "lit_compress.layermerge_latency"


# --------------------------------------------------------------------------------------------


def device_name(device: torch.device | str) -> str:
    """A readable, stable name of the device: the GPU model, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{device.type}:{cpu}"


def latency_context(device: torch.device | str, batch_size: int, dtype: torch.dtype = torch.float32) -> str:
    """The cache section key: device, torch version, dtype, batch and CPU threads."""
    device = torch.device(device)
    threads = f"|threads{torch.get_num_threads()}" if device.type == "cpu" else ""
    return f"{device_name(device)}|torch{torch.__version__}|{str(dtype).replace('torch.', '')}|b{batch_size}{threads}"


def latency_key(c: Candidate, shape: Sequence[int], act: str) -> str:
    """The cache key of one entry: the layer configuration and its input shape."""
    return (
        f"in{c.in_channels}_out{c.out_channels}_k{c.kernel}_s{c.stride}_{'dw' if c.depthwise else 'dense'}"
        f"_h{shape[1]}_w{shape[2]}_{act}"
    )


def _layer(c: Candidate, act: str) -> nn.Module:
    conv = nn.Conv2d(
        c.in_channels,
        c.out_channels,
        c.kernel,
        c.stride,
        c.kernel // 2,
        groups=c.out_channels if c.depthwise else 1,
        bias=True,
    )
    return nn.Sequential(conv, ACTIVATION_CLASSES.get(act, nn.ReLU)())


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"format": CACHE_FORMAT, "version": 1, "tables": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"`latency_cache`={str(path)!r} is not a readable JSON latency cache ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ConfigError(f"`latency_cache`={str(path)!r} is not a LayerMerge latency cache (format {CACHE_FORMAT!r}).")
    return data


def time_layer(
    layer: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device | str, warmup: int, repeats: int
) -> float:
    """Milliseconds of one candidate layer on ``(batch_size, *input_shape)`` (the one place a table entry is timed)."""
    stats = measure_latency(
        layer, input_shape=tuple(input_shape), batch_size=batch_size, device=device, warmup=warmup, repeats=repeats
    )
    return float(stats["median_ms"])


def latency_table(
    space: MergeSpace,
    candidates: Sequence[Candidate],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """``{candidate.key: milliseconds}`` measured on ``device``; cached in ``cache`` (JSON) if given.

    Needs ``space.input_shapes`` (:func:`~lit_compress.surgery.layermerge.blocks.site_input_shapes`).

    Raises:
        ConfigError: For a bad argument, missing input shapes, or a cache file of another format.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"`latency_batch_size`={batch_size!r} is not allowed: must be an int >= 1.")
    missing = [c.start + 1 for c in candidates if c.start + 1 not in space.input_shapes]
    if missing:
        raise ConfigError("LayerMerge latency table: input shapes are unknown; call site_input_shapes first.")
    path = Path(cache) if cache is not None else None
    data = _read_cache(path)
    context = latency_context(device, batch_size)
    section = data["tables"].setdefault(context, {"entries": {}})
    others = [k for k in data["tables"] if k != context]
    if others and not section["entries"]:
        log(
            f"LayerMerge: the latency cache {path} has tables for {len(others)} other device/batch context(s) "
            f"({'; '.join(others[:3])}); none is reused for {context}."
        )
    keys = {c.key: latency_key(c, space.input_shapes[c.start + 1], space.act_class) for c in candidates}
    todo = sorted({k for k in keys.values() if k not in section["entries"]})
    by_key = {keys[c.key]: c for c in candidates}
    if todo:
        iterator: Iterable[str] = todo
        if progress:
            try:
                from tqdm.auto import tqdm

                iterator = tqdm(todo, desc="LayerMerge latency table", unit="entry")
            except ImportError:  # pragma: no cover - tqdm ships with lightning
                pass
        start = time.perf_counter()
        # Building the candidate layers initialises weights: keep the global RNG as it was, so that a run
        # that measures the table and one that reads it from the cache train identically afterwards.
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            for key in iterator:
                c = by_key[key]
                shape = space.input_shapes[c.start + 1]
                layer = _layer(c, space.act_class)
                section["entries"][key] = time_layer(layer, shape, batch_size, device, warmup, repeats)
        section["measured_s"] = section.get("measured_s", 0.0) + time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
    return {c.key: float(section["entries"][keys[c.key]]) for c in candidates}
