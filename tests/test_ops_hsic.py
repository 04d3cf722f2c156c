"""``divfast::hsic``: the compiled kernel against the pure-PyTorch reference and against an explicitly
U-centred NumPy oracle, the symmetric-part rule, gradients, determinism, bad input.

Every test draws fresh inputs from the seeded ``gen`` fixture and runs on each device of ``device``.
"""

import numpy as np
import pytest
import torch

import divfast._ops._load as load
from divfast._ops import reference
from divfast._ops.hsic import hsic

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel(grams):
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    return torch.ops.divfast.hsic(grams)


def grams_of(gen, g, n, d=7, dtype=torch.float64, device="cpu"):
    x = torch.randn(g, n, d, generator=gen, dtype=torch.float64)
    return (x @ x.transpose(1, 2)).to(dtype).to(device)


def u_centre(k):
    """Székely & Rizzo's U-centring, written out entry by entry (float64 NumPy)."""
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    rows = k.sum(axis=1)
    total = k.sum()
    out = k - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def oracle(grams):
    """HSIC_u(K, L) = <U(K), U(L)> / (n (n - 3)): an independent route to Song et al.'s estimator."""
    k = grams.double().cpu().numpy()
    k = (k + k.transpose(0, 2, 1)) / 2
    n = k.shape[-1]
    centred = [u_centre(m) for m in k]
    return torch.tensor([[float((a * b).sum()) / (n * (n - 3)) for b in centred] for a in centred],
                        dtype=torch.float64).reshape(len(centred), len(centred))


def test_reference_matches_u_centred_oracle(gen):
    for g, n in [(1, 4), (3, 5), (4, 17)]:
        x = grams_of(gen, g, n)
        torch.testing.assert_close(reference.hsic(x), oracle(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_odd_sizes(device, gen, dtype):
    for g, n in [(1, 4), (2, 5), (4, 7), (3, 31), (10, 65), (17, 33)]:
        x = grams_of(gen, g, n, dtype=dtype, device=device)
        got, want = kernel(x), reference.hsic(x)
        assert got.dtype == torch.float64 and got.shape == (g, g) and got.device == x.device
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * max(scale, 1.0))
        assert torch.equal(got, got.T)


def test_many_chunks_and_tiles(device, gen):
    """Enough Grams and samples that the CPU kernel cuts the triangle into several chunks and the
    products into edge tiles of every shape (G = 3k + 1, 3k + 2)."""
    for g, n in [(40, 97), (41, 64), (2, 300)]:
        x = grams_of(gen, g, n, d=5, dtype=torch.float32, device=device)
        want = oracle(x).to(device)
        torch.testing.assert_close(kernel(x), want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_only_the_symmetric_part_enters(device, gen):
    x = torch.randn(5, 9, 9, generator=gen, dtype=torch.float64).to(device)
    sym = (x + x.transpose(1, 2)) / 2
    torch.testing.assert_close(kernel(x), kernel(sym), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel(x), reference.hsic(sym), rtol=1e-10, atol=1e-12)


def test_diagonal_is_ignored(device, gen):
    x = grams_of(gen, 3, 8, device=device)
    y = x.clone()
    y.diagonal(dim1=1, dim2=2).add_(123.0)
    torch.testing.assert_close(kernel(x), kernel(y), rtol=1e-12, atol=1e-12)


def test_non_contiguous_and_empty(device, gen):
    base = grams_of(gen, 8, 12, device=device)
    strided = base[::2]  # every other Gram: not contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(kernel(strided), reference.hsic(strided.contiguous()))
    empty = kernel(torch.zeros(0, 6, 6, device=device))
    assert empty.shape == (0, 0) and empty.dtype == torch.float64


def test_cka_properties_through_the_kernel(device, gen):
    """Linear CKA from the kernel: 1 for a scaled copy, unchanged by an orthogonal map."""
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    feats = [x, 3.0 * x, x @ q, torch.randn(40, 6, generator=gen, dtype=torch.float64)]
    h = kernel(torch.stack([f @ f.T for f in feats]).to(device)).cpu()
    cka = h / torch.sqrt(h.diagonal()[:, None] * h.diagonal()[None, :])
    torch.testing.assert_close(cka[0, 1:3], torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert abs(float(cka[0, 3])) < 0.5


def test_result_does_not_depend_on_thread_count(gen):
    x = grams_of(gen, 29, 70, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x)
        torch.set_num_threads(max(2, threads))
        many = kernel(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_gradcheck_on_the_kernel(device, gen):
    x = grams_of(gen, 3, 6, d=4, device=device).requires_grad_(True)
    assert torch.autograd.gradcheck(kernel, (x,))
    assert torch.autograd.gradgradcheck(kernel, (x,))


def test_gradient_of_cka_objective(gen):
    """A differentiable representation-similarity penalty: the gradient flows to the features."""
    feats = torch.randn(2, 12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h = hsic(feats @ feats.transpose(1, 2))
    cka = h[0, 1] / torch.sqrt(h[0, 0] * h[1, 1])
    cka.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [kernel, reference.hsic], ids=["kernel", "reference"])
def test_bad_input(device, fn):
    with pytest.raises(ValueError, match=r"`grams` must be G square"):
        fn(torch.zeros(4, 5, 6, device=device))
    with pytest.raises(ValueError, match=r"`grams` must be G square"):
        fn(torch.zeros(5, 5, device=device))
    with pytest.raises(ValueError, match=r"n >= 4 .* n = 3"):
        fn(torch.zeros(2, 3, 3, device=device))
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
        fn(torch.zeros(2, 5, 5, dtype=torch.int64, device=device))
    nan = torch.zeros(2, 5, 5, device=device)
    nan[1, 2, 2] = float("nan")  # on the diagonal, which the estimator ignores: still an error
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        fn(nan)
    inf = torch.zeros(2, 5, 5, device=device)
    inf[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        fn(inf)
    huge = torch.full((1, 6, 6), 1e200, dtype=torch.float64, device=device)
    huge[0, 0, 1] = huge[0, 1, 0] = -1e200
    with pytest.raises(ValueError, match=r"overflow float64"):
        fn(huge)


def test_wrapper_uses_the_kernel(monkeypatch, gen):
    calls = []
    real = torch.ops.divfast.hsic

    class Spy:
        def __call__(self, grams):
            calls.append(grams.shape)
            return real(grams)

    monkeypatch.setattr(torch.ops.divfast, "hsic", Spy())
    hsic(grams_of(gen, 2, 6))
    assert calls == [torch.Size([2, 6, 6])]
