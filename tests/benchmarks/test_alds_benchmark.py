"""``benchmarks.alds``: a latency allocation this machine cannot reach is recorded, not a crash that loses the run."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import alds as bench
from lit_compress.errors import ConfigError


def test_a_refused_resnet18_allocation_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_compress.measure.alds_latency as tables
    import lit_compress.surgery.alds.latency_budget as budget

    def table(*args: Any, **kwargs: Any) -> tuple[dict, dict]:
        return {}, {"measured": 7}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("`latency_ratio`=0.7 is not allowed: it must be at least 0.9998 with these `targets`.")

    monkeypatch.setattr(tables, "alds_latency_table", table)
    monkeypatch.setattr(budget, "allocate_latency", refuse)
    rows = bench.latency_allocator_time("unused.json")
    assert [r["variant"] for r in rows] == ["latency 0.7, table measured", "latency 0.7, table cached"]
    assert all("at least 0.9998" in r["refused"] and r["table_configs_timed"] == 7 for r in rows)
