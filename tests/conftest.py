"""Shared test settings: CPU only, few threads, quiet Lightning."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # spawned DDP workers import tests.* helpers by module name
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


@pytest.fixture
def seed() -> int:
    import lightning as L

    L.seed_everything(0, verbose=False)
    return 0


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """`Trainer(deterministic=True)` switches a process-wide flag; do not let it leak into later tests
    (a spawned DDP worker inherits it through Lightning's global-state snapshot)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)
