"""Every command in a ```bash block of README.md and docs/*.md runs as printed (issue 38), and
so does every ```python block (those importing timm where timm imports).

The blocks run in document order (README first, then docs/ by name) in one scratch folder, so
``runs/demo`` made by one block is there for the next. What the test changes, and nothing else:

- **Paths.** ``/data/...``, ``/archive/...`` and ``~/`` point into the scratch folder, where
  tiny datasets in the release layouts are written first (``devtools.fixtures``): NIH
  ChestX-ray14 at ``/data/nih``, SIIM at ``/data/siim``, CheXpert at ``/data/chexpert``, a
  tree of PNGs at ``/archive/by-mrn``. ``../shared`` is the folder beside the repository.
- **Sizes.** :data:`TINY` appends flags to each program (the last value of a flag wins): two
  training steps of a one-block encoder, a few images, one thread. Image sizes are never
  changed, so a cache built at one size and trained at another still fails here.
- **Skips** (:data:`SKIP`), each with its reason: installing packages (``pip``), the test
  suite itself, the benchmark suites, commands that need GPUs (``torchrun``,
  ``gpu_check.sh``), the generators of committed results (their own tests check them), and
  commands that read ``../shared`` when it is absent.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_TRAIN = ("--steps 2 --batch-size 8 --num-images 16 --embed-dim 32 --depth 1 --num-heads 2 "
          "--warmup-steps 1 --probe no --threads 1 --num-workers 0 --decoder-dim 32 "
          "--decoder-depth 1 --decoder-heads 2 --dino-out-dim 64")
_EVAL = "--max-images 16 --batch-size 8 --num-workers 0"
# program (the command's first words) -> flags appended at the end
TINY = {
    "python -m spcl_fast.train": _TRAIN,
    "python -m spcl_fast.eval linear-probe": f"{_EVAL} --probe-steps 5",
    "python -m spcl_fast.eval finetune": f"{_EVAL} --epochs 1",
    "python -m spcl_fast.eval segment": f"{_EVAL} --epochs 1",
    "python -m spcl_fast.data.prepare": "--workers 1",
    "python -m studies": "--preset smoke --steps 2",
}
SKIP = {
    "pip install": "installs packages (CI's set-up step runs it)",
    "python -m pytest": "the test suite itself",
    "pytest benchmarks/": "the benchmark suites (run on their own)",
    "torchrun": "needs several GPUs",
    "bash benchmarks/gpu_check.sh": "needs a GPU",
    # they rewrite committed results and tables; tests/test_aot.py and test_cost_model.py
    # check that those are what the code gives
    "python -m spcl_fast.kernels.aot": "compiles every kernel for two GPU targets (minutes)",
    "python -m spcl_fast.kernels.cost": "rewrites the committed cost model and its tables",
}


def commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command of every ```bash block: continuation lines
    joined, comments and blank lines dropped, ``a && b`` split into its commands."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            first = text[:block.start()].count("\n") + 2
            joined = re.sub(r"\\\n\s*", " ", block[1])
            for offset, line in enumerate(joined.splitlines()):
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    for part in line.split(" && "):
                        found.append((f"{doc.relative_to(ROOT)}:{first + offset}", part.strip()))
    return found


def _reason_to_skip(command: str) -> str | None:
    for prefix, reason in SKIP.items():
        if command.startswith(prefix):
            return reason
    if "../shared" in command and not (ROOT.parent / "shared").is_dir():
        return "reads ../shared, which is absent"
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The scratch folder, with the tiny datasets the commands' paths point at."""
    from devtools.fixtures import make_chestxray14, make_chexpert, make_siim, phantoms

    tmp = tmp_path_factory.mktemp("readme")
    make_chestxray14(tmp / "data" / "nih", n=36, size=32)
    make_siim(tmp / "data" / "siim", n=12, size=32)
    make_chexpert(tmp / "data" / "chexpert", size=32)
    from PIL import Image

    for i, image in enumerate(phantoms(12, 32)):
        folder = tmp / "archive" / "by-mrn" / f"MRN{i // 3:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"film{i}.png")
    (tmp / "home").mkdir()
    return tmp


def localised(command: str, tmp: Path) -> list[str]:
    """The command's words with its paths moved into ``tmp`` and its tiny-size flags."""
    command = (command.replace(" /data/", f" {tmp}/data/").replace(",/data/", f",{tmp}/data/")
               .replace(" /archive/", f" {tmp}/archive/").replace(" ~/", f" {tmp}/home/")
               .replace("../shared", str(ROOT.parent / "shared")))
    for program, flags in TINY.items():
        if command.startswith(program + " ") or command == program:
            command = f"{command} {flags}"
            break
    words = shlex.split(command)
    return [sys.executable if w == "python" else w for w in words]


def test_the_docs_have_commands():
    cmds = commands()
    assert any(c.startswith("python -m spcl_fast.train") for _, c in cmds)
    assert all(c.startswith(("python ", "pip ", "pytest ", "torchrun ", "bash "))
               for _, c in cmds), [c for _, c in cmds]


@pytest.mark.parametrize("where, command", commands(), ids=[w for w, _ in commands()])
def test_command_runs_as_printed(where, command, workspace):
    reason = _reason_to_skip(command)
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(localised(command, workspace), cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"{where}: {command}\nexit {done.returncode}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def python_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            found.append((f"{doc.relative_to(ROOT)}:{text[:block.start()].count(chr(10)) + 2}",
                          block[1]))
    return found


@pytest.mark.parametrize("where, code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_block_runs_as_printed(where, code, workspace):
    """In the commands' scratch folder, after them. A block that loads ``export/`` (what the
    README's export command writes) gets one made first when the commands did not run (the timm
    tier runs these blocks alone)."""
    if re.search(r"^import timm|^from timm", code, re.M):
        pytest.importorskip("timm", reason="the block needs timm, which does not import here")
    if "export/" in code and not (workspace / "export" / "config.json").exists():
        for command in ("python -m spcl_fast.train --preset smoke --out runs/export-source",
                        "python -m spcl_fast.export --checkpoint runs/export-source --out export"):
            subprocess.run(localised(command, workspace), cwd=workspace, check=True,
                           capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", code], cwd=workspace, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{where}\n{code}\n{done.stderr[-3000:]}"
