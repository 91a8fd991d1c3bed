"""Pure-torch structural surgery: no Lightning import here (a test checks it).

Leaf functions return a new module; model-wide functions end in ``_``, edit in place and return
the plain-data log records they applied. Importing this package registers every built-in
replayer (see :mod:`lit_compress.surgery.replay`).

Layout: shared plumbing at this level (module lookup and replacement, target selection, dataflow
tracing, chain discovery, BatchNorm folding and re-estimation, the surgery log and its replay);
one subpackage per method: :mod:`~lit_compress.surgery.fusion` (Layer Fusion),
:mod:`~lit_compress.surgery.collapse` (LayerCollapse), :mod:`~lit_compress.surgery.alds` (ALDS),
:mod:`~lit_compress.surgery.layermerge` (LayerMerge). Below are the documented entry points; the
rest is importable from its module.
"""

from lit_compress.surgery import alds, collapse, fusion, layermerge
from lit_compress.surgery.alds import LowRankLayer, allocate, low_rank_decompose_, low_rank_recompose_
from lit_compress.surgery.bn_fold import fold_batchnorm_
from lit_compress.surgery.bn_stats import reestimate_batchnorm_
from lit_compress.surgery.chains import find_conv_bn_act, find_foldable_batchnorms, find_linear_chains
from lit_compress.surgery.collapse import collapse_, collapse_post_training_, make_collapsible_
from lit_compress.surgery.fusion import fuse_layers_, fusion_units, plan_fusions
from lit_compress.surgery.layermerge import analyze_merge_space, apply_merge_plan_, merge_planned_
from lit_compress.surgery.modules import SurgeryTransaction, get_submodule, replace_submodule
from lit_compress.surgery.replay import applied_events, record_events, register_replay, replay_events_
from lit_compress.surgery.select import select_modules
from lit_compress.surgery.trace import trace_dataflow

__all__ = [
    "LowRankLayer",
    "SurgeryTransaction",
    "alds",
    "allocate",
    "analyze_merge_space",
    "applied_events",
    "apply_merge_plan_",
    "collapse",
    "collapse_",
    "collapse_post_training_",
    "find_conv_bn_act",
    "find_foldable_batchnorms",
    "find_linear_chains",
    "fold_batchnorm_",
    "fuse_layers_",
    "fusion",
    "fusion_units",
    "get_submodule",
    "layermerge",
    "low_rank_decompose_",
    "low_rank_recompose_",
    "make_collapsible_",
    "merge_planned_",
    "plan_fusions",
    "record_events",
    "reestimate_batchnorm_",
    "register_replay",
    "replace_submodule",
    "replay_events_",
    "select_modules",
    "trace_dataflow",
]
