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

The randomness of a step lives in a :class:`CropPlan` drawn on the host (``sample_plan``), so
the training engine seeds, checkpoints and resumes it like S-PCL's partitions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, flops
from ..nn.vit import VisionTransformer
from .base import BuildContext

LOCAL_TO_GLOBAL = 96 / 224  # DINO's local / global crop side


@dataclass(frozen=True)
class CropPlan:
    """Geometry and intensity jitter of every crop of a step, crop-major (crop ``v`` of image
    ``b`` is row ``v * B + b`` once flattened); the first ``num_global`` crops are global.

    Attributes:
        theta: ``(V, B, 2, 3)`` float32 affine maps from crop coordinates to image coordinates,
            both in ``[-1, 1]`` (``F.affine_grid``'s convention, ``align_corners=False``).
        gain, bias: ``(V, B)`` float32 intensity jitter, ``crop * gain + bias``.
        num_global: how many of the ``V`` crops are global.
    """

    theta: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor
    num_global: int

    @property
    def num_images(self) -> int:
        return self.theta.shape[1]

    @property
    def num_crops(self) -> int:
        return self.theta.shape[0]

    def to(self, device: torch.device | str) -> CropPlan:
        return CropPlan(*(t.to(device, non_blocking=True) for t in (self.theta, self.gain,
                                                                      self.bias)), self.num_global)

    @classmethod
    def concat(cls, plans: Sequence[CropPlan]) -> CropPlan:
        """Crops of consecutive image ranges as one plan of all their images, in order."""
        return cls(*(torch.cat([getattr(p, k) for p in plans], dim=1)
                     for k in ("theta", "gain", "bias")), plans[0].num_global)


def sample_crops(
    batch_size: int,
    num_global: int = 2,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    jitter: float = 0.1,
    flip_prob: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> CropPlan:
    """Random resized crops (area fraction from ``*_scale``, aspect ratio in [3/4, 4/3], sides
    clipped to the image) with intensity gain ``exp(U(-jitter, jitter))`` and offset
    ``U(-jitter, jitter)``; horizontal flips with probability ``flip_prob`` (0: CXR laterality).

    Example::

        >>> plan = sample_crops(4, generator=torch.Generator().manual_seed(0))
        >>> plan.theta.shape, plan.num_global
        (torch.Size([12, 4, 2, 3]), 2)
    """
    v = num_global + num_local
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(7, v, batch_size, generator=generator, device=gen_device)
    lo, hi = torch.tensor([global_scale] * num_global + [local_scale] * num_local,
                          device=gen_device).T[..., None]
    area = lo + (hi - lo) * u[0]
    log_aspect = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1]
    # Half-sizes in [-1, 1] coordinates equal side fractions: a full-image crop has w = h = 1.
    w = (area * log_aspect.exp()).sqrt().clamp(max=1.0)
    h = (area / log_aspect.exp()).sqrt().clamp(max=1.0)
    tx = (1 - w) * (2 * u[2] - 1)
    ty = (1 - h) * (2 * u[3] - 1)
    flip = torch.where(u[6] < flip_prob, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, tx], -1), torch.stack([zero, h, ty], -1)],
                        dim=-2)
    gain = (jitter * (2 * u[4] - 1)).exp()
    bias = jitter * (2 * u[5] - 1)
    return CropPlan(theta, gain, bias, num_global).to(device or gen_device)


