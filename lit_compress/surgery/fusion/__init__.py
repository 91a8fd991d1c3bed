"""Layer Fusion (O'Neill et al. 2020): role/shape groups, data-free similarity, real weight ties."""

from lit_compress.surgery.fusion.groups import FusionUnit, candidate_groups, fusion_units, max_removable
from lit_compress.surgery.fusion.pairwise import pairwise
from lit_compress.surgery.fusion.plan import plan_fusions, plan_group_fusions
from lit_compress.surgery.fusion.similarity import MEASURES
from lit_compress.surgery.fusion.tie import POLICIES, fuse_layers_, tied_groups

__all__ = [
    "MEASURES",
    "POLICIES",
    "FusionUnit",
    "candidate_groups",
    "fuse_layers_",
    "fusion_units",
    "max_removable",
    "pairwise",
    "plan_fusions",
    "plan_group_fusions",
    "tied_groups",
]
