"""Test tiers (docs/architecture.md §5): CPU always; ``interpret`` runs the Triton kernels on
CPU tensors through the Triton interpreter when there is no GPU; ``aot`` compiles them for GPU
targets without a GPU (tests/test_aot.py); ``gpu`` needs CUDA.

The interpreter must be switched on before anything imports triton, hence at conftest import.
"""

import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA and HAS_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests (hypothesis): a bounded profile by default so CI stays fast; `--hypothesis-profile
# thorough` searches longer. print_blob makes every failure print the @reproduce_failure line.
settings.register_profile(
    "ci", max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_triton = pytest.mark.skip(reason="needs triton (pip install 'spcl-fast[triton]')")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if not HAS_TRITON and any(m in item.keywords for m in ("interpret", "aot", "gpu")):
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
