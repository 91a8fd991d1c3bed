"""Import boundaries: surgery is pure torch and imports nothing above it; measure imports nothing above it.

The layers, bottom to top: ``errors``/``inputs`` → ``surgery`` → ``measure`` → ``models``/``data`` →
``callbacks``/``cli``. Each check imports every submodule of a layer (found with ``pkgutil``, so a
new file is covered without editing this test) in a fresh interpreter and lists what got loaded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import {package} as root
    for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        importlib.import_module(info.name)
    forbidden = {forbidden!r}
    bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
    loaded = sorted(m for m in sys.modules if m.startswith("{package}."))
    print(len(loaded))
    assert not bad, bad
    """
)

LIGHTNING = ["lightning", "pytorch_lightning"]
ABOVE_SURGERY = ["lit_compress.measure", "lit_compress.models", "lit_compress.callbacks", "lit_compress.data"]
ABOVE_MEASURE = ["lit_compress.models", "lit_compress.callbacks", "lit_compress.data"]


def _run(package: str, forbidden: list[str]) -> subprocess.CompletedProcess:
    code = CHECK.format(package=package, forbidden=forbidden)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    ("package", "forbidden", "minimum"),
    [
        ("lit_compress.surgery", LIGHTNING + ABOVE_SURGERY, 20),
        ("lit_compress.measure", LIGHTNING + ABOVE_MEASURE, 4),
    ],
)
def test_lower_layers_import_nothing_above_them(package: str, forbidden: list[str], minimum: int) -> None:
    result = _run(package, forbidden)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= minimum  # the walk really imported the submodules


def test_the_check_can_fail() -> None:
    # The callbacks import Lightning: the same check must report it.
    result = _run("lit_compress.callbacks", LIGHTNING)
    assert result.returncode != 0 and "lightning" in result.stderr
