"""lit_compress: depth compression of neural networks as structural events inside Lightning training.

Importing the top-level package is light: Lightning is imported only when a callback, the CLI or
a built-in model is first used (``lit_compress.surgery`` never imports it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CompressMixin": "lit_compress.checkpointing",
    "load_from_checkpoint": "lit_compress.checkpointing",
    "replay_on_load": "lit_compress.checkpointing",
    "ALDS": "lit_compress.callbacks",
    "CompressionCallback": "lit_compress.callbacks",
    "CompressionReport": "lit_compress.callbacks",
    "Distillation": "lit_compress.callbacks",
    "FoldBatchNorm": "lit_compress.callbacks",
    "LayerCollapse": "lit_compress.callbacks",
    "LayerFusion": "lit_compress.callbacks",
    "LayerMerge": "lit_compress.callbacks",
    "export_compressed": "lit_compress.export",
    "load_compressed": "lit_compress.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_compress' has no attribute {name!r}")
