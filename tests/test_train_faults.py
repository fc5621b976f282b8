"""Training under faults and over several processes, through the real command line: kill -9
at random steps then resume, SIGTERM, and ``torchrun`` with two gloo processes on CPU against
one process on the same global batch (DDP; FSDP2 in the slow tier)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spcl_fast.run.checkpoint import list_checkpoints, load_checkpoint
from spcl_fast.run.config import TrainConfig
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train

TIMING = {"images_per_s", "tflops_per_device", "mfu"}  # wall-clock fields: differ run to run
# Several processes sum gradients and loss terms in another order than one process: the stated
# tolerance of a 2-process run against 1 process on the same global batch, over 4 steps.
RTOL = 1e-5


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def _cli(log, *args) -> subprocess.Popen:
    """``python -m spcl_fast.train ARGS`` in the background, stdout and stderr to files (a pipe
    nobody reads would stall it); :func:`_finish` waits and reads them."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "spcl_fast.train", *map(str, args)],
                                stdout=out, stderr=err, text=True)


def _finish(proc: subprocess.Popen, log, timeout: float = 300) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _wait_for_steps(proc: subprocess.Popen, log, metrics, steps: int,
                    timeout: float = 120) -> int:
    """Poll until ``metrics`` records ``steps`` steps; returns the number seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            done = metrics.read_text().count("\n")
            if done >= steps:
                return done
        assert proc.poll() is None, _finish(proc, log)[1][-3000:]
        time.sleep(0.002)
    raise TimeoutError(f"no step {steps} in {timeout} s")


def _torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "spcl_fast.train", "--preset", "smoke", "--device", "cpu", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )


def _close(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "pos_sim", "lr")) -> None:
    """Same steps and, per key, values within :data:`RTOL` (``acc``/``neg_sim`` compare pairs
    within each process's own images, so they legitimately differ)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=RTOL), (ra["step"], key)


def test_kill_9_at_random_steps_then_resume_matches_the_uninterrupted_run(tmp_path):
    steps, every = 40, 3
    reference = tmp_path / "reference"
    train(smoke().replace(steps=steps, save_every=every), reference)

    out = tmp_path / "run"
    args = ["--preset", "smoke", "--steps", steps, "--save-every", every, "--out", out]
    rng, seen, kills = random.Random(), 0, []
    for k in range(3):
        log = tmp_path / f"log{k}"
        proc = _cli(log, *(args if k == 0 else ["--resume", out]))
        # Beyond the previous kill, so the resumed run's own (rewritten) metrics count.
        seen = _wait_for_steps(proc, log, out / "metrics.jsonl", rng.randint(seen + 2, seen + 8))
        os.kill(proc.pid, signal.SIGKILL)  # wherever it is: mid-step, mid-write ...
        _finish(proc, log)
        kills.append(seen)
        assert proc.returncode == -signal.SIGKILL and seen < steps, kills
    proc = _cli(tmp_path / "log", "--resume", out)
    _, err = _finish(proc, tmp_path / "log")
    assert proc.returncode == 0, err[-3000:]
    assert _records(out) == _records(reference), f"killed after steps {kills}"  # bit for bit
    assert not list(out.glob("*.tmp"))


def test_sigterm_checkpoints_the_finished_step_and_exits_143(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = _cli(log, "--preset", "smoke", "--steps", 100_000, "--out", out)
    _wait_for_steps(proc, log, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(proc, log, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    done = len(_records(out))  # log_every=1: the stopped step was logged, then saved
    assert f"SIGTERM: stopped after step {done}" in stdout
    state, path = load_checkpoint(out)
    assert state["step"] == done and path.name == f"ckpt-{done:08d}.pt"
    assert json.loads((out / "summary.json").read_text())["interrupted"] == "SIGTERM"
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    summary = train(config.replace(steps=done + 2), out, resume=out)
    assert summary["steps"] == done + 2 and len(_records(out)) == done + 2


def test_torchrun_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    # 2 processes x 2 images x 2 accumulation steps = global batch 8 (DDP no_sync included).
    proc = _torchrun("--steps", 4, "--save-every", 2, "--accum-steps", 2, "--out",
                     tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = smoke().replace(steps=4, save_every=2, accum_steps=2, plan_shards=2)
    train(config, tmp_path / "one")
    _close(_records(tmp_path / "two"), _records(tmp_path / "one"))
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["ckpt-00000002.pt",
                                                                   "ckpt-00000004.pt"]
    state, _ = load_checkpoint(tmp_path / "two")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["partition_rng"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    # Elastic: the 2-process run continues in one process (same data order and partitions).
    with pytest.warns(UserWarning, match="per-process RNG"):
        train(config, tmp_path / "continued", resume=tmp_path / "two" / "ckpt-00000002.pt")
    _close(_records(tmp_path / "continued"), _records(tmp_path / "one")[2:])


def test_torchrun_with_the_demo_recipe_matches_one_process(tmp_path):
    # keep 0.5, the intra-image term and look-alike batches (every rank sorts the same order)
    recipe = {"keep": 0.5, "intra_weight": 1.0, "intra_queries": 4, "batch_grouping": "similar"}
    flags = [item for key, value in recipe.items()
             for item in ("--" + key.replace("_", "-"), str(value))]
    proc = _torchrun("--steps", 3, "--accum-steps", 2, "--out", tmp_path / "two", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(smoke().replace(steps=3, accum_steps=2, plan_shards=2, **recipe), tmp_path / "one")
    _close(_records(tmp_path / "two"), _records(tmp_path / "one"), keys=("loss", "intra", "lr"))


def test_torchrun_refused_by_the_main_process_stops_every_process(tmp_path):
    train(smoke().replace(steps=2), tmp_path / "held")  # a run already there
    started = time.monotonic()
    proc = _torchrun("--steps", 2, "--out", tmp_path / "held")
    assert proc.returncode != 0 and "already holds a run" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 120  # nobody waited for a peer that had stopped
    assert proc.stderr.count("already holds a run") >= 2  # each process says why, in one line


@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    proc = _torchrun("--steps", 4, "--save-every", 2, "--fsdp", "--out", tmp_path / "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(smoke().replace(steps=4, plan_shards=2), tmp_path / "one")
    _close(_records(tmp_path / "fsdp"), _records(tmp_path / "one"))
    state, _ = load_checkpoint(tmp_path / "fsdp")
    assert state["optimizer_format"] == "fsdp-full"
    proc = _torchrun("--resume", tmp_path / "fsdp" / "ckpt-00000002.pt", "--out",
                     tmp_path / "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(tmp_path / "resumed") == _records(tmp_path / "fsdp")[2:]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_checkpoint(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "spcl_fast.train", "--preset", "smoke", "--device", "cpu", "--steps",
             "100000", "--out", str(out)], stdout=stdout, stderr=stderr)
    _wait_for_steps(proc, log, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    stdout, _ = _finish(proc, log, timeout=120)
    done = len(_records(out))
    assert f"SIGTERM: stopped after step {done}" in stdout
    state, _ = load_checkpoint(out)
    assert state["step"] == done and len(state["rng"]) == 2


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    config = smoke().replace(steps=3)
    train(config, tmp_path / "eager")
    train(config.replace(compile=True), tmp_path / "compiled")
    eager, compiled = _records(tmp_path / "eager"), _records(tmp_path / "compiled")
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    torch._dynamo.reset()
