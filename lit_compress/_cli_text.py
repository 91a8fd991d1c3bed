"""What the CLI says: the one-line summary of a parse error, the ``--help`` texts, short class names.

jsonargparse reports a bad value as a nested block ("Parser key ...", "Does not validate against
any of the Union subtypes", one alternative per type, "Given value: ..."), in which the useful part
sits several levels deep. :func:`parse_error_headline` reads that block and returns one line in the
house style: the key, the value and the rule, with a "did you mean" for a misspelt key, argument or
class name. The block itself is still printed below the line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Where the classes a key takes live, so that a short name (``LayerFusion``) can be resolved or suggested.
CLASS_HOMES: dict[str, tuple[str, ...]] = {
    "trainer.callbacks": ("lit_compress.callbacks", "lightning.pytorch.callbacks"),
    "trainer.logger": ("lightning.pytorch.loggers",),
    "trainer.plugins": ("lightning.pytorch.plugins",),
    "trainer.strategy": ("lightning.pytorch.strategies",),
    "model": ("lit_compress.models",),
    "data": ("lit_compress.data",),
    "optimizer": ("torch.optim",),
    "lr_scheduler": ("torch.optim.lr_scheduler",),
}


# --------------------------------------------------------------------------- class names


def classes_for(key: str) -> dict[str, str]:
    """``{short name: class path}`` of the public classes that ``key`` (e.g. ``trainer.callbacks``) takes."""
    out: dict[str, str] = {}
    for module_name in CLASS_HOMES.get(key, ()):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - optional homes
            continue
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name, None)
            if inspect.isclass(obj):
                out.setdefault(name, f"{module_name}.{name}")
    return out


def expand_help_class_names(args: list[str]) -> list[str]:
    """``--trainer.callbacks.help LayerFusion`` → ``... lit_compress.callbacks.LayerFusion`` (also ``--k.help=N``)."""
    out = list(args)
    for i, arg in enumerate(out):
        if not arg.startswith("--"):
            continue
        option, sep, value = arg.partition("=")
        if not option.endswith(".help"):
            continue
        key = option[2:-5]
        if sep:
            out[i] = f"{option}={_full_class_name(key, value)}"
        elif i + 1 < len(out):
            out[i + 1] = _full_class_name(key, out[i + 1])
    return out


def _full_class_name(key: str, name: str) -> str:
    if "." in name:
        return name
    return classes_for(key).get(name, name)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean `x`?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _init_argument_names(class_path: str) -> list[str]:
    try:
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        from lit_compress.cli import _init_defaults

        return list(_init_defaults(cls))
    except Exception:  # a class that cannot be imported or parsed: no suggestion
        return []


# --------------------------------------------------------------------------- parse errors


def parse_error_headline(message: str, option_names: Iterable[str] = (), config_keys: Iterable[str] = ()) -> str:
    """One line saying what is wrong in jsonargparse's error ``message``: key, value, rule, a suggestion.

    ``option_names`` (``--trainer.max_epochs``, ...) and ``config_keys`` (``trainer.max_epochs``, ...)
    are the parser's, for the "did you mean" of an unknown option or config key.
    """
    text = message.strip()
    m = re.match(r"unrecognized arguments: (.*)", text)
    if m:
        options = [t.split("=")[0] for t in m.group(1).split() if t.startswith("--")]
        if options:
            return f"unknown option `{options[0]}`" + did_you_mean(options[0], option_names)
        return f"unexpected argument(s): {m.group(1)}"
    m = re.match(r"(Subcommand|Group) '([^']+)' does not accept (?:nested )?(?:option|key) '([^']+)'", text)
    if m:
        key = m.group(3) if m.group(1) == "Subcommand" else f"{m.group(2)}.{m.group(3)}"
        return f"unknown key `{key}` in the configuration" + did_you_mean(key, config_keys)
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if m:
        return _key_headline(m.group(1), m.group(2))
    return text.splitlines()[0] if text else "invalid arguments"


def _block(lines: list[str], start: int) -> str:
    """The lines after ``lines[start]`` that are indented deeper than it (its nested block)."""
    depth = len(lines[start]) - len(lines[start].lstrip())
    out = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= depth:
            break
        out.append(line)
    return "\n".join(out)


def _key_headline(key: str, body: str) -> str:
    lines = body.splitlines()
    found = next(
        ((i, m) for i, line in enumerate(lines) if (m := re.search(r"Problem with given class_path '([^']+)':", line))),
        None,
    )
    if found is not None:
        index, m = found
        class_path, inner = m.group(1), _block(lines, index)
        where = f"{class_path.rsplit('.', 1)[-1]} (in `{key}`)"
        opt = re.match(r"\s*Option '([^']+)' is not accepted", inner)
        if opt:
            return f"{where} has no argument `{opt.group(1)}`" + did_you_mean(
                opt.group(1), _init_argument_names(class_path)
            )
        nested = re.match(r'\s*Parser key "([^"]+)":\s*', inner)
        if nested:
            inner_lines = inner.splitlines()
            first = next(i for i, line in enumerate(inner_lines) if line.strip())
            rest = inner_lines[first].split(":", 1)[1].strip()
            nested_body = "\n".join(filter(None, [rest, _block(inner_lines, first)]))
            return f"{where}: {_value_rule(nested.group(1), nested_body)}"
        attr = re.match(r"\s*module '[^']+' has no attribute '([^']+)'", inner)
        if attr:
            return _unknown_class(key, attr.group(1))
        line = inner.strip().splitlines()[0] if inner.strip() else "invalid"
        return f"{where}: {line.strip()}"
    m = re.search(r"Expected a dot import path string: (\S+)", body)
    if m:
        return _unknown_class(key, m.group(1))
    return _value_rule(key, body)


def _unknown_class(key: str, name: str) -> str:
    known = classes_for(key)
    short = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(short, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`, i.e. {known[close[0]]}?)" if close else ""
    if not close and known:
        hint = f" (known here: {', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''})"
    return f"`{key}`: no class named `{name}`{hint}"


def _value_rule(key: str, body: str) -> str:
    """`` `key`=value is not allowed: must be ...`` from the body of one "Parser key" block."""
    rules: list[str] = []
    value: str | None = None
    for m in re.finditer(r"Not of type (\w+): (?:(.*?) )?does not conform to restriction ([^\n]+)", body):
        rules.append(_restriction(m.group(3)))
        value = value or m.group(2)
    for m in re.finditer(r"Expected a typing\.Literal\[(.*?)\]\. Got value: ([^\n]+)", body):
        rules.append(f"one of {m.group(1)}")
        value = value or m.group(2).strip()
    rules += [_type_name(t) for t in re.findall(r"Expected an? <class '([\w.]+)'>", body)]
    given = re.search(r"Given value: ([^\n]+)", body)
    if given:
        value = given.group(1).strip()
    if not rules:
        first = next((line.strip() for line in body.splitlines() if line.strip()), "invalid value")
        return (
            f"`{key}`" + (f"={_quote(value)}" if value is not None else "") + f" is not allowed: {first.rstrip('.')}."
        )
    shown = f"={_quote(value)}" if value is not None else ""
    return f"`{key}`{shown} is not allowed: must be {', or '.join(dict.fromkeys(rules))}."


def _restriction(text: str) -> str:
    """``v>0 and v<1`` → ``> 0 and < 1``."""
    return re.sub(r"v\s*(>=|<=|>|<|==|!=)\s*", r"\1 ", text.strip()).strip()


def _type_name(name: str) -> str:
    return {"NoneType": "null", "str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
        name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1]
    )


def _quote(value: str) -> str:
    try:
        float(value)
        return value
    except ValueError:
        return repr(value) if not value.startswith(("'", '"', "[", "{")) else value


# --------------------------------------------------------------------------- --help


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""


def recipes_dir() -> Path | None:
    """The ``configs/`` folder of the repository this package runs from, if there is one."""
    here = Path(__file__).resolve().parents[1] / "configs"
    return here if here.is_dir() else None


def _recipe_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# ").strip():
            text = line.lstrip("# ").strip()
            return text if len(text) <= 78 else text[:75].rsplit(" ", 1)[0] + " ..."
    return ""


#: One line per callback for ``--help`` (a callback not listed here shows its docstring's first line).
CALLBACK_SUMMARIES = {
    "LayerFusion": "tie similar same-shape layers to one shared weight (O'Neill et al. 2020)",
    "LayerCollapse": "pull MLP activations to linear, then merge each MLP into one Linear (2023)",
    "ALDS": "low-rank decomposition with a global rank allocation (Liebenwein, Maalouf et al. 2021)",
    "LayerMerge": "remove activations and convolutions under a latency budget (Kim et al. 2024)",
    "FoldBatchNorm": "fold each BatchNorm into the conv/linear before it (exact)",
    "CompressionReport": "params, FLOPs, latency, metrics around every event (added if absent)",
}


def callbacks_help() -> str:
    """The lit_compress callbacks with their one-line descriptions."""
    import lit_compress.callbacks as callbacks

    names = [n for n in callbacks.__all__ if n != "CompressionCallback"]
    width = max(len(n) for n in names) + 2
    lines = [
        f"  {name:<{width}}{CALLBACK_SUMMARIES.get(name) or _first_line(getattr(callbacks, name))}" for name in names
    ]
    return "\n".join(lines)


def recipes_help() -> str:
    folder = recipes_dir()
    if folder is None:
        return "  (the recipes are the YAML files in the repository's configs/ folder)"
    lines = []
    for path in sorted(folder.glob("*.yaml")):
        lines.append(f"  configs/{path.name}")
        description = _recipe_line(path)
        if description:
            lines.append(f"      {description}")
    return "\n".join(lines)


TOOL_DESCRIPTION = """\
lit_compress: depth compression of neural networks as structural events inside Lightning training.

