"""Prediction diversity: the functional against a brute-force oracle, then the stateful metric.

The oracle below is written from Kuncheva & Whitaker (2003), "Measures of diversity in classifier
ensembles and their relationship with the ensemble accuracy", and from the conventions in the
docstring of divfast/functional/prediction.py, with plain Python/NumPy loops over pairs and samples.
It shares no code with the library (not even the argmax: NumPy's, which also takes the first
maximum).
"""

import math
import os
import socket
import tempfile
from collections import Counter

import numpy as np
import pytest
import torch

from divfast.functional import prediction_diversity
from divfast.functional.prediction import MEASURES, NON_PAIRWISE, PAIRWISE
from divfast.metrics import PredictionDiversity

NAN = float("nan")


# --- the oracle --------------------------------------------------------------------------------


def _nan_div(num, den):
    return num / den if den != 0 else NAN


def _nanmean(values):
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else NAN


def _softmax(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def oracle(predictions, target, num_classes=None):
    """Every measure of ``prediction_diversity`` by brute force, from the definitions."""
    pred = predictions.detach().cpu()
    is_logits = pred.dim() == 3
    x = pred.double().numpy() if is_logits else pred.numpy()
    y = [int(v) for v in target.cpu()]
    m, n = x.shape[0], x.shape[1]
    labels = [[int(np.argmax(x[i, j])) if is_logits else int(x[i, j]) for j in range(n)]
              for i in range(m)]
    correct = [[labels[i][j] == y[j] for j in range(n)] for i in range(m)]

    # Pairwise measures, every ordered pair (the diagonal included: it is defined too).
    pw = {name: np.full((m, m), NAN) for name in PAIRWISE}
    for i in range(m):
        for k in range(m):
            n11 = n10 = n01 = n00 = same = 0
            for j in range(n):
                a, b = correct[i][j], correct[k][j]
                n11 += a and b
                n10 += a and not b
                n01 += (not a) and b
                n00 += (not a) and (not b)
                same += labels[i][j] == labels[k][j]
            pw["disagreement"][i, k] = _nan_div(n01 + n10, n)
            pw["q_statistic"][i, k] = _nan_div(n11 * n00 - n01 * n10, n11 * n00 + n01 * n10)
            den = math.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
            pw["correlation"][i, k] = _nan_div(n11 * n00 - n01 * n10, den)
            pw["double_fault"][i, k] = _nan_div(n00, n)
            pw["label_disagreement"][i, k] = _nan_div(n - same, n)
            if is_logits and n:
                kl = cos = 0.0
                for j in range(n):
                    p, q = _softmax(x[i, j]), _softmax(x[k, j])
                    kl += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)
                    cos += float(p @ q) / (math.sqrt(float(p @ p)) * math.sqrt(float(q @ q)))
                pw["kl"][i, k] = kl / n
                pw["cosine"][i, k] = cos / n

    out = {"n_samples": n, "n_members": m, "pairwise": pw}
    for name in PAIRWISE:
        if name == "kl":  # ordered pairs i != k (KL is not symmetric)
            out[name] = _nanmean([pw[name][i, k] for i in range(m) for k in range(m) if i != k])
        else:
            out[name] = _nanmean([pw[name][i, k] for i in range(m) for k in range(i + 1, m)])

    # Non-pairwise measures: l(z_j) = number of members right on sample j, L = m.
    big_l = m
    l = [sum(correct[i][j] for i in range(m)) for j in range(n)]
    if n == 0:
        out.update({name: NAN for name in NON_PAIRWISE})
    else:
        out["kohavi_wolpert"] = sum(lj * (big_l - lj) for lj in l) / (n * big_l**2)
        xs = [lj / big_l for lj in l]
        mean_x = sum(xs) / n
        out["difficulty"] = sum((v - mean_x) ** 2 for v in xs) / n
        if big_l == 1:
            out.update(entropy=NAN, kappa=NAN, generalized_diversity=NAN, coincident_failure=NAN)
        else:
            out["entropy"] = (sum(min(lj, big_l - lj) for lj in l)
                              / (n * (big_l - math.ceil(big_l / 2))))
            p_bar = sum(l) / (n * big_l)
            out["kappa"] = 1 - _nan_div(sum(lj * (big_l - lj) for lj in l) / big_l,
                                        n * (big_l - 1) * p_bar * (1 - p_bar))
            fails = [big_l - lj for lj in l]
            p = [sum(f == i for f in fails) / n for i in range(big_l + 1)]  # p_i: exactly i fail
            p1 = sum(i / big_l * p[i] for i in range(big_l + 1))
            p2 = sum(i * (i - 1) / (big_l * (big_l - 1)) * p[i] for i in range(big_l + 1))
            out["generalized_diversity"] = 1 - _nan_div(p2, p1)
            if p[0] == 1:
                out["coincident_failure"] = 0.0
            else:
                out["coincident_failure"] = sum(
                    (big_l - i) / (big_l - 1) * p[i] for i in range(1, big_l + 1)) / (1 - p[0])

    # Ensemble prediction: mean-logit argmax, or plurality vote with ties to the smallest label.
    ens = []
    for j in range(n):
        if is_logits:
            ens.append(int(np.argmax(x[:, j].mean(axis=0))))
        else:
            votes = Counter(labels[i][j] for i in range(m))
            top = max(votes.values())
            ens.append(min(lab for lab, v in votes.items() if v == top))
    ens_right = [ens[j] == y[j] for j in range(n)]
    out["member_accuracy"] = [sum(c) / n if n else NAN for c in correct]
    out["ensemble_accuracy"] = sum(ens_right) / n if n else NAN

    # Shannon equitability per sample, species = distinct predicted labels, S = min(M, C).
    c_known = x.shape[2] if is_logits else num_classes
    s = min(m, c_known) if c_known else m
    right, wrong = [], []
    for j in range(n):
        counts = Counter(labels[i][j] for i in range(m))
        h = -sum(v / m * math.log(v / m) for v in counts.values())
        e = h / math.log(s) if s > 1 else NAN
        (right if ens_right[j] else wrong).append(e)
    out["equitability_correct"] = sum(right) / len(right) if right and s > 1 else NAN
    out["equitability_incorrect"] = sum(wrong) / len(wrong) if wrong and s > 1 else NAN
    return out


