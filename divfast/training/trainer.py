"""Train the members of an ensemble jointly on one data stream; checkpoints, resume, DDP.

Defaults follow the paper (section 4.3): AdaBelief (timm's, lr 1e-3, eps 1e-8, betas (0.9, 0.999)),
batch 64, lambda 0.2, and a step schedule that multiplies the learning rate by 0.9 every 30 epochs —
"decaying 10% every 30 epochs" read as lr <- 0.9 lr, not lr <- 0.1 lr (``decay_factor``).

Output directory::

    run.json                       configuration, status (running|done|diverged|interrupted), epoch
    log.jsonl                      one record per epoch: loss terms, member/ensemble accuracy, diversity
    checkpoints/epoch-0003/        every completed epoch: member*.safetensors (the #2 format) and
                                   state.pt (optimizer, scheduler, epoch); the last ``keep_checkpoints``
    member{i}-{arch}.safetensors   the final members (or the last good ones when a run diverged)

Every file is written atomically and an epoch directory appears only once complete (it is renamed
into place), so a killed run loses at most the epoch in progress. ``resume=True`` continues from the
newest epoch directory and reproduces the uninterrupted run exactly on the CPU: the randomness of
epoch e (shuffling, dropout, drop-path) is drawn from generators seeded by ``(seed, e)`` alone, so
nothing but the weights, the optimizer and the scheduler has to be carried over. ``state.pt`` holds
only tensors and plain containers and is read with ``torch.load(weights_only=True)``.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on GPUs,
gloo on CPUs), the members are wrapped together in one DistributedDataParallel module, each process
reads its share of every global batch of ``batch_size`` samples (``batch_size`` must divide by the
world size), and rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from divfast.data.digits import NUM_CLASSES, digits_dataset
from divfast.data.members import Member, check_architectures, create_member, save_member
from divfast.errors import DivfastError
from divfast.io import atomic_path, ensure_dir, json_safe, write_json_atomic, write_text_atomic
from divfast.training.losses import EnsembleLoss, build_loss


class TrainingDiverged(DivfastError):
    """A run stopped: its loss, gradients or accuracy ran away; the last good epoch is kept."""


@dataclass
class TrainConfig:
    architectures: list[str]
    loss: str = "independent"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    decay_every: int = 30
    decay_factor: float = 0.9
    seed: int = 0
    dataset: str = "digits"
    val_dataset: str | None = None  # None: the dataset's own validation split (or itself)
    image_size: int | None = None  # crop size of ImageFolder data; None: the data's own size
    loss_options: dict = field(default_factory=dict)
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    amp: bool = False  # bfloat16 autocast (CUDA only)

    def identity(self) -> dict:
        """What must match for ``resume``: everything but the epoch count (a finished run may be
        extended) and ``clip_grad`` (a run that diverged may go on from its last good epoch with
        clipping)."""
        out = json.loads(json.dumps(asdict(self)))
        for key in RESUMABLE_CHANGES:
            out.pop(key)
        return out


RESUMABLE_CHANGES = ("epochs", "clip_grad")


class Ensemble(nn.Module):
    """The members as one module: ``forward(x) -> (M, B, C)`` logits (one DDP wrapper for all)."""

    def __init__(self, members: list[Member]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for (run seed, epoch, stream); distinct streams never share a generator."""
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729 + 0x5EED) % (2 ** 63)


