"""The compression report written at fit end: JSON, a Markdown table and a plot.

Input is plain data, so the report can be rebuilt from a saved JSON file or written by hand:

- ``events``: one dict per structural event, in order, with ``"op"`` (str), ``"index"``
  (int), ``"epoch"`` and ``"global_step"`` (int), ``"callback"`` (str), ``"before"`` and
  ``"after"`` (metric dicts) and ``"wall_s"`` (float, time the event took). Any field may be
  missing; other fields are kept in the JSON.
- ``initial`` / ``final``: metric dicts of the original and the final model.
- ``meta``: versions, machine, seed, ... (shown at the top of the Markdown).
- ``latency`` (optional): the original and the final model timed together, ``{"original": {...},
  "final": {...}, "rounds", "repeats", "batch_size", "device"}`` with ``"median_ms"``, ``"p10_ms"``
  and ``"p90_ms"`` per model (see :func:`lit_compress.measure.measure_interleaved`).
- ``notes`` (optional): sentences about what did not happen (a scheduled event that never ran, a
  LayerCollapse slope short of ``tau``), listed under the summary.

A metric dict holds ``"params"``, ``"params_all"``, ``"flops"``, ``"latency_ms"`` (the median),
``"latency_p10_ms"`` / ``"latency_p90_ms"`` (its spread) and any number of validation metrics
(every other numeric key, e.g. ``"val_acc"``); ``"epoch"``,
``"global_step"`` and ``"step"`` are read as the position, not as metrics. ``None`` or a
missing value shows as "–". This module does not import Lightning; matplotlib is imported
only when the plot is drawn.

Latency is shown as a result only when it is one: a speed-up (or slow-down) is printed only when
the p10–p90 ranges of the two models do not overlap, otherwise the change is "within noise"; and
the summary says whether the two were timed together (interleaved) or minutes apart.
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
LATENCY_SPREAD = ("latency_p10_ms", "latency_p90_ms")
MODEL_METRICS = ("params", "params_all", "flops", "latency_ms", *LATENCY_SPREAD)
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


def _check_inputs(events: Any, initial: Any, final: Any, meta: Any, latency: Any = None, notes: Any = ()) -> None:
    if latency is not None and not isinstance(latency, Mapping):
        raise allowed("latency", type(latency).__name__, "a dict with 'original' and 'final' timings (or None)")
    if isinstance(notes, (str, bytes)) or not isinstance(notes, Sequence):
        raise allowed("notes", type(notes).__name__, "a list of sentences")
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


def latency_verdict(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, Any]:
    """Compare two timings: ``median_ms``, ``p10_ms``, ``p90_ms`` each (or a metric dict's ``latency_*`` keys).

    Returns ``{"verdict", "speedup"}``: ``"faster"`` when ``after``'s p90 lies below ``before``'s p10,
    ``"slower"`` when its p10 lies above ``before``'s p90, ``"within noise"`` when the ranges overlap,
    ``"no spread"`` when a range is missing (``None`` when a median is missing); ``speedup`` is the
    ratio of the medians (before / after), or ``None``.
    """
    b, a = _timing(before), _timing(after)
    if b[0] is None or a[0] is None:
        return {"verdict": None, "speedup": None}
    speedup = _ratio(b[0], a[0])
    if None in (*a, *b):
        return {"verdict": "no spread", "speedup": speedup}
    if a[2] < b[1]:  # type: ignore[operator]
        return {"verdict": "faster", "speedup": speedup}
    if a[1] > b[2]:  # type: ignore[operator]
        return {"verdict": "slower", "speedup": speedup}
    return {"verdict": "within noise", "speedup": speedup}


def _timing(record: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """``(median, p10, p90)`` in ms of a timing (``median_ms``, ...) or a metric dict (``latency_ms``, ...)."""
    m = _metrics_of(record)
    if "median_ms" in m:
        return _number(m.get("median_ms")), _number(m.get("p10_ms")), _number(m.get("p90_ms"))
    return _number(m.get("latency_ms")), _number(m.get("latency_p10_ms")), _number(m.get("latency_p90_ms"))


def format_timing(record: Mapping[str, Any] | None) -> str:
    """``"13.5 ms (p10–p90 13.1–14.0)"``, or the median alone when there is no spread; "–" when missing."""
    median, p10, p90 = _timing(record)
    if median is None:
        return DASH
    if p10 is None or p90 is None:
        return f"{format_ms(median)} ms"
    return f"{format_ms(median)} ms (p10–p90 {format_ms(p10)}–{format_ms(p90)})"


def _latency_line(
    events: Sequence[Mapping[str, Any]], initial: Mapping | None, final: Mapping | None, latency: Mapping | None
) -> str | None:
    together = latency is not None and _timing(latency.get("original"))[0] is not None
    before = latency.get("original") if together and latency is not None else initial
    after = latency.get("final") if together and latency is not None else final
    if _timing(after)[0] is None:
        return None
    if not events:
        return f"- latency: {format_timing(after)}; no structural change, so nothing to compare."
    if _timing(before)[0] is None:
        return f"- latency: {format_timing(after)} (the original was not timed)."
    if together and latency is not None:
        how = (
            f"original and final timed together in {latency.get('rounds', '?')} interleaved rounds"
            + (f", batch {latency['batch_size']}" if latency.get("batch_size") is not None else "")
            + (f", {latency['device']}" if latency.get("device") else "")
        )
    else:
        how = "timed at fit start and at fit end, not together: on a busy machine a difference can be load"
    judged = latency_verdict(before, after)
    verdict = judged["verdict"]
    if verdict == "faster":
        result = f"speed-up ×{judged['speedup']:.3g}"
    elif verdict == "slower":
        result = f"slow-down: ×{judged['speedup']:.3g} the original's speed"
    elif verdict == "within noise":
        result = "within noise (the p10–p90 ranges overlap), no speed-up claimed"
    else:
        result = "no spread measured, no speed-up claimed"
    return f"- latency ({how}): {format_timing(before)} → {format_timing(after)}: {result}"


def _summary_lines(
    events: Sequence[Mapping[str, Any]],
    initial: Mapping | None,
    final: Mapping | None,
    latency: Mapping | None = None,
) -> list[str]:
    a, b = _metrics_of(initial), _metrics_of(final)
    lines = []
    if not events:
        lines.append("- **no structural change**: no lit_compress event changed the model in this fit.")
    for key, label, fmt in (("params", "params", format_count), ("flops", "FLOPs", format_flops)):
        ratio = _ratio(b.get(key), a.get(key))
        if ratio is not None:
            lines.append(
                f"- {label}: {fmt(a.get(key))} → {fmt(b.get(key))} (×{ratio:.3g}, "
                f"{format_change(b.get(key), a.get(key))})"
            )
    line = _latency_line(events, initial, final, latency)
    if line is not None:
        lines.append(line)
    return lines


def format_report_markdown(
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
    latency: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The report as Markdown: meta, a summary, what did not happen, and one table row per model state.

    Columns: step / epoch, event, params, Δparams % (against the original), FLOPs,
    latency ms (median, with the p10–p90 range where measured), then one column per validation metric.
    """
    _check_inputs(events, initial, final, meta, latency, notes)
    names = metric_names(events, initial, final)
    header = ["step / epoch", "event", "params", "Δparams %", "FLOPs", "latency ms", *names]
    original = _metrics_of(initial).get("params")
    lines = ["# Compression report", ""]
    for key, value in (meta or {}).items():
        text = value if isinstance(value, str) else json.dumps(_jsonable(value), sort_keys=True)
        lines.append(f"- **{_cell(key)}**: {_cell(text)}")
    if meta:
        lines.append("")
    summary = _summary_lines(events, initial, final, latency)
    if summary:
        lines += [*summary, ""]
    if notes:
        lines += ["**Did not happen:**", "", *(f"- {' '.join(str(note).split())}" for note in notes), ""]
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
            _latency_cell(m),
            *(format_metric(m.get(name)) for name in names),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _latency_cell(metrics: Mapping[str, Any]) -> str:
    median, p10, p90 = _timing(metrics)
    if median is None or p10 is None or p90 is None:
        return format_ms(median)
    return f"{format_ms(median)} ({format_ms(p10)}–{format_ms(p90)})"


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
    latency: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON document: format, version, meta, initial, final, events, latency, notes and a summary.

    ``summary["latency_speedup"]`` is the ratio of the medians, whatever the noise;
    ``summary["latency_verdict"]`` says whether it is one (:func:`latency_verdict`).
    """
    _check_inputs(events, initial, final, meta, latency, notes)
    a, b = _metrics_of(initial), _metrics_of(final)
    together = latency is not None and _timing(latency.get("original"))[0] is not None
    judged = (
        latency_verdict(latency.get("original"), latency.get("final"))
        if together and latency is not None
        else latency_verdict(a, b)
    )
    return _jsonable(
        {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "meta": dict(meta or {}),
            "initial": dict(a),
            "final": dict(b),
            "events": [dict(e) for e in events],
            "latency": dict(latency) if latency is not None else None,
            "notes": list(notes),
            "summary": {
                "num_events": len(events),
                "structural_change": bool(events),
                "params_ratio": _ratio(b.get("params"), a.get("params")),
                "flops_ratio": _ratio(b.get("flops"), a.get("flops")),
                "latency_speedup": judged["speedup"] if together else _ratio(a.get("latency_ms"), b.get("latency_ms")),
                "latency_verdict": judged["verdict"] if events else None,
                "latency_timed_together": together,
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
    latency: Mapping[str, Any] | None = None,
) -> str:
    """Draw params, FLOPs, latency (relative to the original) and validation metrics per row.

    Latency points carry their p10–p90 range as error bars; with ``latency`` (the original and the
    final model timed together), the original's re-timing is drawn beside the final point, so the
    comparison that the summary states is the one seen. Uses matplotlib's Agg canvas directly (no
    pyplot, no global backend change).
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
        if key == "latency_ms":
            _draw_latency(ax, xs, rows, scale, title, latency)
        else:
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


