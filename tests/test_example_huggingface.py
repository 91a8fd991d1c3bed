"""``examples/huggingface_pretrained.py`` runs on a tiny Llama built from a config (no download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "huggingface_pretrained", ROOT / "examples" / "huggingface_pretrained.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_llama_is_compressed_with_alds_and_fusion_and_collapse_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _example().main(
        [str(tmp_path), "--epochs", "2", "--batches", "2", "--val-batches", "2", "--block-size", "16"]
    )
    out = capsys.readouterr().out
    assert "LayerCollapse: not applied" in out and "gated MLP" in out and "gate_proj" in out
    assert "events: low_rank_decompose, fuse_layers" in out
    assert result["events"] == 2
    assert result["params_after"] < result["params_before"]
    assert 1.0 < result["ppl_after"] < 2 * result["ppl_before"]  # a finite perplexity after the events
    assert (tmp_path / "lightning_logs").exists()
