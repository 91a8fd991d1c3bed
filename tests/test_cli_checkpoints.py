"""Checkpoints made through the CLI: plain-Python state (``weights_only`` loads), ``--ckpt_path last``
resumes every shipped config, and a fit resumed through the CLI continues instead of starting over."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_compress.callbacks.base import CompressionCallback
from lit_compress.checkpointing import log_payload
from lit_compress.cli import build_cli
from lit_compress.surgery import applied_events

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def _weights_only_round_trip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _fusion_config(tmp_path: Path, **fusion: Any) -> Path:
    """configs/layer_fusion.yaml made tiny: fusion steps early, few and small batches."""
    config = yaml.safe_load((ROOT / "configs" / "layer_fusion.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["trainer"].update(max_epochs=3, limit_train_batches=2, limit_val_batches=0)
    config["trainer"]["callbacks"][0]["init_args"].update(
        {"at_epoch": 1, "increments": 2, "every_n_epochs": 1, "bn_recalibration_batches": 1, "measure": "cosine"}
        | fusion
    )
    config["trainer"]["callbacks"][1]["init_args"] = {"measure_latency": False, "measure_flops": False}
    config["data"]["init_args"].update(train_size=32, batch_size=4, image_size=8)
    config["model"]["init_args"]["image_size"] = 8
    path = tmp_path / "layer_fusion_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_saves_a_last_checkpoint(config: str) -> None:
    """Each config has a ModelCheckpoint with ``save_last: true`` and no per-run folder of its own."""
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    checkpoints = [
        cb for cb in data["trainer"].get("callbacks", []) if cb["class_path"].endswith("callbacks.ModelCheckpoint")
    ]
    assert checkpoints, f"{config} has no ModelCheckpoint"
    assert all(cb.get("init_args", {}).get("save_last") is True for cb in checkpoints), config
    # No explicit dirpath: the CLI puts it under the config's default_root_dir (checked below).
    assert all("dirpath" not in cb.get("init_args", {}) for cb in checkpoints), config


def test_cli_points_checkpoints_at_default_root_dir(tmp_path: Path) -> None:
    cli = build_cli(
        ["--config", str(ROOT / "configs" / "combined_cnn.yaml"), f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    dirs = [cb.dirpath for cb in cli.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    assert dirs == [os.path.realpath(tmp_path / "checkpoints")]


@pytest.mark.parametrize("config", ["layer_fusion.yaml", "combined_cnn.yaml"])
def test_cli_built_callback_state_and_log_load_weights_only(config: str, tmp_path: Path) -> None:
    """Every lit_compress callback built by the parser (``PositiveInt`` values and all), after ``setup``:
    its state loads with ``torch.load(weights_only=True)``, and so does an event log holding its values."""
    cli = build_cli(["--config", str(ROOT / "configs" / config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    trainer, model = cli.trainer, cli.model
    trainer.strategy.connect(model)
    model.trainer = trainer
    methods = [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]
    assert methods
    states = {}
    for cb in methods:
        cb.setup(trainer, model, "fit")
        states[cb.state_key] = cb.state_dict()
    loaded = _weights_only_round_trip({"callbacks": states})
    assert loaded["callbacks"].keys() == states.keys()
    # What `run_event` logs carries the callbacks' own settings (LayerFusion's `increments`, LayerMerge's
    # `latency_batch_size` in its plan summary): the saved log is plain Python too.
    parser_values = {
        f"{type(cb).__name__}.{k}": v for cb in methods for k, v in vars(cb).items() if type(v) not in (int, float)
    }
    parser_values = {k: v for k, v in parser_values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert parser_values, "the parser gave no int/float subclass values; the premise of this test is gone"
    applied_events(model).append({"op": "test_record", "summary": dict(parser_values)})
    payload = _weights_only_round_trip(log_payload(model))
    assert payload["events"][0]["summary"] == parser_values
    assert {type(v) for v in payload["events"][0]["summary"].values()} <= {int, float}


def test_parser_values_are_not_plain_python() -> None:
    """The premise of the test above: the parser hands callbacks int subclasses that ``weights_only`` refuses."""
    cli = build_cli(["--config", str(ROOT / "configs" / "layer_fusion.yaml")], run=False)
    fusion = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CompressionCallback))
    value = fusion.every_n_epochs
    assert type(value) is not int and isinstance(value, int)
    with pytest.raises(Exception, match="Unsupported global"):
        _weights_only_round_trip({"v": value})


def test_cli_fit_then_resume_from_last_checkpoint(tmp_path: Path) -> None:
    """A real CLI ``fit``, then ``fit --ckpt_path last``: the resume continues the schedule (no fusion step
    runs twice), and its checkpoints load with ``weights_only=True``."""
    path = _fusion_config(tmp_path)
    first = build_cli(["fit", "--config", str(path), *QUIET, "--trainer.max_epochs=2"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    raw = torch.load(last, weights_only=True)
    assert [e["op"] for e in raw["lit_compress"]["events"]] == ["fuse_layers"]
    assert raw["global_step"] == 4
    first_params = sum(p.numel() for p in first.model.parameters())

    resumed = build_cli(["fit", "--config", str(path), *QUIET, "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 6  # continued from step 4, not started over (which would give 6 too,
    events = applied_events(resumed.model)  # but then with the first fusion step run again at epoch 1)
    assert [e["op"] for e in events] == ["fuse_layers", "fuse_layers"]
    assert [e["epoch"] for e in events] == [1, 2]
    assert sum(p.numel() for p in resumed.model.parameters()) < first_params
    fusion = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, CompressionCallback))
    assert fusion.increments_done == 2
    torch.load(last, weights_only=True)  # the resumed run's last checkpoint loads too
