"""Training GFLOPs per image of plain S-PCL (and its variants), the default recipe the presets
train, MAE and DINO (suite ``flops``).

Nothing heavy runs here: every count is analytic (``spcl_fast.run.flops_table``: each method
built on the meta device and counted by its own ``train_flops``, the formulas that
``tests/test_flops.py`` checks against ``FlopCounterMode`` on real training steps). The timed
call is the table computation itself, so the suite costs seconds.

Per image, 224 px, 1-channel ViT-S/16, ViT-B/16, ViT-L/16; forward + backward of everything
trained, forward of teachers, the loss's matmuls (FLOP = 2 x MAC). The table prints at the end of
the module and is saved as ``benchmarks/results/flops-analytic.json`` (no device: the count is
the same everywhere); ``bench_step.py`` plots it next to measured images/s.
"""

from __future__ import annotations

import json

import pytest
from common import RESULTS_DIR, env_info

from spcl_fast.methods import train_flops as flops
from spcl_fast.run.flops_table import recipe_variant, table_variants

RECORDS: list[dict] = []
JSON_PATH = RESULTS_DIR / "flops-analytic.json"


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the whole table once the module's cases ran, and save it."""
    yield
    if not RECORDS:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps([{**r, **env_info()} for r in RECORDS], indent=2))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        print(f"\n\n== flops (training GFLOPs per image, 224 px; GFLOPs (GMACs) x ratio to "
              f"S-PCL 50/50) ==\n{flops.format_table(RECORDS)}\nsaved {JSON_PATH}")


@pytest.mark.parametrize("model", flops.TABLE_MODELS)
def test_training_flops_table(benchmark, model):
    records = benchmark.pedantic(flops.flops_table, args=([model], 224, table_variants()),
                                 rounds=1, iterations=1)
    RECORDS.extend(records)
    by_variant = {r["variant"]: r for r in records}
    benchmark.extra_info.update({r["variant"]: r["gflops"] for r in records})
    # The claim the table exists for: S-PCL's cost is one encoder pass over the image's tokens.
    assert by_variant["50/50 split"]["vs_spcl"] == 1.0
    # what users train: keep 0.5's tokens plus the intra-image predictor
    recipe = by_variant[recipe_variant()[1]]["gflops"]
    assert by_variant["keep 0.5 (two 25% subsets)"]["gflops"] < recipe
    assert all(r["gflops"] > 0 for r in records)
