"""The unlabelled pool of studies/patient_pool.py: the NIH training films and the pediatric
training patients' films, one folder per patient, and never an NIH test patient."""

from pathlib import Path

import pytest
from test_patient_screen import _toy_kermany

from spcl_fast.data import NIHDemo
from studies import patient_pool


def test_pool_holds_the_training_patients_of_both_sets_and_no_test_patient(tmp_path):
    _toy_kermany(tmp_path / "kermany")
    pool = patient_pool.write_pool(tmp_path / "out", tmp_path / "k-out", tmp_path / "kermany")
    folders = {p.name for p in pool.iterdir() if p.is_dir()}
    train, test = NIHDemo("train"), NIHDemo("test")
    assert {f[len("nih_"):] for f in folders if f.startswith("nih_")} == set(train.patient_ids)
    assert not {f"nih_{p}" for p in test.patient_ids} & folders
    assert sum(1 for _ in pool.glob("nih_*/*.png")) == len(train)
    pretrain = Path(tmp_path / "k-out" / "kermany-pretrain")
    kermany = {p.name for p in pretrain.iterdir() if p.is_dir()}
    assert {f[len("kermany_"):] for f in folders if f.startswith("kermany_")} == kermany
    assert (pool / "done").exists()
    assert patient_pool.write_pool(tmp_path / "out", tmp_path / "k-out") == pool  # once


def test_pool_copies_where_hard_links_fail(tmp_path, monkeypatch):
    _toy_kermany(tmp_path / "kermany")

    def refuse(*args):
        raise OSError("cross-device link")

    monkeypatch.setattr(patient_pool.os, "link", refuse)
    pool = patient_pool.write_pool(tmp_path / "out", tmp_path / "k-out", tmp_path / "kermany")
    copied = list(pool.glob("kermany_*/*.png"))
    assert copied and all(p.stat().st_nlink == 1 for p in copied)


@pytest.mark.parametrize("steps", ["", "0", "a,180"])
def test_bad_steps_are_refused(steps, capsys):
    with pytest.raises(SystemExit, match="--steps"):
        patient_pool.main(["--steps", steps])
