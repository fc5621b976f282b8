"""The ``aot`` tier: every kernel config the launchers can choose, compiled for sm_80 and sm_90
on this (GPU-less) machine by ``python -m spcl_fast.kernels.aot --quick`` (see its docstring).

It runs in a subprocess because the interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py
sets without CUDA) replaces Triton's compiler at decoration time. The saved measurements
(``benchmarks/results/aot-<triton version>.json``, the full matrix) must agree with what this
Triton compiles, and the table in docs/kernels.md must be the one those measurements give.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
from venv_tier import tier_venv

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Kernel names of both ops (attention and InfoNCE each have a _fwd_kernel).
DOT_KERNELS = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_onepass_kernel",
               "_bwd_rows_kernel", "_bwd_cols_kernel", "_gemm_kernel"}
ALL_KERNELS = DOT_KERNELS | {"_bwd_preprocess_kernel", "_inv_norm_kernel", "_col_lse_kernel",
                             "_normalize_bwd_kernel"}

pytestmark = pytest.mark.aot


def _python_with_triton(version: str) -> str:
    """A Python with ``triton==<version>.*`` (the GPU image's Triton) over this environment's
    packages: a cached tier venv (tests/venv_tier.py), correct inside a virtualenv too;
    ``SPCL_FAST_TRITON_<major>_<minor>_PYTHON`` names a ready one. Skips if pip cannot install
    it (no index reachable)."""
    with tier_venv(f"triton-{version}", [f"triton=={version}.*"], inherit=True) as python:
        return python


@pytest.fixture(scope="module", params=["installed", pytest.param("3.6", marks=pytest.mark.slow)])
def compiled(request, tmp_path_factory):
    """Rows of the CI subset, compiled from a cold cache with both cores, by the installed
    Triton or (slow tier) the GPU image's Triton 3.6."""
    root = tmp_path_factory.mktemp("aot")
    python = (sys.executable if request.param == "installed"
              else _python_with_triton(request.param))
    out = root / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Its own process group: on a timeout the compile workers go too, not only the parent.
    proc = subprocess.Popen(
        [python, "-m", "spcl_fast.kernels.aot", "--quick", "--jobs", "2", "--json", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the aot subset did not compile within 900 s")
    assert proc.returncode == 0, stderr[-3000:]
    rows = json.loads(out.read_text())
    if request.param != "installed":
        assert rows["triton"].startswith(request.param), rows["triton"]
    return rows


def _aot():
    # Imported for its pure helpers (key, table, cases): no kernel is compiled here.
    from spcl_fast.kernels import aot

    return aot


def test_every_config_compiles_for_both_targets(compiled):
    rows = compiled["rows"]
    aot = _aot()
    assert {r["kernel"] for r in rows} == ALL_KERNELS
    by_target = {t: {aot.key({**r, "target": None}) for r in rows if r["target"] == t}
                 for t in aot.TARGETS}
    assert by_target["sm_80"] == by_target["sm_90"]
    # Every case of the subset compiled what it launches (a forward and a backward at least).
    for case in aot.cases(quick=True):
        kernels = {r["kernel"] for r in rows
                   if (r["op"], r["dtype"], r["size"], r["variant"], r["tokens"])
                   == astuple(case)}
        assert len(kernels) >= 2, (case, kernels)


def test_tensor_cores_in_every_dot_kernel(compiled):
    # sm_90: wgmma where Triton emits it (blocks of 64+ rows per warp group), mma otherwise.
    for row in compiled["rows"]:
        if row["kernel"] in DOT_KERNELS:
            assert row["mma"] + row["wgmma"] > 0, f"no tensor-core instruction in {row}"
            if row["target"] == "sm_80":
                assert row["wgmma"] == 0, row
    sm90 = [r for r in compiled["rows"] if r["target"] == "sm_90" and r["kernel"] in DOT_KERNELS]
    assert any(r["wgmma"] for r in sm90), "Triton emitted no wgmma for sm_90 at all"


def _power_of_two_head_dim(row) -> bool:
    size = row["size"]
    return row["op"] != "partition_attention" or size & (size - 1) == 0


def test_no_config_spills(compiled):
    # No config of any dtype spills at power-of-two head dims. The exception docs/kernels.md
    # names: attention at head dims that are not a power of two (padded to the next one, the
    # masked columns spill).
    spilling = [r for r in compiled["rows"] if (r["spill_stores"] or r["spill_loads"])
                and _power_of_two_head_dim(r)]
    assert not spilling, "\n".join(map(str, spilling))
    assert any(not _power_of_two_head_dim(r) for r in compiled["rows"])  # still compiled


def test_shared_memory_within_the_targets_limit(compiled):
    for row in compiled["rows"]:
        assert row["shared_bytes"] <= row["shared_limit"], row


def test_saved_measurements_match_this_triton(compiled):
    saved = RESULTS / f"aot-{compiled['triton']}.json"
    if not saved.exists():
        pytest.skip(f"no saved measurements for triton {compiled['triton']} ({saved.name})")
    # By compile: the full matrix compiles a kernel shared by two cases once, under one of them.
    want = {r["compile_hash"]: r for r in json.loads(saved.read_text())["rows"]}
    for row in compiled["rows"]:
        assert row["compile_hash"] in want, f"{row} is not in {saved.name}: regenerate it"
        for field in _aot().MEASURED:
            assert row[field] == want[row["compile_hash"]][field], (field, row)


def test_docs_table_is_the_saved_one():
    # No compile: docs/kernels.md names its JSON file, whose rows give the table it must show
    # (python -m spcl_fast.kernels.aot --from-json FILE --markdown docs/kernels.md).
    aot = _aot()
    doc = (ROOT / "docs" / "kernels.md").read_text()
    match = re.search(r"benchmarks/results/(aot-[\w.+-]+\.json)", doc)
    assert match, "docs/kernels.md does not name its aot-<version>.json"
    saved = json.loads((RESULTS / match.group(1)).read_text())
    assert aot.between_markers(doc, aot.MARKERS) == aot.summary(saved)


def test_every_head_block_keeps_a_candidate():
    # The pruning never leaves a kernel without a config, for any dtype and head block.
    from spcl_fast.kernels import partition_attention as pa

    for table in (pa._FWD, pa._DKDV, pa._DQ):
        for fp32 in (False, True):
            for block_d in (16, 32, 64, 128):
                assert any(block_d in row[4 + fp32] for row in table), (table, fp32, block_d)
