"""Training writes what it promises; evaluate() agrees with a direct computation from the logits.

One real training run per session (two resnet10t, one epoch on the embedded digits, a few seconds)
feeds every test here; the overwrite and determinism checks train on eight random images instead.
"""

import json
import math
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from divfast.data import digits_dataset, load_member, load_members
from divfast.ensembles import evaluate
from divfast.ensembles.evaluate import SCHEMA
from divfast.errors import DivfastError
from divfast.functional import prediction_diversity
from divfast.functional.prediction import MEASURES
from divfast.training import TrainConfig, build_loss, list_losses, train_ensemble

# Batch 32 rather than the default 64: one epoch is then ~39 steps, enough to beat chance clearly
# (with 19 steps of 64 the BatchNorm running statistics are still far off and eval accuracy ~0.1).
TRAIN_CFG = TrainConfig(architectures=["resnet10t", "resnet10t"], epochs=1, batch_size=32)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    paths = train_ensemble(TRAIN_CFG, out, progress=False)
    return out, paths


@pytest.fixture(scope="module")
def members(trained):
    return load_members(trained[1])


@pytest.fixture(scope="module")
def test_data():
    return digits_dataset("test")


@pytest.fixture(scope="module")
def logits_and_target(members, test_data):
    """Member logits over the whole test split in one forward pass each: ``(M, N, C)``, ``(N,)``."""
    x, y = test_data.tensors
    with torch.no_grad():
        return torch.stack([m(x) for m in members]), y


@pytest.fixture(scope="module")
def report(members, test_data):
    return evaluate(members, test_data, "clean", batch_size=256, progress=False)


def _tiny_sets(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.rand(n, 3, 32, 32, generator=g),
                          torch.randint(0, 10, (n,), generator=g))
    test = TensorDataset(torch.rand(4, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (4,), generator=g))
    return train, test


def _tiny_cfg(**changes):
    return TrainConfig(**{"architectures": ["resnet10t"], "epochs": 1, "batch_size": 4, **changes})


# --- what training writes ----------------------------------------------------------------------


def test_training_writes_checkpoints_run_and_log(trained):
    out, paths = trained
    names = ["member0-resnet10t.safetensors", "member1-resnet10t.safetensors"]
    assert paths == [os.path.join(out, n) for n in names]
    assert sorted(os.listdir(out)) == sorted(names + ["checkpoints", "log.jsonl", "run.json"])
    # no temp files; the epoch checkpoint holds the members and the optimiser state
    assert os.listdir(os.path.join(out, "checkpoints")) == ["epoch-0001"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "epoch-0001"))) == sorted(
        names + ["state.pt"])

    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["status"] == "done"
    assert run["config"] == json.loads(json.dumps(asdict(TRAIN_CFG)))
    assert run["members"] == paths
    assert len(run["member_accuracy"]) == 2

    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["epoch"] == 1
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert rec["member_accuracy"] == run["member_accuracy"]
    assert rec["ensemble_accuracy"] == run["ensemble_accuracy"]
    assert rec["lr"] == pytest.approx(TRAIN_CFG.lr)


def test_one_epoch_beats_chance(trained, report):
    out, _ = trained
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["ensemble_accuracy"] > 0.2
    assert report["ensemble"]["top1"] > 0.2


def test_checkpoint_provenance_and_normalisation(trained):
    out, paths = trained
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    x, _ = digits_dataset("train").tensors
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    for i, path in enumerate(paths):
        info = load_member(path).info
        assert info.architecture == "resnet10t" and info.num_classes == 10
        assert tuple(info.input_size) == (3, 32, 32)
        assert torch.allclose(torch.tensor(info.mean), mean, atol=1e-5)
        assert torch.allclose(torch.tensor(info.std), std, atol=1e-5)
        prov = info.provenance
        assert prov["loss"] == "independent" and prov["epochs"] == 1 and prov["seed"] == 0
        assert prov["member_index"] == i and prov["batch_size"] == 32
        assert prov["test_accuracy"] == run["member_accuracy"][i]


def test_members_start_from_different_weights(logits_and_target):
    logits, _ = logits_and_target
    assert not torch.equal(logits[0], logits[1])


