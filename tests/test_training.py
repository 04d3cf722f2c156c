"""The trainer: every loss learns, checkpoints and exact resume (in process and after SIGKILL),
divergence and collapse stop a run keeping the last good epoch, the run-directory rules, the CLI's
training options, and a 2-process gloo DDP run through torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, Subset

from divfast.data.digits import digits_dataset
from divfast.errors import DivfastError
from divfast.training import TrainConfig, TrainingDiverged, train_ensemble
from divfast.training.trainer import _collapsed, completed_epochs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_sets():
    return Subset(digits_dataset("train"), range(256)), Subset(digits_dataset("test"), range(128))


def _cfg(**changes) -> TrainConfig:
    base = {"architectures": ["resnet10t", "resnet10t"], "epochs": 2, "batch_size": 32,
            "loss": "gncl", "loss_options": {"lam": 0.2, "consensus": "average"}}
    return TrainConfig(**{**base, **changes})


def _weights(out: str) -> dict[str, dict[str, torch.Tensor]]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    return {n: load_file(os.path.join(out, n)) for n in names}


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb) and wa
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


@pytest.fixture(scope="module")
def uninterrupted(small_sets, tmp_path_factory):
    """Two epochs straight through: the run every resumed run must reproduce exactly."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    train_ensemble(_cfg(), out, progress=False, train_set=small_sets[0], test_set=small_sets[1],
                   keep_checkpoints=1)
    return out


# --- every loss trains ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss, options", [
    ("independent", {}),
    ("gncl", {"lam": 0.2, "consensus": "average"}),
    ("gncl", {"lam": 0.2, "consensus": "vote"}),
    ("gncl-masked", {"lam": 0.2, "consensus": "average"}),
    ("balanced", {"lam": 0.2, "consensus": "median"}),
    ("attribution", {"lam": 0.2, "normalize": "l2", "warmup_epochs": 0}),
])
def test_one_epoch_on_the_embedded_data_beats_chance(tmp_path, loss, options):
    cfg = TrainConfig(["resnet10t", "resnet10t"], loss=loss, loss_options=options, epochs=1,
                      batch_size=32)
    out = str(tmp_path / "run")
    train_ensemble(cfg, out, progress=False)
    (record,) = _log(out)
    assert record["ensemble_accuracy"] > 0.2  # chance is 0.1
    assert all(a > 0.15 for a in record["member_accuracy"])
    assert len(record["terms"]["member_ce"]) == 2
    if loss.startswith("gncl"):
        assert record["terms"]["penalty"] >= 0.0
    if loss == "attribution":
        assert 0.0 < record["terms"]["attribution_diversity"] < 1.0  # l2-normalised maps


# --- checkpoints and resume -----------------------------------------------------------------------


