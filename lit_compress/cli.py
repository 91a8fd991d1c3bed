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

Errors lead: a value the parser rejects is summarised in one line (the key, the value, the rule, a
"did you mean" for a misspelt key or class name) before a one-line usage and jsonargparse's full
message; an error that lit_compress raises while building or setting up the run (a
:class:`~lit_compress.errors.ConfigError` or :class:`~lit_compress.errors.SurgeryError`) is printed
as one line without a traceback, unless ``LIT_COMPRESS_DEBUG=1`` is set or ``--debug`` is given.
``--CLASS_KEY.help NAME`` accepts a short class name (``--trainer.callbacks.help LayerFusion``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NoReturn

from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_compress._cli_text import (
    TOOL_DESCRIPTION,
    expand_help_class_names,
    parse_error_headline,
    subcommand_epilog,
    tool_epilog,
)
from lit_compress.errors import ConfigError, SurgeryError, allowed

#: Environment variable that shows full tracebacks of configuration errors (also: ``--debug``).
DEBUG_ENV = "LIT_COMPRESS_DEBUG"

#: Model arguments that the CLI takes from the data module attribute of the same name.
DATA_LINKED_ARGUMENTS = ("num_classes", "in_channels", "vocab_size")


class _RawTextFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the lists of callbacks and recipes)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class LitCompressParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors start with one line saying what is wrong."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        headline = parse_error_headline(message, _option_names(parser), _config_keys(parser))
        prog = parser.prog.replace(" [options]", "")
        details = "" if headline == message.strip() else f"details:\n{textwrap.indent(message.strip(), '  ')}\n"
        sys.stderr.write(
            f"error: {headline}\nusage: {prog} [-c CONFIG] [--KEY VALUE ...]   (`{prog} --help` lists every option)\n"
            + details
        )
        sys.exit(2)


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--")]


def _config_keys(parser: argparse.ArgumentParser) -> list[str]:
    return [action.dest for action in parser._actions if action.dest and action.dest != "help"]


class LitCompressCLI(LightningCLI):
    """LightningCLI whose model takes ``num_classes`` / ``in_channels`` / ``vocab_size`` from the data module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._link_parsers: list[LightningArgumentParser] = []
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Remember the (sub)command parsers; the data links are added to them once the classes are known."""
        self._link_parsers.append(parser)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with every ``ModelCheckpoint`` that has no ``dirpath`` writing to
        ``<default_root_dir>/checkpoints``: one fixed folder per config, so ``--ckpt_path last`` finds
        the last checkpoint of an earlier run (Lightning's default folder is per logger version, and
        ``last`` is looked up before it is known, so a resume would silently start over)."""
        trainer = super().instantiate_trainer(**kwargs)
        use_fixed_checkpoint_dir(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for name, check in data_links(config).items():
            for parser in self._link_parsers:
                parser.link_arguments(
                    f"data.{name}", f"model.init_args.{name}", compute_fn=check, apply_on="instantiate"
                )


def use_fixed_checkpoint_dir(trainer: Trainer) -> None:
    """Point each ``ModelCheckpoint`` of ``trainer`` without a ``dirpath`` at ``<default_root_dir>/checkpoints``."""
    folder = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = folder


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
    if args is None:  # rewritten in place: LightningCLI warns when given both `args` and a command line
        sys.argv[1:] = expand_help_class_names(sys.argv[1:])
    else:
        args = expand_help_class_names(list(args))
    sub = {"epilog": subcommand_epilog(), "formatter_class": _RawTextFormatter}
    return LitCompressCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=LitCompressParser,
        parser_kwargs={
            "prog": "lit_compress",
            "description": TOOL_DESCRIPTION,
            "epilog": tool_epilog(),
            "formatter_class": _RawTextFormatter,
            **{name: dict(sub) for name in LightningCLI.subcommands()},
        },
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``lit_compress <subcommand> --config X.yaml``.

    A configuration error raised by lit_compress (while the classes are built or at ``setup``) is
    printed as one line and exits with status 2; ``--debug`` or ``LIT_COMPRESS_DEBUG=1`` re-raises it
    with its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if args is None:
        sys.argv[1:] = argv
    try:
        build_cli(None if args is None else argv)
    except Exception as err:
        message = user_error_message(err)
        if message is None or debug:
            raise
        sys.stderr.write(
            f"error: {message}\n(a configuration error; set {DEBUG_ENV}=1 or add --debug for the traceback)\n"
        )
        raise SystemExit(2) from None


def user_error_message(err: BaseException) -> str | None:
    """The message of the lit_compress error behind ``err`` (its cause chain or, when jsonargparse has
    folded it into its own message, the quoted text), or ``None`` for any other error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConfigError, SurgeryError)):
            return str(current).strip()
        current = current.__cause__ or current.__context__
    if isinstance(err, ValueError):
        m = re.search(r"`[^`\n]+`=[^\n]*? is not allowed: [^\n]*", str(err))
        if m:
            return m.group(0).strip()
    return None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
