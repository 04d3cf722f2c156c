"""Do attribution methods agree on which members differ? (paper section 4.2, Figure 9)

The paper compares the pairwise attribution diversity of six networks under Saliency and under
Integrated Gradients with 2, 10 and 50 steps, normalises each method's scores and finds an average
correlation of 0.998 between methods: cheap Saliency is enough. :func:`compare_attribution_methods`
repeats that on any members and data in one pass: every batch is attributed by every method, each
method feeds its own additive :class:`~divfast.metrics.AttributionDiversity`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from divfast.attribution.attribute import member_attributions
from divfast.errors import DivfastError
from divfast.functional.attribution import method_agreement
from divfast.metrics.attribution import AttributionDiversity

PAPER_METHODS = ("saliency", "ig2", "ig10", "ig50")


def parse_method(name: str) -> tuple[str, int]:
    """``"saliency"`` -> ``("saliency", 1)``; ``"ig10"`` -> ``("ig", 10)`` (``"ig"`` alone: 50 steps)."""
    text = name.strip().lower()
    if text == "saliency":
        return "saliency", 1
    if text.startswith("ig"):
        steps = text[2:] or "50"
        if steps.isdigit() and int(steps) >= 1:
            return "ig", int(steps)
    raise DivfastError(f"methods: expected 'saliency' or 'ig<steps>' such as 'ig10', got {name!r}")


@torch.no_grad()
def compare_attribution_methods(members: list[nn.Module], dataset: Dataset,
                                methods: Sequence[str] = PAPER_METHODS, batch_size: int = 32,
                                device: str | torch.device = "cpu", target: str = "label",
                                normalize: str = "l1", progress: bool = False) -> dict:
    """Pairwise attribution diversity of ``members`` under each method, and how the methods agree.

    Args:
        members: classifiers on images in [0, 1] (e.g. :class:`divfast.data.Member`), at least two.
        dataset: ``(image, label)`` items, images ``(3, H, W)`` in [0, 1].
        methods: names such as ``"saliency"``, ``"ig2"``, ``"ig10"``, ``"ig50"`` (the paper's four).
        batch_size: images per attribution call.
        target: ``"label"``, ``"member"`` or ``"ensemble"`` (see :func:`member_attributions`).
        normalize: per-map normalisation before comparing (default ``"l1"``: IG and Saliency maps
            have different scales; the agreement is about which pairs differ, not by how much).

    Returns:
        ``{"methods", "n_samples", "diversity": {method: Eq. 7 of all members}, "pairwise":
        {method: M x M}, "agreement": method_agreement(...)}`` with the normalised pair scores and
        the Pearson correlations between methods (the paper's Figure 9 and its 0.998).
    """
    from tqdm import tqdm

    if len(members) < 2:
        raise DivfastError(f"members: comparing pairs needs at least 2 members, got {len(members)}")
    if batch_size < 1:
        raise DivfastError(f"batch_size: expected >= 1, got {batch_size}")
    parsed = {name: parse_method(name) for name in methods}
    if not parsed:
        raise DivfastError("methods: expected at least one method")
    metrics = {name: AttributionDiversity(num_members=len(members), normalize=normalize) for name in parsed}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="attribution methods", file=sys.stderr, disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        for name, (method, steps) in parsed.items():
            maps = member_attributions(members, x, target=target, labels=y, method=method, ig_steps=steps)
            metrics[name].update(maps)
    pairwise = {name: metric.pairwise() for name, metric in metrics.items()}
    return {
        "methods": list(parsed),
        "n_samples": int(next(iter(metrics.values())).compute()["n_samples"]),
        "diversity": {name: metric.compute()["diversity"] for name, metric in metrics.items()},
        "pairwise": {name: p.tolist() for name, p in pairwise.items()},
        "agreement": method_agreement(pairwise),
    }
