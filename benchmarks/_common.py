"""What every benchmark prints beside its numbers: machine, versions, seed, config."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


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


def write_results(name: str, rows: list[dict[str, Any]], config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``.md`` (a table of ``rows``) and print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / f"{name}.json").write_text(json.dumps({"env": env, "config": config, "rows": rows}, indent=2))
    cols = list(rows[0]) if rows else []
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
