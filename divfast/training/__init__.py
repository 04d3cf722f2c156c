"""Ensemble training: the loss registry and the trainer."""

from divfast.training.losses import build_loss, list_losses, loss_options
from divfast.training.trainer import TrainConfig, TrainingDiverged, train_ensemble

__all__ = ["TrainConfig", "TrainingDiverged", "build_loss", "list_losses", "loss_options",
           "train_ensemble"]