def _channel_stats(dataset: Dataset, max_images: int = 2048,
                   seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over (a seeded sample of at most ``max_images`` of) the images."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = order[:max_images].sort().values
    x = torch.stack([dataset[int(i)][0] for i in idx])  # (n, 3, H, W)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _check_config(cfg: TrainConfig, n_train: int, world: int) -> None:
    if not cfg.architectures:
        raise DivfastError("--members: expected at least one timm architecture")
    if cfg.epochs < 1:
        raise DivfastError(f"--epochs: expected >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.batch_size > n_train:
        raise DivfastError(f"--batch-size: expected 1..{n_train} (the training set size), "
                           f"got {cfg.batch_size}")
    if cfg.batch_size % world:
        raise DivfastError(f"--batch-size: the global batch {cfg.batch_size} must divide by the "
                           f"{world} processes")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise DivfastError(f"--lr: expected > 0, got {cfg.lr}")
    if cfg.decay_every < 1:
        raise DivfastError(f"--decay-every: expected >= 1 epoch, got {cfg.decay_every}")
    if not 0 < cfg.decay_factor <= 1:
        raise DivfastError(f"--decay-factor: expected in (0, 1], got {cfg.decay_factor}")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise DivfastError(f"--clip-grad: expected a norm > 0, got {cfg.clip_grad}")
    check_architectures(cfg.architectures)


# --- output directory -----------------------------------------------------------------------------

def _checkpoint_dir(out_dir: str, epoch: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"epoch-{epoch:04d}")


def completed_epochs(out_dir: str) -> list[int]:
    """Epochs with a complete checkpoint directory in ``out_dir``, ascending."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("epoch-") and name[6:].isdigit():
            if os.path.exists(os.path.join(root, name, "state.pt")):
                found.append(int(name[6:]))
    return sorted(found)


def _read_run(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DivfastError(f"--out: {path!r} is not readable JSON ({exc})") from exc


def _prepare_out_dir(out_dir: str, cfg: TrainConfig, overwrite: bool, resume: bool) -> int:
    """Checks ``out_dir`` against the run; returns the epoch to start from (0 unless resuming)."""
    ensure_dir(out_dir)
    previous = _read_run(out_dir)
    if resume:
        if previous is None or not completed_epochs(out_dir):
            raise DivfastError(f"--resume: {out_dir!r} holds no checkpoint to resume from "
                               "(no checkpoints/epoch-NNNN with a state.pt)")
        prev_cfg = previous.get("config") or {}
        prev_cfg = {k: v for k, v in prev_cfg.items() if k not in RESUMABLE_CHANGES}
        if prev_cfg != cfg.identity():
            diff = sorted(k for k in set(prev_cfg) | set(cfg.identity())
                          if prev_cfg.get(k) != cfg.identity().get(k))
            raise DivfastError(f"--resume: the run in {out_dir!r} was started with different "
                               f"settings ({', '.join(diff)}); pass the same options (only "
                               "--epochs and --clip-grad may change)")
        last = completed_epochs(out_dir)[-1]
        if cfg.epochs < last:
            raise DivfastError(f"--epochs: the run in {out_dir!r} has completed {last} epochs; "
                               f"--resume cannot end it at {cfg.epochs}")
        return last
    if previous is not None and not overwrite:
        same = previous.get("config") == json.loads(json.dumps(asdict(cfg)))
        if not same:
            raise DivfastError(f"--out: {out_dir!r} holds a different run (see run.json); pass "
                               "--resume to continue it with its settings, --overwrite to replace "
                               "it, or choose another directory")
        if previous.get("status") == "done":
            raise DivfastError(f"--out: {out_dir!r} holds this run, finished; pass --overwrite to "
                               "train it again from scratch, --resume --epochs N to extend it, or "
                               "choose another directory")
        if completed_epochs(out_dir):
            raise DivfastError(f"--out: {out_dir!r} holds an unfinished run of these settings "
                               f"(epoch {completed_epochs(out_dir)[-1]} of {cfg.epochs}); pass "
                               "--resume to continue it or --overwrite to start again")
    if overwrite:
        shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
        for name in os.listdir(out_dir):
            if name.startswith("member") and name.endswith(".safetensors"):
                os.unlink(os.path.join(out_dir, name))
    return 0


def _member_file(member: Member, index: int) -> str:
    return f"member{index}-{member.info.architecture}.safetensors"


def _save_checkpoint(out_dir: str, epoch: int, members: list[Member], optimizer, scheduler,
                     keep: int) -> str:
    """Writes checkpoints/epoch-NNNN as a whole (a temp directory renamed into place)."""
    final = _checkpoint_dir(out_dir, epoch)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i, m in enumerate(members):
        save_member(m, os.path.join(tmp, _member_file(m, i)))
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    with atomic_path(os.path.join(tmp, "state.pt")) as path:
        torch.save(state, path)
    shutil.rmtree(final, ignore_errors=True)  # a stale copy from an earlier, overwritten run
    os.replace(tmp, final)
    if keep > 0:
        for old in completed_epochs(out_dir)[:-keep]:
            shutil.rmtree(_checkpoint_dir(out_dir, old), ignore_errors=True)
    return final


def _load_checkpoint(out_dir: str, epoch: int, members: list[Member], optimizer, scheduler) -> None:
    from safetensors.torch import load_file

    folder = _checkpoint_dir(out_dir, epoch)
    for i, m in enumerate(members):
        path = os.path.join(folder, _member_file(m, i))
        if not os.path.exists(path):
            raise DivfastError(f"--resume: {path!r} is missing; the checkpoint does not match "
                               f"--members")
        device = next(m.parameters()).device
        m.model.load_state_dict({k: v.to(device) for k, v in load_file(path).items()}, strict=True)
    state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def _publish_members(out_dir: str, members: list[Member]) -> list[str]:
    paths = []
    for i, m in enumerate(members):
        path = os.path.join(out_dir, _member_file(m, i))
        save_member(m, path)
        paths.append(path)
    return paths


def _publish_checkpoint(out_dir: str, epoch: int, members: list[Member]) -> list[str]:
    """Copies the members of checkpoint ``epoch`` to the top of ``out_dir`` (atomic per file)."""
    paths = []
    for i, m in enumerate(members):
        src = os.path.join(_checkpoint_dir(out_dir, epoch), _member_file(m, i))
        dst = os.path.join(out_dir, _member_file(m, i))
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        paths.append(dst)
    return paths


def _truncate_log(path: str, last_epoch: int) -> None:
    """Keeps the records of epochs <= ``last_epoch`` (a resumed run rewrites the later ones)."""
    if not os.path.exists(path):
        write_text_atomic(path, "")
        return
    kept = [json.dumps(r) + "\n" for r in _read_log(path) if r.get("epoch", 0) <= last_epoch]
    write_text_atomic(path, "".join(kept))


def _read_log(path: str) -> list[dict]:
    """The records of ``log.jsonl``; a line cut short by a killed run is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


# --- distributed ----------------------------------------------------------------------------------

def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device) — initialises the process group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, dist.get_world_size(), device


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- one step -------------------------------------------------------------------------------------

def training_step(model: nn.Module, loss_fn: EnsembleLoss, optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, clip_grad: float | None = None,
                  amp: bool = False) -> tuple[float, dict, float]:
    """One optimisation step of the whole ensemble: forward every member, loss, backward, update.

    Args:
        model: an :class:`Ensemble` (or its DDP wrapper) returning ``(M, B, C)`` logits.
        loss_fn: a loss from :func:`divfast.training.build_loss`.
        optimizer: over every member's parameters.
        x, y: the batch ``(B, 3, H, W)`` and its labels ``(B,)`` on the model's device.
        clip_grad: clip the global gradient norm to this value (None: no clipping).
        amp: bfloat16 autocast for the forward and the loss (CUDA).

    Returns:
        ``(loss, terms, grad_norm)``: the global gradient norm before any clipping.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm, on this or (under DDP) another
            process; the update is not applied.
    """
    if loss_fn.needs_inputs:
        x = x.detach().requires_grad_(True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)  # (M, B, C)
        loss, terms = loss_fn(logits.float() if amp else logits, y, inputs=x)
    value = float(loss.detach())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every process must stop together: one that raised alone would leave the others waiting
        # in the gradient all-reduce; the sum also gives the mean loss over the processes
        total = torch.tensor([value], dtype=torch.float64, device=x.device)
        torch.distributed.all_reduce(total)
        if math.isfinite(value) and not math.isfinite(float(total)):
            raise TrainingDiverged(f"another process's loss is {float(total)} (this process's: "
                                   f"{value:.4g})")
        value = float(total) / torch.distributed.get_world_size()
    if not math.isfinite(value):
        raise TrainingDiverged(f"the loss is {value} ({_format_terms(terms)})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if clip_grad is None:  # no clipping, but a non-finite gradient must never reach the update
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
    if not math.isfinite(norm):  # after DDP's all-reduce every process sees the same norm
        raise TrainingDiverged(f"the gradient norm is {norm} (loss {value:.4g})")
    optimizer.step()
    return value, terms, norm


def _format_terms(terms: dict) -> str:
    parts = []
    for k, v in terms.items():
        if isinstance(v, list):
            parts.append(f"{k} " + ",".join(f"{x:.3g}" for x in v))
        else:
            parts.append(f"{k} {v:.3g}")
    return "; ".join(parts)


class _Mean:
    """Running means of the loss terms (floats and per-member lists)."""

    def __init__(self):
        self.sums: dict = {}
        self.count = 0

    def add(self, terms: dict) -> None:
        self.count += 1
        for k, v in terms.items():
            if isinstance(v, list):
                acc = self.sums.setdefault(k, [0.0] * len(v))
                for i, x in enumerate(v):
                    acc[i] += x
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict:
        n = max(self.count, 1)
        return {k: ([x / n for x in v] if isinstance(v, list) else v / n)
                for k, v in self.sums.items()}


def _collapsed(history: list[float], accuracy: float, num_classes: int, n_val: int) -> bool:
    """Accuracy fell back to chance after the run had learned something."""
    chance = 1.0 / num_classes
    band = chance + 3.0 * math.sqrt(chance * (1 - chance) / max(n_val, 1))
    return accuracy <= band and any(a > band for a in history)


def _epoch_loader(train_set: Dataset, cfg: TrainConfig, epoch: int, rank: int, world: int,
                  num_workers: int) -> DataLoader:
    """This process's batches of ``epoch``, in an order fixed by ``(cfg.seed, epoch)`` alone."""
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler,
                          drop_last=True, num_workers=num_workers)
    gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 0))
    return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                      drop_last=len(train_set) >= 2 * cfg.batch_size, num_workers=num_workers)


