"""Constructor-argument validators shared by every public callback.

Each raises :class:`~lit_compress.errors.ConfigError` naming the argument, the value and what is
allowed; booleans are never accepted as numbers, and NaN/inf never as finite floats. jsonargparse's
restricted types (``PositiveInt``, ...) are subclasses of ``int``/``float`` and pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_compress.errors import ConfigError, allowed


def check_int(name: str, value: Any, minimum: int | None = None, *, optional: bool = False) -> int | None:
    """An ``int`` (not a bool) ``>= minimum``; ``None`` if ``optional``. Returns it as a plain ``int``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise allowed(name, value, _int_rule(minimum, optional))
    if minimum is not None and value < minimum:
        raise allowed(name, value, _int_rule(minimum, optional))
    return int(value)


def _int_rule(minimum: int | None, optional: bool) -> str:
    rule = "must be an integer" + (f" >= {minimum}" if minimum is not None else "")
    return rule + (", or None" if optional else "")


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite real number (not a bool, NaN or inf) within ``[low, high]`` (ends open as asked).

    Returns it as a plain ``float`` (``None`` if ``optional`` and given ``None``).
    """
    if value is None and optional:
        return None
    rule = _float_rule(low, high, low_open, high_open, optional)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise allowed(name, value, rule)
    if low is not None and (value <= low if low_open else value < low):
        raise allowed(name, value, rule)
    if high is not None and (value >= high if high_open else value > high):
        raise allowed(name, value, rule)
    return float(value)


def _float_rule(low: float | None, high: float | None, low_open: bool, high_open: bool, optional: bool) -> str:
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        rule = f"must be in the open interval {interval}" if low_open and high_open else f"must be in {interval}"
    elif low is not None:
        rule = f"must be a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"must be a finite number {'<' if high_open else '<='} {high:g}"
    else:
        rule = "must be a finite number"
    return rule + (", or None" if optional else "") + " (not NaN or inf)"


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices`` (compared with ``==``, so ``True`` is not ``1``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise allowed(name, value, "must be one of " + ", ".join(repr(c) for c in choices))
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not ``0``/``1``, not a string)."""
    if not isinstance(value, bool):
        raise allowed(name, value, "must be True or False")
    return value


def check_str(name: str, value: Any, *, optional: bool = False) -> str | None:
    """A non-empty string (a path, a device); ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise allowed(name, value, "must be a non-empty string" + (", or None" if optional else ""))
    return str(value)


def check_writable(name: str, path: str | os.PathLike[str], *, is_dir: bool = False) -> None:
    """That ``path`` (a file, or a directory with ``is_dir``) can be created or written, without creating it.

    Raises:
        ConfigError: Naming the argument, the path and the first existing ancestor that is not writable.
    """
    target = Path(path)
    if target.exists():
        if is_dir and not target.is_dir():
            raise allowed(name, str(path), "a directory (it is an existing file)")
        if not is_dir and target.is_dir():
            raise allowed(name, str(path), "a file path (it is an existing directory)")
        if not os.access(target, os.W_OK):
            raise allowed(name, str(path), "a writable path (no write permission)")
        return
    ancestor = target.parent if not is_dir else target
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise allowed(name, str(path), f"a path that can be created (`{ancestor}` is a file, not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise allowed(name, str(path), f"a path that can be created (`{ancestor}` is not writable)")


__all__ = ["ConfigError", "check_bool", "check_choice", "check_float", "check_int", "check_str", "check_writable"]
