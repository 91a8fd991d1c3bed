"""``lit_compress fit|validate|test|predict --config X.yaml``: a LightningCLI over any module and data.

Models and data modules are chosen by ``class_path`` (ours or any importable LightningModule /
LightningDataModule); compression callbacks go under ``trainer.callbacks``.

The model's ``num_classes``, ``in_channels`` and ``vocab_size`` come from the data module: when the
chosen model takes one of these arguments and the chosen data module's class has an attribute (or
property) of the same name, a ``link_arguments(..., apply_on="instantiate")`` link passes the data
module's value to the model. The data module is built first (once) and the model after it. A value
written in the model config that differs from both the model's default and the data module's value
is a :class:`~lit_compress.errors.ConfigError`; leave these arguments out of the config.

The links are added after parsing, once the classes are known, and only where both sides have the
name, so that a model or data module without it is left alone. (Links declared before parsing, as
usual, misbehave here in subclass mode: a link to an argument the model lacks still puts the data
module's value into the model's saved hyperparameters, which breaks a resume from its checkpoint;
a link whose source the data module lacks drops the model's configured value from the saved config.)
As the links come after parsing, a linked argument without a default must still be given.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_compress.errors import allowed

#: Model arguments that the CLI takes from the data module attribute of the same name.
DATA_LINKED_ARGUMENTS = ("num_classes", "in_channels", "vocab_size")


class LitCompressCLI(LightningCLI):
    """LightningCLI whose model takes ``num_classes`` / ``in_channels`` / ``vocab_size`` from the data module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._link_parsers: list[LightningArgumentParser] = []
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Remember the (sub)command parsers; the data links are added to them once the classes are known."""
        self._link_parsers.append(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for name, check in data_links(config).items():
            for parser in self._link_parsers:
                parser.link_arguments(
                    f"data.{name}", f"model.init_args.{name}", compute_fn=check, apply_on="instantiate"
                )


def data_links(config: Namespace) -> dict[str, Callable[[Any], Any]]:
    """The linked arguments that apply to the classes of ``config``, each with the check of its value.

    A name applies when the model's init arguments hold it (the model takes it) and the data module's
    class has it. The check returns the data module's value, or raises ``ConfigError`` when the config
    sets the model's argument to a value other than the model's default and the data module's value.
    """
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, Namespace) or not isinstance(data, Namespace):
        return {}
    init_args = model.get("init_args")
    if not isinstance(init_args, Namespace):
        return {}
    data_class = _import(str(data["class_path"]))
    names = [n for n in DATA_LINKED_ARGUMENTS if n in init_args and hasattr(data_class, n)]
    if not names:
        return {}
    defaults = _init_defaults(_import(str(model["class_path"])))
    return {n: _value_check(n, init_args[n], defaults.get(n), data_class.__name__) for n in names}


def _value_check(name: str, configured: Any, default: Any, data_class: str) -> Callable[[Any], Any]:
    def from_data(value: Any) -> Any:
        if configured not in (default, value):
            raise allowed(
                f"model.init_args.{name}",
                configured,
                f"the data module ({data_class}) has {name}={value!r}, which the CLI passes to the model; "
                f"leave `{name}` out of the model config (or set it to {value!r})",
            )
        return value

    return from_data


def _import(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    assert isinstance(cls, type), class_path
    return cls


def _init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls``'s init arguments as the CLI resolves them (inherited ``**kwargs`` included)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
    return dict(parser.get_defaults(skip_validation=True).items())


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
