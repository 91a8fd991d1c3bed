"""ALDS latency tables: each target layer and a few of its ``(k, j)`` decompositions, timed on the device.

For every decomposable target the input shape it sees is recorded (one forward pass on the example
input); then, per distinct layer configuration and input shape, the dense layer and the candidates
``k ∈ groups`` (those dividing the input channels) × ``ranks_per_group`` ranks spaced geometrically
from ``min_rank`` to the largest rank that is still smaller than dense are timed *together*, in
interleaved rounds (:func:`lit_compress.measure.latency.measure_interleaved`), so a loaded machine
hits them alike. Ranks in between are interpolated by the allocator
(:mod:`lit_compress.surgery.alds.latency_budget`).

Sanity check: within one ``k`` a larger rank has more FLOPs, so it must not time faster than a smaller
one by more than ``noise`` (relative); if it does, the configuration is timed again and the faster of
the two runs kept per entry; what remains non-monotone is raised to the running maximum (a
conservative envelope) and counted in ``info["remeasured"]``/``info["flattened"]``.

Cached in a JSON file under the same context key as LayerMerge's tables (device, torch version, dtype,
batch, CPU threads): a table from another device or batch never matches.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_compress.errors import ConfigError, allowed
from lit_compress.inputs import ExampleInputs, split_inputs
from lit_compress.measure._json_cache import read_cache
from lit_compress.measure.latency import measure_interleaved
from lit_compress.measure.latency_table import latency_context
from lit_compress.surgery.alds.latency_budget import LayerLatency
from lit_compress.surgery.alds.low_rank import (
    LowRankLayer,
    divisors,
    layer_shape,
    low_rank_like,
    max_rank,
    recompose_layer,
)
from lit_compress.surgery.modules import get_submodule, module_device_dtype, preserve_mode

__all__ = ["CACHE_FORMAT", "Timer", "alds_latency_table", "candidate_ranks", "layer_input_shapes"]

CACHE_FORMAT = "lit_compress.alds_latency"
#: ``timer(modules, input_shape) -> ms per module`` (one sample's shape, without the batch dimension).
Timer = Callable[[Sequence[nn.Module], tuple[int, ...]], list[float]]


@torch.no_grad()
def layer_input_shapes(model: nn.Module, names: Sequence[str], example_inputs: ExampleInputs) -> dict[str, tuple]:
    """The shape (without the batch dimension) of the first input each named layer sees in one forward pass."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape[1:])

        hooks.append(get_submodule(model, name).register_forward_pre_hook(hook))
    try:
        args, kwargs = split_inputs(example_inputs)
        with preserve_mode(model):
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(f"ALDS latency table: the layers {missing[:5]} are not called in the model's forward pass.")
    return shapes


def candidate_ranks(f: int, c: int, kk: int, k: int, min_rank: int = 2, count: int = 4) -> list[int]:
    """``count`` ranks from ``min_rank`` to the largest one smaller than dense, geometrically spaced."""
    top = min((f * c * kk - 1) // (k * f + c * kk), max_rank(f, c, kk, k))
    if top < min_rank:
        return []
    return sorted({round(float(x)) for x in np.geomspace(min_rank, top, count)})


def _config_key(layer: nn.Module, shape: tuple) -> str:
    f, c, _ = layer_shape(layer)
    bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Conv2d):
        return (
            f"conv_in{c}_out{f}_k{layer.kernel_size}_s{layer.stride}_p{layer.padding}_d{layer.dilation}"
            f"_{layer.padding_mode}_b{int(bias)}_x{list(shape)}"
        ).replace(" ", "")
    return f"linear_in{c}_out{f}_b{int(bias)}_x{list(shape)}".replace(" ", "")


def _default_timer(device: torch.device, batch_size: int, rounds: int, repeats: int, warmup: int) -> Timer:
    def timer(modules: Sequence[nn.Module], shape: tuple[int, ...]) -> list[float]:
        _, dtype = module_device_dtype(modules[0])
        x = torch.randn(batch_size, *shape, device=device, dtype=dtype)
        stats = measure_interleaved(modules, x, rounds=rounds, repeats=repeats, warmup=warmup, device=device)
        return [float(s["median_ms"]) for s in stats]

    return timer


def _read_cache(path: Path | None) -> dict[str, Any]:
    return read_cache(path, CACHE_FORMAT, "an ALDS")


def _measure(
    layer: nn.Module, shape: tuple, cands: list[tuple[int, int]], timer: Timer, noise: float
) -> tuple[dict[str, float], int, int]:
    """``{"dense": ms, "k{k}_j{j}": ms}`` for one configuration, with the monotonicity check (see the module)."""
    dense: Any = layer
    modules: list[nn.Module] = [layer] + [low_rank_like(dense, k, j) for k, j in cands]
    ms = np.array(timer(modules, shape), dtype=np.float64)

    def suspicious(values: np.ndarray) -> bool:
        for k in {k for k, _ in cands}:
            idx = [i + 1 for i, (k2, _) in enumerate(cands) if k2 == k]  # ascending j
            t = values[idx]
            if (t[1:] < np.maximum.accumulate(t)[:-1] * (1 - noise)).any():
                return True
        return False

    remeasured = flattened = 0
    if suspicious(ms):
        ms = np.minimum(ms, np.array(timer(modules, shape), dtype=np.float64))
        remeasured = 1
    for k in {k for k, _ in cands}:
        idx = [i + 1 for i, (k2, _) in enumerate(cands) if k2 == k]
        env = np.maximum.accumulate(ms[idx])
        flattened += int((env > ms[idx]).sum())
        ms[idx] = env
    entry = {"dense": float(ms[0])}
    entry.update({f"k{k}_j{j}": float(t) for (k, j), t in zip(cands, ms[1:])})
    return entry, remeasured, flattened


