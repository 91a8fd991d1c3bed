"""LayerMerge's tables (spec §2.3, §2.4): measured latency T(s, e, c) and importance I(s, e, c).

**Latency.** Each candidate is timed as ``Conv2d(C_in, C_out, K, stride, padding=K // 2, groups=C
if depthwise, bias) -> activation`` on the block's real input shape at a configurable batch, on
the device given (the one the user trains on). Equal configurations are timed once. Results are
cached in a JSON file under a *context* key (device name, torch version, dtype, batch, threads);
entries are keyed by the layer configuration and input shape, so a table measured on another
device or for another shape is never reused: it simply does not match (and a message says so).

**Importance.** For every candidate that changes the network, a copy of the model gets that one
block (:func:`~lit_compress.surgery.merge_plan.single_block_plan`) and is scored on held-out
batches against the unmodified model:

- ``"finetune"`` (the spec's): fine-tune the copy for ``steps`` SGD steps (Nesterov, momentum 0.9),
  then ``I = exp(Δacc / 100)`` with accuracies in points (``exp(-Δloss / base_loss)`` when the
  batches have no class labels);
- ``"loss_proxy"`` (cheap): re-estimate the copy's BatchNorm statistics on a few training batches,
  no gradient step, then ``I = exp(-Δloss / base_loss)``.

Unmodified single-conv blocks have ``I = 1`` (Δ = 0) without any computation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.merge_blocks import Candidate, MergeSpace
from lit_compress.surgery.merge_plan import apply_merge_plan_, single_block_plan

__all__ = [
    "CACHE_FORMAT",
    "IMPORTANCE_METHODS",
    "device_name",
    "importance_table",
    "latency_context",
    "latency_key",
    "latency_table",
    "original_latency",
]

CACHE_FORMAT = "lit_compress.layermerge_latency"
IMPORTANCE_METHODS = ("finetune", "loss_proxy")

# forward_loss(model, batch) -> (mean loss tensor, number correct or None, number of samples)
ForwardLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int | None, int]]


# --------------------------------------------------------------------------------------------
# latency
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
    from lit_compress.surgery.merge_plan import _ACT_CLASSES

    conv = nn.Conv2d(
        c.in_channels,
        c.out_channels,
        c.kernel,
        c.stride,
        c.kernel // 2,
        groups=c.out_channels if c.depthwise else 1,
        bias=True,
    )
    return nn.Sequential(conv, _ACT_CLASSES.get(act, nn.ReLU)())


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

    Needs ``space.input_shapes`` (:func:`~lit_compress.surgery.merge_blocks.site_input_shapes`).

    Raises:
        ConfigError: For a bad argument, missing input shapes, or a cache file of another format.
    """
    from lit_compress.measure.latency import measure_latency

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
        for key in iterator:
            c = by_key[key]
            shape = space.input_shapes[c.start + 1]
            layer = _layer(c, space.act_class)
            stats = measure_latency(
                layer, input_shape=tuple(shape), batch_size=batch_size, device=device, warmup=warmup, repeats=repeats
            )
            section["entries"][key] = float(stats["median_ms"])
        section["measured_s"] = section.get("measured_s", 0.0) + time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
    return {c.key: float(section["entries"][keys[c.key]]) for c in candidates}


def original_latency(space: MergeSpace, candidates: Sequence[Candidate], table: dict[str, float]) -> float:
    """The summed table latency of the unmodified network (every site its own, unchanged block)."""
    originals = {c.end: c for c in candidates if c.is_original(space)}
    if len(originals) != space.depth:
        raise ConfigError("LayerMerge: the table lacks an unmodified single-conv entry for some site.")
    return float(sum(table[originals[p].key] for p in range(1, space.depth + 1)))


# --------------------------------------------------------------------------------------------
# importance
# --------------------------------------------------------------------------------------------


def _evaluate(model: nn.Module, batches: Sequence[Any], forward_loss: ForwardLoss) -> tuple[float, float | None]:
    model.eval()
    total, correct, n_all, has_acc = 0.0, 0, 0, True
    with torch.no_grad():
        for batch in batches:
            loss, n_correct, n = forward_loss(model, batch)
            total += float(loss) * n
            n_all += n
            if n_correct is None:
                has_acc = False
            else:
                correct += int(n_correct)
    n_all = max(n_all, 1)
    return total / n_all, (100.0 * correct / n_all if has_acc else None)


def _score(base: tuple[float, float | None], new: tuple[float, float | None], use_acc: bool) -> float:
    if use_acc and base[1] is not None and new[1] is not None:
        return math.exp((new[1] - base[1]) / 100.0)
    if not math.isfinite(new[0]):
        return 0.0
    return math.exp(-(new[0] - base[0]) / max(base[0], 1e-8))


def importance_table(
    model: nn.Module,
    space: MergeSpace,
    candidates: Sequence[Candidate],
    *,
    train_batches: Sequence[Any],
    holdout_batches: Sequence[Any],
    forward_loss: ForwardLoss,
    method: str = "loss_proxy",
    steps: int = 50,
    lr: float = 0.01,
    weight_decay: float = 1e-5,
    bn_batches: int = 5,
    progress: bool = True,
) -> dict[str, float]:
    """``{candidate.key: importance}``; see the module docstring for the two methods.

    ``model`` is not modified (each candidate is scored on a deep copy).

    Raises:
        ConfigError: For an unknown ``method`` or empty batch lists.
    """
    if method not in IMPORTANCE_METHODS:
        raise ConfigError(f"`importance`={method!r} is not allowed: must be one of {', '.join(IMPORTANCE_METHODS)}.")
    if not train_batches or not holdout_batches:
        raise ConfigError("LayerMerge importance: needs at least one training and one held-out batch.")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"`importance_steps`={steps!r} is not allowed: must be an int >= 1.")
    from lit_compress.surgery.bn_stats import reestimate_batchnorm_

    was_training = model.training
    base = _evaluate(model, holdout_batches, forward_loss)
    model.train(was_training)
    table: dict[str, float] = {}
    todo = [c for c in candidates if not c.is_original(space)]
    for c in candidates:
        if c.is_original(space):
            table[c.key] = 1.0
    iterator: Iterable[Candidate] = todo
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(todo, desc=f"LayerMerge importance ({method})", unit="entry")
        except ImportError:  # pragma: no cover
            pass
    for c in iterator:
        trial = copy.deepcopy(model)
        apply_merge_plan_(trial, single_block_plan(space, c.start, c.end, list(c.kept)), space=space)
        if method == "loss_proxy":
            reestimate_batchnorm_(
                trial, list(train_batches)[:bn_batches], forward=lambda m, b: forward_loss(m, b), num_batches=bn_batches
            )
        else:
            trial.train()
            params = [p for p in trial.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for step in range(steps):
                loss, _, _ = forward_loss(trial, train_batches[step % len(train_batches)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        table[c.key] = _score(base, _evaluate(trial, holdout_batches, forward_loss), method == "finetune")
        del trial
    return table
