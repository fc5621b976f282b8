"""``python -m spcl_fast.eval``: label fractions by patient, the linear-probe CLI end to end, the
random-init baseline, and the error messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_helpers import Squares, write_run

from spcl_fast.data import DATASETS, normalize_images
from spcl_fast.data.synthetic import MEAN, STD
from spcl_fast.eval import __main__ as cli
from spcl_fast.eval import extract_features, linear_probe, load_encoder, sample_patients
from spcl_fast.eval.label_fraction import DatasetView, label_fraction_view
from spcl_fast.run.model import build_model

SMALL = ["--max-images", "40", "--probe-steps", "30", "--l2-grid", "0.001", "0.1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("cli") / "run")


def _patients(n_patients=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_patients,), generator=g).tolist()
    return [f"p{p:03d}" for p, c in enumerate(counts) for _ in range(c)]


def test_label_fraction_samples_patients_reproducibly():
    pids = _patients()
    a, b = sample_patients(pids, 0.1, seed=7), sample_patients(pids, 0.1, seed=7)
    assert torch.equal(a, b)  # same seed, same subset
    assert not torch.equal(a, sample_patients(pids, 0.1, seed=8))
    chosen = {pids[i] for i in a}
    assert len(chosen) == math.ceil(0.1 * 40)  # the fraction is of patients
    # Every image of a chosen patient is in, no other image is.
    assert a.tolist() == [i for i, p in enumerate(pids) if p in chosen]
    # The order of the dataset does not matter; smaller fractions nest in larger ones.
    rev = pids[::-1]
    assert {rev[i] for i in sample_patients(rev, 0.1, seed=7)} == chosen
    assert chosen <= {pids[i] for i in sample_patients(pids, 0.5, seed=7)}
    assert len(sample_patients(pids, 1e-6)) > 0  # at least one patient
    with pytest.raises(ValueError):
        sample_patients(pids, 0.0)


def test_label_fraction_keeps_splits_patient_disjoint():
    pids = _patients(60)
    train_idx = [i for i, p in enumerate(pids) if int(p[1:]) % 4]  # patients 1,2,3 mod 4
    test_pids = {p for p in pids if int(p[1:]) % 4 == 0}
    ds = Squares(len(pids))
    ds.patient_ids = pids
    train = DatasetView(ds, train_idx)
    sub = label_fraction_view(train, 0.25, seed=0)
    assert set(sub.patient_ids).isdisjoint(test_pids)
    assert set(sub.patient_ids) <= set(train.patient_ids)
    assert sub.labels.shape == (len(sub), 1) and label_fraction_view(train, 1.0) is train
    # Without patient ids (the synthetic set) each image is its own patient.
    assert len(label_fraction_view(Squares(50), 0.1)) == 5


def test_linear_probe_cli_end_to_end(run, tmp_path, capsys):
    path, config, model = run
    out = tmp_path / "lp"
    res = cli.main(["linear-probe", "--checkpoint", path, "--out", str(out), *SMALL])
    saved = json.loads((out / "results.json").read_text())
    assert (out / "roc_curves.png").stat().st_size > 1000
    assert saved["mean_auroc"] == pytest.approx(res["mean_auroc"])
    assert set(saved["per_class_auroc"]) == {"cardiomegaly", "effusion", "pneumothorax",
                                             "nodule", "consolidation"}
    assert saved["dataset"]["sizes"] == {"train": 40, "val": 40, "test": 40}
    assert saved["encoder"]["kind"] == "spcl" and saved["encoder"]["normalize"] == "image"
    assert saved["encoder"]["source"].endswith("ckpt-00000003.pt")
    assert saved["args"]["checkpoint"] == path and saved["l2"] in (0.001, 0.1)
    assert "mean" in capsys.readouterr().out
    # The same numbers as probing the checkpoint's encoder by hand, normalised as in training.
    from spcl_fast.data import SyntheticCXR

    def transform(x):
        return normalize_images(x, config.data.normalize, MEAN, STD)

    feats = [(extract_features(model.encoder, SyntheticCXR(s, num_images=40, image_size=32)
                               .images(), transform=transform),
              SyntheticCXR(s, num_images=40, image_size=32).labels)
             for s in ("train", "val", "test")]
    by_hand = linear_probe(*feats, l2_grid=(0.001, 0.1), steps=30)
    assert res["mean_auroc"] == pytest.approx(by_hand["mean_auroc"], abs=1e-6)


def test_none_baseline_is_the_engines_init(run, tmp_path):
    path, config, _ = run
    enc = load_encoder("none", model=path)
    init = build_model(config).encoder
    for (k, a), b in zip(enc.encoder.state_dict().items(), init.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert enc.normalize == "image"
    res = cli.main(["linear-probe", "--checkpoint", "none", "--model", path,
                    "--label-fraction", "0.5", "--out", str(tmp_path / "n"), *SMALL])
    assert res["dataset"]["sizes"]["train"] == 20 and res["dataset"]["train_patients"] == 20
    assert res["encoder"]["kind"] == "none"


REAL = next((d for d in DATASETS if d not in cli.BUILT_IN), "chestxray14")


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", REAL], "--root is required"),
    (["--dataset", REAL, "--root", "/nonexistent/cxr"], "dataset root not found"),
    (["--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["--model", "vit_giant"], "neither a preset"),
])
def test_cli_errors(argv, message):
    if REAL not in DATASETS and "unknown" not in message:
        pytest.skip("no real dataset registered in spcl_fast.data")
    base = {"--checkpoint": "none", "--model": "vit_tiny_patch16", "--image-size": "32",
            "--patch-size": "8"}
    for k, v in zip(argv[::2], argv[1::2], strict=True):
        base[k] = v
    args = ["linear-probe"] + [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit, match=message):
        cli.main(args)


@pytest.mark.parametrize("argv, message", [
    (["linear-probe", "--label-fraction", "0"], "--label-fraction must be in \\(0, 1\\], got 0.0"),
    (["linear-probe", "--label-fraction", "1.5"], "--label-fraction must be in"),
    (["linear-probe", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["linear-probe", "--max-images", "0"], "--max-images must be >= 1"),
    (["linear-probe", "--workers", "-1"], "--workers must be >= 0"),
    (["linear-probe", "--probe-steps", "0"], "--probe-steps must be >= 1"),
    (["linear-probe", "--l2-grid", "0.1", "-1"], "--l2-grid must be a list of values >= 0"),
    (["finetune", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["finetune", "--precision", "garbage"], "--precision must be one of auto, fp32, bf16, fp16"),
    (["finetune", "--lr", "-1"], "--lr must be > 0"),
    (["finetune", "--layer-decay", "0"], "--layer-decay must be in \\(0, 1\\]"),
    (["segment", "--decoder", "garbage"], "--decoder must be one of progressive, linear"),
    (["segment", "--threshold", "1"], "--threshold must be in \\(0, 1\\)"),
])
def test_cli_rejects_bad_values_before_loading_anything(argv, message):
    # a checkpoint that does not exist: the flags must be rejected first
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        cli.main([*argv, "--checkpoint", "/nonexistent/ckpt.pt"])


def test_cli_bad_files_are_one_line_errors(run, tmp_path):
    from devtools.fixtures import make_chestxray14

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="error: --out .*afile is a file, not a folder"):
        cli.main(["linear-probe", "--checkpoint", run[0], "--out", str(tmp_path / "afile")])
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "ckpt-00000004.pt").write_bytes(b"torn")
    with pytest.raises(SystemExit, match="error: no readable checkpoint in .*torn: "
                                         "ckpt-00000004.pt: not a readable torch checkpoint"):
        cli.main(["linear-probe", "--checkpoint", str(torn)])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"empty.pt .*\(EOFError: the file is empty or cut off\)$"):
        cli.main(["linear-probe", "--checkpoint", str(tmp_path / "empty.pt")])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(7, 250)))
    with pytest.raises(SystemExit, match=r"garbage.pt .*\(UnpicklingError: [^\n]*\)$"):
        cli.main(["linear-probe", "--checkpoint", str(tmp_path / "garbage.pt")])
    root = make_chestxray14(tmp_path / "cx", n=24, size=32)
    with pytest.raises(SystemExit, match="error: linear-probe needs labels; dataset 'folder'"):
        cli.main(["linear-probe", "--checkpoint", run[0], "--dataset", "folder", "--root",
                  str(tmp_path / "cx" / "images")])
    with open(sorted((tmp_path / "cx" / "images").iterdir())[0], "r+b") as f:
        f.truncate(60)  # a torn PNG: evaluation must not score another image in its place
    one_line = r"^error: [^\n]*\.png: [^\n]*Every listed image must be readable[^\n]*$"
    data = ["--dataset", "chestxray14", "--root", root, "--probe-steps", "5"]
    with pytest.raises(SystemExit, match=one_line):
        cli.main(["linear-probe", "--checkpoint", run[0], *data])
    with pytest.raises(SystemExit, match=one_line):  # raised in a DataLoader worker
        cli.main(["linear-probe", "--checkpoint", run[0], "--workers", "1", *data])
    with pytest.raises(SystemExit, match=one_line):  # read to measure intensity statistics
        cli.main(["linear-probe", "--checkpoint", "none", "--model", "vit_tiny_patch16",
                  "--image-size", "32", "--patch-size", "8", *data])


def test_cli_wrong_kind_and_segment_without_masks(run, tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="not a ViT checkpoint"):
        cli.main(["linear-probe", "--checkpoint", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="needs a dataset with masks"):
        cli.main(["segment", "--checkpoint", run[0], "--max-images", "4"])
    with pytest.raises(SystemExit, match="multiple of patch_size|cannot"):
        cli.main(["linear-probe", "--checkpoint", run[0], "--image-size", "36"])


def test_recorded_intensity_stats_are_used(tmp_path):
    folder, _, model = write_run(tmp_path / "r", normalize="dataset", stats=(0.3, 0.2))
    for source in (folder, "none"):
        enc = load_encoder(source, model=folder if source == "none" else None)
        assert enc.stats == (0.3, 0.2) and enc.normalize == "dataset"
        x = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(enc.transform()(x), (x - 0.3) / 0.2)
    # A preset has no recorded statistics: the CLI measures them on the evaluated train split.
    res = cli.main(["linear-probe", "--checkpoint", "none", "--model", "vit_tiny_patch16",
                    "--image-size", "32", "--patch-size", "8", *SMALL])
    assert res["encoder"]["stats"] == [pytest.approx(MEAN), pytest.approx(STD)]


def test_cli_flags_come_from_the_settings_fields(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["finetune", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--epochs" in text and "passes over the training split" in text  # the comment
    assert "--layer-decay" in text and "--num-workers" in text
    args = cli.parse_args(["segment", "--checkpoint", "x", "--num-workers", "2", "--epochs",
                           "3", "--finetune-encoder"])
    settings = cli.task_settings(args)
    assert (args.task, settings.epochs, settings.finetune_encoder) == ("segment", 3, True)
    assert (settings.num_workers, settings.batch_size) == (2, cli.DEFAULT_BATCH["segment"])
