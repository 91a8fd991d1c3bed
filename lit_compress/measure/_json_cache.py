"""The JSON files that cache measured latency tables (LayerMerge's and ALDS's share one layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_compress.errors import ConfigError


def read_cache(path: Path | None, fmt: str, kind: str) -> dict[str, Any]:
    """The cache at ``path`` (an empty one when ``path`` is ``None`` or absent): ``{"format": fmt,
    "version": 1, "tables": {context: {"entries": {...}}}}``.

    Raises:
        ConfigError: If the file is not JSON, or is a cache of another ``kind`` (its ``format`` differs).
    """
    if path is None or not path.exists():
        return {"format": fmt, "version": 1, "tables": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"`latency_cache`={str(path)!r} is not a readable JSON latency cache ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ConfigError(f"`latency_cache`={str(path)!r} is not {kind} latency cache (format {fmt!r}).")
    return data