def resized_crops(images: torch.Tensor, theta: torch.Tensor, gain: torch.Tensor,
                  bias: torch.Tensor, size: int) -> torch.Tensor:
    """``images (B,C,S,S)`` and ``theta (V,B,2,3)``, ``gain/bias (V,B)`` -> ``(V*B, C, size,
    size)`` crops, crop-major, bilinear (``grid_sample``, borders clamped)."""
    v, b = theta.shape[:2]
    src = images.unsqueeze(0).expand(v, *images.shape).reshape(v * b, *images.shape[1:])
    grid = F.affine_grid(theta.reshape(v * b, 2, 3).to(images.dtype),
                         [v * b, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * gain.reshape(-1, 1, 1, 1).to(out.dtype) + bias.reshape(-1, 1, 1, 1).to(out.dtype)


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


class DINOHead(nn.Module):
    """MLP (``nlayers`` linears, GELU) to an L2-normalised bottleneck, then a weight-normalised
    prototype layer without bias (DINO's ``weight_norm`` with the gain fixed to 1, i.e. every
    prototype row is unit-norm).

    ``forward(x (M, in_dim)) -> (M, out_dim)`` logits (before temperature).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=1).to(x.dtype))


class DINO(nn.Module):
    """Student ViT + head trained to match an EMA teacher over multi-crop views.

    Args:
        encoder: the student :class:`~spcl_fast.nn.VisionTransformer` (the one pre-trained and
            probed); the teacher starts as a copy.
        num_local: local crops per image (2 global crops always).
        global_size, local_size: crop sides in pixels, multiples of the patch (default: the
            encoder's image size, and ``96/224`` of it rounded to the patch).
        global_scale, local_scale: area fractions of the random resized crops.
        jitter, flip_prob: intensity jitter strength; horizontal-flip probability (0 for CXR).
        out_dim, hidden_dim, bottleneck_dim: DINO head sizes (65536, 2048, 256 in the paper).
        student_temp, teacher_temp: softmax temperatures (0.1; 0.04, fixed).
        center_momentum: EMA momentum of the teacher-output centre (0.9).
        teacher_momentum: EMA momentum of the teacher at step 0; with ``total_steps`` it
            follows a cosine to 1 at the last step (DINO's schedule), else stays constant.

    ``forward(images (B,C,S,S), generator=None, plan=None)`` returns ``loss`` (differentiable;
    only the student gets gradients) and the detached ``teacher_entropy`` (mean entropy of the
    teacher's targets, in nats: near 0 means collapse to one prototype, near ``log(out_dim)``
    collapse to uniform). Call :meth:`after_step` after each optimizer step (the engine does):
    it moves the centre by the step's teacher logits (so accumulated micro-batches all see the
    centre of the step, as one batch does) and the teacher by the student.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=2)
        >>> model = DINO(enc, num_local=2, local_size=16, out_dim=64, hidden_dim=32,
        ...              bottleneck_dim=16)
        >>> model(torch.rand(2, 1, 32, 32))["loss"].backward()
        >>> model.after_step(0)
    """

    label = "DINO"  # in logs and plots

    def __init__(
        self,
        encoder: VisionTransformer,
        num_local: int = 10,
        global_size: int | None = None,
        local_size: int | None = None,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        jitter: float = 0.1,
        flip_prob: float = 0.0,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.996,
        total_steps: int | None = None,
    ):
        super().__init__()
        if encoder.num_prefix_tokens:
            raise ValueError("DINO here runs on an encoder without a class token "
                             "(class_token=False): it mean-pools each crop's patches")
        patch, img = encoder.patch_embed.patch_size, encoder.patch_embed.img_size
        self.global_size = global_size or img
        self.local_size = local_size or max(round(img * LOCAL_TO_GLOBAL / patch), 1) * patch
        for name, size in (("global_size", self.global_size), ("local_size", self.local_size)):
            if size % patch:
                raise ValueError(f"{name} {size} is not a multiple of the patch size {patch}")
        self.num_global, self.num_local = 2, num_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.jitter, self.flip_prob = jitter, flip_prob
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.teacher_momentum, self.total_steps = teacher_momentum, total_steps
        self.encoder = encoder
        self.head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        # teacher logits summed over the forward passes of this optimizer step (not saved)
        self.register_buffer("step_logits", torch.zeros(1, out_dim), persistent=False)
        self.register_buffer("step_rows", torch.zeros(()), persistent=False)

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> DINO:
        """From the ``dino`` config section; the teacher's momentum follows the run's steps."""
        return cls(encoder, **settings, total_steps=context.total_steps)

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device,
                    images: torch.Tensor | None = None) -> CropPlan:
        """Random crops (``images`` is accepted for the common method contract, unused)."""
        return sample_crops(batch_size, self.num_global, self.num_local, self.global_scale,
                            self.local_scale, self.jitter, self.flip_prob, generator, device)

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
            return self.teacher_momentum
        progress = min(step / self.total_steps, 1.0)
        return 1 - (1 - self.teacher_momentum) * (1 + math.cos(math.pi * progress)) / 2

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
        batch_center = distributed.all_reduce_mean_(teacher_logits.float().mean(dim=0,
                                                                                keepdim=True))
        keep = self.center_momentum if rows is None else torch.where(
            rows > 0, self.center_momentum, 1.0)
        self.center.mul_(keep).add_(batch_center * (1 - keep))

    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of teacher targets (centred, sharpened) against student predictions,
        averaged over pairs of different crops. ``student_logits (V*B, K)`` and
        ``teacher_logits (2B, K)`` crop-major; returns ``(loss, teacher targets (2B, K))``."""
        targets = F.softmax((teacher_logits.float() - self.center) / self.teacher_temp, dim=-1)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
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
