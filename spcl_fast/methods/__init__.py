"""Self-supervised methods on the shared ViT: S-PCL and the MAE and DINO baselines.

Every method takes the encoder first and offers the same training contract:
``sample_plan(batch_size, generator, device, images=None)`` draws a step's randomness on the
host (partitions, masks, crops; only S-PCL's background skipping looks at ``images``),
``forward(images, generator=None, plan=None)`` returns a dict with a differentiable ``loss`` and
detached numbers to log, ``train_flops(plan)`` counts the step's FLOPs, and ``model.encoder`` is
the encoder being pre-trained. DINO also has ``after_step(step)`` (the teacher's EMA update),
called after each optimizer step.
"""

from torch import nn

from .dino import DINO, DINOHead
from .mae import MAE
from .spcl import SPCL, Projector

METHODS: dict[str, type[nn.Module]] = {"spcl": SPCL, "mae": MAE, "dino": DINO}


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


__all__ = ["DINO", "DINOHead", "MAE", "METHODS", "Projector", "SPCL", "build_method"]
