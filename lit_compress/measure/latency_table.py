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
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.measure._json_cache import read_cache
from lit_compress.measure.latency import measure_latency
from lit_compress.surgery.layermerge.blocks import ACTIVATION_CLASSES, Candidate, MergeSpace

__all__ = [
    "CACHE_FORMAT",
    "LatencyTableWarning",
    "check_plan_latency",
    "device_name",
    "inconsistent_entries",
    "latency_context",
    "latency_key",
    "latency_table",
    "measure_plan",
    "time_layer",
]


class LatencyTableWarning(UserWarning):
    """A latency table entry, or a plan's measured latency, disagrees with the others beyond noise."""


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
    return read_cache(path, CACHE_FORMAT, "a LayerMerge")


def time_layer(
    layer: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device | str, warmup: int, repeats: int
) -> float:
    """Milliseconds of one candidate layer on ``(batch_size, *input_shape)`` (the one place a table entry is timed)."""
    stats = measure_latency(
        layer, input_shape=tuple(input_shape), batch_size=batch_size, device=device, warmup=warmup, repeats=repeats
    )
    return float(stats["median_ms"])


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return None


def _group_and_kernel(key: str) -> tuple[str, int]:
    """Split an entry key into (everything but the kernel, kernel)."""
    parts = key.split("_")
    kernel = next(p for p in parts if p.startswith("k") and p[1:].isdigit())
    return "_".join(p for p in parts if p != kernel), int(kernel[1:])


def inconsistent_entries(entries: dict[str, float], noise: float = 0.1, slack: float = 3.0) -> dict[str, str]:
    """Entries that violate the obvious order of kernels on the same layer and shape: ``{key: why}``.

    Among entries that differ only in the kernel size ``k < K``, ``t(K)`` must lie within
    ``[(1 - noise) * t(k), slack * (K / k)**2 * t(k)]``: a larger kernel is not faster than a smaller
    one by more than noise, and not slower than its multiply-adds ratio allows by more than ``slack``.
    Both entries of a violating pair are named (which one is wrong is not known from the pair).
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for key in entries:
        group, kernel = _group_and_kernel(key)
        groups.setdefault(group, []).append((kernel, key))
    bad: dict[str, str] = {}
    for members in groups.values():
        members.sort()
        for i, (k, small) in enumerate(members):
            for big_k, big in members[i + 1 :]:
                t_small, t_big = entries[small], entries[big]
                if t_big < (1.0 - noise) * t_small:
                    why = f"{big} ({t_big:.3g} ms) is faster than the smaller kernel {small} ({t_small:.3g} ms)"
                elif t_big > slack * (big_k / k) ** 2 * t_small:
                    why = (
                        f"{big} ({t_big:.3g} ms) is more than {slack:g} x its multiply-adds ratio "
                        f"({(big_k / k) ** 2:.2f}) slower than {small} ({t_small:.3g} ms)"
                    )
                else:
                    continue
                bad.setdefault(small, why)
                bad.setdefault(big, why)
    return bad


def latency_table(
    space: MergeSpace,
    candidates: Sequence[Candidate],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 3,
    remeasure: int = 2,
    noise: float = 0.1,
    slack: float = 3.0,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """``{candidate.key: milliseconds}`` measured on ``device``; cached in ``cache`` (JSON) if given.

    Each entry is the best (minimum) of ``rounds`` interleaved rounds (every entry timed once per
    round, so a burst of load hits one round of many entries, not every round of one). The thread
    count is part of the cache context; the load average at measuring time is recorded with it.
    Entries (cached ones included) that violate the kernel order (:func:`inconsistent_entries`) are
    re-measured up to ``remeasure`` times; those still inconsistent are named in a
    :class:`LatencyTableWarning`.

    Needs ``space.input_shapes`` (:func:`~lit_compress.surgery.layermerge.blocks.site_input_shapes`).

    Raises:
        ConfigError: For a bad argument, missing input shapes, or a cache file of another format.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"`latency_batch_size`={batch_size!r} is not allowed: must be an int >= 1.")
    for name, value, least in (("latency_rounds", rounds, 1), ("latency_remeasure", remeasure, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"`{name}`={value!r} is not allowed: must be an int >= {least}.")
    if not (0.0 <= noise < 1.0) or slack < 1.0:
        raise ConfigError(f"`noise`={noise!r}, `slack`={slack!r} are not allowed: need 0 <= noise < 1 and slack >= 1.")
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
    by_key = {keys[c.key]: c for c in candidates}
    entries: dict[str, float] = section["entries"]
    todo = sorted({k for k in keys.values() if k not in entries})
    changed, seconds = False, 0.0
    if todo:
        seconds += _measure(space, by_key, todo, entries, device, batch_size, warmup, repeats, rounds, progress)
        changed = True
    ours = {k: float(entries[k]) for k in by_key}
    bad = inconsistent_entries(ours, noise, slack)
    for attempt in range(remeasure):
        if not bad:
            break
        log(f"LayerMerge: re-measuring {len(bad)} inconsistent latency entries (attempt {attempt + 1}): {sorted(bad)}")
        seconds += _measure(space, by_key, sorted(bad), entries, device, batch_size, warmup, repeats, rounds, False)
        changed = True
        ours = {k: float(entries[k]) for k in by_key}
        bad = inconsistent_entries(ours, noise, slack)
    if bad:
        warnings.warn(
            f"LayerMerge latency table ({context}): {len(bad)} entries stay inconsistent after {remeasure} "
            f"re-measurement(s); the plan may be wrong. "
            + "; ".join(f"{k}: {why}" for k, why in sorted(bad.items())[:6]),
            LatencyTableWarning,
            stacklevel=2,
        )
    if changed:
        section["threads"] = torch.get_num_threads()
        section["loadavg"] = _load_average()
        section["rounds"] = rounds
        section["measured_s"] = section.get("measured_s", 0.0) + seconds
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
    return {c.key: float(entries[keys[c.key]]) for c in candidates}


def _measure(
    space: MergeSpace,
    by_key: dict[str, Candidate],
    todo: Sequence[str],
    entries: dict[str, Any],
    device: torch.device | str,
    batch_size: int,
    warmup: int,
    repeats: int,
    rounds: int,
    progress: bool,
) -> float:
    """Time ``todo`` into ``entries``: the best of ``rounds`` interleaved rounds (fresh values replace old ones)."""
    start = time.perf_counter()
    # Building the candidate layers initialises weights: keep the global RNG as it was, so that a run
    # that measures the table and one that reads it from the cache train identically afterwards.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        layers = {key: _layer(by_key[key], space.act_class) for key in todo}
        best = dict.fromkeys(todo, float("inf"))
        iterator: Iterable[int] = range(rounds)
        if progress:
            try:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"LayerMerge latency table ({len(todo)} entries)", unit="round")
            except ImportError:  # pragma: no cover - tqdm ships with lightning
                pass
        for _ in iterator:
            for key in todo:
                shape = space.input_shapes[by_key[key].start + 1]
                ms = time_layer(layers[key], shape, batch_size, device, warmup, repeats)
                best[key] = min(best[key], ms)
    entries.update(best)
    return time.perf_counter() - start


