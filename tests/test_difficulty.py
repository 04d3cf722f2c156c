"""Difficulty functions (Eckhardt & Lee, Littlewood & Miller): hand-computed tiny pools; every
number against a brute-force oracle that enumerates member pairs, member triples and the 8
outcomes of a 2-of-3 vote in Python floats; the identities the module docstring states; a
simulation with known difficulty functions; forced diversity; one-member groups; which 2-of-3
designs are reported; input dtypes and devices; one-line errors."""

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch

from divfast.ensembles import difficulty_analysis
from divfast.ensembles.difficulty import (ALL_DESIGNS_MAX_GROUPS, difficulty_function,
                                          majority_failure)
from divfast.errors import DivfastError

# Four members, five inputs; rows are correctness. The failures (1 = wrong) are
#   cnn 0: 0 0 1 0 1      theta_cnn = 0, 1/2, 1, 0, 1/2
#   cnn 1: 0 1 1 0 0
#   vit 2: 1 0 0 0 0      theta_vit = 1/2, 0, 0, 1/2, 0
#   vit 3: 0 0 0 1 0
TINY = torch.tensor([[1, 1, 0, 1, 0],
                     [1, 0, 0, 1, 1],
                     [0, 1, 1, 1, 1],
                     [1, 1, 1, 0, 1]], dtype=torch.bool)
TINY_GROUPS = ["cnn", "cnn", "vit", "vit"]

# Five members, three inputs, three groups; failures
#   a 0: 1 1 0      theta_a = 2/3, 2/3, 0
#   a 1: 1 0 0
#   a 2: 0 1 0
#   b 3: 1 0 1      theta_b = 1, 0, 1
#   c 4: 0 1 1      theta_c = 0, 1, 1
THREE_FAILS = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]],
                           dtype=torch.bool)
THREE_GROUPS = ["a", "a", "a", "b", "c"]


def design(out, names):
    return next(m for m in out["majority"] if m["design"] == list(names))


def pair(out, a, b):
    return next(p for p in out["pairs"] if (p["a"], p["b"]) == (a, b))


# --- hand-computed -------------------------------------------------------------------------------

def test_difficulty_function_by_hand():
    theta = difficulty_function(TINY, [0, 1])
    assert theta.dtype == torch.float64
    assert theta.tolist() == [0.0, 0.5, 1.0, 0.0, 0.5]
    assert difficulty_function(TINY, [3, 2]).tolist() == [0.5, 0.0, 0.0, 0.5, 0.0]
    assert difficulty_function(TINY, (2,)).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_tiny_pool_by_hand():
    out = difficulty_analysis(TINY, TINY_GROUPS)
    assert out["n_samples"] == 5
    assert list(out["groups"]) == ["cnn", "vit"]
    cnn, vit = out["groups"]["cnn"], out["groups"]["vit"]
    assert cnn["members"] == [0, 1] and vit["members"] == [2, 3]
    # E[theta], Var(theta) = E[theta^2] - E[theta]^2, plug-in E[theta^2], distinct pairs
    for got, want in [(cnn["mean_difficulty"], 0.4), (cnn["var_difficulty"], 0.14),
                      (cnn["both_fail_predicted"], 0.3), (cnn["both_fail_unbiased"], 0.2),
                      (cnn["both_fail_observed"], 0.2),  # both cnn members fail on input 2 only
                      (vit["mean_difficulty"], 0.2), (vit["var_difficulty"], 0.06),
                      (vit["both_fail_predicted"], 0.1), (vit["both_fail_unbiased"], 0.0),
                      (vit["both_fail_observed"], 0.0)]:
        assert got == pytest.approx(want, abs=1e-15)

    (p,) = out["pairs"]
    assert (p["a"], p["b"], p["member_pairs"]) == ("cnn", "vit", 4)
    assert p["independent"] == pytest.approx(0.08, abs=1e-15)
    assert p["covariance"] == pytest.approx(-0.08, abs=1e-15)  # never hard for both
    assert p["both_fail_predicted"] == 0.0 and p["both_fail_observed"] == 0.0

    # 2-of-3 designs: predicted from theta, at E[theta], and over distinct member triples
    want = {("cnn", "cnn", "cnn"): (0.4, 0.352, None, 0),
            ("cnn", "cnn", "vit"): (0.3, 0.256, 0.2, 2),
            ("cnn", "vit", "vit"): (0.1, 0.168, 0.0, 2),
            ("vit", "vit", "vit"): (0.2, 0.104, None, 0)}
    assert [tuple(m["design"]) for m in out["majority"]] == list(want)
    for m in out["majority"]:
        predicted, independent, observed, triples = want[tuple(m["design"])]
        assert m["predicted"] == pytest.approx(predicted, abs=1e-15)
        assert m["independent"] == pytest.approx(independent, abs=1e-15)
        assert m["observed"] == (None if observed is None else pytest.approx(observed, abs=1e-15))
        assert m["triples"] == triples


