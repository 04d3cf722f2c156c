"""Ensemble training losses: a registry that feeds ``divfast train --loss``.

A loss is called as ``loss(logits, target, inputs=None)`` with the members' logits ``(M, B, C)``
(stacked in member order, computed from ``inputs``), the labels ``(B,)`` and — only for losses whose
``needs_inputs`` is true — the input batch ``(B, 3, H, W)`` the logits came from, which then must
require grad. It returns the scalar to minimise and a dict of named terms (floats, for the log).

The losses (paper section 2.1 and Eq. 8; M members h_i, consensus f, cross-entropy l):

* ``independent`` (Eq. 1): ``sum_i l(h_i, y)``; members do not interact, each receives exactly the
  gradient of its own cross-entropy.
* ``gncl`` (Eq. 2, Buschjäger et al. 2020): ``sum_i l(h_i, y) - lambda/(2M) sum_i d_i^T D d_i`` with
  ``d_i = h_i - f`` and D the Hessian of the softmax cross-entropy w.r.t. the logits at f,
  ``D = diag(p) - p p^T`` with ``p = softmax(f)``. The quadratic form is evaluated in O(C) as
  ``sum_c p_c d_c^2 - (p^T d)^2``; the B x C x C Hessian is never formed.
* ``gncl-masked``: as ``gncl`` (the paper uses the average consensus; any rule is accepted), but
  member i's penalty term is switched off on the samples it misclassifies (paper section 4.3 f).
* ``balanced`` (Eq. 3): ``lambda l(f, y) + (1 - lambda)/M sum_i l(h_i, y)``.
* ``attribution`` (Eq. 8): ``1/M sum_i l(h_i, y) - lambda A`` where A is the batch mean of paper
  Eq. 7 — the variance across members of their Saliency maps, summed over pixels — computed with
  double backpropagation through :func:`divfast._ops.attribution_stats`.

Consensus f in logit space, per ``consensus``:

* ``average``: the mean of the members' logits (the paper's averaging).
* ``geometric``: the mean of the members' log-softmax; its softmax is the renormalised geometric mean
  of the members' probabilities. It differs from the average only by a per-sample constant, and D
  annihilates constants (``D 1 = 0``), so ``gncl`` with ``geometric`` equals ``gncl`` with ``average``
  exactly (up to rounding); so does ``balanced``: its ensemble term ``l(f, y)`` reads f through a
  softmax, which is blind to the same constant. For the losses the two rules are one.
* ``median``: the per-class median of the logits (even M: mean of the two middle values). A median is
  differentiable almost everywhere: the gradient reaches the member(s) holding the median value.
* ``vote``: a vote is piecewise constant, so it has no useful gradient. f is the mean logits of the
  members that voted for the winning class (ties as :func:`divfast.ensembles.consensus`: most votes,
  then the highest summed logits, then the lowest index); the choice of members is held fixed and the
  gradient flows through their logits.

The Hessian D is evaluated at f and held constant (``p`` is detached): the penalty is then a
D-weighted spread of the members around f, and its gradient w.r.t. member i is ``-lambda/M * D d_i``
(the spread's gradient through f sums to zero for the average). The explicit-Hessian tests use the same
convention.

lambda defaults to the paper's 0.2.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from divfast.errors import DivfastError

_REGISTRY: dict[str, Callable[..., "EnsembleLoss"]] = {}
CONSENSUS_CHOICES = ("average", "median", "geometric", "vote")
DEFAULT_LAMBDA = 0.2


def register_loss(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def list_losses() -> list[str]:
    return sorted(_REGISTRY)


def build_loss(name: str, **options) -> "EnsembleLoss":
    """The loss called ``name`` with its options (``lam``, ``consensus``, ...); unknown names and bad
    options raise an error naming the CLI option and the valid values."""
    if name not in _REGISTRY:
        raise DivfastError(f"--loss: unknown loss {name!r}; expected one of: "
                           f"{', '.join(list_losses())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:  # an option this loss does not take
        raise DivfastError(f"--loss {name}: {exc}") from None


class EnsembleLoss:
    """Base class: ``__call__(logits (M,B,C), target (B,), inputs=None) -> (loss, terms)``.

    ``set_epoch`` tells the loss where training stands (for warm-ups); ``needs_inputs`` asks the
    trainer for the input batch with ``requires_grad`` set.
    """

    name = "loss"
    needs_inputs = False

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def options(self) -> dict:
        """The options that define this loss, for run.json and the checkpoint metadata."""
        return {}

    def epoch_check(self, terms: dict) -> str | None:
        """Given an epoch's mean terms, the reason to stop the run, or None to go on."""
        return None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        _check_batch(logits, target)
        return self.compute(logits, target, inputs)

    def compute(self, logits, target, inputs):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_batch(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[0] < 1 or logits.shape[2] < 2:
        raise DivfastError(f"logits: expected (M, B, C) with M >= 1 and C >= 2, "
                           f"got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[1]:
        raise DivfastError(f"target: expected ({logits.shape[1]},) labels, got {tuple(target.shape)}")


def _check_lambda(lam: float, low: float, high: float | None, name: str) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < low or (high is not None and lam > high):
        upper = f"{high:g}" if high is not None else "inf"
        raise DivfastError(f"--lambda: the {name} loss expects lambda in [{low:g}, {upper}], "
                           f"got {lam:g}")
    return lam


def _check_consensus(rule: str) -> str:
    if rule not in CONSENSUS_CHOICES:
        raise DivfastError(f"--consensus: expected one of {', '.join(CONSENSUS_CHOICES)}, "
                           f"got {rule!r}")
    return rule


def member_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy over the batch, ``(M, B, C), (B,) -> (M,)``."""
    m, b, c = logits.shape
    return F.cross_entropy(logits.reshape(m * b, c), target.repeat(m),
                           reduction="none").view(m, b).mean(dim=1)


def consensus_logits(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The differentiable consensus f ``(B, C)`` in logit space (see the module docstring)."""
    _check_consensus(rule)
    m = logits.shape[0]
    if rule == "average":
        return logits.mean(dim=0)
    if rule == "geometric":
        return F.log_softmax(logits, dim=-1).mean(dim=0)
    if rule == "median":
        ordered = torch.sort(logits, dim=0).values  # (M, B, C)
        if m % 2:
            return ordered[m // 2]
        return (ordered[m // 2 - 1] + ordered[m // 2]) * 0.5
    from divfast.ensembles.consensus import consensus_predictions

    with torch.no_grad():
        winner = consensus_predictions(logits.detach(), "vote")  # (B,)
        voters = (logits.detach().argmax(dim=-1) == winner).to(logits.dtype)  # (M, B), >= 1 per column
        weight = voters / voters.sum(dim=0, keepdim=True)
    return (weight[..., None] * logits).sum(dim=0)


def hessian_quadratic_form(d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``d^T (diag(p) - p p^T) d`` over the last axis in O(C): ``sum p d^2 - (p . d)^2``.

    ``d`` is ``(..., B, C)`` and ``p`` ``(B, C)`` probabilities; returns ``(..., B)``.
    """
    return (p * d * d).sum(dim=-1) - (p * d).sum(dim=-1).square()


def _terms(per_member: torch.Tensor, **extra) -> dict:
    out = {"member_ce": [float(x) for x in per_member.detach()]}
    out.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in extra.items()})
    return out


class IndependentLoss(EnsembleLoss):
    """Eq. 1: ``sum_i l(h_i, y)``."""

    name = "independent"

    def compute(self, logits, target, inputs):
        per_member = member_cross_entropy(logits, target)  # (M,)
        return per_member.sum(), _terms(per_member)


class GNCLLoss(EnsembleLoss):
    """Eq. 2: ``sum_i l(h_i, y) - lambda/(2M) sum_i d_i^T D d_i`` (batch means), optionally masked."""

    name = "gncl"

    def __init__(self, lam: float = DEFAULT_LAMBDA, consensus: str = "average",
                 masked: bool = False) -> None:
        super().__init__()
        self.lam = _check_lambda(lam, 0.0, 1.0, "gncl")
        self.consensus = _check_consensus(consensus)
        self.masked = bool(masked)
        if masked:
            self.name = "gncl-masked"

    def options(self) -> dict:
        return {"lambda": self.lam, "consensus": self.consensus, "masked": self.masked}

    def penalty(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``sum_i d_i^T D d_i`` per sample ``(B,)`` (masked members contribute 0)."""
        f = consensus_logits(logits, self.consensus)  # (B, C)
        # softmax in at least float32 (half logits), never below the logits' own precision
        p = torch.softmax(f.detach(), dim=-1, dtype=torch.promote_types(f.dtype, torch.float32))
        p = p.to(logits.dtype)  # (B, C), D held constant
        quad = hessian_quadratic_form(logits - f, p)  # (M, B)
        if self.masked:
            quad = quad * (logits.detach().argmax(dim=-1) == target).to(quad.dtype)
        return quad.sum(dim=0)

    def compute(self, logits, target, inputs):
        m = logits.shape[0]
        per_member = member_cross_entropy(logits, target)  # (M,)
        spread = self.penalty(logits, target).mean()
        loss = per_member.sum() - self.lam / (2 * m) * spread
        return loss, _terms(per_member, penalty=spread)


class BalancedLoss(EnsembleLoss):
    """Eq. 3: ``lambda l(f, y) + (1 - lambda)/M sum_i l(h_i, y)``."""

    name = "balanced"

    def __init__(self, lam: float = DEFAULT_LAMBDA, consensus: str = "average") -> None:
        super().__init__()
        self.lam = _check_lambda(lam, 0.0, 1.0, "balanced")
        self.consensus = _check_consensus(consensus)

    def options(self) -> dict:
        return {"lambda": self.lam, "consensus": self.consensus}

    def compute(self, logits, target, inputs):
        m = logits.shape[0]
        per_member = member_cross_entropy(logits, target)  # (M,)
        ensemble = F.cross_entropy(consensus_logits(logits, self.consensus), target)
        loss = self.lam * ensemble + (1.0 - self.lam) / m * per_member.sum()
        return loss, _terms(per_member, ensemble_ce=ensemble)


class AttributionLoss(EnsembleLoss):
    """Eq. 8: ``1/M sum_i l(h_i, y) - lambda A`` with A the batch mean of the Saliency variance.

    The paper found this loss unstable (section 4.3): maximising the variance of raw gradients has no
    upper bound, so the members can inflate their input gradients instead of learning. What this
    implementation adds for a careful user:

    * ``normalize`` (default ``"l2"``): each Saliency map is scaled to unit l2 norm before the
      variance, so A lies in [0, 1) and the penalty can never outgrow lambda. ``"none"`` is the
      paper's raw Eq. 7.
    * ``warmup_epochs``: lambda ramps linearly from 0 over the first epochs, so members first learn to
      classify (the trainer calls ``set_epoch``).
    * :meth:`epoch_check`: an epoch whose mean penalty ``lambda A`` exceeds
      ``PENALTY_RATIO`` (20) times the members' mean cross-entropy stops the run — the penalty then
      drives the training, and with raw maps it grows without bound (measured on the digits:
      ``--attribution-normalize none --lambda 10`` took A from 82 to 187,000 in four epochs while
      every member stayed at chance; benchmarks/RESULTS.md).
    * the trainer's gradient clipping (``--clip-grad``) and divergence checks (non-finite loss or
      gradient, collapse to chance accuracy) stop a run that runs away, keeping the last good
      checkpoint.

    The Saliency target is the true label (as ``divfast eval``'s default). In training mode a batch
    norm couples the samples of a batch, so each map also carries the (small) gradient through the
    batch statistics; that is the gradient the members are trained with.
    """

    name = "attribution"
    needs_inputs = True
    PENALTY_RATIO = 20.0  # epoch_check: lambda*A above this many times the cross-entropy stops

    def __init__(self, lam: float = DEFAULT_LAMBDA, normalize: str = "l2",
                 warmup_epochs: int = 0) -> None:
        super().__init__()
        self.lam = _check_lambda(lam, 0.0, None, "attribution")
        if normalize not in ("none", "l1", "l2", "max"):
            raise DivfastError(f"--attribution-normalize: expected none, l1, l2 or max, "
                               f"got {normalize!r}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise DivfastError(f"--warmup-epochs: expected an integer >= 0, got {warmup_epochs!r}")
        self.normalize = normalize
        self.warmup_epochs = int(warmup_epochs)

    def options(self) -> dict:
        return {"lambda": self.lam, "normalize": self.normalize,
                "warmup_epochs": self.warmup_epochs}

    def epoch_check(self, terms: dict) -> str | None:
        ce = sum(terms.get("member_ce", [])) / max(len(terms.get("member_ce", [])), 1)
        penalty = terms.get("lambda_effective", 0.0) * terms.get("attribution_diversity", 0.0)
        if ce > 0 and penalty > self.PENALTY_RATIO * ce:
            return (f"the attribution penalty runs away: lambda*A = {penalty:.4g} is over "
                    f"{self.PENALTY_RATIO:g}x the members' cross-entropy ({ce:.3g}); use "
                    "--attribution-normalize l2, a smaller --lambda or --warmup-epochs")
        return None

    def effective_lambda(self) -> float:
        if self.warmup_epochs == 0:
            return self.lam
        return self.lam * min(1.0, self.epoch / self.warmup_epochs)

    def saliency(self, logits: torch.Tensor, target: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        """Each member's input gradient of its true-class logit, with the graph kept ``(M, B, ...)``."""
        maps = []
        for i in range(logits.shape[0]):
            selected = logits[i].gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, inputs, create_graph=True, retain_graph=True)
            maps.append(grad)
        return torch.stack(maps)

    def compute(self, logits, target, inputs):
        from divfast._ops.attribution_stats import attribution_stats

        if inputs is None or not inputs.requires_grad:
            raise DivfastError("inputs: the attribution loss needs the input batch the logits were "
                               "computed from, with requires_grad=True")
        m = logits.shape[0]
        per_member = member_cross_entropy(logits, target)  # (M,)
        lam = self.effective_lambda()
        maps = self.saliency(logits, target, inputs)  # (M, B, 3, H, W)
        if not bool(torch.isfinite(maps).all()):  # a NaN loss: the trainer stops every process
            nan = per_member.sum() * float("nan")
            return nan, _terms(per_member, attribution_diversity=float("nan"), lambda_effective=lam)
        variance, _ = attribution_stats(maps, abs=True, normalize=self.normalize)  # (B,) float64
        diversity = variance.mean().to(per_member.dtype)
        loss = per_member.sum() / m - lam * diversity
        return loss, _terms(per_member, attribution_diversity=diversity, lambda_effective=lam)


@register_loss("independent")
def independent_loss() -> EnsembleLoss:
    return IndependentLoss()


@register_loss("gncl")
def gncl_loss(lam: float = DEFAULT_LAMBDA, consensus: str = "average") -> EnsembleLoss:
    return GNCLLoss(lam, consensus)


@register_loss("gncl-masked")
def gncl_masked_loss(lam: float = DEFAULT_LAMBDA, consensus: str = "average") -> EnsembleLoss:
    return GNCLLoss(lam, consensus, masked=True)


@register_loss("balanced")
def balanced_loss(lam: float = DEFAULT_LAMBDA, consensus: str = "average") -> EnsembleLoss:
    return BalancedLoss(lam, consensus)


@register_loss("attribution")
def attribution_loss(lam: float = DEFAULT_LAMBDA, normalize: str = "l2",
                     warmup_epochs: int = 0) -> EnsembleLoss:
    return AttributionLoss(lam, normalize, warmup_epochs)


_OPTION_FLAGS = {"lam": "--lambda", "consensus": "--consensus",
                 "normalize": "--attribution-normalize", "warmup_epochs": "--warmup-epochs"}


def loss_options(name: str, **values) -> dict:
    """The subset of ``values`` (CLI option values) that loss ``name`` takes.

    An option the loss does not take is an error when it differs from its default (``--consensus
    vote`` with ``--loss independent`` would otherwise be silently ignored).
    """
    import inspect

    if name not in _REGISTRY:
        build_loss(name)  # raises the error listing the valid losses
    params = inspect.signature(_REGISTRY[name]).parameters
    defaults = {key: param.default for factory in _REGISTRY.values()
                for key, param in inspect.signature(factory).parameters.items()}
    chosen = {}
    for key, value in values.items():
        if key in params:
            chosen[key] = value
        elif value != defaults.get(key, value):
            raise DivfastError(f"{_OPTION_FLAGS.get(key, key)}: the {name} loss takes no such option")
    return chosen
