"""Training: the CLI end to end, checkpoints and exact resume (config parsing: test_config.py)."""

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

from spcl_fast.run.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from spcl_fast.run.config import apply_overrides
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train
from spcl_fast.train.trainer import param_groups, step_lr


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_lr_schedule_and_param_groups():
    c = apply_overrides(
        smoke(), {"steps": "100", "warmup_steps": "10", "lr": "1e-3", "min_lr": "1e-5"}
    )
    assert step_lr(0, c.optim) == pytest.approx(1e-4) and step_lr(9, c.optim) == pytest.approx(1e-3)
    assert step_lr(100, c.optim) == pytest.approx(1e-5)
    lrs = [step_lr(s, c.optim) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3


def test_cli_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spcl_fast.train",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GFLOPs/image" in proc.stdout and "finished 3 steps" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (out / "loss_curve.png").stat().st_size > 1000
    state, _ = load_checkpoint(out)
    assert state["step"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--normalize", "bogus"], "normalize must be one of dataset, image, equalize, none"),
        (["--dataset", "chestxray14", "--data-root", "{tmp}/nowhere"], "nowhere"),
        (["--resume", "{tmp}/torn"], r"no readable checkpoint in .*torn.*ckpt-00000001.pt"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--keep", "1.5"], r"keep must be in \(0, 1\]"),
        (["--ratio-range", "0.5"], "--ratio-range takes 2 values"),
        (["--ratio-range", "0.7,0.3"], "ratio_range must be"),
        (["--temperature", "0"], "temperature must be positive"),
        (["--negatives", "foo"], "negatives must be one of cross, all, got .foo."),
        (["--depth", "0"], "depth must be >= 1"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--save-every", "-1"], "save_every must be >= 0"),
        (["--lr", "inf"], "lr must be positive and finite"),
        (["--num-subsets", "64"], "num_subsets must be from 2 to the number of patches"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--out", "{tmp}/afile"], "afile"),
    ],
    ids=["setting", "data_root", "checkpoint", "batch", "keep", "range_len", "range",
         "temperature", "negatives", "depth", "steps", "save_every", "lr", "subsets", "device",
         "out_file"],
)
def test_cli_reports_a_run_that_cannot_start_in_one_line(tmp_path, args, message):
    from spcl_fast.train.__main__ import main

    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "ckpt-00000001.pt").write_bytes(b"torn")
    (tmp_path / "afile").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--preset", "smoke", "--out", str(tmp_path / "run"), *args])
    assert re.match(r"error: [^\n]*" + message + r"[^\n]*$", str(info.value)), info.value
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written for a bad run


def test_cli_never_overwrites_or_prunes_another_run(tmp_path, monkeypatch):
    from spcl_fast.train.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--resume needs a run folder"):
        main(["--preset", "smoke", "--resume"])
    assert not list(tmp_path.iterdir())  # nothing trained into the working folder
    run = ["--preset", "smoke", "--steps", "4", "--save-every", "2", "--keep-last", "1"]
    main([*run, "--out", "a"])
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match=r"a already holds a run \(ckpt-00000004.pt"):
        main([*run, "--out", "a"])  # the same --out again, without --resume
    with pytest.raises(SystemExit, match="built with other settings: depth 2 \\(now 3\\)"):
        main(["--resume", "a", "--depth", "3", "--steps", "6"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == files
    # a run folder that does not exist yet is that run's folder, not its parent
    main([*run, "--out", "b", "--steps", "2"])
    main([*run, "--resume", "runs/new", "--steps", "2"])
    assert (tmp_path / "runs" / "new" / "ckpt-00000002.pt").exists()
    assert not (tmp_path / "runs" / "config.json").exists()
    # an older checkpoint is not continued where a newer one of its run lives
    main([*run, "--out", "c", "--steps", "2"])
    older = tmp_path / "c" / "ckpt-00000002.pt"
    (tmp_path / "c2").mkdir()
    main([*run, "--out", "c2", "--steps", "4"])
    target = tmp_path / "c2" / "ckpt-00000002.pt"
    target.write_bytes(older.read_bytes())
    with pytest.raises(SystemExit, match="ckpt-00000002.pt is older than ckpt-00000004.pt"):
        main(["--resume", str(target), "--steps", "6"])
    # continuing one run into another run's folder is refused; that run is left as it was
    files = {p.name: p.read_bytes() for p in (tmp_path / "c2").iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="c2 already holds a run"):
        main(["--resume", "a", "--out", "c2", "--steps", "6"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "c2").iterdir() if p.is_file()} == files
    # a checkpoint under another name resumes in its own folder
    (tmp_path / "a" / "final.pth").write_bytes((tmp_path / "a" / "ckpt-00000004.pt").read_bytes())
    summary = main(["--resume", "a/final.pth", "--steps", "6"])
    assert summary["steps"] == 6 and (tmp_path / "a" / "ckpt-00000006.pt").exists()


def test_cli_rejects_unknown_option(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spcl_fast.train",
            "--preset",
            "smoke",
            "--lrate",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown option --lrate" in proc.stderr


def test_resume_continues_exactly(tmp_path):
    config = smoke().replace(steps=6, save_every=3)
    train(config, tmp_path / "full")
    # A run that died after step 3 left only its step-3 checkpoint: resume from it.
    train(config, tmp_path / "resumed", resume=tmp_path / "full" / "ckpt-00000003.pt")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")[3:]  # bit for bit


def test_training_seconds_add_up_over_resumes(tmp_path):
    config = smoke().replace(steps=4, save_every=2)
    train(config, tmp_path / "run")
    half = torch.load(tmp_path / "run" / "ckpt-00000002.pt", weights_only=True)
    assert half["train_seconds"] > 0
    for name in ("ckpt-00000004.pt", "summary.json"):
        (tmp_path / "run" / name).unlink()
    summary = train(config, tmp_path / "run", resume=tmp_path / "run")
    assert summary["train_seconds"] > half["train_seconds"]


def test_resume_with_changed_settings_names_them_and_keeps_the_old_config(tmp_path, capsys):
    run = tmp_path / "run"
    config = smoke().replace(steps=4, out=str(run))
    train(config, run)
    before = (run / "config.json").read_text()
    longer = config.replace(steps=6, lr=5e-4)
    train(longer, run, resume=run)
    out = capsys.readouterr().out
    assert "at step 4 with changed settings: steps 4 (now 6); lr 0.001 (now 0.0005)" in out
    assert (run / "config-step00000004.json").read_text() == before
    assert json.loads((run / "config.json").read_text())["optim"]["steps"] == 6
    # Resuming again with the same settings changes nothing, so nothing more is kept.
    (run / "summary.json").unlink()
    train(longer, run, resume=run)
    assert "changed settings" not in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("config*.json")) == [
        "config-step00000004.json", "config.json"]


def test_checkpoints_keep_last_and_fall_back_when_corrupt(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    list_checkpoints(tmp_path)[-1].write_bytes(b"torn write")
    with pytest.warns(UserWarning, match="could not read"):
        state, path = load_checkpoint(tmp_path)
    assert state["step"] == 2 and path.name == "ckpt-00000002.pt"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty")
    list_checkpoints(tmp_path)[0].write_bytes(b"")
    with pytest.warns(UserWarning, match="trying ckpt-00000002.pt"):
        with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*ckpt-00000003.pt: "
                           r"not a readable torch checkpoint .*ckpt-00000002.pt"):
            load_checkpoint(tmp_path)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from spcl_fast.methods import spcl

    real = spcl.info_nce
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(spcl, "info_nce", flaky)
    summary = train(smoke().replace(steps=4), tmp_path / "a")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4

    monkeypatch.setattr(spcl, "info_nce", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        train(smoke().replace(steps=20, max_bad_steps=3), tmp_path / "b")
    text = (tmp_path / "b" / "metrics.jsonl").read_text()  # strict JSON: null, not NaN
    assert "NaN" not in text and "Infinity" not in text
    assert any(json.loads(line)["loss"] is None for line in text.splitlines())

    # A good run's checkpoints survive a resumed run that goes bad: no checkpoint is written
    # while non-finite steps are in a row, and the stop writes none.
    monkeypatch.setattr(spcl, "info_nce", real)
    config = smoke().replace(steps=4, save_every=2)
    train(config, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "c")}
    monkeypatch.setattr(spcl, "info_nce", lambda *a, **k: real(*a, **k) * float("nan"))
    bad = config.replace(steps=20, save_every=1, max_bad_steps=3)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"), pytest.warns(
        UserWarning, match="skipping this checkpoint"
    ):
        train(bad, tmp_path / "c", resume=tmp_path / "c")
    assert {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "c")} == before
