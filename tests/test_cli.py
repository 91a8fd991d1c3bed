"""`lit_compress` as a LightningCLI: the quickstart config runs, --print_config round-trips, bad values fail at parse time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit_compress.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=16",
]


def test_quickstart_config_runs_with_an_event_and_writes_the_report(tmp_path: Path) -> None:
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["at_epoch"] = 1  # the fold happens inside the 2 epochs
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path), *FAST])
    model = cli.model
    from lit_compress.surgery import applied_events

    assert [e["op"] for e in applied_events(model)] == ["fold_batchnorm"]
    assert not any(isinstance(m, __import__("torch").nn.BatchNorm2d) for m in model.modules())
    log_dir = Path(cli.trainer.log_dir)
    for suffix in ("json", "md", "png"):
        assert (log_dir / f"compression_report.{suffix}").is_file()
    assert (log_dir / "config.yaml").is_file()


def test_print_config_round_trips(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lit_compress", "fit", "--config", QUICKSTART, "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["class_path"] == "lit_compress.models.ImageClassifier"
    assert printed["trainer"]["callbacks"][0]["init_args"]["at_epoch"] == 6
    saved = tmp_path / "printed.yaml"
    saved.write_text(out.stdout)
    again = subprocess.run(
        [sys.executable, "-m", "lit_compress", "fit", "--config", str(saved), "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert yaml.safe_load(again.stdout) == printed


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.optimizer=lion"], r'Parser key "model.optimizer"|optimizer.*lion'),
        (
            ["--trainer.callbacks+=lit_compress.callbacks.FoldBatchNorm", "--trainer.callbacks.at_epoch=-2"],
            r"at_epoch.*v>=0|-2",
        ),
        (["--model.init_args.lr=-1"], r"model.init_args.lr.*v>0.*-1|lr.*-1"),
    ],
)
def test_bad_values_fail_with_the_key_and_the_value(override: list[str], expected: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", QUICKSTART, *override], run=False)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert __import__("re").search(expected, err, flags=__import__("re").S), err[-1500:]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses_and_builds(config: str) -> None:
    cli = build_cli(["--config", str(ROOT / "configs" / config)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert any(type(cb).__module__.startswith("lit_compress") for cb in cli.trainer.callbacks)
