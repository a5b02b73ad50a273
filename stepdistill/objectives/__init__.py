"""Distillation objectives: pure losses over (teacher, student, fake score) views."""

from .base import Batch, LossOut, Nets, Objective
from .registry import build_objective, get_objective_class, register, registered

__all__ = ["Batch", "LossOut", "Nets", "Objective", "build_objective", "get_objective_class", "register", "registered"]
