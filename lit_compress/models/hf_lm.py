"""Hugging Face GPT-2 and BERT structures as causal language models, built from configs (no download).

Used by the full-size configs (``architecture: gpt2`` / ``bert`` in :class:`CausalLanguageModel`);
needs ``pip install lit_compress[hf]``. BERT runs as a decoder (``is_decoder=True``, causal mask), so
both predict the next token and share the language-model training loop.
"""

from __future__ import annotations

from torch import Tensor, nn


class HFCausalLM(nn.Module):
    """``(B, T)`` token ids -> ``(B, T, V)`` logits with a randomly initialised GPT-2 or BERT."""

    def __init__(
        self,
        architecture: str,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        dropout: float,
    ) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                f"`architecture`={architecture!r} needs Hugging Face transformers: pip install 'lit_compress[hf]'."
            ) from err
        if architecture == "gpt2":
            gpt2 = transformers.GPT2Config(
                vocab_size=vocab_size,
                n_positions=block_size,
                n_embd=d_model,
                n_layer=n_layer,
                n_head=n_head,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
            )
            self.model: nn.Module = transformers.GPT2LMHeadModel(gpt2)
        else:
            bert = transformers.BertConfig(
                vocab_size=vocab_size,
                max_position_embeddings=block_size,
                hidden_size=d_model,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                intermediate_size=4 * d_model,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                is_decoder=True,
            )
            self.model = transformers.BertLMHeadModel(bert)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(input_ids=idx).logits  # (B, T, V)