def test_recorded_accuracy_matches_evaluate(trained, report):
    out, _ = trained
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    member_top1 = [r["top1"] for r in report["members"]]
    assert member_top1 == pytest.approx(run["member_accuracy"], abs=1e-12)
    assert report["ensemble"]["top1"] == pytest.approx(run["ensemble_accuracy"], abs=1e-12)


# --- evaluate() against a direct computation ---------------------------------------------------


def test_report_schema(report, trained):
    assert report["schema"] == SCHEMA == "divfast.eval/1"
    assert report["dataset"] == "clean"
    assert report["n_samples"] == 540 and report["num_classes"] == 10
    assert [r["name"] for r in report["members"]] == ["member0-resnet10t", "member1-resnet10t"]
    assert all(r["architecture"] == "resnet10t" for r in report["members"])
    assert report["ensemble"]["consensus"] == "average"
    assert set(report["diversity"]) >= set(MEASURES)
    assert "pairwise" not in report["diversity"] and "member_accuracy" not in report["diversity"]
    json.dumps(report)  # plain Python types only


def test_member_parameters(report, members):
    for row, m in zip(report["members"], members):
        assert row["parameters"] == sum(p.numel() for p in m.model.parameters())


def test_member_top1_top5_direct(report, logits_and_target):
    logits, y = logits_and_target
    for i, row in enumerate(report["members"]):
        top1 = (logits[i].argmax(-1) == y).sum().item() / len(y)
        top5 = (logits[i].topk(5, dim=-1).indices == y[:, None]).any(-1).sum().item() / len(y)
        assert row["top1"] == top1
        assert row["top5"] == top5


def test_ensemble_is_mean_logit_argmax(report, logits_and_target):
    logits, y = logits_and_target
    mean = logits.mean(0)
    top1 = (mean.argmax(-1) == y).sum().item() / len(y)
    top5 = (mean.topk(5, dim=-1).indices == y[:, None]).any(-1).sum().item() / len(y)
    assert report["ensemble"]["top1"] == top1
    assert report["ensemble"]["top5"] == top5


def test_gain_is_ensemble_minus_best_member(report):
    rows = report["members"]
    best = max(rows, key=lambda r: r["top1"])
    ens = report["ensemble"]
    assert ens["best_member"] == best["name"]
    assert ens["gain_top1"] == ens["top1"] - best["top1"]


def test_diversity_equals_functional(report, logits_and_target):
    logits, y = logits_and_target
    ref = prediction_diversity(logits, y)
    for name in MEASURES:
        assert report["diversity"][name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12,
                                                          nan_ok=True), name
    assert report["diversity"]["ensemble_accuracy"] == ref["ensemble_accuracy"]
    assert report["diversity"]["n_samples"] == 540 and report["diversity"]["n_members"] == 2
    assert set(report["pairwise"]) == set(ref["pairwise"])
    for name, mat in ref["pairwise"].items():
        got = torch.tensor(report["pairwise"][name], dtype=torch.float64)
        assert torch.allclose(got, mat, rtol=1e-9, atol=1e-12, equal_nan=True), name


# Measures that are ratios of int64 counts: identical bits whatever the batching.
_COUNT_MEASURES = ("disagreement", "q_statistic", "correlation", "double_fault", "entropy",
                   "kohavi_wolpert", "kappa", "difficulty", "generalized_diversity",
                   "coincident_failure", "label_disagreement", "ensemble_accuracy")


def test_batch_size_does_not_change_the_report(report, members, test_data):
    small = evaluate(members, test_data, "clean", batch_size=7, progress=False)
    assert small["n_samples"] == report["n_samples"]
    for a, b in zip(small["members"], report["members"]):
        assert a == b
    assert small["ensemble"] == report["ensemble"]
    for name in _COUNT_MEASURES:
        a, b = small["diversity"][name], report["diversity"][name]
        assert a == b or (math.isnan(a) and math.isnan(b)), name
    for name in ("kl", "cosine", "equitability_correct", "equitability_incorrect"):
        assert small["diversity"][name] == pytest.approx(report["diversity"][name], rel=1e-6,
                                                         nan_ok=True), name


