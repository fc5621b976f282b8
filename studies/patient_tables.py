"""The tables of ``docs/patient-eval.md``, made from the screen's saved results
(``studies/results/patient-screen-<NAME>.json``, written by ``python -m studies.patient_screen``)::

    python -m studies.patient_tables            # rewrite the generated tables
    python -m studies.patient_tables --check    # exit 1 naming each table that differs
    python -m studies.patient_tables --figure   # and draw docs/patient-fractions.png (the
                                                # NIH folds' and the pediatric screen's shares)

Each generated table sits between ``<!-- table: NAME/TABLE -->`` and ``<!-- end table -->``:
``NAME`` picks the results file (``nih-demo-seed0`` reads ``patient-screen-nih-demo-seed0.json``)
and ``TABLE`` one of :data:`TABLES`; for the tables of :data:`SEED_TABLES` ``NAME`` is a set
and every seed's file of it is read. The prose around them quotes no number
(``tests/test_patient_screen.py`` runs the check). Every cell is an AUROC (or a difference)
with its 95 % cluster-bootstrap interval over the test patients.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from spcl_fast.eval.patient import fmt_interval

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
DOC = ROOT / "docs" / "patient-eval.md"
BLOCK = re.compile(r"<!-- table: (?P<name>[\w.-]+)/(?P<table>[\w-]+) -->\n(?P<body>.*?)"
                   r"<!-- end table -->\n", re.S)
NAMES = {"raw_pixels": "raw pixels", "init": "init (same ViT, random weights)"}
READOUTS = {"primary/linear": "linear, mean tokens", "primary/linear_rich": "linear, rich",
            "primary/knn": "kNN k=20 cosine"}
NOT_MEASURED = "(not measured in this screen)\n"


def results_path(name: str) -> Path:
    """The results file a block names."""
    return RESULTS / f"patient-screen-{name}.json"


def _rows(tables: dict, runs: dict) -> list[str]:
    rows = list(tables["primary/linear"]["auroc"])
    order = [r for r in runs if r in rows] + [r for r in rows if r not in runs]
    return [r for r in order if r not in NAMES] + [r for r in NAMES if r in rows]


def _cell(tables: dict, key: str, row: str, what: str, spread: bool = False) -> str:
    if key not in tables:
        return "—"
    if what == "auroc":
        entry = tables[key]["auroc"].get(row)
        drawn = tables[key].get("draws", {}).get(row, []) if spread else []
        text = fmt_interval(entry) if entry else "—"
        return text + (f" (draws {min(drawn):.2f} to {max(drawn):.2f})" if drawn else "")
    entry = tables[key]["difference"].get(f"{row} - {what}")
    return fmt_interval(entry, signed=True) if entry else "—"


def _grid(results: dict, keys: dict[str, str], what: str = "auroc",
          seconds: bool = False, spread: tuple[str, ...] = ()) -> str:
    """Rows x ``keys`` (column titles) of ``what`` (``auroc``, or a difference's right-hand
    name); ``seconds``: a first column with each row's training seconds; ``spread``: keys
    whose cells also give the range of their draws' AUROCs."""
    tables, runs = results["tables"], results["runs"]
    keys = {k: v for k, v in keys.items() if k in tables}
    if not keys:
        return NOT_MEASURED
    lines = ["| row | " + ("training seconds | " if seconds else "")
             + " | ".join(keys.values()) + " |",
             "|---|" + "---:|" * (len(keys) + seconds)]
    for row in _rows(tables, runs):
        cells = [_cell(tables, key, row, what, key in spread) for key in keys]
        if any(c != "—" for c in cells):
            took = ([f"{runs[row]['train_seconds']:.0f}" if row in runs else "—"]
                    if seconds else [])
            lines.append(f"| {NAMES.get(row, row)} | " + " | ".join(took + cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else NOT_MEASURED


def _by_source(results: dict, what: str = "auroc", strata: str = "by_source") -> str:
    """Rows x (each stratum's linear probe on mean tokens, then each stratum's kNN) of
    ``what``, on each stratum's test patients apart (``strata``: ``by_source``, the NIH
    samples, or ``by_view``, the view positions)."""
    sources = results.get(strata) or {}
    if not sources:  # saved empty: the set has no such column; absent: an older screen
        return f"(no {strata[3:]} strata in this set)\n" if strata in results else NOT_MEASURED
    cols = [(s, k) for k in ("primary/linear", "primary/knn") for s in sources]
    lines = ["| row | " + " | ".join(f"{s}, {READOUTS[k]}" for s, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in _rows(results["tables"], results["runs"]):
        cells = [_cell(sources[s]["tables"], k, row, what) for s, k in cols]
        if any(c != "—" for c in cells):
            lines.append(f"| {NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    counts = "; ".join(f"{s}: {v['test_films']} test films of {v['test_patients']} patients"
                       for s, v in sources.items())
    return "\n".join(lines) + f"\n\n{counts}.\n"


def _prefixed(results: dict, prefix: str) -> dict[str, str]:
    return {k: k[len(prefix):] for k in results["tables"] if k.startswith(prefix)}


def _runs(results: dict) -> str:
    lines = ["| row | steps | seconds per step (timed) | training seconds | final loss |",
             "|---|---:|---:|---:|---:|"]
    for name, run in results["runs"].items():
        timed = run.get("seconds_per_step")
        lines.append(f"| {name} | {run['steps']} | "
                     f"{'—' if timed is None else f'{timed:.2f}'} | "
                     f"{run['train_seconds']:.0f} | {run['final_loss']:.3f} |")
    inst = results["instrument"]
    endpoint = inst.get("endpoint", "normal vs abnormal")
    lines.append(f"\nSet `{inst['set']}`, primary endpoint {endpoint}: "
                 f"{inst['test_films']} test films of {inst['test_patients']} "
                 f"patients; probes trained on {inst['train_films']} films of "
                 f"{inst['train_patients']} patients; {inst['resamples']} patient resamples.")
    return "\n".join(lines) + "\n"


def _seeds(by_seed: dict[int, dict], what: str = "auroc") -> str:
    """Rows run with more than one seed x each seed's linear probe on mean tokens (``what``:
    ``auroc``, with the row's mean training seconds first, or ``reference``: minus each
    seed's reference), then the mean +- std over the seeds that have the row."""
    seeds = sorted(by_seed)
    rows, took = {}, {}
    for seed in seeds:
        res = by_seed[seed]
        for row in _rows(res["tables"], res["runs"]):
            if row in res["runs"]:
                took.setdefault(row, []).append(res["runs"][row]["train_seconds"])
            rhs = res.get("reference", "init") if what == "reference" else what
            if what != "auroc" and row == rhs:
                continue
            rows.setdefault(row, {})[seed] = (
                res["tables"]["primary/linear"]["auroc"][row] if what == "auroc" else
                res["tables"]["primary/linear"]["difference"].get(f"{row} - {rhs}"))
    timed = what == "auroc"  # the training seconds column, once, beside the AUROCs
    lines = ["| row | " + ("training seconds (mean) | " if timed else "")
             + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std (seeds) |",
             "|---|" + "---:|" * (len(seeds) + 1 + timed)]
    for row, cells in rows.items():
        got = [e["value"] for e in cells.values() if e]
        if len(got) < 2:
            continue
        text = [fmt_interval(cells[s], signed=what != "auroc") if cells.get(s) else "—"
                for s in seeds]
        spread = statistics.stdev(got)
        if timed:
            text.insert(0, f"{statistics.fmean(took[row]):.0f}" if row in took else "—")
        lines.append(f"| {NAMES.get(row, row)} | " + " | ".join(text)
                     + f" | {statistics.fmean(got):{'+' if what != 'auroc' else ''}.3f} ± "
                       f"{spread:.3f} ({len(got)}) |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else NOT_MEASURED


def _leads(results: dict) -> str:
    """Which rows differ from the reference, raw pixels and init with an interval that
    excludes 0, per readout of the primary endpoint (pooled test patients)."""
    tables, reference = results["tables"], results.get("reference", "init")
    lines = []
    for other, label in ((reference, f"the reference (`{reference}`)"),
                         ("raw_pixels", "raw pixels"), ("init", "init")):
        for key, readout in READOUTS.items():
            diffs = {pair.partition(" - ")[0]: entry for pair, entry in
                     tables.get(key, {}).get("difference", {}).items()
                     if pair.partition(" - ")[2] == other}
            if not diffs:
                continue
            above = [f"{row} {fmt_interval(e, signed=True)}" for row, e in diffs.items()
                     if e["low"] > 0]
            below = [f"{row} {fmt_interval(e, signed=True)}" for row, e in diffs.items()
                     if e["high"] < 0]
            lines.append(f"- against {label}, {readout} ({len(diffs)} compared): above: "
                         f"{', '.join(above) or 'none'}; below: {', '.join(below) or 'none'}")
    return "\n".join(lines) + "\n" if lines else NOT_MEASURED


TABLES = {
    "runs": _runs,
    "primary": lambda r: _grid(r, READOUTS, seconds=True),
    "minus-raw": lambda r: _grid(r, READOUTS, "raw_pixels"),
    "minus-init": lambda r: _grid(r, READOUTS, "init"),
    "minus-reference": lambda r: _grid(r, READOUTS, r.get("reference", "init")),
    "leads": _leads,
    "by-source": _by_source,
    "by-source-minus-reference": lambda r: _by_source(r, r.get("reference", "init")),
    "by-source-minus-raw": lambda r: _by_source(r, "raw_pixels"),
    "by-source-minus-init": lambda r: _by_source(r, "init"),
    "by-view": lambda r: _by_source(r, strata="by_view"),
    "by-view-minus-reference": lambda r: _by_source(r, r.get("reference", "init"), "by_view"),
    "by-view-minus-init": lambda r: _by_source(r, "init", "by_view"),
    "fractions": lambda r: _grid(r, {k: f"{float(v):.0%}" for k, v in
                                     _prefixed(r, "fraction/").items()}
                                 | {"primary/linear": "100%"}),
    "secondary": lambda r: _grid(r, _prefixed(r, "secondary/")),
    "shortcuts": lambda r: _grid(r, _prefixed(r, "shortcut/"), spread=("shortcut/permuted",)),
}
# Tables over every seed's file of a set: their NAME is the set (``nih-demo/seeds`` reads
# ``patient-screen-nih-demo-seed<N>.json`` for every N saved).
SEED_TABLES = {
    "seeds": _seeds,
    "seeds-minus-reference": lambda r: _seeds(r, "reference"),
}


def render(text: str, results: dict | None = None) -> tuple[str, list[str]]:
    """``text`` with every generated table remade, and the names of those that changed.
    ``results``: ``{NAME: results}`` (default: each block's file, :func:`results_path`)."""
    loaded = dict(results or {})
    changed = []

    def remake(m):
        name, table = m["name"], m["table"]
        if table not in TABLES and table not in SEED_TABLES:
            raise ValueError(f"unknown table {table!r}; known: "
                             f"{', '.join([*TABLES, *SEED_TABLES])}")
        if table in SEED_TABLES:
            if name not in loaded:
                paths = RESULTS.glob(f"patient-screen-{name}-seed*.json")
                loaded[name] = {int(q.stem.rsplit("-seed", 1)[1]): json.loads(q.read_text())
                                for q in paths}
            if not loaded[name]:
                raise ValueError(f"table {name}/{table}: no results file "
                                 f"{results_path(name + '-seed<N>')}")
            body = SEED_TABLES[table](loaded[name])
        else:
            if name not in loaded:
                path = results_path(name)
                if not path.exists():
                    raise ValueError(f"table {name}/{table}: no results file {path}")
                loaded[name] = json.loads(path.read_text())
            body = TABLES[table](loaded[name])
        if body != m["body"]:
            changed.append(f"{name}/{table}")
        return f"<!-- table: {name}/{table} -->\n{body}<!-- end table -->\n"

    return BLOCK.sub(remake, text), changed


FIGURE = ROOT / "docs" / "patient-fractions.png"
FOLDS = RESULTS / "patient-folds-nih-demo.json"
FIGURE_SETS = ("kermany-seed0",)  # beside the NIH folds
FIGURE_ROWS = ("k05_intra", "simclr", "mae", "dino", "raw_pixels", "init")  # beside the reference


def folds_as_screen(result: dict) -> dict:
    """The fold confirmation's results (``studies.patient_folds``) in a screen's shape, for
    :func:`fraction_curves`: pooled AUROCs as the ``primary/linear`` table, each label share
    as ``fraction/<share>``."""
    inst = result["instrument"]
    tables = {f"fraction/{share}": table for share, table in result["fractions"].items()}
    tables["primary/linear"] = {"auroc": result["auroc"], "difference": result["difference"]}
    return {"tables": tables, "reference": result["reference"],
            "instrument": {"set": f"{inst['set']}, {inst['folds']} folds",
                           "endpoint": inst["endpoint"], "test_patients": inst["patients"]}}


def fraction_curves(results: dict[str, dict], path: Path = FIGURE) -> Path:
    """Label-fraction curves: for each results file of ``results`` (``{NAME: results}``) a
    panel of the primary endpoint's AUROC (linear probe on mean tokens, the mean over draws)
    against the share of training patients labelled, with 95 % patient intervals, for the
    reference and :data:`FIGURE_ROWS`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results.values(), strict=True):
        tables, reference = res["tables"], res.get("reference", "init")
        keys = {float(k[len("fraction/"):]): k for k in tables if k.startswith("fraction/")}
        keys[1.0] = "primary/linear"
        fractions = sorted(keys)
        for i, row in enumerate(r for r in (reference, *FIGURE_ROWS)
                                if r in tables["primary/linear"]["auroc"]):
            got = [tables[keys[f]]["auroc"].get(row) for f in fractions]
            xs = [f for f, e in zip(fractions, got, strict=True) if e]
            es = [e for e in got if e]
            value = [e["value"] for e in es]
            ax.errorbar(xs, value, yerr=[[v - e["low"] for v, e in zip(value, es, strict=True)],
                                         [e["high"] - v for v, e in zip(value, es, strict=True)]],
                        marker="o", capsize=2, label=NAMES.get(row, row),
                        color="0.5" if row in NAMES else f"C{i}",
                        ls=":" if row == "raw_pixels" else "-", alpha=0.85)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("training patients labelled")
        ax.set_ylabel(f"test AUROC, {res['instrument'].get('endpoint', 'primary endpoint')}")
        ax.set_title(f"{res['instrument']['set']}: {res['instrument']['test_patients']} test "
                     "patients")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.patient_tables")
    p.add_argument("--check", action="store_true")
    p.add_argument("--figure", action="store_true",
                   help=f"also draw the label-fraction curves ({FIGURE.relative_to(ROOT)})")
    args = p.parse_args(argv)
    if args.figure:
        print(fraction_curves({"folds": folds_as_screen(json.loads(FOLDS.read_text())),
                               **{n: json.loads(results_path(n).read_text())
                                  for n in FIGURE_SETS}}))
    text = DOC.read_text()
    try:
        new, changed = render(text)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.check:
        if changed:
            raise SystemExit(f"error: {DOC} tables differ from the saved results: "
                             f"{', '.join(changed)}")
        return
    DOC.write_text(new)
    print(f"{DOC}: {'rewrote ' + ', '.join(changed) if changed else 'up to date'}")


if __name__ == "__main__":
    main()
