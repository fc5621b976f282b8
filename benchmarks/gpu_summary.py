"""One summary of a GPU check's benchmark JSON (``benchmarks/gpu_check.sh`` prints it):

* attention: the kernel's TFLOP/s per shape and pass, its speedup over each PyTorch provider
  (torch varlen, SDPA per segment, gather+pad+SDPA; above 1 is faster), and at the cost
  model's shapes (ViT-B/16, 256 images, 98- and 49-token segments) its time over the model's
  H100 bound (``benchmarks/results/cost-model.json``, docs/kernels.md: 1.0 is the hardware's
  limit; the bound is an H100 SXM's, so on another GPU read it as a scale);
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
COST_MODEL = Path(__file__).parent / "results" / "cost-model.json"
# Benchmark shape -> (tokens per segment) of the cost model's rows; kernel -> their layout.
COST_SHAPES = {"vitb-224-r0.5": 98, "vitb-224-k0.5": 49}
COST_LAYOUTS = {"spcl_fast triton packed": "packed", "spcl_fast triton in-place": "in-place"}


def _rows(folder: Path, suite: str) -> list[dict]:
    return [row for path in sorted(folder.glob(f"{suite}-*.json"))
            for row in json.loads(path.read_text())]


def _num(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def bounds_ms() -> dict:
    """(shape, pass, kernel) -> the cost model's H100 bound in ms for the qkv-packed op."""
    if not COST_MODEL.exists():
        return {}
    rows = json.loads(COST_MODEL.read_text())["rows"]
    bound = {(r["op"], r["layout"], r["size"]): r["bounds"]["H100"]["bound_s"] * 1e3
             for r in rows if r["op"] == "attention forward" or r["design"] == "qkv buffer"}
    out = {}
    for shape, tokens in COST_SHAPES.items():
        for kernel, layout in COST_LAYOUTS.items():
            fwd = bound.get(("attention forward", layout, tokens))
            bwd = bound.get(("attention backward", layout, tokens))
            if fwd is not None and bwd is not None:
                out.update({(shape, "fwd", kernel): fwd, (shape, "bwd", kernel): bwd,
                            (shape, "fwd+bwd", kernel): fwd + bwd})
    return out


def attention(rows: list[dict]) -> list[str]:
    lines = ["| shape, pass | kernel | TFLOP/s | " + " | ".join(
        f"x vs {p}" for p in TORCH_PROVIDERS) + " | x H100 bound |", "|---|---|---|" + "---|" * 4]
    bounds = bounds_ms()
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], {})[row["provider"]] = row
    for group, by_provider in groups.items():
        for kernel in KERNELS:
            if kernel not in by_provider:
                continue
            row = by_provider[kernel]
            ms = row["median_ms"]
            ratios = [_num(by_provider[p]["median_ms"] / ms, ".2f") if p in by_provider else "-"
                      for p in TORCH_PROVIDERS]
            bound = bounds.get((row.get("shape"), row.get("mode"), kernel))
            lines.append(f"| {group} | {kernel} | {_num(row['tflops'])} | "
                         + " | ".join(ratios) + f" | {_num(bound and ms / bound, '.2f')} |")
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
