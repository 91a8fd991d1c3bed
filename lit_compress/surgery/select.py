"""Select modules by qualified name: ``fnmatch`` globs, or regular expressions prefixed ``re:``.

>>> select_modules(model, ["features.*", "re:classifier\\.[03]"], types=(nn.Conv2d, nn.Linear))  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from lit_compress.errors import ConfigError

Pattern = str


def _compile(pattern: Pattern) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as err:
            raise ConfigError(f"Target pattern {pattern!r} is not a valid regular expression: {err}.") from None
    return re.compile(fnmatch.translate(pattern))


def name_matches(name: str, patterns: Sequence[Pattern]) -> bool:
    """Whether ``name`` matches any pattern (globs match the whole name; ``re:`` uses ``fullmatch``)."""
    return any(_compile(p).fullmatch(name) is not None for p in patterns)


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (for error messages)."""
    stripped = name[3:] if name.startswith("re:") else name
    stripped = stripped.replace("*", "").replace("?", "")
    candidates = list(candidates)
    found = difflib.get_close_matches(stripped, candidates, n=n, cutoff=0.4)
    if not found:
        found = [c for c in candidates if stripped and stripped.split(".")[0] in c][:n]
    return found


def select_modules(
    model: nn.Module,
    patterns: Sequence[Pattern],
    types: tuple[type[nn.Module], ...] | None = None,
    *,
    argument: str = "targets",
    require_each: bool = True,
) -> list[str]:
    """Qualified names of the submodules that match ``patterns`` (and ``types``), in model order.

    Raises:
        ConfigError: If a pattern matches no module (of the given types); the message names the
            argument and lists close names. With ``require_each=False`` only an empty total raises.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    named = [(n, m) for n, m in model.named_modules() if n and (types is None or isinstance(m, types))]
    names = [n for n, _ in named]
    selected: list[str] = []
    for pattern in patterns:
        regex = _compile(pattern)
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits and require_each:
            raise _no_match(argument, pattern, names, types)
        selected.extend(h for h in hits if h not in selected)
    if not selected:
        raise _no_match(argument, list(patterns), names, types)
    order = {n: i for i, n in enumerate(names)}
    return sorted(selected, key=order.__getitem__)


def _no_match(
    argument: str, pattern: Pattern | Sequence[Pattern], names: list[str], types: tuple[type[nn.Module], ...] | None
) -> ConfigError:
    kinds = "" if types is None else " of type " + "/".join(t.__name__ for t in types)
    hint = close_names(pattern if isinstance(pattern, str) else str(pattern[0]), names)
    return ConfigError(
        f"`{argument}`={pattern!r} matches no module{kinds}."
        + (f" Close names: {', '.join(hint)}." if hint else f" There are {len(names)} such modules.")
        + " Patterns are fnmatch globs over qualified names (e.g. 'features.*'), or regexes prefixed with 're:'."
    )
