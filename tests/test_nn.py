"""Modules: the ViT's layouts agree, one segment equals dense attention, timm names."""

import pytest
import torch

from spcl_fast import sample_partitions
from spcl_fast.nn import (
    PRESETS,
    Block,
    VarlenAttention,
    VisionTransformer,
    create_vit,
    resize_pos_embed,
    segment_mean,
    sincos_pos_embed,
    vit_tiny_patch16,
)
from spcl_fast.partition import PartitionPlan


def _tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args).double()


def _full_plan(b, n):
    """One segment per image holding all its tokens."""
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32)
    return PartitionPlan(torch.arange(b * n), cu, n, b, n)


def test_one_segment_per_image_equals_dense_forward():
    model = _tiny()
    images = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    plan = _full_plan(3, model.num_patches)
    # A plan of one segment per image pools (B, D) rows; compare with the dense mean.
    pooled = _segments_forward(model, images, plan)
    torch.testing.assert_close(pooled, model(images))


def _segments_forward(model, images, plan):
    x = model.embed(images).reshape(-1, model.embed_dim)[plan.token_index]
    for blk in model.blocks:
        x = blk(x, plan.cu_seqlens, plan.max_seqlen)
    return segment_mean(model.norm(x), plan)


@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_packed_and_inplace_layouts_agree_with_grads(keep):
    model = _tiny()
    images = torch.rand(4, 1, 32, 32, dtype=torch.float64)
    plan = sample_partitions(
        4,
        model.num_patches,
        keep=keep,
        ratio_range=(0.2, 0.8),
        generator=torch.Generator().manual_seed(0),
    )
    packed = model.forward_partitioned(images, plan, "packed")
    grads_packed = torch.autograd.grad(packed.square().sum(), list(model.parameters()))
    inplace = model.forward_partitioned(images, plan, "inplace")
    grads_inplace = torch.autograd.grad(inplace.square().sum(), list(model.parameters()))
    assert packed.shape == (8, 32)
    torch.testing.assert_close(packed, inplace)
    for a, b in zip(grads_packed, grads_inplace, strict=False):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_subsets", [2, 3, 5])
@pytest.mark.parametrize("layout", ["packed", "inplace"])
@pytest.mark.parametrize("class_token", [False, True])
def test_each_segment_equals_a_dense_forward_of_its_tokens(num_subsets, layout, class_token):
    model = _tiny(class_token=class_token)
    images = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    plan = sample_partitions(3, model.num_patches, keep=0.8, num_subsets=num_subsets,
                             generator=torch.Generator().manual_seed(2))
    pooled = model.forward_partitioned(images, plan, layout)
    assert pooled.shape == (3 * num_subsets, 32)
    grads = torch.autograd.grad(pooled.square().sum(), list(model.parameters()))
    tokens = model.embed(images).reshape(-1, model.embed_dim)
    cu = plan.cu_seqlens.tolist()
    dense = []
    for s in range(plan.num_segments):
        x = tokens[plan.token_index[cu[s] : cu[s + 1]]][None]  # that subset alone, dense
        if class_token:
            x = torch.cat([model.cls_token, x], dim=1)
        for blk in model.blocks:
            x = blk(x)
        x = model.norm(x)[0]
        dense.append(x[0] if class_token else x.mean(0))
    torch.testing.assert_close(pooled, torch.stack(dense))
    dense_grads = torch.autograd.grad(torch.stack(dense).square().sum(), list(model.parameters()))
    for a, b in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["packed", "inplace"])
def test_class_token_with_empty_segments(layout):
    # images with fewer valid tokens than subsets: some segments hold only their class token
    model = _tiny(class_token=True)
    valid = torch.zeros(3, 16, dtype=torch.bool)
    valid[0, :2], valid[1, :7], valid[2] = True, True, True
    plan = sample_partitions(3, 16, valid_mask=valid, num_subsets=3,
                             generator=torch.Generator().manual_seed(0))
    assert plan.seqlens[:3].tolist() == [1, 1, 0]
    images = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    pooled = model.forward_partitioned(images, plan, layout)
    alone = model.cls_token
    for blk in model.blocks:
        alone = blk(alone)
    torch.testing.assert_close(pooled[2], model.norm(alone)[0, 0])  # the bare class token
    tokens = model.embed(images).reshape(-1, 32)
    cu = plan.cu_seqlens.tolist()
    dense = []
    for s in range(plan.num_segments):  # each segment: its class token + its tokens, dense
        x = torch.cat([model.cls_token[0], tokens[plan.token_index[cu[s]:cu[s + 1]]]])[None]
        for blk in model.blocks:
            x = blk(x)
        dense.append(model.norm(x)[0, 0])
    dense = torch.stack(dense)
    torch.testing.assert_close(pooled, dense)
    params = list(model.parameters())
    for got, want in zip(torch.autograd.grad(pooled.square().sum(), params),
                         torch.autograd.grad(dense.square().sum(), params), strict=True):
        torch.testing.assert_close(got, want)