def test_uninterrupted_run_layout(uninterrupted):
    assert completed_epochs(uninterrupted) == [2]  # keep_checkpoints=1 pruned epoch 1
    folder = os.path.join(uninterrupted, "checkpoints", "epoch-0002")
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)  # safe to load
    assert state["epoch"] == 2 and "state" in state["optimizer"] and "last_epoch" in state["scheduler"]
    _assert_same_weights(folder, uninterrupted)  # the final members are the last epoch's
    with open(os.path.join(uninterrupted, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["status"] == "done" and run["epoch"] == 2 and run["world_size"] == 1
    assert [r["epoch"] for r in _log(uninterrupted)] == [1, 2]


def _interrupted_after_epoch_1(out: str, small_sets) -> dict:
    """Runs _cfg() into ``out`` and stops it with KeyboardInterrupt after epoch 1; returns the
    keyword arguments to resume it with."""
    kw = dict(progress=False, train_set=small_sets[0], test_set=small_sets[1])

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ensemble(_cfg(), out, epoch_callback=interrupt, **kw)
    return kw


def test_resume_after_an_interruption_reproduces_the_run_exactly(uninterrupted, small_sets,
                                                                  tmp_path):
    out = str(tmp_path / "run")
    kw = _interrupted_after_epoch_1(out, small_sets)
    assert completed_epochs(out) == [1]
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["status"] == "interrupted"
    with pytest.raises(DivfastError, match="--resume"):  # the same command again must not restart
        train_ensemble(_cfg(), out, **kw)

    train_ensemble(_cfg(), out, resume=True, **kw)
    _assert_same_weights(out, uninterrupted)
    assert [_without_time(r) for r in _log(out)] == [_without_time(r) for r in _log(uninterrupted)]


def test_resume_after_sigkill_reproduces_the_run_exactly(uninterrupted, tmp_path):
    """A real kill -9 while the second epoch trains; resuming gives the same members bit for bit."""
    out = str(tmp_path / "run")
    marker = str(tmp_path / "epoch2.started")
    script = f"""
import os, time
from torch.utils.data import Dataset, Subset
from divfast.data.digits import digits_dataset
from divfast.training import TrainConfig, train_ensemble
cfg = TrainConfig(["resnet10t", "resnet10t"], epochs=2, batch_size=32, loss="gncl",
                  loss_options={{"lam": 0.2, "consensus": "average"}})
class Held(Dataset):  # after epoch 1, the 40th image of epoch 2 signals and waits for the kill
    armed, fetched = False, 0
    def __init__(self, base):
        self.base = base
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        if self.armed:
            self.fetched += 1
            if self.fetched == 40:
                open({marker!r}, "w").close()
                time.sleep(600)
        return self.base[i]
train = Held(Subset(digits_dataset("train"), range(256)))
def arm(epoch, record):
    train.armed = True
train_ensemble(cfg, {out!r}, progress=False, train_set=train,
               test_set=Subset(digits_dataset("test"), range(128)), epoch_callback=arm)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert proc.poll() is None, "the training process ended before epoch 2"
            assert time.time() < deadline, "epoch 2 never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert completed_epochs(out) == [1]
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]  # nothing final yet
    small = (Subset(digits_dataset("train"), range(256)), Subset(digits_dataset("test"), range(128)))
    train_ensemble(_cfg(), out, resume=True, progress=False, train_set=small[0], test_set=small[1])
    _assert_same_weights(out, uninterrupted)


def test_resume_extends_a_finished_run_and_refuses_other_settings(uninterrupted, small_sets,
                                                                   tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(uninterrupted, out)
    kw = dict(progress=False, train_set=small_sets[0], test_set=small_sets[1])
    with pytest.raises(DivfastError) as info:
        train_ensemble(_cfg(seed=5, epochs=3), out, resume=True, **kw)
    assert "--resume" in str(info.value) and "seed" in str(info.value)

    paths = train_ensemble(_cfg(), out, resume=True, **kw)  # already finished: nothing to train
    _assert_same_weights(out, uninterrupted)
    assert len(paths) == 2

    train_ensemble(_cfg(epochs=3), out, resume=True, **kw)
    assert completed_epochs(out)[-1] == 3
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3]


def test_resume_without_a_checkpoint_is_refused(tmp_path, small_sets):
    with pytest.raises(DivfastError, match="--resume: .* no checkpoint"):
        train_ensemble(_cfg(), str(tmp_path / "empty"), resume=True, progress=False,
                       train_set=small_sets[0], test_set=small_sets[1])


# --- divergence and collapse ----------------------------------------------------------------------


class _Switchable(Dataset):
    """Serves ``base`` unchanged until ``poisoned`` is set, then images filled with ``value``."""

    def __init__(self, base, value: float):
        self.base, self.value, self.poisoned = base, value, False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, self.value) if self.poisoned else x), y


def _poison(dataset: _Switchable):
    def after_epoch(epoch, record):
        dataset.poisoned = True
    return after_epoch


def test_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(small_sets, tmp_path):
    out = str(tmp_path / "run")
    train = _Switchable(small_sets[0], float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        train_ensemble(_cfg(), out, progress=False, train_set=train, test_set=small_sets[1],
                       epoch_callback=_poison(train))
    msg = str(info.value)
    assert "epoch 2, step 1" in msg and "nan" in msg and "last good checkpoint (epoch 1)" in msg
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["status"] == "diverged" and run["epoch"] == 1 and "nan" in run["reason"]
    _assert_same_weights(os.path.join(out, "checkpoints", "epoch-0001"), out)
    assert all(torch.isfinite(t).all() for w in _weights(out).values() for t in w.values())


def test_collapse_to_chance_stops_the_run(tmp_path):
    out = str(tmp_path / "run")
    test = _Switchable(digits_dataset("test"), 0.0)  # blank images after epoch 1: one class wins
    cfg = TrainConfig(["resnet10t"], epochs=2, batch_size=32)
    with pytest.raises(TrainingDiverged, match="collapsed to 0\\.1"):
        train_ensemble(cfg, out, progress=False, test_set=test, epoch_callback=_poison(test))
    assert completed_epochs(out) == [1]
    assert [r["epoch"] for r in _log(out)] == [1]


def test_collapse_rule():
    assert not _collapsed([], 0.1, 10, 500)  # chance from the start is not a collapse
    assert _collapsed([0.6], 0.1, 10, 500)
    assert not _collapsed([0.6], 0.5, 10, 500)
    assert not _collapsed([0.11], 0.1, 10, 500)  # never left the chance band


def test_clip_grad_records_the_norm(small_sets, tmp_path):
    out = str(tmp_path / "run")
    train_ensemble(_cfg(epochs=1, clip_grad=1.0), out, progress=False, train_set=small_sets[0],
                   test_set=small_sets[1])
    (record,) = _log(out)
    assert record["terms"]["grad_norm"] > 0.0


def test_bad_training_settings_name_the_option(tmp_path, small_sets):
    kw = dict(progress=False, train_set=small_sets[0], test_set=small_sets[1])
    for cfg, flag in [(_cfg(clip_grad=0.0), "--clip-grad"), (_cfg(decay_every=0), "--decay-every"),
                      (_cfg(decay_factor=1.5), "--decay-factor"),
                      (_cfg(loss_options={"lam": 1.5}), "--lambda"),
                      (_cfg(loss_options={"consensus": "mode"}), "--consensus")]:
        out = tmp_path / flag.strip("-")
        with pytest.raises(DivfastError, match=flag):
            train_ensemble(cfg, str(out), **kw)
        assert not out.exists()
    with pytest.raises(DivfastError, match="--keep-checkpoints"):
        train_ensemble(_cfg(), str(tmp_path / "k"), keep_checkpoints=-1, **kw)


# --- the command line -----------------------------------------------------------------------------


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "divfast.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, flag", [
    (["--loss", "balanced", "--lambda", "2"], "--lambda"),
    (["--loss", "independent", "--consensus", "vote"], "--consensus"),
    (["--loss", "gncl", "--warmup-epochs", "3"], "--warmup-epochs"),
    (["--resume", "--overwrite"], "--resume"),
    (["--resume"], "--resume"),
    (["--loss", "attribution", "--warmup-epochs", "-1"], "--warmup-epochs"),
])
def test_cli_training_errors(tmp_path, args, flag):
    result = _cli("train", "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and flag in result.stderr
    assert "Traceback" not in result.stderr


# --- two processes through torchrun ---------------------------------------------------------------


@pytest.mark.ddp
def test_torchrun_two_gloo_processes(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "divfast.cli", "train", "--members", "resnet10t,resnet10t", "--epochs", "1",
         "--batch-size", "32", "--loss", "attribution", "--out", out, "--no-progress",
         "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split()
    assert printed == [os.path.join(out, f"member{i}-resnet10t.safetensors") for i in range(2)]
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["status"] == "done" and run["world_size"] == 2
    (record,) = _log(out)
    assert record["ensemble_accuracy"] > 0.2


# --- smaller pieces -------------------------------------------------------------------------------


def test_training_step_under_bfloat16_autocast():
    """The mixed-precision path (CUDA in training; CPU autocast runs the same code here)."""
    import timm.optim

    from divfast.data.members import create_member
    from divfast.training import build_loss
    from divfast.training.trainer import Ensemble, training_step

    torch.manual_seed(0)
    model = Ensemble([create_member("resnet10t", 10) for _ in range(2)])
    opt = timm.optim.AdaBelief(model.parameters(), lr=1e-3)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    for loss in ("balanced", "attribution"):
        value, terms, norm = training_step(model, build_loss(loss), opt, x, y, clip_grad=5.0,
                                           amp=True)
        assert value == value and norm is not None and norm > 0  # finite, clipped
        assert len(terms["member_ce"]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resume_may_add_clipping_and_survives_a_torn_log_line(uninterrupted, small_sets, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(uninterrupted, out)
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"epoch": 3, "loss": 0.')  # a record cut short by a kill
    train_ensemble(_cfg(epochs=3, clip_grad=2.0), out, resume=True, progress=False,
                   train_set=small_sets[0], test_set=small_sets[1])
    records = _log(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["terms"]["grad_norm"] > 0 for r in records)  # logged with or without clipping
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["config"]["clip_grad"] == 2.0
    with pytest.raises(DivfastError, match="--epochs: .* completed 3 epochs"):
        train_ensemble(_cfg(epochs=2, clip_grad=2.0), out, resume=True, progress=False,
                       train_set=small_sets[0], test_set=small_sets[1])


@pytest.mark.ddp
def test_torchrun_nan_on_one_process_stops_every_process(tmp_path):
    """Rank 1 alone sees NaN images: both processes must stop with the divergence message (a rank
    that raised alone would leave the other waiting in the gradient all-reduce)."""
    out = str(tmp_path / "run")
    script = tmp_path / "poisoned.py"
    script.write_text(f"""
import os, torch
from torch.utils.data import Dataset, Subset
from divfast.data.digits import digits_dataset
from divfast.training import TrainConfig, train_ensemble

class Poisoned(Dataset):
    def __init__(self, base):
        self.base = base
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        x, y = self.base[i]
        return (x * float("nan") if os.environ["RANK"] == "1" else x), y

base = Subset(digits_dataset("train"), range(128))
cfg = TrainConfig(["resnet10t"], epochs=1, batch_size=32)
train_ensemble(cfg, {out!r}, progress=False, train_set=Poisoned(base),
               test_set=Subset(digits_dataset("test"), range(64)))
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("training diverged at epoch 1, step 1") == 2, result.stderr[-3000:]
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["status"] == "diverged"


def test_resume_ignores_a_torn_checkpoint_and_a_record_without_one(uninterrupted, small_sets,
                                                                    tmp_path):
    """Killed between the epoch-2 log record and its checkpoint's rename: a record for epoch 2, a
    half-written checkpoints/epoch-0002.tmp. Resuming redoes epoch 2 exactly."""
    out = str(tmp_path / "run")
    kw = _interrupted_after_epoch_1(out, small_sets)
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(_log(uninterrupted)[1], loss=123.0)) + "\n")
    torn = os.path.join(out, "checkpoints", "epoch-0002.tmp")
    os.makedirs(torn)
    with open(os.path.join(torn, "member0-resnet10t.safetensors"), "wb") as f:
        f.write(b"half")
    assert completed_epochs(out) == [1]
    train_ensemble(_cfg(), out, resume=True, **kw)
    _assert_same_weights(out, uninterrupted)
    assert [_without_time(r) for r in _log(out)] == [_without_time(r) for r in _log(uninterrupted)]
    assert not os.path.exists(torn)


