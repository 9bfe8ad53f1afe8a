"""Distillation: losses (a registry) and the trainer."""
from .losses import get_loss, list_losses
from .trainer import train_student

__all__ = ["get_loss", "list_losses", "train_student"]
