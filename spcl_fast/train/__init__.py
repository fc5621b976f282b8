"""Pre-training: the loop and its resume policy on top of :mod:`spcl_fast.run` (what a run is).
Run ``python -m spcl_fast.train``."""

from ..run import PRESETS, TrainConfig, apply_overrides, build_model
from .engine import train

__all__ = ["PRESETS", "TrainConfig", "apply_overrides", "build_model", "train"]
