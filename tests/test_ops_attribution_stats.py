"""``divfast::attribution_stats``: the compiled kernel against the pure-PyTorch reference, the Gram
subset identity, gradients (gradcheck on the real kernel), bad input.

Every test draws fresh inputs from the seeded ``gen`` fixture and runs on each device of ``device``.
The reference itself is checked against a direct formula (``torch.var`` over members), so a shared
mistake of kernel and reference would still be caught.
"""

import itertools

import pytest
import torch

import divfast._ops._load as load
import divfast._ops.attribution_stats as as_module
from divfast._ops import reference

NORMS = ("none", "l1", "l2", "max")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def kernel(*args):
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    return torch.ops.divfast.attribution_stats(*args)


def maps(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def assert_matches(got, want, dtype):
    tol = TOL[dtype]
    for name, g, w in zip(("variance", "gram"), got, want):
        assert g.dtype == torch.float64 and g.shape == w.shape and g.device == w.device, name
        scale = w.abs().max().item() if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(scale, 1e-12), msg=name)


def direct(a, abs_, normalize, ddof):
    """Eq. 7 written out: torch.var over the member axis, summed over pixels; Gram by einsum."""
    x = a.double().flatten(2)
    if abs_:
        x = x.abs()
    if normalize != "none":
        norm = {"l1": x.abs().sum(-1), "l2": x.norm(dim=-1), "max": x.abs().amax(-1)}[normalize]
        x = x / norm.clamp_min(1e-300).unsqueeze(-1)
    c = x - x.mean(dim=0, keepdim=True)  # the Gram is of the maps centred per pixel on the mean
    return x.var(dim=0, correction=ddof).sum(-1), torch.einsum("ibd,jbd->ij", c, c)


def test_reference_matches_direct_formula(gen):
    a = maps(gen, 4, 5, 3, 6, 7, dtype=torch.float64)
    for abs_, norm, ddof in itertools.product((True, False), NORMS, (0, 1)):
        got = reference.attribution_stats(a, abs_, norm, ddof)
        want = direct(a, abs_, norm, ddof)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_kernel_matches_reference(device, gen, dtype, norm):
    # odd sizes: M odd and even, pixel counts below, at and above the kernel's block and chunk sizes
    # (256-pixel blocks; members 3 and 4 take the AVX2 tiles, 5 and more AVX-512's where the CPU has
    # it: groups of 5 rows, so 7, 8, 10 and 16 members reach triangles of 1 to 5 rows and rectangles
    # of 5 x 1 to 5 x 5, and whole blocks are converted by the triangles)
    for shape in [(3, 4, 3, 5, 7), (14, 3, 3, 9, 11), (2, 2, 1, 128, 1), (5, 2, 1, 256, 1),
                  (14, 2, 1, 257, 1), (5, 2, 3, 70, 80), (1, 3, 3, 4, 4), (32, 2, 1, 33, 1),
                  (33, 2, 1, 10, 3), (11, 2, 1, 300, 1), (3, 2, 1, 512, 1), (4, 2, 1, 300, 1),
                  (7, 2, 1, 512, 1), (8, 2, 1, 512, 1), (10, 2, 1, 300, 1), (16, 2, 1, 300, 1)]:
        a = maps(gen, *shape, dtype=dtype, device=device)
        for abs_, ddof in [(True, 0), (False, 1 if shape[0] > 1 else 0)]:
            assert_matches(kernel(a, abs_, norm, ddof), reference.attribution_stats(a, abs_, norm, ddof),
                           dtype)


def test_non_contiguous_and_trailing_shapes(device, gen):
    a = maps(gen, 3, 4, 3, 8, 6, device=device)
    views = [a.transpose(3, 4), a[:, :, :, ::2], a.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4),
             a.flatten(2), a.flatten(2)[..., None]]
    for v in views:
        assert not v.is_contiguous() or v.dim() != 5
        assert_matches(kernel(v, True, "l2", 0), reference.attribution_stats(v.contiguous(), True, "l2", 0),
                       torch.float32)


def test_empty_inputs(device, gen):
    v, g = kernel(maps(gen, 3, 0, 3, 4, 4, device=device), True, "none", 0)
    assert v.shape == (0,) and g.shape == (3, 3) and not g.any()
    v, g = kernel(torch.zeros(3, 2, 0, device=device), True, "l1", 0)  # maps with no pixels
    assert v.shape == (2,) and not v.any() and not g.any()


def test_single_member_has_zero_variance(device, gen):
    a = maps(gen, 1, 5, 3, 6, 6, device=device)
    for norm in NORMS:
        v, g = kernel(a, True, norm, 0)
        assert torch.equal(v, torch.zeros_like(v))
        assert g.shape == (1, 1) and g.item() == 0  # the centred map of a lone member is 0


