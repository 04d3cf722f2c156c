"""``divfast::hsic``: the unbiased HSIC of every pair of a batch's Gram matrices, in one read of them."""

from __future__ import annotations

import torch

from divfast._ops import reference
from divfast._ops._load import use_kernel


def _hsic_fake(grams):
    torch._check(grams.dim() == 3, lambda: "grams must be (G, n, n)")
    g = grams.shape[0]
    return grams.new_empty((g, g), dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    (grams,) = inputs
    ctx.save_for_backward(grams)


def _backward(ctx, grad):
    """Through the reference's expression (HSIC is bilinear in the pair of Grams), so first and higher
    derivatives agree with it."""
    (grams,) = ctx.saved_tensors
    higher = torch.is_grad_enabled()
    with torch.enable_grad():
        g = grams if higher and grams.requires_grad else grams.detach().requires_grad_(True)
        out = reference.hsic_expression(g)
        (grad_g,) = torch.autograd.grad(out, g, grad, create_graph=higher)
    return grad_g if higher else grad_g.detach()


def register_fake_kernel() -> None:
    """Shape function and autograd formula; called once by _load after divfast._C."""
    torch.library.register_fake("divfast::hsic")(_hsic_fake)
    torch.library.register_autograd("divfast::hsic", _backward, setup_context=_setup_context)


def hsic(grams: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC (Song et al. 2012) of every pair of G Gram matrices of one batch.

    For Grams K, L of the same n samples, with K~ the Gram with its diagonal zeroed::

        HSIC(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) (K~1)'(L~1)] / (n(n-3))

    The compiled kernels fold the U-centring into those inner products and never write a centred
    copy; the CPU kernel streams only the upper triangles (a Gram is symmetric). Only the symmetric
    part ``(K + K')/2`` of each input enters, so a Gram that rounding left slightly asymmetric is
    treated consistently. The expansion subtracts terms of similar size when the features share a
    large common offset; centre the features over the batch before forming the Grams (the HSIC is
    unchanged, see :func:`divfast.functional.representation.gram_matrices`).

    Args:
        grams: ``(G, n, n)`` float16, bfloat16, float32 or float64, n >= 4.

    Returns:
        ``(G, G)`` float64, symmetric. Differentiable with respect to ``grams``.

    Raises:
        ValueError: a bad shape, n < 4, NaN or infinite entries, or products overflowing float64.
        TypeError: Grams that are not floating point.

    Example:
        >>> x = torch.randn(16, 5, dtype=torch.float64)
        >>> out = hsic(torch.stack([x @ x.T, 2 * x @ x.T]))
        >>> torch.allclose(out[0, 1], 2 * out[0, 0])
        True
    """
    if use_kernel("hsic", grams.device):
        return torch.ops.divfast.hsic(grams)
    return reference.hsic(grams)
