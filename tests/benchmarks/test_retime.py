"""``benchmarks.retime``: the models a run kept are timed again and the rows' latency columns rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import protocol as P
from benchmarks.retime import main
from benchmarks.tasks import Task


def test_saved_models_are_retimed_against_their_dense_model(tmp_path: Path) -> None:
    task = Task("mnist", "tiny", "acc")
    dense = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    small = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    x = torch.randn(1, 64)
    rows = [{"task": task.label, "method": "m", "variant": "small", "seed": 0, "speedup_b64": -1.0}]
    P.save_timed_models(tmp_path, task, [(rows[0], small)], [dense, small], x)
    assert (tmp_path / "models" / rows[0]["model_file"]).exists()
    untouched = {"task": task.label, "method": "m", "variant": "not saved", "seed": 0, "speedup_b64": -1.0}
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "rows": [*rows, untouched]}))
    main(["--out", str(tmp_path), "--rounds", "2", "--repeats", "3"])
    retimed, kept = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert retimed["retimed"] is True and retimed["speedup_b64"] > 1.0  # 8 hidden units against 512
    assert retimed["lat_b64_ms"] > 0 and retimed["latency_threads"] == P.LATENCY_THREADS
    assert kept["speedup_b64"] == -1.0 and "retimed" not in kept


def test_rows_whose_model_files_are_gone_keep_their_timing(tmp_path: Path) -> None:
    task = Task("mnist", "tiny", "acc")
    dense, small = nn.Linear(16, 16), nn.Linear(16, 2)
    row = {"task": task.label, "method": "m", "variant": "kept", "seed": 0, "speedup_b64": -1.0}
    P.save_timed_models(tmp_path, task, [(row, small)], [dense, small], torch.randn(1, 16))
    merged_in = {**row, "variant": "from an earlier run", "model_file": "gone.pt", "speedup_b64": 1.5}
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "rows": [row, merged_in]}))
    main(["--out", str(tmp_path), "--rounds", "1", "--repeats", "2"])
    retimed, earlier = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert retimed["retimed"] is True and retimed["speedup_b64"] > 0
    assert earlier["speedup_b64"] == 1.5 and "retimed" not in earlier


def test_a_run_without_saved_models_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "rows": [{"seed": 0}]}))
    with pytest.raises(SystemExit, match="--save-models"):
        main(["--out", str(tmp_path)])
