"""The training losses against their formulas written out naively (paper Eq. 1-3 and 8).

Every reference here is computed independently of divfast/training/losses.py: the GNCL Hessian
is formed explicitly as ``(B, C, C)``, consensuses and medians come from Python loops, Saliency
maps from plain ``autograd.grad``. Inputs are float64, so values and gradients must agree to
rounding (a float32 intermediate would show as a 1e-9 difference).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from divfast.errors import DivfastError
from divfast.training import build_loss, loss_options
from divfast.training.losses import (CONSENSUS_CHOICES, AttributionLoss, consensus_logits,
                                     hessian_quadratic_form, member_cross_entropy)
from divfast.training.trainer import Ensemble

TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64: agreement to rounding, not to float32 precision
SIZES = [(3, 5, 4), (2, 5, 4), (4, 5, 4)]  # (M, B, C): odd and even M for the median


def _logits(m, b, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(m, b, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, c, (b,), generator=g)
    return logits, target


# --- naive references ------------------------------------------------------------------------


def naive_consensus(logits, rule):
    """f (B, C) from loops: the selection (sort order, voters) is taken from the detached values and
    held fixed, the values are the live logits, so autograd gives the reference gradient."""
    m, b, c = logits.shape
    if rule == "average":
        return sum(logits[i] for i in range(m)) / m
    if rule == "geometric":
        return sum(logits[i] - torch.logsumexp(logits[i], dim=-1, keepdim=True)
                   for i in range(m)) / m
    values = logits.detach().tolist()
    rows = []
    for s in range(b):
        row = []
        if rule == "median":
            for k in range(c):
                order = sorted(range(m), key=lambda i: values[i][s][k])
                if m % 2:
                    row.append(logits[order[m // 2], s, k])
                else:
                    row.append((logits[order[m // 2 - 1], s, k] + logits[order[m // 2], s, k]) / 2)
            rows.append(torch.stack(row))
            continue
        assert rule == "vote"
        votes = [max(range(c), key=lambda k: values[i][s][k]) for i in range(m)]
        sums = [sum(values[i][s][k] for i in range(m)) for k in range(c)]
        # most votes, then the highest summed logits, then the lowest index
        winner = min(range(c), key=lambda k: (-votes.count(k), -sums[k], k))
        voters = [i for i in range(m) if votes[i] == winner]
        rows.append(sum(logits[i, s] for i in voters) / len(voters))
    return torch.stack(rows)


def explicit_hessian(f):
    """D = diag(p) - p p^T per sample, (B, C, C), at p = softmax(f) held constant."""
    p = torch.softmax(f.detach(), dim=-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def naive_member_ce(logits, target):
    m, b, _ = logits.shape
    return [sum(-F.log_softmax(logits[i, s], dim=-1)[target[s]] for s in range(b)) / b
            for i in range(m)]


def naive_gncl(logits, target, lam, rule, mask=None):
    """sum_i l(h_i, y) - lambda/(2M) mean_b sum_i d_i^T D d_i; ``mask`` (M, B) zeroes terms."""
    m = logits.shape[0]
    f = naive_consensus(logits, rule)
    hessian = explicit_hessian(f)  # (B, C, C)
    quad = torch.stack([torch.einsum("bc,bcd,bd->b", logits[i] - f, hessian, logits[i] - f)
                        for i in range(m)])  # (M, B)
    if mask is not None:
        quad = quad * mask
    return sum(naive_member_ce(logits, target)) - lam / (2 * m) * quad.sum(dim=0).mean()


def _assert_same(loss, ref, logits):
    torch.testing.assert_close(loss, ref, **TIGHT)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(ref, logits, retain_graph=True)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    return grad


# --- consensus and the quadratic form --------------------------------------------------------


@pytest.mark.parametrize("rule", CONSENSUS_CHOICES)
@pytest.mark.parametrize("size", SIZES)
def test_consensus_logits_match_loops(size, rule):
    logits, _ = _logits(*size, seed=1)
    _assert_same(consensus_logits(logits, rule).sum(), naive_consensus(logits, rule).sum(), logits)
    torch.testing.assert_close(consensus_logits(logits, rule), naive_consensus(logits, rule),
                               **TIGHT)


def test_vote_consensus_ties_go_to_the_summed_logits_then_the_lowest_class():
    # one vote each for classes 0, 1, 2: class 1 has the highest summed logits -> member 1 alone
    logits = torch.tensor([[[3.0, 2.9, 0.0]], [[0.0, 4.0, 0.0]], [[0.0, 0.0, 1.0]]],
                          dtype=torch.float64)
    torch.testing.assert_close(consensus_logits(logits, "vote"), logits[1])
    torch.testing.assert_close(naive_consensus(logits, "vote"), logits[1])
    # two votes each with equal sums: the lower class (0) wins, its voters averaged
    logits = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]],
                          dtype=torch.float64)
    torch.testing.assert_close(consensus_logits(logits, "vote"), logits[0])


@pytest.mark.parametrize("size", SIZES)
def test_hessian_quadratic_form_is_the_explicit_one(size):
    m, b, c = size
    g = torch.Generator().manual_seed(2)
    d = torch.randn(m, b, c, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), dim=-1)
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (B, C, C)
    explicit = torch.stack([torch.stack([d[i, s] @ hessian[s] @ d[i, s] for s in range(b)])
                            for i in range(m)])
    torch.testing.assert_close(hessian_quadratic_form(d, p), explicit, **TIGHT)
    # D annihilates constants: shifting every d_b by a per-sample constant changes nothing
    shift = torch.randn(1, b, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hessian_quadratic_form(d + shift, p), explicit, **TIGHT)


# --- gncl ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", CONSENSUS_CHOICES)
@pytest.mark.parametrize("size", SIZES)
def test_gncl_is_the_explicit_hessian_formula(size, rule):
    logits, target = _logits(*size, seed=3)
    lam = 0.7
    loss, terms = build_loss("gncl", lam=lam, consensus=rule)(logits, target)
    _assert_same(loss, naive_gncl(logits, target, lam, rule), logits)
    f = naive_consensus(logits, rule)
    spread = torch.einsum("mbc,bcd,mbd->b", logits - f, explicit_hessian(f), logits - f).mean()
    assert terms["penalty"] == pytest.approx(float(spread.detach()), rel=1e-10)
    naive_ce = [float(v.detach()) for v in naive_member_ce(logits, target)]
    assert terms["member_ce"] == pytest.approx(naive_ce, rel=1e-10)


@pytest.mark.parametrize("size", SIZES)
def test_gncl_average_gradient_is_minus_lambda_over_m_times_d_d_i(size):
    # the module docstring: with D held constant, member i's penalty gradient is -lambda/M D d_i
    # (per sample; batch means add 1/B)
    logits, target = _logits(*size, seed=4)
    m, b, _ = size
    lam = 0.5
    loss, _ = build_loss("gncl", lam=lam)(logits, target)
    independent, _ = build_loss("independent")(logits, target)
    (grad,) = torch.autograd.grad(loss - independent, logits)
    f = logits.detach().mean(dim=0)
    d = logits.detach() - f  # (M, B, C)
    expected = -lam / (m * b) * torch.einsum("bcd,mbd->mbc", explicit_hessian(f), d)
    torch.testing.assert_close(grad, expected, **TIGHT)


@pytest.mark.parametrize("name", ["gncl", "gncl-masked", "balanced"])
def test_geometric_consensus_equals_average_for_every_loss(name):
    # the module docstring: geometric f = average f - a per-sample constant; D annihilates it
    # (gncl) and the softmax of the ensemble cross-entropy is blind to it (balanced)
    logits, target = _logits(3, 5, 4, seed=5)
    with torch.no_grad():
        logits[0, torch.arange(5), target] += 3.0  # some members right, so the mask is not empty
    avg, _ = build_loss(name, lam=0.6, consensus="average")(logits, target)
    geo, _ = build_loss(name, lam=0.6, consensus="geometric")(logits, target)
    _assert_same(geo, avg, logits)
    for other in ("median", "vote"):  # a real change of rule does change the loss
        loss, _ = build_loss(name, lam=0.6, consensus=other)(logits, target)
        assert abs(float((loss - avg).detach())) > 1e-4


def test_gncl_lambda_zero_is_independent():
    logits, target = _logits(3, 5, 4, seed=6)
    for rule in CONSENSUS_CHOICES:
        loss, _ = build_loss("gncl", lam=0.0, consensus=rule)(logits, target)
        _assert_same(loss, build_loss("independent")(logits, target)[0], logits)


# --- gncl-masked -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", CONSENSUS_CHOICES)
@pytest.mark.parametrize("size", SIZES)
def test_gncl_masked_drops_the_penalty_of_wrong_members(size, rule):
    logits, target = _logits(*size, seed=7)
    m, b, c = size
    # make the mask non-trivial: member 0 right on every sample, member 1 wrong on every sample
    with torch.no_grad():
        logits[0, torch.arange(b), target] += 10.0
        logits[1, torch.arange(b), target] -= 10.0
    values = logits.detach().tolist()
    mask = torch.tensor([[1.0 if max(range(c), key=lambda k: values[i][s][k]) == int(target[s])
                          else 0.0 for s in range(b)] for i in range(m)], dtype=torch.float64)
    assert mask[0].all() and not mask[1].any()
    loss, _ = build_loss("gncl-masked", lam=0.8, consensus=rule)(logits, target)
    _assert_same(loss, naive_gncl(logits, target, 0.8, rule, mask=mask), logits)
    unmasked, _ = build_loss("gncl", lam=0.8, consensus=rule)(logits, target)
    assert abs(float((loss - unmasked).detach())) > 1e-6


def test_gncl_masked_with_every_member_wrong_is_independent():
    logits, target = _logits(3, 5, 4, seed=8)
    with torch.no_grad():
        logits[:, torch.arange(5), target] -= 20.0  # no member predicts the label anywhere
    loss, terms = build_loss("gncl-masked", lam=1.0)(logits, target)
    _assert_same(loss, build_loss("independent")(logits, target)[0], logits)
    assert terms["penalty"] == 0.0


# --- balanced --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", CONSENSUS_CHOICES)
@pytest.mark.parametrize("size", SIZES)
def test_balanced_is_eq3(size, rule):
    logits, target = _logits(*size, seed=9)
    m, b, _ = size
    lam = 0.35
    f = naive_consensus(logits, rule)
    ensemble_ce = sum(-F.log_softmax(f[s], dim=-1)[target[s]] for s in range(b)) / b
    ref = lam * ensemble_ce + (1 - lam) / m * sum(naive_member_ce(logits, target))
    loss, terms = build_loss("balanced", lam=lam, consensus=rule)(logits, target)
    _assert_same(loss, ref, logits)
    assert terms["ensemble_ce"] == pytest.approx(float(ensemble_ce.detach()), rel=1e-10)


def test_balanced_endpoints():
    logits, target = _logits(3, 5, 4, seed=10)
    zero, _ = build_loss("balanced", lam=0.0)(logits, target)
    _assert_same(zero, build_loss("independent")(logits, target)[0] / 3, logits)
    one, _ = build_loss("balanced", lam=1.0, consensus="geometric")(logits, target)
    _assert_same(one, F.cross_entropy(naive_consensus(logits, "geometric"), target), logits)


def test_member_cross_entropy_is_per_member_mean():
    logits, target = _logits(4, 5, 4, seed=11)
    torch.testing.assert_close(member_cross_entropy(logits, target),
                               torch.stack(naive_member_ce(logits, target)), **TIGHT)


# --- attribution -----------------------------------------------------------------------------


def _tiny_models(m=3, classes=5, seed=0):
    models = []
    for i in range(m):
        torch.manual_seed(seed + i)
        models.append(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(),
                                    nn.Linear(16, classes)).double())
    return models


def _batch(seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, torch.randint(0, classes, (4,), generator=g)


def naive_attribution(models, x, y, lam, normalize):
    """1/M sum_i CE_i - lambda A, A the batch mean of the per-pixel population variance across
    members of |Saliency|, each map l2-normalised first when asked."""
    maps, ces = [], []
    for model in models:
        out = model(x)
        ces.append(F.cross_entropy(out, y))
        (grad,) = torch.autograd.grad(out[torch.arange(len(y)), y].sum(), x, create_graph=True)
        a = grad.abs().reshape(len(y), -1)  # (B, D)
        if normalize == "l2":
            a = a / a.square().sum(dim=1, keepdim=True).sqrt()
        maps.append(a)
    mean = sum(maps) / len(maps)
    variance = sum((a - mean) ** 2 for a in maps) / len(maps)  # (B, D), ddof 0
    diversity = variance.sum(dim=1).mean()
    return sum(ces) / len(ces) - lam * diversity, diversity


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_attribution_is_eq8_with_double_backprop(normalize, m):
    models = _tiny_models(m)
    params = [p for model in models for p in model.parameters()]
    x, y = _batch()
    lam = 0.9 if normalize == "l2" else 30.0  # raw maps are small: a lambda that matters
    loss_fn = build_loss("attribution", lam=lam, normalize=normalize)
    loss, terms = loss_fn(torch.stack([model(x) for model in models]), y, inputs=x)
    ref, diversity = naive_attribution(models, x, y, lam, normalize)
    torch.testing.assert_close(loss, ref, **TIGHT)
    assert terms["attribution_diversity"] == pytest.approx(float(diversity.detach()), rel=1e-10)
    assert float(diversity.detach()) > 0 and terms["lambda_effective"] == lam
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TIGHT)
    # the diversity term itself carries gradient (double backprop reached the parameters)
    ce_only = torch.autograd.grad(naive_attribution(models, x, y, 0.0, normalize)[0], params)
    assert max(float((a - b).abs().max()) for a, b in zip(grads, ce_only)) > 1e-8


def test_attribution_warmup_ramps_lambda():
    models = _tiny_models(2)
    x, y = _batch(seed=1)
    loss_fn = AttributionLoss(lam=0.4, normalize="l2", warmup_epochs=2)
    ce = sum(F.cross_entropy(model(x), y) for model in models) / 2
    for epoch, expected in [(0, 0.0), (1, 0.2), (2, 0.4), (5, 0.4)]:
        loss_fn.set_epoch(epoch)
        assert loss_fn.effective_lambda() == pytest.approx(expected)
        loss, terms = loss_fn(torch.stack([model(x) for model in models]), y, inputs=x)
        assert terms["lambda_effective"] == pytest.approx(expected)
        ref, _ = naive_attribution(models, x, y, expected, "l2")
        torch.testing.assert_close(loss, ref, **TIGHT)
        if epoch == 0:
            torch.testing.assert_close(loss, ce, **TIGHT)


def test_attribution_needs_inputs_that_require_grad():
    models = _tiny_models(2)
    x, y = _batch()
    logits = torch.stack([model(x) for model in models])
    loss_fn = build_loss("attribution")
    assert loss_fn.needs_inputs
    with pytest.raises(DivfastError, match="inputs") as info:
        loss_fn(logits, y)
    assert "requires_grad" in str(info.value)
    with pytest.raises(DivfastError, match="inputs"):
        loss_fn(logits, y, inputs=x.detach())


# --- every member receives gradient ----------------------------------------------------------


LOSSES = [("independent", {}), ("balanced", {"lam": 0.5}), ("gncl-masked", {"lam": 0.5}),
          ("attribution", {"lam": 0.5})] + [("gncl", {"lam": 0.5, "consensus": rule})
                                           for rule in CONSENSUS_CHOICES] + \
         [("balanced", {"lam": 0.5, "consensus": rule}) for rule in ("median", "vote", "geometric")]


@pytest.mark.parametrize("name,options", LOSSES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(str(x) for x in v.values()))
def test_every_member_receives_gradient(name, options):
    ensemble = Ensemble(_tiny_models(3, seed=20))
    x, y = _batch(seed=2)
    loss, _ = build_loss(name, **options)(ensemble(x), y, inputs=x)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    for i, member in enumerate(ensemble.members):
        total = sum(float(p.grad.abs().sum()) for p in member.parameters() if p.grad is not None)
        assert total > 0, f"member {i} received no gradient from {name} {options}"
    if name != "attribution":  # and on the logits directly
        logits, target = _logits(3, 5, 4, seed=12)
        (grad,) = torch.autograd.grad(build_loss(name, **options)(logits, target)[0], logits)
        assert (grad.abs().sum(dim=(1, 2)) > 0).all()


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,lam", [("gncl", 1.5), ("gncl", -0.1), ("gncl", float("nan")),
                                      ("gncl-masked", 2.0), ("balanced", -1e-9),
                                      ("balanced", 1.01), ("balanced", float("inf")),
                                      ("attribution", -0.5), ("attribution", float("nan"))])
def test_lambda_out_of_range(name, lam):
    with pytest.raises(DivfastError, match="--lambda"):
        build_loss(name, lam=lam)


def test_lambda_in_range():
    for name in ("gncl", "gncl-masked", "balanced"):
        for lam in (0.0, 1.0):
            assert build_loss(name, lam=lam).lam == lam
    assert build_loss("attribution", lam=50.0).lam == 50.0  # no upper bound


@pytest.mark.parametrize("name", ["gncl", "gncl-masked", "balanced"])
def test_unknown_consensus_lists_the_valid_ones(name):
    with pytest.raises(DivfastError, match="--consensus") as info:
        build_loss(name, consensus="mean")
    assert all(rule in str(info.value) for rule in CONSENSUS_CHOICES)
    with pytest.raises(DivfastError, match="--consensus"):
        consensus_logits(torch.zeros(2, 3, 4), "mean")


def test_loss_options():
    with pytest.raises(DivfastError, match="--lambda"):
        loss_options("independent", lam=0.5)
    with pytest.raises(DivfastError, match="--consensus"):
        loss_options("attribution", consensus="vote")
    assert loss_options("gncl", lam=0.3, consensus="vote", normalize="l2",
                        warmup_epochs=0) == {"lam": 0.3, "consensus": "vote"}
    assert loss_options("independent", lam=0.2, consensus="average") == {}
    with pytest.raises(DivfastError, match="--loss"):
        loss_options("nope")


@pytest.mark.parametrize("name", ["independent", "gncl", "gncl-masked", "balanced"])
def test_bad_shapes_name_the_argument(name):
    loss_fn = build_loss(name)
    target = torch.zeros(5, dtype=torch.long)
    with pytest.raises(DivfastError, match="logits"):
        loss_fn(torch.zeros(5, 4), target)  # (B, C): the member axis is missing
    with pytest.raises(DivfastError, match="logits"):
        loss_fn(torch.zeros(1, 3, 5, 4), target)
    with pytest.raises(DivfastError, match="target"):
        loss_fn(torch.zeros(3, 5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DivfastError, match="target"):
        loss_fn(torch.zeros(3, 5, 4), torch.zeros(5, 1, dtype=torch.long))