def test_three_groups_by_hand():
    out = difficulty_analysis(~THREE_FAILS, THREE_GROUPS)
    a = out["groups"]["a"]
    assert a["mean_difficulty"] == pytest.approx(4 / 9)
    assert a["var_difficulty"] == pytest.approx(8 / 81)
    assert a["both_fail_predicted"] == pytest.approx(8 / 27)
    assert a["both_fail_observed"] == pytest.approx(2 / 9)  # 4 of 3 * 2 ordered pairs x 3 inputs
    assert out["groups"]["b"]["both_fail_observed"] is None
    ab, bc = pair(out, "a", "b"), pair(out, "b", "c")
    assert ab["both_fail_predicted"] == pytest.approx(2 / 9)
    assert ab["independent"] == pytest.approx(8 / 27)
    assert ab["covariance"] == pytest.approx(-2 / 27)
    assert ab["both_fail_observed"] == pytest.approx(2 / 9)
    assert bc["both_fail_predicted"] == pytest.approx(1 / 3)
    assert bc["covariance"] == pytest.approx(-1 / 9)
    aaa, abc = design(out, "aaa"), design(out, "abc")
    assert aaa["triples"] == 1 and aaa["observed"] == pytest.approx(2 / 3)
    assert aaa["predicted"] == pytest.approx(40 / 81)  # 3 p^2 - 2 p^3 at p = 2/3, twice, / 3
    assert abc["triples"] == 3 and abc["observed"] == pytest.approx(7 / 9)
    assert abc["predicted"] == pytest.approx(7 / 9)
    assert len(out["majority"]) == math.comb(3 + 2, 3)


# --- brute-force oracle --------------------------------------------------------------------------

def outcome_majority(ps):
    """P(at least 2 of 3 fail) by summing the 8 outcomes' probabilities."""
    total = 0.0
    for outcome in itertools.product((0, 1), repeat=3):
        if sum(outcome) >= 2:
            prob = 1.0
            for o, p in zip(outcome, ps):
                prob *= p if o else 1.0 - p
            total += prob
    return total


def design_triples(design_names, members):
    """Every triple of distinct members with one member per slot of the (multiset) design."""
    per_group = [itertools.combinations(members[g], design_names.count(g))
                 for g in dict.fromkeys(design_names)]
    return [sum(parts, ()) for parts in itertools.product(*per_group)]


def oracle(correct, groups):
    f = [[int(not v) for v in row] for row in correct.tolist()]
    k, n = len(f), len(f[0])
    names = list(dict.fromkeys(groups))
    members = {g: [i for i in range(k) if groups[i] == g] for g in names}
    theta = {g: [Fraction(sum(f[i][x] for i in members[g]), len(members[g])) for x in range(n)]
             for g in names}
    mean = {g: sum(theta[g]) / n for g in names}
    out = {"groups": {}, "pairs": [], "majority": []}
    for g in names:
        ordered = [(i, j) for i in members[g] for j in members[g] if i != j]
        out["groups"][g] = {
            "mean": mean[g],
            "var": sum((t - mean[g]) ** 2 for t in theta[g]) / n,
            "predicted": sum(t * t for t in theta[g]) / n,
            "observed": (Fraction(sum(f[i][x] * f[j][x] for i, j in ordered for x in range(n)),
                                  len(ordered) * n) if ordered else None),
        }
    for a, b in itertools.combinations(names, 2):
        both = sum(f[i][x] * f[j][x] for i in members[a] for j in members[b] for x in range(n))
        out["pairs"].append({
            "independent": mean[a] * mean[b],
            "covariance": sum((ta - mean[a]) * (tb - mean[b])
                              for ta, tb in zip(theta[a], theta[b])) / n,
            "predicted": sum(ta * tb for ta, tb in zip(theta[a], theta[b])) / n,
            "observed": Fraction(both, len(members[a]) * len(members[b]) * n),
        })
    for d in itertools.combinations_with_replacement(names, 3):
        triples = design_triples(d, members)
        wrong = sum(sum(f[i][x] for i in t) >= 2 for t in triples for x in range(n))
        out["majority"].append({
            "design": list(d),
            "predicted": sum(outcome_majority([float(theta[g][x]) for g in d])
                             for x in range(n)) / n,
            "independent": outcome_majority([float(mean[g]) for g in d]),
            "observed": Fraction(wrong, len(triples) * n) if triples else None,
            "triples": len(triples),
        })
    return out


