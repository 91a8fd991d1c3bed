"""ALDS (Liebenwein, Maalouf et al. 2021): k-grouped low-rank layers and the global rank allocation."""

from lit_compress.surgery.alds.allocate import Allocation, allocate
from lit_compress.surgery.alds.low_rank import (
    LowRankLayer,
    decompose_layer,
    low_rank_decompose_,
    low_rank_layers,
    low_rank_recompose_,
    recompose_layer,
)

__all__ = [
    "Allocation",
    "LowRankLayer",
    "allocate",
    "decompose_layer",
    "low_rank_decompose_",
    "low_rank_layers",
    "low_rank_recompose_",
    "recompose_layer",
]
