"""Replay a surgery log on a freshly built model, so that a compressed state dict loads strictly.

Each structural operation registers a *replayer*: a function that rebuilds the structure an
event produced (shapes, ties, module types) from the event's plain-data record. Values do not
matter: the checkpoint's weights are loaded right after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from lit_compress.errors import ReplayError
from lit_compress.surgery.integrity import DIGEST_KEY, check_structure
from lit_compress.surgery.log import NOT_REPLAYED_KEY, plain_equal
from lit_compress.surgery.modules import SurgeryTransaction

#: A record type: ``dict[str, Any]``, or the ``TypedDict`` an op declares for its records.
RecordT = TypeVar("RecordT")
Replayer = Callable[[nn.Module, Any], None]
_REPLAYERS: dict[str, Replayer] = {}
_EVENTS_ATTR = "_lit_compress_events"


def register_replay(
    op: str,
) -> Callable[[Callable[[nn.Module, RecordT], None]], Callable[[nn.Module, RecordT], None]]:
    """Decorator: register ``fn(model, record)`` as the replayer of operation ``op``.

    ``record`` is the event's plain-data record; ``fn`` may annotate it with the op's ``TypedDict``.
    """

    def wrap(fn: Callable[[nn.Module, RecordT], None]) -> Callable[[nn.Module, RecordT], None]:
        _REPLAYERS[op] = fn
        return fn

    return wrap


def registered_ops() -> list[str]:
    """The ops that have a replayer (the built-in ones included)."""
    _import_builtin_ops()
    return sorted(_REPLAYERS)


def applied_events(model: nn.Module) -> list[dict[str, Any]]:
    """The events already applied to ``model`` (the live log; empty for an uncompressed model)."""
    events = model.__dict__.get(_EVENTS_ATTR)
    if events is None:
        events = []
        model.__dict__[_EVENTS_ATTR] = events
        model.register_load_state_dict_pre_hook(_accept_replayed_sentinel)
    return events


def _accept_replayed_sentinel(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: drop the not-replayed sentinel of a checkpoint whose events ``module`` already carries."""
    key = prefix + NOT_REPLAYED_KEY
    if key in state_dict and len(module.__dict__.get(_EVENTS_ATTR) or []) >= int(state_dict[key]):
        del state_dict[key]


def record_events(model: nn.Module, records: Sequence[dict[str, Any]]) -> None:
    """Append records to ``model``'s live log."""
    applied_events(model).extend(records)


def replay_events_(model: nn.Module, events: Sequence[dict[str, Any]]) -> int:
    """Replay the events of ``events`` that ``model`` has not applied yet; return how many ran.

    All-or-nothing: if any event fails, every change made by this call is undone and a
    :class:`ReplayError` names the event (index and op) and the reason.
    """
    _import_builtin_ops()
    done = applied_events(model)
    if len(done) > len(events) or not all(plain_equal(_structural(a), _structural(b)) for a, b in zip(done, events)):
        raise ReplayError(
            f"The module already carries {len(done)} applied event(s) that are not a prefix of the "
            f"checkpoint's log of {len(events)} event(s); build a fresh module and load it again."
        )
    todo = list(events[len(done) :])
    with SurgeryTransaction():
        for offset, record in enumerate(todo):
            index = len(done) + offset
            op = record.get("op") if isinstance(record, dict) else None
            replayer = _REPLAYERS.get(op) if isinstance(op, str) else None
            if replayer is None:
                raise ReplayError(
                    f"Cannot replay event #{index} (op={op!r}): no replayer is registered for it. "
                    f"Known ops: {', '.join(sorted(_REPLAYERS)) or 'none'}."
                )
            try:
                replayer(model, record)
            except ReplayError:
                raise
            except Exception as err:
                raise ReplayError(f"Cannot replay event #{index} (op={op!r}) on {type(model).__name__}: {err}") from err
            check_structure(model, record, index)
    done.extend({k: v for k, v in record.items() if k != DIGEST_KEY} for record in todo)
    return len(todo)


def _structural(record: dict[str, Any]) -> dict[str, Any]:
    from lit_compress.surgery.log import strip_measurements

    return {k: v for k, v in strip_measurements(record).items() if k != DIGEST_KEY}


def _import_builtin_ops() -> None:
    """Import the modules whose import registers the built-in replayers."""
    import lit_compress.surgery  # noqa: F401  (its __init__ imports every op module)
