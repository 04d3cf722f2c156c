"""``divfast::attribution_stats``: attribution diversity (paper Eq. 7) and the member Gram, in one read."""

from __future__ import annotations

import torch

from divfast._ops import reference
from divfast._ops._load import use_kernel


def _attribution_stats_fake(attributions, abs=True, normalize="none", ddof=0):
    torch._check(attributions.dim() >= 2, lambda: "attributions must be (M, B, ...)")
    m, b = attributions.shape[0], attributions.shape[1]
    return (attributions.new_empty((b,), dtype=torch.float64),
            attributions.new_empty((m, m), dtype=torch.float64))


def _setup_context(ctx, inputs, output):
    attributions, abs_, normalize, ddof = inputs
    ctx.save_for_backward(attributions)
    ctx.options = (abs_, normalize, ddof)


def _backward(ctx, grad_variance, grad_gram):
    """Gradients through the maps actually compared: ``x = normalise(|a|)`` (reference code, so every
    normalisation differentiates the same way), then the closed forms with ``c = x - mean_m x``:
    d var_b / d x_mbd = 2 c_mbd / (M - ddof), and for the centred Gram ``G = c c^T`` the gradient
    ``(S c)`` with S = g + g^T, centred again over members (the centring is a projection)."""
    (attributions,) = ctx.saved_tensors
    abs_, normalize, ddof = ctx.options
    higher = torch.is_grad_enabled()  # double backward (create_graph=True): keep the graph
    with torch.enable_grad():
        a = attributions if higher and attributions.requires_grad else attributions.detach().requires_grad_(True)
        x = reference.attribution_maps(a, abs_, normalize)  # (M, B, D) float64
        m = x.shape[0]
        centred = x - x.mean(dim=0, keepdim=True)
        grad_x = torch.zeros_like(x)
        if grad_variance is not None:
            grad_x = grad_x + (2.0 / (m - ddof)) * grad_variance.view(1, -1, 1) * centred
        if grad_gram is not None:
            sym = grad_gram + grad_gram.T  # (M, M)
            grad_c = (sym @ centred.reshape(m, -1)).view_as(x)
            grad_x = grad_x + grad_c - grad_c.mean(dim=0, keepdim=True)
        if not higher:
            grad_x = grad_x.detach()
        (grad_a,) = torch.autograd.grad(x, a, grad_x, create_graph=higher)
    return (grad_a if higher else grad_a.detach()), None, None, None


def register_fake_kernel() -> None:
    """Shape function and autograd formula; called once by _load after divfast._C."""
    torch.library.register_fake("divfast::attribution_stats")(_attribution_stats_fake)
    torch.library.register_autograd("divfast::attribution_stats", _backward, setup_context=_setup_context)


def attribution_stats(attributions: torch.Tensor, abs: bool = True, normalize: str = "none",
                      ddof: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample attribution diversity and the member Gram matrix, from one read of the maps (two
    with a normalisation: the norms come first).

    For each sample b, the variance across the M members of every pixel of the (processed) maps,
    summed over channels and pixels: paper Eq. 7 before averaging over samples. The Gram matrix
    ``G_ij = sum over samples and pixels of c_i c_j``, with ``c`` the maps centred at each pixel on
    the members' mean, gives the same sum for any subset S of the members:
    ``sum Var_S = (1/|S|) sum_{i in S} G_ii - (1/|S|^2) sum_{i,j in S} G_ij`` (ddof 0) — a variance is
    blind to a common shift, and centring keeps the formula free of cancellation between large
    entries when members differ by a small fraction of their values.

    Args:
        attributions: ``(M, B, C, H, W)`` (any trailing shape) float16, bfloat16, float32 or float64.
        abs: compare ``|a|`` (captum's Saliency default), else the signed maps.
        normalize: ``"none"``, ``"l1"``, ``"l2"`` or ``"max"``: each map divided by its l1 norm, l2
            norm or largest absolute value first, so members with larger gradients do not dominate;
            a map whose norm is 0 stays 0.
        ddof: 0 (population variance across members, the default: the Gram identity above holds
            for it) or 1 (unbiased; needs M >= 2).

    Returns:
        ``(variance, gram)``: variance ``(B,)`` float64, gram ``(M, M)`` float64 (of the centred
        maps, so a single member's is 0 and every row sums to 0). Differentiable
        with respect to ``attributions`` (the variance serves as a training penalty, paper Eq. 8).

    Raises:
        ValueError: bad shapes, ``normalize`` or ``ddof``; NaN or infinite maps.
        TypeError: maps that are not floating point.

    Example:
        >>> maps = torch.rand(3, 4, 3, 8, 8)  # 3 members, 4 images
        >>> variance, gram = attribution_stats(maps, normalize="l1")
        >>> variance.shape, gram.shape
        (torch.Size([4]), torch.Size([3, 3]))
    """
    if use_kernel("attribution_stats", attributions.device):
        return torch.ops.divfast.attribution_stats(attributions, abs, normalize, ddof)
    return reference.attribution_stats(attributions, abs, normalize, ddof)
