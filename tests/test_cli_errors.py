"""CLI errors lead and the CLI explains itself (issue 19, cases 4 and 7).

A value the parser rejects is one first line (key, value, rule, "did you mean"); bounded floats are
typed, so ``fraction: 1.5`` or ``budget: 0`` fail while parsing; a lit_compress error raised while
the classes are built or at setup is one line without a traceback (the traceback with
``LIT_COMPRESS_DEBUG=1`` or ``--debug``); ``--trainer.callbacks.help`` takes a short name; ``--help``
describes the tool and lists the callbacks and the recipes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit_compress.cli import build_cli, main
from lit_compress.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def edited(tmp_path: Path, name: str, change: Any) -> str:
    """A copy of ``configs/<name>`` with ``change(config)`` applied; its path."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    change(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def callback_args(config: dict[str, Any], index: int = 0) -> dict[str, Any]:
    args: dict[str, Any] = config["trainer"]["callbacks"][index].setdefault("init_args", {})
    return args


def parse_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The stderr lines of a parse that must fail (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        build_cli(args, run=False)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (
            ["--config", QUICKSTART, "--trainer.max_epocs", "1"],
            "error: unknown option `--trainer.max_epocs` (did you mean `--trainer.max_epochs`?)",
        ),
        (
            ["--config", QUICKSTART, "--trainer.max_epochs", "abc"],
            "error: `trainer.max_epochs`='abc' is not allowed: must be an integer, or null.",
        ),
        (
            ["--config", QUICKSTART, "--trainer.callbacks+=LayerFuson"],
            "error: `trainer.callbacks`: no class named `LayerFuson` (did you mean `LayerFusion`, i.e. "
            "lit_compress.callbacks.LayerFusion?)",
        ),
        (
            ["--config", QUICKSTART, "--model=ImageClasifier"],
            "error: `model`: no class named `ImageClasifier` (did you mean `ImageClassifier`, i.e. "
            "lit_compress.models.ImageClassifier?)",
        ),
        (
            ["--config", QUICKSTART, "--model.init_args.lrr", "0.1"],
            "error: ImageClassifier (in `model`) has no argument `lrr` (did you mean `lr`?)",
        ),
        (
            ["--config", QUICKSTART, "--model.init_args.optimizer=lion"],
            "error: ImageClassifier (in `model`): `optimizer`='lion' is not allowed: must be one of 'sgd', 'adamw', "
            "'adam'.",
        ),
        (
            ["--config", QUICKSTART, "--trainer.callbacks+=FoldBatchNorm", "--trainer.callbacks.at_epoch=-2"],
            "error: FoldBatchNorm (in `trainer.callbacks`): `at_epoch`=-2 is not allowed: must be >= 0, or null.",
        ),
    ],
)
def test_a_command_line_error_starts_with_one_line_that_says_what_is_wrong(
    args: list[str], first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = parse_error(args, capsys)
    errors = [line for line in lines if line.startswith("error:")]
    assert errors[0] == first_line, lines[:3]
    assert len(lines) < 30  # the 50-line usage is gone; jsonargparse's message follows under "details:"


@pytest.mark.parametrize(
    ("config", "change", "first_line"),
    [
        (
            "layer_fusion.yaml",
            lambda c: callback_args(c).update(fraction=1.5),
            "error: LayerFusion (in `trainer.callbacks`): `fraction`=1.5 is not allowed: must be > 0 and < 1.",
        ),
        (
            "layermerge.yaml",
            lambda c: callback_args(c).update(budget=0),
            "error: LayerMerge (in `trainer.callbacks`): `budget`=0 is not allowed: must be > 0 and < 1.",
        ),
        (
            "alds.yaml",
            lambda c: callback_args(c).update(keep_ratio=1.5),
            "error: ALDS (in `trainer.callbacks`): `keep_ratio`=1.5 is not allowed: must be > 0 and <= 1, or null.",
        ),
        (
            "layer_collapse.yaml",
            lambda c: callback_args(c).update(fraction=0),
            "error: LayerCollapse (in `trainer.callbacks`): `fraction`=0 is not allowed: must be > 0 and <= 1, or "
            "null.",
        ),
        (
            "layer_fusion.yaml",
            lambda c: callback_args(c).update(fractoin=callback_args(c).pop("fraction")),
            "error: LayerFusion (in `trainer.callbacks`) has no argument `fractoin` (did you mean `fraction`?)",
        ),
        (
            "layer_fusion.yaml",
            lambda c: c["trainer"].update(max_epoch=c["trainer"].pop("max_epochs")),
            "error: unknown key `trainer.max_epoch` in the configuration (did you mean `trainer.max_epochs`?)",
        ),
    ],
)
def test_a_config_error_is_caught_while_parsing_in_one_line(
    tmp_path: Path, config: str, change: Any, first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = parse_error(["--config", edited(tmp_path, config, change)], capsys)
    assert lines[0] == first_line, lines[:3]
    assert not any("Traceback" in line for line in lines)


def test_the_real_command_prints_the_headline_first(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lit_compress", "fit", "--config", QUICKSTART, "--trainer.max_epocs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "error: unknown option `--trainer.max_epocs` (did you mean `--trainer.max_epochs`?)"
    assert lines[1].startswith("usage: lit_compress fit ") and len(lines) < 10


def _bad_targets(config: dict[str, Any]) -> None:
    callback_args(config).update(targets=["no_such_layer*"])
    config["trainer"]["default_root_dir"] = "logs"


def test_a_setup_error_of_a_callback_is_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_COMPRESS_DEBUG", raising=False)
    path = edited(tmp_path, "quickstart.yaml", _bad_targets)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "`targets`" in errors[0] and "no_such_layer*" in errors[0], err[-5:]
    assert "LIT_COMPRESS_DEBUG=1" in err[-1] and not any("Traceback" in line for line in err)
    # the same error with its traceback, on request
    with pytest.raises(ConfigError, match="no_such_layer"):
        main(["fit", "--config", path, *FAST, "--debug"])
    monkeypatch.setenv("LIT_COMPRESS_DEBUG", "1")
    with pytest.raises(ConfigError, match="no_such_layer"):
        main(["fit", "--config", path, *FAST])


def test_a_constructor_error_is_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = edited(tmp_path, "quickstart.yaml", lambda c: callback_args(c).update(at_step=10))  # at_epoch and at_step
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "error: `at_step`=10 is not allowed: give `at_epoch` or `at_step`, not both.", err[:3]
    assert len(err) == 2


def test_short_callback_names_work_for_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--trainer.callbacks.help", "LayerFusion"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.callbacks.fraction" in out and "--trainer.callbacks.increments" in out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--trainer.callbacks.help=FoldBatchNorm"])
    assert "--trainer.callbacks.at_epoch" in capsys.readouterr().out


def test_help_describes_the_tool_and_lists_callbacks_and_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lit_compress ")
    assert "depth compression of neural networks as structural events inside Lightning training" in out
    for name in ("LayerFusion", "LayerCollapse", "ALDS", "LayerMerge", "FoldBatchNorm", "CompressionReport"):
        assert f"\n  {name} " in out
    for recipe in sorted(p.name for p in CONFIGS.glob("*.yaml")):
        assert f"configs/{recipe}" in out
    assert "LIT_COMPRESS_DEBUG=1" in out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    fit_help = capsys.readouterr().out
    assert "compression callbacks" in fit_help and "\n  LayerMerge " in fit_help