# The ensemble-level ``kl`` is the mean over ordered pairs i != k (KL is not symmetric).
ORACLE_SKIP = ()


def assert_close(got, want, rtol=1e-9, atol=1e-12, pairwise=True, skip=ORACLE_SKIP):
    assert got["n_samples"] == want["n_samples"]
    assert got["n_members"] == want["n_members"]
    for name in MEASURES + ("ensemble_accuracy",):
        if name in skip:
            continue
        g, w = got[name], want[name]
        assert isinstance(g, float), (name, type(g))
        if math.isnan(w):
            assert math.isnan(g), f"{name}: got {g}, want NaN"
        else:
            assert g == pytest.approx(w, rel=rtol, abs=atol), f"{name}: got {g!r}, want {w!r}"
    np.testing.assert_allclose(got["member_accuracy"], want["member_accuracy"], rtol=rtol,
                               atol=atol)
    if pairwise:
        assert set(got["pairwise"]) == set(PAIRWISE)
        for name in PAIRWISE:
            g = got["pairwise"][name]
            assert g.dtype == torch.float64 and g.shape == (want["n_members"],) * 2, name
            np.testing.assert_allclose(g.numpy(), want["pairwise"][name], rtol=rtol, atol=atol,
                                       equal_nan=True, err_msg=name)


def assert_same_result(got, want):
    """Two library results on the same data (e.g. streamed vs functional): equal up to rounding."""
    assert_close(got, want | {"pairwise": {k: v.numpy() for k, v in want["pairwise"].items()}},
                 skip=())


# --- inputs ------------------------------------------------------------------------------------


