"""What a run reports: model FLOP utilisation against a per-device peak table, the JSON-lines
metrics file (plus optional TensorBoard scalars) and the loss-curve picture.

MFU here is *achieved model FLOP/s per device / dense peak*: the FLOPs are the algorithmic count
of ``spcl_fast.flops`` (never padding or recomputation), the peak the data-sheet dense
tensor-core number for the run's precision (no 2:4 sparsity).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from ..run.checkpoint import write_text_atomic

# Dense peak TFLOP/s by device-name fragment, first match wins (so "H100 PCIe" precedes "H100"
# and "A100" precedes "A10"). fp32 is plain FP32; "tf32" applies to fp32 runs whose matmuls use
# TF32 tensor cores (torch.set_float32_matmul_precision("high")). From NVIDIA's data sheets.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
)


def peak_tflops(device: torch.device, precision: str,
                override: float | None = None) -> float | None:
    """Dense peak TFLOP/s of one ``device`` at ``precision`` (``override`` wins), or ``None``
    where unknown (CPUs, devices not in :data:`PEAK_TFLOPS`): then MFU is not reported."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks.get(key)
    return None


def throughput(images_per_s: float, gflops_per_image: float, world: int,
               peak: float | None) -> dict:
    """Achieved model TFLOP/s per device and MFU (``None`` without a peak)."""
    tflops = images_per_s * gflops_per_image / 1e3 / world
    return {"tflops_per_device": tflops, "mfu": tflops / peak if peak else None}


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Records of a metrics file up to ``upto_step``; a torn last line (a killed writer) and
    anything after the step (not covered by the checkpoint being resumed) are dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", upto_step + 1) <= upto_step:
            records.append(record)
    return records


def _json_line(record: dict) -> str:
    """One strict-JSON line: a non-finite number (a skipped step's loss) is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log step), optional TensorBoard scalars under
    ``tensorboard/``. On resume it first rewrites the file with the records up to the resumed
    step, so the file always reads as one uninterrupted run. Only the main process writes."""

    def __init__(self, out_dir: Path, upto_step: int, tensorboard: bool, enabled: bool):
        self.path = out_dir / "metrics.jsonl"
        self.records = read_metrics(self.path, upto_step) if enabled else []
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        write_text_atomic(self.path, "".join(_json_line(r) for r in self.records))
        self._file = open(self.path, "a")  # closed by close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("--tensorboard: tensorboard is not installed; skipping it "
                              "(pip install tensorboard)", stacklevel=2)
            else:
                self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=upto_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(_json_line(record))
        self._file.flush()
        self.records.append(record)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def plot_losses(records: list[dict], path: Path, method: str) -> None:
    """The loss curve of ``records`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    losses = [math.nan if r["loss"] is None else r["loss"] for r in records]  # null: skipped
    ax.plot([r["step"] for r in records], losses, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{method} pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
