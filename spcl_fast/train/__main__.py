"""``python -m spcl_fast.train``: S-PCL pre-training from the command line.

With no arguments it runs the demo preset: a small ViT pre-trained on the real NIH chest X-rays
embedded in the package (``nih-demo``, its training patients only), then probed by patient for
normal vs abnormal against its initialisation and the raw pixels, each AUROC and difference with
a cluster-bootstrap interval over the test patients (``--dataset synthetic``: the phantoms).

Several GPUs or nodes: ``torchrun --nproc_per_node=8 -m spcl_fast.train --preset vit_base_224
...`` (every process runs this module; the first writes the files). Exit status: 0 when the run
finished, 128 + the signal (143 for SIGTERM, 130 for SIGINT) when a signal stopped it after
writing its checkpoint (``--resume`` continues it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import textwrap
import time
from pathlib import Path

from ..cli import suggest
from ..eval.patient_probe import format_patient_probe
from ..run.config import FLAG_TYPES, TrainConfig, apply_overrides, flag_values, print_help
from ..run.presets import PRESETS
from .distributed import setup, teardown
from .engine import NonFiniteStop, SaveError, SetupError, train

USAGE = """usage: python -m spcl_fast.train [--preset NAME] [--out DIR] [--steps N] [--save-every N]
                                [--resume [RUN_DIR_OR_CKPT]] [--device DEV] [--KEY VALUE ...]
       torchrun --nproc_per_node=N -m spcl_fast.train ...    (several GPUs / nodes)

Pre-train a ViT with S-PCL. Presets (default: demo):
  {presets}
--resume continues a run exactly from its newest readable checkpoint (default: the --out folder),
using the run's saved config; --KEY VALUE options given with it override that config (the
run prints what they change and keeps the config of before as config-step<N>.json).
Yes/no options may stand alone (--compile means --compile true); pairs take two words or
one with a comma (--betas 0.9 0.99 or --betas 0.9,0.99). SIGTERM or Ctrl-C: the step
finishes, a checkpoint is written, exit status 128 + signal; Ctrl-C twice aborts.

