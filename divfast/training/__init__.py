"""Ensemble training: the loss registry and the trainer."""

from divfast.training.losses import build_loss, list_losses
from divfast.training.trainer import TrainConfig, train_ensemble

__all__ = ["TrainConfig", "build_loss", "list_losses", "train_ensemble"]
