"""A small decoder-only transformer language model (GPT-style, pre-LayerNorm).

Attention has separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` ``nn.Linear`` modules and
the MLP is an ``nn.Sequential`` with named children (``blocks.0.mlp.fc_in``, ``.act``, ``.fc_out``,
``.dropout``), so that surgery (layer fusion, low-rank factorisation, pruning) can address each one.
Shapes use B (batch), T (time), C (``d_model``), H (heads), D (head size = C / H), V (vocabulary).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lit_compress.errors import allowed

Activation = Literal["gelu", "relu", "silu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)``.

    Shapes: ``(B, T, C) -> (B, T, C)``.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise allowed("d_model", d_model, f"must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        k = self._heads(self.k_proj(x))  # (B, H, T, D)
        v = self._heads(self.v_proj(x))  # (B, H, T, D)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

    Shapes: ``(B, T, C) -> (B, T, C)``.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, activation: Activation = "gelu") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("fc_in", nn.Linear(d_model, 4 * d_model)),
                    ("act", _ACTIVATIONS[activation]()),
                    ("fc_out", nn.Linear(4 * d_model, d_model)),
                    ("dropout", nn.Dropout(dropout)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class TransformerLM(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, ``n_layer`` blocks, final LN, head.

    Args:
        vocab_size: Number of tokens V.
        block_size: Longest context T the position embedding covers.
        n_layer: Number of blocks.
        n_head: Attention heads per block (must divide ``d_model``).
        d_model: Width C.
        dropout: Dropout on embeddings, attention weights and residual branches.
        activation: MLP activation.
        tie_embeddings: Share the head's weight with the token embedding.

    Shapes: ``(B, T) int64 -> (B, T, V)`` logits, ``T <= block_size``.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 256,
        dropout: float = 0.0,
        activation: Activation = "gelu",
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        check_transformer_args(vocab_size, block_size, n_layer, n_head, d_model, dropout, activation)
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_head, dropout, activation) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layer)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, n_layer: int) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                # GPT-2: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layer).
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("out_proj", "fc_out")) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        _b, t = idx.shape  # (B, T)
        if t > self.block_size:
            raise ValueError(f"Input length {t} exceeds block_size={self.block_size}.")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.ln_f(x))  # (B, T, V)


def check_transformer_args(
    vocab_size: int,
    block_size: int,
    n_layer: int,
    n_head: int,
    d_model: int,
    dropout: float,
    activation: str | None = "gelu",
) -> None:
    """Raise ``ConfigError`` for the first invalid transformer argument."""
    for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer)):
        if value < 1:
            raise allowed(name, value, "must be >= 1")
    if n_head < 1:
        raise allowed("n_head", n_head, "must be >= 1")
    if d_model < 1 or d_model % n_head != 0:
        raise allowed("d_model", d_model, f"must be a positive multiple of n_head={n_head}")
    if not 0.0 <= dropout < 1.0:
        raise allowed("dropout", dropout, "must be in [0, 1)")
    if activation not in _ACTIVATIONS:
        raise allowed("activation", activation, f"must be one of {sorted(_ACTIVATIONS)}")


__all__ = ["Activation", "Block", "CausalSelfAttention", "TransformerLM", "check_transformer_args"]