def test_members_carry_their_provenance_at_every_checkpoint(uninterrupted):
    from divfast.data.members import read_member_info

    for folder in (uninterrupted, os.path.join(uninterrupted, "checkpoints", "epoch-0002")):
        info = read_member_info(os.path.join(folder, "member1-resnet10t.safetensors"))
        prov = info.provenance
        assert prov["loss"] == "gncl" and prov["epoch"] == 2 and prov["member_index"] == 1
        assert prov["loss_options"] == {"lambda": 0.2, "consensus": "average", "masked": False}


def test_logged_lr_is_the_rate_the_epoch_trained_with(small_sets, tmp_path):
    out = str(tmp_path / "run")
    train_ensemble(_cfg(epochs=2, decay_every=1, decay_factor=0.5), out, progress=False,
                   train_set=small_sets[0], test_set=small_sets[1])
    assert [r["lr"] for r in _log(out)] == pytest.approx([1e-3, 5e-4])


def test_nan_saliency_maps_stop_the_attribution_run(small_sets, tmp_path):
    out = str(tmp_path / "run")
    train = _Switchable(small_sets[0], float("nan"))
    cfg = _cfg(loss="attribution", loss_options={"lam": 0.2, "normalize": "l2",
                                                 "warmup_epochs": 0})
    with pytest.raises(TrainingDiverged, match="epoch 2, step 1: the loss is nan"):
        train_ensemble(cfg, out, progress=False, train_set=train, test_set=small_sets[1],
                       epoch_callback=_poison(train))
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["status"] == "diverged"


def test_a_runaway_attribution_penalty_stops_the_run(small_sets, tmp_path):
    """Raw Saliency maps and a large lambda: the penalty outgrows the cross-entropy (the paper's
    instability) and the run stops after its first epoch, keeping nothing better than it had."""
    out = str(tmp_path / "run")
    cfg = _cfg(loss="attribution", loss_options={"lam": 10.0, "normalize": "none",
                                                 "warmup_epochs": 0})
    with pytest.raises(TrainingDiverged, match="attribution penalty runs away"):
        train_ensemble(cfg, out, progress=False, train_set=small_sets[0], test_set=small_sets[1])
    assert completed_epochs(out) == []


def test_epoch_check_rule():
    from divfast.training import build_loss

    loss = build_loss("attribution", lam=1.0)
    assert loss.epoch_check({"member_ce": [2.0, 2.0], "attribution_diversity": 0.5,
                             "lambda_effective": 1.0}) is None
    assert "runs away" in loss.epoch_check({"member_ce": [2.0, 2.0], "attribution_diversity": 41.0,
                                             "lambda_effective": 1.0})
    assert build_loss("gncl").epoch_check({"member_ce": [1.0], "penalty": 1e9}) is None
