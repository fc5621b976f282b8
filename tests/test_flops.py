"""Training-FLOP counts: analytic formulas against FlopCounterMode, ViT-B/16 against the DeiT
and timm tables, the method table with the default recipe's row and
``python -m spcl_fast.run.flops_table``."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spcl_fast import flops
from spcl_fast.methods import build_method, train_flops
from spcl_fast.nn import vit_base_patch16, vit_tiny_patch16
from spcl_fast.run import flops_table as run_flops
from spcl_fast.run.presets import PRESETS

TINY = {
    "spcl": dict(proj_hidden=32, proj_dim=16, ratio_range=(0.3, 0.7), keep=0.75),
    "mae": dict(decoder_dim=32, decoder_depth=2, decoder_heads=2),
    "dino": dict(num_local=3, local_size=16, out_dim=64, hidden_dim=32, bottleneck_dim=16),
}


@pytest.mark.parametrize("method", sorted(TINY))
def test_flop_counter_matches_analytic_training_step(method):
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = build_method(method, encoder, **TINY[method])
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)


@pytest.mark.parametrize("options", [
    dict(class_token=True),
    dict(num_subsets=3, predictor_hidden=24),
    dict(class_token=True, num_subsets=4, predictor_hidden=8, negatives="all"),
])
def test_flop_counter_matches_the_spcl_study_options(options):
    class_token = options.pop("class_token", False)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               class_token=class_token)
    model = build_method("spcl", encoder, proj_hidden=32, proj_dim=16, keep=0.75, **options)
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)


def test_cpu_attention_counts_like_the_cuda_kernels():
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    fwd = flops.measure_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    step = flops.measure_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert fwd == flops.attention_flops([10, 10], 3, 8)
    assert step == fwd + flops.attention_bwd_flops([10, 10], 3, 8)


def test_vit_b16_forward_is_17_6_gmacs():
    # DeiT/timm's ViT-B/16 (3 channels, class token: 197 tokens, 1000-class head): 17.6 GMACs.
    deit = flops.vit_forward_flops(num_images=1, num_patches=196, seqlens=[197], embed_dim=768,
                                   depth=12, num_heads=12, mlp_hidden=3072, patch_size=16,
                                   in_chans=3)
    gmacs = (sum(deit.values()) + flops.linear_flops(1, 768, 1000)) / 2e9
    assert round(gmacs, 1) == 17.6
    # Ours (1 channel, no class token, no head), counted on the meta device: 17.39 GMACs.
    with torch.device("meta"):
        model, x = vit_base_patch16(), torch.empty(1, 1, 224, 224)
    counted = flops.measure_flops(lambda: model(x))
    ours = flops.vit_forward_flops(num_images=1, num_patches=196, seqlens=[196], embed_dim=768,
                                   depth=12, num_heads=12, mlp_hidden=3072, patch_size=16)
    assert counted == sum(ours.values())
    assert round(counted / 2e9, 2) == 17.39


def test_table_matches_reference_numbers_and_variants():
    gf = {(r["variant"]): r["gflops"] for r in train_flops.flops_table(["vit_base_patch16"])}
    spcl, mae = gf["50/50 split"], gf["75% masked, decoder 8x512"]
    dino = gf["2 global + 10 local crops"]
    # The reference counts (ViT-B/16, 224): ~101, ~56, ~460 GFLOPs/image.
    assert spcl == pytest.approx(101, rel=0.02)
    assert mae == pytest.approx(56, rel=0.03)
    assert dino == pytest.approx(460, rel=0.02)
    assert gf["2x2 block partitions"] == spcl  # which tokens, not how many
    assert spcl < gf["ratio in [0.3, 0.7]"] < 1.01 * spcl  # unequal halves: more attention only
    assert gf["keep 0.5 (two 25% subsets)"] == pytest.approx(spcl / 2, rel=0.02)


def test_the_default_recipe_row_is_what_the_presets_train():
    method, label, settings = run_flops.recipe_variant()
    for name in [n for n in PRESETS if n == "demo" or n.startswith("vit_")]:
        config = PRESETS[name]()
        section = dataclasses.asdict(config.method_section)
        assert (config.method, section) == (method, settings), name
    assert settings["keep"] == 0.5 and settings["intra_weight"] > 0  # what the row is for
    assert label == "default: keep 0.5, intra-image term"


def test_flop_counter_matches_the_default_recipe():
    """The formula the recipe's row is computed by, against FlopCounterMode on a training step
    with every setting of the presets' recipe (intra-image predictor included)."""
    _, _, settings = run_flops.recipe_variant()
    encoder = vit_tiny_patch16(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = build_method("spcl", encoder, **settings)
    x = torch.rand(3, 1, 32, 32)
    plan = model.sample_plan(3, torch.Generator().manual_seed(0), "cpu")
    counted = flops.measure_flops(lambda: model(x, plan=plan)["loss"].backward())
    assert counted == pytest.approx(model.train_flops(plan), rel=0.01)


def test_table_has_the_default_recipe_row_at_vit_s_b_l():
    variants, recipe = run_flops.table_variants(), run_flops.recipe_variant()
    plain = [v for v in train_flops.VARIANTS if v[0] == "spcl"]
    assert variants[:len(plain) + 1] == (*plain, recipe)  # after the plain S-PCL rows
    keep = next(v for v in plain if v[1] == "keep 0.5 (two 25% subsets)")
    records = train_flops.flops_table(train_flops.TABLE_MODELS, 224, [variants[0], keep, recipe])
    for model in train_flops.TABLE_MODELS:
        row = {r["variant"]: r for r in records if r["model_name"] == model}
        want = train_flops.method_train_flops("spcl", model, 224, **recipe[2]) / 1e9
        assert row[recipe[1]]["gflops"] == round(want, 3)
        # the same tokens as keep 0.5, plus the intra-image predictor's few percent
        kept = row[keep[1]]["gflops"]
        assert kept < row[recipe[1]]["gflops"] < 1.1 * kept, model
        assert 0.5 <= row[recipe[1]]["vs_spcl"] < 0.55


def test_cli_json_parses():
    proc = subprocess.run([sys.executable, "-m", "spcl_fast.run.flops_table", "--json",
                           "--models", "vit_small_patch16", "vit_base_patch16"],
                          capture_output=True, text=True, timeout=300, check=True)
    records = json.loads(proc.stdout)
    assert "Warning" not in proc.stderr, proc.stderr
    assert len(records) == 2 * len(run_flops.table_variants())
    for r in records:
        assert {"method", "model", "image_size", "gflops", "gmacs"} <= set(r)
        assert r["gmacs"] == pytest.approx(r["gflops"] / 2, abs=1e-3)
    assert {r["model"] for r in records} == {"ViT-S/16", "ViT-B/16"}
    assert sum(r["variant"] == run_flops.recipe_variant()[1] for r in records) == 2


@pytest.mark.parametrize("size", ["225", "0", "-16"])
def test_cli_rejects_sizes_off_the_patch_grid(size):
    with pytest.raises(SystemExit, match=f"^error: --image-size must be a positive multiple of "
                                         f"the patch size 16, got {size} "):
        run_flops.main(["--image-size", size])


def test_cli_names_the_renamed_flag_and_the_moved_command():
    with pytest.raises(SystemExit, match=r"^error: --img-size is now --image-size \(as in "
                                         r"train\): use --image-size 224 "):
        run_flops.main(["--img-size", "224"])
    proc = subprocess.run([sys.executable, "-m", "spcl_fast.methods.flops_table"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: the FLOP table's command moved: "
                                   "python -m spcl_fast.run.flops_table")
