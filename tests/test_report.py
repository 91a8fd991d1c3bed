"""The compression report: JSON round trip, Markdown rows, a valid PNG, missing values as "–"."""

import json
import math
from pathlib import Path

import pytest
import torch

from lit_compress.errors import ConfigError
from lit_compress.report import (
    format_count,
    format_flops,
    format_ms,
    format_report_markdown,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample():
    initial = {"params": 1_234_567, "params_all": 1_234_567, "flops": 45_600_000, "latency_ms": 2.5, "val_acc": 0.981}
    events = [
        {
            "op": "layer_fusion",
            "index": 0,
            "epoch": 2,
            "global_step": 120,
            "callback": "LayerFusion",
            "before": dict(initial),
            "after": {"params": 1_000_000, "flops": 45_600_000, "latency_ms": 2.4, "val_acc": 0.975},
            "wall_s": 0.12,
        },
        {
            "op": "collapse",
            "index": 1,
            "epoch": 4,
            "global_step": 240,
            "callback": "LayerCollapse",
            "before": {"params": 1_000_000},
            "after": {"params": 617_000, "flops": None, "latency_ms": None, "val_acc": None},
            "wall_s": 0.3,
        },
    ]
    final = {"params": 617_000, "params_all": 700_000, "flops": 20_000_000, "latency_ms": 1.25, "val_acc": 0.979}
    meta = {"torch": "2.14.1", "lightning": "2.6.6", "machine": "cpu x2", "seed": 0}
    return events, initial, final, meta


def test_formatting_is_readable():
    assert format_count(1_234_567) == "1.23 M" and format_count(936) == "936" and format_count(45_600) == "45.6 k"
    assert format_flops(45_600_000) == "45.6 MFLOPs" and format_flops(812) == "812 FLOPs"
    assert format_flops(999_999) == "1 MFLOPs"
    assert format_ms(1.434) == "1.43" and format_ms(None) == "–" and format_count(float("nan")) == "–"


def test_write_report_files_and_json_round_trip(tmp_path):
    events, initial, final, meta = sample()
    paths = write_report(tmp_path / "logs", events=events, initial=initial, final=final, meta=meta)
    assert set(paths) == {"json", "markdown", "png"}
    doc = json.loads((tmp_path / "logs" / "compression_report.json").read_text())
    assert paths["json"].endswith("compression_report.json")
    assert doc["events"] == events and doc["initial"] == initial and doc["final"] == final and doc["meta"] == meta
    assert doc["format"] == "lit_compress.compression_report" and doc["version"] == 1
    assert doc["summary"]["num_events"] == 2
    assert doc["summary"]["params_ratio"] == pytest.approx(617_000 / 1_234_567)
    assert doc["summary"]["latency_speedup"] == pytest.approx(2.0)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert (tmp_path / "logs" / "compression_report.png").stat().st_size > 1000
    assert Path(paths["markdown"]).read_text(encoding="utf-8") == format_report_markdown(
        events=events, initial=initial, final=final, meta=meta
    )


def test_markdown_has_one_row_per_state_and_dashes(tmp_path):
    events, initial, final, meta = sample()
    text = format_report_markdown(events=events, initial=initial, final=final, meta=meta)
    table = [line for line in text.splitlines() if line.startswith("|")]
    header, rows = table[0], table[2:]
    assert "params" in header and "Δparams %" in header and "FLOPs" in header and "val_acc" in header
    assert len(rows) == 1 + len(events) + 1
    assert "original" in rows[0] and "final" in rows[-1]
    assert "#0 layer_fusion (LayerFusion)" in rows[1] and "120 / 2" in rows[1]
    assert "1.23 M" in rows[0] and "45.6 MFLOPs" in rows[0] and "0.981" in rows[0]
    collapse = [c.strip() for c in rows[2].strip("|").split("|")]
    assert collapse[2] == "617 k" and collapse[3] == "-50.0 %"
    assert collapse[4:] == ["–", "–", "–"]
    assert "**seed**: 0" in text


def test_missing_metrics_never_crash(tmp_path):
    events = [{"op": "merge"}, {"index": 5, "after": None, "before": {"val_loss": float("nan")}}]
    paths = write_report(tmp_path, events=events, initial={}, final={"params": None}, meta=None)
    text = Path(paths["markdown"]).read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]
    assert len(rows) == 4 and "#0 merge" in rows[1] and "#5 ?" in rows[2]
    assert all(c.strip() == "–" for c in rows[3].strip("|").split("|")[2:])
    doc = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    assert doc["events"][1]["before"]["val_loss"] is None  # NaN is not JSON
    assert doc["summary"]["params_ratio"] is None
    with open(paths["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_tensors_and_numpy_like_values_become_plain_json(tmp_path):
    after = {"params": torch.tensor(7)}
    events = [{"op": "svd", "ranks": torch.tensor([3, 4]), "big": torch.zeros(100), "after": after}]
    paths = write_report(tmp_path, events=events, initial={"params": 10}, final={"params": 7})
    doc = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    assert doc["events"][0]["ranks"] == [3, 4] and doc["events"][0]["big"] == "Tensor[100] float32"
    assert doc["events"][0]["after"]["params"] == 7
    assert "-30.0 %" in Path(paths["markdown"]).read_text(encoding="utf-8")
    assert not math.isnan(doc["summary"]["params_ratio"])


def test_bad_events_argument():
    with pytest.raises(ConfigError, match="`events`"):
        format_report_markdown(events={"op": "x"}, initial={}, final={})
    with pytest.raises(ConfigError, match=r"`events\[0\]`"):
        format_report_markdown(events=["x"], initial={}, final={})
