"""Ensemble consensus: every rule's scores, keys, predictions and target ranks against a brute-force
per-sample loop over Python floats (IEEE float64, sums in member order, so keys match bit for
bit); vote ties broken by summed logits then the lowest index; geometric == average predictions;
M = 1, B = 0, non-contiguous and half-precision inputs; one-line errors."""

import math

import numpy as np
import pytest
import torch

from divfast.ensembles import CONSENSUS_RULES, consensus, consensus_predictions
from divfast.ensembles.consensus import ranking_keys, target_rank
from divfast.errors import DivfastError

SIZES = [(m, c) for m in range(1, 6) for c in (1, 3, 7)]


def random_logits(gen, m, b, c, scale=3.0, dtype=torch.float32):
    return (torch.randn(m, b, c, generator=gen, dtype=torch.float64) * scale).to(dtype)


# --- the brute-force oracle: one sample, Python floats -------------------------------------------

def member_argmax(row):
    best = 0
    for c in range(1, len(row)):
        if row[c] > row[best]:  # strictly greater: the first maximum wins a tie
            best = c
    return best


def oracle_sum(z, b, c):
    acc = float(z[0][b][c])
    for i in range(1, len(z)):
        acc = acc + float(z[i][b][c])
    return acc


def oracle_median(z, b, c):
    vals = sorted(float(z[i][b][c]) for i in range(len(z)))
    m = len(vals)
    return vals[m // 2] if m % 2 else (vals[m // 2 - 1] + vals[m // 2]) * 0.5


def oracle_votes(z, b, n_classes):
    votes = [0.0] * n_classes
    for i in range(len(z)):
        votes[member_argmax([float(v) for v in z[i][b]])] += 1.0
    return votes


def oracle_keys(z, rule, b, n_classes):
    """Per class a tuple, compared lexicographically, higher first."""
    sums = [oracle_sum(z, b, c) for c in range(n_classes)]
    if rule == "median":
        return [(oracle_median(z, b, c),) for c in range(n_classes)]
    if rule == "vote":
        votes = oracle_votes(z, b, n_classes)
        return [(votes[c], sums[c]) for c in range(n_classes)]
    return [(s,) for s in sums]


def oracle_rank(keys, t):
    return sum(1 for c in range(len(keys)) if keys[c] > keys[t] or (keys[c] == keys[t] and c < t))


def oracle_prediction(keys):
    return next(t for t in range(len(keys)) if oracle_rank(keys, t) == 0)


def oracle_scores(z, rule, b, n_classes):
    m = len(z)
    if rule == "average":
        return [oracle_sum(z, b, c) / m for c in range(n_classes)]
    if rule == "median":
        return [oracle_median(z, b, c) for c in range(n_classes)]
    if rule == "vote":
        return oracle_votes(z, b, n_classes)
    # geometric: the normalised product of the members' probabilities, each to the power 1 / M
    prod = np.ones(n_classes)
    for i in range(m):
        row = np.asarray(z[i][b], dtype=np.float64)
        p = np.exp(row - row.max())
        prod *= (p / p.sum()) ** (1.0 / m)
    return list(prod / prod.sum())


def as_lists(logits):
    return logits.to(torch.float64).tolist()


# --- every rule against the oracle ---------------------------------------------------------------

@pytest.mark.parametrize("rule", CONSENSUS_RULES)
@pytest.mark.parametrize("m,c", SIZES)
def test_keys_and_predictions_match_brute_force(gen, rule, m, c):
    logits = random_logits(gen, m, 9, c)
    z = as_lists(logits)
    primary, secondary = ranking_keys(logits, rule)
    preds = consensus_predictions(logits, rule)
    assert preds.dtype == torch.int64 and preds.shape == (9,)
    assert primary.dtype == torch.float64 and primary.shape == (9, c)
    assert (secondary is not None) == (rule == "vote")
    for b in range(9):
        keys = oracle_keys(z, rule, b, c)
        assert primary[b].tolist() == [k[0] for k in keys]  # bit for bit
        if secondary is not None:
            assert secondary[b].tolist() == [k[1] for k in keys]
        assert int(preds[b]) == oracle_prediction(keys)


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
@pytest.mark.parametrize("m,c", SIZES)
def test_scores_match_brute_force(gen, rule, m, c):
    logits = random_logits(gen, m, 6, c)
    z = as_lists(logits)
    scores = consensus(logits, rule)
    assert scores.dtype == torch.float64 and scores.shape == (6, c)
    want = torch.tensor([oracle_scores(z, rule, b, c) for b in range(6)], dtype=torch.float64)
    if rule == "geometric":
        torch.testing.assert_close(scores, want, rtol=0, atol=1e-12)
    else:
        assert torch.equal(scores, want)


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
@pytest.mark.parametrize("m,c", [(1, 1), (2, 3), (3, 7), (4, 4), (5, 11)])
def test_target_rank_matches_brute_force(gen, rule, m, c):
    logits = random_logits(gen, m, 40, c)
    logits[:, :20, 1 % c] = logits[:, :20, 0]  # exact ties between classes 0 and 1
    z = as_lists(logits)
    target = torch.randint(0, c, (40,), generator=gen)
    for cap in (1, 2, 5, 100):
        ranks = target_rank(logits, target, rule, cap=cap)
        assert ranks.dtype == torch.int64 and ranks.shape == (40,)
        want = [min(cap, oracle_rank(oracle_keys(z, rule, b, c), int(target[b])))
                for b in range(40)]
        assert ranks.tolist() == want


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_rank_zero_is_the_prediction(gen, rule):
    logits = random_logits(gen, 4, 50, 3, dtype=torch.bfloat16)  # coarse values: many ties
    preds = consensus_predictions(logits, rule)
    for t in range(3):
        target = torch.full((50,), t)
        assert torch.equal(target_rank(logits, target, rule) == 0, preds == t)


def test_target_rank_counts_ties_by_index_and_caps():
    logits = torch.zeros(2, 1, 8, dtype=torch.float64)  # every class ties
    for t in range(8):
        assert target_rank(logits, torch.tensor([t]), "average").tolist() == [min(t, 5)]
        assert target_rank(logits, torch.tensor([t]), "average", cap=3).tolist() == [min(t, 3)]
    logits[:, :, 6] = 1.0  # class 6 above everything
    assert target_rank(logits, torch.tensor([0]), "median").tolist() == [1]
    assert target_rank(logits, torch.tensor([6]), "median").tolist() == [0]


# --- vote ties ------------------------------------------------------------------------------------

def test_vote_three_ways_goes_to_the_highest_sum():
    # Each member votes a different class (0, 1, 2); the sums of classes 0..2 are 4, 6 and 5.
    logits = torch.tensor([[[4.0, 0.0, 0.0, 0.0]],
                           [[0.0, 5.0, 0.0, 0.0]],
                           [[0.0, 1.0, 5.0, 0.0]]], dtype=torch.float64)
    assert consensus(logits, "vote").tolist() == [[1.0, 1.0, 1.0, 0.0]]
    assert consensus_predictions(logits, "vote").tolist() == [1]
    assert consensus_predictions(logits, "average").tolist() == [1]


def test_vote_three_ways_exact_sum_tie_goes_to_the_lowest_index():
    # Votes for 1, 3 and 2; classes 1 and 3 hold the same values in swapped members, so their sums
    # are exactly equal (11) and above class 2's (3): the lower index, 1, wins.
    logits = torch.tensor([[[0.0, 8.0, 0.0, 2.0]],
                           [[0.0, 2.0, 0.0, 8.0]],
                           [[0.0, 1.0, 3.0, 1.0]]], dtype=torch.float64)
    assert consensus(logits, "vote").tolist() == [[0.0, 1.0, 1.0, 1.0]]
    _, secondary = ranking_keys(logits, "vote")
    assert secondary.tolist() == [[0.0, 11.0, 3.0, 11.0]]
    assert consensus_predictions(logits, "vote").tolist() == [1]
    assert target_rank(logits, torch.tensor([3]), "vote").tolist() == [1]
    assert target_rank(logits, torch.tensor([2]), "vote").tolist() == [2]
    assert target_rank(logits, torch.tensor([0]), "vote").tolist() == [3]


def test_identical_columns_vote_for_the_first():
    # Inside one member a tie goes to the first maximum (torch.argmax), so identical columns give
    # all their votes to the lower index.
    logits = torch.tensor([[[1.0, 5.0, 0.0, 5.0]],
                           [[1.0, 5.0, 0.0, 5.0]],
                           [[0.0, 0.0, 6.0, 0.0]]])
    assert consensus(logits, "vote").tolist() == [[0.0, 2.0, 1.0, 0.0]]
    assert consensus_predictions(logits, "vote").tolist() == [1]
    assert target_rank(logits, torch.tensor([3]), "vote").tolist() == [2]  # 1 (votes), 2 (votes)


def test_vote_two_against_two():
    # Four members: classes 1 and 3 get two votes each, class 0 the highest sum but no vote.
    logits = torch.tensor([[[7.0, 9.0, 0.0, 1.0]],
                           [[7.0, 9.0, 0.0, 1.0]],
                           [[7.0, 1.0, 0.0, 9.5]],
                           [[7.0, 1.0, 0.0, 9.5]]], dtype=torch.float64)
    assert consensus(logits, "vote").tolist() == [[0.0, 2.0, 0.0, 2.0]]
    assert consensus_predictions(logits, "vote").tolist() == [3]  # 21 > 20
    assert consensus_predictions(logits, "average").tolist() == [0]  # 28, but no votes
    assert target_rank(logits, torch.tensor([0]), "vote").tolist() == [2]

    tied = logits.clone()
    tied[2:, 0, 3] = 9.0  # now classes 1 and 3 sum to 20 exactly
    assert consensus_predictions(tied, "vote").tolist() == [1]
    assert target_rank(tied, torch.tensor([3]), "vote").tolist() == [1]


def test_vote_is_not_beaten_by_a_higher_sum_with_fewer_votes():
    logits = torch.tensor([[[0.0, 1.0, 0.0]],
                           [[0.0, 1.0, 0.0]],
                           [[0.0, 0.0, 100.0]]])
    assert consensus_predictions(logits, "vote").tolist() == [1]
    assert consensus_predictions(logits, "average").tolist() == [2]


# --- relations between the rules ------------------------------------------------------------------

@pytest.mark.parametrize("m,c", SIZES)
def test_geometric_predicts_like_average_always(gen, m, c):
    logits = random_logits(gen, m, 30, c, dtype=torch.bfloat16)
    logits[:, :10, -1] = logits[:, :10, 0]  # exact ties too
    assert torch.equal(consensus_predictions(logits, "geometric"),
                       consensus_predictions(logits, "average"))
    assert torch.equal(ranking_keys(logits, "geometric")[0], ranking_keys(logits, "average")[0])


@pytest.mark.parametrize("m,c", SIZES)
def test_scores_argmax_agrees_with_predictions_in_generic_cases(gen, m, c):
    # Random float64 logits have no ties, so the scores' argmax is the prediction: the mean for
    # average, the renormalised geometric mean of probabilities for geometric (the documented
    # equivalence), the median for median.
    logits = random_logits(gen, m, 30, c, dtype=torch.float64)
    for rule in ("average", "geometric", "median"):
        assert torch.equal(consensus(logits, rule).argmax(dim=-1),
                           consensus_predictions(logits, rule))
    assert torch.equal(consensus(logits, "average").argmax(dim=-1),
                       logits.mean(dim=0).argmax(dim=-1))


@pytest.mark.parametrize("m", range(1, 6))
def test_vote_prediction_has_the_most_votes(gen, m):
    logits = random_logits(gen, m, 60, 3, dtype=torch.float16)
    votes = consensus(logits, "vote")
    preds = consensus_predictions(logits, "vote")
    assert torch.equal(votes.gather(1, preds[:, None])[:, 0], votes.amax(dim=-1))
    assert torch.equal(votes.sum(dim=-1), torch.full((60,), float(m), dtype=torch.float64))


@pytest.mark.parametrize("m,c", SIZES)
def test_geometric_rows_are_probabilities(gen, m, c):
    probs = consensus(random_logits(gen, m, 12, c, scale=10.0), "geometric")
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(12, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert bool((probs >= 0).all())


@pytest.mark.parametrize("m", [2, 4])
def test_median_even_members_averages_the_middle_two(m):
    vals = torch.tensor([3.0, -1.0, 10.0, 2.0], dtype=torch.float64)[:m]
    logits = vals[:, None, None].expand(m, 1, 2).clone()
    logits[:, 0, 1] = 0.0
    middle = sorted(vals.tolist())[m // 2 - 1:m // 2 + 1]
    assert consensus(logits, "median").tolist() == [[(middle[0] + middle[1]) * 0.5, 0.0]]


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_one_member_is_that_members_argmax(gen, rule):
    logits = random_logits(gen, 1, 25, 7, dtype=torch.float16)
    logits[0, :5, 4] = logits[0, :5].amax(dim=-1)  # ties inside the member: first maximum
    assert torch.equal(consensus_predictions(logits, rule), torch.argmax(logits[0], dim=-1))


# --- shapes, layouts, dtypes ----------------------------------------------------------------------

@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_no_samples(rule):
    logits = torch.zeros(3, 0, 5)
    assert consensus(logits, rule).shape == (0, 5)
    assert consensus_predictions(logits, rule).shape == (0,)
    assert target_rank(logits, torch.zeros(0, dtype=torch.long), rule).shape == (0,)


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_non_contiguous_input(gen, rule):
    wide = random_logits(gen, 12, 4, 14).transpose(0, 1)  # (4, 12, 14) from (12, 4, 14)
    logits = wide[:, ::2, 1::2]  # (4, 6, 7), non-contiguous
    assert not logits.is_contiguous()
    dense = logits.contiguous()
    target = torch.arange(6) % 7
    assert torch.equal(consensus(logits, rule), consensus(dense, rule))
    assert torch.equal(consensus_predictions(logits, rule), consensus_predictions(dense, rule))
    assert torch.equal(target_rank(logits, target, rule), target_rank(dense, target, rule))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_low_precision_is_exact_in_float64(gen, dtype, rule):
    # Conversion to float64 is exact, so a half-precision input gives what its float64 copy gives.
    logits = random_logits(gen, 4, 30, 5, dtype=dtype)
    wide = logits.to(torch.float64)
    assert consensus(logits, rule).dtype == torch.float64
    assert torch.equal(consensus(logits, rule), consensus(wide, rule))
    assert torch.equal(consensus_predictions(logits, rule), consensus_predictions(wide, rule))


def test_sums_run_in_member_order():
    # 1e16 + 1 + 1 rounds each 1 away in order; a pairwise or reordered sum would keep 2.
    logits = torch.tensor([[[1e16, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]], [[-1e16, 0.0]]],
                          dtype=torch.float64)
    assert ranking_keys(logits, "average")[0].tolist() == [[0.0, 0.0]]
    assert consensus(logits, "average").tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("m", [8, 37])
def test_many_members_of_mixed_magnitude_sum_in_order(gen, m):
    # Magnitudes from 1e-8 to 1e8 make the float64 sum depend on its order (torch.sum's differs).
    scale = torch.logspace(-8, 8, m, dtype=torch.float64)[:, None, None]
    logits = torch.randn(m, 4, 5, generator=gen, dtype=torch.float64) * scale
    z = as_lists(logits)
    for rule in CONSENSUS_RULES:
        primary, secondary = ranking_keys(logits, rule)
        keys = [oracle_keys(z, rule, b, 5) for b in range(4)]
        assert primary.tolist() == [[k[0] for k in row] for row in keys]
        if secondary is not None:
            assert secondary.tolist() == [[k[1] for k in row] for row in keys]
    want = [[oracle_sum(z, b, c) / m for c in range(5)] for b in range(4)]
    assert consensus(logits, "average").tolist() == want


@pytest.mark.parametrize("rule", CONSENSUS_RULES)
def test_device_matches_cpu(gen, device, rule):
    logits = random_logits(gen, 5, 64, 9, dtype=torch.float32)
    target = torch.randint(0, 9, (64,), generator=gen)
    here = logits.to(device)
    for got, want in zip(ranking_keys(here, rule), ranking_keys(logits, rule)):
        assert (got is None and want is None) or torch.equal(got.cpu(), want)
    assert torch.equal(consensus_predictions(here, rule).cpu(), consensus_predictions(logits, rule))
    assert torch.equal(target_rank(here, target.to(device), rule).cpu(),
                       target_rank(logits, target, rule))
    torch.testing.assert_close(consensus(here, rule).cpu(), consensus(logits, rule),
                               rtol=0, atol=1e-12)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("logits,match", [
    (torch.zeros(3, 5), "3-D"),
    (torch.zeros(2, 3, 4, 5), "3-D"),
    ([[[0.0]]], "expected a tensor"),
    (torch.zeros(0, 3, 4), "at least one member"),
    (torch.zeros(2, 3, 0), "at least one class"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "torch.int64"),
    (torch.zeros(2, 3, 4, dtype=torch.bool), "torch.bool"),
    (torch.zeros(2, 3, 4, dtype=torch.complex64), "torch.complex64"),
    (torch.tensor([[[0.0, 1.0]], [[math.nan, 1.0]]]), "member 1 has NaN"),
    (torch.tensor([[[0.0, math.inf]], [[0.0, 1.0]]]), "member 0 has infinite"),
    (torch.tensor([[[0.0, 1.0]], [[-math.inf, 1.0]]]), "member 1 has infinite"),
    (torch.tensor([[[1e308, -1e308]], [[-1e308, 1e308]]], dtype=torch.float64), "overflow"),
])
def test_bad_logits(logits, match):
    for call in (lambda: consensus(logits, "average"),
                 lambda: consensus_predictions(logits, "vote"),
                 lambda: ranking_keys(logits, "median"),
                 lambda: target_rank(logits, torch.zeros(3, dtype=torch.long), "geometric")):
        with pytest.raises(DivfastError, match=f"logits: .*{match}"):
            call()


@pytest.mark.parametrize("rule", ["mean", "Average", None, ""])
def test_unknown_rule_lists_the_rules(rule):
    for call in (consensus, consensus_predictions, ranking_keys):
        with pytest.raises(DivfastError, match="rule: expected one of average, vote, median, "
                                               "geometric"):
            call(torch.zeros(2, 3, 4), rule)


@pytest.mark.parametrize("target,match", [
    (torch.zeros(4, dtype=torch.long), r"shape \(3,\)"),
    (torch.zeros(3, 1, dtype=torch.long), r"shape \(3,\)"),
    ([0, 1, 2], r"shape \(3,\)"),
    (torch.zeros(3), "integer"),
    (torch.zeros(3, dtype=torch.bool), "integer"),
    (torch.tensor([0, 4, 1]), r"\[0, 4\).*got 4"),
    (torch.tensor([0, -1, 1]), r"\[0, 4\).*got -1"),
])
def test_bad_target(target, match):
    with pytest.raises(DivfastError, match=f"target: .*{match}"):
        target_rank(torch.zeros(2, 3, 4), target, "average")


@pytest.mark.parametrize("cap", [0, -1, 2.0, True])
def test_bad_cap(cap):
    with pytest.raises(DivfastError, match="cap: expected an int >= 1"):
        target_rank(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), "average", cap=cap)
