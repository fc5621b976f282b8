"""Partition attention forward, backward and forward+backward (suite ``attention``).

Every provider computes the same thing: non-causal attention inside the segments of one
``sample_partitions`` plan, gradients into the qkv tensor it starts from. FLOPs are the
algorithmic count of ``spcl_fast.flops`` (``4 * sum(L^2) * H * Dh`` forward, 2.5x backward), the
same for every provider, so padding a provider computes is never credited.

Providers (CUDA, bf16):

* ``spcl_fast triton packed``: ``partition_attention_qkvpacked`` (the entry a ViT block uses:
  one qkv gradient buffer) on the packed ``(T, 3, H, Dh)`` qkv;
* ``spcl_fast triton in-place``: the same on the image-order ``(B*N, 3, H, Dh)`` qkv with
  ``token_index`` (gather and scatter fused into the kernel);
* ``gather+pad+SDPA``: what a codebase writes without varlen kernels: gather rows into a
  ``(S, max_seqlen)`` padded batch, ``scaled_dot_product_attention`` with a key-padding mask,
  scatter the valid rows back (the baseline where torch has no ``varlen_attn``);
* ``SDPA per segment``: one SDPA call per segment (small batch only: one launch per segment);
* ``torch varlen_attn`` (FlashAttention-2 inside; the baseline where the installed torch has it);
* ``FlexAttention doc mask``: compiled ``flex_attention`` over the packed sequence with a
  document mask (the BlockMask is built outside the timed region);
* ``flash-attn varlen`` and ``xformers BlockDiagonalMask`` only when importable.

Shapes: ViT-B (H=12, Dh=64) and ViT-L (H=16, Dh=64); 256 images at 224 px (196 tokens: 98 per
segment at ratio 0.5, and ratio_range (0.3, 0.7); 49 per segment at keep 0.5, ViT-B only), at
448 px (784 tokens) and 512 px (1024 tokens); plus 32 images at 224 px (98 and 49 tokens per
segment) for the per-segment provider. GPU rows skip on CPU; the CPU rows
(the PyTorch fallback against gather+pad+SDPA at a small shape, fp32) keep the suite runnable
anywhere. ``pytest benchmarks/bench_attention.py --benchmark-only -k "vitb-224-r0.5 and cuda"``
selects a subset.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from common import peak_memory_mb, run

from spcl_fast import flops, partition_attention_qkvpacked, sample_partitions


@dataclass(frozen=True)
class Shape:
    name: str
    images: int
    tokens: int  # patches per image
    heads: int
    head_dim: int = 64
    ratio: float = 0.5
    ratio_range: tuple[float, float] | None = None
    keep: float = 1.0  # fraction of each image's tokens in a segment (0.5: two 25% subsets)


GPU_SHAPES = [
    Shape("vitb-224-r0.5-b32", 32, 196, 12),
    Shape("vitb-224-r0.5", 256, 196, 12),
    Shape("vitb-224-k0.5-b32", 32, 196, 12, keep=0.5),
    Shape("vitb-224-k0.5", 256, 196, 12, keep=0.5),
    Shape("vitb-224-r0.3-0.7", 256, 196, 12, ratio_range=(0.3, 0.7)),
    Shape("vitl-224-r0.5", 256, 196, 16),
    Shape("vitl-224-r0.3-0.7", 256, 196, 16, ratio_range=(0.3, 0.7)),
    Shape("vitb-448-r0.5", 256, 784, 12),
    Shape("vitl-448-r0.5", 256, 784, 16),
    Shape("vitb-512-r0.5", 256, 1024, 12),
    Shape("vitl-512-r0.5", 256, 1024, 16),
]
CPU_SHAPES = [Shape("tiny-r0.3-0.7", 4, 64, 4, head_dim=32, ratio_range=(0.3, 0.7))]
PASSES = ["fwd", "bwd", "fwd+bwd"]
PER_SEGMENT_MAX_IMAGES = 32

KERNEL_PACKED, KERNEL_IN_PLACE = "spcl_fast triton packed", "spcl_fast triton in-place"
FALLBACK_PACKED, FALLBACK_IN_PLACE = "spcl_fast torch packed", "spcl_fast torch in-place"
GATHER_PAD, PER_SEGMENT = "gather+pad+SDPA", "SDPA per segment"
VARLEN, FLEX, FLASH_ATTN, XFORMERS = ("torch varlen_attn", "FlexAttention doc mask",
                                      "flash-attn varlen", "xformers BlockDiagonalMask")
GPU_PROVIDERS = [KERNEL_PACKED, KERNEL_IN_PLACE, GATHER_PAD, PER_SEGMENT, VARLEN, FLEX,
                 FLASH_ATTN, XFORMERS]
OPTIONAL_PROVIDERS = (VARLEN, FLEX, FLASH_ATTN, XFORMERS)
CPU_PROVIDERS = [FALLBACK_PACKED, FALLBACK_IN_PLACE, GATHER_PAD, PER_SEGMENT]


def _has_varlen() -> bool:
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


def _baseline(provider: str) -> bool:
    return provider == (VARLEN if _has_varlen() else GATHER_PAD)


def _skip_reason(provider: str, shape: Shape, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "GPU row: needs CUDA"
    if provider == PER_SEGMENT and shape.images > PER_SEGMENT_MAX_IMAGES:
        return f"one SDPA launch per segment: only at <= {PER_SEGMENT_MAX_IMAGES} images"
    if provider == VARLEN and not _has_varlen():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if provider == FLASH_ATTN and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if provider == XFORMERS and importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# providers: each returns (leaf tensor the gradients flow into, forward closure)


@dataclass
class Problem:
    plan: object
    qkv: torch.Tensor  # (B*N, 3, H, Dh), image order
    lengths: list[int]  # host copy of the segment lengths (set up outside the timed region)
    scale: float


def _packed_leaf(p: Problem) -> torch.Tensor:
    return p.qkv.detach()[p.plan.token_index].requires_grad_()


def _kernel(p: Problem, impl: str, in_place: bool):
    plan = p.plan
    leaf = p.qkv.detach().requires_grad_() if in_place else _packed_leaf(p)
    index = plan.token_index if in_place else None

    def fwd():
        return partition_attention_qkvpacked(leaf, plan.cu_seqlens, plan.max_seqlen, index,
                                             p.scale, impl=impl)

    return leaf, fwd


def _gather_pad_sdpa(p: Problem):
    plan, rows = p.plan, p.qkv.shape[0]
    segments, length = plan.num_segments, max(plan.max_seqlen, 1)
    seg = plan.segment_ids()
    pos = torch.arange(plan.total_tokens, device=seg.device) - plan.cu_seqlens.long()[seg]
    valid = torch.zeros(segments, length, dtype=torch.bool, device=seg.device)
    valid[seg, pos] = True
    pad_rows = torch.zeros(segments, length, dtype=torch.long, device=seg.device)
    pad_rows[seg, pos] = plan.token_index
    key_mask = valid[:, None, None, :]  # (S, 1, 1, L): padding keys are masked out
    leaf = p.qkv.detach().requires_grad_()

    def fwd():
        q, k, v = leaf[pad_rows].permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (S, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=p.scale)
        packed = out.transpose(1, 2)[valid]  # (T, H, Dh) in packed order
        return packed.new_zeros(rows, *packed.shape[1:]).index_copy(0, plan.token_index, packed)

    return leaf, fwd


def _per_segment_sdpa(p: Problem):
    leaf = _packed_leaf(p)
    lengths = p.lengths

    def fwd():
        outs = []
        for part in leaf.split(lengths):
            if part.shape[0] == 0:
                continue
            q, k, v = part.permute(1, 2, 0, 3)[:, None].unbind(0)  # 3 x (1, H, L, Dh)
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=p.scale)[0].transpose(0, 1))
        return torch.cat(outs)

    return leaf, fwd


def _varlen(p: Problem):
    from torch.nn.attention.varlen import varlen_attn

    plan, leaf = p.plan, _packed_leaf(p)

    def fwd():
        q, k, v = leaf.unbind(1)
        # No scale argument (older torch lacks it): the default Dh ** -0.5 is p.scale.
        return varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                           plan.max_seqlen)

    return leaf, fwd


_FLEX = None


def _flex(p: Problem):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    plan, leaf = p.plan, _packed_leaf(p)
    doc = plan.segment_ids()
    total = plan.total_tokens

    def same_segment(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(same_segment, None, None, total, total, device=doc.device,
                                   _compile=True)

    def fwd():
        q, k, v = leaf.permute(1, 2, 0, 3)[:, None].unbind(0)  # 3 x (1, H, T, Dh)
        return _FLEX(q, k, v, block_mask=block_mask, scale=p.scale)[0].transpose(0, 1)

    return leaf, fwd


def _flash_attn(p: Problem):
    from flash_attn import flash_attn_varlen_func

    plan, leaf = p.plan, _packed_leaf(p)

    def fwd():
        q, k, v = leaf.unbind(1)
        return flash_attn_varlen_func(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                                      plan.max_seqlen, softmax_scale=p.scale)

    return leaf, fwd


def _xformers(p: Problem):
    from xformers.ops import fmha

    leaf = _packed_leaf(p)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([n for n in p.lengths])

    def fwd():
        q, k, v = leaf[None].unbind(2)  # 3 x (1, T, H, Dh)
        return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, scale=p.scale)[0]

    return leaf, fwd


def _provider(name: str, p: Problem):
    builders = {
        KERNEL_PACKED: lambda: _kernel(p, "triton", in_place=False),
        KERNEL_IN_PLACE: lambda: _kernel(p, "triton", in_place=True),
        FALLBACK_PACKED: lambda: _kernel(p, "torch", in_place=False),
        FALLBACK_IN_PLACE: lambda: _kernel(p, "torch", in_place=True),
        GATHER_PAD: lambda: _gather_pad_sdpa(p),
        PER_SEGMENT: lambda: _per_segment_sdpa(p),
        VARLEN: lambda: _varlen(p),
        FLEX: lambda: _flex(p),
        FLASH_ATTN: lambda: _flash_attn(p),
        XFORMERS: lambda: _xformers(p),
    }
    return builders[name]()


_PROBLEM: dict[tuple, Problem] = {}


def _problem(shape: Shape, device: str, dtype: torch.dtype) -> Problem:
    """The plan and qkv of a shape, made on the device once and reused by its cases (the cases
    run shape by shape, so one cached problem at a time keeps memory flat)."""
    key = (shape, device, dtype)
    if key not in _PROBLEM:
        _PROBLEM.clear()
        plan = sample_partitions(shape.images, shape.tokens, ratio=shape.ratio,
                                 ratio_range=shape.ratio_range, keep=shape.keep,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        gen = torch.Generator(device).manual_seed(0)
        qkv = torch.randn(shape.images * shape.tokens, 3, shape.heads, shape.head_dim,
                          generator=gen, device=device, dtype=dtype)
        lengths = plan.seqlens.tolist()  # host copy for the FLOP count and per-segment splits
        _PROBLEM[key] = Problem(plan, qkv, lengths, shape.head_dim**-0.5)
    return _PROBLEM[key]


# ---------------------------------------------------------------------------------------------
# cases


CASES = [
    (device, shape, pass_, provider)
    for device, shapes, providers in [("cpu", CPU_SHAPES, CPU_PROVIDERS),
                                      ("cuda", GPU_SHAPES, GPU_PROVIDERS)]
    for shape in shapes
    for pass_ in PASSES
    for provider in providers
]


@pytest.mark.parametrize(
    "device,shape,pass_,provider", CASES,
    ids=[f"{d}-{s.name}-{ps}-{pr.replace(' ', '_')}" for d, s, ps, pr in CASES],
)
def test_attention(benchmark, device, shape, pass_, provider):
    reason = _skip_reason(provider, shape, device)
    if reason:
        pytest.skip(reason)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    problem = _problem(shape, device, dtype)
    plan, lengths = problem.plan, problem.lengths

    try:
        leaf, fwd = _provider(provider, problem)
        out = fwd()  # compiles / autotunes outside the timed region
        dout = torch.randn_like(out)
        torch.autograd.grad(out, leaf, dout)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of GPU memory at {shape.name}")
    except Exception as e:  # third-party providers: report why a row is missing, keep going
        if provider not in OPTIONAL_PROVIDERS:
            raise
        pytest.skip(f"{provider} failed at {shape.name}: {type(e).__name__}: {e}"[:300])

    fwd_flops = flops.attention_flops(lengths, shape.heads, shape.head_dim)
    bwd_flops = flops.attention_bwd_flops(lengths, shape.heads, shape.head_dim)
    if pass_ == "fwd":
        timed, total_flops = fwd, fwd_flops
    elif pass_ == "bwd":
        out = fwd()

        def timed():
            return torch.autograd.grad(out, leaf, dout, retain_graph=True)

        total_flops = bwd_flops
    else:
        def timed():
            return torch.autograd.grad(fwd(), leaf, dout)

        total_flops = fwd_flops + bwd_flops

    memory = peak_memory_mb(timed, device)
    run(benchmark, timed, suite="attention", group=f"{shape.name} {str(dtype)[6:]} {pass_}",
        provider=provider, device=device, flops=total_flops, items=plan.total_tokens,
        item_name="tokens", baseline=_baseline(provider) if device == "cuda"
        else provider == GATHER_PAD, rounds=10 if device == "cuda" else 5,
        warmup=3 if device == "cuda" else 1, memory_mb=memory, shape=shape.name,
        images=shape.images, tokens_per_image=shape.tokens, heads=shape.heads,
        head_dim=shape.head_dim, segments=plan.num_segments, max_seqlen=plan.max_seqlen,
        total_tokens=plan.total_tokens, dtype=str(dtype)[6:], mode=pass_)
