"""Export a compressed model so that it loads without lit_compress's training code.

Two files:

- ``<path>``: ``torch.save`` of a plain dict ``{"format": "lit_compress.export", "version": 1,
  "model_class": "pkg.module.ClassName", "init_kwargs": {...}, "events": [...],
  "state_dict": {...}}`` that loads with ``torch.load(path, weights_only=True)``.
  :func:`load_compressed` builds the class (or takes a fresh model), replays the structural
  events and loads the weights strictly.
- ``<stem>.pt2`` (with example inputs): a ``torch.export`` program of the model in eval mode.
  It needs only torch to run: ``torch.export.load(path).module()`` (:func:`load_exported_program`).

This module does not import Lightning.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_compress.errors import ReplayError, allowed
from lit_compress.inputs import ExampleInputs, describe_inputs, inputs_to, split_inputs
from lit_compress.surgery.log import to_plain
from lit_compress.surgery.modules import module_device_dtype, preserve_mode
from lit_compress.surgery.replay import applied_events, replay_events_

EXPORT_FORMAT = "lit_compress.export"
EXPORT_VERSION = 1


def class_path(model: nn.Module) -> str:
    """``"package.module.ClassName"`` of ``model``'s class."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _init_kwargs(model: nn.Module) -> dict[str, Any]:
    """``dict(model.hparams)`` as weights-only-loadable plain data (``{}`` without hparams)."""
    hparams = getattr(model, "hparams", None)
    if not isinstance(hparams, Mapping):
        return {}
    kwargs: dict[str, Any] = {}
    for key, value in hparams.items():
        plain = to_plain(value)
        if isinstance(plain, str) and not isinstance(value, str):
            warnings.warn(
                f"lit_compress export: hparams[{key!r}] of type {type(value).__name__} is stored as the string "
                f"{plain!r}; load_compressed may need `model=` built by you.",
                stacklevel=3,
            )
        kwargs[str(key)] = plain
    return kwargs


def export_compressed(
    model: nn.Module,
    path: str | Path,
    example_inputs: ExampleInputs = None,
    *,
    torch_export: bool = True,
    dynamic_batch: bool = True,
) -> dict[str, str]:
    """Write ``model`` (weights, class, init kwargs, structural events) to ``path``.

    Args:
        model: The (compressed) model. A LightningModule's ``hparams`` become ``init_kwargs``.
        path: Output file, e.g. ``"model.pt"``; its suffix must not be ``.pt2``.
        example_inputs: A tensor, tuple/list of arguments or dict of kwargs. With
            ``torch_export``, also writes ``<stem>.pt2`` via ``torch.export`` in eval mode.
        torch_export: Whether to try the ``.pt2`` export (a failure warns and skips it).
        dynamic_batch: Export the first dimension of the positional tensor inputs as a dynamic
            batch size, so the program runs on any batch (falls back to the example's fixed
            shapes, with a warning, if the model does not allow it).

    Returns:
        ``{"state": path}`` plus ``"pt2": path`` when the program was exported.

    Raises:
        ConfigError: If ``model`` is not an ``nn.Module`` or ``path`` ends in ``.pt2``.
    """
    if not isinstance(model, nn.Module):
        raise allowed("model", type(model).__name__, "an nn.Module")
    path = Path(path)
    if path.suffix == ".pt2":
        raise allowed("path", str(path), "a file name not ending in .pt2 (the .pt2 is written beside it)")
    if "<locals>" in type(model).__qualname__:
        warnings.warn(
            f"lit_compress export: {class_path(model)} is defined inside a function and cannot be imported; "
            "load it with load_compressed(path, model=<a fresh instance>).",
            stacklevel=2,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model_class": class_path(model),
        "init_kwargs": _init_kwargs(model),
        "events": [dict(e) for e in applied_events(model)],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "torch_version": str(torch.__version__),
    }
    torch.save(payload, path)
    written = {"state": str(path)}
    if torch_export and example_inputs is not None:
        pt2 = path.with_suffix(".pt2")
        if _export_program(model, example_inputs, pt2, dynamic_batch):
            written["pt2"] = str(pt2)
    return written


def _export_program(model: nn.Module, example_inputs: ExampleInputs, pt2: Path, dynamic_batch: bool = True) -> bool:
    """``torch.export`` ``model`` in eval mode to ``pt2``; warn and return False on failure."""
    device, _ = module_device_dtype(model)
    args, kwargs = split_inputs(inputs_to(example_inputs, device))
    with preserve_mode(model):
        model.eval()
        try:
            program = None
            if dynamic_batch and not kwargs and args:
                batch = torch.export.Dim.AUTO
                shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
                try:
                    program = torch.export.export(model, args, dynamic_shapes=shapes)
                except Exception as err:
                    warnings.warn(
                        f"lit_compress export: a dynamic batch size failed for {type(model).__name__} "
                        f"({type(err).__name__}); the .pt2 takes the example's shapes only.",
                        stacklevel=4,
                    )
            if program is None:
                program = torch.export.export(model, args, kwargs=kwargs or None)
            torch.export.save(program, pt2)
        except Exception as err:
            pt2.unlink(missing_ok=True)
            reason = (str(err).strip().splitlines() or [""])[0]
            warnings.warn(
                f"lit_compress export: torch.export of {type(model).__name__} on {describe_inputs(example_inputs)} "
                f"failed, so {pt2.name} was not written ({type(err).__name__}: {reason}).",
                stacklevel=3,
            )
            return False
    return True