def test_member_names_override(members, test_data):
    subset = TensorDataset(*(t[:16] for t in test_data.tensors))
    rep = evaluate(members, subset, "clean", progress=False, member_names=["a", "b"])
    assert [r["name"] for r in rep["members"]] == ["a", "b"]
    assert rep["n_samples"] == 16


def test_evaluate_no_progress_is_silent(members, test_data, capsys):
    subset = TensorDataset(*(t[:8] for t in test_data.tensors))
    evaluate(members, subset, "clean", progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_evaluate_bad_batch_size(members, test_data):
    with pytest.raises(ValueError, match="--batch-size"):
        evaluate(members, test_data, "clean", batch_size=0, progress=False)


def test_evaluate_labels_out_of_range(members):
    ds = TensorDataset(torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="--dataset"):
        evaluate(members, ds, "clean", progress=False)


def test_evaluate_nan_logits_name_the_member(members):
    """A member whose weights are corrupt (NaN) is named in a one-line error, not a kernel message."""
    import copy

    broken = copy.deepcopy(members[1])
    with torch.no_grad():
        next(broken.model.parameters()).fill_(float("nan"))
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"--members: .*NaN or infinite logits") as info:
        evaluate([members[0], broken], ds, "clean", progress=False,
                 member_names=["good", "broken"])
    assert "'broken'" in str(info.value) and "'good'" not in str(info.value)


def test_evaluate_empty_dataset(members):
    ds = TensorDataset(torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        evaluate(members, ds, "clean", progress=False)


# --- the run directory -------------------------------------------------------------------------


def test_a_finished_or_different_run_needs_overwrite(tmp_path):
    train, test = _tiny_sets()
    out = str(tmp_path / "run")
    kw = dict(progress=False, train_set=train, test_set=test)
    train_ensemble(_tiny_cfg(), out, **kw)
    finished = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    with pytest.raises(DivfastError, match="--overwrite"):  # never destroyed by a plain rerun
        train_ensemble(_tiny_cfg(), out, **kw)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == finished
    train_ensemble(_tiny_cfg(), out, overwrite=True, **kw)

    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        before = f.read()
    with pytest.raises(DivfastError) as info:
        train_ensemble(_tiny_cfg(seed=1), out, **kw)
    assert "--overwrite" in str(info.value) and "--out" in str(info.value)
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert f.read() == before  # the refusal touched nothing

    train_ensemble(_tiny_cfg(seed=1), out, overwrite=True, **kw)
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["status"] == "done" and run["config"]["seed"] == 1


def test_training_is_reproducible(tmp_path):
    train, test = _tiny_sets()
    kw = dict(progress=False, train_set=train, test_set=test)
    a = train_ensemble(_tiny_cfg(epochs=2), str(tmp_path / "a"), **kw)
    b = train_ensemble(_tiny_cfg(epochs=2), str(tmp_path / "b"), **kw)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_member(a[0])(x), load_member(b[0])(x))


