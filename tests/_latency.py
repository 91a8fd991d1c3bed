"""A deterministic LayerMerge latency cache for tests: entries from a cost model, not from a clock.

Plans made from measured latencies depend on the machine's load (a 2-core machine under load once
made a 0.6 budget infeasible). Tests that do not test the timing itself pre-fill the cache file that
the callback reads, so no entry is timed in any process (spawned DDP workers included): every entry
costs its multiply-adds (times 1e-6 ms, plus a 0.01 ms floor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lit_compress.measure.latency_table as table
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates, site_input_shapes


def cost_model_ms(layer: nn.Module, input_shape: Sequence[int], batch_size: int, *_: Any) -> float:
    """Multiply-adds of the candidate's conv on ``(batch_size, *input_shape)``, scaled to pseudo-milliseconds."""
    conv = next(m for m in layer.modules() if isinstance(m, nn.Conv2d))
    _, h, w = input_shape
    out_h, out_w = -(-h // conv.stride[0]), -(-w // conv.stride[1])
    macs = batch_size * conv.out_channels * out_h * out_w * (conv.in_channels // conv.groups) * conv.kernel_size[0] ** 2
    return 1e-6 * macs + 0.01


def fill_fake_latency_cache(
    path: str | Path,
    model: nn.Module,
    example: torch.Tensor,
    batch_sizes: Sequence[int] = (1,),
    threads: Sequence[int] = (1, 2),
) -> Path:
    """Write cost-model entries for every candidate of ``model`` into the cache at ``path``.

    ``example`` is one input batch as the callback will see it; entries are written for every batch
    size and CPU thread count given (Lightning's CPU DDP runs each worker on 1 thread).
    """
    space = analyze_merge_space(model)
    site_input_shapes(model, space, example[:1])
    candidates = enumerate_candidates(model, space)
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(table, "time_layer", cost_model_ms)
        try:
            for n in threads:
                torch.set_num_threads(n)
                for b in batch_sizes:
                    table.latency_table(space, candidates, batch_size=b, cache=path, progress=False, log=lambda _: None)
        finally:
            torch.set_num_threads(before)
    return Path(path)
