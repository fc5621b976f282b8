"""Self-supervised methods on the shared ViT: S-PCL and baselines."""

from .spcl import SPCL, Projector

__all__ = ["SPCL", "Projector"]
