"""DINO baseline: its crops, the single packed student pass, teacher EMA, centring, gradients."""

import math

import pytest
import torch

from spcl_fast.methods import DINO, BuildContext, DINOConfig
from spcl_fast.methods.dino import encode_dense, encode_packed
from spcl_fast.nn import resize_pos_embed, vit_tiny_patch16
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train
from spcl_fast.train.trainer import param_groups


def _dino(pos_embed="sincos", total_steps=None, **kwargs) -> DINO:
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                           pos_embed=pos_embed)
    args = dict(num_local=3, local_size=16, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    return DINO(enc, DINOConfig(**{**args, **kwargs}), BuildContext(total_steps=total_steps))


def test_make_crops_shapes():
    model = _dino()
    x = torch.rand(4, 1, 32, 32)
    crops = model.make_crops(x, model.sample_plan(4, torch.Generator().manual_seed(1), "cpu"))
    assert [tuple(c.shape) for c in crops] == [(8, 1, 32, 32), (12, 1, 16, 16)]
    with torch.device("meta"):  # shapes only
        assert DINO(vit_tiny_patch16(img_size=224)).local_size == 96  # DINO's 224 / 96


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_packed_pass_equals_each_crop_through_the_dense_encoder(pos_embed):
    model = _dino(pos_embed)
    x = torch.rand(3, 1, 32, 32)
    crops = model.make_crops(x, model.sample_plan(3, torch.Generator().manual_seed(2), "cpu"))
    packed = encode_packed(model.encoder, crops)
    dense = torch.cat([encode_dense(model.encoder, c) for c in crops])
    assert packed.shape == (3 * 5, 32)
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)


def test_resize_pos_embed_keeps_own_grid_and_resizes_others():
    pos = torch.randn(1, 16, 8)
    assert resize_pos_embed(pos, 4) is pos
    assert resize_pos_embed(pos, 2).shape == (1, 4, 8)


def test_teacher_gets_no_gradients_and_no_optimizer_slot():
    model = _dino()
    model(torch.rand(2, 1, 32, 32))["loss"].backward()
    teacher = [*model.teacher_encoder.parameters(), *model.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert model.head.prototypes.grad is not None and model.encoder.blocks[0].attn.qkv.weight.grad \
        is not None
    in_optimizer = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher}


def test_teacher_ema_update_and_momentum_schedule():
    model = _dino(teacher_momentum=0.9, total_steps=10)
    assert model.momentum_at(0) == pytest.approx(0.9) and model.momentum_at(10) == 1.0
    assert model.momentum_at(5) == pytest.approx(0.95)
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(1.0)
        for p in model.teacher_head.parameters():
            p.fill_(3.0)
    teacher_enc = [p.clone() for p in model.teacher_encoder.parameters()]
    model.after_step(0)  # m = 0.9: 0.9 * 3 + 0.1 * 1
    for p in model.teacher_head.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.8))
    for p, before, s in zip(model.teacher_encoder.parameters(), teacher_enc,
                            model.encoder.parameters(), strict=True):
        torch.testing.assert_close(p, 0.9 * before + 0.1 * s)


def test_centring_sharpening_and_loss_pairs():
    model = _dino(num_local=1, center_momentum=0.9)
    model.center.fill_(0.5)
    b, k = 2, 64
    student, teacher = torch.randn(3 * b, k), torch.randn(2 * b, k)
    loss, targets = model.distillation_loss(student, teacher, b)
    q = torch.softmax((teacher - 0.5) / 0.04, dim=-1).split(b)
    logp = torch.log_softmax(student / 0.1, dim=-1).split(b)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # never a crop against itself
    expected = sum(-(q[i] * logp[v]).sum(-1).mean() for i, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(targets, torch.cat(q))
    model.update_center(teacher)
    torch.testing.assert_close(model.center, 0.9 * 0.5 + 0.1 * teacher.mean(0, keepdim=True))


def test_forward_contract_and_center_only_moves_in_training():
    model = _dino()
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    out = model(x)
    assert set(out) == {"loss", "teacher_entropy"} and torch.isfinite(out["loss"])
    assert not out["teacher_entropy"].requires_grad and (model.center == 0).all()
    model.train()
    model(x)
    model(x)
    assert (model.center == 0).all()  # it moves once per optimizer step, by the step's mean
    rows = model.step_rows.item()
    mean = model.step_logits / rows
    model.after_step(0)
    assert rows == 2 * 2 * 2  # two forwards of two global crops of two images
    torch.testing.assert_close(model.center, (1 - model.config.center_momentum) * mean)
    assert model.step_rows.item() == 0
    model.after_step(1)  # a step without a forward leaves the centre
    torch.testing.assert_close(model.center, (1 - model.config.center_momentum) * mean)


def test_engine_trains_dino(tmp_path):
    config = smoke().replace(method="dino", steps=2, dino_out_dim=64,
                                 dino_local_crops=2)
    summary = train(config, tmp_path)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    state = torch.load(summary["checkpoint"], weights_only=False)["model"]
    assert "center" in state and any(k.startswith("teacher_encoder.") for k in state)
