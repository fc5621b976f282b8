"""Fine-tuning and segmentation: the loss, the optimiser groups, learning on easy data, the CLI
outputs (best checkpoint, results.json), Dice reporting."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import Squares, write_run

from spcl_fast.eval import FinetuneSettings, SegmentSettings, finetune, masked_bce, segment
from spcl_fast.eval import __main__ as cli
from spcl_fast.eval.finetune import Classifier, lr_at, param_groups_lrd
from spcl_fast.eval.segment import SegmentationDecoder
from spcl_fast.nn import VisionTransformer


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


def test_masked_bce_skips_unknown_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1.0, 0, float("nan")]] * 4)
    loss = masked_bce(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], targets[:, :2])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0) and torch.all(logits.grad[:, :2] != 0)
    assert masked_bce(logits, torch.full((4, 3), float("nan"))).item() == 0.0


def test_layer_decay_groups_and_schedule():
    clf = Classifier(tiny_encoder(), 2)
    groups = param_groups_lrd(clf, clf.encoder, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    enc = clf.encoder
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5**3  # depth 2: embeddings at layer 0
    assert scale[id(enc.blocks[0].attn.qkv.weight)] == 0.5**2
    assert scale[id(enc.blocks[1].mlp.fc1.weight)] == 0.5
    assert scale[id(enc.norm.weight)] == scale[id(clf.head.weight)] == 1.0
    assert wd[id(enc.pos_embed)] == wd[id(enc.norm.bias)] == 0.0
    assert wd[id(enc.blocks[0].attn.qkv.weight)] == 0.05
    assert len(scale) == sum(p.requires_grad for p in clf.parameters())
    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_finetune_learns_an_easy_task(tmp_path):
    train, val, test = Squares(96, seed=0), Squares(48, seed=1), Squares(48, seed=2)
    settings = FinetuneSettings(epochs=4, batch_size=16, lr=2e-3, warmup_epochs=0.5,
                                drop_path=0.1, layer_decay=0.9)
    res = finetune(tiny_encoder(), train, val, test, settings, torch.device("cpu"),
                   out_dir=tmp_path)
    assert res["mean_auroc"] > 0.9 and len(res["history"]) == 4
    assert res["best_epoch"] == max(range(1, 5), key=lambda e: res["history"][e - 1]
                                    ["val_mean_auroc"])
    best = torch.load(tmp_path / "finetune_best.pt", weights_only=True)
    assert best["epoch"] == res["best_epoch"] and "head.weight" in best["model"]


def test_finetune_cli_writes_results(tmp_path):
    run, _, _ = write_run(tmp_path / "run")
    out = tmp_path / "ft"
    cli.main(["finetune", "--checkpoint", run, "--max-images", "24", "--epochs", "1",
              "--batch-size", "8", "--label-fraction", "0.5", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "finetune" and saved["dataset"]["sizes"]["train"] == 12
    assert saved["settings"]["epochs"] == 1 and "mean_auroc" in saved
    assert (out / "roc_curves.png").exists() and (out / "finetune_best.pt").exists()


def test_decoders_shapes():
    tokens = torch.randn(2, 16, 32)
    for kind in ("progressive", "linear"):
        assert SegmentationDecoder(32, 4, 8, kind)(tokens).shape == (2, 1, 32, 32)
    assert SegmentationDecoder(32, 4, 6)(tokens).shape == (2, 1, 24, 24)  # not a power of two
    with pytest.raises(ValueError):
        SegmentationDecoder(32, 4, 8, "unet")


def test_segment_frozen_encoder_learns_squares():
    train, val, test = Squares(96, seed=0), Squares(24, seed=1), Squares(30, seed=2)
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    settings = SegmentSettings(epochs=5, batch_size=16, lr=3e-2, decoder="linear",
                               warmup_epochs=0.2, weight_decay=0.0)
    res = segment(enc, train, val, test, settings, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # frozen
    assert res["num_images"] == 30 and res["num_positive"] == 20
    assert res["dice_positive"] > 0.8 and res["dice_empty"] > 0.8
    assert set(res["val"]) >= {"dice", "dice_positive", "dice_empty"}


def test_segment_cli_with_a_mask_dataset(tmp_path, monkeypatch):
    # A fixture dataset through the CLI (the real SIIM files are not in the repository).
    import spcl_fast.data as data

    def fake_build(name, root=None, split="train", image_size=64, **kwargs):
        return Squares({"train": 24, "val": 9, "test": 9}[split], size=image_size,
                       seed=len(split))

    monkeypatch.setattr(data, "build_dataset", fake_build)
    monkeypatch.setattr(data, "DATASETS", (*data.DATASETS, "squares"))
    (tmp_path / "root").mkdir()
    run, _, _ = write_run(tmp_path / "run")
    out = tmp_path / "seg"
    cli.main(["segment", "--checkpoint", run, "--dataset", "squares", "--root",
              str(tmp_path / "root"), "--epochs", "1", "--batch-size", "8",
              "--finetune-encoder", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert {"dice", "dice_positive", "dice_empty", "num_positive"} <= set(saved)
    assert saved["settings"]["finetune_encoder"] is True and saved["dataset"]["name"] == "squares"
    assert (out / "segment_examples.png").exists() and (out / "segment_best.pt").exists()
