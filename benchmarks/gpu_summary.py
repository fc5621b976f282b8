"""One summary of a GPU check's benchmark JSON (``benchmarks/gpu_check.sh`` prints it):

* attention: the kernel's TFLOP/s per shape and pass, and its speedup over each PyTorch
  provider (torch varlen, SDPA per segment, gather+pad+SDPA; above 1 is faster);
* loss: InfoNCE time and peak memory, Triton against the naive loss with its M x M matrix;
* steps: ViT-B/16 training images/s, TFLOP/s and MFU of S-PCL, MAE and DINO, and of the S-PCL
  training step eager and compiled.

    python benchmarks/gpu_summary.py DIR    # DIR holds attention-*.json, loss-*.json, ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KERNELS = ("spcl_fast triton packed", "spcl_fast triton in-place")
TORCH_PROVIDERS = ("torch varlen_attn", "SDPA per segment", "gather+pad+SDPA")


def _rows(folder: Path, suite: str) -> list[dict]:
    return [row for path in sorted(folder.glob(f"{suite}-*.json"))
            for row in json.loads(path.read_text())]


def _num(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def attention(rows: list[dict]) -> list[str]:
    lines = ["| shape, pass | kernel | TFLOP/s | " + " | ".join(
        f"x vs {p}" for p in TORCH_PROVIDERS) + " |", "|---|---|---|" + "---|" * 3]
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], {})[row["provider"]] = row
    for group, by_provider in groups.items():
        for kernel in KERNELS:
            if kernel not in by_provider:
                continue
            ms = by_provider[kernel]["median_ms"]
            ratios = [_num(by_provider[p]["median_ms"] / ms, ".2f") if p in by_provider else "-"
                      for p in TORCH_PROVIDERS]
            lines.append(f"| {group} | {kernel} | {_num(by_provider[kernel]['tflops'])} | "
                         + " | ".join(ratios) + " |")
    return lines


def loss(rows: list[dict]) -> list[str]:
    lines = ["| problem | provider | ms | peak MiB | memory vs naive |", "|---|---|---|---|---|"]
    naive = {r["group"]: r for r in rows if r["baseline"]}
    for row in rows:
        base = naive.get(row["group"])
        ratio = (row["peak_memory_mb"] / base["peak_memory_mb"]
                 if base and base["peak_memory_mb"] and row["peak_memory_mb"] else None)
        lines.append(f"| {row['group']} | {row['provider']} | {_num(row['median_ms'])} | "
                     f"{_num(row['peak_memory_mb'], '.0f')} | {_num(ratio, '.3f')} |")
    return lines


def steps(rows: list[dict], peak) -> list[str]:
    lines = ["| setup | method / provider | images/s | TFLOP/s | MFU |", "|---|---|---|---|---|"]
    for row in rows:
        dtype = row.get("dtype") or row.get("precision")
        top = peak(dtype)
        mfu = row["tflops"] / top if top and row["tflops"] else None
        lines.append(f"| {row['group']} | {row['provider']} | {_num(row['images_per_s'], '.0f')} "
                     f"| {_num(row['tflops'])} | {_num(mfu, '.1%')} |")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python benchmarks/gpu_summary.py DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    import torch

    def peak(dtype):  # this machine's dense peak (the check summarises where it ran)
        if not torch.cuda.is_available():
            return None
        from spcl_fast.train.monitor import peak_tflops

        return peak_tflops(torch.device("cuda"), dtype)

    sections = [("attention", attention(_rows(folder, "attention"))),
                ("loss", loss(_rows(folder, "loss"))),
                ("training steps", steps(_rows(folder, "step") + _rows(folder, "train"), peak))]
    for title, lines in sections:
        print(f"\n== {title}\n" + ("\n".join(lines) if len(lines) > 2 else "(no rows)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
