"""The combined recipes in ``configs/`` and the scripts in ``examples/`` run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lit_compress.measure.latency_table as latency_table
from lit_compress.cli import build_cli
from lit_compress.surgery import applied_events
from tests._latency import fill_fake_latency_cache

ROOT = Path(__file__).resolve().parents[1]


def run_config(name: str, tmp_path: Path, *overrides: str):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return build_cli(["fit", "--config", str(path), "--trainer.enable_progress_bar=false", *overrides])


def ops(cli) -> list[str]:
    return [e["op"] for e in applied_events(cli.model)]


def _no_timing(*args: object) -> float:
    raise AssertionError("every latency entry should come from the pre-filled cache")


def test_combined_cnn_recipe_on_few_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LayerMerge's latency table from a cost model, so that the plan does not depend on the machine's load
    model = build_cli(["--config", str(ROOT / "configs" / "combined_cnn.yaml")], run=False).model
    fill_fake_latency_cache(
        tmp_path / "layermerge_latency.json", model.net.features, model.example_input_array, batch_sizes=(16,)
    )
    monkeypatch.setattr(latency_table, "time_layer", _no_timing)
    # The plan's own timing (latency_check_plan) would time real layers against cost-model entries;
    # that check is tested with a fake timer in tests/measure/test_latency_table.py.
    monkeypatch.setattr(latency_table, "measure_plan", lambda *args, **kwargs: None)
    monkeypatch.setattr(latency_table, "check_plan_latency", lambda *args, **kwargs: None)
    cli = run_config("combined_cnn.yaml", tmp_path, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2")
    found = ops(cli)  # the collapse needs the full warm-up: not within 2 batches per epoch
    assert [op for op in found if op != "collapse"] == [
        "make_collapsible",
        "layer_merge_plan",
        "low_rank_decompose",
        "layer_merge_final",
    ]
    assert (Path(cli.trainer.log_dir) / "compression_report.json").is_file()


@pytest.mark.slow
def test_combined_cnn_recipe_as_it_is(tmp_path: Path) -> None:
    cli = run_config("combined_cnn.yaml", tmp_path)
    assert ops(cli) == ["make_collapsible", "layer_merge_plan", "low_rank_decompose", "collapse", "layer_merge_final"]
    assert cli.trainer.callback_metrics["val_acc"] > 0.9  # 95.1 % measured


@pytest.mark.slow
def test_combined_lm_recipe_as_it_is(tmp_path: Path) -> None:
    cli = run_config("combined_lm.yaml", tmp_path)
    assert ops(cli) == ["make_collapsible", "collapse", "fuse_layers", "fuse_layers", "fuse_layers"]
    assert cli.trainer.callback_metrics["val_ppl"] < 10.0  # 7.87 measured
    assert not any(isinstance(m, torch.nn.GELU) for m in cli.model.modules())  # every FFN collapsed


@pytest.mark.slow
@pytest.mark.parametrize("script", ["combined_schedule.py", "existing_project.py"])
def test_example_runs(tmp_path: Path, script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "combined_schedule.py":
        assert "torch-only inference on 4000 test images" in proc.stdout
