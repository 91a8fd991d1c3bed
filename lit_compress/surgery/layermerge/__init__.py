"""LayerMerge (Kim et al. 2024): the merge space, importance, the DP, planned fine-tuning and the exact merge."""

from lit_compress.surgery.layermerge.adapters import UnitLayout, register_merge_trunk, register_merge_unit
from lit_compress.surgery.layermerge.blocks import MergeSpace, analyze_merge_space, enumerate_candidates
from lit_compress.surgery.layermerge.conv import compose_conv_chain, compose_convs, merge_conv_chain_
from lit_compress.surgery.layermerge.dp import solve_merge_dp
from lit_compress.surgery.layermerge.importance import importance_table
from lit_compress.surgery.layermerge.plan import apply_merge_plan_, merge_planned_

__all__ = [
    "MergeSpace",
    "UnitLayout",
    "analyze_merge_space",
    "apply_merge_plan_",
    "compose_conv_chain",
    "compose_convs",
    "enumerate_candidates",
    "importance_table",
    "merge_conv_chain_",
    "merge_planned_",
    "register_merge_trunk",
    "register_merge_unit",
    "solve_merge_dp",
]
