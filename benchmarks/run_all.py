"""Run every method's benchmark and write ``benchmarks/RESULTS.md`` (+ ``results_headline.png``).

Each benchmark runs in its own process (``python -m benchmarks.<name> --out DIR [--quick]``), its
output goes to ``DIR/<name>.log``, and a failure is recorded in RESULTS.md instead of stopping the
rest. Then every ``DIR/<name>*.json`` that :func:`benchmarks._common.write_results` wrote is
rendered: the headline rows first (each method against its own baseline, from the same run), then
each benchmark's full table, the paper's numbers (files ending in ``_paper``), config and machine.

    python -m benchmarks.run_all                  # everything, default settings (about an hour on 2 cores)
    python -m benchmarks.run_all --quick          # smoke settings, a few minutes
    python -m benchmarks.run_all --only alds layer_merge
    python -m benchmarks.run_all --render-only    # re-render RESULTS.md from the JSON already in --out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import _fmt, environment

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, short description); the order is the order of RESULTS.md.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "layer_fusion": ("benchmarks.layer_fusion", "Layer Fusion (O'Neill et al. 2020)"),
    "layer_collapse": ("benchmarks.layer_collapse", "LayerCollapse (Zibakhsh Shabgahi et al. 2023)"),
    "alds": ("benchmarks.alds", "ALDS (Liebenwein, Maalouf et al. 2021)"),
    "layer_merge": ("benchmarks.layer_merge", "LayerMerge (Kim et al. 2024)"),
    "event_overhead": ("benchmarks.event_overhead", "Cost of one structural event inside fit"),
}


def run_one(name: str, out: Path, quick: bool) -> dict[str, Any]:
    """Run benchmark ``name`` in a subprocess; return its status, wall time and log path."""
    module = BENCHMARKS[name][0]
    cmd = [sys.executable, "-m", module, "--out", str(out)] + (["--quick"] if quick else [])
    log = out / f"{name}.log"
    print(f"[run_all] {name}: {' '.join(cmd[1:])} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    print(f"[run_all] {name}: exit {code} after {wall / 60:.1f} min", flush=True)
    return {"name": name, "exit_code": code, "wall_s": round(wall, 1), "log": str(log), "quick": quick}


def load_results(out: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    """The JSON files benchmark ``name`` wrote (``<name>.json`` and ``<name>_*.json``), sorted."""
    files = sorted(set(out.glob(f"{name}.json")) | set(out.glob(f"{name}_*.json")))
    found = []
    for path in files:
        if path.stem == "run_all":
            continue
        try:
            found.append((path.stem, json.loads(path.read_text())))
        except json.JSONDecodeError as err:
            found.append((path.stem, {"error": f"unreadable JSON: {err}"}))
    return found


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(_fmt(row.get(c))) for c in cols) + " |" for row in rows]
    return lines


def headline_table(headlines: list[dict[str, Any]]) -> list[str]:
    rows = []
    for h in headlines:
        delta = h["value"] - h["baseline"]
        kept = 100.0 * h["params"] / h["baseline_params"] if h["baseline_params"] else None
        speed = None
        if h.get("latency_b64_ms") and h.get("baseline_latency_b64_ms"):
            speed = f"{h['baseline_latency_b64_ms'] / h['latency_b64_ms']:.2f}×"
        rows.append(
            {
                "method": h["method"],
                "task": h["task"],
                "variant": h["variant"],
                h["metric"]
                if len({x["metric"] for x in headlines}) == 1
                else "metric": f"{h['metric']}: {h['value']:.2f} (baseline {h['baseline']:.2f}, {delta:+.2f})",
                "params kept": f"{kept:.1f} % ({h['params']:,})" if kept is not None else None,
                "CPU speed-up b64": speed,
                "note": h.get("note") or None,
            }
        )
    return table(rows)


def plot_headlines(headlines: list[dict[str, Any]], path: Path) -> bool:
    """Two panels (higher-is-better metrics, lower-is-better metrics): change vs. parameters kept."""
    if not headlines:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.2))
    panels = [
        ("higher", [h for h in headlines if h["higher_is_better"]]),
        ("lower", [h for h in headlines if not h["higher_is_better"]]),
    ]
    panels = [p for p in panels if p[1]]
    markers = "osD^v<>P*X"
    methods = sorted({h["method"] for h in headlines})
    for i, (kind, hs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for h in hs:
            kept = 100.0 * h["params"] / h["baseline_params"]
            y = h["value"] - h["baseline"] if kind == "higher" else 100.0 * (h["value"] / h["baseline"] - 1.0)
            ax.scatter(
                kept,
                y,
                marker=markers[methods.index(h["method"]) % len(markers)],
                s=60,
                label=f"{h['method']} · {h['task']}: {h['variant']}",
            )
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("parameters kept (% of the baseline, unique storage)")
        ax.set_ylabel("Δ metric (points)" if kind == "higher" else "Δ metric (% of baseline; lower is better)")
        ax.set_title("accuracy-type metrics" if kind == "higher" else "perplexity-type metrics")
        ax.grid(alpha=0.3)
        # The legend goes under its panel, so it never hides a point.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def render(out: Path, names: list[str], runs: dict[str, dict[str, Any]], results_path: Path) -> str:
    env = environment()
    all_headlines: list[dict[str, Any]] = []
    sections: list[str] = []
    for name in names:
        title = BENCHMARKS[name][1]
        files = load_results(out, name)
        run = runs.get(name)
        lines = [f"## {title} — `python -m {BENCHMARKS[name][0]}`", ""]
        if run is not None:
            status = "ok" if run["exit_code"] == 0 else f"FAILED (exit {run['exit_code']}, see `{run['log']}`)"
            lines += [
                f"Run by run_all: {status}, {run['wall_s'] / 60:.1f} min{' (--quick)' if run['quick'] else ''}.",
                "",
            ]
        if not files:
            lines += ["No results found in `" + str(out) + "`.", ""]
        for stem, data in files:
            if "error" in data:
                lines += [f"### {stem}", "", data["error"], ""]
                continue
            all_headlines += data.get("headlines", [])
            config = {k: v for k, v in data.get("config", {}).items() if k not in ("per_seed", "train", "env", "raw")}
            lines += [f"### {stem}" + (" (the paper's numbers, not ours)" if stem.endswith("_paper") else ""), ""]
            lines += table(data.get("rows", []))
            lines += [
                "",
                "<details><summary>config and machine</summary>",
                "",
                "```json",
                json.dumps({"config": config, "env": data.get("env")}, indent=1, default=str)[:4000],
                "```",
                "</details>",
                "",
            ]
        sections.append("\n".join(lines))
    plot_path = results_path.with_name("results_headline.png")
    plotted = plot_headlines(all_headlines, plot_path)
    head = [
        "# lit_compress benchmark results",
        "",
        "Generated by `python -m benchmarks.run_all` on "
        + f"{env['date']}: {env['machine']}, {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, lightning {env['lightning']}, python {env['python']}, CUDA: {env['cuda']}.",
        "Protocol: `shared/BENCHMARKS.md` (MNIST-5k 1,000 train / 4,000 test; Shakespeare character level). Every "
        "number below was measured in the run that wrote it; the paper's numbers are in tables marked as such.",
        "",
        "## Headline: each method against its own baseline, same run",
        "",
        *headline_table(all_headlines),
        "",
    ]
    if plotted:
        head += [f"![headline]({plot_path.name})", ""]
    text = "\n".join(head) + "\n" + "\n".join(sections)
    results_path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run only these")
    parser.add_argument("--render-only", action="store_true", help="do not run; render from the JSON in --out")
    parser.add_argument("--out", default="benchmarks/out", help="where the benchmarks write JSON/Markdown/logs")
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="the Markdown file to write")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BENCHMARKS)
    runs_path = out / "run_all.json"
    runs: dict[str, dict[str, Any]] = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    if not args.render_only:
        for name in names:
            runs[name] = run_one(name, out, args.quick)
            runs_path.write_text(json.dumps(runs, indent=2))  # nothing lost if a later benchmark crashes
    render(out, list(BENCHMARKS), runs, Path(args.results))
    print(f"[run_all] wrote {args.results}")
    failed = [n for n in names if runs.get(n, {}).get("exit_code", 0) != 0]
    if failed:
        sys.exit(f"[run_all] failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