def test_class_token_pools_dense_forward_and_one_segment_plans():
    model = _tiny(class_token=True)
    assert model.num_prefix_tokens == 1 and model.cls_token.requires_grad
    images = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    feats = model.forward_features(images)
    assert feats.shape == (2, 17, 32)
    torch.testing.assert_close(model(images), feats[:, 0])
    torch.testing.assert_close(model.patch_tokens(images), feats[:, 1:])
    # a plan of one segment per image is the dense forward, class token included
    plan = _full_plan(2, model.num_patches)
    torch.testing.assert_close(model.forward_partitioned(images, plan), model(images))
    assert _tiny().num_prefix_tokens == 0 and not hasattr(_tiny(), "cls_token")


def test_no_pos_embed_is_zero_frozen_and_position_blind():
    model = _tiny(pos_embed="none")
    assert not model.pos_embed.requires_grad and not model.pos_embed.any()
    images = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    # swapping two patches of an image permutes its tokens, so the mean-pooled output stays
    swapped = images.clone()
    corner, centre = images[:, :, :8, :8], images[:, :, 8:16, 8:16]
    swapped[:, :, :8, :8], swapped[:, :, 8:16, 8:16] = centre, corner
    torch.testing.assert_close(model(images), model(swapped))
    assert not torch.allclose(_tiny(pos_embed="sincos")(images), _tiny(pos_embed="sincos")(swapped))


def test_segment_embeddings_depend_only_on_own_tokens():
    # Changing the pixels of tokens outside subset A leaves A's embedding unchanged.
    model = _tiny()
    images = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    plan = sample_partitions(1, model.num_patches, generator=torch.Generator().manual_seed(1))
    a_tokens = set(plan.token_index[: plan.cu_seqlens[1]].tolist())
    edited = images.clone()
    grid = model.patch_embed.grid_size
    for t in range(model.num_patches):
        if t not in a_tokens:
            r, c = divmod(t, grid)
            edited[0, 0, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = torch.rand(
                8, 8, dtype=torch.float64
            )
    before = model.forward_partitioned(images, plan)
    after = model.forward_partitioned(edited, plan)
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_varlen_attention_dense_mode_matches_manual():
    torch.manual_seed(0)
    attn = VarlenAttention(16, 4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    qkv = attn.qkv(x).view(2, 5, 3, 4, 4)
    q, k, v = qkv.unbind(2)
    w = torch.einsum("bihd,bjhd->bhij", q, k) / 2.0
    out = torch.einsum("bhij,bjhd->bihd", w.softmax(-1), v).reshape(2, 5, 16)
    torch.testing.assert_close(attn(x), attn.proj(out))


def test_timm_parameter_names():
    names = set(vit_tiny_patch16(img_size=64, depth=2).state_dict())
    expected = {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "pos_embed",
        "norm.weight",
        "norm.bias",
    }
    for i in range(2):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert names == expected


def test_presets_and_geometry():
    for name, cfg in PRESETS.items():
        m = create_vit(name, img_size=32, patch_size=16, depth=1)
        assert m.embed_dim == cfg["embed_dim"] and m.num_heads == cfg["num_heads"]
    m = create_vit("vit_small_patch16", img_size=48, depth=1)
    assert m.num_patches == 9 and m.forward_features(torch.rand(2, 1, 48, 48)).shape == (2, 9, 384)
    with pytest.raises(ValueError, match="multiple"):
        create_vit("vit_tiny_patch16", img_size=50)
    with pytest.raises(ValueError, match="unknown model"):
        create_vit("vit_huge")
    with pytest.raises(ValueError, match="64x64"):
        create_vit("vit_tiny_patch16", img_size=64, depth=1)(torch.rand(1, 1, 32, 32))


def test_sincos_pos_embed_fixed_and_distinct():
    m = _tiny(pos_embed="sincos")
    assert not m.pos_embed.requires_grad
    pe = sincos_pos_embed(32, 4)
    assert pe.shape == (16, 32)
    dists = torch.cdist(pe, pe) + torch.eye(16)
    assert dists.min() > 0.1  # every position distinguishable
    with pytest.raises(ValueError, match="pos_embed"):
        _tiny(pos_embed="rope")


def test_block_drop_path_only_in_training():
    blk = Block(16, 2, drop_path=0.5).double()
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    blk.eval()
    torch.testing.assert_close(blk(x), blk(x))
    blk.train()
    torch.manual_seed(0)
    outs = [blk(x) for _ in range(8)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("class_token", [False, True])
def test_forward_flops_is_what_flop_counter_mode_counts(class_token):
    from spcl_fast.flops import measure_flops

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3,
                            mlp_ratio=3.0, class_token=class_token, impl="torch")
    images = torch.rand(3, 1, 32, 32)
    # uneven segments, one empty and one of a single token
    plan = PartitionPlan(torch.tensor([5, 0, 1, 2, 3, 20, 21, 40]),
                         torch.tensor([0, 1, 5, 5, 7, 8, 8], dtype=torch.int32), 4, 3, 16)
    expected = vit.forward_flops(plan.seqlens.tolist(), plan.num_images)
    assert measure_flops(lambda: vit.forward_partitioned(images, plan)) == sum(expected.values())
    dense = vit.forward_flops([16] * 3, 3)
    assert measure_flops(lambda: vit(images)) == sum(dense.values())
    # a crop of another size: its own patch count
    crop = vit.forward_flops([4] * 2, 2, num_patches=4)
    assert crop["patch_embed"] == 2 * 4 * 64 * 24 * 2


def test_forward_tokens_is_the_token_path_of_every_forward():
    vit = _tiny(class_token=True)
    images = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.embed(images)], dim=1)
    torch.testing.assert_close(vit.forward_tokens(x), vit.forward_features(images))
    rows = x.reshape(2 * 17, -1)  # each image one varlen segment
    cu = torch.tensor([0, 17, 34], dtype=torch.int32)
    torch.testing.assert_close(vit.forward_tokens(rows, cu, 17).view(2, 17, -1),
                               vit.forward_features(images))


