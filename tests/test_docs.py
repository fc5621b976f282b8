"""Every docstring example in the package runs (DESIGN.md §3: docstrings carry runnable
examples), and every public function of the top-level API is documented."""

import doctest
import importlib
import pkgutil

import pytest

import spcl_fast

SKIP = {"spcl_fast.kernels"}  # Triton launchers: exercised by the kernel tests


def _modules():
    names = []
    for info in pkgutil.walk_packages(spcl_fast.__path__, "spcl_fast."):
        if info.name.endswith("__main__") or any(info.name.startswith(s) for s in SKIP):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


@pytest.mark.parametrize("name", spcl_fast.__all__)
def test_public_api_is_documented(name):
    obj = getattr(spcl_fast, name)
    if name != "__version__":
        assert obj.__doc__ and len(obj.__doc__) > 80, f"{name} needs a shape-contract docstring"
