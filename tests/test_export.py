"""Export to timm's VisionTransformer layout and back, without timm installed.

timm cannot be installed beside the CPU torch wheel here (it needs torchvision), so the layout is
checked against a key/shape map and a forward pass written down from timm's
``timm/models/vision_transformer.py`` (VisionTransformer.__init__, _pos_embed, forward_features,
forward_head, global_pool_nlc; Block; Attention; Mlp). The ``real_timm`` tests load the export
into a real timm model; they run in the timm tier (tests/test_timm_tier.py).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import write_run

from spcl_fast.eval import EncoderLoadError, load_encoder
from spcl_fast.export import export_encoder, main
from spcl_fast.nn import sincos_pos_embed

safetensors_torch = pytest.importorskip("safetensors.torch")


def timm_vit_shapes(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                    depth=12, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                    fc_norm=None, reg_tokens=0, no_embed_class=False) -> dict:
    """State-dict names and shapes of timm's ``VisionTransformer(...)`` (plain blocks, no layer
    scale, no q/k norm, no pre-norm), as its constructor lays them out."""
    use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
    n = (img_size // patch_size) ** 2
    prefix = int(class_token) + reg_tokens
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    shapes = {"patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
              "patch_embed.proj.bias": (d,)}
    if class_token:
        shapes["cls_token"] = (1, 1, d)
    if reg_tokens:
        shapes["reg_token"] = (1, reg_tokens, d)
    shapes["pos_embed"] = (1, n if no_embed_class else n + prefix, d)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                       b + "attn.qkv.weight": (3 * d, d), b + "attn.proj.weight": (d, d),
                       b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                       b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
        if qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
    shapes["norm.weight" if not use_fc_norm else "fc_norm.weight"] = (d,)
    shapes["norm.bias" if not use_fc_norm else "fc_norm.bias"] = (d,)
    if num_classes > 0:
        shapes.update({"head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return shapes


def timm_vit_forward(sd: dict, x: torch.Tensor, num_heads: int, class_token: bool,
                     global_pool: str = "avg", fc_norm: bool = False,
                     no_embed_class: bool = False) -> torch.Tensor:
    """timm's VisionTransformer forward (pre_logits, no head) on a state dict: conv patchify,
    class token concatenated then ``pos_embed`` added (or, ``no_embed_class``, ``pos_embed``
    added to the patches only, then the class token concatenated), pre-norm blocks (LayerNorm
    eps 1e-6, qkv rows q|k|v with heads contiguous, softmax(q k^T / sqrt(Dh)), exact GELU),
    final norm per token (or after pooling when ``fc_norm``), pooling that skips prefix
    tokens."""
    w = sd["patch_embed.proj.weight"]
    p, d = w.shape[-1], w.shape[0]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if no_embed_class:
        t = t + sd["pos_embed"]
    if class_token:
        t = torch.cat([sd["cls_token"].expand(t.shape[0], -1, -1), t], 1)
    if not no_embed_class:
        t = t + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def ln(h, name):
        return F.layer_norm(h, (d,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(depth):
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        bsz, n, _ = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd.get(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(bsz, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(d // num_heads)).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(bsz, n, d), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        t = t + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    if not fc_norm:
        t = ln(t, "norm")
    pooled = t[:, 0] if global_pool == "token" else t[:, int(class_token):].mean(1)
    return ln(pooled, "fc_norm") if fc_norm else pooled


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run") / "run", pos_embed="learned")


def test_export_matches_timm_layout_and_forward(run, tmp_path):
    path, config, model = run
    cfg = export_encoder(path, tmp_path / "export")
    kwargs = cfg["timm_kwargs"]
    assert kwargs == {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 0,
                      "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
                      "qkv_bias": True, "class_token": False, "global_pool": "avg",
                      "fc_norm": False}
    sd = safetensors_torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    expected = timm_vit_shapes(**{k: v for k, v in kwargs.items() if k != "num_heads"})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    x = torch.rand(3, 1, 32, 32)
    ours = model.encoder.eval()(x)
    torch.testing.assert_close(timm_vit_forward(sd, x, 2, class_token=False), ours,
                               rtol=1e-5, atol=1e-5)
    assert cfg["normalize"] == "image" and cfg["spcl_config"]["model"]["embed_dim"] == 32
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["timm_model"] == "vit_tiny_patch16_224"


def test_class_token_encoder_exports_as_timm_token_pooling(tmp_path):
    path, _, model = write_run(tmp_path / "cls", class_token=True)
    cfg = export_encoder(path, tmp_path / "export")
    kwargs = cfg["timm_kwargs"]
    assert (kwargs["class_token"], kwargs["no_embed_class"], kwargs["global_pool"]) == (
        True, True, "token")
    sd = safetensors_torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    expected = timm_vit_shapes(**{k: v for k, v in kwargs.items() if k != "num_heads"})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert expected["cls_token"] == (1, 1, 32) and expected["pos_embed"] == (1, 16, 32)
    x = torch.rand(3, 1, 32, 32)
    ours = model.encoder.eval()(x)
    torch.testing.assert_close(
        timm_vit_forward(sd, x, 2, class_token=True, global_pool="token", no_embed_class=True),
        ours, rtol=1e-5, atol=1e-5)
    back = load_encoder(tmp_path / "export")
    assert back.encoder.num_prefix_tokens == 1 and not back.notes  # nothing dropped
    assert torch.equal(back.encoder.eval()(x), ours)
    cfg_file = tmp_path / "export" / "config.json"
    broken = json.loads(cfg_file.read_text())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(broken))
    safetensors_torch.save_file({k: v for k, v in sd.items() if k != "cls_token"},
                                str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(EncoderLoadError, match="no cls_token"):
        load_encoder(tmp_path / "broken")


@pytest.mark.parametrize("kind", ["sincos", "none"])
def test_fixed_position_embeddings_stay_fixed_through_an_export(tmp_path, kind):
    path, _, model = write_run(tmp_path / kind, pos_embed=kind)
    export_encoder(path, tmp_path / "e")
    back = load_encoder(tmp_path / "e").encoder
    assert not back.pos_embed.requires_grad  # fine-tuning it trains what training trained
    torch.testing.assert_close(back.pos_embed, model.encoder.pos_embed)
    bigger = load_encoder(tmp_path / "e", image_size=48)
    assert bigger.notes == [f"{kind} position embeddings regenerated for a 6x6 grid"]
    expected = sincos_pos_embed(32, 6)[None] if kind == "sincos" else torch.zeros(1, 36, 32)
    torch.testing.assert_close(bigger.encoder.pos_embed.detach(), expected)


def test_export_round_trip_is_exact(run, tmp_path):
    path, _, model = run
    export_encoder(path, tmp_path / "e")
    back = load_encoder(tmp_path / "e")
    assert back.kind == "export" and back.normalize == "image" and back.encoder.num_heads == 2
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(back.encoder(x), model.encoder.eval()(x))
    assert torch.equal(load_encoder(tmp_path / "e" / "model.safetensors").encoder(x),
                       model.encoder(x))


def test_export_cli_prints_timm_call(run, tmp_path, capsys):
    main(["--checkpoint", run[0], "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224'" in out and "class_token=False" in out
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


def _timm_state(d=32, depth=2, grid=4, patch=8, in_chans=3, **kw):
    g = torch.Generator().manual_seed(1)
    shapes = timm_vit_shapes(img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                             embed_dim=d, depth=depth, num_classes=10, **kw)
    return {k: 0.1 * torch.randn(s, generator=g) + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, s in shapes.items()}


def test_timm_class_token_weights_load(tmp_path):
    sd = _timm_state(d=128)
    torch.save(sd, tmp_path / "vit.pth")
    enc = load_encoder(tmp_path / "vit.pth", image_size=32)
    assert enc.kind == "timm" and enc.normalize == "image"
    assert (enc.encoder.embed_dim, enc.encoder.num_heads, enc.encoder.depth) == (128, 2, 2)
    ours = enc.encoder.state_dict()
    torch.testing.assert_close(ours["pos_embed"], sd["pos_embed"][:, 1:])
    torch.testing.assert_close(ours["patch_embed.proj.weight"],
                               sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(ours["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    assert any("dropped" in n for n in enc.notes)


def test_timm_no_class_token_forward_matches(tmp_path):
    # Grey input replicated to 3 channels in timm == summed patch weights on 1 channel here.
    sd = _timm_state(d=64, class_token=False, global_pool="avg", fc_norm=False)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
    enc = load_encoder(tmp_path / "w.safetensors", model=None)
    assert enc.image_size == 32 and enc.encoder.num_heads == 1  # width 64: one 64-dim head
    x = torch.rand(2, 1, 32, 32)
    expected = timm_vit_forward(sd, x.expand(-1, 3, -1, -1), 1, class_token=False)
    torch.testing.assert_close(enc.encoder(x), expected, rtol=1e-4, atol=1e-5)


def test_mae_checkpoint_with_args_and_decoder(tmp_path):
    sd = _timm_state(d=64)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 64),
               "decoder_pos_embed": torch.zeros(1, 17, 16)})
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "m.pth")
    enc = load_encoder(tmp_path / "m.pth")
    assert enc.kind == "mae"
    torch.testing.assert_close(enc.encoder.state_dict()["norm.weight"], sd["norm.weight"])


def test_pos_embed_is_interpolated_and_bad_grids_rejected(tmp_path):
    sd = _timm_state(d=192)
    torch.save(sd, tmp_path / "vit.pth")
    enc = load_encoder(tmp_path / "vit.pth", model="vit_tiny_patch16", image_size=48)
    assert enc.encoder.pos_embed.shape == (1, 36, 192)  # 4x4 grid -> 6x6
    assert enc.encoder.num_heads == 3
    assert enc.encoder(torch.rand(1, 1, 48, 48)).shape == (1, 192)
    bad = dict(sd, pos_embed=torch.zeros(1, 19, 192))
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EncoderLoadError, match="cannot be interpolated"):
        load_encoder(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        load_encoder(tmp_path / "vit.pth", image_size=36)


def test_wrong_kind_and_missing_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(EncoderLoadError, match="not a ViT checkpoint"):
        load_encoder(tmp_path / "other.pt")
    with pytest.raises(EncoderLoadError, match="checkpoint not found"):
        load_encoder(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="no checkpoint"):
        load_encoder(tmp_path / "empty")
    torch.save(_timm_state(d=32), tmp_path / "narrow.pth")
    with pytest.raises(EncoderLoadError, match="number of heads"):
        load_encoder(tmp_path / "narrow.pth")
    with pytest.raises(EncoderLoadError, match="has width 192"):
        load_encoder(tmp_path / "narrow.pth", model="vit_tiny_patch16")
    sd = _timm_state()
    sd["blocks.0.ls1.gamma"] = torch.ones(32)
    torch.save(sd, tmp_path / "ls.pth")
    with pytest.raises(EncoderLoadError, match="cannot hold"):
        load_encoder(tmp_path / "ls.pth")


def test_spcl_checkpoint_at_another_size(run, tmp_path):
    path, config, model = run  # learned position embeddings: resized bicubically
    enc = load_encoder(path, image_size=48)
    assert enc.encoder.pos_embed.shape == (1, 36, 32) and enc.notes
    folder, _, sincos_model = write_run(tmp_path / "s", pos_embed="sincos")
    enc = load_encoder(folder, image_size=48)
    from spcl_fast.nn import sincos_pos_embed

    torch.testing.assert_close(enc.encoder.pos_embed[0], sincos_pos_embed(32, 6))
    torch.testing.assert_close(enc.encoder.blocks[0].attn.qkv.weight,
                               sincos_model.encoder.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("class_token", [False, True])
def test_real_timm_loads_export(tmp_path, class_token):
    """Run by the timm tier (tests/test_timm_tier.py): every token's features and the pooled
    output of timm's model on the exported weights are the encoder's."""
    timm = pytest.importorskip("timm", reason="timm runs in the timm tier (test_timm_tier.py)")
    path, _, model = write_run(tmp_path / "run", pos_embed="learned", class_token=class_token)
    cfg = export_encoder(path, tmp_path / "t")
    net = timm.create_model(cfg["timm_model"], checkpoint_path=str(tmp_path / "t" /
                            "model.safetensors"), **cfg["timm_kwargs"]).eval()
    x = torch.rand(2, 1, 32, 32)
    encoder = model.encoder.eval()
    torch.testing.assert_close(net.forward_features(x), encoder.forward_features(x),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x), encoder(x), rtol=1e-5, atol=1e-5)


def test_export_cli_reports_unreadable_checkpoints_in_one_line(tmp_path):
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "ckpt-00000002.pt").write_bytes(b"torn")
    with pytest.raises(SystemExit, match=r"^error: no readable checkpoint in .*torn: "
                                         r"ckpt-00000002.pt: not a readable torch checkpoint"):
        main(["--checkpoint", str(tmp_path / "torn"), "--out", str(tmp_path / "x")])


def test_export_never_writes_into_a_run_and_checks_its_arguments(tmp_path):
    folder, _, _ = write_run(tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SystemExit, match="^error: .*run holds a training run"):
        main(["--checkpoint", folder, "--out", folder])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="^error: .*afile is a file, not a folder"):
        main(["--checkpoint", folder, "--out", str(tmp_path / "afile")])
    with pytest.raises(SystemExit, match="^error: image_size must be >= 1, got -8"):
        main(["--checkpoint", folder, "--out", str(tmp_path / "x"), "--image-size", "-8"])
