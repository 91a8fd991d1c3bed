"""Checkpoints of compressed models: the surgery log, its replay before weights load, and the mixin.

A compressed checkpoint carries ``checkpoint["lit_compress"] = {"version": 1, "events": [...]}``.
Lightning loads module weights *before* callback state, so the log must be replayed from
``LightningModule.on_load_checkpoint``. Three ways to get there:

- :class:`CompressMixin` as the first base of the module class (``load_from_checkpoint`` and
  ``fit(ckpt_path=...)`` both work, and so does the ``ddp_spawn`` launching process);
- nothing at all under ``fit(ckpt_path=...)`` when a lit_compress callback is in the Trainer: the
  callback installs a one-shot ``on_load_checkpoint`` on the module instance in ``setup``;
- :func:`replay_on_load` (a context manager) around ``MyModule.load_from_checkpoint(path)``.

A compressed checkpoint's ``state_dict`` also holds :data:`NOT_REPLAYED_KEY`, a sentinel entry that
the replay removes: a plain ``MyModule.load_from_checkpoint(path)`` (no mixin, no replay) then fails
with strict loading (and warns with ``strict=False``) with a message that says how to load, instead of
silently loading a fused model untied.

If loading fails after the log was replayed (the weights do not fit, the user's own hook raises), the
module is restored exactly (structure, parameters, buffers, event log) before the error is re-raised,
so a retry sees the module as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from lit_compress.errors import ReplayError
from lit_compress.surgery.integrity import DIGEST_KEY, chain_events, check_chain
from lit_compress.surgery.log import LOG_KEY, LOG_VERSION, NOT_REPLAYED_KEY, to_plain
from lit_compress.surgery.modules import SurgeryTransaction
from lit_compress.surgery.replay import applied_events, replay_events_

if TYPE_CHECKING:  # Lightning is imported only when a callback or a built-in model is used
    from lightning.pytorch import LightningModule

    _MixinBase = LightningModule
else:
    _MixinBase = object

_ModuleT = TypeVar("_ModuleT", bound="LightningModule")

#: Key of the event log in a ``state_dict`` sent back from ``ddp_spawn`` workers (never in checkpoints).
SPAWN_EVENTS_KEY = "__lit_compress_events__"


def log_payload(model: nn.Module) -> dict[str, Any]:
    """What goes into ``checkpoint["lit_compress"]`` for ``model``: plain data, with the digest chain."""
    events, digest = chain_events([to_plain(e) for e in applied_events(model)])
    return {"version": LOG_VERSION, "events": events, DIGEST_KEY: digest}


def mark_not_replayed(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Add the :data:`NOT_REPLAYED_KEY` sentinel to ``checkpoint["state_dict"]`` if ``model`` carries events."""
    state = checkpoint.get("state_dict")
    n = len(applied_events(model))
    if n and isinstance(state, dict):
        state[NOT_REPLAYED_KEY] = torch.tensor(n)


