"""The surgery log: one plain-data record per structural event.

Records hold only ``dict``/``list``/``str``/``int``/``float``/``bool``/``None`` (and tensors), so a
checkpoint that carries them loads with ``torch.load(path, weights_only=True)``. Every record has
an ``"op"`` key; the other keys depend on the op. Each built-in op declares its record as a
``TypedDict`` next to the code that writes and replays it (e.g.
:class:`~lit_compress.surgery.alds.low_rank.LowRankDecomposeRecord`); a ``TypedDict`` is a plain
``dict`` at run time, so records stay pickle- and ``weights_only``-safe. The log itself is a list of
``dict[str, Any]``, because ops registered by users add their own record shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

LOG_KEY = "lit_compress"
LOG_VERSION = 1

#: Sentinel entry of a compressed checkpoint's ``state_dict``; its name is the message a plain,
#: strict ``load_state_dict`` shows (as an unexpected key) when nobody replayed the log.
NOT_REPLAYED_KEY = (
    "lit_compress: this checkpoint holds structural events (ties, decompositions, merges) that were NOT "
    "replayed, so the weights would load into the uncompressed architecture; load it with "
    "lit_compress.load_from_checkpoint(YourModule, path), or make lit_compress.CompressMixin the first base "
    "of YourModule, or resume with a lit_compress callback in the Trainer"
)


def make_record(op: str, **fields: Any) -> dict[str, Any]:
    """A new record for operation ``op``; ``fields`` are converted to plain data."""
    return plain_record({"op": op, **fields})


def plain_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (typically one op's ``TypedDict``) as a log entry: a new ``dict`` of plain data."""
    return {str(k): to_plain(v) for k, v in record.items()}


def to_plain(value: Any) -> Any:
    """Convert numpy scalars, tuples, paths, dtypes etc. to types that ``weights_only`` loading accepts."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.detach().cpu().clone()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return to_plain(value.item())
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return str(value)


def strip_measurements(record: dict[str, Any]) -> dict[str, Any]:
    """The structural part of a record (what replay needs), without timings and metrics."""
    return {k: v for k, v in record.items() if k not in ("metrics", "before", "after", "wall_s")}


def plain_equal(a: Any, b: Any) -> bool:
    """Equality of plain-data records that may hold tensors (compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(plain_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(plain_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)
