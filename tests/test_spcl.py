"""S-PCL method options: background skipping, more than two subsets, a predictor branch."""

import math

import pytest
import torch

from spcl_fast.methods import SPCL, SPCLConfig
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.reference import info_nce_ref
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train
from spcl_fast.train.trainer import Trainer


def _model(background_std=0.2, **kwargs):
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    config = SPCLConfig(proj_hidden=32, proj_dim=16, background_std=background_std, **kwargs)
    return SPCL(encoder, config)


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
    trainer = Trainer(smoke().replace(background_std=0.2))
    assert trainer.model.config.background_std == 0.2
    x = trainer.transform(trainer.stream.next())
    x[:, :, :, :16] = x.mean()  # flat left halves
    plan = trainer.plans.sample(trainer.model, x)
    assert not set((plan.token_index % 16).tolist()) & _flat_token_ids()
    out = trainer.train_step()
    assert torch.isfinite(out["loss"])
    summary = train(smoke().replace(background_std=0.2), tmp_path / "run")
    assert summary["steps"] == smoke().optim.steps and math.isfinite(summary["final_loss"])


def test_foreground_of_colour_images_is_per_channel():
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               in_chans=3)
    model = SPCL(encoder, SPCLConfig(proj_hidden=32, proj_dim=16, background_std=0.2))
    x = torch.rand(2, 3, 32, 32)
    x[:, 0, :8, :8], x[:, 1, :8, :8], x[:, 2, :8, :8] = 0.9, 0.1, 0.5  # flat, but coloured
    valid = model.foreground(x)
    assert not valid[:, 0].any() and valid[:, 1:].all()


@pytest.mark.parametrize("num_subsets,predictor", [(2, 0), (3, 0), (4, 24), (2, 24)])
def test_loss_is_the_mean_pairwise_info_nce_of_the_subsets(num_subsets, predictor):
    model = _model(background_std=0, num_subsets=num_subsets, predictor_hidden=predictor).double()
    x = torch.rand(5, 1, 32, 32, dtype=torch.float64)
    plan = model.sample_plan(5, torch.Generator().manual_seed(0), "cpu")
    assert plan.subsets_per_image == num_subsets
    out = model(x, plan=plan)
    z = model.projector(model.encoder.forward_partitioned(x, plan)).view(5, num_subsets, -1)
    pred = model.predictor or (lambda v: v)
    pairs = [(i, j) for i in range(num_subsets) for j in range(i + 1, num_subsets)]
    expected = sum(info_nce_ref(pred(z[:, i]), z[:, j], 0.1) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(out["loss"], expected)
    # gradients of every parameter (encoder, projector, predictor) against the reference's
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], params)
    for got, want in zip(grads, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(got, want)
        assert got.abs().sum() > 0, "a parameter the loss does not reach"
    # FLOPs: the loss's logits once per pair, the predictor (16 -> 24 -> 16) once per query
    # subset (all but the last)
    parts = _model(background_std=0, num_subsets=num_subsets)
    pairs = len(pairs)
    head = 3 * (num_subsets - 1) * 2 * 5 * (16 * 24 + 24 * 16) if predictor else 0
    assert model.train_flops(plan) - parts.train_flops(plan) == head
    # and the logits once per pair: "all" negatives (10 x 10 logits) against "cross" (5 x 5)
    all_neg = _model(background_std=0, num_subsets=num_subsets, negatives="all")
    assert all_neg.train_flops(plan) - parts.train_flops(plan) == pairs * 3 * 2 * (100 - 25) * 16


def test_subset_options_errors_and_plan_mismatch():
    with pytest.raises(ValueError, match="num_subsets must be from 2 to the number of patches"):
        _model(num_subsets=1)
    with pytest.raises(ValueError, match="predictor_hidden"):
        _model(predictor_hidden=-1)
    model = _model(background_std=0, num_subsets=3)
    plan = _model(background_std=0).sample_plan(2, None, "cpu")  # two subsets per image
    with pytest.raises(ValueError, match="2 subsets per image, the model 3"):
        model(torch.rand(2, 1, 32, 32), plan=plan)


def test_jitter_gives_each_of_several_subsets_its_own_view():
    model = _model(background_std=0, num_subsets=3, subset_jitter=1.0)
    x = torch.rand(2, 1, 32, 32)
    plan = model.sample_plan(2, torch.Generator().manual_seed(0), "cpu")
    mixed = model._jitter_subsets(x, plan, torch.Generator().manual_seed(1))
    patches = mixed.unfold(2, 8, 8).unfold(3, 8, 8).reshape(2, 16, 64)
    orig = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(2, 16, 64)
    cu = plan.cu_seqlens.tolist()
    for img in range(2):
        # one intensity map per subset: fit c0 + c1 x + c2 x^2 on each subset's pixels
        coefs = []
        for k in range(3):
            rows = plan.token_index[cu[3 * img + k] : cu[3 * img + k + 1]] % 16
            a, b = orig[img, rows].reshape(-1), patches[img, rows].reshape(-1)
            design = torch.stack([torch.ones_like(a), a, a * a], 1)
            coef = torch.linalg.lstsq(design, b[:, None]).solution[:, 0]
            assert (design @ coef - b).std() < 0.25  # the rest is the jitter's pixel noise
            coefs.append(coef)
        for i in range(3):
            for j in range(i + 1, 3):
                assert (coefs[i] - coefs[j]).abs().max() > 0.05, "two subsets share a view"


@pytest.mark.parametrize("changes", [
    dict(num_subsets=3, predictor_hidden=16),
    dict(class_token=True, layout="inplace"),
    dict(pos_embed="none", normalize="equalize"),
])
def test_study_options_train_and_reload(tmp_path, changes):
    config = smoke().replace(**changes)
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == config.optim.steps and math.isfinite(summary["final_loss"])
    from spcl_fast.eval import load_encoder

    loaded = load_encoder(tmp_path / "run")
    assert loaded.encoder.num_prefix_tokens == int(changes.get("class_token", False))
    x = torch.rand(2, 1, 32, 32)
    assert loaded.encoder(x).shape == (2, 64)


def test_baselines_refuse_a_class_token_encoder():
    from spcl_fast.methods import DINO, MAE, DINOConfig, MAEConfig

    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               class_token=True)
    with pytest.raises(ValueError, match="class token"):
        MAE(encoder, MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2))
    with pytest.raises(ValueError, match="class token"):
        DINO(encoder, DINOConfig(out_dim=64))


def test_parameter_order_is_that_of_earlier_checkpoints():
    """A checkpoint's optimizer state follows the parameter order: the heads keep theirs."""
    model = _model(intra_weight=1.0, intra_target="pixels", predictor_hidden=8)
    order = list(dict.fromkeys(name.split(".")[0] for name, _ in model.named_parameters()))
    assert order == ["encoder", "projector", "token_predictor", "pixel_head", "predictor"]
