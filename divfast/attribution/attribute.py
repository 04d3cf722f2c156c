"""Attribution maps of every ensemble member for a batch: Saliency or Integrated Gradients.

Maps are taken w.r.t. the images the members receive, in [0, 1] and before each member's own
resize and normalisation (see :class:`divfast.data.Member`), so members with different input sizes
give maps of the same shape, which stack into ``(M, B, 3, H, W)`` for the attribution statistics
(paper Eq. 7).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from divfast.attribution.integrated_gradients import (captum_integrated_gradients,
                                                      fast_integrated_gradients)
from divfast.attribution.saliency import captum_saliency, fast_saliency
from divfast.errors import DivfastError

TARGETS = ("label", "member", "ensemble")
METHODS = ("saliency", "ig")
BACKENDS = ("fast", "captum")


def member_attributions(members: list[nn.Module], images: torch.Tensor, target: str = "label",
                        labels: torch.Tensor | None = None, method: str = "saliency",
                        abs: bool = True, ig_steps: int = 50,
                        internal_batch_size: int | None = None,
                        backend: str = "fast") -> torch.Tensor:
    """The attribution map of every member for every image.

    ``method="saliency"`` is the gradient of the target logit w.r.t. the input pixels.
    ``method="ig"`` is Integrated Gradients from a black (all-zero) baseline with ``ig_steps``
    Gauss-Legendre points, captum's default rule; ``ig_steps=1`` is a single gradient at half the
    image, times the image.

    The ``"fast"`` backend (default) computes a member's maps for a whole chunk of images in one
    forward and one ``torch.autograd.grad`` call on the sum of the selected logits. That is exact
    only when samples do not interact inside the model, which BatchNorm in train mode breaks, so
    every member runs in eval mode during the call (each submodule's mode is restored afterwards).
    The ``"captum"`` backend calls ``captum.attr.Saliency`` / ``IntegratedGradients`` per member;
    the two agree to float rounding.

    Gradients are taken w.r.t. the images only: parameters' ``.grad`` are left as they were, and the
    maps are detached. The call enables autograd itself, so it works inside ``torch.no_grad()``.

    Args:
        members: the classifiers, each mapping images ``(N, 3, H, W)`` in [0, 1] to logits
            ``(N, C)``, all with the same ``C`` (e.g. :class:`divfast.data.Member`).
        images: ``(B, 3, H, W)`` floating point, finite, on the members' device.
        target: which class each map explains: ``"label"`` the true label (needs ``labels``);
            ``"member"`` each member's own prediction (argmax of its logits on the image);
            ``"ensemble"`` the ensemble's prediction: the argmax of the members' averaged logits
            (the consensus the paper and :func:`divfast.ensembles.evaluate` use), one target
            shared by all members.
            Ties go to the lowest class index (``torch.argmax``). ``"ensemble"`` costs one extra
            no-grad forward pass per member, as does ``"member"`` except with fast Saliency,
            which takes the argmax of its own gradient pass.
        labels: ``(B,)`` integer labels in ``[0, C)``; used only by ``target="label"``.
        method: ``"saliency"`` or ``"ig"``.
        abs: return absolute values (captum Saliency's default), applied after IG too, as the
            paper uses absolute attributions. ``False`` keeps the sign.
        ig_steps: the number of IG integration points (the paper uses 1, 2, 10 and 50); >= 1.
        internal_batch_size: at most this many images (for IG: scaled images) go through a member
            in one forward/backward pass, bounding memory. Default None means ``B``: Saliency takes
            the batch at once and IG takes one scaled copy of the batch per pass, so IG's peak
            memory matches Saliency's. Results do not depend on it beyond float rounding.
        backend: ``"fast"`` (ours, no captum needed) or ``"captum"``.

    Returns:
        ``(M, B, 3, H, W)`` float32 maps on the images' device: member ``i``'s map of image ``b``
        is ``out[i, b]``.

    Raises:
        DivfastError: naming the argument: an empty or non-module ``members``; ``images`` not a
            finite floating ``(B, 3, H, W)`` tensor; ``labels`` missing, of the wrong shape or
            dtype, or outside ``[0, C)`` for ``target="label"``; an unknown ``target``,
            ``method`` or ``backend``; ``ig_steps`` or ``internal_batch_size`` < 1; members whose
            logits are not ``(N, C)`` or disagree in ``C``; a member whose map is not finite
            (NaN/inf gradients), named by index and name.

    Example:
        >>> from divfast.data.members import create_member
        >>> members = [create_member("resnet10t", 10, (3, 32, 32)),
        ...            create_member("resnet10t", 10, (3, 24, 24))]
        >>> images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        >>> member_attributions(members, images, labels=labels).shape
        torch.Size([2, 4, 3, 32, 32])
    """
    _check_arguments(members, images, target, labels, method, ig_steps, internal_batch_size,
                     backend)
    batch = images.shape[0]
    out = torch.zeros((len(members),) + tuple(images.shape), dtype=torch.float32,
                      device=images.device)  # (M, B, 3, H, W)
    if batch == 0:
        return out
    chunk = batch if internal_batch_size is None else internal_batch_size
    checker = _LogitsCheck(members, labels if target == "label" else None)
    fused_prediction = target == "member" and method == "saliency" and backend == "fast"
    with torch.enable_grad(), _eval_mode(members):
        classes = None  # (B,) the class each map explains (per member for target="member")
        if target == "label":
            classes = labels.to(device=images.device, dtype=torch.long)
        elif target == "ensemble":
            classes = _ensemble_prediction(members, images, chunk, checker)
        for i in range(len(members)):
            forward = checker.forward(i)
            if target == "member" and not fused_prediction:
                classes = _prediction(forward, images, chunk)  # (B,) an extra no-grad pass
            # Fast Saliency of each member's own prediction takes the argmax of its gradient pass.
            if method == "saliency" and backend == "fast":
                maps = fast_saliency(forward, images, None if fused_prediction else classes, chunk)
            elif method == "saliency":
                maps = captum_saliency(forward, images, classes, chunk, abs)
            elif backend == "fast":
                maps = fast_integrated_gradients(forward, images, classes, ig_steps, chunk)
            else:
                maps = captum_integrated_gradients(forward, images, classes, ig_steps, chunk)
            if not bool(torch.isfinite(maps).all()):
                raise DivfastError(f"members: {_describe(members, i)} gave non-finite (NaN or "
                                   f"inf) {method} attributions; its weights or logits may be "
                                   "corrupt")
            # captum's Saliency already took the absolute value (abs is idempotent anyway).
            out[i] = maps.abs() if abs else maps  # (B, 3, H, W)
    return out


def _check_arguments(members, images, target, labels, method, ig_steps, internal_batch_size,
                     backend) -> None:
    if not isinstance(members, (list, tuple)):
        raise DivfastError(f"members: expected a list of models, got {type(members).__name__}")
    if len(members) == 0:
        raise DivfastError("members: expected at least one model, got an empty list")
    for i, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise DivfastError(f"members: members[{i}] is a {type(member).__name__}, expected an "
                               "nn.Module")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DivfastError(f"images: expected a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise DivfastError(f"images: expected a floating point tensor, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise DivfastError("images: contains NaN or infinite values")
    if target not in TARGETS:
        raise DivfastError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise DivfastError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if backend not in BACKENDS:
        raise DivfastError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise DivfastError(f"ig_steps: expected an int >= 1, got {ig_steps!r}")
    if internal_batch_size is not None and (isinstance(internal_batch_size, bool)
                                            or not isinstance(internal_batch_size, int)
                                            or internal_batch_size < 1):
        raise DivfastError(f"internal_batch_size: expected None or an int >= 1, got "
                           f"{internal_batch_size!r}")
    if target == "label":
        if labels is None:
            raise DivfastError("labels: target='label' needs the true labels (B,); pass labels, "
                               "or use target='member' or 'ensemble'")
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            shape = (tuple(labels.shape) if isinstance(labels, torch.Tensor)
                     else type(labels).__name__)
            raise DivfastError(f"labels: expected shape ({images.shape[0]},) (one per image), "
                               f"got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DivfastError(f"labels: expected an integer tensor, got {labels.dtype}")
    if backend == "captum":
        try:
            import captum.attr  # noqa: F401
        except ImportError as exc:
            raise DivfastError("backend: 'captum' needs the captum package, which is not "
                               "installed; use backend='fast'") from exc


def _describe(members, index: int) -> str:
    name = getattr(members[index], "name", None)
    return f"members[{index}] ({name if isinstance(name, str) else type(members[index]).__name__})"


class _LogitsCheck:
    """Wraps each member so every output is checked: logits ``(N, C)``, the same ``C`` for all
    members, and (for ``target="label"``) the labels inside ``[0, C)`` once ``C`` is known."""

    def __init__(self, members, labels: torch.Tensor | None):
        self.members = members
        self.labels = labels
        self.num_classes: int | None = None
        self.first: int | None = None

    def forward(self, index: int):
        member = self.members[index]

        def checked(x: torch.Tensor) -> torch.Tensor:
            logits = member(x)  # (N, C)
            self.check(logits, index, x.shape[0])
            return logits

        return checked

    def check(self, logits: torch.Tensor, index: int, rows: int) -> None:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != rows:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise DivfastError(f"members: {_describe(self.members, index)} returned {shape} for "
                               f"{rows} images; expected logits ({rows}, num_classes)")
        classes = logits.shape[1]
        if self.num_classes is None:
            self.num_classes, self.first = classes, index
            if self.labels is not None and self.labels.numel():
                low, high = int(self.labels.min()), int(self.labels.max())
                if low < 0 or high >= classes:
                    raise DivfastError(f"labels: expected values in [0, {classes}) (the members' "
                                       f"classes), got values in [{low}, {high}]")
        elif classes != self.num_classes:
            raise DivfastError(f"members: {_describe(self.members, index)} predicts {classes} "
                               f"classes but {_describe(self.members, self.first)} predicts "
                               f"{self.num_classes}; every member must share the class count")


@contextlib.contextmanager
def _eval_mode(members) -> Iterator[None]:
    """Runs with every member in eval mode, then restores each submodule's own mode (a model in
    train mode may hold frozen submodules in eval; ``train(mode)`` alone would flatten that)."""
    modes = [(module, module.training) for member in members for module in member.modules()]
    try:
        for member in members:
            member.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def _logits(forward, images: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([forward(images[s:s + chunk]) for s in range(0, images.shape[0], chunk)])


def _prediction(forward, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """A member's own predicted class per image ``(B,)``."""
    return _logits(forward, images, chunk).argmax(dim=1)


def _ensemble_prediction(members, images: torch.Tensor, chunk: int,
                         checker: _LogitsCheck) -> torch.Tensor:
    """Argmax of the members' averaged logits ``(B,)``: the ensemble evaluate() scores."""
    logits = torch.stack([_logits(checker.forward(i), images, chunk).float()
                          for i in range(len(members))])  # (M, B, C)
    return logits.mean(dim=0).argmax(dim=1)