def make_logits(m, n, c, gen, dtype=torch.float64, skill=1.5):
    """Logits whose members are right often enough that every contingency cell is populated."""
    target = torch.randint(0, c, (n,), generator=gen)
    x = torch.randn(m, n, c, generator=gen, dtype=torch.float64)
    boost = skill * torch.rand(m, n, generator=gen, dtype=torch.float64)
    x[:, torch.arange(n), target] += boost
    return x.to(dtype), target


def make_labels(m, n, c, gen, p_right=0.5):
    target = torch.randint(0, c, (n,), generator=gen)
    labels = torch.randint(0, c, (m, n), generator=gen)
    right = torch.rand(m, n, generator=gen) < p_right
    return torch.where(right, target.expand(m, n), labels), target


# --- functional vs oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("m,n,c", [(2, 50, 3), (5, 120, 7), (4, 33, 2), (3, 40, 12)])
def test_logits_vs_oracle(gen, m, n, c):
    x, t = make_logits(m, n, c, gen)
    got = prediction_diversity(x, t)
    assert_close(got, oracle(x, t))
    assert_close(prediction_diversity(x, t, num_classes=c), oracle(x, t, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits_vs_oracle(gen, dtype):
    x, t = make_logits(4, 80, 6, gen, dtype=dtype)
    # The oracle widens the same low-precision values to float64, so the sums agree closely.
    assert_close(prediction_diversity(x, t), oracle(x, t), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("m,n,c,num_classes", [
    (4, 150, 6, 6), (6, 90, 3, 3), (6, 90, 3, None), (3, 60, 10, None), (2, 40, 2, 2),
    (7, 50, 4, 9),
])
def test_labels_vs_oracle(gen, m, n, c, num_classes):
    labels, t = make_labels(m, n, c, gen)
    got = prediction_diversity(labels, t, num_classes=num_classes)
    want = oracle(labels, t, num_classes)
    assert_close(got, want)
    assert math.isnan(got["kl"]) and math.isnan(got["cosine"])
    assert torch.isnan(got["pairwise"]["kl"]).all() and torch.isnan(got["pairwise"]["cosine"]).all()


def test_plurality_vote_ties_go_to_smallest_label():
    # Sample 0: votes {2: 2, 1: 2} -> 1; sample 1: {0, 1, 2, 3} once each -> 0;
    # sample 2: {3: 3, 0: 1} -> 3.
    labels = torch.tensor([[2, 3, 3], [1, 2, 3], [2, 1, 3], [1, 0, 0]])
    for t, acc in ((torch.tensor([1, 0, 3]), 1.0), (torch.tensor([2, 3, 0]), 0.0)):
        got = prediction_diversity(labels, t, num_classes=4)
        assert got["ensemble_accuracy"] == acc
        assert_close(got, oracle(labels, t, 4))


def test_ties_in_logits_take_the_first_maximum(gen):
    # Few distinct values: member argmaxes and the mean-logit argmax tie often.
    x = torch.randint(-1, 2, (5, 200, 4), generator=gen).double()
    t = torch.randint(0, 4, (200,), generator=gen)
    assert_close(prediction_diversity(x, t), oracle(x, t))


# The ensemble's mean logits keep float64 precision: logits that differ below float32 resolution
# (or overflow it) must not tie.
@pytest.mark.parametrize("row", [[1.0, 1.0 + 1e-12], [1e39, 2e39]], ids=["close", "huge"])
def test_ensemble_vote_keeps_float64_precision(row):
    x = torch.tensor([[row]], dtype=torch.float64)  # (M=1, N=1, C=2): the member says class 1
    t = torch.tensor([1])
    got = prediction_diversity(x, t)
    assert got["member_accuracy"] == [1.0]
    assert got["ensemble_accuracy"] == 1.0


def test_equitability_hand_example():
    # M = 3, C = 3 (S = 3): all agree -> 0, all differ -> 1, two agree -> H(2/3, 1/3) / ln 3.
    labels = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 2, 1]])
    t = torch.tensor([0, 2, 1])  # vote: 0 (right), 0 (wrong: tie -> smallest), 0 (wrong)
    got = prediction_diversity(labels, t, num_classes=3)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    assert got["equitability_correct"] == pytest.approx(0.0, abs=1e-15)
    assert got["equitability_incorrect"] == pytest.approx((1.0 + h) / 2, rel=1e-12)
    # With only two classes, S = min(3, 2) = 2: two species out of three members.
    got = prediction_diversity(torch.tensor([[0], [0], [1]]), torch.tensor([0]), num_classes=2)
    h2 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)
    assert got["equitability_correct"] == pytest.approx(h2, rel=1e-12)
    assert math.isnan(got["equitability_incorrect"])


