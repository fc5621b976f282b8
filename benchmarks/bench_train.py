"""S-PCL training-step throughput through the training engine (suite ``train``).

A step is exactly what ``python -m spcl_fast.train`` runs per optimizer step
(:meth:`spcl_fast.train.trainer.Trainer.train_step`): this rank's batch from the data stream
(random images held on the device, as the synthetic set is), normalisation, the partition plan
drawn on the host and copied over, forward under autocast, backward, gradient clipping, the
finite check and the fused AdamW step, with no host sync. Rows record the analytic training
GFLOPs per image (``train_flops``; ~101 for ViT-B/16 at 224 px with a 50/50 split), achieved
TFLOP/s and MFU against the device's dense peak (``spcl_fast.train.monitor.PEAK_TFLOPS``).

* CPU, always: ViT-Ti/16 at 224 px, batch 8, fp32, one thread, timed in process CPU seconds
  (robust to other work on a shared machine), 1 warm-up and 3 timed steps.
* CUDA, when present: ViT-B/16 at 224 px, batch 256, bf16, eager and ``torch.compile``, packed
  and in-place layouts; 3 warm-up steps (compilation happens there) and 10 timed. Target on one
  H100 SXM: at least 4,000 images/s (~40% MFU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from common import ROWS, peak_memory_mb, run, torch_threads

from spcl_fast.data import TensorImages
from spcl_fast.methods.train_flops import MODEL_LABELS
from spcl_fast.run.config import TrainConfig
from spcl_fast.train.monitor import peak_tflops
from spcl_fast.train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    model: str
    img_size: int
    batch_size: int
    precision: str
    compile: bool
    layout: str
    rounds: int
    warmup: int
    threads: int | None = None  # CPU: torch threads during the case
    cpu_time: bool = False  # time in process CPU seconds instead of wall seconds

    @property
    def group(self) -> str:
        return (f"{MODEL_LABELS[self.model]} {self.img_size}px b{self.batch_size} "
                f"{self.precision} {self.device}")

    @property
    def provider(self) -> str:
        return f"{'compiled' if self.compile else 'eager'} {self.layout}"

    @property
    def id(self) -> str:
        return f"{self.device}-{self.model}-{self.img_size}px-{self.provider.replace(' ', '-')}"


CASES = [
    Case("cpu", "vit_tiny_patch16", 224, 8, "fp32", False, "packed", rounds=3, warmup=1,
         threads=1, cpu_time=True),
    *(Case("cuda", "vit_base_patch16", 224, 256, "bf16", compiled, layout, rounds=10, warmup=3)
      for compiled in (False, True) for layout in ("packed", "inplace")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_step(benchmark, case):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU row: needs CUDA")
    try:
        with torch_threads(case.threads):
            _bench(benchmark, case)
    finally:
        if case.compile:
            torch._dynamo.reset()
        if case.device == "cuda":
            torch.cuda.empty_cache()


def _bench(benchmark, case: Case) -> None:
    config = TrainConfig().replace(
        model=case.model, patch_size=16, image_size=case.img_size, batch_size=case.batch_size,
        precision=case.precision, compile=case.compile, layout=case.layout, device=case.device,
        steps=1_000_000, warmup_steps=100, probe=False,
    )
    images = torch.rand(2 * case.batch_size, 1, case.img_size, case.img_size,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(config, source=TensorImages(images))
    device, b = trainer.device, case.batch_size
    model = trainer.model
    step_flops = model.train_flops(model.sample_plan(b, torch.Generator().manual_seed(0), "cpu"))
    memory = peak_memory_mb(trainer.train_step, device) if device.type == "cuda" else None
    run(benchmark, trainer.train_step, suite="train", group=case.group, provider=case.provider,
        device=device, flops=step_flops, items=b, item_name="images",
        baseline=not case.compile and case.layout == "packed", rounds=case.rounds,
        warmup=case.warmup, memory_mb=memory, model=case.model, img_size=case.img_size,
        batch_size=b, precision=case.precision, compiled=case.compile, layout=case.layout,
        gflops_per_image=step_flops / b / 1e9, cpu_time=case.cpu_time)
    row = ROWS["train"][-1]
    peak = peak_tflops(device, case.precision)
    row["peak_tflops"] = peak
    row["mfu"] = row["tflops"] / peak if peak else None
    benchmark.extra_info.update(peak_tflops=peak, mfu=row["mfu"])
