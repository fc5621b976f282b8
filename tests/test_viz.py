"""``python -m spcl_fast.viz``: partition and attention pictures, image loading, and the
attention maths against the encoder's own partitioned forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import write_run

from spcl_fast.partition import sample_partitions
from spcl_fast.run.config import TrainConfig
from spcl_fast.viz import load_image, main, partition_grid, subset_attention


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("viz") / "run")


def test_partition_and_attention_pictures(run, tmp_path):
    for argv in (["partition", "--image", "synthetic:2", "--out", str(tmp_path / "p.png")],
                 ["partition", "--image", "synthetic:2", "--checkpoint", run[0], "--out",
                  str(tmp_path / "pc.png")],
                 ["attention", "--image", "synthetic:2", "--checkpoint", run[0], "--out",
                  str(tmp_path / "a.png")]):
        path = main(argv)
        assert path.stat().st_size > 2000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="image not found"):
        main(["partition", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "x")])


def test_partition_grid_follows_config():
    labels = partition_grid(TrainConfig().replace(keep=0.5), 8, seed=3)
    assert labels.shape == (8, 8)
    assert (labels == 1).sum() == (labels == 2).sum() == 16 and (labels == 0).sum() == 32
    assert torch.equal(labels, partition_grid(TrainConfig().replace(keep=0.5), 8, seed=3))
    blocks = partition_grid(TrainConfig().replace(block_size=2), 8, seed=0)
    assert torch.equal(blocks[::2, ::2], blocks[1::2, 1::2])  # whole 2x2 blocks
    four = partition_grid(TrainConfig().replace(num_subsets=4, keep=0.5), 8, seed=1)
    assert [int((four == k).sum()) for k in range(5)] == [32, 8, 8, 8, 8]


def test_pictures_of_more_than_two_subsets(tmp_path):
    path, _, _ = write_run(tmp_path / "k3", num_subsets=3)
    for kind in ("partition", "attention"):
        out = main([kind, "--image", "synthetic:1", "--checkpoint", path,
                    "--out", str(tmp_path / f"{kind}.png")])
        assert out.read_bytes()[:4] == b"\x89PNG"


def test_subset_attention_is_the_training_computation(run):
    _, config, model = run
    enc = model.encoder.eval()
    x = torch.randn(1, 1, 32, 32)
    plan = sample_partitions(1, 16, generator=torch.Generator().manual_seed(0))
    cu = plan.cu_seqlens.tolist()
    with torch.no_grad():
        pooled = enc.forward_partitioned(x, plan)  # the varlen path training uses
        for s in range(2):
            tokens = plan.token_index[cu[s]:cu[s + 1]]
            # The dense run over the subset's tokens reproduces its segment embedding...
            h = enc.embed(x)[:, tokens]
            for blk in enc.blocks:
                h = blk(h)
            torch.testing.assert_close(enc.norm(h).mean(1)[0], pooled[s], rtol=1e-4, atol=1e-5)
            att = subset_attention(enc, x, tokens)
            assert att.shape == (len(tokens),) and att.sum().item() == pytest.approx(1.0)
            assert torch.all(att > 0)


def test_load_image_files(tmp_path):
    from PIL import Image

    grey = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(64, 48)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.jpg")
    for name in ("g.png", "rgb.jpg"):
        img = load_image(str(tmp_path / name), 32)
        assert img.shape == (1, 32, 32) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5


def test_subset_attention_with_a_class_token(tmp_path):
    path, _, model = write_run(tmp_path / "cls", class_token=True)
    enc = model.encoder.eval()
    x = torch.randn(1, 1, 32, 32)
    tokens = torch.tensor([0, 3, 5, 9, 12])
    att = subset_attention(enc, x, tokens)
    assert att.shape == (5,) and att.sum().item() == pytest.approx(1.0) and torch.all(att > 0)
    out = main(["attention", "--image", "synthetic:1", "--checkpoint", path,
                "--out", str(tmp_path / "a.png")])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_choices_in_one_line(run, tmp_path):
    path = main(["partition", "--image", "synthetic:2", "--out", str(tmp_path / "noext")])
    assert path == tmp_path / "noext.png" and path.exists()  # the path it prints is the file
    pdf = main(["partition", "--image", "synthetic:2", "--out", str(tmp_path / "p.pdf")])
    assert pdf == tmp_path / "p.pdf" and pdf.read_bytes()[:4] == b"%PDF"
    (tmp_path / "afile").write_text("")
    for argv, message in (
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(tmp_path / "afile" / "x.png")], "cannot write"),
        (["--image-size", "60"], "60 is not a multiple of the patch size 8"),
        (["--patch-size", "0"], "not a multiple of the patch size 0"),
        (["--checkpoint", run[0], "--patch-size", "4"], "--patch-size comes from the checkpoint"),
    ):
        argv = ["partition", "--image", "synthetic:2", "--out", str(tmp_path / "p.png"), *argv]
        with pytest.raises(SystemExit, match=f"^error: [^\\n]*{message}"):
            main(argv)
