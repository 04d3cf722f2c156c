"""Attribution diversity (paper Eq. 7): the functional against an independent oracle, the Gram
identity for subsets, then the stateful metric (batches, shards, state_dict, gloo) and
``method_agreement``.

Eq. 7, averaged over the N samples as the library documents it:

    D = (1/N) sum_n sum_{c,p} Var_m a_{m,n,c,p}

The oracle below shares no code with the library: it processes every map with a plain Python loop
(|a|, then the map divided by its l1 norm, l2 norm or largest absolute value, a zero map staying
zero) and takes ``torch.var`` across members. The kernel itself is tested in
tests/test_ops_attribution_stats.py; here it is only the input of the statistics built on it.
"""

import itertools
import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch

from divfast.functional import attribution_diversity, method_agreement, subset_diversity
from divfast.functional.attribution import (
    attribution_measures,
    attribution_stats_state,
    pairwise_attribution_diversity,
)
from divfast.metrics import AttributionDiversity

NORMS = ("none", "l1", "l2", "max")
RTOL = 1e-12  # float64 sums in a different order
RTOL_GRAM = 1e-9  # the Gram identity subtracts sums of squares: a little cancellation


# --- the oracle --------------------------------------------------------------------------------


def process_maps(maps, abs_, normalize):
    """(M, N, C, H, W) -> (M, N, C*H*W) float64, each (member, sample) map processed on its own."""
    m, n = maps.shape[:2]
    out = torch.zeros(m, n, maps[0, 0].numel(), dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            v = maps[i, j].detach().cpu().to(torch.float64).flatten()
            if abs_:
                v = v.abs()
            if normalize == "l1":
                norm = float(v.abs().sum())
            elif normalize == "l2":
                norm = math.sqrt(float((v * v).sum()))
            elif normalize == "max":
                norm = float(v.abs().max())
            else:
                norm = 1.0
            out[i, j] = v / norm if norm > 0 else torch.zeros_like(v)
    return out


def oracle(maps, abs_=True, normalize="none", ddof=0):
    """Eq. 7 from the definition: variance across members, summed over (c, p), mean over n."""
    x = process_maps(maps, abs_, normalize)
    n = x.shape[1]
    if n == 0:
        return NAN
    return float(torch.var(x, dim=0, correction=ddof).sum(dim=-1).mean())


def oracle_gram(maps, abs_=True, normalize="none"):
    """The Gram of the maps centred at each pixel on the members' mean."""
    x = process_maps(maps, abs_, normalize)
    c = x - x.mean(dim=0, keepdim=True)
    return torch.einsum("ind,jnd->ij", c, c)


NAN = float("nan")


# --- inputs ------------------------------------------------------------------------------------


def make_maps(m, n, gen, shape=(3, 8, 8), dtype=torch.float64, zero_map=True):
    """Signed maps of members with different scales, one (member, sample) map all zero."""
    scale = torch.rand(m, 1, 1, 1, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    maps = torch.randn(m, n, *shape, generator=gen, dtype=torch.float64) * scale
    maps[0] += 0.5  # members differ in offset too, not only in scale
    if zero_map and n > 1:
        maps[1, 1] = 0.0  # a zero-norm map stays zero under every normalisation
    return maps.to(dtype)


def close(got, want, rtol=RTOL, atol=0.0):
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=rtol, abs=atol)


def assert_same_result(got, want, rtol=RTOL):
    """Two library results on the same data (streamed vs functional): equal up to rounding."""
    assert got["n_samples"] == want["n_samples"]
    assert got["ddof"] == want["ddof"]
    assert close(got["diversity"], want["diversity"], rtol), (got["diversity"], want["diversity"])
    np.testing.assert_allclose(got["gram"], want["gram"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["pairwise"], want["pairwise"], rtol=rtol, atol=1e-300,
                               equal_nan=True)


def split(n, sizes):
    assert sum(sizes) == n
    bounds = np.cumsum([0] + list(sizes))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --- 1. functional vs the oracle -------------------------------------------------------------


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("abs_", [True, False], ids=["abs", "signed"])
@pytest.mark.parametrize("normalize", NORMS)
def test_functional_vs_oracle(gen, normalize, abs_, ddof):
    maps = make_maps(4, 6, gen)
    got = attribution_diversity(maps, abs=abs_, normalize=normalize, ddof=ddof)
    assert set(got) == {"diversity", "n_samples", "ddof", "pairwise", "gram"}
    assert got["n_samples"] == 6 and got["ddof"] == ddof
    assert isinstance(got["diversity"], float)
    assert close(got["diversity"], oracle(maps, abs_, normalize, ddof)), normalize
    gram = torch.tensor(got["gram"], dtype=torch.float64)
    torch.testing.assert_close(gram, oracle_gram(maps, abs_, normalize), rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(gram, gram.T, rtol=1e-14, atol=1e-300)
    # The state is the additive form of the same numbers.
    state = attribution_stats_state(maps, abs_, normalize, ddof)
    assert state["variance_sum"].dtype == torch.float64 and state["variance_sum"].dim() == 0
    assert state["n_samples"].dtype == torch.int64 and int(state["n_samples"]) == 6
    assert state["gram"].shape == (4, 4) and state["gram"].dtype == torch.float64
    assert close(float(state["variance_sum"]) / 6, got["diversity"])


@pytest.mark.parametrize("abs_", [True, False], ids=["abs", "signed"])
@pytest.mark.parametrize("normalize", NORMS)
def test_pairwise_is_eq7_on_each_pair(gen, normalize, abs_):
    maps = make_maps(4, 6, gen)
    got = attribution_diversity(maps, abs=abs_, normalize=normalize)
    pw = torch.tensor(got["pairwise"], dtype=torch.float64)
    assert pw.shape == (4, 4)
    assert (pw.diagonal() == 0).all()
    torch.testing.assert_close(pw, pw.T, rtol=1e-12, atol=1e-300)
    for i, j in itertools.combinations(range(4), 2):
        want = oracle(maps[[i, j]], abs_, normalize, 0)
        assert close(pw[i, j].item(), want, RTOL_GRAM), (i, j)


# The result records ddof=1 and its `diversity` uses the unbiased variance, but `pairwise` is
# always the population variance: for M = 2 the two disagree by a factor of 2.
def test_pairwise_follows_ddof(gen):
    maps = make_maps(2, 6, gen)
    got = attribution_diversity(maps, normalize="l1", ddof=1)
    want = oracle(maps, True, "l1", 1)
    assert close(got["diversity"], want)
    assert close(got["pairwise"][0][1], want, RTOL_GRAM), (got["pairwise"][0][1], want)
    metric = AttributionDiversity(normalize="l1", ddof=1)
    metric.update(maps)
    assert close(metric.pairwise()[0, 1].item(), want, RTOL_GRAM)


def test_input_dtypes_and_trailing_shapes(gen):
    """float32 maps and any trailing shape: the oracle sees the same (widened) values. The kernel
    forms float32 maps' products in float32 (its own tests allow 2e-5), so the tolerance is wider."""
    maps = make_maps(3, 5, gen, shape=(2, 7), dtype=torch.float32)
    for normalize in NORMS:
        got = attribution_diversity(maps, normalize=normalize)
        assert close(got["diversity"], oracle(maps, True, normalize), 2e-5)
        np.testing.assert_allclose(got["gram"], oracle_gram(maps, True, normalize).numpy(),
                                   rtol=2e-5)


def test_identical_members_have_zero_diversity(gen):
    base = make_maps(1, 5, gen, zero_map=False)
    maps = base.expand(3, *base.shape[1:]).clone()
    for normalize in NORMS:
        # Zero up to the rounding of the Gram identity (sums of squares ~1e3 here).
        got = attribution_diversity(maps, normalize=normalize)
        assert got["diversity"] == pytest.approx(0.0, abs=1e-10)
        assert np.asarray(got["pairwise"]).max() == pytest.approx(0.0, abs=1e-10)
    # abs makes a sign flip invisible; signed maps see it.
    flipped = torch.cat([base, -base])
    assert attribution_diversity(flipped, abs=True)["diversity"] == pytest.approx(0.0, abs=1e-10)
    assert attribution_diversity(flipped, abs=False)["diversity"] > 0.0
    # Scaling a member changes nothing once maps are normalised (positive scale for "max", too).
    scaled = torch.cat([base, 7.0 * base])
    for normalize in ("l1", "l2", "max"):
        assert attribution_diversity(scaled, normalize=normalize)["diversity"] == pytest.approx(
            0.0, abs=1e-12)
    assert attribution_diversity(scaled)["diversity"] > 0.0




@pytest.mark.parametrize("pixels", [1, 256])
def test_float32_members_that_differ_slightly(pixels):
    # Both values are exact in float32; the oracle widens them exactly: Var = (2**-12 / 2)**2.
    maps = torch.ones(2, 1, 1, 1, pixels, dtype=torch.float32)
    maps[1] += 2.0**-12
    want = pixels * 2.0**-26
    assert oracle(maps) == want
    got = attribution_diversity(maps)["diversity"]
    assert got == pytest.approx(want, rel=1e-6), (got, want)


def test_float32_near_identical_members_vs_oracle():
    # Saliency-like maps (non-negative) of 4 members that differ by 0.1 %: about 0.6 % off.
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 6, 3, 8, 8, generator=gen, dtype=torch.float64)
    maps = (base * (1 + 1e-3 * torch.randn(4, 6, 3, 8, 8, generator=gen,
                                           dtype=torch.float64))).float()
    got = attribution_diversity(maps)["diversity"]
    assert close(got, oracle(maps), 1e-4), (got, oracle(maps))


def test_hand_example():
    # M = 2, N = 1, one pixel: values 1 and 3 -> population variance 1, unbiased 2.
    maps = torch.tensor([1.0, 3.0], dtype=torch.float64).view(2, 1, 1, 1, 1)
    assert attribution_diversity(maps)["diversity"] == 1.0
    assert attribution_diversity(maps, ddof=1)["diversity"] == 2.0
    got = attribution_diversity(maps)
    assert got["gram"] == [[1.0, -1.0], [-1.0, 1.0]]  # centred: -1 and +1
    assert got["pairwise"] == [[0.0, 1.0], [1.0, 0.0]]
    # Two samples: the mean over samples of the per-sample sums.
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [4.0, 0.0]]],
                        dtype=torch.float64).view(2, 2, 1, 1, 2)
    assert attribution_diversity(maps)["diversity"] == (1.0 + 4.0) / 2


