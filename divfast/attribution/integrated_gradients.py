"""Integrated Gradients (Sundararajan et al. 2017) from a black (all-zero) baseline.

    IG(x) = x ⊙ ∫₀¹ ∇f(αx) dα  ≈  x ⊙ Σ_k w_k ∇f(α_k x)

The integral uses captum's default rule, Gauss-Legendre quadrature on [0, 1]: nodes
``α_k = (1 + t_k) / 2`` and weights ``w_k = v_k / 2`` from ``numpy.polynomial.legendre.leggauss(n)``
(``t_k`` ascending in [-1, 1]). Unlike the Riemann rules, it accepts ``n = 1`` (a single gradient at
``x / 2``, weight 1) and never evaluates the end points.

Memory stays bounded by taking the ``n_steps * B`` scaled images through a member in chunks. The
rows are ordered step-major (all samples at ``α_0``, then all at ``α_1``, ...), as captum orders
them.
"""

from __future__ import annotations

import numpy as np
import torch

from divfast.attribution.saliency import Forward, input_gradient


def gauss_legendre(n_steps: int) -> tuple[list[float], list[float]]:
    """Nodes ``α`` in (0, 1), ascending, and weights summing to 1: the rule captum's
    ``IntegratedGradients`` uses by default (``method="gausslegendre"``)."""
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()


def _chunk_spans(start: int, stop: int, batch: int) -> list[tuple[int, int, int]]:
    """Splits rows ``[start, stop)`` of the step-major ``(step, sample)`` grid into runs
    ``(step, first_sample, end_sample)`` that each lie within one step."""
    spans = []
    row = start
    while row < stop:
        step, first = divmod(row, batch)
        end = min(batch, first + stop - row)
        spans.append((step, first, end))
        row += end - first
    return spans


def fast_integrated_gradients(forward: Forward, images: torch.Tensor, target: torch.Tensor,
                              n_steps: int, chunk: int) -> torch.Tensor:
    """Integrated Gradients of one member, ``chunk`` scaled images per forward/backward pass.

    Each chunk is one Saliency pass (one autograd call for all its rows); its rows may mix steps and
    need not hold whole steps, so any ``chunk >= 1`` works.

    Args:
        forward: the member.
        images: ``(B, 3, H, W)`` in [0, 1].
        target: ``(B,)`` int64, the class attributed for each image at every step.
        n_steps: quadrature points, >= 1.
        chunk: at most this many scaled images per pass.

    Returns:
        Signed attributions ``(B, 3, H, W)`` in the images' dtype.
    """
    alphas, weights = gauss_legendre(n_steps)
    batch = images.shape[0]
    x = images.detach()
    total = torch.zeros_like(x)  # (B, 3, H, W) Σ_k w_k ∇f(α_k x)
    for start in range(0, n_steps * batch, chunk):
        spans = _chunk_spans(start, min(start + chunk, n_steps * batch), batch)
        # Python-float α times the image, as captum's `baseline + alpha * (input - baseline)`.
        scaled = torch.cat([alphas[k] * x[a:b] for k, a, b in spans])  # (n, 3, H, W)
        scaled.requires_grad_()
        rows_target = torch.cat([target[a:b] for _, a, b in spans])  # (n,)
        grad = input_gradient(forward, scaled, rows_target)[0]  # (n, 3, H, W)
        offset = 0
        for k, a, b in spans:
            total[a:b] += weights[k] * grad[offset:offset + b - a]
            offset += b - a
    return x * total  # (B, 3, H, W) the baseline is 0, so (x - baseline) is x


def captum_integrated_gradients(forward: Forward, images: torch.Tensor, target: torch.Tensor,
                                n_steps: int, chunk: int) -> torch.Tensor:
    """captum's ``IntegratedGradients`` (zero baseline, Gauss-Legendre) with at most ``chunk``
    scaled images per pass.

    captum batches whole steps of the batch it is given (``internal_batch_size // batch`` steps per
    pass, at least one), so batches larger than ``chunk`` are first cut into sub-batches of
    ``chunk`` images.

    Returns:
        Signed attributions ``(B, 3, H, W)``.
    """
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(forward)
    maps = torch.empty_like(images)  # (B, 3, H, W)
    for start in range(0, images.shape[0], chunk):
        stop = min(start + chunk, images.shape[0])
        maps[start:stop] = ig.attribute(images[start:stop].detach(), baselines=None,
                                        target=target[start:stop], n_steps=n_steps,
                                        method="gausslegendre",
                                        internal_batch_size=chunk).detach()
    return maps
