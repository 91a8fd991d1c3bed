"""What every benchmark prints beside its numbers: machine, versions, seed, config."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def environment() -> dict[str, Any]:
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def interleaved_latency(
    models: list[nn.Module], example: torch.Tensor, batches: tuple[int, ...], repeats: int = 20, rounds: int = 5
) -> list[dict[int, float]]:
    """CPU latency (ms) of each model at each batch, robust to background load on a shared machine.

    ``example`` is one input of batch 1 (e.g. ``(1, 1, 28, 28)`` images or ``(1, T)`` token ids); it
    is repeated along the batch dimension to each batch size.

    For each of ``rounds`` rounds, every model in turn is timed (``measure_latency``: eval mode,
    2 threads, 3 warm-ups, median of ``repeats`` calls, denormals flushed); a model's latency is
    its smallest round median. Interleaving gives every model the same share of whatever else runs
    on the machine, and the minimum discards rounds another process disturbed (on this 2-core
    machine one model's median varied by up to 20 % between back-to-back measurements).
    """
    from lit_compress.measure import measure_latency

    best: list[dict[int, float]] = [{b: math.inf for b in batches} for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            for b in batches:
                lat = measure_latency(model, example, batch_size=b, warmup=3, repeats=repeats, num_threads=2)
                best[i][b] = min(best[i][b], float(lat["median_ms"]))
    return best


def time_rows(
    timed: list[tuple[dict[str, Any], nn.Module]],
    example: torch.Tensor,
    batches: tuple[int, ...],
    repeats: int,
    rounds: int = 5,
) -> None:
    """Fill ``row["lat_b<B>_ms"]`` of every ``(row, model)``.

    The models are timed together (:func:`interleaved_latency`).
    """
    lats = interleaved_latency([m for _, m in timed], example, batches, repeats=repeats, rounds=rounds)
    for (row, _), lat in zip(timed, lats):
        row.update({f"lat_b{b}_ms": lat[b] for b in batches})


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any, every: int = 1) -> float:
    """Top-1 % of a classifier on ``loader`` (only every ``every``-th batch), in eval mode; the mode is restored."""
    was = model.training
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if i % every:
            continue
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / total


@torch.no_grad()
def perplexity(model: nn.Module, loader: Any) -> float:
    """Perplexity of a language model's (B, T, V) logits on ``(x, y)`` batches, in eval mode; the mode is restored."""
    was = model.training
    model.eval()
    loss_sum = n = 0.0
    for x, y in loader:
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        n += y.numel()
    model.train(was)
    return math.exp(loss_sum / n)


def headline(
    method: str,
    task: str,
    variant: str,
    metric: str,
    value: float,
    baseline: float,
    params: int,
    baseline_params: int,
    higher_is_better: bool = True,
    latency_b64_ms: float | None = None,
    baseline_latency_b64_ms: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One headline row for ``benchmarks/RESULTS.md`` and the README plot: a method against its baseline."""
    return {
        "method": method,
        "task": task,
        "variant": variant,
        "metric": metric,
        "value": float(value),
        "baseline": float(baseline),
        "params": int(params),
        "baseline_params": int(baseline_params),
        "higher_is_better": higher_is_better,
        "latency_b64_ms": latency_b64_ms,
        "baseline_latency_b64_ms": baseline_latency_b64_ms,
        "note": note,
    }


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    out_dir: str | Path,
    headlines: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``.md`` (a table of ``rows``) and print the table.

    ``headlines`` (see :func:`headline`) are the rows ``python -m benchmarks.run_all`` puts first in
    ``RESULTS.md`` and in its plot.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"env": env, "config": config, "rows": rows, "headlines": headlines or []}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    cols: list[str] = []
    for row in rows:  # the union of every row's columns, in first-seen order
        cols += [c for c in row if c not in cols]
    lines = [f"# {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    lines += ["", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "", "Config: " + json.dumps(config)]
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return out / f"{name}.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)
