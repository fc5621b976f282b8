"""S-PCL method options that change which tokens the subsets hold: background skipping."""

import dataclasses
import math

import pytest
import torch

from spcl_fast.methods import SPCL
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.train.config import smoke
from spcl_fast.train.engine import Trainer, train


def _model(background_std=0.2, **kwargs):
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    return SPCL(encoder, proj_hidden=32, proj_dim=16, background_std=background_std, **kwargs)


def _half_flat(batch=3):
    """Images whose left half (columns 0-15: patches 0,1 of each 4-patch row) is one flat grey,
    like padding or a collimation border, and whose right half is textured."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 32, 32, generator=g)
    x[..., :16] = 0.3
    return x


def _flat_token_ids():
    return {r * 4 + c for r in range(4) for c in (0, 1)}


def test_foreground_marks_flat_patches_and_ignores_intensity_scaling():
    model, x = _model(), _half_flat()
    valid = model.foreground(x)
    assert valid.shape == (3, 16) and valid.dtype == torch.bool
    expected = torch.tensor([i not in _flat_token_ids() for i in range(16)])
    assert torch.equal(valid, expected.expand(3, -1))
    # Relative to each image's own spread: any affine standardisation gives the same mask.
    assert torch.equal(model.foreground((x - 0.5) * 7.0), valid)
    # A blank frame keeps every patch (two non-empty subsets), a frame with one textured
    # patch too.
    blank = torch.full((2, 1, 32, 32), 0.4)
    blank[1, :, :8, :8] = torch.rand(8, 8)
    assert model.foreground(blank).all()


@pytest.mark.parametrize("block_size", [1, 2])
def test_plans_skip_background_and_training_steps_run(block_size):
    model, x = _model(block_size=block_size), _half_flat()
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu", x)
    tokens = plan.token_index % 16
    assert not set(tokens.tolist()) & _flat_token_ids()
    assert plan.seqlens.tolist() == [4, 4] * 3  # the 8 textured patches of each image, halved
    out = model(x, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.train_flops(plan) < _model(background_std=0).train_flops(
        _model(background_std=0).sample_plan(3, torch.Generator().manual_seed(0), "cpu"))


def test_background_option_errors():
    with pytest.raises(ValueError, match="background_std must be >= 0"):
        _model(background_std=-1)
    # Without images (a FLOP estimate before any batch) every patch counts.
    assert _model().sample_plan(2, None, "cpu").seqlens.tolist() == [8, 8, 8, 8]


def test_trainer_samples_plans_from_the_batch(tmp_path):
    trainer = Trainer(dataclasses.replace(smoke(), background_std=0.2))
    assert trainer.model.background_std == 0.2
    x = trainer.transform(trainer.stream.next())
    x[:, :, :, :16] = x.mean()  # flat left halves
    plan = trainer.plans.sample(trainer.model, x)
    assert not set((plan.token_index % 16).tolist()) & _flat_token_ids()
    out = trainer.train_step()
    assert torch.isfinite(out["loss"])
    summary = train(dataclasses.replace(smoke(), background_std=0.2), tmp_path / "run")
    assert summary["steps"] == smoke().steps and math.isfinite(summary["final_loss"])


def test_foreground_of_colour_images_is_per_channel():
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               in_chans=3)
    model = SPCL(encoder, proj_hidden=32, proj_dim=16, background_std=0.2)
    x = torch.rand(2, 3, 32, 32)
    x[:, 0, :8, :8], x[:, 1, :8, :8], x[:, 2, :8, :8] = 0.9, 0.1, 0.5  # flat, but coloured
    valid = model.foreground(x)
    assert not valid[:, 0].any() and valid[:, 1:].all()
