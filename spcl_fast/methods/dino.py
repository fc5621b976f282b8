"""DINO baseline (Caron et al., 2021) on the shared ViT: self-distillation with multi-crop.

Follows the reference implementation (facebookresearch/dino ``main_dino.py``): a student and an
EMA teacher of the same architecture, each a ViT plus a DINO head (MLP, L2-normalised
bottleneck, weight-normalised prototype layer); the teacher sees the global crops, the student
all crops, and the loss is the cross-entropy between the teacher's centred, sharpened softmax
and the student's softmax over every pair of different crops. Differences, all deliberate:

* **One packed pass for the student.** Every crop of a step (``2B`` global and ``L*B`` local,
  at two resolutions) is patch-embedded at its own resolution (position embeddings resized
  bicubically to the crop's grid), the tokens of all crops are concatenated into packed rows,
  and the encoder's blocks run once with one varlen segment per crop (``partition_attention``),
  instead of one forward per resolution.
* **Mean-pooled tokens instead of a class token**: the shared ViT has none (S-PCL pools means).
* **CXR-safe augmentation**: random resized crops and a small intensity jitter (gain and
  offset); no colour, blur or solarisation, and no flips by default because laterality is
  meaningful in a chest X-ray (heart on the left). Crops are resampled bilinearly
  (``grid_sample``) on the device, batched over all images of a step.
* No teacher-temperature warm-up and no last-layer freezing in the first epoch: both are
  schedule details of long runs; ``teacher_temp`` is fixed.

The randomness of a step lives in a :class:`~spcl_fast.views.CropPlan` drawn on the host
(``sample_plan``), so the training engine seeds, checkpoints and resumes it like S-PCL's
partitions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from .. import collectives, flops
from ..nn.heads import DINOHead
from ..nn.vit import VisionTransformer
from ..sections import flag, require
from ..views import CropPlan, resized_crops, sample_crops
from .base import BuildContext

LOCAL_TO_GLOBAL = 96 / 224  # DINO's local / global crop side


def encode_dense(encoder: VisionTransformer, crops: torch.Tensor) -> torch.Tensor:
    """``(n, C, s, s)`` -> ``(n, D)``: dense blocks, final norm, token mean."""
    return encoder.forward_tokens(encoder.embed(crops, any_size=True)).mean(dim=1)


def encode_packed(encoder: VisionTransformer, groups: list[torch.Tensor]) -> torch.Tensor:
    """Crops of several resolutions through ONE varlen pass of the encoder's blocks.

    ``groups``: tensors ``(n_i, C, s_i, s_i)``; every crop is one segment of ``(s_i/p)**2``
    packed rows. Returns ``(sum n_i, D)`` mean-pooled embeddings in the order of ``groups``.
    Equal to :func:`encode_dense` on each group (attention never crosses a segment).
    """
    tokens = [encoder.embed(c, any_size=True) for c in groups]  # (n_i, L_i, D)
    x = torch.cat([t.flatten(0, 1) for t in tokens])
    device = x.device
    lengths = torch.cat([torch.full((t.shape[0],), t.shape[1], device=device) for t in tokens])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # built on device: no sync
    max_seqlen = max(t.shape[1] for t in tokens)
    x = encoder.forward_tokens(x, cu_seqlens, max_seqlen)
    # Segments of a group are contiguous and equally long: the segment mean is a reshape-mean.
    rows = x.split([t.shape[0] * t.shape[1] for t in tokens])
    pooled = [r.view(t.shape[0], t.shape[1], -1).mean(dim=1)
              for r, t in zip(rows, tokens, strict=True)]
    return torch.cat(pooled)


@dataclass(frozen=True)
class DINOConfig:
    """DINO's settings (what each does: the DINO class docstring, docs/methods.md)."""

    num_local: Annotated[int, flag("dino_local_crops")] = 10  # dino: local crops per image
    global_size: Annotated[int | None, flag("dino_global_size")] = None  # dino: global crop
    local_size: Annotated[int | None, flag("dino_local_size")] = None  # dino: local crop side
    global_scale: Annotated[tuple[float, float], flag("dino_global_scale")] = (0.4, 1.0)  # area
    local_scale: Annotated[tuple[float, float], flag("dino_local_scale")] = (0.05, 0.4)  # area
    jitter: Annotated[float, flag("dino_jitter")] = 0.1  # dino: intensity gain/offset per crop
    flip_prob: Annotated[float, flag("dino_flip_prob")] = 0.0  # dino: horizontal flips (0: CXR)
    out_dim: Annotated[int, flag("dino_out_dim")] = 65536  # dino: head output (prototypes)
    hidden_dim: Annotated[int, flag("dino_hidden_dim")] = 2048  # dino: head MLP width
    bottleneck_dim: Annotated[int, flag("dino_bottleneck_dim")] = 256  # dino: head bottleneck
    student_temp: float = 0.1  # dino: student softmax temperature
    teacher_temp: float = 0.04  # dino: teacher softmax temperature (fixed, no warm-up)
    center_momentum: float = 0.9  # dino: EMA momentum of the teacher-output centre
    teacher_momentum: float = 0.996  # dino: teacher EMA momentum at step 0, cosine to 1

    def check(self, num_patches: int | None = None) -> None:
        """Raise ``ValueError`` naming the first setting no run can use (``num_patches``:
        the method contract's, unused; crop sides are checked against the patch by
        :class:`DINO`)."""
        scale = "(lo, hi) with 0 < lo <= hi <= 1"
        require(self, {
            "num_local": (self.num_local >= 0, ">= 0"),
            "global_size": (self.global_size is None or self.global_size >= 1, ">= 1 or None"),
            "local_size": (self.local_size is None or self.local_size >= 1, ">= 1 or None"),
            "global_scale": (0 < self.global_scale[0] <= self.global_scale[1] <= 1, scale),
            "local_scale": (0 < self.local_scale[0] <= self.local_scale[1] <= 1, scale),
            "jitter": (math.isfinite(self.jitter) and self.jitter >= 0, ">= 0"),
            "flip_prob": (0 <= self.flip_prob <= 1, "in [0, 1]"),
            "out_dim": (self.out_dim >= 1, ">= 1"),
            "hidden_dim": (self.hidden_dim >= 1, ">= 1"),
            "bottleneck_dim": (self.bottleneck_dim >= 1, ">= 1"),
            "student_temp": (math.isfinite(self.student_temp) and self.student_temp > 0,
                             "positive"),
            "teacher_temp": (math.isfinite(self.teacher_temp) and self.teacher_temp > 0,
                             "positive"),
            "center_momentum": (0 <= self.center_momentum <= 1, "in [0, 1]"),
            "teacher_momentum": (0 <= self.teacher_momentum <= 1, "in [0, 1]"),
        })


