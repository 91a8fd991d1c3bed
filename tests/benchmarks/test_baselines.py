"""``benchmarks.baselines``: the thin widths are chosen once per run, or given explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import baselines
from benchmarks import protocol as P
from benchmarks.tasks import Task


def test_the_thin_widths_are_measured_once_per_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([{0.45: 0.625, 0.7: 0.875}, {0.45: 0.75, 0.7: 0.875}])  # noise: a second timing would differ
    calls: list[int] = []

    def measure(task: Task, settings: P.Settings) -> dict[float, float]:
        calls.append(1)
        return next(answers)

    monkeypatch.setattr(baselines, "measure_thin_widths", measure)
    settings = P.Settings.from_namespace(P.parse_args("doc", ["--out", str(tmp_path)]))
    task = Task("mnist", "resnet20", "acc")
    first = baselines.thin_widths(task, settings)
    again = baselines.thin_widths(task, settings)  # another seed's process of the same run
    assert first == again == {0.45: 0.625, 0.7: 0.875}
    assert len(calls) == 1
    assert (tmp_path / "cache" / "thin_widths_mnist_resnet20.json").exists()


def test_thin_widths_outside_the_unit_interval_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        baselines.main(["--out", "unused", "--tasks", "mnist/resnet20", "--thin-widths", "0.5", "1.5"])
    assert "--thin-widths [0.5, 1.5]: every width must be in (0, 1)" in capsys.readouterr().err
