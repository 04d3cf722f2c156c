"""``divfast::ensemble_sweep``: the compiled kernel against the brute-force reference and against
:mod:`divfast.ensembles.consensus` applied to each subset on its own (an independent implementation of
the ranking rules), for k = 1..4 and every rule, with vote and key ties, odd sizes and bad input.
"""

import itertools

import pytest
import torch

import divfast._ops._load as load
from divfast._ops import reference
from divfast._ops.ensemble_sweep import ensemble_sweep
from divfast.ensembles.consensus import target_rank

RULES = ("average", "vote", "median", "geometric")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel(*args):
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    return torch.ops.divfast.ensemble_sweep(*args)


def brute_force(logits, target, subsets, rule):
    """Per subset: consensus.target_rank on that subset's logits alone; histogram by argmax."""
    top1, top5, hist = [], [], []
    k = subsets.shape[1]
    for row in subsets.tolist():
        z = logits[row]
        rank = target_rank(z, target, rule, cap=5)
        top1.append(int((rank == 0).sum()))
        top5.append(int((rank < 5).sum()))
        correct = (z.argmax(dim=2) == target).sum(dim=0)
        hist.append(torch.bincount(correct, minlength=k + 1).tolist())
    return (torch.tensor(top1), torch.tensor(top5), torch.tensor(hist).reshape(len(top1), k + 1))


