"""Test tiers (DESIGN.md §5): CPU always; ``interpret`` runs the Triton kernels on CPU tensors
through the Triton interpreter when there is no GPU; ``gpu`` needs CUDA.

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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_triton = pytest.mark.skip(reason="needs triton (pip install 'spcl-fast[triton]')")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if ("interpret" in item.keywords or "gpu" in item.keywords) and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
