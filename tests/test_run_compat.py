"""Run folders written before the ``spcl_fast.run`` layer (``tests/fixtures/run_v0``, made at
commit 880e1bb) still load and resume: the resumed step reproduces the old run's numbers, and
``python -m spcl_fast.eval`` reads the old checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spcl_fast.eval import __main__ as eval_cli
from spcl_fast.eval import load_encoder
from spcl_fast.run import TrainConfig
from spcl_fast.train import __main__ as train_cli

FIXTURES = Path(__file__).parent / "fixtures" / "run_v0"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["spcl", "mae"])
def test_old_run_resumes_exactly(tmp_path, method):
    run = tmp_path / method
    shutil.copytree(FIXTURES / method, run)
    old = _records(run / "metrics.jsonl")
    old_config = json.loads((run / "config.json").read_text())
    summary = train_cli.main(["--resume", str(run)])
    assert summary["steps"] == 2
    new = _records(run / "metrics.jsonl")
    assert [r["step"] for r in new] == [1, 2]
    assert new[0] == old[0]  # the record before the checkpoint is kept as written
    for key in ("loss", "grad_norm", "lr"):
        assert new[1][key] == pytest.approx(old[1][key], rel=1e-5, abs=1e-7), key
    # rewritten in this version's sections, every setting as it was; settings added since
    # (new methods' sections, new knobs) at their defaults, which keep the old behaviour
    saved = json.loads(json.dumps(
        TrainConfig.from_dict(json.loads((run / "config.json").read_text())).flat()))
    added = json.loads(json.dumps(TrainConfig().flat()))
    assert {k: saved[k] for k in old_config} == {**old_config, "out": str(run)}
    assert {k: v for k, v in saved.items() if k not in old_config} == \
        {k: v for k, v in added.items() if k not in old_config}


def test_old_checkpoint_evaluates(tmp_path):
    loaded = load_encoder(FIXTURES / "spcl")
    saved = torch.load(FIXTURES / "spcl" / "ckpt-00000001.pt", weights_only=True)["model"]
    weights = {k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")}
    state = loaded.encoder.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert loaded.normalize == "dataset" and loaded.stats is not None
    out = tmp_path / "lp"
    result = eval_cli.main(["linear-probe", "--checkpoint", str(FIXTURES / "spcl"),
                            "--dataset", "synthetic", "--out", str(out), "--max-images", "40",
                            "--probe-steps", "20", "--l2-grid", "0.01"])
    assert (out / "results.json").exists()
    assert result["encoder"]["kind"] == "spcl" and result["encoder"]["embed_dim"] == 16
    assert 0.0 <= result["mean_auroc"] <= 1.0
