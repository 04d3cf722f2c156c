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


OPS = [
    OpCase("pair_counts", reference.pair_counts, _pair_counts_samples),
]
