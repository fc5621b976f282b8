"""SimCLR, the augmentation-based positive control: its crops, its loss against the reference
on values and gradients, its FLOP count, and a CLI run that reloads."""

import json
import math

import pytest
import torch

from spcl_fast import flops
from spcl_fast.methods import SimCLR, SimCLRConfig
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.reference import info_nce_ref
from spcl_fast.run.presets import smoke
from spcl_fast.views import resized_crops


def _model(class_token=False, **kwargs):
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               class_token=class_token)
    return SimCLR(encoder, SimCLRConfig(proj_hidden=24, proj_dim=16, **kwargs))


def test_plan_is_two_mild_unflipped_crops_per_image_drawn_per_seed():
    model = _model(crop_scale=(0.6, 0.9), jitter=0.2)
    plan = model.sample_plan(50, torch.Generator().manual_seed(3), "cpu")
    assert plan.theta.shape == (2, 50, 2, 3) and plan.num_images == 50
    w, h = plan.theta[..., 0, 0], plan.theta[..., 1, 1]
    assert (w > 0).all() and (h > 0).all()  # no flip: laterality is kept
    area = w * h  # side fractions; clipping a side to the image only shrinks the area
    assert area.max() <= 0.9 + 1e-6 and area.min() >= 0.6 * 3 / 4 - 1e-6
    assert plan.gain.log().abs().max() <= 0.2 and plan.bias.abs().max() <= 0.2
    again = model.sample_plan(50, torch.Generator().manual_seed(3), "cpu")
    other = model.sample_plan(50, torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(plan.theta, again.theta) and not torch.equal(plan.theta, other.theta)


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_loss_is_info_nce_of_the_two_crops_projections(class_token, batch):
    model = _model(class_token, temperature=0.3).double()
    x = torch.rand(batch, 1, 32, 32, dtype=torch.float64)
    plan = model.sample_plan(batch, torch.Generator().manual_seed(0), "cpu")
    out = model(x, plan=plan)
    crops = resized_crops(x, plan.theta, plan.gain, plan.bias, 32)
    z = model.projector(model.encoder(crops))
    want = info_nce_ref(z[:batch], z[batch:], 0.3)
    torch.testing.assert_close(out["loss"], want)
    params = [model.encoder.patch_embed.proj.weight, model.projector.net[0].weight]
    for got, ref in zip(torch.autograd.grad(out["loss"], params),
                        torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(got, ref)
    assert 0 <= out["acc"] <= 1 and not out["acc"].requires_grad


def test_flop_count_matches_the_counter():
    model = _model()
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="crop_scale must be"):
        _model(crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="crop_scale must be"):
        smoke().replace(simclr_scale=(0.0, 1.0)).check()
    with pytest.raises(ValueError, match="temperature must be positive"):
        smoke().replace(simclr_temperature=0.0).check()
    model, x = _model(), torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="plan has 2 crops of 3 images"):
        model(x, plan=model.sample_plan(3, None, "cpu"))


def test_simclr_trains_through_the_cli_and_reloads(tmp_path):
    from spcl_fast.eval import load_encoder
    from spcl_fast.train.__main__ import main

    main(["--preset", "smoke", "--method", "simclr", "--steps", "2", "--simclr-scale", "0.5,1",
          "--simclr-proj-hidden", "32", "--out", str(tmp_path / "run"), "--probe", "no"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "simclr" and saved["simclr"]["proj_hidden"] == 32
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert steps and all(math.isfinite(m["loss"]) and "acc" in m for m in steps)
    loaded = load_encoder(tmp_path / "run")
    assert loaded.encoder(torch.rand(2, 1, 32, 32)).shape == (2, 64)