class _PlanChain(nn.Module):
    """The chosen blocks' layers run back to back, each on a fixed input of its own shape (batch first)."""

    def __init__(self, layers: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, x in enumerate(inputs):
            self.register_buffer(f"input{i}", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x only fixes the device (measure_latency draws it)
        out = x
        for i, layer in enumerate(self.layers):
            out = layer(getattr(self, f"input{i}"))
        return out


def measure_plan(
    space: MergeSpace,
    chosen: Sequence[Candidate],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 3,
) -> float:
    """Milliseconds of the chosen blocks' layers run together in one call, best of ``rounds``.

    This is what the summed table entries of the plan predict (the non-conv layers around them are
    the same in every plan and are not timed). The global RNG is left alone.
    """
    if not chosen:
        raise ConfigError("`chosen`=[] is not allowed: a plan has at least one block.")
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        layers = [_layer(c, space.act_class) for c in chosen]
        inputs = [torch.rand(batch_size, *space.input_shapes[c.start + 1]) for c in chosen]
        chain = _PlanChain(layers, inputs)
        first = space.input_shapes[chosen[0].start + 1]
        return min(time_layer(chain, first, batch_size, device, warmup, repeats) for _ in range(rounds))


def check_plan_latency(measured_ms: float, predicted_ms: float, budget_ms: float, tolerance: float = 0.15) -> list[str]:
    """Compare a plan's measured latency with its table sum and the budget; warn and return the problems.

    A :class:`LatencyTableWarning` is issued if the measured plan exceeds the budget by more than
    ``tolerance`` (relative), or differs from the table's prediction by more than ``tolerance``.
    """
    problems = []
    if measured_ms > budget_ms * (1.0 + tolerance):
        problems.append(
            f"the plan measures {measured_ms:.3g} ms, over its budget of {budget_ms:.3g} ms by "
            f"{measured_ms / budget_ms - 1:.0%}"
        )
    if abs(measured_ms - predicted_ms) > tolerance * predicted_ms:
        problems.append(
            f"the plan measures {measured_ms:.3g} ms but its latency table entries sum to {predicted_ms:.3g} ms"
        )
    if problems:
        warnings.warn(
            "LayerMerge: " + "; ".join(problems) + " (a table measured under load? re-measure it: delete the cache).",
            LatencyTableWarning,
            stacklevel=2,
        )
    return problems