@pytest.mark.parametrize("m,n,c", [(2, 50, 3), (5, 120, 7)])
def test_ensemble_kl_vs_oracle(gen, m, n, c):
    x, t = make_logits(m, n, c, gen)
    assert_close(prediction_diversity(x, t), oracle(x, t), skip=())


def test_kl_is_the_mean_over_ordered_pairs():
    # Two members, one sample: KL(p0 || p1) != KL(p1 || p0); the ensemble value is their mean.
    x = torch.tensor([[[2.0, 0.0, -1.0]], [[0.0, 0.0, 0.0]]], dtype=torch.float64)
    t = torch.tensor([0])
    p, q = _softmax(x[0, 0].numpy()), _softmax(x[1, 0].numpy())
    kl_pq = float(np.sum(p * np.log(p / q)))
    kl_qp = float(np.sum(q * np.log(q / p)))
    assert abs(kl_pq - kl_qp) > 1e-3
    got = prediction_diversity(x, t)
    assert got["pairwise"]["kl"][0, 1].item() == pytest.approx(kl_pq, rel=1e-12)
    assert got["pairwise"]["kl"][1, 0].item() == pytest.approx(kl_qp, rel=1e-12)
    assert got["kl"] == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-12)


@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_single_member(gen, kind):
    if kind == "logits":
        x, t = make_logits(1, 40, 5, gen)
    else:
        x, t = make_labels(1, 40, 5, gen)
    got = prediction_diversity(x, t, num_classes=5)
    want = oracle(x, t, 5)
    assert_close(got, want)
    for name in PAIRWISE + ("entropy", "kappa", "generalized_diversity", "coincident_failure",
                            "equitability_correct", "equitability_incorrect"):
        assert math.isnan(got[name]), name
    assert not math.isnan(got["kohavi_wolpert"]) and not math.isnan(got["difficulty"])
    assert got["kohavi_wolpert"] == 0.0  # l(L - l) = 0 when L = 1
    assert got["member_accuracy"][0] == got["ensemble_accuracy"]


def test_undefined_q_pairs_are_left_out(gen):
    m, n, c = 4, 80, 5
    labels, t = make_labels(m, n, c, gen)
    labels[0] = t  # member 0 always right: N01 = N00 = 0 for its pairs, Q and rho are 0/0
    got = prediction_diversity(labels, t, num_classes=c)
    assert_close(got, oracle(labels, t, c))
    q = got["pairwise"]["q_statistic"]
    rho = got["pairwise"]["correlation"]
    assert torch.isnan(q[0, 1:]).all() and torch.isnan(q[1:, 0]).all()
    assert torch.isnan(rho[0, 1:]).all()
    rest = [q[i, k].item() for i in range(1, m) for k in range(i + 1, m)]
    assert not any(math.isnan(v) for v in rest)
    assert got["q_statistic"] == pytest.approx(sum(rest) / len(rest), rel=1e-12)
    # Disagreement and double fault stay defined for those pairs.
    assert not torch.isnan(got["pairwise"]["disagreement"]).any()
    assert not torch.isnan(got["pairwise"]["double_fault"]).any()


