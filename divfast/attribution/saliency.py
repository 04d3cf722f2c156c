"""Saliency (Simonyan et al. 2014): the gradient of the target logit w.r.t. the input image.

The fast path takes each chunk of the batch through a member once and back once: the gradient of
``Σ_b logits[b, target[b]]`` w.r.t. the chunk is, row by row, the gradient of each sample's own
logit, because in eval mode no sample's logits depend on another sample's pixels. captum's
``Saliency`` gets the same numbers from ``torch.autograd.grad`` over the unbound per-sample outputs;
the captum backend here calls it, for comparison and as a reference.
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) -> logits (N, C)


def input_gradient(forward: Forward, x: torch.Tensor,
                   target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each row's target logit w.r.t. that row of ``x``, in one backward pass.

    Args:
        forward: the member (wrapped so its logits are checked).
        x: a leaf tensor ``(N, 3, H, W)`` with ``requires_grad=True``.
        target: class per row ``(N,)`` int64, or None for the argmax of this very forward pass
            (saves a separate prediction pass when attributing each member's own prediction).

    Returns:
        The gradient ``(N, 3, H, W)`` and the targets used ``(N,)``.
    """
    logits = forward(x)  # (N, C)
    if target is None:
        target = logits.detach().argmax(dim=1)  # (N,) first maximum wins a tie, as torch.argmax
    selected = logits.gather(1, target[:, None]).sum()
    if not selected.requires_grad:  # logits that ignore the pixels: their saliency is zero
        return torch.zeros_like(x), target
    # Gradients w.r.t. x only: autograd prunes the weight gradients and never touches .grad.
    (grad,) = torch.autograd.grad(selected, x, allow_unused=True)  # (N, 3, H, W)
    if grad is None:  # the logits depend on parameters but not on these pixels
        grad = torch.zeros_like(x)
    return grad, target


def fast_saliency(forward: Forward, images: torch.Tensor, target: torch.Tensor | None,
                  chunk: int) -> torch.Tensor:
    """Input gradients of one member for a batch, ``chunk`` images per forward/backward pass.

    Args:
        forward: the member.
        images: ``(B, 3, H, W)`` in [0, 1].
        target: ``(B,)`` int64, or None for the member's own prediction.
        chunk: at most this many images per pass.

    Returns:
        The signed gradients ``(B, 3, H, W)`` in the images' dtype.
    """
    grads = torch.empty_like(images)  # (B, 3, H, W)
    for start in range(0, images.shape[0], chunk):
        stop = min(start + chunk, images.shape[0])
        x = images[start:stop].detach().requires_grad_()  # (n, 3, H, W) a fresh leaf
        part = None if target is None else target[start:stop]
        grads[start:stop] = input_gradient(forward, x, part)[0]
    return grads


def captum_saliency(forward: Forward, images: torch.Tensor, target: torch.Tensor, chunk: int,
                    abs: bool) -> torch.Tensor:
    """captum's ``Saliency`` on chunks of ``chunk`` images (captum itself has no internal batching).

    Returns:
        ``(B, 3, H, W)``: absolute gradients when ``abs``, as captum computes them.
    """
    from captum.attr import Saliency

    saliency = Saliency(forward)
    maps = torch.empty_like(images)  # (B, 3, H, W)
    for start in range(0, images.shape[0], chunk):
        stop = min(start + chunk, images.shape[0])
        # Already requiring grad: captum would otherwise set it and warn on every call.
        x = images[start:stop].detach().requires_grad_()
        maps[start:stop] = saliency.attribute(x, target=target[start:stop], abs=abs).detach()
    return maps