def test_identical_members_and_zero_maps(device, gen):
    a = maps(gen, 1, 3, 2, 5, 5, device=device).expand(4, -1, -1, -1, -1)
    v, _ = kernel(a, True, "none", 0)
    assert v.abs().max().item() <= 1e-9 * (a.double() ** 2).sum().item()
    zero = torch.zeros(3, 2, 3, 4, 4, device=device)
    for norm in NORMS:  # a zero map stays zero under every normalisation: no NaN
        v, g = kernel(zero, True, norm, 0)
        assert torch.equal(v, torch.zeros_like(v)) and torch.equal(g, torch.zeros_like(g))


def test_gram_gives_every_subsets_variance(device, gen):
    """sum Var_S = (1/|S|) sum_{i in S} G_ii - (1/|S|^2) sum_{i,j in S} G_ij, for every subset S."""
    a = maps(gen, 5, 6, 3, 7, 7, device=device, dtype=torch.float64)
    for norm in NORMS:
        _, gram = kernel(a, True, norm, 0)
        for k in (1, 2, 3, 5):
            for subset in itertools.combinations(range(5), k):
                idx = torch.tensor(subset, device=device)
                sub = gram[idx][:, idx]
                from_gram = sub.diagonal().sum() / k - sub.sum() / k**2
                direct_sum = kernel(a[idx], True, norm, 0)[0].sum()
                torch.testing.assert_close(from_gram, direct_sum, rtol=1e-9, atol=1e-12)


def test_members_that_differ_by_a_small_fraction(device):
    """Centring before the products: members 1 and 1 + 2**-12 (exact in float32) differ by a
    variance of 2**-26 per pixel pair, which a Gram of the raw maps would lose to cancellation."""
    for dtype in (torch.float32, torch.float64):  # (1 + 2**-12 is not a float16)
        a = torch.tensor([1.0, 1.0 + 2**-12], dtype=dtype, device=device).view(2, 1, 1).expand(2, 1, 256)
        v, g = kernel(a.contiguous(), True, "none", 0)
        torch.testing.assert_close(v, torch.full_like(v, 256 * 2**-26), rtol=1e-6, atol=0)
        torch.testing.assert_close(g.diagonal().sum(), 2 * v.sum(), rtol=1e-12, atol=0)  # trace = M var
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(1, 4, 3, 32, 32, generator=gen, dtype=torch.float64) * 3
    a = base * (1 + 1e-4 * torch.randn(4, 4, 3, 32, 32, generator=gen, dtype=torch.float64))
    want = reference.attribution_stats(a, True, "none", 0)[0]
    got = kernel(a.float().to(device), True, "none", 0)[0]
    want32 = reference.attribution_stats(a.float(), True, "none", 0)[0]  # the float32 maps' truth
    torch.testing.assert_close(got.cpu(), want32, rtol=1e-4, atol=0)
    torch.testing.assert_close(want32, want, rtol=1e-2, atol=0)  # float32 rounding of the inputs


