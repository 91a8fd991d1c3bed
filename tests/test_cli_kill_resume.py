"""``configs/combined_cnn.yaml`` killed with SIGKILL mid-run and resumed with ``--ckpt_path last``, as a
user would through the CLI, ends with bit-identical weights to the uninterrupted run (slow: three CLI runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Runs the CLI exactly as ``lit_compress fit ...`` does, then writes the final model's state-dict hash.
RUNNER = """
import sys
from lit_compress.cli import build_cli
from tests.callbacks._toy import state_hash
out, args = sys.argv[1], sys.argv[2:]
cli = build_cli(args)
open(out, "w").write(state_hash(cli.model))
"""


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "combined_cnn.yaml").read_text())
    config["trainer"].update(
        max_epochs=5, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False, logger=False
    )
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("CompressionReport"):
            cb["init_args"] = {"measure_latency": False, "print_report": False}
        if cb["class_path"].endswith("LayerMerge"):
            # One latency table for all three runs: the plan depends on measured timings, which differ from
            # run to run; the later runs read it from the cache (which must not change their RNG either).
            cb["init_args"].update(
                progress=False, importance_batches=2, holdout_batches=1, latency_cache=str(tmp_path / "latency.json")
            )
        if cb["class_path"].endswith("ALDS"):
            cb["init_args"].update(progress=False)
    config["data"]["init_args"].update(train_size=96, batch_size=16)
    path = tmp_path / "combined_cnn_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, root: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = ["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(out), *args], cwd=str(root.parent), env=env)


def _last_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not written yet, or being written
        return -1


@pytest.mark.slow
def test_combined_cnn_killed_and_resumed_through_the_cli_is_bit_identical(tmp_path: Path) -> None:
    config = _config(tmp_path)
    start = time.perf_counter()
    whole = _run(config, tmp_path / "whole", tmp_path / "whole.hash")
    assert whole.wait(timeout=1800) == 0
    uninterrupted = (tmp_path / "whole.hash").read_text()

    killed = _run(config, tmp_path / "killed", tmp_path / "killed.hash")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    while killed.poll() is None and _last_epoch(last) < 2:  # after LayerMerge planned (epoch 2), before ALDS (3)
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.hash").exists()
    saved = torch.load(last, weights_only=True)
    assert 2 <= saved["epoch"] < 4

    resumed = _run(config, tmp_path / "killed", tmp_path / "resumed.hash", "--ckpt_path=last")
    assert resumed.wait(timeout=1800) == 0
    assert (tmp_path / "resumed.hash").read_text() == uninterrupted
    print(f"\nkill-and-resume: {time.perf_counter() - start:.0f} s, final sha256 {uninterrupted}")
