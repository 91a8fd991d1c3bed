"""Layer Fusion at LLM scale: one fusion step on a SmolLM-135M-shaped Llama built from config."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_one_fusion_step_on_a_135m_llama_takes_under_a_minute() -> None:
    pytest.importorskip("transformers")
    from benchmarks.layer_fusion import llm_step

    result = llm_step("wasserstein", p=0.5)
    # 7 groups of 30 layers, 15 fused in each; Llama has no biases:
    # q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536
    assert result["fusions"] == 7 * 15
    assert result["removed"] == 15 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert result["step_s"] < 60, result
