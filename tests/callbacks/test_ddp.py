"""Structural events under DDP on CPU (gloo, 2 processes): both launchers, identical ranks after an event."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lit_compress.callbacks import CompressionReport
from lit_compress.surgery import applied_events
from tests.callbacks._toy import HashRecorder, SplitLinear, ToyNet, ToyNetWithMixin

ROOT = Path(__file__).resolve().parents[2]


def read_hashes(out_dir: Path, tag: str) -> list[str]:
    return [(out_dir / f"{tag}_rank{r}.txt").read_text() for r in (0, 1)]


def assert_ranks_identical_and_trained(out_dir: Path) -> None:
    after_event, end = read_hashes(out_dir, "after_event"), read_hashes(out_dir, "end")
    assert after_event[0] == after_event[1], "ranks differ right after the structural event"
    assert end[0] == end[1], "ranks differ at the end of training"
    assert end[0] != after_event[0], "training did not go on after the event"


def spawn_trainer(tmp_path: Path, callbacks: list[Any], max_epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


def test_ddp_spawn_event_keeps_ranks_identical(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ToyNetWithMixin()
    callbacks = [
        SplitLinear(at_step=2, bn_recalibration_batches=2),
        HashRecorder(str(tmp_path)),
        CompressionReport(print_report=False),
    ]
    spawn_trainer(tmp_path, callbacks, max_epochs=2).fit(model)
    assert_ranks_identical_and_trained(tmp_path)
    # With CompressMixin the launching process's model follows the workers' events and weights.
    assert isinstance(model.mid, torch.nn.Sequential)
    assert [e["op"] for e in applied_events(model)] == ["test_split_linear"]
    from tests.callbacks._toy import state_hash

    assert state_hash(model) == read_hashes(tmp_path, "end")[0]


def test_ddp_spawn_plain_module_gets_a_clear_message(tmp_path: Path, capfd: Any) -> None:
    L.seed_everything(0, verbose=False)
    model = ToyNet()  # no mixin: Lightning refreshes it with strict=False; we must say so
    callbacks = [SplitLinear(at_step=2), CompressionReport(print_report=False, measure_flops=False)]
    spawn_trainer(tmp_path, callbacks, max_epochs=1).fit(model)
    err = capfd.readouterr().err
    assert "ddp_spawn" in err and "ORIGINAL architecture" in err and "load_from_checkpoint" in err
    assert isinstance(model.mid, torch.nn.Linear)  # the documented limitation, unchanged by Lightning


def test_ddp_popen_launcher_event_keeps_ranks_identical(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "callbacks" / "ddp_script.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout
    assert_ranks_identical_and_trained(tmp_path)


_EXIT_CHECK = """
import atexit, sys
import torch.distributed as dist
from lit_compress.callbacks._distributed import destroy_gloo_group_at_exit

def report():  # registered first, so it runs after the handler under test (atexit is last-in, first-out)
    open(sys.argv[1], "w").write("initialized" if dist.is_initialized() else "destroyed")

atexit.register(report)
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
if sys.argv[3] == "register":
    before = atexit._ncallbacks()
    destroy_gloo_group_at_exit()
    destroy_gloo_group_at_exit()
    assert atexit._ncallbacks() == before + 1, "the handler must be registered once per process"
"""


@pytest.mark.parametrize("register", [True, False])
def test_gloo_group_is_destroyed_before_the_interpreter_exits(tmp_path: Path, register: bool) -> None:
    """A gloo group alive at interpreter shutdown can abort the process (pytorch/pytorch#190489)."""
    result = tmp_path / "state.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_CHECK, str(result), str(tmp_path / "store"), "register" if register else "no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert result.read_text() == ("destroyed" if register else "initialized")


def run_script(script: str, out_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run a test script that starts `strategy="ddp"` itself (Lightning re-launches it for rank 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "callbacks" / script), str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )


def test_second_fit_with_the_same_callback_keeps_ddp_ranks_in_agreement(tmp_path: Path) -> None:
    """`plan_event` runs on rank 0 only; everything the next fit reads must be set on every rank."""
    proc = run_script("ddp_refit_script.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    import json

    ranks = [json.loads((tmp_path / f"refit_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["plan_calls"] > 0 and ranks[1]["plan_calls"] == 0  # planning is rank 0's alone
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["selected"]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    first_fit, second_fit = ranks[0]["events"]
    assert first_fit == ["make_collapsible"]
    assert len(second_fit) > len(first_fit)  # the second fit made structural events of its own
