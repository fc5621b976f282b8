"""Issue 38, item 9's smaller ones: exported weights readable as the config beside them, a
torn checkpoint's warning in whole sentences, one dataset pooled from two roots."""

import os
import stat
import warnings

import torch
from eval_helpers import write_run

from spcl_fast.data import CXRPool, SyntheticCXR
from spcl_fast.export import export_encoder
from spcl_fast.run.checkpoint import load_checkpoint


def test_exported_weights_get_the_mode_of_the_config_beside_them(tmp_path):
    path, _, _ = write_run(tmp_path / "run")
    export_encoder(path, tmp_path / "export")
    weights, config = (stat.S_IMODE(os.stat(tmp_path / "export" / name).st_mode)
                       for name in ("model.safetensors", "config.json"))
    assert weights == config and weights & stat.S_IRGRP


def test_a_torn_checkpoint_is_named_in_whole_sentences(tmp_path):
    torch.save({"step": 1}, tmp_path / "ckpt-00000001.pt")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ckpt-00000002.pt")
    data = (tmp_path / "ckpt-00000002.pt").read_bytes()
    (tmp_path / "ckpt-00000002.pt").write_bytes(data[: len(data) // 2])  # a write cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, path = load_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.pt" and state["step"] == 1
    message = str(caught[0].message)
    assert "failed finding central directory)" in message  # the sentence ends; no cut word
    assert message.endswith("; trying ckpt-00000001.pt")


def test_one_dataset_from_two_roots_pools_under_numbered_names():
    a, b = SyntheticCXR("val", num_images=2), SyntheticCXR("test", num_images=3)
    pool = CXRPool([a, b], names=["chestxray14", "chestxray14"])
    assert pool.names == ["chestxray14", "chestxray14-2"] and len(pool) == 5
    assert pool.ids[2] == "chestxray14-2/synthetic-test-000000"
    assert len(set(pool.patient_ids)) == len(pool.patient_ids)


def test_look_alike_batches_show_progress_while_a_dataset_is_read(tmp_path, capsys):
    from PIL import Image

    from spcl_fast.data import CXRFolder
    from spcl_fast.train.sharding import thumbnails

    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / f"{i}.png")
    folder = CXRFolder(tmp_path, image_size=32)
    quiet = thumbnails(folder, 1)
    assert "thumbnails" not in capsys.readouterr().err
    assert torch.equal(thumbnails(folder, 1, progress=True), quiet)
    assert "look-alike batches: thumbnails" in capsys.readouterr().err


def test_unreadable_images_in_the_statistics_are_not_said_to_leave_the_probe(tmp_path):
    from devtools.fixtures import make_chestxray14
    from spcl_fast.run.data import intensity_stats, load_split
    from spcl_fast.run.presets import smoke

    root = make_chestxray14(tmp_path / "nih", n=24, size=32)
    config = smoke().replace(dataset="chestxray14", data_root=root, num_images=None)
    source, _, _ = load_split(config, "train")
    (tmp_path / "nih" / "images" / source.ids[0]).write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        intensity_stats("chestxray14", source)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 unreadable images left out of the intensity statistics" in messages
    assert "probe" not in messages
