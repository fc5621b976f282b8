"""MAE baseline: masking invariants, the loss's patches, the target, shapes, a training run."""


import torch

from spcl_fast.methods import MAE, MAEConfig
from spcl_fast.methods.mae import sample_mask
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train
from spcl_fast.views import patchify


def _mae(**kwargs) -> MAE:
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return MAE(enc, MAEConfig(**{"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
                                 **kwargs}))


def test_mask_counts_are_exact_and_differ_per_image():
    plan = sample_mask(6, 64, 0.75, torch.Generator().manual_seed(0))
    assert plan.ids_keep.shape == (6, 16) and plan.num_visible == 16
    mask = plan.mask()
    assert mask.shape == (6, 64) and (mask.sum(dim=1) == 48).all()
    for row, keep in zip(mask, plan.ids_keep, strict=True):
        assert keep.unique().numel() == 16 and (keep.diff() > 0).all()
        assert not row[keep].any()  # visible patches are exactly the unmasked ones
    assert len({tuple(k.tolist()) for k in plan.ids_keep}) == 6
    again = sample_mask(6, 64, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(again.ids_keep, plan.ids_keep)
    assert sample_mask(2, 10, 0.99).num_visible == 1  # never an empty encoder input


def test_encoder_sees_only_visible_patches():
    model = _mae().eval()
    x = torch.rand(2, 1, 32, 32)
    plan = model.sample_plan(2, torch.Generator().manual_seed(1), "cpu")
    hidden = plan.mask().view(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    scrambled = torch.where(hidden, torch.rand_like(x), x)
    latent = model.encode_visible(x, plan)
    assert latent.shape == (2, 4, 32)
    torch.testing.assert_close(model.encode_visible(scrambled, plan), latent)
    assert model.decode(latent, plan).shape == (2, 16, 64)


def test_loss_counts_only_masked_patches():
    pred = torch.randn(3, 16, 64, requires_grad=True)
    target = torch.randn(3, 16, 64)
    plan = sample_mask(3, 16, 0.75, torch.Generator().manual_seed(2))
    mask = plan.mask()
    loss = MAE.masked_mse(pred, target, mask)
    expected = (pred - target).square().mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).any()
    nudged = pred.detach().clone()
    nudged[~mask] += 5.0
    torch.testing.assert_close(MAE.masked_mse(nudged, target, mask), loss.detach())


def test_norm_pix_target():
    x = torch.rand(2, 1, 32, 32)
    t = _mae(norm_pix_loss=True).target(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(_mae(norm_pix_loss=False).target(x), patchify(x, 8))


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _mae()
    x = torch.rand(4, 1, 32, 32)
    plan = model.sample_plan(4, torch.Generator().manual_seed(3), "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = model(x, plan=plan)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(out) == {"loss", "visible_mse"} and not out["visible_mse"].requires_grad


def test_engine_trains_mae(tmp_path):
    config = smoke().replace(method="mae", steps=2, decoder_dim=32, decoder_depth=1,
                                 decoder_heads=2)
    summary = train(config, tmp_path)
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert summary["gflops_per_image"] > 0