def random_pool(seed):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 8, (1,), generator=gen))
    n = int(torch.randint(1, 10, (1,), generator=gen))
    n_groups = int(torch.randint(1, min(k, 4) + 1, (1,), generator=gen))
    labels = torch.randint(0, n_groups, (k,), generator=gen).tolist()
    correct = torch.rand(k, n, generator=gen) < torch.rand(k, 1, generator=gen)
    return correct, [f"g{label}" for label in labels]


def close(got, want):
    if want is None:
        return got is None
    return got is not None and got == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("seed", range(16))
def test_against_oracle(seed):
    correct, groups = random_pool(seed)
    out, want = difficulty_analysis(correct, groups), oracle(correct, groups)
    assert out["n_samples"] == correct.shape[1]
    assert list(out["groups"]) == list(want["groups"])
    for g, w in want["groups"].items():
        got = out["groups"][g]
        assert got["members"] == [i for i, name in enumerate(groups) if name == g]
        assert close(got["mean_difficulty"], w["mean"])
        assert close(got["var_difficulty"], w["var"])
        assert close(got["both_fail_predicted"], w["predicted"])
        assert close(got["both_fail_observed"], w["observed"])
        assert close(got["both_fail_unbiased"], w["observed"])
    assert len(out["pairs"]) == len(want["pairs"])
    for got, w in zip(out["pairs"], want["pairs"]):
        for key in ("independent", "covariance"):
            assert close(got[key], w[key])
        assert close(got["both_fail_predicted"], w["predicted"])
        assert close(got["both_fail_observed"], w["observed"])
    assert [m["design"] for m in out["majority"]] == [m["design"] for m in want["majority"]]
    for got, w in zip(out["majority"], want["majority"]):
        for key in ("predicted", "independent", "observed"):
            assert close(got[key], w[key]), (got, w)
        assert got["triples"] == w["triples"]


def test_majority_failure_against_the_eight_outcomes(gen):
    p = torch.rand(3, 50, generator=gen, dtype=torch.float64)
    p[:, :8] = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=torch.float64).T
    got = majority_failure(p[0], p[1], p[2])
    want = [outcome_majority(p[:, x].tolist()) for x in range(p.shape[1])]
    assert got.tolist() == pytest.approx(want, abs=1e-15)
    assert majority_failure(0.2, 0.3, 0.4) == pytest.approx(outcome_majority([0.2, 0.3, 0.4]))


# --- identities the module docstring states ------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_documented_identities(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 5
    correct = torch.rand(len(groups), 37, generator=gen) < 0.6
    out = difficulty_analysis(correct, groups)
    for g in out["groups"].values():
        m = len(g["members"])
        assert g["both_fail_predicted"] == pytest.approx(g["mean_difficulty"] ** 2
                                                         + g["var_difficulty"], abs=1e-14)
        assert g["both_fail_unbiased"] == pytest.approx(g["both_fail_observed"], abs=1e-14)
        assert g["both_fail_predicted"] == pytest.approx(
            g["mean_difficulty"] / m + (m - 1) / m * g["both_fail_observed"], abs=1e-14)
    for p in out["pairs"]:
        assert p["both_fail_predicted"] == pytest.approx(p["independent"] + p["covariance"],
                                                         abs=1e-14)
        assert p["both_fail_predicted"] == pytest.approx(p["both_fail_observed"], abs=1e-14)
    for d in out["majority"]:
        if len(set(d["design"])) == 3:
            assert d["predicted"] == pytest.approx(d["observed"], abs=1e-14)


# --- simulation with known difficulty functions --------------------------------------------------