def test_all_members_always_right(gen):
    m, n, c = 3, 30, 4
    t = torch.randint(0, c, (n,), generator=gen)
    labels = t.expand(m, n).clone()
    got = prediction_diversity(labels, t, num_classes=c)
    assert_close(got, oracle(labels, t, c))
    assert math.isnan(got["q_statistic"]) and math.isnan(got["correlation"])
    assert got["disagreement"] == 0.0 and got["double_fault"] == 0.0
    assert math.isnan(got["kappa"]) and math.isnan(got["generalized_diversity"])
    assert got["coincident_failure"] == 0.0
    assert got["equitability_correct"] == 0.0 and math.isnan(got["equitability_incorrect"])


def test_all_members_always_wrong(gen):
    m, n, c = 4, 30, 5
    t = torch.randint(0, c, (n,), generator=gen)
    labels = (t + 1 + torch.randint(0, c - 1, (m, n), generator=gen)) % c
    got = prediction_diversity(labels, t, num_classes=c)
    assert_close(got, oracle(labels, t, c))
    assert got["double_fault"] == 1.0 and got["generalized_diversity"] == 0.0
    assert got["coincident_failure"] == 0.0 and math.isnan(got["kappa"])


@pytest.mark.parametrize("kind", ["logits", "labels"])
@pytest.mark.parametrize("m", [1, 3])
def test_no_samples(kind, m):
    if kind == "logits":
        x = torch.zeros(m, 0, 4, dtype=torch.float64)
    else:
        x = torch.zeros(m, 0, dtype=torch.long)
    t = torch.zeros(0, dtype=torch.long)
    got = prediction_diversity(x, t, num_classes=4)
    assert got["n_samples"] == 0 and got["n_members"] == m
    for name in MEASURES + ("ensemble_accuracy",):
        assert math.isnan(got[name]), name
    assert all(math.isnan(v) for v in got["member_accuracy"])
    assert_close(got, oracle(x, t, 4))


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_names_the_argument(gen):
    x, t = make_logits(3, 20, 4, gen)
    labels, _ = make_labels(3, 20, 4, gen)
    nan_x = x.clone()
    nan_x[1, 7, 2] = NAN
    cases = [
        ((x, t[:19]), {}, "target"),
        ((x[:, :19], t), {}, "target"),
        ((labels, t[:5]), {}, "target"),
        ((x, t[None]), {}, "target"),
        ((x[0, 0], t[:4]), {}, "predictions"),
        ((x[None], t), {}, "predictions"),
        ((nan_x, t), {}, "predictions"),
        ((nan_x.float(), t), {}, "predictions"),
        ((x, t), {"num_classes": 5}, "num_classes"),
        ((labels, t), {"num_classes": 3}, None),  # may name predictions or target (both invalid)
        ((labels + 4, t + 4), {"num_classes": 4}, None),
        ((labels.clamp_max(2), t), {"num_classes": 3}, "target"),
        ((labels.clamp_max(2) - 1, t.clamp_max(2)), {"num_classes": 3}, "predictions"),
        ((x, t + 4), {}, "target"),
        ((x, -t - 1), {}, "target"),
    ]
    for args, kwargs, name in cases:
        with pytest.raises(ValueError) as info:
            prediction_diversity(*args, **kwargs)
        msg = str(info.value)
        if name is None:
            assert "`predictions`" in msg or "`target`" in msg, msg
        else:
            assert f"`{name}`" in msg, (name, msg)


def test_metric_bad_input(gen):
    with pytest.raises(ValueError, match="num_members"):
        PredictionDiversity(num_members=0)
    x, t = make_logits(3, 20, 4, gen)
    metric = PredictionDiversity(num_members=4)
    with pytest.raises(ValueError, match="`predictions`"):
        metric.update(x, t)
    metric = PredictionDiversity()
    metric.update(x, t)
    with pytest.raises(ValueError, match="`predictions`"):
        metric.update(x[:2], t)
    nan_x = x.clone()
    nan_x[0, 0, 0] = NAN
    with pytest.raises(ValueError, match="`predictions`"):
        metric.update(nan_x, t)
    with pytest.raises(ValueError, match="`target`"):
        metric.update(x, t[:3])
    # A failed update leaves the state as it was.
    assert_same_result(metric.compute(), prediction_diversity(x, t))
    other = PredictionDiversity()
    other.update(x[:2], t)
    with pytest.raises(ValueError):
        metric.merge(other)
    with pytest.raises(RuntimeError):
        PredictionDiversity().compute()