def alds_latency_table(
    model: nn.Module,
    names: Sequence[str],
    example_inputs: ExampleInputs,
    *,
    groups: Sequence[int] = (1, 2, 4, 8),
    ranks_per_group: int = 4,
    min_rank: int = 2,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    rounds: int = 3,
    repeats: int = 5,
    warmup: int = 2,
    noise: float = 0.1,
    cache: str | os.PathLike[str] | None = None,
    timer: Timer | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> tuple[dict[str, LayerLatency], dict[str, Any]]:
    """Per-layer latency tables for ``names`` (decomposable layers of ``model``) and a summary.

    Args:
        example_inputs: One forward pass on it records each layer's input shape.
        groups: The ``k`` to time (only the divisors of each layer's input channels are used).
        ranks_per_group: Ranks timed per ``k`` (geometric from ``min_rank`` to the largest one below dense).
        device: Where to time; default: the model's device.
        batch_size: Batch the layers are timed at.
        rounds, repeats, warmup: Of :func:`~lit_compress.measure.latency.measure_interleaved`.
        noise: Relative tolerance of the monotonicity check.
        cache: JSON cache file (created if missing).
        timer: Replaces the timing (tests inject deterministic timings).
        num_threads: CPU threads to time with (``None``: as set); part of the cache key.

    Returns:
        ``({name: LayerLatency}, info)``; ``info`` holds ``"context"``, ``"entries"``, ``"measured"``,
        ``"cached"``, ``"remeasured"``, ``"flattened"`` and ``"seconds"``.
    """
    for name, value, least in (("ranks_per_group", ranks_per_group, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise allowed(name, value, f"must be an int >= {least}")
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise allowed("latency_threads", num_threads, "must be an int >= 1 or None")
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _table(
            model,
            names,
            example_inputs,
            groups,
            ranks_per_group,
            min_rank,
            device,
            batch_size,
            rounds,
            repeats,
            warmup,
            noise,
            cache,
            timer,
            progress,
        )
    finally:
        torch.set_num_threads(before)


def _table(
    model: nn.Module,
    names: Sequence[str],
    example_inputs: ExampleInputs,
    groups: Sequence[int],
    ranks_per_group: int,
    min_rank: int,
    device: torch.device | str | None,
    batch_size: int,
    rounds: int,
    repeats: int,
    warmup: int,
    noise: float,
    cache: str | os.PathLike[str] | None,
    timer: Timer | None,
    progress: bool,
) -> tuple[dict[str, LayerLatency], dict[str, Any]]:
    if not groups or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in groups):
        raise allowed("latency_groups", list(groups), "must be a non-empty list of ints >= 1")
    start = time.perf_counter()
    target = torch.device(device) if device is not None else module_device_dtype(model)[0]
    _, dtype = module_device_dtype(model)
    timer = timer or _default_timer(target, batch_size, rounds, repeats, warmup)
    shapes = layer_input_shapes(model, names, example_inputs)
    path = Path(cache) if cache is not None else None
    data = _read_cache(path)
    context = latency_context(target, batch_size, dtype)
    section = data["tables"].setdefault(context, {"entries": {}})
    info: dict[str, Any] = {"context": context, "measured": 0, "cached": 0, "remeasured": 0, "flattened": 0}
    layers: dict[str, tuple[nn.Module, list[tuple[int, int]], str]] = {}
    for name in names:
        layer = get_submodule(model, name)
        if isinstance(layer, LowRankLayer):
            layer = recompose_layer(layer)
        f, c, kk = layer_shape(layer)
        ks = [k for k in sorted(set(groups)) if k in divisors(c)]
        cands = [(k, j) for k in ks for j in candidate_ranks(f, c, kk, k, min_rank, ranks_per_group)]
        layers[name] = (layer, cands, _config_key(layer, shapes[name]))
    todo: dict[str, tuple[nn.Module, list[tuple[int, int]], tuple]] = {}
    for name, (layer, cands, key) in layers.items():
        have = section["entries"].get(key, {})
        if "dense" in have and all(f"k{k}_j{j}" in have for k, j in cands):
            continue
        if key not in todo:  # a copy: the model's own layer stays where it is
            todo[key] = (copy.deepcopy(layer).to(target), cands, shapes[name])
    iterator: Iterable[str] = todo
    if progress and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(list(todo), desc="ALDS latency table", unit="layer config", leave=False)
    measured_start = time.perf_counter()
    for key in iterator:
        layer, cands, shape = todo[key]
        entry, remeasured, flattened = _measure(layer, shape, cands, timer, noise)
        section["entries"][key] = {**section["entries"].get(key, {}), **entry}
        info["remeasured"] += remeasured
        info["flattened"] += flattened
    if todo:
        section["measured_s"] = section.get("measured_s", 0.0) + time.perf_counter() - measured_start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
    info["measured"] = len(todo)
    info["cached"] = len({key for _, _, key in layers.values()}) - len(todo)
    out: dict[str, LayerLatency] = {}
    for name, (_, cands, key) in layers.items():
        e = section["entries"][key]
        points: dict[int, list[tuple[int, float]]] = {}
        for k, j in cands:
            points.setdefault(k, []).append((j, float(e[f"k{k}_j{j}"])))
        out[name] = LayerLatency(float(e["dense"]), points)
    info["entries"] = len(section["entries"])
    info["seconds"] = time.perf_counter() - start
    return out, info
