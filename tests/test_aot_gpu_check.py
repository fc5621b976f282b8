"""A dry run of ``benchmarks/gpu_check.sh`` on CPU: the script parses, and every step of every
part runs pytest on files that exist with a selection that collects at least one test (a
renamed test or benchmark would otherwise make a GPU call measure nothing)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_unknown_part_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize("part", ["core", "tests", "bench"])
def test_every_step_selects_existing_tests(part):
    env = {**os.environ, "DRY_RUN": "1"}
    out = subprocess.run(["bash", str(SCRIPT), part], env=env, capture_output=True, text=True,
                         check=True).stdout
    commands = [shlex.split(line) for line in out.splitlines()]
    assert commands, f"part {part} runs nothing"
    for command in commands:
        assert command[:3] == ["python3", "-m", "pytest"], command
        args = [a for a in command[3:] if not a.startswith("--junitxml=")
                and a != "--benchmark-only"]
        files = [a for a in args if a.endswith(".py")]
        assert files and all((ROOT / f).is_file() for f in files), files
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args],
                              cwd=ROOT, capture_output=True, text=True)
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
        assert proc.returncode == 0 and collected and int(collected.group(1)) > 0, (
            f"{shlex.join(command)} selects nothing:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")


def test_core_times_the_peers_at_49_and_98_tokens():
    # One `core` call times the kernel beside torch's varlen attention (it skips on a torch
    # without it) and SDPA per segment, at segments of 98 (r0.5) and 49 (k0.5) tokens.
    env = {**os.environ, "DRY_RUN": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "core"], env=env, capture_output=True, text=True,
                         check=True).stdout
    command = next(shlex.split(line) for line in out.splitlines() if "bench_attention" in line)
    args = [a for a in command[3:] if a != "--benchmark-only"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args],
                          cwd=ROOT, capture_output=True, text=True)
    ids = proc.stdout
    for shape in ("vitb-224-r0.5", "vitb-224-k0.5"):
        for provider, images in (("torch_varlen_attn", ""), ("SDPA_per_segment", "-b32"),
                                 ("spcl_fast_triton_packed", ""),
                                 ("spcl_fast_triton_packed", "-b32")):
            for pass_ in ("fwd", "bwd"):
                case = f"[cuda-{shape}{images}-{pass_}-{provider}]"
                assert case in ids, f"{case} is not in core's attention step:\n{ids[-1500:]}"


def test_summary_puts_the_kernel_beside_its_peers_and_its_bound(tmp_path):
    # A made-up attention result file: the summary's ratios are the peers' time over the
    # kernel's and the kernel's time over the cost model's H100 bound for that shape and pass.
    cost = json.loads((ROOT / "benchmarks" / "results" / "cost-model.json").read_text())
    bound_ms = next(r["bounds"]["H100"]["bound_s"] * 1e3 for r in cost["rows"]
                    if (r["op"], r["design"], r["layout"], r["size"])
                    == ("attention backward", "qkv buffer", "packed", 98))
    group = {"group": "vitb-224-r0.5 bfloat16 bwd", "shape": "vitb-224-r0.5", "mode": "bwd",
             "tflops": 1.0}
    rows = [{**group, "provider": "spcl_fast triton packed", "median_ms": 2 * bound_ms},
            {**group, "provider": "torch varlen_attn", "median_ms": 3 * bound_ms}]
    (tmp_path / "attention-gpu.json").write_text(json.dumps(rows))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"),
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "spcl_fast triton packed" in x)
    assert line.split("|")[4:8] == [" 1.50 ", " - ", " - ", " 2.00 "], line
