"""Pure-torch structural surgery: no Lightning import here (a test checks it).

Leaf functions return a new module; model-wide functions end in ``_``, edit in place and return
the plain-data log records they applied. Importing this package registers every built-in
replayer (see :mod:`lit_compress.surgery.replay`).
"""

from lit_compress.surgery.alds_allocate import Allocation, allocate
from lit_compress.surgery.bn_fold import fold_batchnorm_, fold_conv_bn, fold_linear_bn
from lit_compress.surgery.bn_stats import batchnorm_buffers, default_forward, has_batchnorm, reestimate_batchnorm_
from lit_compress.surgery.chains import (
    ACTIVATION_TYPES,
    ChainLink,
    ConvBNAct,
    LinearChain,
    find_conv_bn_act,
    find_foldable_batchnorms,
    find_linear_chains,
    is_activation,
    linear_layout,
    sequential_conv_bn_pairs,
)
from lit_compress.surgery.collapse import (
    CollapsibleActivation,
    collapse_,
    collapse_linear_pair,
    collapse_penalty,
    collapse_post_training_,
    collapsible_activations,
    make_collapsible_,
    slope_parameters,
)
from lit_compress.surgery.conv_merge import (
    compose_conv_chain,
    compose_convs,
    fuse_downsample_skip,
    fuse_identity_skip,
    merge_conv_chain_,
    move_chain_padding_,
    move_padding_to_first,
)
from lit_compress.surgery.fusion import fuse_layers_, fuse_pair_, plan_fusions, tied_groups
from lit_compress.surgery.fusion_groups import FusionUnit, candidate_groups, fusion_units
from lit_compress.surgery.log import LOG_KEY, LOG_VERSION, make_record, strip_measurements, to_plain
from lit_compress.surgery.low_rank import (
    GroupedLinear,
    LowRankLayer,
    decompose_layer,
    low_rank_decompose_,
    low_rank_layers,
    low_rank_recompose_,
    recompose_layer,
)
from lit_compress.surgery.merge_blocks import MergeSpace, analyze_merge_space, enumerate_candidates, valid_blocks
from lit_compress.surgery.merge_dp import DPEntry, solve_merge_dp
from lit_compress.surgery.merge_plan import PlannedUnit, apply_merge_plan_, merge_planned_
from lit_compress.surgery.modules import (
    SurgeryTransaction,
    get_submodule,
    module_device_dtype,
    preserve_mode,
    replace_submodule,
    set_parameter,
)
from lit_compress.surgery.replay import (
    applied_events,
    record_events,
    register_replay,
    registered_ops,
    replay_events_,
)
from lit_compress.surgery.select import close_names, name_matches, select_modules
from lit_compress.surgery.trace import CallNode, DataflowGraph, leaf_module_names, trace_dataflow

__all__ = [
    "ACTIVATION_TYPES",
    "LOG_KEY",
    "LOG_VERSION",
    "Allocation",
    "CallNode",
    "ChainLink",
    "CollapsibleActivation",
    "ConvBNAct",
    "DPEntry",
    "DataflowGraph",
    "FusionUnit",
    "GroupedLinear",
    "LinearChain",
    "LowRankLayer",
    "MergeSpace",
    "PlannedUnit",
    "SurgeryTransaction",
    "allocate",
    "analyze_merge_space",
    "applied_events",
    "apply_merge_plan_",
    "batchnorm_buffers",
    "candidate_groups",
    "close_names",
    "collapse_",
    "collapse_linear_pair",
    "collapse_penalty",
    "collapse_post_training_",
    "collapsible_activations",
    "compose_conv_chain",
    "compose_convs",
    "decompose_layer",
    "default_forward",
    "enumerate_candidates",
    "find_conv_bn_act",
    "find_foldable_batchnorms",
    "find_linear_chains",
    "fold_batchnorm_",
    "fold_conv_bn",
    "fold_linear_bn",
    "fuse_downsample_skip",
    "fuse_identity_skip",
    "fuse_layers_",
    "fuse_pair_",
    "fusion_units",
    "get_submodule",
    "has_batchnorm",
    "is_activation",
    "leaf_module_names",
    "linear_layout",
    "low_rank_decompose_",
    "low_rank_layers",
    "low_rank_recompose_",
    "make_collapsible_",
    "make_record",
    "merge_conv_chain_",
    "merge_planned_",
    "module_device_dtype",
    "move_chain_padding_",
    "move_padding_to_first",
    "name_matches",
    "plan_fusions",
    "preserve_mode",
    "recompose_layer",
    "record_events",
    "reestimate_batchnorm_",
    "register_replay",
    "registered_ops",
    "replace_submodule",
    "replay_events_",
    "select_modules",
    "sequential_conv_bn_pairs",
    "set_parameter",
    "slope_parameters",
    "solve_merge_dp",
    "strip_measurements",
    "tied_groups",
    "to_plain",
    "trace_dataflow",
    "valid_blocks",
]
