"""Prints each suite's table with ratios to its baseline and saves the rows as JSON in the
folder ``--results-dir`` names (``$SPCL_BENCH_RESULTS``, else the git-ignored
``runs/benchmarks``; ``--results-dir benchmarks/results`` updates the committed reference
results on purpose)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--results-dir", default=None,
                     help=f"folder for the benchmark JSON and charts (default: "
                          f"${common.RESULTS_ENV}, else {common.DEFAULT_RESULTS_DIR}; "
                          f"{common.REFERENCE_DIR} holds the committed reference results)")


def pytest_configure(config):
    # before any benchmark module is imported (they read common.RESULTS_DIR at import)
    common.RESULTS_DIR = common.results_dir(config.getoption("--results-dir"))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict]) -> str:
    baselines = {}
    for row in rows:
        if row["baseline"]:
            baselines.setdefault(row["group"], row["median_ms"])
    cols = ["group", "provider", "median_ms", "tflops", "peak_memory_mb"]
    extra = [k for k in rows[0] if k.endswith("_per_s")]
    cols += extra + ["speedup_vs_baseline"]
    lines = [" | ".join(cols)]
    for row in rows:
        base = baselines.get(row["group"])
        row["speedup_vs_baseline"] = base / row["median_ms"] if base else None
        lines.append(" | ".join(_fmt(row.get(c)) for c in cols))
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if not common.ROWS:
        return
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for suite, rows in common.ROWS.items():
        print(f"\n== {suite} ==\n{_table(rows)}")
        slug = common.device_slug(rows[0]["device"]) if rows else "unknown"
        path = common.RESULTS_DIR / f"{suite}-{slug}.json"
        path.write_text(json.dumps(rows, indent=2))
        print(f"saved {path}")