# --- the stateful metric -----------------------------------------------------------------------


def make_inputs(kind, m, n, c, gen):
    """Logits (num_classes from their width) or labels (num_classes given): (x, t, num_classes)."""
    if kind == "logits":
        return (*make_logits(m, n, c, gen), None)
    return (*make_labels(m, n, c, gen), c)


def split(n, sizes):
    assert sum(sizes) == n
    bounds = np.cumsum([0] + list(sizes))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_uneven_batches_equal_functional(gen, kind):
    m, n, c = 4, 301, 6
    x, t, nc = make_inputs(kind, m, n, c, gen)
    want = prediction_diversity(x, t, num_classes=nc)
    for num_members in (None, m):
        metric = PredictionDiversity(num_members=num_members, num_classes=nc)
        for s in split(n, [0, 1, 63, 100, 137, 0]):
            metric.update(x[:, s], t[s])
        got = metric.compute()
        assert_same_result(got, want)
        assert_close(got, oracle(x, t, nc))
        # compute() does not consume the state; reset() empties it.
        assert_same_result(metric.compute(), want)
        metric.reset()
        metric.update(x[:, :50], t[:50])
        want_head = prediction_diversity(x[:, :50], t[:50], num_classes=nc)
        assert_same_result(metric.compute(), want_head)