def test_no_samples_is_nan(gen):
    maps = make_maps(3, 0, gen)
    got = attribution_diversity(maps)
    assert got["n_samples"] == 0 and math.isnan(got["diversity"])
    assert got["gram"] == [[0.0] * 3] * 3
    assert all(math.isnan(v) for row in got["pairwise"] for v in row)
    assert torch.isnan(pairwise_attribution_diversity(torch.zeros(3, 3, dtype=torch.float64),
                                                      0)).all()


# --- 2. subsets from the pool's Gram ----------------------------------------------------------


POOL = 5


@pytest.fixture(scope="module")
def pool_maps():
    return make_maps(POOL, 6, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("abs_,normalize", [(True, "none"), (True, "l1"), (False, "l2"),
                                            (True, "max")])
def test_every_subset_from_the_gram(pool_maps, abs_, normalize):
    maps = pool_maps
    state = attribution_stats_state(maps, abs_, normalize)
    n = int(state["n_samples"])
    metric = AttributionDiversity(num_members=POOL, abs=abs_, normalize=normalize)
    for s in split(6, [2, 0, 3, 1]):
        metric.update(maps[:, s])
    count = 0
    for k in range(1, POOL + 1):
        for subset in itertools.combinations(range(POOL), k):
            want = attribution_diversity(maps[list(subset)], abs=abs_,
                                         normalize=normalize)["diversity"]
            got = subset_diversity(state["gram"], n, subset)
            assert isinstance(got, float)
            if k == 1:
                assert got == 0.0 and want == 0.0
            else:
                assert close(got, want, RTOL_GRAM), subset
                assert close(got, oracle(maps[list(subset)], abs_, normalize), RTOL_GRAM)
            # Order of the indices does not matter; the metric gives the same number.
            assert close(subset_diversity(state["gram"], n, list(reversed(subset))), got, RTOL)
            assert close(metric.for_subset(subset), got, RTOL_GRAM), subset
            count += 1
    assert count == 2**POOL - 1
    # The whole pool is the metric's own diversity.
    assert close(metric.for_subset(range(POOL)), metric.compute()["diversity"], RTOL_GRAM)


@pytest.mark.parametrize("members", [[], [1, 1], [0, 2, 0], [POOL], [-1], [0, 7]],
                         ids=["empty", "repeat", "repeat3", "past_end", "negative", "far"])
def test_bad_subsets(pool_maps, members):
    gram = attribution_stats_state(pool_maps)["gram"]
    with pytest.raises(ValueError, match="`members`"):
        subset_diversity(gram, 6, members)
    metric = AttributionDiversity()
    metric.update(pool_maps)
    with pytest.raises(ValueError, match="`members`"):
        metric.for_subset(members)


def test_subset_edge_cases(pool_maps):
    gram = attribution_stats_state(pool_maps)["gram"]
    # No samples: NaN (also for a single member), but bad indices are still rejected.
    assert math.isnan(subset_diversity(gram, 0, [0, 1]))
    assert math.isnan(subset_diversity(gram, 0, [3]))
    with pytest.raises(ValueError):
        subset_diversity(gram, 0, [])
    metric = AttributionDiversity(num_members=POOL)  # sized, never updated: zero samples
    assert math.isnan(metric.for_subset([0, 1]))
    # ddof=1: the Gram identity does not hold, so for_subset refuses.
    metric = AttributionDiversity(ddof=1)
    metric.update(pool_maps)
    with pytest.raises(ValueError, match="ddof"):
        metric.for_subset([0, 1])
    with pytest.raises(RuntimeError):
        AttributionDiversity().for_subset([0])


# --- 3. the stateful metric ------------------------------------------------------------------


OPTIONS = [dict(), dict(normalize="l1"), dict(abs=False, normalize="l2", ddof=1),
           dict(normalize="max", ddof=1)]
OPT_IDS = ["default", "l1", "signed_l2_ddof1", "max_ddof1"]


@pytest.mark.parametrize("opts", OPTIONS, ids=OPT_IDS)
def test_uneven_batches_equal_functional(gen, opts):
    m, n = 4, 23
    maps = make_maps(m, n, gen)
    want = attribution_diversity(maps, **opts)
    assert close(want["diversity"], oracle(maps, opts.get("abs", True),
                                           opts.get("normalize", "none"), opts.get("ddof", 0)))
    for num_members in (None, m):
        metric = AttributionDiversity(num_members=num_members, **opts)
        for s in split(n, [0, 1, 7, 0, 11, 4]):
            metric.update(maps[:, s])
        got = metric.compute()
        assert_same_result(got, want)
        assert metric.num_members == m
        # compute() does not consume the state; pairwise() is the same matrix as a tensor.
        assert_same_result(metric.compute(), want)
        pw = metric.pairwise()
        assert pw.dtype == torch.float64 and pw.shape == (m, m)
        np.testing.assert_allclose(pw.numpy(), want["pairwise"], rtol=RTOL)
        # reset() is the identity: nothing seen, then only what comes after.
        metric.reset()
        empty = metric.compute()
        assert empty["n_samples"] == 0 and math.isnan(empty["diversity"])
        assert empty["gram"] == [[0.0] * m] * m
        metric.update(maps[:, :5])
        assert_same_result(metric.compute(), attribution_diversity(maps[:, :5], **opts))


def test_first_batch_empty_then_data(gen):
    maps = make_maps(3, 9, gen)
    metric = AttributionDiversity()
    metric.update(maps[:, :0])
    assert metric.num_members == 3
    assert metric.compute()["n_samples"] == 0
    metric.update(maps)
    assert_same_result(metric.compute(), attribution_diversity(maps))


def shard_metrics(maps, opts, sizes):
    """One metric per shard, each fed its slice in two batches, plus two that never saw data."""
    m, n = maps.shape[:2]
    shards = []
    for s in split(n, sizes):
        metric = AttributionDiversity(**opts)
        mid = s.start + (s.stop - s.start) // 3
        metric.update(maps[:, s.start:mid])
        metric.update(maps[:, mid:s.stop])
        shards.append(metric)
    never_sized = AttributionDiversity(num_members=m, **opts)
    never_unsized = AttributionDiversity(**opts)
    return shards + [never_sized, never_unsized]


@pytest.mark.parametrize("opts", OPTIONS, ids=OPT_IDS)
def test_shards_merge_to_whole(gen, opts):
    m, n = 5, 31
    maps = make_maps(m, n, gen)
    want = attribution_diversity(maps, **opts)
    sizes = [13, 1, 0, 17]  # one shard fed only empty batches
    for order in ("forward", "reversed"):
        shards = shard_metrics(maps, opts, sizes)
        if order == "reversed":
            shards = shards[::-1]
        total = AttributionDiversity()  # a blank accumulator takes the shards' options
        for shard in shards:
            assert total.merge(shard) is total
        assert_same_result(total.compute(), want)
        assert (total.abs, total.normalize, total.ddof) == (opts.get("abs", True),
                                                            opts.get("normalize", "none"),
                                                            opts.get("ddof", 0))
    # Merging into a shard that never saw data (sized, or not) works the same way.
    for base_index in (-2, -1):
        shards = shard_metrics(maps, opts, sizes)
        total = shards[base_index]
        for i, shard in enumerate(shards):
            if i != len(shards) + base_index:
                total.merge(shard)
        assert_same_result(total.compute(), want)
    # Merging does not modify the shard merged in.
    shards = shard_metrics(maps, opts, sizes)
    before = attribution_measures(shards[0].state, shards[0].ddof)
    total = AttributionDiversity(**opts)
    total.merge(shards[0]).merge(shards[1])
    assert attribution_measures(shards[0].state, shards[0].ddof) == before


def test_merge_mismatch_is_an_error(gen):
    maps = make_maps(4, 6, gen)
    base = AttributionDiversity(normalize="l1")
    base.update(maps)
    before = base.compute()
    for opts in (dict(normalize="l2"), dict(normalize="l1", abs=False),
                 dict(normalize="l1", ddof=1), dict()):
        other = AttributionDiversity(**opts)
        other.update(maps)
        with pytest.raises(ValueError, match="abs/normalize/ddof"):
            base.merge(other)
    fewer = AttributionDiversity(normalize="l1")
    fewer.update(maps[:3])
    with pytest.raises(ValueError, match="member"):
        base.merge(fewer)
    with pytest.raises(ValueError, match="member"):
        fewer.merge(base)
    sized = AttributionDiversity(num_members=3, normalize="l1")  # sized, never updated
    with pytest.raises(ValueError, match="member"):
        base.merge(sized)
    assert base.compute() == before  # a refused merge leaves the state as it was


@pytest.mark.parametrize("opts", OPTIONS[:3], ids=OPT_IDS[:3])
def test_state_dict_round_trip_then_merge(gen, opts, tmp_path):
    m, n = 4, 19
    maps = make_maps(m, n, gen)
    want = attribution_diversity(maps, **opts)
    loaded = []
    for i, shard in enumerate(shard_metrics(maps, opts, [5, 0, 14])):
        path = tmp_path / f"shard{i}.pt"
        torch.save(shard.state_dict(), path)
        metric = AttributionDiversity()
        metric.load_state_dict(torch.load(path, weights_only=True))
        assert (metric.num_members, metric.abs, metric.normalize, metric.ddof) == (
            shard.num_members, shard.abs, shard.normalize, shard.ddof)
        loaded.append(metric)
    total = AttributionDiversity()
    for metric in loaded:
        total.merge(metric)
    assert_same_result(total.compute(), want)
    # A loaded metric keeps streaming: update after load equals the functional on everything.
    sd_path = tmp_path / "head.pt"
    head = AttributionDiversity(**opts)
    head.update(maps[:, :8])
    torch.save(head.state_dict(), sd_path)
    resumed = AttributionDiversity()
    resumed.load_state_dict(torch.load(sd_path, weights_only=True))
    resumed.update(maps[:, 8:])
    assert_same_result(resumed.compute(), want)


def test_metric_errors(gen):
    maps = make_maps(4, 5, gen)
    with pytest.raises(ValueError, match="num_members"):
        AttributionDiversity(num_members=0)
    for method in ("compute", "pairwise", "sync"):
        with pytest.raises(RuntimeError):
            getattr(AttributionDiversity(), method)()
    metric = AttributionDiversity(num_members=3)
    with pytest.raises(ValueError, match="num_members"):
        metric.update(maps)
    # Sized by the first update: a later batch with another member count is refused, state kept.
    metric = AttributionDiversity()
    metric.update(maps)
    with pytest.raises(ValueError, match="num_members"):
        metric.update(maps[:2])
    assert_same_result(metric.compute(), attribution_diversity(maps))
    # Bad options surface from the op on the first update.
    with pytest.raises(ValueError):
        AttributionDiversity(normalize="l3").update(maps)
    with pytest.raises(ValueError):
        AttributionDiversity(ddof=2).update(maps)
    nan_maps = maps.clone()
    nan_maps[0, 0, 0, 0, 0] = NAN
    with pytest.raises(ValueError):
        metric.update(nan_maps)
    assert_same_result(metric.compute(), attribution_diversity(maps))


def test_sync_without_process_group_is_a_copy(gen):
    maps = make_maps(3, 4, gen)
    metric = AttributionDiversity()
    metric.update(maps)
    assert metric.sync() is metric
    assert_same_result(metric.compute(), attribution_diversity(maps))


# --- 4. two processes over gloo --------------------------------------------------------------


DDP_OPTS = dict(normalize="l1")
WORLD = 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_maps():
    return make_maps(4, 21, torch.Generator().manual_seed(99))


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        maps = _ddp_maps()
        m, n = maps.shape[:2]
        idx = torch.tensor(list(range(rank, n, world)))  # rank::world, no padding
        metric = AttributionDiversity(num_members=m, **DDP_OPTS)
        for chunk in idx.split(4):
            metric.update(maps[:, chunk])
        metric.sync()
        torch.save({"result": metric.compute(), "subset": metric.for_subset([0, 2, 3])},
                   os.path.join(out_dir, f"all_{rank}.pt"))
        # Only rank 0 has data: rank 1 never calls update().
        metric = AttributionDiversity(num_members=m, **DDP_OPTS)
        if rank == 0:
            metric.update(maps[:, :6])
        metric.sync()
        torch.save({"result": metric.compute()}, os.path.join(out_dir, f"rank0only_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    """Runs the two gloo processes once; returns {file name: what that rank saved}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)
        return {name: torch.load(os.path.join(out_dir, name), weights_only=False)
                for name in os.listdir(out_dir)}


@pytest.mark.ddp
def test_ddp_sync_equals_functional(ddp_results):
    maps = _ddp_maps()
    want = attribution_diversity(maps, **DDP_OPTS)
    assert close(want["diversity"], oracle(maps, True, "l1"))
    want_subset = attribution_diversity(maps[[0, 2, 3]], **DDP_OPTS)["diversity"]
    for rank in range(WORLD):
        got = ddp_results[f"all_{rank}.pt"]
        assert_same_result(got["result"], want)
        assert close(got["subset"], want_subset, RTOL_GRAM)
        assert_same_result(ddp_results[f"rank0only_{rank}.pt"]["result"],
                           attribution_diversity(maps[:, :6], **DDP_OPTS))


# --- 5. method_agreement ---------------------------------------------------------------------


def sym(upper, m):
    """(M, M) symmetric matrix with zero diagonal from the scores of pairs (0,1), (0,2), ..."""
    out = torch.zeros(m, m, dtype=torch.float64)
    for (i, j), v in zip(itertools.combinations(range(m), 2), upper):
        out[i, j] = out[j, i] = v
    return out


def test_method_agreement_pairs_and_normalisation(gen):
    m = 4
    scores = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    pw = sym(scores.tolist(), m)
    got = method_agreement({"saliency": pw})
    assert got["pairs"] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert set(got) == {"pairs", "normalized", "correlation", "mean_correlation"}
    np.testing.assert_allclose(got["normalized"]["saliency"], (scores / scores.max()).numpy(),
                               rtol=1e-15)
    assert max(got["normalized"]["saliency"]) == 1.0
    assert got["correlation"]["saliency"]["saliency"] == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(got["mean_correlation"])  # no two distinct methods


def test_method_agreement_identical_scaled_and_reversed(gen):
    m = 5
    scores = torch.rand(10, generator=gen, dtype=torch.float64) + 0.05
    a = sym(scores.tolist(), m)
    reversed_scores = (scores.max() + scores.min()) - scores  # same values, anti-ordered
    got = method_agreement({"a": a, "a_copy": a.clone(), "scaled": 7.5 * a,
                            "reversed": sym(reversed_scores.tolist(), m)})
    corr = got["correlation"]
    for x in ("a", "a_copy", "scaled"):
        assert max(got["normalized"][x]) == 1.0
        np.testing.assert_allclose(got["normalized"][x], got["normalized"]["a"], rtol=1e-14)
        for y in ("a", "a_copy", "scaled"):
            assert corr[x][y] == pytest.approx(1.0, rel=1e-12), (x, y)
        assert corr[x]["reversed"] < 0
        assert corr[x]["reversed"] == pytest.approx(-1.0, rel=1e-12)
        assert corr["reversed"][x] == pytest.approx(corr[x]["reversed"], rel=1e-15)
    # The mean is over the six distinct pairs of methods: three at +1, three at -1.
    assert got["mean_correlation"] == pytest.approx(0.0, abs=1e-12)


def test_method_agreement_on_library_output(gen):
    """Pearson r of the normalised pairwise scores of two real 'methods' (abs vs signed maps)."""
    maps = make_maps(4, 6, gen)
    pa = torch.tensor(attribution_diversity(maps, normalize="l2")["pairwise"])
    pb = torch.tensor(attribution_diversity(maps, abs=False, normalize="l2")["pairwise"])
    got = method_agreement({"abs": pa, "signed": pb})
    rows, cols = zip(*itertools.combinations(range(4), 2))
    x = pa[list(rows), list(cols)].numpy()
    y = pb[list(rows), list(cols)].numpy()
    want = float(np.corrcoef(x, y)[0, 1])
    assert got["correlation"]["abs"]["signed"] == pytest.approx(want, rel=1e-12)
    assert got["mean_correlation"] == pytest.approx(want, rel=1e-12)


def test_method_agreement_degenerate_cases():
    # M = 2: one pair, so no Pearson r (it needs two points): NaN everywhere.
    got = method_agreement({"a": sym([2.0], 2), "b": sym([5.0], 2)})
    assert got["pairs"] == [(0, 1)]
    assert got["normalized"] == {"a": [1.0], "b": [1.0]}
    assert all(math.isnan(v) for row in got["correlation"].values() for v in row.values())
    assert math.isnan(got["mean_correlation"])
    # All pairs equal (or all zero): no spread, so r is NaN; zero scores stay zero.
    got = method_agreement({"flat": sym([3.0] * 3, 3), "zero": torch.zeros(3, 3),
                            "ramp": sym([1.0, 2.0, 3.0], 3)})
    assert got["normalized"]["flat"] == [1.0, 1.0, 1.0]
    assert got["normalized"]["zero"] == [0.0, 0.0, 0.0]
    assert math.isnan(got["correlation"]["flat"]["ramp"])
    assert math.isnan(got["correlation"]["zero"]["ramp"])
    assert got["correlation"]["ramp"]["ramp"] == pytest.approx(1.0)


def test_method_agreement_documents_nan():
    assert "nan" in method_agreement.__doc__.lower()


def test_method_agreement_bad_input():
    with pytest.raises(ValueError, match="shape"):
        method_agreement({"a": torch.zeros(3, 3), "b": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="shape"):
        method_agreement({"a": torch.zeros(3, 3), "b": torch.zeros(3, 3, 1)})
    with pytest.raises(ValueError):
        method_agreement({"a": torch.zeros(3, 4)})
    with pytest.raises(ValueError):
        method_agreement({})


# --- 6. devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_device_matches_cpu(device, gen, dtype):
    maps = make_maps(4, 10, gen, dtype=dtype)
    rtol = RTOL if dtype == torch.float64 else 1e-6
    dev_maps = maps.to(device)
    for opts in OPTIONS:
        assert_same_result(attribution_diversity(dev_maps, **opts),
                           attribution_diversity(maps, **opts), rtol)
    state = attribution_stats_state(dev_maps, normalize="l1")
    assert state["gram"].device.type == device.type
    assert close(subset_diversity(state["gram"], 10, [0, 2, 3]),
                 attribution_diversity(maps[[0, 2, 3]], normalize="l1")["diversity"],
                 max(rtol, RTOL_GRAM))
    # A metric made before any batch (on the CPU) follows its batches; state_dict is on the CPU.
    metric = AttributionDiversity(num_members=4, normalize="l1")
    metric.update(dev_maps[:, :3])
    assert metric.state["gram"].device.type == device.type
    metric.reset()
    assert metric.state["gram"].device.type == device.type
    metric.update(dev_maps[:, :3])
    cpu_part = AttributionDiversity(normalize="l1")
    cpu_part.update(maps[:, 3:])
    metric.merge(cpu_part)
    assert_same_result(metric.compute(), attribution_diversity(maps, normalize="l1"), rtol)
    assert all(v.device.type == "cpu" for v in metric.state_dict()["state"].values())
    assert close(metric.for_subset([1, 3]),
                 attribution_diversity(maps[[1, 3]], normalize="l1")["diversity"],
                 max(rtol, RTOL_GRAM))


@pytest.mark.parametrize("kwargs", [{"normalize": "L1"}, {"normalize": "l3"}, {"ddof": 2}])
def test_bad_options_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match="normalize|ddof"):
        AttributionDiversity(**kwargs)