@pytest.mark.parametrize("changes, flag", [
    ({"epochs": 0}, "--epochs"),
    ({"batch_size": 0}, "--batch-size"),
    ({"batch_size": 1258}, "--batch-size"),
    ({"lr": 0.0}, "--lr"),
    ({"architectures": []}, "--members"),
    ({"loss": "nope"}, "--loss"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, changes, flag):
    out = tmp_path / "run"
    cfg = TrainConfig(**{"architectures": ["resnet10t"], "epochs": 1, **changes})
    with pytest.raises(DivfastError) as info:
        train_ensemble(cfg, str(out), progress=False)
    assert flag in str(info.value)
    assert not out.exists()


def test_batch_size_bound_is_the_training_set_size(tmp_path):
    with pytest.raises(DivfastError, match="1257"):
        train_ensemble(TrainConfig(["resnet10t"], batch_size=5000), str(tmp_path / "r"),
                       progress=False)


def test_unknown_loss_lists_the_valid_ones(tmp_path):
    with pytest.raises(DivfastError) as info:
        train_ensemble(TrainConfig(["resnet10t"], loss="nope"), str(tmp_path / "r"), progress=False)
    assert "independent" in str(info.value)


def test_unknown_architecture(tmp_path):
    with pytest.raises(DivfastError, match="no_such_net"):
        train_ensemble(_tiny_cfg(architectures=["resnet10t", "no_such_net"]),
                       str(tmp_path / "r"), progress=False, train_set=_tiny_sets()[0],
                       test_set=_tiny_sets()[1])


def test_unknown_architecture_leaves_out_dir_untouched(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(DivfastError):
        train_ensemble(_tiny_cfg(architectures=["no_such_net"]), str(out), progress=False,
                       train_set=_tiny_sets()[0], test_set=_tiny_sets()[1])
    assert not (out / "run.json").exists()


# --- the loss registry -------------------------------------------------------------------------


def test_loss_registry():
    assert "independent" in list_losses()
    assert list_losses() == sorted(list_losses())
    with pytest.raises(DivfastError) as info:
        build_loss("nope")
    assert "--loss" in str(info.value) and "independent" in str(info.value)


def test_independent_loss_is_sum_of_member_cross_entropies():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (5,), generator=g)
    loss, terms = build_loss("independent")(logits, target)
    per_member = [F.cross_entropy(logits[i], target) for i in range(3)]
    assert torch.allclose(loss, sum(per_member))
    assert terms["member_ce"] == pytest.approx([float(v.detach()) for v in per_member])
    # each member receives exactly the gradient of its own cross-entropy
    (grad,) = torch.autograd.grad(loss, logits)
    for i in range(3):
        (own,) = torch.autograd.grad(per_member[i], logits, retain_graph=True)
        assert torch.allclose(grad[i], own[i])
        assert float(own[torch.arange(3) != i].abs().max()) == 0.0


# --- members must predict the dataset's classes ----------------------------------------------


def test_trained_members_record_the_class_names(members):
    assert all(m.info.class_names == [str(d) for d in range(10)] for m in members)


def test_member_with_another_class_count_is_refused(members, test_data):
    from divfast.data.members import create_member

    twelve = create_member("resnet10t", 12, name="twelve").eval()
    with pytest.raises(DivfastError, match=r"--members: 'twelve' predicts 12 classes .* has 10"):
        evaluate([twelve], test_data, "clean", progress=False)


def test_member_trained_on_other_class_names_is_refused(members, test_data):
    import copy

    renamed = copy.deepcopy(members[0])
    renamed.info.class_names = [f"c{d}" for d in range(10)]
    with pytest.raises(DivfastError, match="--members: .* was trained on classes"):
        evaluate([renamed], test_data, "clean", progress=False)


def test_top1_follows_argmax_ties_like_the_diversity_counts():
    """Tied logits: top-1 must use torch.argmax's first-max rule (topk may pick another index), so
    the member and ensemble accuracy agree with the diversity counts in the same report."""
    from divfast.data.members import Member, MemberInfo

    class Tied(torch.nn.Module):
        def forward(self, x):  # classes 3 and 7 tie on every sample
            out = torch.zeros(x.shape[0], 10)
            out[:, 3] = out[:, 7] = 1.0
            return out

    info = MemberInfo("tied", 10, (3, 32, 32), (0.0,) * 3, (1.0,) * 3)
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.tensor([3, 3, 3, 7]))
    # attribution="none": these logits do not depend on the pixels, so there is no gradient to take
    report = evaluate([Member(Tied(), info), Member(Tied(), info)], ds, "clean", progress=False,
                      attribution="none")
    assert [row["top1"] for row in report["members"]] == [0.75, 0.75]
    assert report["ensemble"]["top1"] == 0.75 == report["diversity"]["ensemble_accuracy"]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_logits_name_the_member(members, value):
    from divfast.data.members import Member, MemberInfo

    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[0, 1] = value
            return out

    info = MemberInfo("broken", 10, (3, 32, 32), (0.0,) * 3, (1.0,) * 3, name="bad")
    ds = TensorDataset(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(DivfastError, match="--members: 'bad' produced NaN or infinite"):
        evaluate([members[0], Member(Broken(), info)], ds, "clean", progress=False)
