"""A run's model: every method is built from its own config section and keeps the method
contract; builds are seeded; a resume that changes the model says which setting changed."""

import pytest
import torch

from spcl_fast.methods import METHODS, AfterStep, Method
from spcl_fast.run.model import architecture_mismatch, build_model
from spcl_fast.run.presets import smoke

SMALL = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, dino_out_dim=32,
             dino_local_crops=2, proj_hidden=16, proj_dim=8)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_is_built_from_its_section_and_keeps_the_contract(method):
    config = smoke().replace(method=method, **SMALL)
    model = build_model(config)
    assert type(model) is METHODS[method] and isinstance(model, Method)
    assert isinstance(model, AfterStep) == (method == "dino")  # only DINO has a teacher
    assert model.encoder.embed_dim == config.model.embed_dim
    plan = model.sample_plan(4, torch.Generator().manual_seed(0), "cpu")
    assert type(plan).concat([plan, plan]).num_images == 8
    assert model.train_flops(plan) > 0
    # the same config builds the same weights
    again = build_model(config).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    out = model(torch.rand(4, 1, 32, 32), plan=plan)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_section_settings_reach_the_method():
    config = smoke().replace(method="mae", mask_ratio=0.5, **SMALL)
    mae = build_model(config)
    assert mae.config == config.mae and mae.decoder_embed.out_features == 16
    config = smoke().replace(method="dino", steps=7, **SMALL)
    dino = build_model(config)
    assert dino.config == config.dino and (dino.total_steps, dino.center.shape[1]) == (7, 32)
    config = smoke().replace(keep=0.5, num_subsets=3)
    spcl = build_model(config, global_batch_loss=True)
    assert spcl.config == config.spcl and spcl.gather_distributed


def test_a_changed_model_is_named_on_resume():
    old = smoke()
    new = old.replace(depth=3, proj_dim=16, steps=9, mask_ratio=0.5)  # the last two: no weights
    message = architecture_mismatch(old.flat(), new, RuntimeError("size mismatch\nmore"))
    assert message.startswith("the checkpoint's model was built with other settings: ")
    assert "depth 2 (now 3)" in message and "proj_dim 32 (now 16)" in message
    assert "steps" not in message and "mask_ratio" not in message
    message = architecture_mismatch(old.flat(), old, RuntimeError("size mismatch\nmore"))
    assert message == "the checkpoint's weights do not fit this model: size mismatch"
