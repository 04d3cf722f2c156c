"""Evaluate an ensemble on a dataset in one pass: per-member and ensemble accuracy, prediction diversity.

Every member sees each batch once; all statistics are additive (int64 counts, float64 sums), so the
result does not depend on the batch size.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader, Dataset

from divfast.data.members import Member
from divfast.errors import DivfastError
from divfast.functional.prediction import undefined_softmax_members
from divfast.metrics import PredictionDiversity

SCHEMA = "divfast.eval/1"


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Correct counts at top-k for logits ``(..., B, C)`` -> ``(...)`` int64."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (..., B, k)
    return (top == target[..., None]).any(dim=-1).sum(dim=-1)


def check_dataset_classes(members: list[Member], dataset: Dataset, dataset_spec: str) -> None:
    """Members must predict the dataset's classes: the same count and, where both record them, the
    same class names in the same order (a reordered ImageFolder would score the wrong classes)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return
    for member in members:
        if member.info.num_classes != len(classes):
            raise DivfastError(f"--members: {member.name!r} predicts {member.info.num_classes} "
                               f"classes but dataset {dataset_spec!r} has {len(classes)}")
        names = member.info.class_names
        if names is not None and list(names) != list(classes):
            raise DivfastError(f"--members: {member.name!r} was trained on classes "
                               f"{_preview(names)} but dataset {dataset_spec!r} has "
                               f"{_preview(classes)}")


def _preview(names) -> str:
    names = list(names)
    return repr(names) if len(names) <= 6 else f"[{', '.join(map(repr, names[:5]))}, ...]"


@torch.no_grad()
def evaluate(members: list[Member], dataset: Dataset, dataset_spec: str = "clean",
             batch_size: int = 128, device: str | torch.device = "cpu", progress: bool = True,
             member_names: list[str] | None = None, num_workers: int = 0) -> dict:
    """Evaluates ``members`` (logit averaging) on ``dataset``; returns the report dict.

    The report (schema ``divfast.eval/1``) holds per-member top-1/top-5 and parameter counts, the
    ensemble's top-1/top-5 and its gain over its best member (paper: Y = A_ens - A_top), and every
    prediction-diversity measure with its pairwise matrices. Top-1 follows ``torch.argmax`` (the first
    maximum wins a tie), as the diversity counts do; top-5 uses ``torch.topk``.

    Raises:
        DivfastError: bad arguments (``batch_size``, ``num_workers``), members whose classes do not
            match the dataset's, labels out of range, a member producing NaN or +inf logits.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise DivfastError(f"batch_size (--batch-size): expected >= 1, got {batch_size}")
    if num_workers < 0:
        raise DivfastError(f"num_workers (--workers): expected >= 0, got {num_workers}")
    check_dataset_classes(members, dataset, dataset_spec)
    m = len(members)
    names = member_names or [mb.name for mb in members]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    num_classes = members[0].info.num_classes
    metric = PredictionDiversity(num_members=m, num_classes=num_classes)
    top5 = torch.zeros(m, dtype=torch.long)
    ens5 = n = 0
    for x, y in tqdm(loader, desc=f"eval {dataset_spec}", file=sys.stderr, disable=not progress,
                     leave=False, dynamic_ncols=True):
        x, y = x.to(device), y.to(device)
        logits = torch.stack([member(x).float() for member in members])  # (M, B, C)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DivfastError(f"--dataset: {dataset_spec!r} has labels outside the members' "
                               f"{num_classes} classes [0, {num_classes})")
        bad = undefined_softmax_members(logits)  # a model fault: name the member
        if bool(bad.any()):
            raise DivfastError(f"--members: {names[int(bad.nonzero()[0])]!r} produced NaN or "
                               f"infinite logits on {dataset_spec!r} (samples {n}..{n + len(y) - 1}); "
                               "its weights may be corrupt")
        metric.update(logits, y)
        top5 += _topk_correct(logits, y, 5).cpu()
        ens5 += int(_topk_correct(logits.mean(dim=0), y, 5))  # the paper's averaging consensus
        n += len(y)
    if n == 0:
        raise DivfastError(f"--dataset: {dataset_spec!r} has no samples")
    div = metric.compute()
    member_top1 = div.pop("member_accuracy")  # N11 diagonal of the counts: argmax's tie rule
    member_rows = [
        {"name": names[i], "architecture": members[i].info.architecture,
         "parameters": members[i].num_parameters(), "top1": member_top1[i],
         "top5": float(top5[i]) / n}
        for i in range(m)
    ]
    best = max(range(m), key=lambda i: member_rows[i]["top1"])
    pairwise = {k: v.tolist() for k, v in div.pop("pairwise").items()}
    ens_top1 = div["ensemble_accuracy"]
    return {
        "schema": SCHEMA,
        "dataset": dataset_spec,
        "n_samples": n,
        "num_classes": num_classes,
        "members": member_rows,
        "ensemble": {"consensus": "average", "top1": ens_top1, "top5": ens5 / n,
                     "best_member": member_rows[best]["name"],
                     "gain_top1": ens_top1 - member_rows[best]["top1"]},
        "diversity": div,
        "pairwise": pairwise,
    }
