"""All-or-nothing events: a snapshot of the model taken before the surgery, restored exactly on failure.

:class:`ModelSnapshot` remembers, for every module of the model, its registered submodules,
parameters and buffers (the objects), its other attributes (e.g. a conv's ``padding``), its
train/eval flag, and a CPU copy of every parameter and buffer value. :meth:`ModelSnapshot.restore`
puts all of it back, so the state dict compares equal byte for byte and the optimizer's parameter
objects are the model's again.

:func:`check_forward` runs the changed model once on example inputs (eval mode, no grad) and,
when that raises, names the innermost module that was running and the changed modules inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_compress.inputs import describe_inputs, module_call
from lit_compress.surgery.replay import applied_events

_DICTS = ("_modules", "_parameters", "_buffers")


class ModelSnapshot:
    """Everything needed to put ``model`` back exactly as it is now (values copied to the CPU)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, dict[str, Any]]]] = []
        self.values: dict[int, torch.Tensor] = {}
        self.tensors: list[torch.Tensor] = []
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.events = [dict(e) for e in applied_events(model)]
        for module in model.modules():
            attrs = {k: v for k, v in module.__dict__.items() if k not in _DICTS}
            registered = {k: dict(module.__dict__[k]) for k in _DICTS}
            self.modules.append((module, attrs, registered))
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None and id(tensor) not in self.values:
                    self.values[id(tensor)] = tensor.detach().to("cpu", copy=True)
                    self.tensors.append(tensor)

    def restore(self) -> None:
        """Put every module, attribute, flag and value back (idempotent)."""
        for module, attrs, registered in self.modules:
            for key in [k for k in module.__dict__ if k not in _DICTS and k not in attrs]:
                del module.__dict__[key]
            module.__dict__.update(attrs)
            for key, saved in registered.items():
                live = module.__dict__[key]
                live.clear()
                live.update(saved)
        with torch.no_grad():
            for tensor in self.tensors:
                value = self.values[id(tensor)]
                tensor.data = value.to(tensor.device, copy=True)
        log = applied_events(self.model)
        log[:] = [dict(e) for e in self.events]

    def changed_modules(self) -> list[str]:
        """Qualified names (in the current model) of the modules that did not exist at snapshot time."""
        return [n for n, m in self.model.named_modules() if n and id(m) not in self.names]


@contextlib.contextmanager
def _innermost_running(model: nn.Module) -> Iterator[list[str]]:
    """Track the modules of ``model`` whose forward has started but not returned; yields the live stack.

    Global module hooks, not per-module ones: per-module hooks switch off fast paths that read weights
    directly (``nn.TransformerEncoderLayer`` in eval mode), which is what the check must exercise.
    """
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(mod: nn.Module, args: Any) -> None:
        if id(mod) in names:
            stack.append(names[id(mod)])

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        if id(mod) in names and stack and stack[-1] == names[id(mod)]:
            stack.pop()

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def check_forward(model: nn.Module, inputs: Any, changed: list[str]) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no grad; flags restored); explain a failure.

    Raises:
        RuntimeError: ``"<where>: <error>"`` naming the innermost running module, its class and the
            changed modules inside it (the original exception is chained).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _innermost_running(model) as stack:
            try:
                module_call(model, inputs)
            except Exception as err:
                where = stack[-1] if stack else ""
                raise RuntimeError(_failure_text(model, where, changed, inputs, err)) from err
    finally:
        for module, training in modes:
            module.training = training


def _failure_text(model: nn.Module, where: str, changed: list[str], inputs: Any, err: Exception) -> str:
    inside = [n for n in changed if not where or n == where or n.startswith(where + ".")]
    label = f"`{where}` ({type(model.get_submodule(where)).__name__})" if where else f"{type(model).__name__}"
    text = f"the forward on {describe_inputs(inputs)} failed in {label}: {type(err).__name__}: {err}"
    if inside:
        text += f"; changed module(s) there: {', '.join(f'`{n}`' for n in inside[:5])}"
        text += f" and {len(inside) - 5} more" if len(inside) > 5 else ""
    return text