def _import_class(name: str) -> type:
    """Import ``"pkg.mod.ClassName"`` (nested qualnames such as ``"pkg.mod.Outer.Inner"`` work too)."""
    parts = name.split(".")
    first_error: str | None = None
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            first_error = first_error or f"{type(err).__name__}: {err}"
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            missing = ".".join(parts[cut:])
            raise ImportError(f"cannot import `{name}`: module `{module_name}` has no `{missing}`") from None
        if isinstance(obj, type):
            return obj
        raise ImportError(f"cannot import `{name}`: it is a {type(obj).__name__}, not a class")
    raise ImportError(f"cannot import `{name}` ({first_error or 'not a dotted class path'})")


def read_export(path: str | Path) -> dict[str, Any]:
    """The dict written by :func:`export_compressed` (checked), loaded with ``weights_only=True``.

    Raises:
        ConfigError: If the file is not a lit_compress export or is of a newer format version.
    """
    what = f"a file written by lit_compress.export.export_compressed (format {EXPORT_FORMAT!r})"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise allowed("path", str(path), "an existing file written by export_compressed") from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise allowed("path", str(path), f"{what}; torch.load(weights_only=True) failed: {reason}") from err
    if not isinstance(payload, Mapping) or payload.get("format") != EXPORT_FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise allowed("path", f"{path} (format {found!r})", what)
    if payload.get("version") != EXPORT_VERSION:
        found = f"{path} (version {payload.get('version')!r})"
        raise allowed("path", found, f"export version {EXPORT_VERSION}; upgrade lit_compress")
    return dict(payload)


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild an exported model: build or take ``model``, replay its events, load weights strictly.

    Args:
        path: A file written by :func:`export_compressed`.
        model: A freshly built, *uncompressed* instance of the exported architecture. ``None``:
            import the recorded class and call it with the recorded ``init_kwargs``.

    Returns:
        The model, in eval mode, with the exported weights (on the device ``model`` was on, else CPU).

    Raises:
        ConfigError: For a file that is not an export, a class that cannot be imported or built
            (pass ``model=`` instead), or weights that do not fit the model.
        ReplayError: If an event cannot be replayed (e.g. its op's module was not imported).
    """
    payload = read_export(path)
    name, init_kwargs = payload["model_class"], dict(payload.get("init_kwargs") or {})
    built_here = model is None
    if model is None:
        hint = f"build it yourself and pass it: load_compressed({str(path)!r}, model={name.rsplit('.', 1)[-1]}(...))"
        try:
            cls = _import_class(name)
        except ImportError as err:
            raise allowed("model", None, f"an instance of the exported class, since {err}; {hint}") from None
        try:
            model = cls(**init_kwargs)
        except Exception as err:
            failure = f"{name}(**{init_kwargs!r}) failed ({type(err).__name__}: {err})"
            raise allowed("model", None, f"an instance, since {failure}; {hint}") from err
    elif not isinstance(model, nn.Module):
        raise allowed("model", type(model).__name__, "an nn.Module built like the exported one, or None")
    try:
        replay_events_(model, list(payload.get("events") or []))
    except ReplayError as err:
        if not built_here:
            raise
        raise ReplayError(
            f"{err} The module was built as {name}(**{init_kwargs!r}); if that is not the exported, uncompressed "
            f"architecture, pass a freshly built one as `model=`."
        ) from err
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        source = f"{name}(**{init_kwargs!r})" if built_here else f"the given {type(model).__name__}"
        raise allowed(
            "model",
            type(model).__name__,
            f"a model whose architecture, after replaying the {len(payload.get('events') or [])} recorded event(s), "
            f"matches the exported weights; {source} does not ({str(err).splitlines()[0]}). "
            f"Pass a freshly built, uncompressed `model=` of the exported architecture",
        ) from err
    return model.eval()


def load_exported_program(path: str | Path) -> nn.Module:
    """Load a ``.pt2`` written by :func:`export_compressed` as a callable module.

    Needs only torch (no lit_compress, no model class). The program was traced in eval mode.
    """
    return torch.export.load(path).module()


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "class_path",
    "export_compressed",
    "load_compressed",
    "load_exported_program",
    "read_export",
]
