"""Bounded number types for callback arguments, so that the CLI rejects a bad value while parsing.

jsonargparse checks these restrictions when it parses a config or a command line, and says in one
line which key, which value and which bound; constructor checks remain for calls from Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jsonargparse.typing import OpenUnitInterval, restricted_number_type

if TYPE_CHECKING:  # mypy sees plain floats; at run time jsonargparse gets the restricted types
    UnitFraction = float
else:
    #: A fraction in (0, 1]: a share that may be everything but not nothing (a keep ratio).
    UnitFraction = restricted_number_type("UnitFraction", float, [(">", 0), ("<=", 1)])

__all__ = ["OpenUnitInterval", "UnitFraction"]