def events_from_checkpoint(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The event log of a checkpoint dict (empty for an uncompressed checkpoint).

    Raises:
        ReplayError: If the log's format version is newer than this lit_compress understands.
    """
    payload = checkpoint.get(LOG_KEY)
    if not payload:
        return []
    version = payload.get("version")
    if version != LOG_VERSION:
        raise ReplayError(
            f"This checkpoint's surgery log has format version {version!r}; this lit_compress reads "
            f"version {LOG_VERSION}. Upgrade lit_compress to load it."
        )
    events = list(payload.get("events", []))
    check_chain(events, payload.get(DIGEST_KEY))
    return events


def replay_checkpoint_(model: nn.Module, checkpoint: Mapping[str, Any]) -> int:
    """Bring ``model`` to the architecture recorded in ``checkpoint``; return the number of events replayed.

    Also removes the :data:`NOT_REPLAYED_KEY` sentinel from the checkpoint's ``state_dict``.
    """
    count = replay_events_(model, events_from_checkpoint(checkpoint))
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        state.pop(NOT_REPLAYED_KEY, None)
    return count


class _ModuleSnapshot:
    """Everything a load may change on a module: its structure (via a surgery transaction), the values
    of its parameters and buffers, and its event log; :meth:`restore` puts them back exactly."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.tensors = [(t, t.detach().clone()) for t in _tensors(module)]
        self.events = list(applied_events(module))
        self.transaction = SurgeryTransaction()

    def restore(self) -> None:
        self.transaction.rollback()
        with torch.no_grad():
            for tensor, saved in self.tensors:
                if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
                    tensor.data = saved
                else:
                    tensor.copy_(saved)
        applied_events(self.module)[:] = self.events


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def guarded_replay_(module: nn.Module, checkpoint: dict[str, Any], then: Callable[[dict[str, Any]], None]) -> None:
    """Replay ``checkpoint``'s log on ``module``, call ``then(checkpoint)`` (the class's own hook), and
    make the next ``module.load_state_dict`` restore the module exactly if it fails.

    Any failure here or in that load re-raises after ``module`` is back to its state before the call.
    """
    if not events_from_checkpoint(checkpoint):
        then(checkpoint)
        return
    snapshot = _ModuleSnapshot(module)
    try:
        with snapshot.transaction:
            replay_checkpoint_(module, checkpoint)
        then(checkpoint)
    except BaseException:
        snapshot.restore()
        raise
    module.__dict__["load_state_dict"] = _GuardedLoad(module, snapshot)


class _GuardedLoad:
    """A one-shot instance ``load_state_dict``: on failure, restore the pre-replay module and explain."""

    def __init__(self, module: nn.Module, snapshot: _ModuleSnapshot) -> None:
        self.module, self.snapshot = module, snapshot

    def __call__(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.module.__dict__.pop("load_state_dict", None)
        try:
            return self.module.load_state_dict(state_dict, *args, **kwargs)
        except Exception as err:
            replayed = len(applied_events(self.module)) - len(self.snapshot.events)
            self.snapshot.restore()
            raise ReplayError(
                f"The checkpoint's weights do not load into {type(self.module).__name__} after its {replayed} "
                f"structural event(s) were replayed, so the module was restored to exactly its state before the "
                f"load (nothing replayed, weights unchanged). Cause: {type(err).__name__}: {err}"
            ) from err


class CompressMixin(_MixinBase):
    """Put first in the bases of a LightningModule whose checkpoints may be compressed.

    ``class MyNet(CompressMixin, L.LightningModule)``: ``MyNet.load_from_checkpoint(path)`` then
    rebuilds the compressed architecture before the weights load (strict loading works), and under
    ``ddp_spawn`` the model object in the launching process follows the workers' structural events.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        guarded_replay_(self, checkpoint, lambda ckpt: super(CompressMixin, self).on_load_checkpoint(ckpt))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if SPAWN_EVENTS_KEY in state_dict:
            state_dict = dict(state_dict)
            events = state_dict.pop(SPAWN_EVENTS_KEY)
            replay_events_(self, events)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@contextlib.contextmanager
def replay_on_load(module_class: type[_ModuleT]) -> Iterator[type[_ModuleT]]:
    """Within the block, ``module_class.load_from_checkpoint`` replays the surgery log first.

    >>> with replay_on_load(MyNet):  # doctest: +SKIP
    ...     model = MyNet.load_from_checkpoint("last.ckpt")
    """
    hook = "on_load_checkpoint"
    original = module_class.__dict__.get(hook)
    inherited = module_class.on_load_checkpoint

    def on_load_checkpoint(self: _ModuleT, checkpoint: dict[str, Any]) -> None:
        guarded_replay_(self, checkpoint, lambda ckpt: inherited(self, ckpt))

    setattr(module_class, hook, on_load_checkpoint)
    try:
        yield module_class
    finally:
        if original is None:
            delattr(module_class, hook)
        else:
            setattr(module_class, hook, original)


class _OneShotReplay:
    """An instance's ``on_load_checkpoint``: replay the log, remove itself, call the class's hook."""

    def __init__(self, module: nn.Module, original: Callable[[dict[str, Any]], None]) -> None:
        self.module, self.original = module, original

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        self.module.__dict__.pop("on_load_checkpoint", None)
        guarded_replay_(self.module, checkpoint, self.original)


def install_one_shot_replay(module: LightningModule) -> None:
    """Make the next ``module.on_load_checkpoint(ckpt)`` replay the log first (instance attribute).

    Used by the callbacks in ``setup`` so that ``trainer.fit(model, ckpt_path=...)`` works with no
    change to the user's class. The attribute removes itself once called; :func:`remove_one_shot_replay`
    removes it if no checkpoint was loaded.
    """
    if "on_load_checkpoint" in module.__dict__ or isinstance(module, CompressMixin):
        return
    module.__dict__["on_load_checkpoint"] = _OneShotReplay(module, module.on_load_checkpoint)


def remove_one_shot_replay(module: LightningModule) -> None:
    """Remove the hooks :func:`install_one_shot_replay` installed (and a pending load guard), if still there."""
    if isinstance(module.__dict__.get("on_load_checkpoint"), _OneShotReplay):
        del module.__dict__["on_load_checkpoint"]
    if isinstance(module.__dict__.get("load_state_dict"), _GuardedLoad):
        del module.__dict__["load_state_dict"]


__all__ = [
    "NOT_REPLAYED_KEY",
    "SPAWN_EVENTS_KEY",
    "CompressMixin",
    "ReplayError",
    "events_from_checkpoint",
    "guarded_replay_",
    "install_one_shot_replay",
    "load_from_checkpoint",
    "log_payload",
    "mark_not_replayed",
    "remove_one_shot_replay",
    "replay_checkpoint_",
    "replay_on_load",
]


def load_from_checkpoint(module_class: type[_ModuleT], checkpoint_path: str | Path, **kwargs: Any) -> _ModuleT:
    """``module_class.load_from_checkpoint(checkpoint_path, **kwargs)`` with the surgery log replayed first.

    Works for any LightningModule class, with or without :class:`CompressMixin`; strict loading.
    """
    if issubclass(module_class, CompressMixin):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    with replay_on_load(module_class):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
