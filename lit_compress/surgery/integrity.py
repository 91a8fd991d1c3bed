"""Integrity of a surgery log: a digest chain over the events and a digest of the structure each implies.

Every event saved in a checkpoint carries two digests:

- ``"digest"``: sha256 of (the previous event's ``"digest"``, the event's own record), so editing,
  dropping or reordering an event breaks the chain from that event on; the payload's top-level
  ``"digest"`` is the last event's, so dropping the last event is caught too;
- ``"structure"`` (on the last record of each callback event): sha256 of the model's parameter
  names, shapes and ties right after the event; replay recomputes it after rebuilding the event,
  so a record that still chains but rebuilds another structure is caught.

Logs written before these digests existed carry neither and are not checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ReplayError

#: Record keys that hold the digests (left out of what the chain digest covers).
DIGEST_KEY = "digest"
STRUCTURE_KEY = "structure"


def _canonical(value: Any) -> Any:
    """A JSON-encodable, order-stable form of plain record data (tensors by dtype, shape and bytes)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return {"__tensor__": [str(data.dtype), list(data.shape), hashlib.sha256(raw).hexdigest()]}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return repr(value)  # nan/inf and exact round trip
    return value


def record_digest(previous: str, record: dict[str, Any]) -> str:
    """The chain digest of ``record`` after an event whose digest is ``previous`` (``""`` for the first)."""
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    text = json.dumps([previous, _canonical(body)], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def chain_events(events: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """New copies of ``events`` with their chain digests, and the last digest (``""`` for no events)."""
    out, previous = [], ""
    for event in events:
        record = {k: v for k, v in event.items() if k != DIGEST_KEY}
        previous = record_digest(previous, record)
        record[DIGEST_KEY] = previous
        out.append(record)
    return out, previous


def check_chain(events: Sequence[dict[str, Any]], final: str | None) -> None:
    """Check the chain digests of a saved log; raise a :class:`ReplayError` naming the first bad event.

    A log without digests (written before they existed) passes.
    """
    if final is None and not any(isinstance(e, dict) and DIGEST_KEY in e for e in events):
        return
    previous = ""
    for index, event in enumerate(events):
        if not isinstance(event, dict) or DIGEST_KEY not in event:
            raise ReplayError(
                f"The checkpoint's surgery log is damaged at event #{index}: it has no digest, while the log "
                "carries digests. Use an undamaged checkpoint."
            )
        expected = record_digest(previous, event)
        if event[DIGEST_KEY] != expected:
            raise ReplayError(
                f"The checkpoint's surgery log does not match its digests at event #{index} "
                f"(op={event.get('op')!r}, logged index {event.get('index')!r}): this event or one before it "
                "was edited, dropped or reordered. Loading it would rebuild another architecture than the one "
                "the weights were trained in; use an undamaged checkpoint."
            )
        previous = event[DIGEST_KEY]
    if final is not None and final != previous:
        raise ReplayError(
            f"The checkpoint's surgery log ends after event #{len(events) - 1} but its digest says more events "
            "followed: events were dropped from the end of the log. Use an undamaged checkpoint."
        )


def structure_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s parameter names and shapes, in registration order, with their ties."""
    first: dict[int, str] = {}
    items = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        items.append([name, list(param.shape), owner])
    text = json.dumps(items, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_structure(model: nn.Module, record: dict[str, Any], index: int) -> None:
    """After replaying event #``index``, check the model's structure against the record's digest (if any)."""
    expected = record.get(STRUCTURE_KEY)
    if expected is None:
        return
    if structure_digest(model) != expected:
        raise ReplayError(
            f"Replaying event #{index} (op={record.get('op')!r}) rebuilt parameters whose names, shapes or ties "
            "differ from those the model had after this event in training: the log was edited, or the module "
            f"({type(model).__name__}) is not built like the one that was trained."
        )


__all__ = [
    "DIGEST_KEY",
    "STRUCTURE_KEY",
    "chain_events",
    "check_chain",
    "check_structure",
    "record_digest",
    "structure_digest",
]
