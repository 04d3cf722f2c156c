"""Train the members of an ensemble jointly on one data stream and write member checkpoints.

Defaults follow the paper: AdaBelief (lr 1e-3, eps 1e-8, betas (0.9, 0.999)), batch 64, and a step
schedule that multiplies the learning rate by 0.9 every 30 epochs ("decaying 10% every 30 epochs").
Checkpoints are written atomically; ``run.json`` records the configuration so a directory holding a
different run is never overwritten by accident.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from divfast.data.digits import NUM_CLASSES, digits_dataset
from divfast.data.members import check_architectures, create_member, save_member
from divfast.ensembles.evaluate import evaluate
from divfast.errors import DivfastError
from divfast.io import ensure_dir, json_safe, write_json_atomic
from divfast.training.losses import build_loss


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
    loss_options: dict = field(default_factory=dict)


def _channel_stats(dataset: Dataset, max_images: int = 2048,
                   seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over (a seeded sample of at most ``max_images`` of) the images."""
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    x = torch.stack([dataset[int(i)][0] for i in idx])  # (n, 3, H, W)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _check_config(cfg: TrainConfig, n_train: int) -> None:
    if not cfg.architectures:
        raise DivfastError("--members: expected at least one timm architecture")
    if cfg.epochs < 1:
        raise DivfastError(f"--epochs: expected >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.batch_size > n_train:
        raise DivfastError(f"--batch-size: expected 1..{n_train} (the training set size), "
                           f"got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise DivfastError(f"--lr: expected > 0, got {cfg.lr}")
    check_architectures(cfg.architectures)


def _prepare_out_dir(out_dir: str, cfg: TrainConfig, overwrite: bool) -> None:
    ensure_dir(out_dir)
    run_file = os.path.join(out_dir, "run.json")
    if os.path.exists(run_file) and not overwrite:
        with open(run_file, encoding="utf-8") as f:
            previous = json.load(f).get("config")
        if previous != json.loads(json.dumps(asdict(cfg))):
            raise DivfastError(f"--out: {out_dir!r} holds a different run (see run.json); "
                               "pass --overwrite or choose another directory")
    write_json_atomic(run_file, {"config": asdict(cfg), "status": "running"})


def train_ensemble(cfg: TrainConfig, out_dir: str, device: str | torch.device = "cpu",
                   overwrite: bool = False, progress: bool = True,
                   train_set: Dataset | None = None, test_set: Dataset | None = None,
                   num_classes: int = NUM_CLASSES, num_workers: int = 0) -> list[str]:
    """Trains ``cfg.architectures`` jointly with ``cfg.loss``; returns the checkpoint paths.

    Args:
        cfg: what to train (architectures, loss, epochs, optimiser settings, seed).
        out_dir: where ``member*.safetensors``, ``run.json`` and ``log.jsonl`` go.
        device: training device.
        overwrite: allow replacing a different run in ``out_dir``.
        progress: draw a progress bar on stderr.
        train_set, test_set: datasets of images in [0, 1]; default: the embedded digits.
        num_classes: the classifier width.
        num_workers: data-loader worker processes.
    """
    import timm.optim
    from tqdm import tqdm

    train_set = train_set if train_set is not None else digits_dataset("train")
    test_set = test_set if test_set is not None else digits_dataset("test")
    _check_config(cfg, len(train_set))
    loss_fn = build_loss(cfg.loss, **cfg.loss_options)
    _prepare_out_dir(out_dir, cfg, overwrite)

    torch.manual_seed(cfg.seed)
    mean, std = _channel_stats(train_set)
    input_size = tuple(train_set[0][0].shape)
    members = []
    for i, arch in enumerate(cfg.architectures):
        torch.manual_seed(cfg.seed * 1000 + i)  # distinct, reproducible initialisations
        members.append(create_member(arch, num_classes, input_size, mean, std,
                                     name=f"m{i}-{arch}",
                                     class_names=getattr(train_set, "classes", None)).to(device))
    params = [p for m in members for p in m.parameters()]
    opt = timm.optim.AdaBelief(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.decay_every, gamma=cfg.decay_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                        drop_last=len(train_set) >= 2 * cfg.batch_size, num_workers=num_workers)
    log_path = os.path.join(out_dir, "log.jsonl")
    open(log_path, "w").close()

    for epoch in range(cfg.epochs):
        for m in members:
            m.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=None if progress else True, leave=False, dynamic_ncols=True)
        total, steps, t0 = 0.0, 0, time.time()
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            logits = torch.stack([m(x) for m in members])  # (M, B, C)
            loss, _ = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise DivfastError(f"training diverged at epoch {epoch + 1}: loss is {float(loss)}; "
                                   "lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.3f}")
        sched.step()
        for m in members:
            m.eval()
        # The same numbers `divfast eval` reports: argmax top-1, mean-logit ensemble, diversity.
        report = evaluate(members, test_set, "validation", batch_size=256, device=device,
                          progress=False, num_workers=num_workers, attribution="none")
        member_acc = [row["top1"] for row in report["members"]]
        ens_acc = report["ensemble"]["top1"]
        record = {"epoch": epoch + 1, "loss": total / max(steps, 1), "member_accuracy": member_acc,
                  "ensemble_accuracy": ens_acc, "diversity": json_safe(report["diversity"]),
                  "lr": sched.get_last_lr()[0], "seconds": time.time() - t0}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if progress:
            accs = " ".join(f"{a:.3f}" for a in member_acc)
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.3f}  members {accs}  "
                  f"ensemble {ens_acc:.3f}", file=sys.stderr)

    paths = []
    for i, m in enumerate(members):
        m.info.provenance = {"loss": cfg.loss, "epochs": cfg.epochs, "seed": cfg.seed,
                             "member_index": i, "dataset": cfg.dataset,
                             "test_accuracy": member_acc[i], "optimizer": "AdaBelief",
                             "lr": cfg.lr, "batch_size": cfg.batch_size}
        path = os.path.join(out_dir, f"member{i}-{m.info.architecture}.safetensors")
        save_member(m, path)
        paths.append(path)
    write_json_atomic(os.path.join(out_dir, "run.json"),
                      {"config": asdict(cfg), "status": "done", "members": paths,
                       "member_accuracy": member_acc, "ensemble_accuracy": ens_acc})
    return paths
