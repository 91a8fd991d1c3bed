"""The compression report written at fit end: JSON, a Markdown table and a plot.

Input is plain data, so the report can be rebuilt from a saved JSON file or written by hand:

- ``events``: one dict per structural event, in order, with ``"op"`` (str), ``"index"``
  (int), ``"epoch"`` and ``"global_step"`` (int), ``"callback"`` (str), ``"before"`` and
  ``"after"`` (metric dicts) and ``"wall_s"`` (float, time the event took). Any field may be
  missing; other fields are kept in the JSON.
- ``initial`` / ``final``: metric dicts of the original and the final model.
- ``meta``: versions, machine, seed, ... (shown at the top of the Markdown).

A metric dict holds ``"params"``, ``"params_all"``, ``"flops"``, ``"latency_ms"`` and any
number of validation metrics (every other numeric key, e.g. ``"val_acc"``); ``"epoch"``,
``"global_step"`` and ``"step"`` are read as the position, not as metrics. ``None`` or a
missing value shows as "–". This module does not import Lightning; matplotlib is imported
only when the plot is drawn.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_compress.errors import allowed

REPORT_FORMAT = "lit_compress.compression_report"
REPORT_VERSION = 1
JSON_NAME = "compression_report.json"
MARKDOWN_NAME = "compression_report.md"
PNG_NAME = "compression_report.png"

DASH = "–"
MODEL_METRICS = ("params", "params_all", "flops", "latency_ms")
POSITION_KEYS = ("epoch", "global_step", "step")
_PREFIXES = ("", "k", "M", "G", "T", "P")


# --------------------------------------------------------------------------- formatting


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` if it is missing or not a number."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _si(value: float, unit: str) -> str:
    sign, v, i = ("-" if value < 0 else ""), abs(value), 0
    while v >= 999.5 and i < len(_PREFIXES) - 1:
        v /= 1000.0
        i += 1
    text = f"{v:.3g}" if i or v != int(v) else f"{int(v)}"
    suffix = f"{_PREFIXES[i]}{unit}"
    return f"{sign}{text} {suffix}" if suffix else f"{sign}{text}"


def format_count(value: Any) -> str:
    """A parameter count, e.g. ``936``, ``45.6 k``, ``1.23 M``; "–" when missing."""
    x = _number(value)
    return DASH if x is None else _si(x, "")


def format_flops(value: Any) -> str:
    """FLOPs, e.g. ``812 FLOPs``, ``45.6 MFLOPs``, ``1.2 GFLOPs``; "–" when missing."""
    x = _number(value)
    return DASH if x is None else _si(x, "FLOPs")


def format_ms(value: Any) -> str:
    """Milliseconds with 3 significant digits (``1.43``, ``23.8``, ``1234``); "–" when missing."""
    x = _number(value)
    if x is None:
        return DASH
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def format_metric(value: Any) -> str:
    """A validation metric with 4 significant digits; "–" when missing."""
    x = _number(value)
    return DASH if x is None else f"{x:.4g}"


def format_change(value: Any, reference: Any) -> str:
    """Relative change of ``value`` against ``reference`` in percent, e.g. ``-49.6 %``."""
    x, ref = _number(value), _number(reference)
    if x is None or ref is None or ref == 0:
        return DASH
    return f"{(x / ref - 1.0) * 100.0:+.1f} %"


# --------------------------------------------------------------------------- rows


def _check_inputs(events: Any, initial: Any, final: Any, meta: Any) -> None:
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
        raise allowed("events", type(events).__name__, "a list of event dicts")
    for i, event in enumerate(events):
        if not isinstance(event, Mapping):
            raise allowed(f"events[{i}]", type(event).__name__, "a dict with 'op', 'index', 'before', 'after', ...")
    for name, value in (("initial", initial), ("final", final), ("meta", meta)):
        if value is not None and not isinstance(value, Mapping):
            raise allowed(name, type(value).__name__, "a dict (or None)")


def _metrics_of(record: Any) -> Mapping[str, Any]:
    return record if isinstance(record, Mapping) else {}


def metric_names(events: Sequence[Mapping[str, Any]], initial: Mapping | None, final: Mapping | None) -> list[str]:
    """Names of the validation metrics, in order of first appearance."""
    names: list[str] = []
    sources = [_metrics_of(initial)]
    for event in events:
        sources += [_metrics_of(event.get("before")), _metrics_of(event.get("after"))]
    sources.append(_metrics_of(final))
    for metrics in sources:
        for key, value in metrics.items():
            if key in MODEL_METRICS or key in POSITION_KEYS or key in names:
                continue
            if value is None or _number(value) is not None:
                names.append(str(key))
    return names


def _position(record: Mapping[str, Any]) -> str:
    step = record.get("global_step", record.get("step"))
    epoch = record.get("epoch")
    if step is None and epoch is None:
        return DASH
    return f"{DASH if step is None else step} / {DASH if epoch is None else epoch}"


def _event_label(event: Mapping[str, Any], position: int) -> str:
    index = event.get("index", position)
    label = f"#{index} {event.get('op', '?')}"
    callback = event.get("callback")
    return f"{label} ({callback})" if callback else label


def report_rows(
    events: Sequence[Mapping[str, Any]], initial: Mapping | None, final: Mapping | None
) -> list[dict[str, Any]]:
    """One row per model state: ``{"label", "short", "position", "metrics"}``.

    The original model first, then each event (its ``"after"`` metrics), then the final model.
    """
    rows = [
        {
            "label": "original",
            "short": "orig",
            "position": _position(_metrics_of(initial)),
            "metrics": _metrics_of(initial),
        }
    ]
    for i, event in enumerate(events):
        rows.append(
            {
                "label": _event_label(event, i),
                "short": f"#{event.get('index', i)} {event.get('op', '?')}",
                "position": _position(event),
                "metrics": _metrics_of(event.get("after")),
            }
        )
    rows.append(
        {"label": "final", "short": "final", "position": _position(_metrics_of(final)), "metrics": _metrics_of(final)}
    )
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ratio(value: Any, reference: Any) -> float | None:
    x, ref = _number(value), _number(reference)
    return None if x is None or ref is None or ref == 0 else x / ref


def _summary_lines(initial: Mapping | None, final: Mapping | None) -> list[str]:
    a, b = _metrics_of(initial), _metrics_of(final)
    lines = []
    for key, label, fmt in (("params", "params", format_count), ("flops", "FLOPs", format_flops)):
        ratio = _ratio(b.get(key), a.get(key))
        if ratio is not None:
            lines.append(
                f"- {label}: {fmt(a.get(key))} → {fmt(b.get(key))} (×{ratio:.3g}, "
                f"{format_change(b.get(key), a.get(key))})"
            )
    ratio = _ratio(a.get("latency_ms"), b.get("latency_ms"))
    if ratio is not None:
        lines.append(
            f"- latency: {format_ms(a.get('latency_ms'))} ms → {format_ms(b.get('latency_ms'))} ms "
            f"(speed-up ×{ratio:.3g})"
        )
    return lines


def format_report_markdown(
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The report as Markdown: meta, a summary, and one table row per model state.

    Columns: step / epoch, event, params, Δparams % (against the original), FLOPs,
    latency ms, then one column per validation metric.
    """
    _check_inputs(events, initial, final, meta)
    names = metric_names(events, initial, final)
    header = ["step / epoch", "event", "params", "Δparams %", "FLOPs", "latency ms", *names]
    original = _metrics_of(initial).get("params")
    lines = ["# Compression report", ""]
    for key, value in (meta or {}).items():
        text = value if isinstance(value, str) else json.dumps(_jsonable(value), sort_keys=True)
        lines.append(f"- **{_cell(key)}**: {_cell(text)}")
    if meta:
        lines.append("")
    summary = _summary_lines(initial, final)
    if summary:
        lines += [*summary, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for row in report_rows(events, initial, final):
        m = row["metrics"]
        cells = [
            row["position"],
            row["label"],
            format_count(m.get("params")),
            format_change(m.get("params"), original),
            format_flops(m.get("flops")),
            format_ms(m.get("latency_ms")),
            *(format_metric(m.get(name)) for name in names),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    """Plain JSON data: NaN/inf become ``None``, small tensors lists, other objects strings."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if value.numel() <= 16:
            return _jsonable(value.detach().cpu().tolist())
        return f"Tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def report_dict(
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: format, version, meta, initial, final, events and a summary of ratios."""
    _check_inputs(events, initial, final, meta)
    a, b = _metrics_of(initial), _metrics_of(final)
    return _jsonable(
        {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "meta": dict(meta or {}),
            "initial": dict(a),
            "final": dict(b),
            "events": [dict(e) for e in events],
            "summary": {
                "num_events": len(events),
                "params_ratio": _ratio(b.get("params"), a.get("params")),
                "flops_ratio": _ratio(b.get("flops"), a.get("flops")),
                "latency_speedup": _ratio(a.get("latency_ms"), b.get("latency_ms")),
            },
        }
    )


# --------------------------------------------------------------------------- plot


def plot_report(
    path: str | Path,
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
) -> str:
    """Draw params, FLOPs, latency (relative to the original) and validation metrics per row.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report_rows(events, initial, final)
    names = metric_names(events, initial, final)
    xs = list(range(len(rows)))
    labels = [r["short"] for r in rows]
    fig = Figure(figsize=(max(7.0, 3.0 + 0.45 * len(rows)), 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    original = _metrics_of(initial)
    for ax, (key, title) in zip(axes[:3], (("params", "parameters"), ("flops", "FLOPs"), ("latency_ms", "latency"))):
        raw = [_number(r["metrics"].get(key)) for r in rows]
        ref = _number(original.get(key))
        relative = ref is not None and ref != 0
        scale = ref if ref else 1.0  # 1.0: absolute values where there is no original to divide by
        ys = [math.nan if v is None else v / scale for v in raw]
        _draw(ax, xs, ys, title)
        ax.set_ylabel("relative to original" if relative else ("ms" if key == "latency_ms" else "count"))
        if relative:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax = axes[3]
    for name in names:
        values = [_number(r["metrics"].get(name)) for r in rows]
        _draw(ax, xs, [math.nan if v is None else v for v in values], "validation", label=name)
    if names:
        ax.legend(fontsize="small")
    else:
        _draw(ax, xs, [math.nan] * len(xs), "validation")
    step = max(1, math.ceil(len(xs) / 30))
    for ax in axes[2:]:
        ax.set_xticks(xs[::step], labels[::step], rotation=45, ha="right", fontsize="small")
        ax.set_xlabel("event")
    fig.suptitle("lit_compress compression report")
    fig.savefig(path, format="png", dpi=100)
    return str(path)


def _draw(ax: Any, xs: list[int], ys: list[float], title: str, label: str | None = None) -> None:
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if all(math.isnan(y) for y in ys):
        if label is None:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    ax.plot(xs, ys, marker="o", label=label)


# --------------------------------------------------------------------------- files


def write_report(
    out_dir: str | Path,
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``compression_report.{json,md,png}`` into ``out_dir`` (created if needed).

    Returns:
        ``{"json": path, "markdown": path, "png": path}``; ``"png"`` is left out (with a warning)
        if the plot cannot be drawn.
    """
    _check_inputs(events, initial, final, meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / JSON_NAME), "markdown": str(out / MARKDOWN_NAME)}
    doc = report_dict(events=events, initial=initial, final=final, meta=meta)
    Path(paths["json"]).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    markdown = format_report_markdown(events=events, initial=initial, final=final, meta=meta)
    Path(paths["markdown"]).write_text(markdown, encoding="utf-8")
    try:
        paths["png"] = plot_report(out / PNG_NAME, events=events, initial=initial, final=final)
    except Exception as err:
        warnings.warn(f"lit_compress: the compression plot was not drawn ({type(err).__name__}: {err}).", stacklevel=2)
    return paths


__all__ = [
    "format_change",
    "format_count",
    "format_flops",
    "format_metric",
    "format_ms",
    "format_report_markdown",
    "metric_names",
    "plot_report",
    "report_dict",
    "report_rows",
    "write_report",
]