class DINO(nn.Module):
    """Student ViT + head trained to match an EMA teacher over multi-crop views.

    Args:
        encoder: the student :class:`~spcl_fast.nn.VisionTransformer` (the one pre-trained and
            probed); the teacher starts as a copy.
        config: the settings (:class:`DINOConfig`; ``None``: its defaults), checked here.
        context: what the run adds (:class:`~spcl_fast.methods.base.BuildContext`): with
            ``total_steps`` the teacher's momentum follows a cosine to 1 at the last step
            (DINO's schedule), else it stays constant.

    What the settings do:

        num_local: local crops per image (2 global crops always).
        global_size, local_size: crop sides in pixels, multiples of the patch (default: the
            encoder's image size, and ``96/224`` of it rounded to the patch).
        global_scale, local_scale: area fractions of the random resized crops.
        jitter, flip_prob: intensity jitter strength; horizontal-flip probability (0 for CXR).
        out_dim, hidden_dim, bottleneck_dim: DINO head sizes (65536, 2048, 256 in the paper).
        student_temp, teacher_temp: softmax temperatures (0.1; 0.04, fixed).
        center_momentum: EMA momentum of the teacher-output centre (0.9).
        teacher_momentum: EMA momentum of the teacher at step 0 (see ``context``).

    ``forward(images (B,C,S,S), generator=None, plan=None)`` returns ``loss`` (differentiable;
    only the student gets gradients) and the detached ``teacher_entropy`` (mean entropy of the
    teacher's targets, in nats: near 0 means collapse to one prototype, near ``log(out_dim)``
    collapse to uniform). Call :meth:`after_step` after each optimizer step (the engine does):
    it moves the centre by the step's teacher logits (so accumulated micro-batches all see the
    centre of the step, as one batch does) and the teacher by the student.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=2)
        >>> model = DINO(enc, DINOConfig(num_local=2, local_size=16, out_dim=64, hidden_dim=32,
        ...                              bottleneck_dim=16))
        >>> model(torch.rand(2, 1, 32, 32))["loss"].backward()
        >>> model.after_step(0)
    """

    label = "DINO"  # in logs and plots
    Config = DINOConfig  # its settings, the ``dino`` section of the training config

    def __init__(self, encoder: VisionTransformer, config: DINOConfig | None = None,
                 context: BuildContext | None = None):
        super().__init__()
        config = DINOConfig() if config is None else config
        config.check(encoder.num_patches)
        if encoder.num_prefix_tokens:
            raise ValueError("DINO here runs on an encoder without a class token "
                             "(class_token=False): it mean-pools each crop's patches")
        patch, img = encoder.patch_embed.patch_size, encoder.patch_embed.img_size
        self.global_size = config.global_size or img
        local = max(round(img * LOCAL_TO_GLOBAL / patch), 1) * patch
        self.local_size = config.local_size or local
        for name, size in (("global_size", self.global_size), ("local_size", self.local_size)):
            if size % patch:
                raise ValueError(f"{name} {size} is not a multiple of the patch size {patch}")
        self.config, self.num_global = config, 2
        self.total_steps = None if context is None else context.total_steps
        self.encoder = encoder
        self.head = DINOHead(encoder.embed_dim, config.out_dim, config.hidden_dim,
                             config.bottleneck_dim)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        # teacher logits summed over the forward passes of this optimizer step (not saved)
        self.register_buffer("step_logits", torch.zeros(1, config.out_dim), persistent=False)
        self.register_buffer("step_rows", torch.zeros(()), persistent=False)

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> DINO:
        """From the ``dino`` config section (a dict of :class:`DINOConfig` fields); the
        teacher's momentum follows the run's steps."""
        return cls(encoder, DINOConfig(**settings), context)

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device,
                    images: torch.Tensor | None = None) -> CropPlan:
        """Random crops (``images`` is accepted for the common method contract, unused)."""
        c = self.config
        return sample_crops(batch_size, self.num_global, c.num_local, c.global_scale,
                            c.local_scale, c.jitter, c.flip_prob, generator, device)

    def make_crops(self, images: torch.Tensor, plan: CropPlan) -> list[torch.Tensor]:
        """``[global (2B, C, Sg, Sg), local (L*B, C, Sl, Sl)]`` (no local entry when L = 0)."""
        g = plan.num_global
        crops = [resized_crops(images, plan.theta[:g], plan.gain[:g], plan.bias[:g],
                               self.global_size)]
        if plan.num_crops > g:
            crops.append(resized_crops(images, plan.theta[g:], plan.gain[g:], plan.bias[g:],
                                       self.local_size))
        return crops

    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum after optimizer step ``step`` (0-based)."""
        if not self.total_steps:
            return self.config.teacher_momentum
        progress = min(step / self.total_steps, 1.0)
        return 1 - (1 - self.config.teacher_momentum) * (1 + math.cos(math.pi * progress)) / 2

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The step's centre update (:meth:`update_center` on the mean teacher logits of every
        training forward since the last step), then the teacher's EMA from the student:
        ``t = m * t + (1 - m) * s``."""
        self.update_center(self.step_logits / self.step_rows.clamp(min=1), rows=self.step_rows)
        self.step_logits.zero_()
        self.step_rows.zero_()
        m = self.momentum_at(step)
        teacher = [*self.teacher_encoder.parameters(), *self.teacher_head.parameters()]
        student = [*self.encoder.parameters(), *self.head.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - m)  # one fused pass over all tensors

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor,
                      rows: torch.Tensor | None = None) -> None:
        """EMA of the mean teacher logits (over all ranks when distributed). ``rows``: how many
        logits ``teacher_logits`` (then already their mean) stands for; with 0 the centre
        stays (a step without a training forward)."""
        batch_center = collectives.all_reduce_mean_(teacher_logits.float().mean(dim=0,
                                                                                keepdim=True))
        keep = self.config.center_momentum if rows is None else torch.where(
            rows > 0, self.config.center_momentum, 1.0)
        self.center.mul_(keep).add_(batch_center * (1 - keep))

    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of teacher targets (centred, sharpened) against student predictions,
        averaged over pairs of different crops. ``student_logits (V*B, K)`` and
        ``teacher_logits (2B, K)`` crop-major; returns ``(loss, teacher targets (2B, K))``."""
        centred = teacher_logits.float() - self.center
        targets = F.softmax(centred / self.config.teacher_temp, dim=-1)
        log_probs = F.log_softmax(student_logits.float() / self.config.student_temp, dim=-1)
        # Pair by pair, as DINO does: a (2, V, B, K) product would not fit for K = 65536.
        total, pairs = 0.0, 0
        for i, q in enumerate(targets.split(batch_size)):
            for v, logp in enumerate(log_probs.split(batch_size)):
                if v != i:
                    total = total + -(q * logp).sum(dim=-1).mean()
                    pairs += 1
        return total / pairs, targets

    def train_flops(self, plan: CropPlan) -> int:
        """Algorithmic FLOPs of one training step: forward + backward of the student (encoder and
        head) on all crops, forward of the teacher on the global crops; the loss and the EMA are
        elementwise (not counted, see ``spcl_fast.flops``)."""
        enc, b, patch = self.encoder, plan.num_images, self.encoder.patch_embed.patch_size

        def encoder_flops(num_crops: int, size: int) -> dict[str, int]:
            n = (size // patch) ** 2
            return enc.forward_flops([n] * (num_crops * b), num_crops * b, num_patches=n)

        def head_flops(rows: int) -> dict[str, int]:
            linears = [(m.in_features, m.out_features) for m in self.head.mlp
                       if isinstance(m, nn.Linear)]
            linears.append(tuple(self.head.prototypes.shape[::-1]))
            return {"linear": sum(flops.linear_flops(rows, i, o) for i, o in linears)}

        g, v = plan.num_global, plan.num_crops
        student = flops.add_parts(encoder_flops(g, self.global_size),
                                  encoder_flops(v - g, self.local_size), head_flops(v * b))
        teacher = flops.add_parts(encoder_flops(g, self.global_size), head_flops(g * b))
        return flops.training_flops(student) + sum(teacher.values())

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        plan: CropPlan | None = None,
    ) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        if plan is None:
            plan = self.sample_plan(b, generator, images.device)
        crops = self.make_crops(images, plan)
        student_logits = self.head(encode_packed(self.encoder, crops))  # (V*B, K)
        with torch.no_grad():
            teacher_logits = self.teacher_head(encode_dense(self.teacher_encoder, crops[0]))
        loss, targets = self.distillation_loss(student_logits, teacher_logits, b)
        if self.training:  # the centre moves once per optimizer step, in after_step, so
            # accumulated micro-batches see the centre one batch would
            self.step_logits.add_(teacher_logits.detach().float().sum(dim=0, keepdim=True))
            self.step_rows.add_(teacher_logits.shape[0])
        with torch.no_grad():
            entropy = -(targets * targets.clamp(min=1e-12).log()).sum(dim=-1).mean()
        return {"loss": loss, "teacher_entropy": entropy}
