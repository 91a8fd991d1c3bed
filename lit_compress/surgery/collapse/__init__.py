"""LayerCollapse (Zibakhsh Shabgahi et al. 2023): collapsible activations, the penalty, exact MLP collapse."""

from lit_compress.surgery.collapse.mlp import (
    CollapsibleActivation,
    collapse_,
    collapse_linear_pair,
    collapse_penalty,
    collapse_post_training_,
    collapsible_activations,
    make_collapsible_,
    slope_parameters,
)

__all__ = [
    "CollapsibleActivation",
    "collapse_",
    "collapse_linear_pair",
    "collapse_penalty",
    "collapse_post_training_",
    "collapsible_activations",
    "make_collapsible_",
    "slope_parameters",
]