def test_embed_of_any_size_resizes_the_position_embeddings():
    vit = _tiny(pos_embed="learned")
    own = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(vit.embed(own, any_size=True), vit.embed(own))
    crop = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    tokens = vit.embed(crop, any_size=True)
    assert tokens.shape == (2, 4, 32)
    patches = vit.patch_embed.proj(crop).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens - patches,
                               resize_pos_embed(vit.pos_embed, 2).expand(2, -1, -1))
    tokens.sum().backward()  # the learned table trains through the resize
    assert vit.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected 32x32 images"):
        vit.embed(crop)


def test_attention_layers_run_the_qkv_packed_op(monkeypatch):
    # VarlenAttention and PartitionAdapter hand the qkv projection to the qkv-packed op (one
    # gradient buffer in the backward); per-head q/k norms need the separate q, k, v entry.
    from spcl_fast.nn import PartitionAdapter
    from spcl_fast.nn import adapter as adapter_module
    from spcl_fast.nn import attention as attention_module

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    for module in (attention_module, adapter_module):
        monkeypatch.setattr(module, "partition_attention_qkvpacked",
                            spy("packed", module.partition_attention_qkvpacked))
    monkeypatch.setattr(adapter_module, "partition_attention",
                        spy("separate", adapter_module.partition_attention))
    plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
    attn = VarlenAttention(32, num_heads=2)
    attn(torch.randn(32, 32), plan.cu_seqlens, plan.max_seqlen, plan.token_index)
    assert calls == ["packed"]

    vit = vit_tiny_patch16(img_size=16, patch_size=4, depth=1)
    adapter = PartitionAdapter(vit)
    with adapter.plan(plan):
        vit.forward_features(torch.rand(2, 1, 16, 16))
    assert calls == ["packed", "packed"]
    vit.blocks[0].attn.q_norm = vit.blocks[0].attn.k_norm = torch.nn.LayerNorm(64)
    with adapter.plan(plan):
        vit.forward_features(torch.rand(2, 1, 16, 16))
    assert calls == ["packed", "packed", "separate"]
