"""Run every benchmark under the protocol and write ``benchmarks/RESULTS.md`` and the Pareto pictures.

Each benchmark runs in its own process (``python -m benchmarks.<name> --out DIR [--quick] [--seeds N]``);
its output goes to ``DIR/<name>.log`` and a failure is recorded instead of stopping the rest. Then the
JSON rows of every benchmark are aggregated over seeds (mean ± std) and rendered:

- a headline table: each method's operating points against the dense model fine-tuned with the same
  budget, magnitude pruning / uniform SVD at the same parameter count, and the thin network at
  matched latency trained with the recovery budget and with the full budget — with a verdict;
- one picture per task (``results_pareto_<task>.png``): the metric against measured batch-64 latency
  (relative to the run's dense model) and against unique parameters, every method and baseline;
- every benchmark's full table, with the machine, versions, seeds and wall time.

    python -m benchmarks.run_all                  # everything, 3 seeds
    python -m benchmarks.run_all --quick          # smoke settings, 1 seed (numbers mean nothing)
    python -m benchmarks.run_all --jobs 2         # one process per benchmark × seed, 2 at a time, then re-timed
    python -m benchmarks.run_all --only alds layer_merge
    python -m benchmarks.run_all --render-only    # re-render from the JSON already in --out
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, title); the order is the order of RESULTS.md. Baselines run first: methods are compared with them.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "baselines": ("benchmarks.baselines", "Baselines: dense, dense fine-tuned, thin networks"),
    "layer_fusion": ("benchmarks.layer_fusion", "Layer Fusion (O'Neill et al. 2020)"),
    "layer_collapse": ("benchmarks.layer_collapse", "LayerCollapse (Zibakhsh Shabgahi et al. 2023)"),
    "alds": ("benchmarks.alds", "ALDS (Liebenwein, Maalouf et al. 2021)"),
    "layer_merge": ("benchmarks.layer_merge", "LayerMerge (Kim et al. 2024)"),
}
METHOD_NAMES = {"Layer Fusion", "LayerCollapse", "ALDS", "LayerMerge"}
#: The task labels each benchmark runs (``--tasks`` of that benchmark); a test checks them against the modules.
BENCHMARK_TASKS: dict[str, tuple[str, ...]] = {
    "baselines": ("mnist/resnet20", "mnist/vgg", "shakespeare/transformer"),
    "layer_fusion": ("mnist/resnet20", "shakespeare/transformer"),
    "layer_collapse": ("mnist/vgg", "shakespeare/transformer"),
    "alds": ("mnist/resnet20", "shakespeare/transformer"),
    "layer_merge": ("mnist/resnet20",),
}
ALL_TASKS = BENCHMARK_TASKS["baselines"]


def task_args(names: list[str], tasks: list[str] | None) -> dict[str, list[str]]:
    """``{benchmark: extra argv}`` for the benchmarks that run at least one of ``tasks`` (all when None).

    A benchmark none of whose tasks is asked for is left out; the others get ``--tasks`` with the ones they run.
    """
    if tasks is None:
        return {name: [] for name in names}
    chosen = {}
    for name in names:
        mine = [t for t in BENCHMARK_TASKS[name] if t in tasks]
        if mine:
            chosen[name] = ["--tasks", *mine]
    return chosen


def run_one(name: str, out: Path, quick: bool, seeds: int, extra: list[str] | None = None) -> dict[str, Any]:
    """Run benchmark ``name`` in a subprocess (``extra``: more arguments); return its status, wall time and log path."""
    module = BENCHMARKS[name][0]
    cmd = [sys.executable, "-m", module, "--out", str(out), "--seeds", str(seeds)] + (["--quick"] if quick else [])
    cmd += extra or []
    log = out / f"{name}.log"
    print(f"[run_all] {name}: {' '.join(cmd[1:])} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    print(f"[run_all] {name}: exit {code} after {wall / 60:.1f} min", flush=True)
    return {"name": name, "exit_code": code, "wall_s": round(wall, 1), "log": str(log), "quick": quick}


def load(out: Path) -> dict[str, dict[str, Any]]:
    """Every ``<out>/*.json`` a benchmark wrote, by file stem."""
    found = {}
    for path in sorted(out.glob("*.json")):
        if path.stem == "run_all":
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "rows" in data:
            found[path.stem] = data
    return found


# --------------------------------------------------------------------------------------------
# aggregation over seeds
# --------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method, variant): mean and std over seeds of every numeric column."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "seed" in r:
            groups[(r["task"], r["method"], r["variant"])].append(r)
    out = []
    for (task, method, variant), rs in groups.items():
        agg: dict[str, Any] = {"task": task, "method": method, "variant": variant, "n": len(rs)}
        agg["retimed_n"] = sum(bool(r.get("retimed")) for r in rs)
        for key in rs[0]:
            if key in ("task", "method", "variant", "seed", "retimed") or not isinstance(rs[0][key], (int, float)):
                continue
            if isinstance(rs[0][key], bool):
                agg[key] = rs[0][key]
                continue
            agg[key], agg[key + "_std"] = _mean_std([r.get(key) for r in rs])
        out.append(agg)
    return out


def metric_of(agg: dict[str, Any]) -> str:
    return "acc" if "acc" in agg else "ppl"


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


# --------------------------------------------------------------------------------------------
# comparisons and verdicts
# --------------------------------------------------------------------------------------------


def verdict(a: dict[str, Any], b: dict[str, Any] | None, higher_is_better: bool) -> str:
    """``win`` / ``loss`` when the means differ by more than their combined seed std (and 0.1), else ``tie``."""
    if b is None:
        return "–"
    m = metric_of(a)
    diff = a[m] - b[m]
    noise = max(0.1 if m == "acc" else 0.01, math.hypot(a.get(m + "_std", 0.0) or 0.0, b.get(m + "_std", 0.0) or 0.0))
    better = diff if higher_is_better else -diff
    word = "win" if better > noise else "loss" if better < -noise else "tie"
    return f"{word} ({diff:+.2f})"


def thin_curve(aggs: list[dict[str, Any]], task: str, full: bool, distilled: bool) -> list[dict[str, Any]]:
    pts = [
        a
        for a in aggs
        if a["task"] == task and a["method"] == "thin" and bool(a.get("full_budget")) == full
        and bool(a.get("distilled")) == distilled
    ]  # fmt: skip
    return sorted(pts, key=lambda a: 1.0 / a["speedup_b64"])


def thin_at(curve: list[dict[str, Any]], ratio: float) -> tuple[dict[str, Any] | None, str]:
    """The thin network's metric at latency ratio ``ratio`` (of dense): interpolated inside the curve.

    Outside it, the closest point is returned with a note: a thin network faster than the method (the
    method slower than every thin point) or slower (the method faster than every thin point).
    """
    if not curve:
        return None, "no thin run"
    ratios = [1.0 / a["speedup_b64"] for a in curve]
    m = metric_of(curve[0])
    if ratio <= ratios[0]:
        return curve[0], f"thin w{curve[0]['width']:g} is slower ({ratios[0]:.2f} vs {ratio:.2f} of dense)"
    if ratio >= ratios[-1]:
        return curve[-1], f"thin w{curve[-1]['width']:g} is faster ({ratios[-1]:.2f} vs {ratio:.2f} of dense)"
    for (ra, a), (rb, b) in zip(zip(ratios, curve), zip(ratios[1:], curve[1:])):
        if ra <= ratio <= rb:
            t = (ratio - ra) / (rb - ra) if rb > ra else 0.0
            point = {
                m: a[m] + t * (b[m] - a[m]),
                m + "_std": max(a.get(m + "_std", 0) or 0, b.get(m + "_std", 0) or 0),
                "speedup_b64": 1.0 / ratio,
            }
            return point, f"interpolated between w{a['width']:g} and w{b['width']:g}"
    return None, "no match"


def headline_rows(aggs: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for a in aggs:
        if a["method"] not in METHOD_NAMES or a.get("from_scratch") or "from scratch" in a["variant"]:
            continue
        if "after training without" in a["variant"]:
            continue
        task = a["task"]
        m = metric_of(a)
        hib = m == "acc"
        same_task = [b for b in aggs if b["task"] == task]
        dense_ft = next((b for b in same_task if b["variant"].startswith("dense fine-tuned")), None)
        dense = next((b for b in same_task if b["variant"] == "converged start"), None)
        prefix = a["variant"].replace(", distilled", "")
        magnitude = next((b for b in same_task if b["method"] == "magnitude pruning" and prefix in b["variant"]), None)
        svd = next((b for b in same_task if b["method"] == "uniform SVD" and prefix in b["variant"]), None)
        ratio = 1.0 / a["speedup_b64"] if a.get("speedup_b64") else 1.0
        kd = bool(a.get("distilled"))
        thin_r, note_r = thin_at(thin_curve(aggs, task, False, kd), ratio)
        thin_f, note_f = thin_at(thin_curve(aggs, task, True, kd), ratio)
        params_pct = 100.0 * a["params"] / dense["params"] if dense else math.nan
        out.append(
            {
                "task": task,
                "method": a["method"],
                "operating point": a["variant"],
                m: fmt(a[m], a.get(m + "_std")),
                "params": f"{a['params'] / 1000:.0f}k ({params_pct:.0f} %)",
                "speed-up b64": f"{a.get('speedup_b64', math.nan):.2f}×{timing_mark(a)}",
                "vs dense fine-tuned": verdict(a, dense_ft, hib),
                "vs magnitude / SVD, same params": " / ".join(
                    v
                    for v in (verdict(a, magnitude, hib) if magnitude else "", verdict(a, svd, hib) if svd else "")
                    if v
                )
                or "–",
                f"vs thin, recovery budget{' (distilled)' if kd else ''}": f"{verdict(a, thin_r, hib)}; {note_r}",
                f"vs thin, full budget{' (distilled)' if kd else ''}": f"{verdict(a, thin_f, hib)}; {note_f}",
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]


def timing_mark(agg: dict[str, Any]) -> str:
    """``†`` when :func:`mark_timing` found seeds of this row that were not re-timed on a quiet machine."""
    return str(agg.get("timing_mark", ""))


def mark_timing(aggs: list[dict[str, Any]]) -> bool:
    """In a run that was re-timed (``benchmarks.retime``), mark the rows some of whose seeds were not
    (timed in their own run, beside other training); returns whether any row is marked."""
    if not any(a.get("retimed_n") for a in aggs):
        return False
    for a in aggs:
        a["timing_mark"] = "†" if a.get("retimed_n", 0) < a["n"] else ""
    return any(a["timing_mark"] for a in aggs)


def full_table(aggs: list[dict[str, Any]], task: str) -> list[str]:
    rows = []
    for a in aggs:
        if a["task"] != task:
            continue
        m = metric_of(a)
        rows.append(
            {
                "method": a["method"],
                "variant": a["variant"],
                m: fmt(a[m], a.get(m + "_std")),
                "params": f"{a['params']:,.0f}",
                "non-zero": f"{a['nonzero']:,.0f}",
                "MFLOPs": f"{a['flops'] / 1e6:.1f}",
                "b1 ms": fmt(a.get("lat_b1_ms", math.nan), None, 2),
                "b64 ms": fmt(a.get("lat_b64_ms", math.nan), a.get("lat_b64_ms_std"), 1),
                "speed-up b64": fmt(a.get("speedup_b64", math.nan), None, 2) + timing_mark(a),
                "seeds": a["n"],
                "train s": fmt(a.get("wall_s", math.nan), None, 0),
            }
        )
    return markdown_table(rows)


def on_axis(points: list[dict[str, Any]], m: str) -> tuple[list[dict[str, Any]], int]:
    """The rows worth a point: within 10 accuracy points (or 1.5× the perplexity) of the best row; and how
    many were left out (one-shot rows at chance would squash everything else into one line)."""
    if m == "acc":
        best = max(a[m] for a in points)
        kept = [a for a in points if a[m] >= best - 10]
    else:
        best = min(a[m] for a in points)
        kept = [a for a in points if a[m] <= 1.5 * best]
    return kept, len(points) - len(kept)


def plot_task(aggs: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Metric against latency (relative to dense) and against unique parameters, every row of ``task``."""
    points = [a for a in aggs if a["task"] == task and a.get("speedup_b64")]
    if not points:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = metric_of(points[0])
    points, off_axis = on_axis(points, m)
    fig = Figure(figsize=(13, 8))
    styles = {"dense": ("k", "*"), "thin": ("grey", "o"), "magnitude pruning": ("tab:brown", "x"),
              "uniform SVD": ("tab:olive", "+"), "Layer Fusion": ("tab:blue", "s"), "LayerCollapse": ("tab:green", "D"),
              "ALDS": ("tab:red", "^"), "LayerMerge": ("tab:purple", "v")}  # fmt: skip
    for panel, (xkey, xlabel) in enumerate(
        [
            ("ratio", "batch-64 CPU latency, relative to the dense model (measured, interleaved)"),
            ("params", "unique parameters"),
        ]
    ):
        ax = fig.add_subplot(1, 2, panel + 1)
        for a in points:
            color, marker = styles.get(a["method"], ("tab:cyan", "o"))
            x = 1.0 / a["speedup_b64"] if xkey == "ratio" else a["params"]
            filled = not a.get("distilled")
            ax.errorbar(
                x, a[m], yerr=a.get(m + "_std") or 0, fmt=marker, color=color, mfc=color if filled else "white",
                ms=7, capsize=2, label=f"{a['method']}: {a['variant']}" if panel == 0 else None,
            )  # fmt: skip
        for full in (False, True):
            curve = thin_curve(points, task, full, False)
            if curve:
                xs = [1.0 / c["speedup_b64"] if xkey == "ratio" else c["params"] for c in curve]
                ax.plot(xs, [c[m] for c in curve], ls="--" if full else ":", color="grey", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {'accuracy (%)' if m == 'acc' else 'perplexity (lower is better)'}")
        if xkey == "params":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    note = f"; {off_axis} one-shot row(s) off the axis: see the table" if off_axis else ""
    fig.suptitle(
        f"{task}: every method and baseline (mean ± std over seeds; open markers: distilled{note})", fontsize=10
    )
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 2), 1, 0.95))
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def render(out: Path, results_path: Path, runs: dict[str, dict[str, Any]] | None = None) -> str:
    """Write RESULTS.md and the pictures from the JSON in ``out``; refuse when there is none."""
    data = load(out)
    if not data:
        raise SystemExit(
            f"run_all: no benchmark results in {out} (run the benchmarks first, or give --out); "
            f"{results_path} is left unchanged."
        )
    rows = [r for d in data.values() for r in d["rows"]]
    aggs = aggregate(rows)
    tasks = sorted({a["task"] for a in aggs})
    env = next(iter(data.values()))["env"]
    seeds = sorted({s for d in data.values() for s in d.get("seeds", [])})
    quick = any(d.get("quick") for d in data.values())
    lines = [
        "# lit_compress benchmark results",
        "",
        f"Generated by `python -m benchmarks.run_all` from the runs in `{out}`: {env['date']}, {env['machine']}, "
        f"{env['cpu_count']} CPUs, torch {env['torch']}, lightning {env['lightning']}, python {env['python']}; "
        f"seeds {seeds}{' — QUICK SMOKE SETTINGS: the numbers mean nothing' if quick else ''}. The protocol is "
        "[`benchmarks/PROTOCOL.md`](PROTOCOL.md). Every number was measured in these runs; mean ± std over seeds.",
        "",
    ]
    skipped = sorted(name for name, d in data.items() if d.get("skip_scratch"))
    if skipped:
        lines += [
            f"Run with `--skip-scratch` (no row trained from scratch, so no thin network or own architecture): "
            f"{', '.join(skipped)}.",
            "",
        ]
    method_only = sorted(name for name, d in data.items() if d.get("method_only"))
    if method_only:
        lines += [
            "Run with `--method-only` (the method's own rows only, no pruning/SVD/post-training comparison): "
            f"{', '.join(method_only)}.",
            "",
        ]
    subsets = {name: d["points"] for name, d in data.items() if d.get("points")}
    if subsets:
        lines += [
            "Run with `--points` (only these operating points): "
            + "; ".join(f"{n}: {', '.join(p)}" for n, p in subsets.items())
            + ".",
            "",
        ]
    parts = {name: len(d["parts"]) for name, d in data.items() if d.get("parts")}
    if parts:
        lines += [
            "Joined with `benchmarks.merge_runs` from processes run side by side (one seed each): "
            + ", ".join(f"{n} ({k} parts)" for n, k in parts.items())
            + (
                "; every kept model was then re-timed on the quiet machine (`benchmarks.retime`), the rows marked † "
                "excepted."
                if any(r.get("retimed") for r in rows)
                else "; latency was timed while the other parts trained, so read speed-ups as rough."
            ),
            "",
        ]
    extended = {name: d["rows_replaced"] for name, d in data.items() if "rows_replaced" in d}
    if extended:
        lines += [
            "Extended with `benchmarks.merge_runs --extend` (later runs adding rows to earlier ones made from the "
            "same seeds' dense starts; a row run again replaced the earlier one): "
            + ", ".join(f"{n} ({k} row(s) replaced)" for n, k in extended.items())
            + "; each part's options are in its JSON under `parts`.",
            "",
        ]
    refused = [(name, r) for name, d in data.items() for r in d.get("config", {}).get("refused", [])]
    if refused:
        lines += ["Operating points the callback refused before training (no row; the reason is the finding):", ""]
        lines += [f"- `{n}` {r['task']} seed {r['seed']}, {r['point']}: {r['reason']}" for n, r in refused]
        lines += [""]
    if runs:
        summed = " (summed over its processes)" if any(r.get("parts") for r in runs.values()) else ""
        lines += [
            f"Wall time per benchmark{summed}: " + ", ".join(f"{n} {r['wall_s'] / 60:.1f} min" for n, r in runs.items())
        ]
        lines += [""]
    if mark_timing(aggs):
        lines += [
            "† speed-up not re-timed on the quiet machine for every seed (its model was not kept): timed in its "
            "own run, interleaved with that run's dense model while other processes trained; read it as rough.",
            "",
        ]
    lines += ["## Headline: every method against every baseline", "", *markdown_table(headline_rows(aggs)), ""]
    lines += [
        "Verdicts: `win` / `loss` when the means differ by more than their combined seed standard deviation "
        "(and at least 0.1 points of accuracy or 0.01 of perplexity), else `tie`. The thin network is "
        "interpolated in measured latency between the two thin widths that bracket the method; outside that "
        "range the nearest width is used and the note says whether it is faster or slower.",
        "",
    ]
    for task in tasks:
        picture = results_path.with_name(f"results_pareto_{task.replace('/', '_')}.png")
        lines += [f"## {task}", ""]
        if plot_task(aggs, task, picture):
            lines += [f"![{task}]({picture.name})", ""]
        lines += [*full_table(aggs, task), ""]
    lines += ["## Runs", ""]
    for name, d in data.items():
        config = {k: v for k, v in d.get("config", {}).items()}
        lines += [f"- `{name}`: seeds {d.get('seeds')}, config `{json.dumps(config, default=str)[:600]}`"]
    lines += ["", "Machine: `" + json.dumps(env) + "`", ""]
    text = "\n".join(lines)
    results_path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes side by side (one per benchmark × seed; see benchmarks.parallel)"
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run only these")
    parser.add_argument(
        "--tasks", nargs="+", choices=ALL_TASKS, default=None, help="only these tasks (and their benchmarks)"
    )
    parser.add_argument("--render-only", action="store_true", help="re-render from the JSON already in --out")
    parser.add_argument("--out", default="benchmarks/out", help="where the JSON, logs and cache go")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    if not args.render_only:
        start = time.perf_counter()
        extra = task_args(args.only or list(BENCHMARKS), args.tasks)
        if args.jobs > 1:
            from benchmarks.parallel import START_FAMILIES, run_parallel

            modules = {name: BENCHMARKS[name][0] for name in extra}
            families = [f for f in START_FAMILIES if args.tasks is None or f in args.tasks]
            runs = run_parallel(modules, out, args.quick, args.seeds, args.jobs, ROOT, families, extra)
        else:
            for name, more in extra.items():
                runs[name] = run_one(name, out, args.quick, args.seeds, more)
        total = time.perf_counter() - start
        summary = {"runs": runs, "wall_s": round(total, 1), "jobs": args.jobs}
        (out / "run_all.json").write_text(json.dumps(summary, indent=1))
        print(f"[run_all] all benchmarks: {total / 60:.1f} min", flush=True)
    elif (out / "run_all.json").exists():
        runs = json.loads((out / "run_all.json").read_text()).get("runs", {})
    render(out, Path(args.results), runs)
    print(f"[run_all] wrote {args.results}", flush=True)
    failed = [n for n, r in runs.items() if r["exit_code"] != 0]
    if failed:
        raise SystemExit(f"run_all: failed: {', '.join(failed)} (see the logs in {out})")


if __name__ == "__main__":
    main()