def _draw_latency(
    ax: Any, xs: list[int], rows: list[dict[str, Any]], scale: float, title: str, latency: Mapping[str, Any] | None
) -> None:
    """Medians with p10–p90 error bars; the original re-timed with the final model beside the last point."""
    timings = [_timing(r["metrics"]) for r in rows]
    ys = [math.nan if t[0] is None else t[0] / scale for t in timings]
    _draw(ax, xs, ys, title + " (bars: p10–p90)")
    low = [0.0 if t[0] is None or t[1] is None else (t[0] - t[1]) / scale for t in timings]
    high = [0.0 if t[0] is None or t[2] is None else (t[2] - t[0]) / scale for t in timings]
    if any(low) or any(high):
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor="C0", capsize=3)
    original = _timing(latency.get("original")) if latency is not None else (None, None, None)
    if original[0] is not None and xs:
        x, y = xs[-1] + 0.15, original[0] / scale
        err = [[0.0 if original[1] is None else (original[0] - original[1]) / scale]]
        err.append([0.0 if original[2] is None else (original[2] - original[0]) / scale])
        ax.errorbar([x], [y], yerr=err, fmt="s", mfc="none", color="C1", capsize=3, label="original, timed with final")
        ax.legend(fontsize="small")


# --------------------------------------------------------------------------- files


def write_report(
    out_dir: str | Path,
    *,
    events: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
    latency: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, str]:
    """Write ``compression_report.{json,md,png}`` into ``out_dir`` (created if needed).

    Returns:
        ``{"json": path, "markdown": path, "png": path}``; ``"png"`` is left out (with a warning)
        if the plot cannot be drawn.
    """
    _check_inputs(events, initial, final, meta, latency, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / JSON_NAME), "markdown": str(out / MARKDOWN_NAME)}
    doc = report_dict(events=events, initial=initial, final=final, meta=meta, latency=latency, notes=notes)
    Path(paths["json"]).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    markdown = format_report_markdown(
        events=events, initial=initial, final=final, meta=meta, latency=latency, notes=notes
    )
    Path(paths["markdown"]).write_text(markdown, encoding="utf-8")
    try:
        paths["png"] = plot_report(out / PNG_NAME, events=events, initial=initial, final=final, latency=latency)
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
    "format_timing",
    "latency_verdict",
    "metric_names",
    "plot_report",
    "report_dict",
    "report_rows",
    "write_report",
]
