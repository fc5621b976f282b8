"""Every command line ends bad input in one ``error:`` line that names the problem and, where
it can, the fix (the closest subcommand, option or choice); ``--threads`` everywhere; ``train``
takes pairs as it documents them (issue 38, items 5-7)."""

import pytest

from spcl_fast.cli import ArgumentParser, suggest
from spcl_fast.data import SyntheticCXR
from spcl_fast.data.prepare import main as prepare_main
from spcl_fast.data.pseudonymize import main as pseudonymize_main
from spcl_fast.eval.__main__ import classes_without_both_labels
from spcl_fast.eval.__main__ import main as eval_main
from spcl_fast.eval.label_fraction import DatasetView
from spcl_fast.export import main as export_main
from spcl_fast.run.config import apply_overrides
from spcl_fast.run.presets import demo
from spcl_fast.train.__main__ import main as train_main
from spcl_fast.train.__main__ import parse_args as train_args
from spcl_fast.viz import main as viz_main


def _error(main, argv, capsys) -> str:
    """The one line a CLI ends with on ``argv`` (SystemExit's message, or what it printed)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    message = exc.value.code if isinstance(exc.value.code, str) else captured.err
    assert "╭" not in captured.err + captured.out and "Traceback" not in captured.err
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


@pytest.mark.parametrize("argv, want", [
    (["linaer-probe"], "unknown command 'linaer-probe'; did you mean linear-probe?"),
    ([], "name a command: linear-probe, finetune, segment"),
    (["linear-probe"], "--checkpoint is required"),
    (["linear-probe", "--checkpoint", "none", "--probe-step", "3"],
     "unknown option --probe-step; did you mean --probe-steps?"),
    (["linear-probe", "--checkpoint", "none", "--probe-steps", "x"],
     "--probe-steps takes a whole number, got 'x'"),
    (["finetune", "--checkpoint", "none", "--lr", "fast"], "--lr takes a number, got 'fast'"),
    (["linear-probe", "--checkpoint", "none", "--normalize", "imag"],
     "did you mean image?"),
    (["linear-probe", "--checkpoint", "none", "--threads", "0"], "--threads must be >= 1"),
])
def test_eval_bad_input_is_one_line_naming_the_fix(argv, want, capsys):
    line = _error(eval_main, argv, capsys)
    assert want in line
    assert "python linear-probe" not in line  # tyro's boxes named the wrong program


def test_eval_on_a_folder_says_it_has_no_labels(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "p" / "a.png")
    line = _error(eval_main, ["linear-probe", "--checkpoint", "none", "--model",
                              "vit_tiny_patch16", "--dataset", "folder", "--root",
                              str(tmp_path)], capsys)
    assert "needs labels; dataset 'folder' has none" in line


def test_classes_a_label_fraction_cannot_teach_are_named():
    view = DatasetView(SyntheticCXR("train", num_images=40, image_size=32), [0, 1])
    labels = view.labels
    want = [name for name, column in zip(view.class_names, labels.T, strict=True)
            if not ((column == 1).any() and (column == 0).any())]
    assert classes_without_both_labels(view) == want and want  # two images miss some class
    full = SyntheticCXR("train", num_images=200, image_size=32)
    assert classes_without_both_labels(full) == []


@pytest.mark.parametrize("main, argv, want", [
    (viz_main, ["partition", "--image", "synthetic:abc", "--out", "x.png"],
     "synthetic:<index> takes a whole number >= 0, got 'synthetic:abc'"),
    (viz_main, ["partiton", "--image", "x", "--out", "y"], "did you mean partition?"),
    (viz_main, ["partition", "--image", "synthetic:0", "--out", "y", "--threads", "0"],
     "--threads: must be >= 1"),
    (prepare_main, ["--dataset", "chexpret", "--root", "r", "--out", "o"],
     "did you mean chexpert?"),
    (export_main, ["--checkpoint", "c", "--out", "o", "--imagesize", "3"],
     "did you mean --image-size?"),
    (pseudonymize_main, ["a"], "the following arguments are required"),
])
def test_argparse_clis_end_in_one_error_line(main, argv, want, capsys):
    assert want in _error(main, argv, capsys)


def test_suggestions_are_only_close_ones():
    assert suggest("--betas", ["--threads", "--dataset"]) == ""
    assert suggest("--epoch", ["--epochs", "--lr"]) == "; did you mean --epochs?"
    parser = ArgumentParser(prog="p")
    parser.add_argument("--output-dir")
    with pytest.raises(SystemExit):
        parser.parse_args(["--output", "x"])  # no abbreviations


@pytest.mark.parametrize("words", [["0.9", "0.99"], ["0.9,0.99"], ["0.9, 0.99"]])
def test_train_takes_pairs_as_its_help_shows_them(words):
    preset, overrides, _ = train_args(["--betas", *words, "--steps", "3"])
    config = apply_overrides(demo(), overrides)
    assert config.optim.betas == (0.9, 0.99) and config.optim.steps == 3
    _, overrides, _ = train_args(["--ratio-range", "none", "--crop-scale", "0.3", "0.9"])
    config = apply_overrides(demo(), overrides)
    assert config.spcl.ratio_range is None and config.spcl.crop_scale == (0.3, 0.9)


def test_train_bad_pairs_and_help(capsys):
    line = _error(train_main, ["--betas", "0.9"], capsys)
    assert "--betas takes 2 values ('a b' or 'a,b'), got '0.9'" in line
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert out.count("usage:") == 1 and "--betas FLOAT FLOAT" in out


def test_train_refuses_threads_below_one(tmp_path, monkeypatch, capsys):
    for threads in ("-1", "0"):
        with pytest.raises(ValueError, match=rf"threads must be >= 1 .*, got {threads}"):
            apply_overrides(demo(), {"threads": threads}).check()
    apply_overrides(demo(), {"threads": "none"}).check()
    monkeypatch.chdir(tmp_path)
    for threads in ("-1", "0"):
        line = _error(train_main, ["--preset", "smoke", "--threads", threads], capsys)
        assert line == f"error: threads must be >= 1 (none: torch's default), got {threads}"
    assert not list(tmp_path.glob("runs/*"))  # refused before a run folder is written


def test_train_suggests_the_closest_preset(capsys):
    line = _error(train_main, ["--preset", "vit_smal_224"], capsys)
    assert "unknown preset 'vit_smal_224'; did you mean vit_small_224" in line


def test_eval_takes_the_embedded_nih_demo_without_a_root():
    from spcl_fast.eval.__main__ import build_splits, parse_args

    args = parse_args(["linear-probe", "--checkpoint", "none", "--dataset", "nih-demo",
                       "--max-images", "4"])
    splits = build_splits(args, 32)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 4, 4]