def test_simulated_methodologies_approach_the_model(gen):
    n, m = 400, 200
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    true = {"A": 0.6 * t, "B": 0.6 * (1 - t), "C": 0.1 + 0.3 * t ** 2}
    rows, groups = [], []
    for name, theta in true.items():  # members fail independently given x
        rows.append(torch.rand(m, n, generator=gen, dtype=torch.float64) < theta)
        groups += [name] * m
    out = difficulty_analysis(~torch.cat(rows), groups)
    # theta of each group is a rate over m members: sd <= 0.5 / sqrt(m) per input, averaged over n
    # independent inputs; products add the 1/m self-pair bias of the plug-in
    tol = 6 * 0.5 / math.sqrt(m * n) * 2 + 1 / m
    mean = {g: float(th.mean()) for g, th in true.items()}
    for g, theta in true.items():
        got = out["groups"][g]
        assert got["mean_difficulty"] == pytest.approx(mean[g], abs=tol)
        assert got["var_difficulty"] == pytest.approx(float(theta.var(correction=0)), abs=tol)
        assert got["both_fail_predicted"] == pytest.approx(float((theta ** 2).mean()), abs=tol)
        assert got["both_fail_observed"] == pytest.approx(float((theta ** 2).mean()), abs=tol)
        assert abs(got["both_fail_predicted"] - got["both_fail_observed"]) <= 1 / m
    for p in out["pairs"]:
        ta, tb = true[p["a"]], true[p["b"]]
        assert p["covariance"] == pytest.approx(float(((ta - mean[p["a"]])
                                                       * (tb - mean[p["b"]])).mean()), abs=tol)
        assert p["both_fail_predicted"] == pytest.approx(float((ta * tb).mean()), abs=tol)
    assert pair(out, "A", "B")["covariance"] < -0.02  # A's hard inputs are B's easy ones
    for d in out["majority"]:
        want = float(majority_failure(*(true[g] for g in d["design"])).mean())
        assert d["predicted"] == pytest.approx(want, abs=2 * tol)
        assert d["observed"] == pytest.approx(want, abs=2 * tol)
        assert abs(d["predicted"] - d["observed"]) <= 3 / m
        assert d["triples"] == math.prod(math.comb(m, d["design"].count(g))
                                         for g in set(d["design"]))


# --- forced diversity ----------------------------------------------------------------------------

def test_complementary_difficulties_force_diversity():
    # A's two members fail on inputs 0 and 1, B's on 2 and 3: never together
    fails = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    out = difficulty_analysis(~fails, ["A", "A", "B", "B"])
    (p,) = out["pairs"]
    assert p["independent"] == 0.25 and p["covariance"] == -0.25
    assert p["both_fail_predicted"] == 0.0 and p["both_fail_observed"] == 0.0
    assert out["groups"]["A"]["both_fail_observed"] == 0.5  # same methodology: always together


def test_forced_diversity_random(gen):
    theta_a = torch.rand(300, generator=gen, dtype=torch.float64)
    theta_b = 1 - theta_a  # complementary difficulty functions
    fails = torch.cat([torch.rand(6, 300, generator=gen, dtype=torch.float64) < theta_a,
                       torch.rand(6, 300, generator=gen, dtype=torch.float64) < theta_b])
    out = difficulty_analysis(~fails, ["A"] * 6 + ["B"] * 6)
    (p,) = out["pairs"]
    assert p["covariance"] < 0
    assert p["both_fail_predicted"] < p["independent"]
    assert p["both_fail_observed"] < p["independent"]


# --- one-member groups, designs, inputs ----------------------------------------------------------

def test_single_member_groups():
    fails = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    out = difficulty_analysis(~fails, ["x", "y", "z"])
    for g in out["groups"].values():
        e = g["mean_difficulty"]
        assert g["both_fail_predicted"] == pytest.approx(e)  # theta in {0, 1}
        assert g["var_difficulty"] == pytest.approx(e * (1 - e))
        assert g["both_fail_observed"] is None and g["both_fail_unbiased"] is None
    xy = pair(out, "x", "y")
    assert xy["member_pairs"] == 1 and xy["both_fail_observed"] == 0.25
    assert design(out, "xxy")["observed"] is None and design(out, "xxy")["triples"] == 0
    assert design(out, "xxy")["predicted"] == pytest.approx(0.5)  # theta_x^2 at inputs 0 and 2
    xyz = design(out, "xyz")
    assert xyz["triples"] == 1 and xyz["observed"] == 0.75  # two of three fail on inputs 0, 1, 2

    one = difficulty_analysis(torch.tensor([[True, False]]), ["only"])
    assert one["pairs"] == []
    assert [m["design"] for m in one["majority"]] == [["only"] * 3]
    assert one["majority"][0]["observed"] is None


