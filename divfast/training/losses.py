"""Ensemble training losses: a registry that feeds ``divfast train --loss``.

Each loss maps member logits ``(M, B, C)`` and targets ``(B,)`` to a scalar and a dict of named terms
(floats, for the log). ``independent`` is paper Eq. 1 summed over members, so each member receives
exactly the gradient of its own cross-entropy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from divfast.errors import DivfastError

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
_REGISTRY: dict[str, Callable[..., LossFn]] = {}


def register_loss(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def list_losses() -> list[str]:
    return sorted(_REGISTRY)


def build_loss(name: str, **options) -> LossFn:
    """The loss called ``name``; unknown names raise an error listing the valid ones."""
    if name not in _REGISTRY:
        raise DivfastError(f"--loss: unknown loss {name!r}; expected one of: "
                           f"{', '.join(list_losses())}")
    return _REGISTRY[name](**options)


@register_loss("independent")
def independent_loss() -> LossFn:
    """Eq. 1: sum_i CE(h_i, y); members do not interact."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        m, b, c = logits.shape
        per_member = F.cross_entropy(logits.reshape(m * b, c), target.repeat(m),
                                     reduction="none").view(m, b).mean(dim=1)  # (M,)
        return per_member.sum(), {"member_ce": [float(x) for x in per_member.detach()]}

    return loss
