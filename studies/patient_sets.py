"""The default recipe against raw pixels, init and the other methods on the three sets of
issue 37 (the README's summary and docs/patient-eval.md's)::

    python -m studies.patient_sets            # rewrite the "<!-- sets: table -->" blocks
    python -m studies.patient_sets --check    # exit 1 if a block differs from the results

The sets are the two NIH samples, each read on its own patients from the patient-grouped folds
(``studies/results/patient-folds-nih-demo.json``, ``by_source``), and the pediatric films'
fixed split (``studies/results/patient-screen-kermany-seed0.json``). Every cell is the linear
probe on mean-pooled tokens, primary endpoint: an AUROC or a paired difference with its 95 %
cluster-bootstrap interval over that set's test patients.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from spcl_fast.eval.patient import fmt_interval

ROOT = Path(__file__).resolve().parent.parent
FOLDS = ROOT / "studies" / "results" / "patient-folds-nih-demo.json"
PEDIATRIC = ROOT / "studies" / "results" / "patient-screen-kermany-seed0.json"
DOCS = (ROOT / "README.md", ROOT / "docs" / "patient-eval.md")
OTHERS = ("simclr", "mae", "dino", "k05_intra")  # each read as "<other> - default"
BLOCK = re.compile(r"(<!-- sets: table -->\n)(.*?)(\n<!-- end sets -->)", re.S)


def sets(folds: dict, pediatric: dict) -> tuple[str, dict[str, dict]]:
    """The reference recipe and ``{set label: {"patients", "endpoint", "auroc",
    "difference"}}`` of the three sets."""
    reference = folds["reference"]
    if pediatric.get("reference") != reference:
        raise ValueError(f"the folds' reference {reference!r} is not the pediatric screen's "
                         f"{pediatric.get('reference')!r}")
    out = {}
    for source, part in folds["by_source"].items():
        out[f"NIH {source}, {folds['instrument']['folds']} folds"] = {
            "patients": part["patients"], "endpoint": folds["instrument"]["endpoint"],
            "auroc": part["auroc"], "difference": part["difference"]}
    inst, primary = pediatric["instrument"], pediatric["tables"]["primary/linear"]
    out["pediatric, one split"] = {"patients": inst["test_patients"],
                                   "endpoint": inst["endpoint"], "auroc": primary["auroc"],
                                   "difference": primary["difference"]}
    return reference, out


def markdown(folds: dict, pediatric: dict) -> str:
    reference, table = sets(folds, pediatric)
    others = [o for o in OTHERS
              if any(f"{o} - {reference}" in s["difference"] for s in table.values())]
    lines = [f"| set | test patients | endpoint | {reference} | minus raw pixels | minus init | "
             + " | ".join(f"{o} minus {reference}" for o in others) + " |",
             "|---|---:|---|---:|---:|---:|" + "---:|" * len(others)]
    both, above, below = [], {}, {}
    for name, s in table.items():
        diff = s["difference"]

        def cell(pair, diff=diff):
            return fmt_interval(diff[pair], signed=True) if pair in diff else "—"

        lines.append(f"| {name} | {s['patients']} | {s['endpoint']} | "
                     f"{fmt_interval(s['auroc'][reference])} | "
                     f"{cell(f'{reference} - raw_pixels')} | {cell(f'{reference} - init')} | "
                     + " | ".join(cell(f"{o} - {reference}") for o in others) + " |")
        if all(diff[f"{reference} - {b}"]["low"] > 0 for b in ("raw_pixels", "init")):
            both.append(name)
        for o in others:
            entry = diff.get(f"{o} - {reference}")
            if entry and entry["low"] > 0:
                above.setdefault(o, []).append(name)
            if entry and entry["high"] < 0:
                below.setdefault(o, []).append(name)

    def named(found):
        return "; ".join(f"{o} ({', '.join(n)})" for o, n in found.items()) or "none"

    lines += ["", f"Sets where {reference} is above both raw pixels and init (intervals "
                  f"excluding 0): {len(both)} of {len(table)}"
                  + (f" ({', '.join(both)})" if both else "") + f". Methods above it on a set: "
                  f"{named(above)}. Below it: {named(below)}."]
    return "\n".join(lines)


def doc_with_table(doc: str, folds: dict, pediatric: dict) -> str:
    if not BLOCK.search(doc):
        raise SystemExit("error: a document of DOCS has no '<!-- sets: table -->' block")
    return BLOCK.sub(lambda m: m.group(1) + markdown(folds, pediatric) + m.group(3), doc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.patient_sets",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = p.parse_args(argv)
    folds, pediatric = (json.loads(path.read_text()) for path in (FOLDS, PEDIATRIC))
    for path in DOCS:
        doc = path.read_text()
        want = doc_with_table(doc, folds, pediatric)
        if want == doc:
            continue
        if args.check:
            print(f"{path}'s sets table differs from the results: run "
                  "python -m studies.patient_sets", file=sys.stderr)
            raise SystemExit(1)
        path.write_text(want)
        print(f"rewrote {path}")


if __name__ == "__main__":
    main()
