"""The timm tier (``slow``; CI runs it, see .ci/run): the tests that need real timm, run by a
Python that has it.

timm needs torchvision, which does not import beside the CPU torch wheel this suite installs.
``torch==2.14.1`` with ``torchvision==0.29.1`` does (a build of about 5.5 GB that runs on the
CPU), so the tier builds a venv with those and timm once, kept and reused under
``~/.cache/spcl_fast/venvs`` (tests/venv_tier.py), installs this checkout into it, and runs the
``real_timm`` tests of tests/test_adapter.py (``PartitionAdapter`` on timm ViTs against a dense
per-subset forward, values and gradients), tests/test_export.py (an export loaded back by
``timm.create_model(..., checkpoint_path=...)``) and the README's python blocks (one adapts a
timm ViT) there. The timm ones skip in the suite's own run. If the venv cannot be built the tier
skips and says why.
"""

from __future__ import annotations

import subprocess
import time
from xml.etree import ElementTree

import pytest
from venv_tier import ROOT, build_seconds, tier_venv

pytestmark = pytest.mark.slow

REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm"]
TIMM_TESTS = ["tests/test_adapter.py", "tests/test_export.py", "tests/test_readme_commands.py"]
SELECT = "real_timm or python_block"  # the README's python blocks: one builds a timm ViT


def test_real_timm_tests_pass_in_the_timm_venv(tmp_path):
    report = tmp_path / "junit.xml"
    with tier_venv("timm", REQUIREMENTS, checkout="test", min_free_gb=8) as python:
        start = time.perf_counter()
        proc = subprocess.run(
            [python, "-m", "pytest", *TIMM_TESTS, "-k", SELECT, "-p", "no:cacheprovider",
             "-q", f"--junitxml={report}"],
            cwd=ROOT, capture_output=True, text=True, timeout=1200,
        )
        versions = subprocess.run(
            [python, "-c", "import timm, torch; print(f'torch {torch.__version__}, "
             "timm {timm.__version__}')"], capture_output=True, text=True).stdout.strip()
    print(f"timm tier ({versions}): venv built in {build_seconds(python)} s, "
          f"tests ran in {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "skipped", "failures", "errors")}
    # 2 adapter models, the export with and without a class token, the README's blocks; none
    # may skip (a skip here is timm not importing)
    assert counts["tests"] >= 5 and counts["skipped"] == counts["failures"] == 0, counts