Compression callbacks change the model's architecture during `fit` (tie layers, collapse MLPs,
low-rank decompose, merge convolutions, fold BatchNorm); a compression report (params, FLOPs,
latency, validation metrics before and after each event) is printed and written at the end.
Any LightningModule / LightningDataModule can be used with `--model` / `--data` class paths."""


def tool_epilog() -> str:
    """The text after the options of ``lit_compress --help``: callbacks, recipes, examples, debugging."""
    return (
        "compression callbacks (under trainer.callbacks; the short name is enough):\n"
        f"{callbacks_help()}\n\n"
        "recipes (run from the repository root):\n"
        f"{recipes_help()}\n\n"
        "examples:\n"
        "  lit_compress fit --config configs/quickstart.yaml\n"
        "  lit_compress fit --config configs/quickstart.yaml --trainer.max_epochs 10\n"
        "  lit_compress fit --trainer.callbacks.help LayerFusion     # a callback's arguments\n"
        "  lit_compress fit --help                                   # every option of fit\n\n"
        "errors: a configuration error is printed as one line (the key, the value, what is allowed);\n"
        "set LIT_COMPRESS_DEBUG=1 (or add --debug) to see the full traceback instead."
    )


def subcommand_epilog() -> str:
    """The text after the options of ``lit_compress fit --help`` (and the other subcommands)."""
    return (
        "compression callbacks (add with --trainer.callbacks+=NAME, e.g. --trainer.callbacks+=FoldBatchNorm;\n"
        "their arguments: --trainer.callbacks.help NAME):\n"
        f"{callbacks_help()}"
    )


__all__ = [
    "CALLBACK_SUMMARIES",
    "CLASS_HOMES",
    "TOOL_DESCRIPTION",
    "callbacks_help",
    "classes_for",
    "did_you_mean",
    "expand_help_class_names",
    "parse_error_headline",
    "recipes_dir",
    "recipes_help",
    "subcommand_epilog",
    "tool_epilog",
]
