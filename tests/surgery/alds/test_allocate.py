"""ALDS allocation: error tables, the global ε step, budgets, determinism, baselines, bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.models.cifar_resnet import cifar_resnet
from lit_compress.surgery.alds.allocate import _Search, allocate, error_table
from lit_compress.surgery.alds.low_rank import (
    decompose_layer,
    dense_weight,
    folded_groups,
    low_rank_decompose_,
    low_rank_size,
)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    net = cifar_resnet(20, 1, 10, 1.0)
    with torch.no_grad():  # give the layers distinct spectra, as training does
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                f = m.weight.shape[0]
                m.weight.mul_(torch.logspace(0, -2, f).reshape(-1, *[1] * (m.weight.dim() - 1)))
    return net


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


_MODEL = _resnet()
_NAMES = _targets(_MODEL)


def test_lower_bound_error_is_the_code_definition_and_theorem_adds_sqrt_k() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3, dtype=torch.float64)
    table = error_table("x", w, error="lower_bound")
    sigma1 = float(torch.linalg.matrix_norm(w.reshape(6, 72), ord=2))
    assert table.ks == [1, 2, 4, 8]
    for k in table.ks:
        s = torch.linalg.svdvals(folded_groups(w, k))  # k × m
        m = s.shape[1]
        expected = [float(s[:, j].max()) / sigma1 if j < m else 0.0 for j in range(1, m + 1)]
        np.testing.assert_allclose(table.errors[k], expected, rtol=1e-6, atol=1e-7)
    theorem = error_table("x", w, error="theorem")
    np.testing.assert_allclose(theorem.errors[4], 2.0 * table.errors[4], rtol=1e-12)


@pytest.mark.parametrize(
    "layer", [nn.Conv2d(8, 6, 3, bias=False), nn.Conv2d(12, 10, (3, 1)), nn.Linear(12, 9)], ids=str
)
def test_exact_error_is_the_relative_frobenius_error_of_the_reconstruction(layer: nn.Module) -> None:
    torch.manual_seed(1)
    layer = layer.double()
    with torch.no_grad():  # a decaying spectrum, as trained weights have
        layer.weight.mul_(torch.logspace(0, -1.5, layer.weight.shape[0]).reshape(-1, *[1] * (layer.weight.dim() - 1)))
    w = layer.weight.detach()
    table = error_table("x", w, error="exact")
    for k in table.ks:
        for j in range(1, len(table.errors[k]) + 1):
            rebuilt, _ = dense_weight(decompose_layer(layer, k, j))
            real = float(torch.linalg.vector_norm(rebuilt - w) / torch.linalg.vector_norm(w))
            assert abs(table.errors[k][j - 1] - real) < 1e-6, (k, j, table.errors[k][j - 1], real)


def test_min_saving_keeps_layers_dense_unless_they_save_a_tenth() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40))
    names = ["0", "2", "4"]
    table = error_table("0", model[0].weight, min_saving=0.1)
    assert table.decomposes(1, 28) and not table.decomposes(1, 29)  # 28·128 = 87.5 %, 29·128 = 90.6 % of 4096
    assert table.size(1, 29) == 4096 and table.error(1, 29) == 0.0
    for keep in (0.9, 0.95, 0.97):
        guarded = allocate(model, names, keep, num_seeds=4, progress=False)
        for name, spec in guarded.plan.items():
            w = model.get_submodule(name).weight
            size = low_rank_size(w.shape[0], w.shape[1], 1, spec["groups"], spec["rank"])
            assert size <= 0.9 * w.numel(), (keep, name, spec)
    # Without the guard some layer is decomposed for less than a tenth of its weights.
    savings = []
    for keep in (0.9, 0.95, 0.97):
        plain = allocate(model, names, keep, num_seeds=4, progress=False, min_saving=0.0)
        for name, spec in plain.plan.items():
            w = model.get_submodule(name).weight
            savings.append(1 - low_rank_size(w.shape[0], w.shape[1], 1, spec["groups"], spec["rank"]) / w.numel())
    assert min(savings) < 0.1


def test_min_rank_is_never_undercut() -> None:
    guarded = allocate(_MODEL, _NAMES, 0.12, num_seeds=4, progress=False)
    assert guarded.plan and min(spec["rank"] for spec in guarded.plan.values()) >= 2
    plain = allocate(_MODEL, _NAMES, 0.12, num_seeds=4, progress=False, min_rank=1)
    assert min(spec["rank"] for spec in plain.plan.values()) == 1


def test_global_step_takes_the_smallest_error_that_fits() -> None:
    tables = [error_table(n, _MODEL.get_submodule(n).weight) for n in _NAMES[1:6]]
    search = _Search(tables)
    ks = [t.ks[1] for t in tables]
    budget = 0.3 * sum(t.dense for t in tables)
    js, worst = search.global_step(ks, budget)
    assert sum(t.size(k, j) for t, k, j in zip(tables, ks, js)) <= budget
    # One more rank for the layer that sets the worst error no longer fits.
    i = max(range(len(tables)), key=lambda n: tables[n].error(ks[n], js[n]))
    assert tables[i].error(ks[i], js[i]) == worst
    assert sum(t.size(k, j) for t, k, j in zip(tables, ks, js)) + tables[i].size(ks[i], js[i] + 1) - tables[i].size(
        ks[i], js[i]
    ) > budget or js[i] == len(tables[i].errors[ks[i]])


@pytest.mark.parametrize("method", ["alds", "uniform", "energy"])
@pytest.mark.parametrize("keep", [0.15, 0.4, 0.75])
def test_budget_is_met_within_half_a_percent_and_never_exceeded(method: str, keep: float) -> None:
    model = _resnet()
    alloc = allocate(model, _NAMES, keep, method=method, num_seeds=6, progress=False)
    total = sum(p.numel() for p in model.parameters())
    assert alloc.params_dense == total
    low_rank_decompose_(model, alloc.plan)
    real = sum(p.numel() for p in model.parameters())
    assert real == alloc.params_after  # the accounting is exact: encoder + decoder + everything else
    assert real <= keep * total
    assert real >= (1 - 0.005) * keep * total, (real / total, keep)
    if method != "alds":
        assert all(spec["groups"] == 1 for spec in alloc.plan.values())


def test_same_seed_gives_the_same_allocation() -> None:
    a = allocate(_MODEL, _NAMES, 0.3, seed=3, num_seeds=8, progress=False)
    b = allocate(_MODEL, _NAMES, 0.3, seed=3, num_seeds=8, progress=False)
    assert a.plan == b.plan and a.max_error == b.max_error
    assert a.seed_index == b.seed_index


def test_alds_beats_uniform_svd_on_the_worst_error() -> None:
    alds = allocate(_MODEL, _NAMES, 0.3, progress=False)
    uniform = allocate(_MODEL, _NAMES, 0.3, method="uniform", progress=False)
    assert alds.max_error < uniform.max_error
    assert any(spec["groups"] > 1 for spec in alds.plan.values())


def test_keep_ratio_one_keeps_everything_dense() -> None:
    alloc = allocate(_MODEL, _NAMES, 1.0, progress=False)
    assert alloc.plan == {} and alloc.max_error == 0.0


def test_small_layers_stay_dense_when_factorising_saves_nothing() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(64, 64))
    model[0] = nn.Linear(64, 2)  # rank 1 costs 66 of 128 weights; rank 2 costs the full 132 >= 128
    alloc = allocate(model, ["0", "2"], 0.5, progress=False)
    assert "0" in alloc.kept_dense or alloc.plan["0"]["rank"] == 1


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"`keep_ratio`=0 is not allowed: must be in \(0, 1\]"):
        allocate(_MODEL, _NAMES, 0, progress=False)
    with pytest.raises(ConfigError, match=r"`keep_ratio`=1.5"):
        allocate(_MODEL, _NAMES, 1.5, progress=False)
    with pytest.raises(ConfigError, match=r"`keep_ratio`=0.001 is not allowed: even rank 2 .* at least 0\.0"):
        allocate(_MODEL, _NAMES, 0.001, progress=False)
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ConfigError, match=r"`targets` select no decomposable layer.*depthwise"):
        allocate(dw, ["0"], 0.5, progress=False)
    with pytest.raises(ConfigError, match=r"`method`"):
        allocate(_MODEL, _NAMES, 0.5, method="pca", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`error`='code' is not allowed: must be one of 'exact'"):
        allocate(_MODEL, _NAMES, 0.5, error="code", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`min_rank`=0 is not allowed: must be an int >= 1"):
        allocate(_MODEL, _NAMES, 0.5, min_rank=0, progress=False)
    with pytest.raises(ConfigError, match=r"`min_saving`=1.0 is not allowed: must be a fraction in \[0, 1\)"):
        allocate(_MODEL, _NAMES, 0.5, min_saving=1.0, progress=False)
    with pytest.raises(ConfigError, match=r"`num_seeds`=0 is not allowed: must be an int >= 1"):
        allocate(_MODEL, _NAMES, 0.5, num_seeds=0, progress=False)
    with pytest.raises(ConfigError, match=r"`alternations`=-1 is not allowed: must be an int >= 0"):
        allocate(_MODEL, _NAMES, 0.5, alternations=-1, progress=False)


@pytest.mark.slow
def test_resnet18_allocation_takes_under_30_seconds() -> None:
    import torchvision

    torch.set_num_threads(2)
    model = torchvision.models.resnet18()
    start = time.perf_counter()
    alloc = allocate(model, _targets(model), 0.3, progress=False)
    assert time.perf_counter() - start < 30
    assert math.isclose(alloc.achieved_ratio, 0.3, rel_tol=0.005) and alloc.achieved_ratio <= 0.3
