"""PartitionAdapter: another codebase's ViT (timm's code, written down here so the test runs
without timm; real timm models in the timm tier, tests/test_timm_tier.py) attends within the
plan's segments, on values and gradients, and runs unchanged outside a plan block."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spcl_fast import sample_partitions
from spcl_fast.nn import PartitionAdapter, pool_segments, vit_tiny_patch16

D, H, DEPTH, IMG, PATCH = 32, 2, 2, 16, 4
N = (IMG // PATCH) ** 2


class TimmAttention(nn.Module):
    """timm.layers.Attention's forward (fused path), with its optional norms."""

    def __init__(self, dim, num_heads, qk_norm=False, scale_norm=False, attn_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.LayerNorm(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.norm(x.transpose(1, 2).reshape(b, n, c))
        return self.proj_drop(self.proj(x))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, num_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm's VisionTransformer.forward_features: class token, learned positions, blocks."""

    num_prefix_tokens = 1

    def __init__(self, **attn_kwargs):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, D, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + N, D) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(D, H, **attn_kwargs) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def embed(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed

    def forward_features(self, images):
        return self.norm(self.blocks(self.embed(images)))


@contextlib.contextmanager
def _attending_to_nothing(model):
    """Every attention layer of ``model`` gives what a row with a zero attention context gets:
    its output projection (after the attention's own norm, if any) of zeros."""
    for block in model.blocks:
        attn = block.attn
        norm = getattr(attn, "norm", nn.Identity())
        attn.forward = lambda x, *_, a=attn, norm=norm, **__: a.proj(norm(torch.zeros_like(x)))
    try:
        yield
    finally:
        for block in model.blocks:
            del block.attn.forward


def _reference(model, x0, plan, num_prefix):
    """Segment by segment: the model's own blocks and final norm, dense, on only that segment's
    patch tokens (``x0``: the embedded ``(B, P + N, D)`` sequences); every other row (prefix
    tokens, patches in no segment) with a zero attention context."""
    b, seq_len, d = x0.shape
    n = plan.num_tokens
    out = x0.new_zeros(b * seq_len, d)
    flat = x0.reshape(b * seq_len, d)
    rows = plan.token_index // n * seq_len + num_prefix + plan.token_index % n
    cu = plan.cu_seqlens.tolist()
    for s in range(plan.num_segments):
        seg = rows[cu[s]:cu[s + 1]]
        if len(seg):
            out = out.index_put((seg,), model.norm(model.blocks(flat[seg][None]))[0])
    others = torch.ones(b * seq_len, dtype=torch.bool)
    others[rows] = False
    with _attending_to_nothing(model):
        x = model.norm(model.blocks(flat[others][None]))[0]
    out = out.index_put((others.nonzero()[:, 0],), x)
    return out.reshape(b, seq_len, d)


@pytest.mark.parametrize("norms", [{}, {"qk_norm": True, "scale_norm": True}],
                         ids=["plain", "norms"])
@pytest.mark.parametrize("plan_kwargs", [{}, {"keep": 0.75, "ratio_range": (0.2, 0.8)},
                                         {"num_subsets": 3}], ids=["all", "keep", "three"])
def test_adapted_timm_vit_matches_per_segment_dense_forward(norms, plan_kwargs):
    torch.manual_seed(0)
    model = TimmViT(**norms).double()
    images = torch.randn(3, 1, IMG, IMG, dtype=torch.float64)
    plan = sample_partitions(3, N, generator=torch.Generator().manual_seed(1), **plan_kwargs)
    adapter = PartitionAdapter(model, impl="torch")
    assert adapter.num_prefix_tokens == 1
    with adapter.plan(plan):
        got = model.forward_features(images)
    grads = torch.autograd.grad(pool_segments(got, plan, 1).square().sum() + got[:, 0].sum(),
                                list(model.parameters()))
    want = _reference(model, model.embed(images), plan, 1)
    want_grads = torch.autograd.grad(pool_segments(want, plan, 1).square().sum()
                                     + want[:, 0].sum(), list(model.parameters()))
    torch.testing.assert_close(got, want)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, msg=name)


def test_empty_and_one_token_segments():
    """A hand-made plan of three subsets per image, with one-token and empty subsets (and
    tokens in none): empty subsets pool to zeros, every row matches the reference."""
    from spcl_fast.partition import PartitionPlan

    torch.manual_seed(0)
    model = TimmViT(qk_norm=True).double()
    images = torch.randn(2, 1, IMG, IMG, dtype=torch.float64)
    index = torch.cat([torch.tensor([5]), torch.arange(8, 16),  # image 0: {5}, {}, {8..15}
                       torch.tensor([N + 3]), torch.arange(N + 4, 2 * N)])  # 1: {3}, {4..15}, {}
    lengths = [1, 0, 8, 1, 12, 0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    plan = PartitionPlan(index, cu, max_seqlen=12, num_images=2, num_tokens=N)
    with PartitionAdapter(model, impl="torch").plan(plan):
        got = model.forward_features(images)
    pooled = pool_segments(got, plan, 1)
    grads = torch.autograd.grad(pooled.square().sum(), list(model.parameters()),
                                allow_unused=True)
    want = _reference(model, model.embed(images), plan, 1)
    want_grads = torch.autograd.grad(pool_segments(want, plan, 1).square().sum(),
                                     list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want)
    assert torch.equal(pooled[1], torch.zeros(D, dtype=torch.float64))
    for g, w in zip(grads, want_grads, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w)


def test_outside_a_plan_the_model_is_unchanged():
    torch.manual_seed(0)
    model = TimmViT(qk_norm=True)
    images = torch.randn(2, 1, IMG, IMG)
    before, keys = model.forward_features(images), list(model.state_dict())
    adapter = PartitionAdapter(model)
    assert torch.equal(model.forward_features(images), before)
    assert list(model.state_dict()) == keys  # checkpoints load as before
    mask = torch.zeros(1 + N, 1 + N, dtype=torch.bool)
    mask[:, :5] = True  # masks still reach the model's own attention outside plan()
    model.blocks[0].attn(model.embed(images), attn_mask=mask)
    plan = sample_partitions(2, N, generator=torch.Generator().manual_seed(0))
    with adapter.plan(plan):
        with pytest.raises(ValueError, match="masks"):
            model.blocks[0].attn(model.embed(images), attn_mask=mask)
        with pytest.raises(RuntimeError, match="already inside"), adapter.plan(plan):
            pass
    assert torch.equal(model.forward_features(images), before)


def test_our_vit_through_the_adapter_equals_its_in_place_forward():
    vit = vit_tiny_patch16(img_size=IMG, patch_size=PATCH, depth=2, impl="torch")
    images = torch.rand(2, 1, IMG, IMG)
    plan = sample_partitions(2, N, keep=0.5, generator=torch.Generator().manual_seed(3))
    want = vit.forward_partitioned(images, plan, layout="inplace")
    with PartitionAdapter(vit).plan(plan):
        got = pool_segments(vit.forward_features(images), plan)
    torch.testing.assert_close(got, want)


def test_adapter_errors_name_the_problem():
    with pytest.raises(ValueError, match="no 'blocks'"):
        PartitionAdapter(nn.Linear(2, 2))
    no_attention = nn.Module()
    no_attention.blocks = nn.ModuleList([nn.Identity()])
    with pytest.raises(ValueError, match=r"blocks\[0\]\.attn needs qkv, proj and num_heads"):
        PartitionAdapter(no_attention)
    with pytest.raises(ValueError, match="attention dropout"):
        PartitionAdapter(TimmViT(attn_drop=0.1))
    model = TimmViT()
    images = torch.randn(2, 1, IMG, IMG)
    wrong_prefix = PartitionAdapter(model, num_prefix_tokens=0)
    plan = sample_partitions(2, N, generator=torch.Generator().manual_seed(0))
    with wrong_prefix.plan(plan), pytest.raises(ValueError, match="0 prefix tokens"):
        model.forward_features(images)
    other = TimmViT()
    with PartitionAdapter(other).plan(plan), pytest.raises(ValueError, match="for 2 images"):
        other.forward_features(images[:1])
    with pytest.raises(ValueError, match="pool_segments"):
        pool_segments(torch.zeros(2, N, D), plan, 1)


# Real timm models (run by the timm tier, tests/test_timm_tier.py, where timm imports):
# timm's default ViT-S/16, and DINOv2's ViT-S/14 with a class token, 4 register tokens and
# LayerScale, whose positions skip the prefix tokens.
TIMM_MODELS = {"vit_small_patch16_224": {}, "vit_small_patch14_reg4_dinov2": {"img_size": 98}}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_real_timm_matches_dense_per_subset_forward(name):
    timm = pytest.importorskip("timm", reason="timm runs in the timm tier (test_timm_tier.py)")
    model = timm.create_model(name, pretrained=False, num_classes=0, **TIMM_MODELS[name])
    model = model.double()
    p, n = model.num_prefix_tokens, model.patch_embed.num_patches
    assert p == (5 if "reg4" in name else 1)
    images = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    plan = sample_partitions(2, n, keep=0.75, ratio_range=(0.3, 0.7),
                             generator=torch.Generator().manual_seed(0))
    weight = torch.randn(2, p + n, model.embed_dim, dtype=torch.float64)
    params = list(model.parameters())
    # timm's own embedding (patches, class / register tokens, positions), then its blocks
    want = _reference(model, model.norm_pre(model._pos_embed(model.patch_embed(images))), plan, p)
    want_grads = torch.autograd.grad((want * weight).sum(), params)
    with PartitionAdapter(model, impl="torch").plan(plan):
        got = model.forward_features(images)
        grads = torch.autograd.grad((got * weight).sum(), params)
    torch.testing.assert_close(got, want)
    for (param, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, msg=param)


def test_copies_pickles_removal_and_checkpointing():
    import copy
    import io

    torch.manual_seed(0)
    model = TimmViT()
    images = torch.randn(2, 1, IMG, IMG)
    dense = model.forward_features(images)
    adapter = PartitionAdapter(model, impl="torch")
    plan = sample_partitions(2, N, generator=torch.Generator().manual_seed(0))
    teacher = copy.deepcopy(model)  # an EMA teacher: its own weights, its own (inactive) plan
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    with adapter.plan(plan):
        adapted = model.forward_features(images)
        assert torch.equal(teacher.forward_features(images),
                           TimmViT.forward_features(teacher, images))  # dense, own weights
        with pytest.raises(ValueError, match="sequences of 9 tokens"):  # rows re-checked
            model.blocks(model.embed(images)[:, :9])
    assert not torch.allclose(adapted, dense)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a pickled model loads back unadapted
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.forward_features(images), dense)
    adapter.remove()
    assert "forward" not in vars(model.blocks[0].attn)
    assert torch.equal(model.forward_features(images), dense)
    model.grad_checkpointing = True  # timm's set_grad_checkpointing flag
    with pytest.raises(RuntimeError, match="activation checkpointing"), \
            PartitionAdapter(model).plan(plan):
        pass
