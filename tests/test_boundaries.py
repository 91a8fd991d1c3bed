"""Import boundaries: the surgery package is pure torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import lit_compress.surgery, sys; "
    "bad = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))]; "
    "assert not bad, bad"
)


def test_surgery_does_not_import_lightning() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
