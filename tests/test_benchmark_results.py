"""Benchmarks write their results to a folder the user names, never over the committed
reference results unless asked (issue 38, item 8)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "benchmarks" / "results" / "flops-analytic.json"


def test_a_benchmark_session_writes_where_it_is_told(tmp_path):
    before = REFERENCE.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_flops.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "vit_small", "--results-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out" / "flops-analytic.json").exists()
    assert REFERENCE.read_bytes() == before  # the committed results are left as they were
