"""Design diversity after Eckhardt & Lee and Littlewood & Miller: difficulty functions of the
methodologies an ensemble's members come from (paper section 3.1.1).

Eckhardt & Lee (1985) see a methodology M (an architecture family, a training loss, ...) as a
distribution over the models it produces, and define its *difficulty function* theta_M(x): the
probability that a model drawn from M fails on input x. Two models drawn independently from M fail
independently *given x*, yet not unconditionally:
P(both fail) = E[theta_M^2] = E[theta_M]^2 + Var(theta_M) >= E[theta_M]^2, because inputs that are
hard for the methodology are hard for all its models. Littlewood & Miller (1989) draw the two models
from different methodologies A and B: P(both fail) = E[theta_A theta_B] = E[theta_A] E[theta_B] +
Cov(theta_A, theta_B), and the covariance is negative when A's hard inputs are B's easy ones
("forced diversity"), so two methodologies can fail together less often than independent models.
Three models voting 2-of-3 fail when at least two fail; with failure probabilities p1, p2, p3 given
x that is p1 p2 + p1 p3 + p2 p3 - 2 p1 p2 p3 (:func:`majority_failure`), averaged over x.

Estimators (the tests enforce each):
    * theta_g(x) is the fraction of group g's m_g members that fail (are not correct) on input x.
      E, Var and Cov are the mean and the population (divide by N) variance and covariance over the
      N inputs, so E[theta^2] = E[theta]^2 + Var(theta) and E[theta_A theta_B] =
      E[theta_A] E[theta_B] + Cov(theta_A, theta_B) hold up to rounding.
    * "predicted" values plug the estimated theta into the model's formulas; they estimate the
      rates for models drawn afresh from the methodologies. "observed" values count the rates over
      the actual combinations of *distinct* members: the fraction of (member pair, input) that both
      fail, or of (member triple, input) that the 2-of-3 vote gets wrong, over every pair or triple
      (no sampling: counts per input come from the number of failing members in each group).
    * A group's ``both_fail_predicted`` is the plug-in E[theta_g^2]. At each x it includes the m_g
      terms that pair a member with itself:
      theta_g(x)^2 = theta_g(x) / m_g + (m_g - 1) / m_g * U_g(x), where
      U_g(x) = sum over i != j of f_i(x) f_j(x) / (m_g (m_g - 1)) and f_i(x) = 1 when member i
      fails. So ``both_fail_predicted`` is
      ``mean_difficulty / m_g + (m_g - 1) / m_g * both_fail_observed``: it overestimates
      P(both fail) by E[theta (1 - theta)] / m_g on average, from the variance of a rate estimated
      from m_g members. ``both_fail_unbiased`` is E[U_g], the unbiased estimator; it is the observed
      rate computed another way.
    * Between two groups (which share no member) the plug-in E[theta_A theta_B] *equals* the
      observed rate over the m_A m_B member pairs, and a 2-of-3 design of three different groups its
      observed rate; only designs drawing a group twice differ, by the self-pair terms above.

Caveats: predicted and observed come from the same members, so their agreement is arithmetic, not
a test of the model; what the model adds is the decomposition (how much of the coincident failure
is shared difficulty, Var or Cov, beyond independence, E[theta_A] E[theta_B]) and predictions for
designs the pool cannot form (a group of one member has no observed pair, yet a prediction). With
few members per group theta is coarse (m_g + 1 possible values) and noisy: Var(theta_g) is
inflated by about E[theta_g (1 - theta_g)] / m_g, and a group of one member has theta in {0, 1},
whose plug-in predicts that two such models always fail together (``both_fail_predicted`` equals
``mean_difficulty``). Cov between two groups is not inflated on average, only noisy. The inputs are
a sample too: E is the mean over the evaluated inputs, not over the deployment distribution.

With up to :data:`ALL_DESIGNS_MAX_GROUPS` groups every multiset of three groups is a 2-of-3 design;
with more, only the designs of one or two groups: (A, A, A), (A, A, B) and (A, B, B).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from divfast.errors import DivfastError

ALL_DESIGNS_MAX_GROUPS = 6


def _failures(correct: torch.Tensor) -> torch.Tensor:
    """``~correct`` as a (K, N) bool tensor, after checking ``correct``."""
    if not isinstance(correct, torch.Tensor):
        raise DivfastError(f"correct: expected a (K, N) bool tensor, got {type(correct).__name__}")
    if correct.dim() != 2:
        raise DivfastError(f"correct: expected a 2-D tensor (K, N) of K members' correctness on N "
                           f"inputs, got shape {list(correct.shape)}")
    if correct.dtype != torch.bool:
        if correct.is_complex() or not bool(((correct == 0) | (correct == 1)).all()):
            raise DivfastError(f"correct: expected bool or 0/1 values, got {correct.dtype} with "
                               "other values")
        correct = correct != 0
    return ~correct


def _check_samples(fails: torch.Tensor) -> None:
    if fails.shape[1] == 0:
        raise DivfastError(f"correct: expected at least one input (N >= 1), got shape "
                           f"{list(fails.shape)}")


def _group_members(groups: Sequence[str], k: int) -> dict[str, list[int]]:
    """Member indices per group name, groups in order of first appearance."""
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise DivfastError(f"groups: expected a sequence of K group names, got "
                           f"{type(groups).__name__}")
    if len(groups) == 0:
        raise DivfastError("groups: expected one group name per member, got an empty sequence")
    if len(groups) != k:
        raise DivfastError(f"groups: expected one group name per member (K = {k} rows of "
                           f"`correct`), got {len(groups)} names")
    members: dict[str, list[int]] = {}
    for i, name in enumerate(groups):
        if not isinstance(name, str) or not name:
            raise DivfastError(f"groups: groups[{i}] is {name!r}, expected a non-empty str")
        members.setdefault(name, []).append(i)
    return members


def _failing_counts(fails: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    """(N,) int64: how many of ``members`` fail on each input."""
    index = torch.tensor(list(members), dtype=torch.long, device=fails.device)
    return fails.index_select(0, index).sum(dim=0, dtype=torch.long)


def _comb(x: torch.Tensor, r: int) -> torch.Tensor:
    """Elementwise C(x, r) of an int64 tensor x >= 0 (0 where x < r); exact."""
    out = torch.ones_like(x)
    for i in range(r):
        out = out * (x - i)
    return out // math.factorial(r)


def difficulty_function(correct: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    """The difficulty function of one methodology, estimated from its members.

    Args:
        correct: ``(K, N)`` bool (or 0/1) tensor, ``correct[i, x]`` whether member i is right on
            input x.
        members: the rows of ``correct`` that belong to the methodology; distinct, at least one.

    Returns:
        ``(N,)`` float64 tensor: theta(x), the fraction of ``members`` that fail on each input.

    Raises:
        DivfastError: naming the argument: ``correct`` not 2-D bool or 0/1, N = 0, ``members``
            empty, out of range or repeated.

    Example:
        >>> correct = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
        >>> difficulty_function(correct, [0, 1])
        tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64)
    """
    fails = _failures(correct)
    _check_samples(fails)
    k = fails.shape[0]
    if isinstance(members, str) or not isinstance(members, Sequence) or len(members) == 0:
        raise DivfastError(f"members: expected a non-empty sequence of row indices, got "
                           f"{members!r}")
    for i in members:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
            raise DivfastError(f"members: {i!r} is not a row index of `correct` (0 <= i < K = {k})")
    if len(set(members)) != len(members):
        raise DivfastError(f"members: expected distinct row indices, got {list(members)}")
    return _failing_counts(fails, members).to(torch.float64) / len(members)


def majority_failure(p1: torch.Tensor | float, p2: torch.Tensor | float,
                     p3: torch.Tensor | float) -> torch.Tensor | float:
    """P(at least two of three fail) when they fail independently with probabilities p1, p2, p3.

    The probability that a 2-of-3 vote among three independently drawn models is wrong on an input
    where their failure probabilities are ``p1, p2, p3``: ``p1 p2 + p1 p3 + p2 p3 - 2 p1 p2 p3``
    (each pair failing, minus the all-fail outcome counted three times, plus it once).

    Args:
        p1: failure probability of the first model; a float or a tensor (elementwise).
        p2: the second's, broadcastable with ``p1``.
        p3: the third's, broadcastable with ``p1``.

    Returns:
        the probability, of the inputs' (broadcast) type.

    Example:
        >>> majority_failure(0.5, 0.5, 0.5)
        0.5
        >>> majority_failure(torch.tensor([0.0, 1.0]), 1.0, 0.25)
        tensor([0.2500, 1.0000])
    """
    return p1 * p2 + p1 * p3 + p2 * p3 - 2 * p1 * p2 * p3


def _designs(names: list[str]) -> list[tuple[str, str, str]]:
    designs = itertools.combinations_with_replacement(names, 3)
    if len(names) <= ALL_DESIGNS_MAX_GROUPS:
        return list(designs)
    return [d for d in designs if len(set(d)) <= 2]


def _majority_counts(design: tuple[str, str, str], counts: dict[str, torch.Tensor],
                     sizes: dict[str, int]) -> tuple[int, int]:
    """(triples, wrong): distinct member triples matching ``design``, and the (triple, input)
    pairs whose 2-of-3 vote fails, counted exactly from the failing members per group and input."""
    triples = 1
    ways = None  # ways[j]: (N,) number of ways to pick the members so far with j of them failing
    for name, c in ((n, design.count(n)) for n in dict.fromkeys(design)):
        s, m = counts[name], sizes[name]
        triples *= math.comb(m, c)
        pick = [_comb(s, j) * _comb(m - s, c - j) for j in range(c + 1)]
        if ways is None:
            ways = pick
            continue
        merged = [torch.zeros_like(s) for _ in range(len(ways) + c)]
        for j, w in enumerate(ways):
            for i, p in enumerate(pick):
                merged[i + j] = merged[i + j] + w * p
        ways = merged
    return triples, int(sum(ways[2:]).sum())


def difficulty_analysis(correct: torch.Tensor, groups: Sequence[str]) -> dict:
    """Difficulty functions of the members' methodologies and the failure rates they predict.

    See the module docstring for the model, the estimators and their caveats.

    Args:
        correct: ``(K, N)`` bool (or 0/1) tensor, ``correct[i, x]`` whether member i is right on
            input x.
        groups: K methodology names (non-empty str), one per row of ``correct``; members sharing a
            name form a group. Groups are reported in order of first appearance.

    Returns:
        A JSON-friendly dict (floats, ints, lists, str, None):

        * ``"groups"``: per name, ``members`` (row indices), ``mean_difficulty`` E[theta],
          ``var_difficulty`` Var(theta), ``both_fail_predicted`` the plug-in E[theta^2],
          ``both_fail_unbiased`` the unbiased estimate from distinct members and
          ``both_fail_observed`` the rate over pairs of distinct members (both None for one
          member).
        * ``"pairs"``: per pair of groups, ``a``, ``b``, ``independent`` E[theta_a] E[theta_b],
          ``covariance`` Cov(theta_a, theta_b), ``both_fail_predicted`` E[theta_a theta_b],
          ``both_fail_observed`` the rate over the ``member_pairs`` = m_a m_b member pairs.
        * ``"majority"``: per 2-of-3 design, ``design`` (three names), ``predicted`` the mean over
          inputs of :func:`majority_failure` of the groups' theta, ``independent`` the same at
          the groups' E[theta], ``observed`` the rate over the ``triples`` distinct member triples
          that match the design (None when there are none).
        * ``"n_samples"``: N.

    Raises:
        DivfastError: naming the argument: ``correct`` not a 2-D bool or 0/1 tensor or with N = 0;
            ``groups`` empty, of length other than K, or with a name that is not a non-empty str.

    Example:
        >>> correct = torch.tensor([[1, 1, 0, 1, 0],   # cnn
        ...                         [1, 0, 0, 1, 1],   # cnn
        ...                         [0, 1, 1, 1, 1],   # vit
        ...                         [1, 1, 1, 0, 1]],  # vit
        ...                        dtype=torch.bool)
        >>> out = difficulty_analysis(correct, ["cnn", "cnn", "vit", "vit"])
        >>> cnn = out["groups"]["cnn"]
        >>> [round(cnn[k], 4) for k in ("mean_difficulty", "var_difficulty",
        ...                             "both_fail_predicted", "both_fail_observed")]
        [0.4, 0.14, 0.3, 0.2]
        >>> pair = out["pairs"][0]
        >>> [round(pair[k], 4) for k in ("independent", "covariance", "both_fail_predicted",
        ...                              "both_fail_observed")]
        [0.08, -0.08, 0.0, 0.0]
        >>> for m in out["majority"]:
        ...     print(m["design"], round(m["predicted"], 4), m["observed"], m["triples"])
        ['cnn', 'cnn', 'cnn'] 0.4 None 0
        ['cnn', 'cnn', 'vit'] 0.3 0.2 2
        ['cnn', 'vit', 'vit'] 0.1 0.0 2
        ['vit', 'vit', 'vit'] 0.2 None 0
    """
    fails = _failures(correct)
    members = _group_members(groups, fails.shape[0])
    _check_samples(fails)
    n = fails.shape[1]
    names = list(members)
    sizes = {g: len(ix) for g, ix in members.items()}
    counts = {g: _failing_counts(fails, ix) for g, ix in members.items()}  # (N,) int64 each
    theta = {g: counts[g].to(torch.float64) / sizes[g] for g in names}  # (N,) float64 each
    mean = {g: float(theta[g].mean()) for g in names}

    out_groups = {}
    for g in names:
        t, s, m = theta[g], counts[g], sizes[g]
        observed = unbiased = None
        if m >= 2:
            self_pairs = s * (s - 1)  # (N,) ordered pairs of distinct failing members
            observed = int(self_pairs.sum()) / (n * m * (m - 1))
            unbiased = float((self_pairs.to(torch.float64) / (m * (m - 1))).mean())
        out_groups[g] = {
            "members": list(members[g]),
            "mean_difficulty": mean[g],
            "var_difficulty": float(((t - mean[g]) ** 2).mean()),
            "both_fail_predicted": float((t * t).mean()),
            "both_fail_unbiased": unbiased,
            "both_fail_observed": observed,
        }

    pairs = []
    for a, b in itertools.combinations(names, 2):
        pairs.append({
            "a": a,
            "b": b,
            "independent": mean[a] * mean[b],
            "covariance": float(((theta[a] - mean[a]) * (theta[b] - mean[b])).mean()),
            "both_fail_predicted": float((theta[a] * theta[b]).mean()),
            "both_fail_observed": int((counts[a] * counts[b]).sum()) / (n * sizes[a] * sizes[b]),
            "member_pairs": sizes[a] * sizes[b],
        })

    majority = []
    for design in _designs(names):
        triples, wrong = _majority_counts(design, counts, sizes)
        majority.append({
            "design": list(design),
            "predicted": float(majority_failure(*(theta[g] for g in design)).mean()),
            "independent": majority_failure(*(mean[g] for g in design)),
            "observed": wrong / (n * triples) if triples else None,
            "triples": triples,
        })
    return {"groups": out_groups, "pairs": pairs, "majority": majority, "n_samples": n}
