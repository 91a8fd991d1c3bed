"""``lit_compress fit|validate|test|predict --config X.yaml``: a LightningCLI over any module and data.

Models and data modules are chosen by ``class_path`` (ours or any importable LightningModule /
LightningDataModule); compression callbacks go under ``trainer.callbacks``. When the data module
exposes ``vocab_size`` and the model takes one, it is filled in automatically.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LitCompressCLI(LightningCLI):
    """LightningCLI with lit_compress's defaults (config saved with overwrite, seed from the config)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        _fill_vocab_size(config)


def _fill_vocab_size(config: Any) -> None:
    """Copy ``data.vocab_size`` into ``model.init_args.vocab_size`` when the model leaves it unset."""
    try:
        model_args = config["model"]["init_args"]
        data = config["data"]
    except (KeyError, TypeError):
        return
    if model_args is None or "vocab_size" not in model_args or model_args["vocab_size"] is not None:
        return
    import importlib

    module_name, _, cls_name = str(data["class_path"]).rpartition(".")
    data_cls = getattr(importlib.import_module(module_name), cls_name)
    data_module = data_cls(**dict(data.get("init_args") or {}))
    vocab_size = getattr(data_module, "vocab_size", None)
    if vocab_size is not None:
        model_args["vocab_size"] = int(vocab_size)


def build_cli(args: list[str] | None = None, run: bool = True) -> LitCompressCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` default to ``sys.argv[1:]``."""
    return LitCompressCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``lit_compress <subcommand> --config X.yaml``."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
