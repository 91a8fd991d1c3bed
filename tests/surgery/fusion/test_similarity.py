"""Layer Fusion similarity measures against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lit_compress.errors import ConfigError
from lit_compress.surgery.fusion.similarity import MEASURES, _covariance_norm, is_similarity, rank_key, score

T = torch.tensor


def test_cosine_is_the_mean_of_row_cosines() -> None:
    a, b = T([[1.0, 0.0], [0.0, 1.0]]), T([[1.0, 1.0], [0.0, 2.0]])
    assert score("cosine", a, b) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)


def test_covariance_compares_frobenius_norms_of_the_standardised_covariance() -> None:
    # columns standardised over the rows: [1,2,3] -> [-1,0,1]; C = x xᵀ/(d-1) with d=1 -> norm 2
    assert float(_covariance_norm(T([[1.0], [2.0], [3.0]]))) == pytest.approx(2.0)
    # one row (1-D): only centred: [-1,0,1] -> C = 2/(3-1) = 1;  [0,0,3] -> [-1,-1,2] -> 6/2 = 3
    assert score("covariance", T([1.0, 2.0, 3.0]), T([0.0, 0.0, 3.0])) == pytest.approx(2.0)
    assert score("covariance", T([0.0, 0.0, 3.0]), T([1.0, 2.0, 3.0])) == pytest.approx(2.0)  # symmetric


def test_cka_is_centred_linear_cka() -> None:
    # 1-D weights are one column: CKA = squared Pearson correlation. a-ā = [-1,0,1], b-b̄ = [-4/3,-1/3,5/3]
    assert score("cka", T([1.0, 2.0, 3.0]), T([1.0, 2.0, 4.0])) == pytest.approx(81 / 84)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    assert score("cka", w, 3.0 * w @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    wide = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))  # the Gram-matrix branch
    assert score("cka", wide, wide @ torch.linalg.qr(torch.randn(8, 8))[0]) == pytest.approx(1.0)


def test_norm_distances() -> None:
    assert score("euclidean", T([[0.0, 3.0]]), T([[4.0, 0.0]])) == pytest.approx(5.0)
    assert score("manhattan", T([[0.0, 3.0]]), T([[4.0, 0.0]])) == pytest.approx(7.0)


def test_kl_of_softmaxes() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert score("kl", T([0.0, math.log(3.0)]), T([0.0, 0.0])) == pytest.approx(expected)


def test_wasserstein_is_the_exact_1d_earth_movers_distance() -> None:
    # sorted [1,2,3] vs [0,1,5]: (1 + 1 + 2) / 3
    assert score("wasserstein", T([[3.0, 1.0, 2.0]]), T([[0.0, 5.0, 1.0]])) == pytest.approx(4 / 3)
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 2 + 1
    assert score("wasserstein", a, b) == pytest.approx(scipy_stats.wasserstein_distance(a.reshape(-1), b.reshape(-1)))


def test_identical_weights_are_the_most_alike() -> None:
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    for name in MEASURES:
        same = score(name, w, w)
        other = score(name, w, torch.randn(4, 3, 3, 3))
        assert rank_key(name)(same) <= rank_key(name)(other), name


def test_ranking_direction_and_bad_names() -> None:
    assert is_similarity("cosine") and is_similarity("cka") and not is_similarity("wasserstein")
    assert sorted([0.2, 0.9, 0.5], key=rank_key("cosine")) == [0.9, 0.5, 0.2]
    assert sorted([0.2, 0.9, 0.5], key=rank_key("euclidean")) == [0.2, 0.5, 0.9]
    with pytest.raises(ConfigError, match=r"`measure`='l2' is not allowed: must be one of 'cosine'"):
        score("l2", torch.zeros(2), torch.zeros(2))
    with pytest.raises(ConfigError, match="same shape"):
        score("cosine", torch.zeros(2, 2), torch.zeros(2, 3))