# --- the trainer ----------------------------------------------------------------------------------

def train_ensemble(cfg: TrainConfig, out_dir: str, device: str | torch.device = "cpu",
                   overwrite: bool = False, progress: bool = True,
                   train_set: Dataset | None = None, test_set: Dataset | None = None,
                   num_classes: int = NUM_CLASSES, num_workers: int = 0, resume: bool = False,
                   keep_checkpoints: int = 2, epoch_callback=None) -> list[str]:
    """Trains ``cfg.architectures`` jointly with ``cfg.loss``; returns the final checkpoint paths.

    Args:
        cfg: what to train (architectures, loss and its options, epochs, optimiser, seed).
        out_dir: the run directory (layout in the module docstring).
        device: training device; under torchrun each process takes ``cuda:LOCAL_RANK``.
        overwrite: replace a run already in ``out_dir``.
        progress: progress bar and per-epoch summary on stderr.
        train_set, test_set: datasets of images in [0, 1]; default: the embedded digits.
        num_classes: the classifier width.
        num_workers: data-loader worker processes.
        resume: continue the run in ``out_dir`` from its newest checkpoint (same settings; only
            ``cfg.epochs`` may differ, to extend a finished run).
        keep_checkpoints: how many epoch directories to keep (0: all).
        epoch_callback: called as ``epoch_callback(epoch, record)`` after each checkpoint (rank 0).

    Raises:
        DivfastError: bad settings, or an ``out_dir`` holding a different run.
        TrainingDiverged: non-finite loss or gradients, or accuracy collapsed to chance; the members
            of the last good epoch are written to ``out_dir`` first.
    """
    import timm.optim
    from tqdm import tqdm

    from divfast.ensembles.evaluate import evaluate

    device = torch.device(device)
    rank, world, device = _init_distributed(device)
    train_set = train_set if train_set is not None else digits_dataset("train")
    test_set = test_set if test_set is not None else digits_dataset("test")
    _check_config(cfg, len(train_set), world)
    if keep_checkpoints < 0:
        raise DivfastError(f"--keep-checkpoints: expected >= 0 (0 keeps all), "
                           f"got {keep_checkpoints}")
    loss_fn = build_loss(cfg.loss, **cfg.loss_options)
    amp = cfg.amp and device.type == "cuda"
    start = 0
    if rank == 0:
        start = _prepare_out_dir(out_dir, cfg, overwrite, resume)
    start = _broadcast(start, world)

    torch.manual_seed(cfg.seed)
    mean, std = _broadcast(_channel_stats(train_set) if rank == 0 else None, world)  # one rule
    input_size = tuple(train_set[0][0].shape)
    members = []
    for i, arch in enumerate(cfg.architectures):
        torch.manual_seed(cfg.seed * 1000 + i)  # distinct, reproducible initialisations
        members.append(create_member(arch, num_classes, input_size, mean, std,
                                     name=f"m{i}-{arch}",
                                     class_names=getattr(train_set, "classes", None)).to(device))
    ensemble = Ensemble(members)
    params = list(ensemble.parameters())
    opt = timm.optim.AdaBelief(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.decay_every, gamma=cfg.decay_factor)
    if start:
        _load_checkpoint(out_dir, start, members, opt, sched)
    model: nn.Module = ensemble
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(ensemble, device_ids=[device.index] if device.type == "cuda"
                                        else None)

    def status(state: str, epoch: int, **extra) -> None:
        write_json_atomic(os.path.join(out_dir, "run.json"),
                          {"config": asdict(cfg), "status": state, "epoch": epoch,
                           "world_size": world, "loss_options": loss_fn.options(), **extra})

    log_path = os.path.join(out_dir, "log.jsonl")
    history: list[float] = []
    if rank == 0:
        _truncate_log(log_path, start)
        history = [r["ensemble_accuracy"] for r in _read_log(log_path)]
        status("running", start)
    record: dict = {}
    member_acc: list[float] = []
    ens_acc = float("nan")

    try:
        for epoch in range(start, cfg.epochs):
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, 1 + rank))  # dropout, drop-path
            loss_fn.set_epoch(epoch)
            loader = _epoch_loader(train_set, cfg, epoch, rank, world, num_workers)
            ensemble.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                       disable=None if (progress and rank == 0) else True, leave=False,
                       dynamic_ncols=True)
            means, t0 = _Mean(), time.time()
            try:
                for x, y in bar:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    value, terms, norm = training_step(model, loss_fn, opt, x, y, cfg.clip_grad,
                                                       amp)
                    means.add(dict(terms, loss=value, grad_norm=norm))
                    bar.set_postfix(loss=f"{means.sums['loss'] / means.count:.3f}")
            except TrainingDiverged as exc:
                _stop(out_dir, cfg, rank, members, reason=str(exc), world=world)
                raise TrainingDiverged(_diverged_message(out_dir, epoch + 1, means.count + 1,
                                                         str(exc))) from None
            lr = sched.get_last_lr()[0]  # the rate this epoch trained with
            sched.step()

            stop_reason = None
            if rank == 0:
                ensemble.eval()
                report = evaluate(list(members), test_set, "validation", batch_size=256,
                                  device=device, progress=False, num_workers=num_workers,
                                  attribution="none")
                member_acc = [row["top1"] for row in report["members"]]
                ens_acc = report["ensemble"]["top1"]
                terms = means.means()
                record = {"epoch": epoch + 1, "loss": terms.pop("loss", float("nan")),
                          "terms": terms, "member_accuracy": member_acc,
                          "ensemble_accuracy": ens_acc, "diversity": json_safe(report["diversity"]),
                          "lr": lr, "seconds": time.time() - t0}
                runaway = loss_fn.epoch_check(terms)
                if _collapsed(history, ens_acc, num_classes, len(test_set)):
                    stop_reason = (f"the ensemble's validation accuracy collapsed to "
                                   f"{ens_acc:.3f} (chance {1 / num_classes:.3f}) after reaching "
                                   f"{max(history):.3f}")
                elif runaway is not None:
                    stop_reason = runaway
                else:
                    history.append(ens_acc)
                    # the record first: a run killed before its checkpoint lands resumes from the
                    # epoch before, and the resume drops the record of the epoch it redoes
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(json_safe(record)) + "\n")
                    _stamp(members, cfg, loss_fn, epoch + 1, member_acc, world)
                    _save_checkpoint(out_dir, epoch + 1, members, opt, sched, keep_checkpoints)
                    status("running", epoch + 1)
                    if progress:
                        accs = " ".join(f"{a:.3f}" for a in member_acc)
                        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.3f}  "
                              f"members {accs}  ensemble {ens_acc:.3f}", file=sys.stderr)
            stop_reason = _broadcast(stop_reason, world)
            if stop_reason is not None:
                _stop(out_dir, cfg, rank, members, reason=stop_reason, world=world)
                raise TrainingDiverged(_diverged_message(out_dir, epoch + 1, None, stop_reason))
            if rank == 0 and epoch_callback is not None:
                epoch_callback(epoch + 1, record)
    except KeyboardInterrupt:  # Ctrl-C (or a callback): the completed epochs stay resumable
        if rank == 0:
            status("interrupted", (completed_epochs(out_dir) or [0])[-1])
        raise

    paths = [os.path.join(out_dir, _member_file(m, i)) for i, m in enumerate(members)]
    if rank == 0:
        if not record:  # resumed a finished run: report the last checkpoint's numbers
            last = completed_epochs(out_dir)[-1]
            paths = _publish_checkpoint(out_dir, last, members)
            lines = _read_log(log_path)
            member_acc = lines[-1]["member_accuracy"] if lines else []
            ens_acc = lines[-1]["ensemble_accuracy"] if lines else float("nan")
        else:  # the members carry the provenance _stamp gave them at their last checkpoint
            paths = _publish_members(out_dir, members)
        status("done", cfg.epochs, members=paths, member_accuracy=member_acc,
               ensemble_accuracy=ens_acc)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return paths


