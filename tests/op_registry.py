"""One registry of divfast's ops and their sample inputs; it drives the cross-cutting op tests
(tests/test_ops_registry.py) the way timm's tests parametrise over ``list_models``.

A new op adds one ``OpCase`` here; test_ops_registry fails until it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from divfast._ops import reference


@dataclass(frozen=True)
class OpCase:
    name: str  # divfast::<name>
    reference: Callable
    samples: Callable[[torch.device, torch.Generator], list[tuple]]  # positional args per sample
    exact: bool = True  # compare with torch.equal (counts) rather than allclose
    tolerance: dict | None = None  # assert_close's rtol/atol where not exact


def _pair_counts_samples(device, gen):
    def target(b, c):
        return torch.randint(0, c, (b,), generator=gen).to(device)

    return [
        (torch.randn(3, 70, 5, generator=gen).to(device), target(70, 5), -1),
        (torch.randint(0, 4, (2, 9), generator=gen).to(device), target(9, 4), 4),
        (torch.randn(65, 4, 7, generator=gen, dtype=torch.float64).to(device).transpose(0, 1),
         target(65, 7), 7),  # non-contiguous
        (torch.randn(1, 0, 3, generator=gen).to(torch.float16).to(device), target(0, 3), -1),
        (torch.randn(2, 5, 3, generator=gen).to(torch.bfloat16).to(device), target(5, 3), -1),
    ]


def _attribution_stats_samples(device, gen):
    def maps(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    grad = maps(3, 2, 2, 3, 3, dtype=torch.float64).requires_grad_(True)  # autograd registration
    return [
        (maps(3, 4, 3, 5, 7), True, "none", 0),
        (maps(2, 3, 1, 9, 11, dtype=torch.float64), False, "l2", 1),
        (maps(5, 2, 3, 4, 4, dtype=torch.float16), True, "l1", 0),
        (maps(4, 3, 2, 6, 3, dtype=torch.bfloat16), True, "max", 0),
        (maps(3, 6, 3, 8, 2).transpose(3, 4), True, "l1", 0),  # non-contiguous
        (maps(2, 0, 3, 4, 4), True, "none", 0),  # empty batch
        (grad, True, "l2", 0),
    ]


def _hsic_samples(device, gen):
    def grams(g, n, dtype=torch.float32, symmetric=True):
        x = torch.randn(g, n, n, generator=gen, dtype=torch.float64)
        if symmetric:
            x = x @ x.transpose(1, 2) / n
        return x.to(dtype).to(device)

    grad = grams(3, 6, dtype=torch.float64).requires_grad_(True)  # autograd registration
    return [
        (grams(3, 8),),
        (grams(5, 4, dtype=torch.float64),),  # the smallest batch
        (grams(7, 13, dtype=torch.float64, symmetric=False),),  # only the symmetric part enters
        (grams(4, 9, dtype=torch.float16),),
        (grams(2, 10, dtype=torch.bfloat16),),
        (grams(4, 11).transpose(1, 2),),  # non-contiguous
        (grams(0, 6),),  # no representations
        (grad,),
    ]


def _ensemble_sweep_samples(device, gen):
    def logits(k, n, c, dtype=torch.float32):
        return torch.randn(k, n, c, generator=gen, dtype=torch.float64).to(dtype).to(device)

    def target(n, c):
        return torch.randint(0, c, (n,), generator=gen).to(device)

    triples = torch.tensor([[0, 1, 2], [3, 1, 0], [2, 3, 4]], dtype=torch.int64).to(device)
    return [
        (logits(5, 37, 11), target(37, 11), triples, "average"),
        (logits(5, 20, 300, torch.float64), target(20, 300), triples, "vote"),
        (logits(5, 9, 4, torch.float16), target(9, 4), triples[:, :2], "median"),
        (logits(5, 7, 6, torch.bfloat16), target(7, 6), triples, "geometric"),
        (logits(9, 5, 3).transpose(0, 1)[:5], target(9, 3), triples, "vote"),  # non-contiguous
        (logits(5, 0, 3), target(0, 3), triples, "average"),  # no samples
    ]


OPS = [
    OpCase("pair_counts", reference.pair_counts, _pair_counts_samples),
    OpCase("attribution_stats", reference.attribution_stats, _attribution_stats_samples, exact=False,
           tolerance={"rtol": 1e-5, "atol": 1e-6}),
    OpCase("hsic", reference.hsic, _hsic_samples, exact=False, tolerance={"rtol": 1e-9, "atol": 1e-12}),
    OpCase("ensemble_sweep", reference.ensemble_sweep, _ensemble_sweep_samples),
]