@pytest.mark.parametrize("n_groups", [1, 2, ALL_DESIGNS_MAX_GROUPS, ALL_DESIGNS_MAX_GROUPS + 1, 9])
def test_reported_designs(n_groups):
    names = [f"g{i}" for i in range(n_groups)]
    correct = torch.ones(n_groups, 3, dtype=torch.bool)
    designs = [tuple(m["design"]) for m in difficulty_analysis(correct, names)["majority"]]
    every = list(itertools.combinations_with_replacement(names, 3))
    if n_groups <= ALL_DESIGNS_MAX_GROUPS:
        assert designs == every
    else:
        assert designs == [d for d in every if len(set(d)) <= 2]
        assert len(designs) == n_groups + 2 * math.comb(n_groups, 2)  # AAA, AAB, ABB


def test_groups_in_order_of_first_appearance():
    correct = torch.tensor([[1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    out = difficulty_analysis(correct, ["b", "a", "b"])
    assert list(out["groups"]) == ["b", "a"]
    assert out["groups"]["b"]["members"] == [0, 2]
    assert (out["pairs"][0]["a"], out["pairs"][0]["b"]) == ("b", "a")


def test_json_friendly_and_dtypes(gen):
    correct = torch.rand(6, 11, generator=gen) < 0.5
    groups = ["a", "b", "a", "c", "b", "a"]
    out = difficulty_analysis(correct, groups)
    assert json.loads(json.dumps(out, allow_nan=False)) == out  # floats, ints, str, lists, None
    for other in (correct.to(torch.int64), correct.to(torch.uint8), correct.to(torch.float32),
                  correct.T.contiguous().T):
        assert difficulty_analysis(other, groups) == out


def test_devices(device, gen):
    correct = torch.rand(7, 13, generator=gen) < 0.4
    groups = ["a", "a", "b", "b", "b", "c", "a"]
    assert difficulty_analysis(correct.to(device), groups) == difficulty_analysis(correct, groups)
    theta = difficulty_function(correct.to(device), [2, 3, 4])
    assert theta.device.type == device.type
    assert theta.cpu().tolist() == difficulty_function(correct, [2, 3, 4]).tolist()


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("correct, groups, match", [
    ([[True, False]], ["a"], "correct: expected a .* tensor, got list"),
    (torch.ones(3, dtype=torch.bool), ["a"] * 3, r"correct: expected a 2-D .*shape \[3\]"),
    (torch.ones(2, 3, 1, dtype=torch.bool), ["a"] * 2, "correct: expected a 2-D"),
    (torch.full((2, 3), 0.5), ["a"] * 2, "correct: expected bool or 0/1"),
    (torch.full((2, 3), math.nan), ["a"] * 2, "correct: expected bool or 0/1"),
    (torch.ones(2, 0, dtype=torch.bool), ["a"] * 2, r"correct: expected at least one input"),
    (torch.ones(2, 3, dtype=torch.bool), ["a"] * 3, "groups: .*K = 2.*got 3 names"),
    (torch.ones(2, 3, dtype=torch.bool), ["a"], "groups: .*K = 2.*got 1 names"),
    (torch.ones(2, 3, dtype=torch.bool), [], "groups: .*empty"),
    (torch.ones(0, 3, dtype=torch.bool), [], "groups: .*empty"),
    (torch.ones(2, 3, dtype=torch.bool), "ab", "groups: expected a sequence"),
    (torch.ones(2, 3, dtype=torch.bool), ["a", 1], r"groups: groups\[1\] is 1"),
    (torch.ones(2, 3, dtype=torch.bool), ["a", ""], r"groups: groups\[1\] is ''"),
])
def test_analysis_errors(correct, groups, match):
    with pytest.raises(DivfastError, match=match):
        difficulty_analysis(correct, groups)


@pytest.mark.parametrize("members, match", [
    ([], "members: expected a non-empty"),
    (3, "members: expected a non-empty"),
    ([0, 4], r"members: 4 is not a row index .*K = 4"),
    ([-1], "members: -1 is not a row index"),
    ([True], "members: True is not a row index"),
    ([1, 1], "members: expected distinct"),
])
def test_difficulty_function_errors(members, match):
    with pytest.raises(DivfastError, match=match):
        difficulty_function(TINY, members)
    with pytest.raises(DivfastError, match="correct: expected at least one input"):
        difficulty_function(torch.ones(4, 0, dtype=torch.bool), [0])