def test_results_do_not_depend_on_thread_count(gen):
    a = maps(gen, 6, 8, 3, 40, 50)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(a, True, "l1", 0)
        torch.set_num_threads(max(2, threads))
        many = kernel(a, True, "l1", 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("m, shape", [(14, (3, 40, 50)), (3, (1, 33, 67)), (6, (70000,))])
def test_a_samples_results_do_not_depend_on_its_batch(gen, m, shape):
    """Per-sample sums are the same bits whichever batch a sample comes in (one sample, as
    GramCapture passes features, or many), so metrics fed in other batch sizes agree exactly."""
    a = maps(gen, m, 9, *shape)
    whole = kernel(a, True, "l2", 0)[0]
    singles = torch.cat([kernel(a[:, i:i + 1], True, "l2", 0)[0] for i in range(a.shape[1])])
    assert torch.equal(singles, whole)
    assert torch.equal(kernel(a[:, 2:5], True, "l2", 0)[0], whole[2:5])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("abs_", [True, False])
def test_gradcheck_on_the_kernel(device, gen, norm, abs_):
    # values away from 0 (|.| kink) and one clear maximum per map (max normalisation)
    a = (maps(gen, 3, 2, 2, 3, 3, dtype=torch.float64, device=device).abs() + 0.1)
    a = (a * torch.where(torch.rand(a.shape, generator=gen).to(device) < 0.5, -1.0, 1.0)).requires_grad_(True)
    for ddof in (0, 1):
        assert torch.autograd.gradcheck(lambda t: kernel(t, abs_, norm, ddof), (a,), eps=1e-6, atol=1e-6)


def test_backward_matches_reference_autograd(device, gen):
    a = maps(gen, 4, 3, 2, 5, 5, dtype=torch.float64, device=device)
    wv = torch.rand(3, generator=gen, dtype=torch.float64).to(device)
    wg = torch.rand(4, 4, generator=gen, dtype=torch.float64).to(device)
    for norm in NORMS:
        grads = []
        for fn in (kernel, reference.attribution_stats):
            x = a.clone().requires_grad_(True)
            v, g = fn(x, True, norm, 1)
            ((v * wv).sum() + (g * wg).sum()).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_maps_are_an_error(device, gen, bad):
    """The CPU kernel finds bad values through the products of the maps shifted by member 0's: a bad
    value in member 0, in another member, at the same pixel of every member, or in a lone member."""
    places = [(1, 1, 2, 8, 3), (0, 0, 0, 0, 0), (0, 1, 1, 4, 4)]
    for m, where in [(3, places[:1]), (3, places[1:2]), (3, [(i, 1, 1, 4, 4) for i in range(3)]),
                     (1, places[2:]), (2, places[1:2])]:
        a = maps(gen, m, 2, 3, 9, 9, device=device)
        for index in where:
            a[index] = bad
        for norm in NORMS:
            with pytest.raises(ValueError, match="attributions.*NaN or infinity"):
                kernel(a, True, norm, 0)
            with pytest.raises(ValueError, match="attributions.*NaN or infinity"):
                reference.attribution_stats(a, True, norm, 0)


@pytest.mark.parametrize("members", [3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_whole_blocks_give_the_conversion_loops_bits(gen, members, dtype):
    """The SIMD tiles convert whole 256-pixel blocks themselves, the conversion loop a partial one:
    maps of 1,280 pixels whose last is 0 must give exactly the results of the first 1,279."""
    a = maps(gen, members, 3, 1280, dtype=dtype)
    a[..., -1] = 0
    for norm in ("none", "l1", "max"):
        whole, partial = kernel(a, True, norm, 0), kernel(a[..., :-1].contiguous(), True, norm, 0)
        assert torch.equal(whole[0], partial[0]) and torch.equal(whole[1], partial[1]), norm


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_non_finite_values_in_whole_blocks_are_an_error(device, gen, bad, dtype):
    """Maps of whole 256-pixel blocks, which the CPU's SIMD tiles read and convert themselves."""
    for index in [(0, 1, 0, 100), (4, 0, 1, 255), (6, 1, 1, 0)]:
        a = maps(gen, 7, 2, 2, 256, dtype=dtype, device=device)
        a[index] = bad
        for norm in ("none", "l2"):
            with pytest.raises(ValueError, match="attributions.*NaN or infinity"):
                kernel(a, True, norm, 0)


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3),), ValueError, "attributions.*M, B"),
    ((torch.zeros(3, 2, 4, dtype=torch.int64),), TypeError, "attributions.*float"),
    ((torch.zeros(0, 2, 4),), ValueError, "at least one member"),
    ((torch.zeros(3, 2, 4), True, "l3"), ValueError, "normalize"),
    ((torch.zeros(3, 2, 4), True, "none", 2), ValueError, "ddof"),
    ((torch.zeros(1, 2, 4), True, "none", 1), ValueError, "ddof.*M = 1"),
])
def test_bad_arguments(args, error, match):
    for fn in (kernel, reference.attribution_stats):
        with pytest.raises(error, match=match):
            fn(*args)


def test_wrapper_uses_the_kernel_and_falls_back(monkeypatch, gen):
    a = maps(gen, 3, 2, 3, 4, 4)
    calls = []
    original = reference.attribution_stats
    monkeypatch.setattr(as_module.reference, "attribution_stats",
                        lambda *args: calls.append(args) or original(*args))
    as_module.attribution_stats(a)
    assert calls == [], "the compiled kernel should have run"
    monkeypatch.setattr(as_module, "use_kernel", lambda op, device: False)
    as_module.attribution_stats(a)
    assert len(calls) == 1


def test_large_finite_values_are_not_mistaken_for_infinity(device, gen):
    """Finiteness is checked on the values themselves, norms are float64: large maps normalise fine,
    and products beyond float32's range are a clear error, not inf or silently zeroed maps."""
    a = maps(gen, 3, 2, 1, 8, 8, device=device) * 1e20
    for norm in ("l1", "l2", "max"):
        assert_matches(kernel(a, True, norm, 0), reference.attribution_stats(a, True, norm, 0),
                       torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        kernel(maps(gen, 3, 2, 1, 8, 8, device=device) * 1e30, True, "none", 0)


def test_tiny_norms_and_rounding_near_zero(device, gen):
    """Maps whose norm float32 holds only as a subnormal (1 / norm beyond float32) still normalise;
    the centred Gram's diagonal (sums of squares) never rounds below zero."""
    a = torch.zeros(2, 1, 4, device=device)
    a[0, 0, 0], a[1, 0, 1] = 1e-40, 2e-40
    for norm in ("l1", "l2", "max"):
        assert_matches(kernel(a, True, norm, 0), reference.attribution_stats(a, True, norm, 0),
                       torch.float32)
    x0 = torch.randn(1, 3000, generator=gen)
    dl = torch.randn(1, 3000, generator=gen) * 0.37
    b = torch.stack([x0 + 2 * dl, x0 + dl, x0]).to(device)  # member 1 is the other two's mean
    _, gram = kernel(b, False, "none", 0)
    assert bool((gram.diagonal() >= 0).all())


def test_double_backward_on_the_kernel(device, gen):
    a = (maps(gen, 3, 2, 1, 3, 3, dtype=torch.float64, device=device).abs() + 0.1).requires_grad_(True)
    for norm in ("none", "l2"):
        assert torch.autograd.gradgradcheck(lambda t: kernel(t, True, norm, 0), (a,), eps=1e-6, atol=1e-5)
