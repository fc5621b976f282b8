"""S-PCL's recipe flags: OCL's bounded similarity, no projector, VICReg terms, against loss
references written out element by element (values and gradients), and each trained through
the CLI and reloaded."""

import json
import math

import pytest
import torch

from spcl_fast.methods import SPCL, BuildContext, SPCLConfig
from spcl_fast.methods.losses import bounded_info_nce, vicreg_covariance, vicreg_variance
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.reference import info_nce_ref
from spcl_fast.run.presets import smoke

SHAPES = [(1, 3), (2, 1), (5, 7), (17, 33)]  # one pair, one feature, odd sizes


def _bounded_loop(z_a, z_b, temperature, kappa, symmetric):
    """OCL's loss, one logit at a time: cosine c, s = 0.5 (1 + c) / (1 + kappa (1 - c)) / tau,
    cross-entropy of each row (and, symmetric, each column) against its own pair."""
    m = z_a.shape[0]

    def s(i, j):
        c = torch.dot(z_a[i], z_b[j]) / (z_a[i].norm() * z_b[j].norm())
        return 0.5 * (1 + c) / (1 + kappa * (1 - c)) / temperature

    rows = [torch.logsumexp(torch.stack([s(i, j) for j in range(m)]), 0) - s(i, i)
            for i in range(m)]
    loss = torch.stack(rows).mean()
    if symmetric:
        cols = [torch.logsumexp(torch.stack([s(i, j) for i in range(m)]), 0) - s(j, j)
                for j in range(m)]
        loss = 0.5 * (loss + torch.stack(cols).mean())
    return loss


def _variance_loop(z, eps):
    m, d = z.shape
    terms = []
    for j in range(d):
        mean = sum(z[i, j] for i in range(m)) / m
        var = sum((z[i, j] - mean) ** 2 for i in range(m)) / (m - 1)
        terms.append(torch.clamp(1 - torch.sqrt(var + eps), min=0))
    return sum(terms) / d


def _covariance_loop(z):
    m, d = z.shape
    means = [sum(z[i, j] for i in range(m)) / m for j in range(d)]
    total = 0 * z.sum()  # in the graph even with no off-diagonal entry (d = 1)
    for j in range(d):
        for k in range(d):
            if j != k:
                cov = sum((z[i, j] - means[j]) * (z[i, k] - means[k]) for i in range(m)) / (m - 1)
                total = total + cov**2
    return total / d


def _grads(fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,kappa,symmetric",
                         [(0.07, 1 / 64, True), (0.5, 0.0, False), (0.1, 2.0, True)])
def test_bounded_info_nce_matches_the_written_out_loss(shape, temperature, kappa, symmetric):
    g = torch.Generator().manual_seed(shape[0])
    z_a, z_b = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    got, got_grads = _grads(lambda a, b: bounded_info_nce(a, b, temperature, kappa, symmetric),
                            z_a, z_b)
    want, want_grads = _grads(lambda a, b: _bounded_loop(a, b, temperature, kappa, symmetric),
                              z_a, z_b)
    torch.testing.assert_close(got, want)
    for x, y in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(x, y)


def test_bounded_similarity_is_bounded_and_its_kappa_zero_is_affine_cosine_info_nce():
    # logits in [0, 1/tau] (antiparallel rows give 0, identical ones 1/tau)
    z = torch.randn(6, 4, dtype=torch.float64)
    z_b = torch.cat([z[:3], -z[3:]])
    cos = torch.nn.functional.cosine_similarity(z[:, None], z_b[None], dim=-1)
    from spcl_fast.methods.losses import bounded_similarity

    s = bounded_similarity(cos, 0.07, 1 / 64)
    assert s.min() >= 0 and s.max() <= 1 / 0.07 + 1e-9
    # kappa 0: logits (1 + c) / (2 tau), a constant shift of c / (2 tau), which cross-entropy
    # ignores: the cosine InfoNCE at temperature 2 tau
    torch.testing.assert_close(bounded_info_nce(z, z_b, 0.1, 0.0), info_nce_ref(z, z_b, 0.2))


def test_bounded_info_nce_names_bad_shapes():
    with pytest.raises(ValueError, match="bounded_info_nce: z_a and z_b must be"):
        bounded_info_nce(torch.randn(3, 4), torch.randn(2, 4))


@pytest.mark.parametrize("shape", [(2, 1), (3, 5), (9, 4), (16, 17)])
def test_vicreg_terms_match_the_written_out_formulas(shape):
    g = torch.Generator().manual_seed(shape[1])
    z = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7  # some stds below 1
    for got_fn, want_fn in [(lambda x: vicreg_variance(x, 1e-4), lambda x: _variance_loop(x, 1e-4)),
                            (vicreg_covariance, _covariance_loop)]:
        got, got_grad = _grads(got_fn, z)
        want, want_grad = _grads(want_fn, z)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad[0], want_grad[0])


