"""Get and replace submodules by qualified name, with an undo journal.

Every structural edit in ``lit_compress.surgery`` goes through :func:`replace_submodule` or
:func:`set_parameter`. Inside a :class:`SurgeryTransaction` each edit is journaled, so a failure
half-way through a model-wide change puts the model back exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_compress.errors import SurgeryError

#: One journal per open transaction: ``(kind, owner, name, old value)`` per edit, in order.
_JOURNALS: list[list[tuple[str, nn.Module, str, Any]]] = []


def split_name(qualified_name: str) -> tuple[str, str]:
    """``"layer1.0.conv1"`` -> ``("layer1.0", "conv1")``; a top-level name has parent ``""``."""
    parent, _, child = qualified_name.rpartition(".")
    return parent, child


def get_submodule(model: nn.Module, qualified_name: str) -> nn.Module:
    """Return the submodule at ``qualified_name`` ("" is the model itself).

    Raises:
        SurgeryError: If no module has that name; the message lists close names.
    """
    if qualified_name == "":
        return model
    try:
        return model.get_submodule(qualified_name)
    except AttributeError:
        from lit_compress.surgery.select import close_names

        hint = close_names(qualified_name, [n for n, _ in model.named_modules() if n])
        raise SurgeryError(
            f"No submodule named `{qualified_name}` in {type(model).__name__}."
            + (f" Close names: {', '.join(hint)}." if hint else "")
        ) from None


def replace_submodule(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module | None:
    """Replace the submodule at ``qualified_name`` by ``new_module`` and return the old one.

    The replacement keeps the registration position of the old module (``setattr`` on the existing
    name), so parameter order, and with it position-based optimizer state, is stable.
    """
    parent_name, child_name = split_name(qualified_name)
    parent = get_submodule(model, parent_name)
    if child_name not in parent._modules:
        raise SurgeryError(f"`{qualified_name}` is not a registered submodule of {type(model).__name__}.")
    old = parent._modules[child_name]
    parent._modules[child_name] = new_module  # same key, same position
    if _JOURNALS:
        _JOURNALS[-1].append(("module", parent, child_name, old))
    return old


def set_parameter(module: nn.Module, name: str, value: nn.Parameter | None) -> None:
    """Set (or tie, or remove with ``None``) the parameter ``name`` of ``module``, journaled.

    A parameter that already exists keeps its registration position.
    """
    old = module._parameters.get(name, None) if name in module._parameters else _MISSING
    if value is None:
        module._parameters[name] = None
    elif name in module._parameters:
        module._parameters[name] = value
    else:
        module.register_parameter(name, value)
    if _JOURNALS:
        _JOURNALS[-1].append(("param", module, name, old))


_MISSING = object()


class SurgeryTransaction(contextlib.AbstractContextManager):
    """Undo every journaled edit if the block raises; transactions nest.

    Example:
        >>> with SurgeryTransaction():
        ...     replace_submodule(model, "mid", nn.Identity())  # doctest: +SKIP
    """

    def __enter__(self) -> SurgeryTransaction:
        _JOURNALS.append([])
        self._journal: list[Any] = []
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        journal = _JOURNALS.pop()
        if exc_type is None:
            if _JOURNALS:  # nested: the outer transaction may still roll us back
                _JOURNALS[-1].extend(journal)
            self._journal = journal
            return
        _undo(journal)

    def rollback(self) -> None:
        """Undo the edits of a transaction that completed (e.g. when a later step, outside it, failed)."""
        journal, self._journal = self._journal, []
        _undo(journal)


def _undo(journal: list[Any]) -> None:
    for kind, owner, name, old in reversed(journal):
        if kind == "module":
            owner._modules[name] = old
        elif old is _MISSING:
            owner._parameters.pop(name, None)
        else:
            owner._parameters[name] = old


@contextlib.contextmanager
def preserve_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Remember the train/eval flag of every submodule and restore it on exit.

    Modules created inside the block (by surgery done while the model was switched to eval) take
    their parent's restored flag, so a model that entered in train mode leaves in train mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    known = {id(m) for m, _ in modes}
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for parent in model.modules():  # pre-order: a parent's flag is final before its children's
            for child in parent.children():
                if id(child) not in known:
                    child.training = parent.training


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a module's first parameter or buffer (CPU/float32 if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()