def _stamp(members: list[Member], cfg: TrainConfig, loss_fn: EnsembleLoss, epoch: int,
           accuracy: list[float], world: int) -> None:
    """Writes how each member was made into its metadata (saved with every checkpoint)."""
    for i, m in enumerate(members):
        m.info.provenance = {"loss": cfg.loss, "loss_options": loss_fn.options(), "epoch": epoch,
                             "epochs": cfg.epochs, "seed": cfg.seed, "member_index": i,
                             "dataset": cfg.dataset, "test_accuracy": accuracy[i],
                             "optimizer": "AdaBelief", "lr": cfg.lr,
                             "batch_size": cfg.batch_size, "world_size": world}


def _stop(out_dir: str, cfg: TrainConfig, rank: int, members: list[Member], reason: str,
          world: int) -> None:
    """Rank 0 publishes the last good checkpoint (if any) and marks the run diverged."""
    if rank != 0:
        return
    done = completed_epochs(out_dir)
    last = done[-1] if done else 0
    paths = _publish_checkpoint(out_dir, last, members) if last else []
    write_json_atomic(os.path.join(out_dir, "run.json"),
                      {"config": asdict(cfg), "status": "diverged", "epoch": last,
                       "world_size": world, "reason": reason, "members": paths})


def _diverged_message(out_dir: str, epoch: int, step: int | None, reason: str) -> str:
    done = completed_epochs(out_dir)
    where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    kept = (f"the last good checkpoint (epoch {done[-1]}) is kept in {out_dir!r}" if done
            else "no epoch had completed, so nothing was kept")
    return (f"training diverged at {where}: {reason}; {kept}. Lower --lr or --lambda, add "
            "--clip-grad, or use --warmup-epochs for the attribution loss")
