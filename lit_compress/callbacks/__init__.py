"""Lightning callbacks: WHEN and WHERE structural events happen; the math lives in ``lit_compress.surgery``."""

from lit_compress.callbacks.alds import ALDS
from lit_compress.callbacks.base import CompressionCallback
from lit_compress.callbacks.distillation import Distillation
from lit_compress.callbacks.fold_batchnorm import FoldBatchNorm
from lit_compress.callbacks.layer_collapse import LayerCollapse
from lit_compress.callbacks.layer_fusion import LayerFusion
from lit_compress.callbacks.layer_merge import LayerMerge
from lit_compress.callbacks.report import CompressionReport

__all__ = [
    "ALDS",
    "CompressionCallback",
    "CompressionReport",
    "Distillation",
    "FoldBatchNorm",
    "LayerCollapse",
    "LayerFusion",
    "LayerMerge",
]
