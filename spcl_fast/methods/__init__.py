"""Self-supervised methods on the shared ViT: S-PCL and the MAE, DINO and SimCLR baselines.

Every method takes the encoder first and keeps the contract of :mod:`spcl_fast.methods.base`
(:class:`Method`: ``sample_plan``, ``forward``, ``train_flops``, ``from_config``; optionally
:class:`AfterStep` and :class:`BatchLoss`), which also says how to add one. :data:`METHODS`
maps the names that ``--method`` takes to the classes.
"""

from torch import nn

from .base import AfterStep, BatchLoss, BuildContext, Method, Plan
from .dino import DINO, DINOConfig
from .mae import MAE, MAEConfig
from .simclr import SimCLR, SimCLRConfig
from .spcl import SPCL, SPCLConfig

METHODS: dict[str, type[Method]] = {"spcl": SPCL, "mae": MAE, "dino": DINO, "simclr": SimCLR}


def build_method(name: str, encoder: nn.Module, context: BuildContext | None = None,
                 **settings) -> nn.Module:
    """``METHODS[name]`` on ``encoder`` with the fields ``settings`` of its config section set
    (the rest at their defaults), with the valid names in the error.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = build_method("mae", vit_tiny_patch16(img_size=32, patch_size=8, depth=1),
        ...                      decoder_dim=32, decoder_depth=1, decoder_heads=2)
        >>> model.config.decoder_dim, model.config.mask_ratio
        (32, 0.75)
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    method = METHODS[name]
    return method(encoder, method.Config(**settings), context)


__all__ = ["DINO", "MAE", "METHODS", "SPCL", "AfterStep", "BatchLoss", "BuildContext",
           "DINOConfig", "MAEConfig", "Method", "Plan", "SPCLConfig", "SimCLR", "SimCLRConfig",
           "build_method"]
