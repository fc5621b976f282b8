"""Pre-training: typed config, engine, checkpoints. Run ``python -m spcl_fast.train``."""

from .config import PRESETS, TrainConfig, apply_overrides
from .engine import build_model, train

__all__ = ["PRESETS", "TrainConfig", "apply_overrides", "build_model", "train"]