def all_subsets(pool, k):
    return torch.tensor(list(itertools.combinations(range(pool), k)), dtype=torch.int64)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == torch.int64
        assert torch.equal(g.cpu(), w.cpu()), (g, w)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kernel_equals_reference_and_consensus(device, gen, rule, k):
    for pool, n, c in [(5, 57, 3), (6, 40, 11), (4, 33, 200)]:
        logits = torch.randn(pool, n, c, generator=gen)
        target = torch.randint(0, c, (n,), generator=gen)
        easy = torch.arange(n // 2)
        logits[:, easy, target[easy]] += 3.0  # some easy samples: the bound certifies them
        subsets = all_subsets(pool, k)
        want = brute_force(logits, target, subsets, rule)
        assert_same(reference.ensemble_sweep(logits, target, subsets, rule), want)
        got = kernel(logits.to(device), target.to(device), subsets.to(device), rule)
        assert_same(got, want)


@pytest.mark.parametrize("rule", RULES)
def test_ties_in_votes_and_keys(device, gen, rule):
    """Integer logits make equal sums, medians and maxima common; float16 adds rounding ties."""
    pool, n, c = 5, 80, 9
    logits = torch.randint(-2, 3, (pool, n, c), generator=gen).to(torch.float32)
    target = torch.randint(0, c, (n,), generator=gen)
    for k in (2, 3, 4):
        subsets = all_subsets(pool, k)
        want = brute_force(logits, target, subsets, rule)
        assert_same(kernel(logits.to(device), target.to(device), subsets.to(device), rule), want)
    half = (torch.randn(pool, n, c, generator=gen) * 4).to(torch.float16)
    subsets = all_subsets(pool, 3)
    assert_same(kernel(half.to(device), target.to(device), subsets.to(device), rule),
                brute_force(half, target, subsets, rule))


def test_vote_tie_goes_to_the_averaging_choice(device):
    # three members vote 0, 1, 2; the summed logits prefer class 2, so 2 is the vote's answer.
    logits = torch.tensor([[[5.0, 0.0, 4.0]], [[0.0, 5.0, 4.0]], [[0.0, 0.0, 5.0]]])
    subsets = torch.tensor([[0, 1, 2]])
    for t, want in [(2, 1), (0, 0), (1, 0)]:
        top1, top5, _ = kernel(logits.to(device), torch.tensor([t]).to(device), subsets.to(device), "vote")
        assert int(top1) == want and int(top5) == 1
    # equal votes and equal sums: the lower index wins.
    even = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    top1, _, _ = kernel(even.to(device), torch.tensor([0]).to(device), torch.tensor([[0, 1]]).to(device), "vote")
    assert int(top1) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_subset_order_and_non_contiguous(device, gen, dtype):
    pool, n, c = 6, 45, 30
    base = torch.randn(n, pool, c, generator=gen).to(dtype)
    logits = base.transpose(0, 1)  # (K, N, C), not contiguous
    assert not logits.is_contiguous()
    target = torch.randint(0, c, (n,), generator=gen)
    subsets = all_subsets(pool, 3)[:, [2, 0, 1]]  # rows in a non-sorted order
    for rule in RULES:
        want = brute_force(logits.contiguous(), target, subsets, rule)
        assert_same(kernel(logits.to(device), target.to(device), subsets.to(device), rule), want)


def test_large_class_count_uses_pruning_and_fallback(device, gen):
    """C = 1000 with targets at every rank: easy (certified by the bound), hard (out of the top five
    early) and borderline (the full scan)."""
    pool, n, c = 6, 120, 1000
    logits = torch.randn(pool, n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    boost = torch.linspace(0, 5, n)
    logits[:, torch.arange(n), target] += boost
    subsets = all_subsets(pool, 3)
    for rule in RULES:
        want = brute_force(logits, target, subsets, rule)
        assert_same(kernel(logits.to(device), target.to(device), subsets.to(device), rule), want)


@pytest.mark.parametrize("rule", ["average", "geometric"])
def test_summed_rules_near_ties_and_extreme_magnitudes(device, gen, rule):
    """The CPU kernel ranks summed logits by a float32 filter with an exact float64 fallback for sums
    within rounding of the target's: float64 classes 1 ulp (of float64) from the target's sum, exact
    ties, values beyond float32's range (the exact scan) and subnormals must all match the float64
    reference."""
    pool, n, c = 5, 64, 37  # C not a multiple of 4 or 32
    base = torch.randn(pool, n, c, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=gen)
    rows = torch.arange(n)
    z = base.clone()
    others = (target + 1 + torch.arange(n) % (c - 1)) % c  # a class other than the target
    z[:, rows, target] = 2.5
    z[:, rows, others] = 2.5
    nudge = torch.tensor([-1.0, 0.0, 1.0]).repeat(n // 3 + 1)[:n]  # below, tie, above the target
    z[2, rows, others] += nudge * 2.0**-50  # one ulp of the sum 7.5, lost in float32
    huge = z.clone()
    huge[:, : n // 2] *= 1e200  # beyond float32: the exact scan of every class
    tiny = z * 1e-310  # float64 subnormals: zero in float32, so every sum is within the band
    tiny32 = (base * 1e-39).to(torch.float32)  # float32 subnormals
    subsets = all_subsets(pool, 3)
    for logits in (z, huge, tiny, tiny32, z.to(torch.float32)):
        want = reference.ensemble_sweep(logits, target, subsets, rule)
        assert_same(kernel(logits.to(device), target.to(device), subsets.to(device), rule), want)
    top1, _, _ = kernel(z.to(device), target.to(device), subsets[:1].to(device), rule)
    ties_won = int(((nudge < 0) | ((nudge == 0) & (target < others))).sum())
    assert int(top1) == ties_won  # one class a hair above, level with or below the target's sum


def test_logits_too_large_for_shared_memory(device, gen):
    """4 x 15,000 float32 logits per sample (240 KB) exceed any GPU's shared memory per block: the
    CUDA kernel reads them from global memory instead; counts are the same either way."""
    pool, n, c = 4, 12, 15000
    logits = torch.randn(pool, n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    logits[:, torch.arange(n), target] += torch.linspace(0, 6, n)
    subsets = all_subsets(pool, 3)
    for rule in RULES:
        assert_same(kernel(logits.to(device), target.to(device), subsets.to(device), rule),
                    reference.ensemble_sweep(logits, target, subsets, rule))


def test_histogram_and_shapes(device, gen):
    pool, n, c = 4, 50, 5
    logits = torch.randn(pool, n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    top1, top5, hist = kernel(logits.to(device), target.to(device), all_subsets(pool, 2).to(device), "average")
    assert top1.shape == (6,) and hist.shape == (6, 3)
    assert torch.equal(hist.sum(dim=1).cpu(), torch.full((6,), n))
    assert bool((top1 <= top5).all())
    empty = kernel(logits[:, :0].to(device), target[:0].to(device), all_subsets(pool, 2).to(device), "vote")
    assert all(int(x.sum()) == 0 for x in empty)
    none = kernel(logits.to(device), target.to(device), torch.zeros(0, 3, dtype=torch.int64).to(device), "vote")
    assert none[0].shape == (0,) and none[2].shape == (0, 4)
    few = torch.randn(3, 20, 2, generator=gen)  # C = 2 < 5: top-5 always correct
    _, top5, _ = kernel(few.to(device), torch.randint(0, 2, (20,), generator=gen).to(device),
                        all_subsets(3, 2).to(device), "median")
    assert torch.equal(top5.cpu(), torch.full((3,), 20))


def test_wrapper_matches_and_documents(gen):
    logits = torch.randn(4, 30, 6, generator=gen)
    target = torch.randint(0, 6, (30,), generator=gen)
    subsets = all_subsets(4, 3)
    assert_same(ensemble_sweep(logits, target, subsets, "median"),
                reference.ensemble_sweep(logits, target, subsets, "median"))


@pytest.mark.parametrize("fn", [kernel, reference.ensemble_sweep], ids=["kernel", "reference"])
def test_bad_input(device, fn):
    z = torch.randn(3, 4, 5, device=device)
    y = torch.zeros(4, dtype=torch.int64, device=device)
    s = torch.tensor([[0, 1]], device=device)
    with pytest.raises(ValueError, match=r"`logits` must be \(K, N, C\)"):
        fn(z[0], y, s, "average")
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
        fn(z.to(torch.int64), y, s, "average")
    with pytest.raises(ValueError, match=r"`target` must be \(N,\) with N = 4"):
        fn(z, y[:3], s, "average")
    with pytest.raises(TypeError, match=r"`target` must be int64"):
        fn(z, y.to(torch.int32), s, "average")
    with pytest.raises(ValueError, match=r"`subsets` must be \(S, k\)"):
        fn(z, y, s[0], "average")
    with pytest.raises(ValueError, match=r"k = 4 members from a pool of K = 3"):
        fn(z, y, torch.tensor([[0, 1, 2, 0]], device=device), "average")
    with pytest.raises(ValueError, match=r"row 0 has member index 3 outside \[0, 3\)"):
        fn(z, y, torch.tensor([[0, 3]], device=device), "average")
    with pytest.raises(ValueError, match=r"row 1 repeats member 2"):
        fn(z, y, torch.tensor([[0, 1], [2, 2]], device=device), "average")
    with pytest.raises(ValueError, match=r"`rule` must be one of average, vote, median, geometric"):
        fn(z, y, s, "mean")
    with pytest.raises(ValueError, match=r"label outside \[0, 5\)"):
        fn(z, torch.tensor([0, 1, 5, 0], device=device), s, "vote")
    bad = z.clone()
    bad[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        fn(bad, y, s, "vote")
    bad[2, 3, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        fn(bad, y, s, "median")
