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


# --- RepresentationSimilarity: additive sums ------------------------------------------------------

from divfast.metrics import RepresentationSimilarity  # noqa: E402


def _batches(seed, n=96, sizes=(16, 32, 16, 32)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=gen, dtype=torch.float64) + torch.randn(n, 5, generator=gen,
                                                                               dtype=torch.float64)
    z = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    out, start = [], 0
    for size in sizes:
        out.append([t[start:start + size] for t in (x, y, z)])
        start += size
    return out


def test_metric_equals_the_sum_of_batch_hsic():
    batches = _batches(0)
    metric = RepresentationSimilarity(names=["x", "y", "z"])
    for b in batches:
        metric.update(b)
    total = sum(hsic_matrix(b) for b in batches)
    got = metric.compute()
    np.testing.assert_allclose(np.array(got["cka"]), cka_from_hsic(total).numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.array(got["hsic"]), (total / 4).numpy(), rtol=1e-12)
    assert got["batches"] == 4 and got["names"] == ["x", "y", "z"]


def test_shards_merge_exactly_and_state_dict_round_trips(tmp_path):
    batches = _batches(1)
    whole = RepresentationSimilarity()
    for b in batches:
        whole.update(b)
    shards = [RepresentationSimilarity() for _ in range(3)]
    shards[0].update(batches[0])
    shards[1].update(batches[1])
    shards[1].update(batches[2])
    shards[0].update(batches[3])  # shards[2] never updated
    path = tmp_path / "s.pt"
    torch.save(shards[1].state_dict(), path)
    restored = RepresentationSimilarity()
    restored.load_state_dict(torch.load(path, weights_only=True))
    merged = RepresentationSimilarity().merge(shards[2]).merge(shards[0]).merge(restored)
    np.testing.assert_allclose(np.array(merged.compute()["cka"]), np.array(whole.compute()["cka"]),
                               rtol=1e-12)


def test_small_batches_are_skipped_and_counted():
    metric = RepresentationSimilarity()
    x = torch.randn(10, 3, dtype=torch.float64)
    metric.update([x[:3], x[:3]])  # n = 3 < 4
    with pytest.raises(RuntimeError, match="no batch"):
        metric.compute()
    metric.update([x[3:], x[3:]])
    out = metric.compute()
    assert out["skipped_samples"] == 3 and out["batches"] == 1 and out["cka"][0][1] == pytest.approx(1.0)


def test_metric_bad_input():
    with pytest.raises(DivfastError, match="kernel"):
        RepresentationSimilarity(kernel="cosine")
    metric = RepresentationSimilarity(names=["a", "b"])
    with pytest.raises(DivfastError, match="features"):
        metric.update([torch.randn(8, 2)])
    other = RepresentationSimilarity()
    other.update([torch.randn(8, 2), torch.randn(8, 2)])
    with pytest.raises(DivfastError, match="representations"):
        other.update([torch.randn(8, 2)] * 3)


# --- two processes over gloo ----------------------------------------------------------------------

import os  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = RepresentationSimilarity()
        for i, batch in enumerate(_batches(5)):
            if i % world == rank:  # batches dealt rank::world
                metric.update(batch)
        metric.sync()
        torch.save(metric.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_sync_equals_one_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    whole = RepresentationSimilarity()
    for batch in _batches(5):
        whole.update(batch)
    want = whole.compute()
    for got in results:
        assert got["batches"] == want["batches"] == 4
        np.testing.assert_allclose(np.array(got["cka"]), np.array(want["cka"]), rtol=1e-12)
