"""S-PCL's reconstruction term (issue 37 §3, SplitMask's design): each subset's token outputs
predict the other subsets' per-patch standardised pixels through a light decoder. The term
against a reference written out image by image and subset by subset (dense decoder calls, values
and gradients), its FLOPs against FlopCounterMode, the config's errors and MAE's shared target."""

import pytest
import torch

from spcl_fast import flops
from spcl_fast.methods import SPCL, SPCLConfig
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.nn.decoder import normalized_patches
from spcl_fast.views import patchify


def _model(**options) -> SPCL:
    torch.manual_seed(0)
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           class_token=options.pop("class_token", False))
    return SPCL(enc, SPCLConfig(**{**dict(proj_hidden=16, proj_dim=8, recon_weight=0.5,
                                           recon_dim=16, recon_depth=2, recon_heads=2),
                                    **options}))


def _reference(model, x, plan):
    """Mean over the batch's predicted patches of their squared error: for every image and
    subset, one dense decoder call on [its tokens ; mask tokens at the image's other kept
    positions]."""
    dec, k, n = model.recon_decoder, model.config.num_subsets, plan.num_tokens
    _, tokens = model.encoder.forward_partitioned_tokens(x, plan, model.config.layout)
    pixels = normalized_patches(x, model.encoder.patch_embed.patch_size)
    seg, where = plan.segment_ids(), plan.token_index % n
    errors = []
    for b in range(plan.num_images):
        rows = [(seg == b * k + j).nonzero()[:, 0] for j in range(k)]
        for j in range(k):
            context = rows[j]
            others = torch.cat([rows[i] for i in range(k) if i != j])
            seq = torch.cat([dec.embed(tokens[context]) + dec.pos_embed[where[context]],
                             dec.mask_token + dec.pos_embed[where[others]]])
            pred = dec(seq[None])[0, len(context):]
            errors.append((pred - pixels[b, where[others]]).square().mean(dim=-1))
    return torch.cat(errors).mean()


CASES = {
    "two halves": {},
    "keep 0.5, unequal": dict(keep=0.5, ratio_range=(0.2, 0.8)),
    "three subsets": dict(num_subsets=3, keep=0.75),
    "class token, in place": dict(class_token=True, layout="inplace", keep=0.6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_term_matches_the_written_out_reference(case):
    model = _model(**CASES[case])
    x = torch.randn(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(4), "cpu")
    embedded = model.embed(x, plan)
    term = embedded["recon_sse"].sum() / embedded["recon_count"].sum()
    want = _reference(model, x, plan)
    torch.testing.assert_close(term, want, rtol=1e-5, atol=1e-6)
    # every kept token is predicted once per subset it is not in
    assert embedded["recon_count"].sum() == (model.config.num_subsets - 1) * plan.total_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(term, params, allow_unused=True)
    ref = torch.autograd.grad(want, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), got, ref, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert all(g is not None for g in got[:2])  # the encoder learns from it
    out = model.batch_loss(embedded)
    torch.testing.assert_close(out["recon"], want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["contrastive"] + 0.5 * out["recon"])


@pytest.mark.parametrize("options", [{}, dict(num_subsets=3, keep=0.75)])
def test_recon_flops_match_the_flop_counter(options):
    model = _model(**options)
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)
    assert model.train_flops(plan) > _model(**{**options, "recon_weight": 0.0}).train_flops(plan)


def test_off_by_default_and_bad_settings_refused():
    assert SPCL(vit_tiny_patch16(img_size=32, patch_size=8, depth=1)).recon_decoder is None
    for bad, match in [(dict(recon_weight=-1.0), "recon_weight must be >= 0"),
                       (dict(recon_dim=6, recon_heads=4), "recon_heads must be a divisor of "
                                                          "recon_dim"),
                       (dict(recon_depth=0), "recon_depth must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            SPCLConfig(**bad).check()


def test_normalized_patches_are_maes_target():
    x = torch.rand(2, 1, 16, 16)
    t = normalized_patches(x, 8)
    raw = patchify(x, 8)
    want = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(t, want)
