"""Self-supervised methods on the shared ViT: S-PCL and the MAE, DINO and SimCLR baselines.

Every method takes the encoder first and keeps the contract of :mod:`spcl_fast.methods.base`
(:class:`Method`: ``sample_plan``, ``forward``, ``train_flops``, ``from_config``; optionally
:class:`AfterStep` and :class:`BatchLoss`), which also says how to add one. :data:`METHODS`
maps the names that ``--method`` takes to the classes.
"""

from torch import nn

from .base import AfterStep, BatchLoss, BuildContext, Method, Plan
from .dino import DINO
from .mae import MAE
from .simclr import SimCLR
from .spcl import SPCL

METHODS: dict[str, type[Method]] = {"spcl": SPCL, "mae": MAE, "dino": DINO, "simclr": SimCLR}


def build_method(name: str, encoder: nn.Module, **kwargs) -> nn.Module:
    """``METHODS[name](encoder, **kwargs)``, with the valid names in the error.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = build_method("mae", vit_tiny_patch16(img_size=32, patch_size=8, depth=1),
        ...                      decoder_dim=32, decoder_depth=1, decoder_heads=2)
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](encoder, **kwargs)


__all__ = ["DINO", "MAE", "METHODS", "SPCL", "AfterStep", "BatchLoss", "BuildContext", "Method",
           "Plan", "SimCLR", "build_method"]