Options: every config field below, by section (dashes or underscores; defaults are the demo
preset's, which other presets change in part)."""


def parse_args(argv: list[str]) -> tuple[str, dict[str, str], str | None]:
    """Split argv into (preset, overrides, resume). ``--resume`` and yes/no options (``--compile``
    for ``--compile true``) may stand without a value."""
    flags = {name for name, tp in FLAG_TYPES.items() if tp is bool}
    preset, overrides, resume = "demo", {}, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            presets = textwrap.fill(", ".join(PRESETS), 96, subsequent_indent="  ")
            print(USAGE.format(presets=presets), flush=True)
            print_help(PRESETS["demo"](), "python -m spcl_fast.train")
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r} (options look like --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if key == "resume" and not has_value:
                value = ""
            elif key.replace("-", "_") in flags and not has_value:
                value = "true"
            elif not has_value:
                raise SystemExit(f"error: --{key} needs a value")
            else:
                # a pair takes 'a,b' or 'a b' (as --help shows it)
                words = argv[i + 1:i + 1 + flag_values(key)]
                words = words[:next((n for n, w in enumerate(words) if w.startswith("--")),
                                    len(words))]
                if "," in words[0] or words[0].lower() in ("none", "null"):
                    words = words[:1]
                i += len(words)
                value = " ".join(words)
        if key == "preset":
            if value not in PRESETS:
                raise SystemExit(f"error: unknown preset {value!r}{suggest(value, PRESETS)} "
                                 f"(choose from {', '.join(PRESETS)})")
            preset = value
        elif key == "resume":
            resume = value
        else:
            overrides[key] = value
        i += 1
    return preset, overrides, resume


def main(argv: list[str] | None = None) -> dict:
    preset, overrides, resume = parse_args(sys.argv[1:] if argv is None else argv)
    config = PRESETS[preset]()
    if resume is not None:
        target = resume or overrides.get("out", "")
        if not target:
            raise SystemExit("error: --resume needs a run folder or checkpoint (or --out)")
        # a checkpoint file names its folder; anything else is the run folder (new or not)
        target = Path(target)
        run_dir = target.parent if target.suffix == ".pt" or target.is_file() else target
        if (run_dir / "config.json").exists():
            try:
                config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
            except ValueError as exc:  # malformed JSON too
                raise SystemExit(f"error: {run_dir / 'config.json'} is not the config of a "
                                 f"training run ({exc})") from None
        overrides.setdefault("out", str(run_dir))
    try:
        config = apply_overrides(config, overrides)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        ctx = setup(config.run.device)  # under torchrun: the process group, for the next line
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"error: device {config.run.device!r}: {exc}") from None
    auto_out = not config.run.out
    try:
        # One folder for all processes: the main one's clock names it.
        out = ctx.broadcast(config.run.out or _new_run_dir(preset) if ctx.is_main else None)
        config = config.replace(out=out)
        if ctx.is_main:
            what = f"resuming {resume or out}" if resume is not None else f"preset {preset}"
            print(f"{what}; writing to {out}")
        started = time.perf_counter()
        summary = train(config, out, resume=(resume or out) if resume is not None else None)
    except (SetupError, NonFiniteStop, SaveError) as exc:
        teardown(ctx)
        if auto_out and ctx.is_main:  # the folder _new_run_dir made, if still empty
            with contextlib.suppress(OSError, NameError):
                Path(out).rmdir()
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:  # Ctrl-C twice, or during setup: no new checkpoint
        teardown(ctx)
        where = (f"; --resume {config.run.out} continues from its newest checkpoint"
                 if config.run.out else "")
        print(f"\naborted{where}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException:
        teardown(ctx)
        raise
    teardown(ctx, clean=True)
    if ctx.is_main:
        _report(summary, out, time.perf_counter() - started)
    if "exit_code" in summary:
        raise SystemExit(summary["exit_code"])
    return summary


def _new_run_dir(preset: str) -> str:
    """``runs/<preset>-<time>``, created here (atomically), numbered when a run started in the
    same second took that name."""
    base = f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path("runs").mkdir(exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else f"{base}-{n}"
        try:
            Path(path).mkdir()
            return path
        except FileExistsError:
            continue


def duration(seconds: float) -> str:
    """``"42 s"`` under two minutes, else ``"3.5 min"``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _report(summary: dict, out: str, seconds: float) -> None:
    """The run's closing lines; ``seconds``: wall time of the whole command."""
    parts = [f"{what} {duration(summary[key])}" for what, key in
             (("training", "train_seconds"), ("probe", "probe_seconds")) if key in summary]
    timing = "; ".join([", ".join(parts), f"{duration(seconds)} in all"] if parts
                       else [f"{duration(seconds)} in all"])
    if "interrupted" in summary:
        print(
            f"\n{summary['interrupted']}: stopped after step {summary['steps']} "
            f"({timing}); checkpoint {summary['checkpoint']}; continue with --resume {out}"
        )
        return
    loss = summary["final_loss"]
    print(
        f"\nfinished {summary['steps']} steps ({timing}); final loss "
        f"{'n/a (non-finite)' if loss is None else f'{loss:.4f}'}; checkpoint "
        f"{summary['checkpoint']}"
    )
    if "probe" in summary:
        probe = summary["probe"]
        print("linear probe, test mean AUROC (per class):")
        rows = [("pre-trained", "pretrained"), ("at init", "init"), ("raw pixels", "raw_pixels")]
        for label, key in rows:
            if key in probe:  # (summaries written before raw pixels were probed lack them)
                res = probe[key]
                per = ", ".join(f"{k} {v:.3f}" for k, v in res["per_class_auroc"].items())
                print(f"  {label:<12} {res['mean_auroc']:.3f}  ({per})")
        pre, paired = probe["pretrained"]["mean_auroc"], probe.get("pretrained_minus", {})
        gains = []
        for label, key in rows[1:]:
            if key in probe:
                gain = f"{pre - probe[key]['mean_auroc']:+.3f} over {label.removeprefix('at ')}"
                if key in paired:  # (summaries written before the bootstrap lack it)
                    gain += f" (95% CI {paired[key]['low']:+.3f} to {paired[key]['high']:+.3f})"
                gains.append(gain)
        print(f"  gain         {', '.join(gains)}")
        if paired:
            print("  (CI: paired bootstrap over the test images; one that holds 0 is no gain "
                  "this test set can see)")
    probe = "probe_scores.pt, " if "probe" in summary else ""
    print(f"outputs: {out}/config.json, metrics.jsonl, loss_curve.png, summary.json, {probe}"
          "ckpt-*.pt")
    if "patient_probe" in summary:  # the demo's result: its last lines
        print(format_patient_probe(summary["patient_probe"]))


if __name__ == "__main__":
    main()
