"""Evaluate an ensemble on a dataset in one pass: per-member and ensemble accuracy, prediction
diversity and attribution diversity (paper Eq. 7).

Every member sees each batch once for its predictions and, for the attribution maps, once more
forward and backward (Saliency) or ``ig_steps`` times (Integrated Gradients). All statistics are
additive (int64 counts, float64 sums), so the result does not depend on the batch size beyond the
float rounding of the maps. :func:`attribution_examples` gives the maps of the first few images
for a figure (paper Figure 11).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from divfast.data.members import Member
from divfast.errors import DivfastError
from divfast.functional.prediction import undefined_softmax_members
from divfast.ensembles.features import GramCapture
from divfast.functional.representation import cross_member_cka_by_depth
from divfast.metrics import AttributionDiversity, PredictionDiversity, RepresentationSimilarity

SCHEMA = "divfast.eval/1"
# The CLI's choices (cli/main.py repeats them so `divfast --help` needs no torch; a test keeps the
# two in step).
ATTRIBUTION_METHODS = ("saliency", "ig", "none")
ATTRIBUTION_TARGETS = ("label", "member", "ensemble")
ATTRIBUTION_NORMALIZATIONS = ("none", "l1", "l2", "max")


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


def check_attribution_options(attribution: str, ig_steps: int, attribution_target: str,
                              attribution_normalize: str) -> None:
    """Raises a DivfastError naming the CLI option for a bad attribution setting."""
    if attribution not in ATTRIBUTION_METHODS:
        raise DivfastError(f"attribution (--attribution): expected one of "
                           f"{', '.join(ATTRIBUTION_METHODS)}, got {attribution!r}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise DivfastError(f"ig_steps (--ig-steps): expected an int >= 1, got {ig_steps!r}")
    if attribution_target not in ATTRIBUTION_TARGETS:
        raise DivfastError(f"attribution_target (--attribution-target): expected one of "
                           f"{', '.join(ATTRIBUTION_TARGETS)}, got {attribution_target!r}")
    if attribution_normalize not in ATTRIBUTION_NORMALIZATIONS:
        raise DivfastError(f"attribution_normalize (--attribution-normalize): expected one of "
                           f"{', '.join(ATTRIBUTION_NORMALIZATIONS)}, "
                           f"got {attribution_normalize!r}")


def _has_glob(layers) -> bool:
    """Whether any layer pattern (one list, or one per member) is a glob rather than a name."""
    if layers is None or isinstance(layers, str):
        return False
    flat = [p for item in layers for p in ([item] if isinstance(item, str) else (item or []))]
    return any(isinstance(p, str) and any(ch in p for ch in "*?[") for p in flat)


def check_representation_options(cka_kernel: str, rbf_bandwidth: float) -> None:
    """Raises a DivfastError naming the CLI option for a bad representation setting."""
    if cka_kernel not in ("linear", "rbf"):
        raise DivfastError(f"cka_kernel (--cka-kernel): expected 'linear' or 'rbf', got {cka_kernel!r}")
    if (isinstance(rbf_bandwidth, bool) or not isinstance(rbf_bandwidth, (int, float))
            or not math.isfinite(rbf_bandwidth) or rbf_bandwidth <= 0):
        raise DivfastError(f"rbf_bandwidth (--rbf-bandwidth): expected a positive number, got "
                           f"{rbf_bandwidth!r}")


def _batch_maps(members: list[Member], x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                method: str, target: str, ig_steps: int) -> torch.Tensor:
    """The members' maps ``(M, B, 3, H, W)`` of one batch whose logits ``(M, B, C)`` are known.

    The predicted classes come from those logits rather than from the extra no-grad pass that
    ``member_attributions`` would make for them: ``"ensemble"`` is the argmax of the averaged logits
    (the consensus this report scores), ``"member"`` each member's own argmax. Fast Saliency of the
    members' own predictions already takes the argmax of its gradient pass, so it is left to
    ``member_attributions``.
    """
    from divfast.attribution import member_attributions

    if target == "ensemble":
        ensemble = logits.mean(dim=0).argmax(dim=1)  # (B,)
        return member_attributions(members, x, "label", ensemble, method, ig_steps=ig_steps)
    if target == "member" and method != "saliency":
        return torch.cat([member_attributions([member], x, "label", logits[i].argmax(dim=1),
                                              method, ig_steps=ig_steps)
                          for i, member in enumerate(members)])  # (M, B, 3, H, W)
    return member_attributions(members, x, target, y, method, ig_steps=ig_steps)


@torch.no_grad()
def evaluate(members: list[Member], dataset: Dataset, dataset_spec: str = "clean",
             batch_size: int = 128, device: str | torch.device = "cpu", progress: bool = True,
             member_names: list[str] | None = None, num_workers: int = 0,
             attribution: str = "saliency", ig_steps: int = 10, attribution_target: str = "label",
             attribution_normalize: str = "none", representation: bool = False,
             layers: Sequence[str] | Sequence[Sequence[str]] | None = None,
             cka_kernel: str = "linear", rbf_bandwidth: float = 0.5,
             gram_dtype: torch.dtype = torch.float32) -> dict:
    """Evaluates ``members`` (logit averaging) on ``dataset``; returns the report dict.

    The report (schema ``divfast.eval/1``) holds per-member top-1/top-5 and parameter counts, the
    ensemble's top-1/top-5 and its gain over its best member (paper: Y = A_ens - A_top), and every
    prediction-diversity measure with its pairwise matrices. Top-1 follows ``torch.argmax`` (the first
    maximum wins a tie), as the diversity counts do; top-5 uses ``torch.topk``.

    It also holds ``"attribution"``: the attribution diversity of the members (paper Eq. 7, the
    mean over samples of the variance across members summed over channels and pixels; population
    variance, absolute maps) as ``{"method", "ig_steps" (Integrated Gradients only), "target",
    "normalize", "abs", "ddof", "diversity", "pairwise" (M x M: Eq. 7 of each pair), "gram" (M x M
    float64 sums: the member Gram of the centred maps, from which
    :func:`divfast.functional.attribution.subset_diversity` gives any sub-ensemble's diversity)}``,
    or None with ``attribution="none"``. The key was added within schema ``divfast.eval/1``: readers
    of the older reports ignore it, readers of new ones must accept its absence (older reports).

    With ``representation=True`` it holds ``"representation"`` (else None; added within the schema
    the same way): minibatch CKA (paper Eq. 6) between every (member, layer) pair, from Gram matrices
    formed inside the members' forward pass by :class:`divfast.ensembles.features.GramCapture` and
    unbiased HSIC sums (``divfast::hsic``): ``{"kernel", "bandwidth" (None unless rbf), "members",
    "layers" (per member), "names" (G, ``"<member>/<layer>"``), "cka" (G x G), "by_depth" (per
    depth of :func:`divfast.functional.representation.depth_alignment`: the layer of each member
    and their mean cross-member CKA), "mean_cross_member_cka", "batches", "skipped_samples"}``.
    Batches of fewer than 4 samples (a short last batch) are skipped and counted.

    The maps are taken w.r.t. the images in [0, 1] by
    :func:`divfast.attribution.member_attributions` (members in eval mode, gradients enabled even
    under this function's ``no_grad``); each batch costs every member one backward pass more
    (Saliency) or ``ig_steps`` forward and backward passes (Integrated Gradients).

    Args:
        members: the ensemble (:class:`divfast.data.Member`), all predicting the same classes.
        dataset: yields ``(image (3, H, W) in [0, 1], label)``.
        dataset_spec: the dataset's name in the report and in errors.
        batch_size: images per batch (>= 1); the maps of a batch take ``M x`` its memory.
        device: where the members and batches live.
        progress: a progress bar on stderr.
        member_names: names for the report (default: each member's ``name``).
        num_workers: data-loader processes (>= 0).
        attribution: ``"saliency"`` (default), ``"ig"`` (Integrated Gradients from a black
            baseline) or ``"none"`` (no maps, no backward passes).
        ig_steps: Integrated Gradients' integration points (>= 1; checked for every method).
        attribution_target: the class each map explains: ``"label"`` the true label,
            ``"member"`` each member's prediction, ``"ensemble"`` the ensemble's prediction.
        attribution_normalize: ``"none"``, ``"l1"``, ``"l2"`` or ``"max"``: each map scaled by
            its norm before the variance (see :func:`divfast.functional.attribution_diversity`).
        representation: also measure representation similarity (CKA between layers).
        layers: glob patterns of the layers to compare (``named_modules`` names relative to each
            member's model, e.g. ``["layer*"]``), one list for every member or one list per member;
            default: timm's ``feature_info`` stages, else every top-level block.
        cka_kernel: ``"linear"`` or ``"rbf"``; rbf_bandwidth: the RBF width as a fraction of each
            batch's median distance.
        gram_dtype: the dtype of the Gram products of the features (``torch.float32``, the
            default, at twice float64's speed, or ``torch.float64``); see
            :class:`divfast.ensembles.features.GramCapture`.

    Returns:
        The report: plain Python types (floats may be NaN where a measure is undefined).

    Raises:
        DivfastError: bad arguments (``batch_size``, ``num_workers``, the attribution and
            representation options, ``layers`` matching no module, each naming its CLI option),
            members whose classes do not match the dataset's, labels out of range, a member
            producing NaN or +inf logits or non-finite maps; with ``representation``, no batch of
            at least 4 samples (naming ``--batch-size``) or a non-finite layer output.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise DivfastError(f"batch_size (--batch-size): expected >= 1, got {batch_size}")
    if num_workers < 0:
        raise DivfastError(f"num_workers (--workers): expected >= 0, got {num_workers}")
    check_attribution_options(attribution, ig_steps, attribution_target, attribution_normalize)
    check_dataset_classes(members, dataset, dataset_spec)
    check_representation_options(cka_kernel, rbf_bandwidth)
    capture = (GramCapture(members, layers, kernel=cka_kernel, bandwidth=rbf_bandwidth,
                           gram_dtype=gram_dtype, missing="drop" if _has_glob(layers) else "error")
               if representation else None)  # resolves the layers: a bad glob fails before the pass
    m = len(members)
    names = member_names or [mb.name for mb in members]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    num_classes = members[0].info.num_classes
    metric = PredictionDiversity(num_members=m, num_classes=num_classes)
    maps_metric = (None if attribution == "none"
                   else AttributionDiversity(num_members=m, normalize=attribution_normalize))
    top5 = torch.zeros(m, dtype=torch.long)
    ens5 = n = 0
    rep_metric = None  # made at the first batch: a glob's layers that never run are dropped then
    with capture if capture is not None else contextlib.nullcontext():
        for x, y in tqdm(loader, desc=f"eval {dataset_spec}", file=sys.stderr, disable=not progress,
                         leave=False, dynamic_ncols=True):
            x, y = x.to(device), y.to(device)
            with capture.recording() if capture is not None else contextlib.nullcontext():
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
            if capture is not None:
                grams = capture.pop()  # (G, n, n), formed inside the forward pass
                if rep_metric is None:
                    rep_metric = RepresentationSimilarity(capture.names, cka_kernel, rbf_bandwidth)
                rep_metric.update_grams(grams)
            if maps_metric is not None:
                maps_metric.update(_batch_maps(members, x, y, logits, attribution, attribution_target,
                                               ig_steps))  # (M, B, 3, H, W) in, sums kept
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
        "attribution": _attribution_block(maps_metric, attribution, ig_steps, attribution_target,
                                          attribution_normalize),
        "representation": _representation_block(rep_metric, capture, names, cka_kernel, rbf_bandwidth),
    }


def _representation_block(metric: RepresentationSimilarity | None, capture: GramCapture | None,
                          names: list[str], kernel: str, bandwidth: float) -> dict | None:
    if metric is None:
        return None
    if metric.state is None:
        raise DivfastError(f"representation: no batch had the 4 samples the unbiased HSIC needs "
                           f"({metric.skipped} samples seen); use --batch-size >= 4 and a dataset "
                           "of at least 4 images")
    result = metric.compute()
    counts = [len(layers) for layers in capture.layers]
    rows = cross_member_cka_by_depth(result["cka"], counts)
    for row in rows:
        row["layers"] = [capture.layers[i][k] for i, k in enumerate(row.pop("indices"))]
    means = [row["mean_cross_member_cka"] for row in rows if row["mean_cross_member_cka"] is not None]
    # "<member>/<layer>" with the report's member names (member_names may differ from each
    # Member's own name); indices, as GramCapture labels them, when those names are not distinct
    labels = names if len(set(names)) == len(names) and all(names) else None
    grams = capture.names if labels is None else [
        f"{label}/{layer}" for label, layers in zip(labels, capture.layers) for layer in layers]
    return {"kernel": kernel, "bandwidth": bandwidth if kernel == "rbf" else None,
            "members": list(names), "layers": [list(layers) for layers in capture.layers],
            "names": grams, "cka": result["cka"], "by_depth": rows,
            "mean_cross_member_cka": sum(means) / len(means) if means else None,
            "batches": result["batches"], "skipped_samples": result["skipped_samples"]}


def _attribution_block(metric: AttributionDiversity | None, method: str, ig_steps: int,
                       target: str, normalize: str) -> dict | None:
    if metric is None:
        return None
    measures = metric.compute()
    block = {"method": method}
    if method == "ig":
        block["ig_steps"] = ig_steps
    block.update({"target": target, "normalize": normalize, "abs": metric.abs, "ddof": metric.ddof,
                  "diversity": measures["diversity"], "pairwise": measures["pairwise"],
                  "gram": measures["gram"]})
    return block


@dataclass
class AttributionExamples:
    """The first images of a dataset and every member's map of them (for a figure).

    Attributes:
        images: ``(N, 3, H, W)`` float32 in [0, 1], on the CPU.
        labels: ``(N,)`` int64 true labels.
        maps: ``(M, N, 3, H, W)`` float32 absolute maps, on the CPU.
        method, target, ig_steps: how the maps were taken.
    """

    images: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor
    method: str
    target: str
    ig_steps: int


def attribution_examples(members: list[Member], dataset: Dataset, n: int = 4,
                         attribution: str = "saliency", ig_steps: int = 10,
                         attribution_target: str = "label",
                         device: str | torch.device = "cpu") -> AttributionExamples:
    """The maps of the first ``n`` images of ``dataset`` (fewer if it is smaller), for
    :func:`divfast.report.draw_attribution_grid` (paper Figure 11).

    A separate pass over ``n`` images rather than an option of :func:`evaluate`: the report keeps
    one return type and stays plain JSON, and the cost is one batch of ``n`` images. The maps are
    those :func:`evaluate` reduces for the same images (members run in eval mode, so a map does
    not depend on the batch around its image), up to float rounding.

    Raises:
        DivfastError: ``n`` < 1, ``attribution="none"`` (no maps to take), or a bad option.
    """
    check_attribution_options(attribution, ig_steps, attribution_target, "none")
    if attribution == "none":
        raise DivfastError("attribution (--attribution): 'none' takes no maps to show")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DivfastError(f"n: expected an int >= 1, got {n!r}")
    first = Subset(dataset, range(min(n, len(dataset))))
    if len(first) == 0:
        raise DivfastError("--dataset: the dataset has no samples")
    x, y = next(iter(DataLoader(first, batch_size=len(first), shuffle=False)))
    x, y = x.to(device), y.to(device)
    with torch.no_grad():  # the classes the maps explain, chosen as evaluate() chooses them
        logits = torch.stack([member(x).float() for member in members])  # (M, N, C)
    maps = _batch_maps(members, x, y, logits, attribution, attribution_target,
                       ig_steps)  # (M, N, 3, H, W)
    return AttributionExamples(images=x.float().cpu(), labels=y.cpu(), maps=maps.cpu(),
                               method=attribution, target=attribution_target, ig_steps=ig_steps)
