"""Exceptions raised by lit_compress.

``ConfigError`` is raised for bad user input (an argument, its value and what is allowed are
named in the message); ``SurgeryError`` when a model cannot be changed as asked; ``ReplayError``
when a checkpoint's event log cannot be replayed on a module.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad argument value: the message names the argument, the value and what is allowed."""


class SurgeryError(RuntimeError):
    """A structural change cannot be applied to the given model."""


class ReplayError(SurgeryError):
    """An event of a checkpoint's surgery log cannot be replayed on the given module."""


def allowed(name: str, value: object, what: str) -> ConfigError:
    """Build a ``ConfigError`` in the house style: ``name``, ``value`` and what is allowed."""
    return ConfigError(f"`{name}`={value!r} is not allowed: {what}.")