def shard_metrics(x, t, nc, m):
    """Four uneven shards (one fed only an empty batch), plus two that never saw an update."""
    n = x.shape[1]
    shards = []
    for s in split(n, [n // 2, n - n // 2 - 7, 7]):
        metric = PredictionDiversity(num_classes=nc)
        half = s.start + (s.stop - s.start) // 3
        metric.update(x[:, s.start:half], t[s.start:half])
        metric.update(x[:, half:s.stop], t[half:s.stop])
        shards.append(metric)
    empty_batch = PredictionDiversity(num_members=m, num_classes=nc)
    empty_batch.update(x[:, :0], t[:0])
    never_sized = PredictionDiversity(num_members=m, num_classes=nc)
    never_unsized = PredictionDiversity(num_classes=nc)
    return shards + [empty_batch, never_sized, never_unsized]


@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_shards_merge_to_whole(gen, kind):
    m, n, c = 5, 257, 4
    x, t, nc = make_inputs(kind, m, n, c, gen)
    want = prediction_diversity(x, t, num_classes=nc)
    shards = shard_metrics(x, t, nc, m)
    for order in (range(len(shards)), reversed(range(len(shards)))):
        order = list(order)
        total = PredictionDiversity(num_classes=nc)
        for i in order:
            total.merge(shards[i])
        assert_same_result(total.compute(), want)
    # Merging into a shard that never saw data (sized, or not) works the same way.
    for base_index in (-2, -1):
        base = shard_metrics(x, t, nc, m)
        total = base[base_index]
        for i, s in enumerate(base):
            if i != len(base) + base_index:
                total.merge(s)
        assert_same_result(total.compute(), want)


@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_state_dict_round_trip_then_merge(gen, kind, tmp_path):
    m, n, c = 3, 190, 5
    x, t, nc = make_inputs(kind, m, n, c, gen)
    want = prediction_diversity(x, t, num_classes=nc)
    loaded = []
    for i, shard in enumerate(shard_metrics(x, t, nc, m)):
        path = tmp_path / f"shard{i}.pt"
        torch.save(shard.state_dict(), path)
        metric = PredictionDiversity()
        metric.load_state_dict(torch.load(path, weights_only=True))
        loaded.append(metric)
    total = PredictionDiversity()
    for metric in loaded:
        total.merge(metric)
    assert_same_result(total.compute(), want)


# --- two processes over gloo -------------------------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data(kind):
    gen = torch.Generator().manual_seed(99)
    m, n, c = 4, 203, 6
    if kind == "logits":
        x, t = make_logits(m, n, c, gen)
        return x, t, None
    x, t = make_labels(m, n, c, gen)
    return x, t, c


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for kind in ("logits", "labels"):
            x, t, nc = _ddp_data(kind)
            m, n = x.shape[:2]
            idx = torch.tensor(list(range(rank, n, world)))  # rank::world, no padding
            metric = PredictionDiversity(num_members=m, num_classes=nc)
            for chunk in idx.split(37):
                metric.update(x[:, chunk], t[chunk])
            metric.sync()
            torch.save({"result": metric.compute()}, os.path.join(out_dir, f"{kind}_all_{rank}.pt"))
            # Only rank 0 has data: rank 1's shard is empty, so its loader yields no batch at all.
            metric = PredictionDiversity(num_members=m, num_classes=nc)
            if rank == 0:
                metric.update(x[:, :50], t[:50])
            metric.sync()
            torch.save({"result": metric.compute()},
                       os.path.join(out_dir, f"{kind}_rank0only_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


WORLD = 2


@pytest.fixture(scope="module")
def ddp_results():
    """Runs the two gloo processes once; returns {file name: compute() of that rank}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)
        return {name: torch.load(os.path.join(out_dir, name), weights_only=False)["result"]
                for name in os.listdir(out_dir)}


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_ddp_sync_equals_functional(ddp_results, kind):
    x, t, nc = _ddp_data(kind)
    want = prediction_diversity(x, t, num_classes=nc)
    for rank in range(WORLD):
        assert_same_result(ddp_results[f"{kind}_all_{rank}.pt"], want)
    assert_close(ddp_results[f"{kind}_all_0.pt"], oracle(x, t, nc))


# Only rank 0 sees data; after sync() both ranks, including the one that never called update(),
# compute the measures of rank 0's data (equitability included).
@pytest.mark.ddp
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["logits", "labels"])
def test_ddp_sync_when_only_rank0_has_data(ddp_results, kind, rank):
    x, t, nc = _ddp_data(kind)
    assert_same_result(ddp_results[f"{kind}_rank0only_{rank}.pt"],
                       prediction_diversity(x[:, :50], t[:50], num_classes=nc))


# --- review findings: each pins a rule the docstring states ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=str)
def test_non_integer_target_is_a_type_error(gen, dtype):
    x, t = make_logits(2, 3, 4, gen)
    with pytest.raises(TypeError, match="`target`"):
        prediction_diversity(x, t.to(dtype))


@pytest.mark.parametrize("where", ["posinf", "all_neginf"])
def test_undefined_softmax_is_an_error_not_a_dropped_member(gen, where):
    x, t = make_logits(3, 20, 5, gen)
    if where == "posinf":
        x[0, 0, 2] = float("inf")
    else:
        x[2, 4, :] = float("-inf")
    with pytest.raises(ValueError, match="`predictions`"):
        prediction_diversity(x, t)


def test_some_neg_inf_logits_are_fine(gen):
    """-inf entries are masked classes: softmax stays defined, so every measure is finite."""
    x, t = make_logits(3, 20, 5, gen)
    x[:, :, 4] = float("-inf")
    t = t.clamp_max(3)
    d = prediction_diversity(x, t)
    assert math.isfinite(d["kl"]) and math.isfinite(d["cosine"])
    assert_close(d, oracle(x, t))


def test_vote_with_huge_labels_does_not_overflow():
    big = 3 * 2**61
    labels = torch.tensor([[5], [5], [big]])
    t = torch.tensor([big])
    d = prediction_diversity(labels, t)
    assert d["ensemble_accuracy"] == 0.0  # two votes for 5 beat one for the target


def test_state_follows_the_first_batch_device(gen):
    x, t = make_logits(3, 10, 4, gen)
    metric = PredictionDiversity(num_members=3)  # created before any batch: on the CPU
    metric.update(x, t)
    assert metric.state["counts"].device == x.device
    metric.reset()
    assert metric.state["counts"].device == x.device
