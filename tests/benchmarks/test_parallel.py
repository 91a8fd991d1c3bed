"""``run_all --jobs``: one process per benchmark × seed, joined into one result and timed again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.parallel import run_parallel

ROOT = Path(__file__).resolve().parents[2]

FAKE = """
import sys
import torch
from torch import nn
from benchmarks import protocol as P
from benchmarks.tasks import Task

settings = P.Settings.from_namespace(P.parse_args("fake", sys.argv[1:]))
task = Task("mnist", "tiny", "acc")
rows = []
for seed in settings.seeds:
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    small = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    row = {"task": task.label, "method": "fake", "variant": "small", "seed": seed, "acc": 90.0 + seed}
    assert settings.save_models
    P.save_timed_models(settings.out, task, [(row, small)], [dense, small], torch.randn(1, 64))
    rows.append(row)
P.write("fake", settings, rows, {"wall_s": 1.0, "threads": torch.get_num_threads()})
"""


@pytest.mark.slow  # four Python processes that import torch and Lightning: about 30 s on a quiet machine
def test_parts_run_side_by_side_are_joined_and_retimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_bench.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    out = tmp_path / "out"
    runs = run_parallel({"fake": "fake_bench"}, out, quick=False, seeds=2, jobs=2, cwd=ROOT, start_families=())
    assert runs["fake"]["exit_code"] == 0 and runs["fake"]["parts"] == 2
    joined = json.loads((out / "fake.json").read_text())
    assert joined["seeds"] == [0, 1] and len(joined["parts"]) == 2
    assert joined["config"]["threads"] == 1  # one training thread per process
    assert all(r["retimed"] is True and r["speedup_b64"] > 1.0 for r in joined["rows"])
    assert len(list((out / "models").glob("*.pt"))) == 4  # each part's dense and small model


def test_a_failing_part_is_reported_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_bench.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    runs = run_parallel({"broken": "broken_bench"}, tmp_path / "out", False, 1, 1, ROOT, start_families=())
    assert runs["broken"]["exit_code"] == 3 and not (tmp_path / "out" / "broken.json").exists()
