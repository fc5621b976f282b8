"""The results tables of ``docs/study.md``, made from the saved results in ``studies/results``::

    python -m studies.tables            # rewrite the generated tables of docs/study.md
    python -m studies.tables --check    # exit 1 naming each table that differs from its JSON

Each generated table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->`` lines;
the text around them is written by hand and quotes no number (``tests/test_study.py`` runs the
check, so a table cannot drift from the measurements).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .run import markdown, metadata_records, summarise

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
DOC = ROOT / "docs" / "study.md"
SETS = ["synthetic", "chestxray14"]
# The 600-step study: the merged runs of issue 17 and its two follow-ups (the first file
# holding a (set, row, seed) is the one read).
LONG = ("issue17.json", "issue17-similar-batches.json", "issue17-intra-variants.json")


def _records(files: tuple[str, ...]) -> list[dict]:
    seen, records = set(), []
    for name in files:
        for r in json.loads((RESULTS / name).read_text())["runs"]:
            key = (r["set"], r["row"], r.get("seed"))
            if key not in seen:
                seen.add(key)
                records.append(r)
    return records


def _reference(row: str) -> int:
    return 2 if row.startswith("raw pixels") else 1 if row.startswith("init") else 0


def _ordered(table: list[dict], rows: list[str]) -> list[dict]:
    rank = {row: i for i, row in enumerate(rows)}
    return sorted(table, key=lambda t: rank[t["row"]])


def _long_rows(records: list[dict]) -> list[str]:
    """Trained rows by their real-sample mean AUROC (best first), then the init and raw-pixel
    references."""
    table = summarise(records)
    real = {t["row"]: t["mean_auroc"] for t in table if t["set"] == "chestxray14"}
    rows = list(dict.fromkeys(t["row"] for t in table))
    return sorted(rows, key=lambda r: (_reference(r), -real.get(r, 0.0)))


def long_table() -> str:
    records = _records(LONG)
    return markdown(_ordered(summarise(records), _long_rows(records)), SETS)


def long_metadata_table() -> str:
    records = _records(LONG)
    table = summarise(metadata_records(records))
    return markdown(_ordered(table, _long_rows(records)), ["male", "PA view"], timing=False)


def long_bootstrap_table() -> str:
    """The saved paired bootstraps of the trained rows (against raw pixels, and the demo recipe
    against ``k05_intra``), one line each."""
    lines: list[str] = []
    for name in LONG[:2]:
        saved = json.loads((RESULTS / name).read_text())["compare_markdown"]
        for text in [saved] if isinstance(saved, str) else saved:
            lines += text.splitlines()
    head, body = lines[:2], [x for x in lines if x.startswith("| ") and x not in lines[:2]]
    cells = [x[2:].split(" | ") for x in dict.fromkeys(body)]
    rank = {row: i for i, row in enumerate(_long_rows(_records(LONG)))}
    trained = sorted((c for c in cells if _reference(c[0]) == 0),
                     key=lambda c: (c[1] != "chestxray14", rank[c[0]]))
    return "\n".join(head + ["| " + " | ".join(c) for c in trained])


def study_table(name: str) -> str:
    """One study's table, over the sets it ran (rows in the order they were run)."""
    sets = json.loads((RESULTS / name).read_text())["sets"]
    return markdown(summarise(_records((name,))), sets)


TABLES = {
    "600 steps": long_table,
    "600 steps, sex and view": long_metadata_table,
    "600 steps, paired bootstrap": long_bootstrap_table,
    "180 steps": lambda: study_table("study.json"),
    "180 steps, ablations": lambda: study_table("ablations.json"),
    "180 steps, learned positions": lambda: study_table("learned_pos.json"),
    "540 steps": lambda: study_table("budget-540.json"),
    "1080 steps": lambda: study_table("budget-1080.json"),
}
BLOCK = re.compile(r"(<!-- table: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- end table -->)",
                   re.S)


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated table made anew, and the names of those that changed."""
    changed, unknown = [], []

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            unknown.append(name)
            return m[0]
        body = TABLES[name]() + "\n"
        if body != m["body"]:
            changed.append(name)
        return m[1] + body + m[4]

    out = BLOCK.sub(fill, text)
    if unknown:
        raise ValueError(f"{DOC}: unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    return out, changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.tables",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a table differs from its saved results")
    args = p.parse_args(argv)
    text, changed = render(DOC.read_text())
    if args.check:
        for name in changed:
            print(f"error: docs/study.md's table {name!r} is not what its JSON gives "
                  f"(run python -m studies.tables)")
        return 1 if changed else 0
    DOC.write_text(text)
    print(f"rewrote {len(changed)} table(s) of {DOC}" if changed else f"{DOC} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
