"""Unbiased HSIC and CKA (paper Eq. 6): against independent NumPy oracles, invariances, minibatch
convergence, defined behaviour on degenerate input, bad input."""

import numpy as np
import pytest
import torch

from divfast.errors import DivfastError
from divfast.functional.representation import (cka, cka_from_hsic, gram_matrices, hsic_matrix,
                                               hsic_matrix_from_grams)


def unbiased_hsic_np(k, l):
    """Song et al. (2012), Eq. 5, written with explicit sums over i != j."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    term1 = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * sum(kt[i, :].sum() * lt[:, i].sum() for i in range(n))
    return (term1 + term2 - term3) / (n * (n - 3))


def linear_cka_np(x, y):
    """Kornblith et al. (2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.fixture
def feats():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(5, 7, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(12, 7, generator=gen,
                                                                                     dtype=torch.float64)
    z = torch.randn(12, 3, 2, generator=gen, dtype=torch.float64)
    return [x, y, z]


def test_hsic_matrix_matches_the_definition(feats):
    got = hsic_matrix(feats)
    grams = [f.reshape(12, -1).numpy() @ f.reshape(12, -1).numpy().T for f in feats]
    want = np.array([[unbiased_hsic_np(a, b) for b in grams] for a in grams])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(got, got.T)


def test_biased_linear_cka_matches_kornblith(feats):
    x, y, _ = feats
    assert cka(x, y, debiased=False) == pytest.approx(linear_cka_np(x.numpy(), y.numpy()), rel=1e-10)


def test_unbiased_cka_from_one_batch_matches_the_definition(feats):
    x, y, _ = feats
    k, l = (a.numpy() @ a.numpy().T for a in (x, y))
    want = unbiased_hsic_np(k, l) / np.sqrt(unbiased_hsic_np(k, k) * unbiased_hsic_np(l, l))
    assert cka(x, y) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariances(debiased, kernel):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
    assert cka(x, x, kernel, debiased) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x @ q, kernel, debiased) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert cka(x, 7.5 * x, kernel, debiased) == pytest.approx(1.0, abs=1e-10)  # isotropic scaling
    y = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    assert cka(x, y, kernel, debiased) == pytest.approx(cka(y, x, kernel, debiased), abs=1e-12)


def test_minibatch_cka_converges_to_the_full_data_value():
    """Averaging the unbiased HSIC terms over batches (Nguyen et al. 2021) approaches the full-data
    CKA as batches grow."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 8, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(8, 8, generator=gen, dtype=torch.float64)) + 0.3 * torch.randn(
        2048, 8, generator=gen, dtype=torch.float64)
    full = linear_cka_np(x.numpy(), y.numpy())
    errors = []
    for batch in (8, 64, 512):
        total = sum(hsic_matrix([xb, yb]) for xb, yb in zip(x.split(batch), y.split(batch)))
        errors.append(abs(float(cka_from_hsic(total)[0, 1]) - full))
    assert errors[-1] < 0.01 and errors[-1] <= errors[0], errors


def test_zero_variance_features_are_defined_not_nan():
    x = torch.randn(10, 4, dtype=torch.float64)
    const = torch.ones(10, 4, dtype=torch.float64)
    for kernel in ("linear", "rbf"):
        for debiased in (True, False):
            value = cka(x, const, kernel, debiased)
            assert value == 0.0
    hs = hsic_matrix([x, torch.zeros(10, 3, dtype=torch.float64)])
    c = cka_from_hsic(hs)
    assert torch.isfinite(c).all() and c[0, 1] == 0.0 and c[1, 1] == 0.0


def test_values_stay_in_range():
    gen = torch.Generator().manual_seed(3)
    feats = [torch.randn(6, 3, generator=gen) for _ in range(5)]  # tiny batches: the noisiest case
    c = cka_from_hsic(hsic_matrix(feats))
    assert c.min() >= -1.0 and c.max() <= 1.0 and torch.isfinite(c).all()


@pytest.mark.parametrize("call, match", [
    (lambda: hsic_matrix([torch.randn(3, 4)]), "n >= 4"),
    (lambda: hsic_matrix([torch.randn(8, 4), torch.randn(7, 4)]), "samples"),
    (lambda: hsic_matrix([torch.randn(8, 4)], kernel="poly"), "kernel"),
    (lambda: hsic_matrix([]), "features"),
    (lambda: hsic_matrix_from_grams(torch.randn(2, 5, 4)), "grams"),
])
def test_bad_input(call, match):
    with pytest.raises(DivfastError, match=match):
        call()


def test_gram_matrices_shapes_and_rbf_diagonal():
    g = gram_matrices([torch.randn(9, 2, 3), torch.randn(9, 5)], kernel="rbf")
    assert g.shape == (2, 9, 9) and g.dtype == torch.float64
    assert torch.allclose(g.diagonal(dim1=1, dim2=2), torch.ones(2, 9, dtype=torch.float64))
