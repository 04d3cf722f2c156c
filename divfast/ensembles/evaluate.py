"""Evaluate an ensemble on a dataset in one pass: per-member and ensemble accuracy, prediction diversity.

Every member sees each batch once; all statistics are additive (int64 counts, float64 sums), so the
result does not depend on the batch size.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader, Dataset

from divfast.data.members import Member
from divfast.metrics import PredictionDiversity

SCHEMA = "divfast.eval/1"


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Correct counts at top-k for logits ``(..., B, C)`` -> ``(...)`` int64."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (..., B, k)
    return (top == target[..., None]).any(dim=-1).sum(dim=-1)


@torch.no_grad()
def evaluate(members: list[Member], dataset: Dataset, dataset_spec: str = "clean",
             batch_size: int = 128, device: str | torch.device = "cpu", progress: bool = True,
             member_names: list[str] | None = None, num_workers: int = 0) -> dict:
    """Evaluates ``members`` (logit averaging) on ``dataset``; returns the report dict.

    The report (schema ``divfast.eval/1``) holds per-member top-1/top-5 and parameter counts, the
    ensemble's top-1/top-5 and its gain over its best member (paper: Y = A_ens - A_top), and every
    prediction-diversity measure with its pairwise matrices.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {batch_size}")
    m = len(members)
    if num_workers < 0:
        raise ValueError(f"--workers: expected >= 0, got {num_workers}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    num_classes = members[0].info.num_classes
    metric = PredictionDiversity(num_members=m, num_classes=num_classes)
    top1 = torch.zeros(m, dtype=torch.long)
    top5 = torch.zeros(m, dtype=torch.long)
    ens1 = ens5 = n = 0
    for x, y in tqdm(loader, desc=f"eval {dataset_spec}", file=sys.stderr, disable=not progress,
                     leave=False, dynamic_ncols=True):
        x, y = x.to(device), y.to(device)
        logits = torch.stack([member(x).float() for member in members])  # (M, B, C)
        if logits.shape[-1] != num_classes:
            raise ValueError(f"a member produced {logits.shape[-1]} classes, expected {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"--dataset: {dataset_spec!r} has labels outside the members' "
                             f"{num_classes} classes [0, {num_classes})")
        bad = torch.isnan(logits).flatten(1).any(dim=1)  # (M,): a model fault, not a user typo
        if bool(bad.any()):
            names = member_names or [mb.name for mb in members]
            culprit = names[int(bad.nonzero()[0])]
            raise ValueError(f"--members: {culprit!r} produced NaN logits on {dataset_spec!r} "
                             f"(samples {n}..{n + len(y) - 1}); its weights may be corrupt")
        metric.update(logits, y)
        top1 += _topk_correct(logits, y, 1).cpu()
        top5 += _topk_correct(logits, y, 5).cpu()
        avg = logits.mean(dim=0)  # (B, C): the paper's averaging consensus
        ens1 += int(_topk_correct(avg, y, 1))
        ens5 += int(_topk_correct(avg, y, 5))
        n += len(y)
    if n == 0:
        raise ValueError(f"--dataset: {dataset_spec!r} has no samples")
    div = metric.compute()
    names = member_names or [mb.name for mb in members]
    member_rows = [
        {"name": names[i], "architecture": members[i].info.architecture,
         "parameters": members[i].num_parameters(), "top1": float(top1[i]) / n,
         "top5": float(top5[i]) / n}
        for i in range(m)
    ]
    best = max(range(m), key=lambda i: member_rows[i]["top1"])
    pairwise = {k: v.tolist() for k, v in div.pop("pairwise").items()}
    div.pop("member_accuracy")
    ens_top1 = ens1 / n
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
