"""What the methods share below them (spcl_fast.views): random resized crops and patches."""

import math

import torch
import torch.nn.functional as F

from spcl_fast.views import patchify, resized_crops, sample_crops


def test_crop_plan_geometry():
    plan = sample_crops(64, 2, 10, generator=torch.Generator().manual_seed(0))
    assert plan.theta.shape == (12, 64, 2, 3) and plan.num_global == 2
    w, h = plan.theta[..., 0, 0], plan.theta[..., 1, 1]
    tx, ty = plan.theta[..., 0, 2], plan.theta[..., 1, 2]
    assert (w > 0).all(), "no flips by default (CXR laterality)"
    assert (tx.abs() + w <= 1 + 1e-6).all() and (ty.abs() + h <= 1 + 1e-6).all()  # inside
    area = w * h
    assert area[:2].min() >= 0.4 * 0.75 and area[2:].max() <= 0.4 + 1e-6
    assert (plan.gain - 1).abs().max() <= math.exp(0.1) - 1 and plan.bias.abs().max() <= 0.1
    flipped = sample_crops(4, flip_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert (flipped.theta[..., 0, 0] < 0).all()


def test_resized_crops_identity_and_flip():
    x = torch.rand(3, 1, 16, 16)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(2, 3, 2, 3)
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    out = resized_crops(x, eye, ones, zeros, 16)
    assert out.shape == (6, 1, 16, 16)
    torch.testing.assert_close(out, x.repeat(2, 1, 1, 1), atol=1e-5, rtol=0)
    flip = eye * torch.tensor([[-1.0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(resized_crops(x, flip, ones, zeros, 16)[:3], x.flip(-1),
                               atol=1e-5, rtol=0)
    out = resized_crops(x, eye, 2 * ones, ones, 8)  # downsized, with gain 2 and offset 1
    assert out.shape == (6, 1, 8, 8) and out.min() >= 1


def test_patchify_follows_the_patch_embedding_order():
    # Patch order and pixel order inside a patch match the conv patch embedding's (= unfold's);
    # with several channels a patch is its pixels in (row, column, channel) order.
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(patchify(x, 8), F.unfold(x, 8, stride=8).transpose(1, 2))
    x = torch.rand(2, 3, 16, 16)
    want = F.unfold(x, 8, stride=8).view(2, 3, 64, 4).permute(0, 3, 2, 1).reshape(2, 4, 192)
    torch.testing.assert_close(patchify(x, 8), want)
