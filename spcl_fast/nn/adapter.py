"""Partition-aware attention for a ViT built elsewhere: timm's ``VisionTransformer``, or any ViT
whose blocks hold ``attn.qkv`` / ``attn.proj``.

The adapter keeps the model's own forward code, modules and parameter names (checkpoints load
as before) and works in the in-place layout: the residual stream stays ``(B, L, D)`` in image
order, and inside a :meth:`PartitionAdapter.plan` block every attention layer attends only
within the segments of a :class:`~spcl_fast.partition.PartitionPlan`, through
:func:`~spcl_fast.ops.partition_attention` with the plan's ``token_index`` (the gather and
scatter fused into the kernel). Outside that block the model runs exactly as before.

Prefix tokens (a class token, register tokens: the first ``num_prefix_tokens`` of each image)
and patches the plan leaves out are in no segment: they attend to nothing (a zero attention
context, so the output projection adds only its bias) and no segment attends to them; pool each
segment's patch tokens with :func:`pool_segments`. Rows in no segment still pay for their MLP
(the price of keeping the model's code); the packed layout of
:class:`~spcl_fast.nn.VisionTransformer` avoids that.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from ..ops import partition_attention, partition_attention_qkvpacked
from ..partition import PartitionPlan
from .vit import segment_mean


class PartitionAdapter:
    """Switch the attention of ``model``'s blocks to partition-aware attention on demand.

    Args:
        model: a ViT whose ``blocks`` (an iterable of modules) each hold ``attn`` with ``qkv``
            (``Linear(D, 3 * H * Dh)``), ``proj`` and ``num_heads``, as timm's
            ``VisionTransformer`` does. ``q_norm`` / ``k_norm`` / ``norm`` / ``gate`` /
            ``proj_drop`` are applied when present, as timm's ``Attention`` applies them.
            Attention dropout is not supported (it must be 0).
        num_prefix_tokens: tokens before the patches in each image's sequence (default: the
            model's ``num_prefix_tokens``, else 0).
        impl: kernel choice passed to :func:`~spcl_fast.ops.partition_attention`.

    Each attention module's ``forward`` is replaced on the instance (its class, parameters and
    state-dict keys stay). A deep copy of the model (an EMA teacher) gets its own, inactive
    plan state: it runs densely with its own weights until adapted itself. A pickled model
    loads back unadapted. Backward must run inside :meth:`plan` without activation
    checkpointing (a recomputation outside the block would attend densely), so ``plan``
    refuses a model with ``grad_checkpointing`` set. :meth:`remove` restores the model.

    Example::

        >>> from spcl_fast import sample_partitions
        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> vit = vit_tiny_patch16(img_size=32, patch_size=8, depth=2)  # stands in for timm's
        >>> adapter = PartitionAdapter(vit)
        >>> plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
        >>> with adapter.plan(plan):
        ...     tokens = vit.forward_features(torch.rand(2, 1, 32, 32))  # (B, L, D)
        >>> pool_segments(tokens, plan, adapter.num_prefix_tokens).shape  # one row per subset
        torch.Size([4, 192])
    """

    def __init__(self, model: nn.Module, num_prefix_tokens: int | None = None,
                 impl: str = "auto"):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError("PartitionAdapter: the model has no 'blocks' to adapt")
        self.attentions = [_checked_attention(block, i) for i, block in enumerate(blocks)]
        if not self.attentions:
            raise ValueError("PartitionAdapter: the model's 'blocks' are empty")
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)
                                     if num_prefix_tokens is None else num_prefix_tokens)
        self._state = _PlanState(self.num_prefix_tokens, impl)
        for attn in self.attentions:
            attn._partition_state = self._state
            attn.forward = types.MethodType(forward, attn)

    @contextlib.contextmanager
    def plan(self, plan: PartitionPlan) -> Iterator[None]:
        """Inside this block every adapted attention layer attends within ``plan``'s segments;
        inputs must be ``(plan.num_images, num_prefix_tokens + plan.num_tokens, D)``."""
        if self._state.plan is not None:
            raise RuntimeError("PartitionAdapter.plan: already inside a plan block")
        if getattr(self.model, "grad_checkpointing", False):
            raise RuntimeError("PartitionAdapter.plan: the model uses activation checkpointing, "
                               "whose recomputation would run outside the plan; turn it off")
        self._state.plan, self._state.rows = plan, None
        try:
            yield
        finally:
            self._state.plan = self._state.rows = None

    def remove(self) -> None:
        """Give the attention modules back their own ``forward``."""
        for attn in self.attentions:
            del attn.forward, attn._partition_state


class _PlanState:
    """What the adapted attention layers of one model share: the active plan and its rows in
    the ``(B * L)`` stream (for one sequence length)."""

    def __init__(self, num_prefix_tokens: int, impl: str):
        self.num_prefix_tokens, self.impl = num_prefix_tokens, impl
        self.plan: PartitionPlan | None = None
        self.rows: tuple[int, torch.Tensor] | None = None  # (sequence length, rows)

    def rows_for(self, seq_len: int) -> torch.Tensor:
        """The plan's token_index in rows of the ``(B * L)`` stream (prefix tokens skipped)."""
        if self.rows is None or self.rows[0] != seq_len:
            plan, n, p = self.plan, self.plan.num_tokens, self.num_prefix_tokens
            if seq_len != p + n:
                raise ValueError(
                    f"PartitionAdapter: the plan is for {n} patch tokens and the adapter "
                    f"expects {p} prefix tokens, but the blocks see sequences of {seq_len} tokens"
                )
            index = plan.token_index
            self.rows = (seq_len, index if p == 0 else index // n * seq_len + p + index % n)
        return self.rows[1]


def forward(self, x, *args, **kwargs):
    """The adapted ``forward`` of an attention module (bound to it; named ``forward`` so that
    a pickled model restores the module's own)."""
    state = self._partition_state
    if state.plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    # timm passes attn_mask=None (and is_causal=False); a real mask would be ignored
    if any(a is not None and a is not False for a in (*args, *kwargs.values())):
        raise ValueError("PartitionAdapter: attention masks and extra attention arguments do "
                         "not combine with a plan (its segments are the mask)")
    b, seq_len, _ = x.shape
    if b != state.plan.num_images:
        raise ValueError(f"PartitionAdapter: the plan is for {state.plan.num_images} images, "
                         f"the input has {b}")
    return _partition_forward(self, x, state.plan, state.rows_for(seq_len), state.impl)


def _checked_attention(block: nn.Module, i: int) -> nn.Module:
    attn = getattr(block, "attn", None)
    missing = [n for n in ("qkv", "proj", "num_heads") if not hasattr(attn, n)]
    if attn is None or missing:
        raise ValueError(f"PartitionAdapter: blocks[{i}].attn needs qkv, proj and num_heads "
                         f"(missing {missing or ['attn']})")
    drop = getattr(attn, "attn_drop", None)
    if isinstance(drop, nn.Dropout) and drop.p > 0:
        raise ValueError(f"PartitionAdapter: blocks[{i}] uses attention dropout "
                         f"(p={drop.p}), which partition attention does not implement")
    return attn


def _partition_forward(attn: nn.Module, x: torch.Tensor, plan: PartitionPlan,
                       rows: torch.Tensor, impl: str) -> torch.Tensor:
    """timm's ``Attention.forward`` with the softmax restricted to the plan's segments."""
    b, seq_len, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x)
    inner = qkv.shape[-1] // 3
    qkv = qkv.reshape(b * seq_len, 3, heads, inner // heads)
    scale = getattr(attn, "scale", None)
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    if all(n is None or isinstance(n, nn.Identity) for n in norms):
        # One qkv tensor in, one qkv gradient out (no stacking of three in the backward).
        out = partition_attention_qkvpacked(qkv, plan.cu_seqlens, plan.max_seqlen,
                                            token_index=rows, softmax_scale=scale, impl=impl)
    else:  # per-head norms act on the last dim: any leading shape
        q, k, v = qkv.unbind(1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, token_index=rows,
                                  softmax_scale=scale, impl=impl)
    out = out.reshape(b, seq_len, inner)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    out = attn.proj(out)
    return attn.proj_drop(out) if hasattr(attn, "proj_drop") else out


def pool_segments(tokens: torch.Tensor, plan: PartitionPlan,
                  num_prefix_tokens: int = 0) -> torch.Tensor:
    """Mean of each segment's patch tokens: ``tokens (B, P + N, D)`` from a forward inside
    :meth:`PartitionAdapter.plan` -> ``(num_segments, D)`` (segment ``K*b + k`` is subset ``k``
    of image ``b``; an empty segment pools to zeros)."""
    b, seq_len, d = tokens.shape
    if b != plan.num_images or seq_len != num_prefix_tokens + plan.num_tokens:
        raise ValueError(f"pool_segments: tokens {tuple(tokens.shape)} do not match a plan of "
                         f"{plan.num_images} images x {plan.num_tokens} tokens after "
                         f"{num_prefix_tokens} prefix tokens")
    patches = tokens[:, num_prefix_tokens:].reshape(b * plan.num_tokens, d)
    return segment_mean(patches[plan.token_index], plan)