def test_vicreg_terms_vanish_where_they_should_and_name_one_row():
    z = torch.randn(64, 3, dtype=torch.float64) * 10  # stds far above 1: no variance penalty
    assert vicreg_variance(z) == 0
    signs = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert vicreg_covariance(signs) == 0  # uncorrelated features
    assert vicreg_covariance(torch.cat([signs, signs[:1]])) > 0  # one row more: correlated
    for fn in (vicreg_variance, vicreg_covariance):
        with pytest.raises(ValueError, match="M >= 2 rows"):
            fn(torch.randn(1, 4))


def _model(**kwargs):
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               class_token=kwargs.pop("class_token", False))
    return SPCL(encoder, SPCLConfig(proj_hidden=32, proj_dim=16, **kwargs))


def _subset_embeddings(model, x, plan):
    return model.projector(model.encoder.forward_partitioned(x, plan)).view(x.shape[0], 2, -1)


def test_spcl_loss_is_the_bounded_loss_plus_weighted_vicreg_terms():
    model = _model(similarity="bounded", temperature=0.07, vicreg_var=0.5, vicreg_cov=0.25)
    x = torch.rand(5, 1, 32, 32)
    plan = model.sample_plan(5, torch.Generator().manual_seed(0), "cpu")
    out = model(x, plan=plan)
    z = _subset_embeddings(model, x, plan)
    nce = _bounded_loop(z[:, 0], z[:, 1], 0.07, 1 / 64, True)
    var = 0.5 * (_variance_loop(z[:, 0], 1e-4) + _variance_loop(z[:, 1], 1e-4))
    cov = 0.5 * (_covariance_loop(z[:, 0]) + _covariance_loop(z[:, 1]))
    torch.testing.assert_close(out["loss"], nce + 0.5 * var + 0.25 * cov)
    torch.testing.assert_close(out["contrastive"], nce.detach())
    torch.testing.assert_close(out["vicreg_var"], var.detach())
    torch.testing.assert_close(out["vicreg_cov"], cov.detach())
    # the gradient of the whole loss reaches the encoder through every term
    (want,) = torch.autograd.grad(nce + 0.5 * var + 0.25 * cov, model.encoder.pos_embed)
    (got,) = torch.autograd.grad(out["loss"], model.encoder.pos_embed)
    torch.testing.assert_close(got, want)


def test_no_projector_puts_the_final_normed_class_token_into_the_loss():
    model = _model(projector="none", class_token=True, temperature=0.2)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.projector.modules())
    x = torch.rand(4, 1, 32, 32)
    plan = model.sample_plan(4, torch.Generator().manual_seed(1), "cpu")
    pooled = model.encoder.forward_partitioned(x, plan).view(4, 2, -1)  # (B, 2, D=32)
    torch.testing.assert_close(model(x, plan=plan)["loss"],
                               info_nce_ref(pooled[:, 0], pooled[:, 1], 0.2))
    assert model.train_flops(plan) > 0
    with_predictor = _model(projector="none", predictor_hidden=8)
    assert with_predictor.predictor.net[-1].out_features == 32  # predicts the encoder width


def test_recipe_flag_errors():
    """One validation (SPCLConfig.check): the model and the training config refuse alike."""
    for changes, message in [
        (dict(similarity="dot"), "similarity must be one of cosine, bounded"),
        (dict(projector="linear"), "projector must be one of mlp, none"),
        (dict(similarity="bounded", negatives="all"), "negatives must be 'cross' with"),
        (dict(vicreg_var=-1.0), "vicreg_var must be >= 0"),
        (dict(kappa=-0.5), "kappa must be"),
        (dict(vicreg_cov=float("nan")), "vicreg_cov must be"),
        (dict(num_subsets=3, ratio=0.3), "ratio must be 0.5 .* num_subsets > 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            _model(**changes)
        with pytest.raises(ValueError, match=message):
            smoke().replace(**changes).check()
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match="one process's batch"):  # the run's context: model only
        SPCL(encoder, SPCLConfig(similarity="bounded"), BuildContext(gather_distributed=True))


@pytest.mark.parametrize("args", [
    ["--similarity", "bounded", "--kappa", "0.02", "--projector", "none", "--class-token", "yes",
     "--keep", "0.5", "--temperature", "0.07"],
    ["--vicreg-var", "1", "--vicreg-cov", "0.04"],
])
def test_recipe_flags_train_through_the_cli_and_reload(tmp_path, args):
    from spcl_fast.eval import load_encoder
    from spcl_fast.train.__main__ import main

    main(["--preset", "smoke", "--steps", "2", "--out", str(tmp_path / "run"), "--probe", "no",
          *args])
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert steps and all(math.isfinite(m["loss"]) for m in steps)
    if "--vicreg-var" in args:
        assert {"contrastive", "vicreg_var", "vicreg_cov"} <= set(steps[-1])
    loaded = load_encoder(tmp_path / "run")
    assert loaded.encoder(torch.rand(2, 1, 32, 32)).shape == (2, 64)
