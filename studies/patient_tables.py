"""The tables of ``docs/patient-eval.md``, made from ``studies/results/patient-screen.json``
(written by ``python -m studies.patient_screen``)::

    python -m studies.patient_tables            # rewrite the generated tables
    python -m studies.patient_tables --check    # exit 1 naming each table that differs

Each generated table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->``; the
prose around them quotes no number (``tests/test_patient_screen.py`` runs the check).
Every cell is an AUROC (or a difference) with its 95 % cluster-bootstrap interval over the
test patients.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from spcl_fast.eval.patient import fmt_interval

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results" / "patient-screen.json"
DOC = ROOT / "docs" / "patient-eval.md"
BLOCK = re.compile(r"<!-- table: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end table -->\n",
                   re.S)
NAMES = {"raw_pixels": "raw pixels", "init": "init (same ViT, random weights)"}
READOUTS = {"primary/linear": "linear, mean tokens", "primary/linear_rich": "linear, rich",
            "primary/knn": "kNN k=20 cosine"}


def _rows(tables: dict) -> list[str]:
    rows = list(tables["primary/linear"]["auroc"])
    return [r for r in rows if r not in NAMES] + [r for r in NAMES if r in rows]


def _grid(results: dict, keys: dict[str, str], what: str = "auroc") -> str:
    """Rows x ``keys`` (column titles) of ``what`` (``auroc``, or a difference's right-hand
    name)."""
    tables = results["tables"]
    keys = {k: v for k, v in keys.items() if k in tables}
    if not keys:
        return "(not measured in this screen)\n"
    lines = ["| row | " + " | ".join(keys.values()) + " |",
             "|---|" + "---:|" * len(keys)]
    for row in _rows(tables):
        cells = []
        for key in keys:
            if what == "auroc":
                entry = tables[key]["auroc"].get(row)
                cells.append(fmt_interval(entry) if entry else "—")
            else:
                entry = tables[key]["difference"].get(f"{row} - {what}")
                cells.append(fmt_interval(entry, signed=True) if entry else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(not measured in this screen)\n"


def _prefixed(results: dict, prefix: str) -> dict[str, str]:
    return {k: k[len(prefix):] for k in results["tables"] if k.startswith(prefix)}


def _runs(results: dict) -> str:
    lines = ["| row | steps | training seconds | final loss |", "|---|---:|---:|---:|"]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | {run['steps']} | {run['train_seconds']:.0f} | "
                     f"{run['final_loss']:.3f} |")
    inst = results["instrument"]
    lines.append(f"\n{inst['test_films']} test films of {inst['test_patients']} patients; "
                 f"probes trained on {inst['train_films']} films of {inst['train_patients']} "
                 f"patients; {inst['resamples']} patient resamples.")
    return "\n".join(lines) + "\n"


TABLES = {
    "runs": _runs,
    "primary": lambda r: _grid(r, READOUTS),
    "minus-raw": lambda r: _grid(r, READOUTS, "raw_pixels"),
    "minus-init": lambda r: _grid(r, READOUTS, "init"),
    "minus-reference": lambda r: _grid(r, READOUTS, r.get("reference", "init")),
    "fractions": lambda r: _grid(r, {k: f"{float(v):.0%}" for k, v in
                                     _prefixed(r, "fraction/").items()}
                                 | {"primary/linear": "100%"}),
    "secondary": lambda r: _grid(r, _prefixed(r, "secondary/")),
    "shortcuts": lambda r: _grid(r, _prefixed(r, "shortcut/")),
}


def render(text: str, results: dict | None = None) -> tuple[str, list[str]]:
    """``text`` with every generated table remade, and the names of those that changed."""
    results = results or json.loads(RESULTS.read_text())
    changed = []

    def remake(m):
        name = m["name"]
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        body = TABLES[name](results)
        if body != m["body"]:
            changed.append(name)
        return f"<!-- table: {name} -->\n{body}<!-- end table -->\n"

    return BLOCK.sub(remake, text), changed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.patient_tables")
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = DOC.read_text()
    new, changed = render(text)
    if args.check:
        if changed:
            raise SystemExit(f"error: {DOC} tables differ from {RESULTS}: {', '.join(changed)}")
        return
    DOC.write_text(new)
    print(f"{DOC}: {'rewrote ' + ', '.join(changed) if changed else 'up to date'}")


if __name__ == "__main__":
    main()
