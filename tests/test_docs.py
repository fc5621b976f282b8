"""Every docstring example in the package runs (docs/architecture.md §3: docstrings carry runnable
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


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists packages explicitly (kernels/ is mapped in): a new subpackage must be
    added there, or an installed (non-editable) spcl_fast lacks it."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(spcl_fast.__file__).parent
    if not (root.parent / "pyproject.toml").exists():
        pytest.skip("spcl_fast is not imported from a source checkout")
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {"spcl_fast." + ".".join(p.parent.relative_to(root).parts)
             for p in root.rglob("__init__.py")} | {"spcl_fast.kernels"}
    found = {name.rstrip(".") for name in found}
    assert found == listed


def _markdown_files():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return root, [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _anchors(path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    import re

    heads = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_doc_link_exists():
    """Every relative link and picture of README.md and docs/*.md names a file of the
    repository (and a heading of it, for ``#anchor`` links); README indexes every doc."""
    import re

    root, docs = _markdown_files()
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken
    readme = (root / "README.md").read_text()
    assert all(f"](docs/{d.name})" in readme for d in docs[1:]), "a doc missing from README"


def test_cited_architecture_sections_exist():
    """Code and tests cite "architecture.md §N": every such section exists."""
    import re

    root, _ = _markdown_files()
    sections = set(re.findall(r"^## (\d+)\. ", (root / "docs" / "architecture.md").read_text(),
                              re.M))
    cited, outline = {}, []
    for folder in ("spcl_fast", "kernels", "tests", "benchmarks", "studies", "devtools"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for n in re.findall(r"architecture\.md §(\d+)", text):
                cited.setdefault(n, []).append(path.name)
            if "DESIGN" + ".md" in text:  # the outline architecture.md replaced, not in the repo
                outline.append(path.name)
    assert cited and not {n: where for n, where in cited.items() if n not in sections}
    assert not outline, f"cite docs/architecture.md, not the old outline: {outline}"


def test_readme_demo_lines_are_the_saved_run():
    """The README's demo output is the saved run's (studies/results/demo-nih.json), printed by
    the code that prints it, so no number there is typed by hand."""
    import json

    from spcl_fast.eval.patient_probe import format_patient_probe

    root, _ = _markdown_files()
    saved = json.loads((root / "studies" / "results" / "demo-nih.json").read_text())
    printed = format_patient_probe(saved["summary"]["patient_probe"])
    assert printed.splitlines() == saved["printed"]
    assert f"```text\n{printed}\n```" in (root / "README.md").read_text()
