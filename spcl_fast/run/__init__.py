"""What a run IS, for training and evaluation alike: its config (:mod:`.config`, sections
with validation; :mod:`.presets`), how its model is built (:mod:`.model`), how its data and
input statistics are resolved (:mod:`.data`), where it computes and at which precision
(:mod:`.device`, :mod:`.precision`), its learning-rate schedule (:mod:`.schedule`) and how it
is checkpointed (:mod:`.checkpoint`). ``spcl_fast.train`` and ``spcl_fast.eval`` both stand on
it; it imports neither.
"""

from ..methods import DINOConfig, MAEConfig, SimCLRConfig, SPCLConfig
from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides
from .model import build_encoder, build_model
from .presets import PRESETS

__all__ = [
    "PRESETS",
    "DINOConfig",
    "DataConfig",
    "MAEConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SPCLConfig",
    "SimCLRConfig",
    "TrainConfig",
    "apply_overrides",
    "build_encoder",
    "build_model",
]
