"""Per-patch input normalisation of the ViT's patch embedding, against a patch-by-patch
reference on values and gradients."""

import pytest
import torch

from spcl_fast import flops, sample_partitions
from spcl_fast.nn import VisionTransformer
from spcl_fast.nn.vit import PATCH_NORM_EPS, PatchEmbed


def _reference(embed: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """One patch at a time: standardise its pixels per channel, flatten, the projection's
    matrix times it, plus (with stats) the stats linear of its per-channel means and stds."""
    p, g = embed.patch_size, x.shape[-1] // embed.patch_size
    weight = embed.proj.weight.flatten(1)  # (D, C*p*p), the conv as a matrix
    tokens = []
    for b in range(x.shape[0]):
        for i in range(g):
            for j in range(g):
                patch = x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten(1)  # (C, p*p)
                mean = patch.mean(dim=1)
                std = ((patch - mean[:, None]).square().mean(dim=1) + PATCH_NORM_EPS).sqrt()
                token = weight @ ((patch - mean[:, None]) / std[:, None]).flatten()
                token = token + embed.proj.bias
                if embed.stats is not None:
                    token = token + embed.stats(torch.cat([mean, std]))
                tokens.append(token)
    return torch.stack(tokens).view(x.shape[0], g * g, -1)


@pytest.mark.parametrize("patch_norm", ["standardize", "standardize+stats"])
@pytest.mark.parametrize("in_chans,patch,size", [(1, 4, 12), (3, 5, 10), (2, 1, 3)])
def test_patch_norm_matches_the_patch_by_patch_reference(patch_norm, in_chans, patch, size):
    torch.manual_seed(0)
    embed = PatchEmbed(size, patch, in_chans, 8, patch_norm).double()
    x = torch.randn(2, in_chans, size, size, dtype=torch.float64, requires_grad=True)
    got, want = embed(x), _reference(embed, x)
    torch.testing.assert_close(got, want)
    params = [x, *embed.parameters()]
    seed = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, params, seed), torch.autograd.grad(want, params, seed),
                    strict=True):
        torch.testing.assert_close(g, w)


def test_standardized_tokens_ignore_each_patchs_brightness_and_contrast():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            patch_norm="standardize")
    x = torch.rand(2, 1, 16, 16)
    # a different gain and offset on every patch
    gain = torch.rand(2, 1, 4, 4).add(0.5).repeat_interleave(4, 2).repeat_interleave(4, 3)
    offset = torch.randn(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(vit(gain * x + offset), vit(x), atol=1e-4, rtol=1e-4)
    with_stats = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                   patch_norm="standardize+stats")
    assert not torch.allclose(with_stats(gain * x + offset), with_stats(x), atol=1e-3)


def test_flat_patches_embed_to_the_bias_without_nans():
    embed = PatchEmbed(8, 4, 1, 4, "standardize")
    tokens = embed(torch.full((1, 1, 8, 8), 0.3))
    torch.testing.assert_close(tokens, embed.proj.bias.expand(1, 4, 4).detach())


@pytest.mark.parametrize("patch_norm", ["none", "standardize", "standardize+stats"])
def test_every_path_embeds_alike_and_flops_are_counted(patch_norm):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            patch_norm=patch_norm)
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(vit.embed(x, any_size=True), vit.embed(x))
    plan = sample_partitions(3, 16, generator=torch.Generator().manual_seed(0))
    counted = flops.measure_flops(lambda: vit.forward_partitioned(x, plan).sum().backward())
    assert counted == pytest.approx(flops.training_flops(
        vit.forward_flops(plan.seqlens.tolist(), 3)), rel=0.01)


def test_unknown_patch_norm_is_named():
    with pytest.raises(ValueError, match="patch_norm must be one of"):
        VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          patch_norm="layernorm")


def test_patch_norm_trains_through_the_cli_and_reloads(tmp_path):
    from spcl_fast.eval import load_encoder
    from spcl_fast.train.__main__ import main

    main(["--preset", "smoke", "--steps", "2", "--out", str(tmp_path / "run"), "--probe", "no",
          "--patch-norm", "standardize+stats"])
    loaded = load_encoder(tmp_path / "run")
    assert loaded.encoder.patch_embed.patch_norm == "standardize+stats"
    assert "patch_embed.stats.weight" in loaded.encoder.state_dict()
    assert loaded.encoder(torch.rand(2, 1, 32, 32)).shape == (2, 64)
