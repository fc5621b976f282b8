"""S-PCL's directions of issue 17: anatomy-scale partitions (I-JEPA's target blocks), the
intra-image token contrast (ConMIM / Siamese Image Modeling) and OCL's shared mild crop.
Partition invariants with hypothesis, the intra-image loss and term against references written
out image by image (values and gradients), FLOPs against FlopCounterMode, and each option
trained through the CLI, reloaded and resumed exactly."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spcl_fast import flops, sample_partitions
from spcl_fast.methods import SPCL, SPCLConfig
from spcl_fast.methods.losses import intra_image_nce
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.reference import info_nce_ref
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train

# --- anatomy partitions -------------------------------------------------------------------


def _subsets(plan):
    """``(B, N)`` subset of each token (0: A, 1: B, -1: none), checking no token repeats."""
    seg = plan.segment_ids()
    image, k = seg // 2, seg % 2
    assert torch.equal(plan.token_index // plan.num_tokens, image)  # a segment is one image's
    out = torch.full((plan.num_images * plan.num_tokens,), -1, dtype=torch.long)
    assert plan.token_index.unique().numel() == plan.total_tokens  # in at most one subset
    out[plan.token_index] = k
    return out.view(plan.num_images, plan.num_tokens)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), grid=st.integers(2, 12), blocks=st.integers(1, 6),
       lo=st.floats(0.01, 0.6), width=st.floats(0.0, 0.3), keep=st.sampled_from([1.0, 0.5, 0.1]),
       shared=st.booleans(), seed=st.integers(0, 2**31 - 1), masked=st.booleans())
def test_anatomy_partitions_are_disjoint_nonempty_and_seeded(batch, grid, blocks, lo, width,
                                                             keep, shared, seed, masked):
    n = grid * grid
    scale = (lo, min(lo + width, 0.9))
    valid = None
    if masked:  # at least two valid tokens per image
        valid = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < 0.5
        valid[:, :2] = True

    def draw(s, keep=keep):
        return sample_partitions(batch, n, keep=keep, valid_mask=valid, shared=shared,
                                 partition="anatomy", target_blocks=blocks, target_scale=scale,
                                 generator=torch.Generator().manual_seed(s))

    plan = draw(seed)
    subset = _subsets(plan)
    assert (plan.seqlens > 0).all()  # both subsets of every image non-empty
    if valid is not None:
        assert not (subset[~valid] >= 0).any()  # only valid tokens
    again = draw(seed)
    assert torch.equal(plan.token_index, again.token_index)
    assert torch.equal(plan.cu_seqlens, again.cu_seqlens)
    # keep thins each subset of the keep=1 plan (same draws) to max(round(keep n), 1)
    full = _subsets(draw(seed, keep=1.0))
    assert ((subset == full) | (subset == -1)).all()
    for side in (0, 1):
        n_full = (full == side).sum(dim=1)
        want = torch.maximum(torch.round(n_full * keep).long(), n_full.clamp(max=1))
        assert torch.equal((subset == side).sum(dim=1), want)


def test_anatomy_partitions_differ_across_seeds():
    plans = [sample_partitions(4, 196, partition="anatomy",
                               generator=torch.Generator().manual_seed(s)) for s in range(5)]
    assert len({tuple(p.token_index.tolist()) for p in plans}) == 5


@pytest.mark.parametrize("scale", [(0.15, 0.2), (0.05, 0.1), (0.3, 0.3)])
def test_one_target_block_is_a_rectangle_of_the_drawn_area(scale):
    grid = 32
    n, (lo, hi) = grid * grid, scale
    # rounding each side by at most 1/2 moves the area by at most (h + w) / 2 + 1/4 cells
    slack = (math.sqrt(hi * n * 1.5) + math.sqrt(hi * n / 0.75)) / 2 + 0.25
    plan = sample_partitions(64, n, partition="anatomy", target_blocks=1, target_scale=scale,
                             generator=torch.Generator().manual_seed(0))
    for b_mask in (_subsets(plan) == 1).view(64, grid, grid):
        rows, cols = b_mask.any(dim=1).nonzero()[:, 0], b_mask.any(dim=0).nonzero()[:, 0]
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert b_mask.sum() == height * width  # fills its bounding box: one rectangle
        assert lo * n - slack <= height * width <= hi * n + slack
        assert 0.75 * width - 1 <= height <= 1.5 * width + 1  # aspect in [0.75, 1.5], rounded


def test_anatomy_blocks_union_and_shared_layout():
    g = torch.Generator().manual_seed(3)
    plan = sample_partitions(8, 256, partition="anatomy", target_blocks=4, generator=g)
    frac_b = plan.seqlens.view(8, 2)[:, 1].float() / 256
    assert (frac_b > 0.1).all() and (frac_b < 0.8).all()  # 4 blocks of 15-20%, overlapping
    shared = _subsets(sample_partitions(3, 64, partition="anatomy", shared=True,
                                        generator=torch.Generator().manual_seed(0)))
    assert (shared == shared[:1]).all()


def test_anatomy_with_one_valid_token_and_blocks_off_the_valid_region():
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0, 5] = True  # one valid token: it goes to subset A, B is empty (as "random" does)
    valid[1, [0, 15]] = True  # two corners: a side without a valid token still gets one
    plan = sample_partitions(2, 16, partition="anatomy", target_blocks=1,
                             target_scale=(0.05, 0.06), valid_mask=valid,
                             generator=torch.Generator().manual_seed(0))
    assert plan.seqlens.tolist() == [1, 0, 1, 1]
    assert plan.token_index[0] == 5


@pytest.mark.parametrize("kwargs,message", [
    (dict(ratio_range=(0.3, 0.7)), "leave ratio_range unset"),
    (dict(ratio=0.3), "leave ratio unset"),
    (dict(block_size=2), "leave block_size unset"),
    (dict(num_subsets=3), "leave num_subsets unset"),
    (dict(target_blocks=0), "target_blocks must be an int >= 1"),
    (dict(target_scale=(0.3, 0.2)), "target_scale must be"),
    (dict(target_scale=(0.5, 1.0)), "target_scale must be"),
    (dict(num_tokens=12), "square token grid"),
    (dict(partition="blocks"), "partition must be 'random' or 'anatomy'"),
])
def test_anatomy_argument_errors(kwargs, message):
    args = {"batch_size": 2, "num_tokens": 16, "partition": "anatomy", **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_partitions(**args)


# --- the intra-image loss -----------------------------------------------------------------


def _intra_loop(pred, target, temperature, valid):
    """Each valid query of each image against its image's valid targets, one logit at a time;
    the mean over every valid query of the batch."""
    terms = []
    for b in range(pred.shape[0]):
        keys = [j for j in range(pred.shape[1]) if valid[b, j]]
        for i in keys:
            def s(j, b=b, i=i):
                c = torch.dot(pred[b, i], target[b, j]) / (pred[b, i].norm() * target[b, j].norm())
                return c / temperature
            terms.append(torch.logsumexp(torch.stack([s(j) for j in keys]), 0) - s(i))
    return torch.stack(terms).mean() if terms else 0 * pred.sum() + 0 * target.sum()


def _grads(fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs)


# batch 1 with one query; one feature; unequal numbers of valid queries (unequal subsets
# clamped below q); an image with none
VALID = [
    [[True]],
    [[True, True, True]],
    [[True, False, True, True, False], [False, True, False, False, False]],
    [[True] * 7, [True] * 3 + [False] * 4, [False] * 7],
]


@pytest.mark.parametrize("valid", VALID, ids=["b1q1", "b1q3", "uneven", "empty-image"])
@pytest.mark.parametrize("dim,temperature", [(1, 0.5), (6, 0.1)])
def test_intra_image_nce_matches_the_written_out_loss(valid, dim, temperature):
    valid = torch.tensor(valid)
    g = torch.Generator().manual_seed(valid.numel())
    pred, target = (torch.randn(*valid.shape, dim, generator=g, dtype=torch.float64)
                    for _ in range(2))
    got, got_grads = _grads(lambda p, t: intra_image_nce(p, t, temperature, valid), pred, target)
    want, want_grads = _grads(lambda p, t: _intra_loop(p, t, temperature, valid), pred, target)
    torch.testing.assert_close(got, want)
    for x, y in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(x, y)
        assert torch.isfinite(x).all()


def test_intra_image_nce_negatives_are_only_from_the_same_image_and_shapes_are_named():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    moved = target.clone()
    moved[1:] = torch.randn(2, 4, 8, generator=g)  # other images' targets change
    one = intra_image_nce(pred[:1], target[:1])
    assert torch.allclose(3 * intra_image_nce(pred, moved) - 2 * intra_image_nce(pred[1:],
                                                                                 moved[1:]), one)
    assert intra_image_nce(pred, target, valid=torch.zeros(3, 4, dtype=torch.bool)) == 0
    with pytest.raises(ValueError, match="intra_image_nce: pred and target must be"):
        intra_image_nce(pred, target[:, :3])
    with pytest.raises(ValueError, match="intra_image_nce: valid must be"):
        intra_image_nce(pred, target, valid=torch.ones(3, 3, dtype=torch.bool))


# --- the intra-image term in S-PCL ----------------------------------------------------------


def _model(class_token=False, pos_embed="learned", in_chans=1, **kwargs):
    torch.manual_seed(0)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                               class_token=class_token, pos_embed=pos_embed, in_chans=in_chans)
    return SPCL(encoder, SPCLConfig(proj_hidden=32, proj_dim=16, **kwargs))


def _intra_reference(model, x, plan, seed):
    """The intra-image term image by image, without padding: the same draws (one priority row
    per image and direction, drawn image by image as the model draws them), each image's
    predictor on its own; with ``intra_negatives="batch"`` one cross-entropy over every
    image's drawn tokens; with ``intra_target="pixels"`` the targets are each drawn patch's
    pixels, written out with ``torch.std`` over the image and explicit slicing."""
    _, tokens = model.encoder.forward_partitioned_tokens(x, plan)
    g = torch.Generator().manual_seed(seed)
    rows = tokens.split(plan.seqlens.tolist())
    positions = (plan.token_index % plan.num_tokens).split(plan.seqlens.tolist())
    q = min(model.config.intra_queries, plan.max_seqlen)
    p = model.token_predictor
    losses = []
    priority = torch.rand(plan.num_images, 2, plan.num_tokens, generator=g)
    for ctx, tgt in ((0, 1), (1, 0)):
        terms, preds, targets = [], [], []
        for b in range(plan.num_images):
            context, target = rows[2 * b + ctx], rows[2 * b + tgt]
            n_q = min(q, target.shape[0])
            pick = priority[b, tgt, : target.shape[0]].argsort(stable=True)[:n_q]
            pos = model.encoder.pos_embed[0][positions[2 * b + tgt][pick]]
            pred = p(pos[None], p.kv(context)[None], torch.ones(1, context.shape[0],
                                                                 dtype=torch.bool))[0]
            if model.config.intra_target == "pixels":
                pred = model.pixel_head(pred)
                image = (x[b] - x[b].mean()) / (x[b].std() + 1e-6)
                embed = model.encoder.patch_embed
                patch, grid = embed.patch_size, embed.grid_size
                target = torch.stack([
                    image[:, (i // grid) * patch:(i // grid + 1) * patch,
                          (i % grid) * patch:(i % grid + 1) * patch].permute(1, 2, 0).reshape(-1)
                    for i in positions[2 * b + tgt][pick].tolist()])
            else:
                target = target[pick]
            preds.append(pred)
            targets.append(target)
        if model.config.intra_negatives == "batch":
            preds, targets = [torch.cat(preds)], [torch.cat(targets)]
        for pred, target in zip(preds, targets, strict=True):
            logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T
            logits = logits / model.config.intra_temperature
            terms.append(F.cross_entropy(logits, torch.arange(len(pred)), reduction="sum"))
        count = sum(min(q, rows[2 * b + tgt].shape[0]) for b in range(plan.num_images))
        losses.append(torch.stack(terms).sum() / count)
    return 0.5 * (losses[0] + losses[1])


@pytest.mark.parametrize("options", [
    dict(intra_queries=3),  # fewer queries than subset tokens
    dict(intra_queries=16),  # more: every token of each subset, clamped
    dict(intra_queries=5, ratio_range=(0.2, 0.8), class_token=True),  # unequal subset sizes
    dict(intra_queries=4, partition="anatomy", keep=0.5),
    dict(intra_queries=3, intra_negatives="batch"),
    dict(intra_queries=5, ratio_range=(0.2, 0.8), intra_negatives="batch"),  # padded queries
    dict(intra_queries=3, intra_target="pixels"),
    dict(intra_queries=5, ratio_range=(0.2, 0.8), intra_target="pixels", class_token=True),
    dict(intra_queries=4, intra_target="pixels", intra_negatives="batch", keep=0.5),
    dict(intra_queries=3, intra_target="pixels", in_chans=3),  # pixel order within a patch
])
def test_intra_term_matches_the_image_by_image_reference(options):
    model = _model(intra_weight=0.3, **options)
    x = torch.rand(3, options.get("in_chans", 1), 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(1), "cpu")
    out = model(x, generator=torch.Generator().manual_seed(5), plan=plan)
    want = _intra_reference(model, x, plan, seed=5)
    torch.testing.assert_close(out["intra"], want.detach())
    torch.testing.assert_close(out["loss"], out["contrastive"] + 0.3 * want.detach())
    # the whole loss's gradients: predictor, queried positions, context and targets alike
    params = [model.token_predictor.mask_token, model.token_predictor.kv.weight,
              model.token_predictor.mlp.fc2.weight, model.encoder.pos_embed,
              model.encoder.blocks[0].attn.qkv.weight]
    if model.pixel_head is not None:
        params.append(model.pixel_head.weight)
    z = model.projector(model.encoder.forward_partitioned(x, plan)).view(3, 2, -1)
    ref = info_nce_ref(z[:, 0], z[:, 1], 0.1) + 0.3 * _intra_reference(model, x, plan, seed=5)
    got = torch.autograd.grad(out["loss"], params)
    for a, b in zip(got, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b)


def test_partitioned_tokens_pool_to_the_pooled_rows_in_both_layouts():
    model = _model()
    x = torch.rand(2, 1, 32, 32)
    plan = sample_partitions(2, 16, ratio=0.3, generator=torch.Generator().manual_seed(0))
    pooled, tokens = model.encoder.forward_partitioned_tokens(x, plan)
    assert tokens.shape == (plan.total_tokens, 32)
    torch.testing.assert_close(pooled, model.encoder.forward_partitioned(x, plan))
    from spcl_fast.nn.vit import segment_mean

    torch.testing.assert_close(segment_mean(tokens, plan), pooled)
    _, inplace = model.encoder.forward_partitioned_tokens(x, plan, "inplace")
    torch.testing.assert_close(inplace, tokens, atol=1e-5, rtol=1e-5)
    cls_model = _model(class_token=True)
    _, cls_tokens = cls_model.encoder.forward_partitioned_tokens(x, plan)
    assert cls_tokens.shape == (plan.total_tokens, 32)  # class-token rows left out


@pytest.mark.parametrize("options", [dict(intra_queries=16), dict(intra_queries=3),
                                     dict(intra_queries=2, class_token=True),
                                     dict(intra_queries=3, intra_negatives="batch"),
                                     dict(intra_queries=3, intra_target="pixels")])
def test_intra_flops_match_the_flop_counter(options):
    model = _model(intra_weight=1.0, **options)
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")  # equal halves: no pad
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)
    assert model.train_flops(plan) > _model().train_flops(plan)


def test_direction_errors():
    """One validation (SPCLConfig.check): the model and the training config refuse alike."""
    with pytest.raises(ValueError, match="position embeddings"):  # the encoder's: model only
        _model(intra_weight=1.0, pos_embed="none")
    for changes, message in [
        (dict(intra_weight=1.0, num_subsets=3), "num_subsets must be 2 with"),
        (dict(intra_queries=0), "intra_queries must be >= 1"),
        (dict(intra_negatives="all"), "intra_negatives must be one of image, batch, got 'all'"),
        (dict(intra_target="patches"), "intra_target must be one of tokens, pixels"),
        (dict(intra_weight=-1.0), "intra_weight must be >= 0"),
        (dict(partition="blocks"), "partition must be one of random, anatomy"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale must be"),
        (dict(partition="anatomy", ratio_range=(0.3, 0.7)), "ratio_range must be None with"),
        (dict(partition="anatomy", ratio=0.3), "ratio must be 0.5"),
        (dict(partition="anatomy", block_size=2), "block_size must be 1 with"),
        (dict(partition="anatomy", num_subsets=3), "num_subsets must be 2 with"),
        (dict(target_scale=(0.2, 0.1)), "target_scale must be"),
        (dict(target_blocks=0), "target_blocks must be"),
        (dict(intra_temperature=0.0), "intra_temperature must be"),
        (dict(intra_weight=float("nan")), "intra_weight must be"),
        (dict(crop_scale=(0.6, 0.5)), "crop_scale must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            _model(**changes)
        with pytest.raises(ValueError, match=message):
            smoke().replace(**changes).check()


# --- the shared crop ------------------------------------------------------------------------


def test_crop_off_draws_nothing_and_changes_nothing():
    model = _model()
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    direct = sample_partitions(3, 16, generator=torch.Generator().manual_seed(0))
    assert plan.crop is None and torch.equal(plan.token_index, direct.token_index)
    x = torch.rand(3, 1, 32, 32)
    assert model.crop_images(x, None) is x


def test_crop_is_seeded_keeps_the_shape_and_is_shared_by_both_subsets():
    model = _model(crop_scale=(0.5, 1.0))
    x = torch.rand(4, 1, 32, 32)
    plans = [model.sample_plan(4, torch.Generator().manual_seed(s), "cpu") for s in (0, 0, 1)]
    assert plans[0].crop.shape == (4, 2, 3)
    assert torch.equal(plans[0].crop, plans[1].crop)
    assert torch.equal(plans[0].token_index, plans[1].token_index)
    assert not torch.equal(plans[0].crop, plans[2].crop)
    crops = model.crop_images(x, plans[0].crop)
    assert crops.shape == x.shape and not torch.equal(crops, x)
    half = plans[0].crop[:, [0, 1], [0, 1]]  # half side lengths: area in [lo, hi], no flip
    assert (half > 0).all() and (half.prod(dim=1) <= 1.0 + 1e-6).all()
    assert (half.prod(dim=1) >= 0.5 * 3 / 4 - 1e-6).all()  # clipped to the image: > 3/4 lo
    # the model's loss is the loss on the cropped images with the crop-free plan
    free = dataclasses.replace(plans[0], crop=None)
    torch.testing.assert_close(model(x, plan=plans[0])["loss"], model(crops, plan=free)["loss"])
    # plans of several streams join their crops; to() moves them
    joined = type(plans[0]).concat([plans[0], plans[2]])
    assert torch.equal(joined.crop, torch.cat([plans[0].crop, plans[2].crop]))
    assert joined.to("cpu").crop.shape == (8, 2, 3)
    with pytest.raises(ValueError, match="with and without crops"):
        type(plans[0]).concat([plans[0], free])


def test_identity_crop_is_the_image():
    x = torch.rand(2, 1, 32, 32)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(SPCL.crop_images(x, eye), x)


# --- each option trained, checkpointed, reloaded and resumed ----------------------------------

OPTIONS = {
    "anatomy": ["--partition", "anatomy", "--target-blocks", "2", "--target-scale", "0.1,0.2",
                "--keep", "0.75"],
    "intra": ["--intra-weight", "0.5", "--intra-queries", "4", "--intra-temperature", "0.2"],
    "intra_pixels": ["--intra-weight", "0.5", "--intra-queries", "4", "--intra-target", "pixels"],
    "crop": ["--crop-scale", "0.5,1.0", "--background-std", "0.05"],
}


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains_through_the_cli_reloads_and_resumes_exactly(tmp_path, name):
    from spcl_fast.eval import load_encoder
    from spcl_fast.run.model import build_model
    from spcl_fast.train.__main__ import main

    run = tmp_path / "run"
    main(["--preset", "smoke", "--steps", "4", "--save-every", "2", "--out", str(run),
          "--probe", "no", *OPTIONS[name]])
    steps = _records(run)
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    config = json.loads((run / "config.json").read_text())["spcl"]
    assert _saved_as_flagged(config, name)
    assert load_encoder(run).encoder(torch.rand(2, 1, 32, 32)).shape == (2, 64)
    # resuming from the step-2 checkpoint replays steps 3 and 4 bit for bit
    from spcl_fast.run import TrainConfig

    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    train(cfg, tmp_path / "resumed", resume=run / "ckpt-00000002.pt")
    assert [r["loss"] for r in _records(tmp_path / "resumed")] == [r["loss"] for r in steps[2:]]
    if name.startswith("intra"):
        assert "intra" in steps[-1] and "contrastive" in steps[-1]
        ckpt = torch.load(run / "ckpt-00000004.pt", weights_only=False)
        assert any(k.startswith("token_predictor.") for k in ckpt["model"])
        assert any(k.startswith("pixel_head.") for k in ckpt["model"]) == (name == "intra_pixels")
        trained = [p for p in build_model(cfg).parameters() if p.requires_grad]
        in_optimizer = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
        assert in_optimizer == len(trained) == len(ckpt["optimizer"]["state"])


def _saved_as_flagged(section: dict, name: str) -> bool:
    """The run's saved ``spcl`` section holds the option as the flags set it."""
    return {"anatomy": section["partition"] == "anatomy" and section["target_blocks"] == 2
            and section["target_scale"] == [0.1, 0.2],
            "intra": section["intra_weight"] == 0.5 and section["intra_queries"] == 4,
            "intra_pixels": section["intra_weight"] == 0.5 and section["intra_target"] == "pixels",
            "crop": section["crop_scale"] == [0.5, 1.0]}[name]
