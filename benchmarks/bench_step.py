"""Training-step throughput of S-PCL, MAE and DINO on the same encoder and batch (suite ``step``).

A step is what the training engine does per batch: draw the step's randomness on the host
(partitions, masks, crops), forward, backward, AdamW step, and DINO's EMA teacher update. Every
method uses its paper defaults (MAE: 75% masked, 8 x 512 decoder; DINO: 2 global + 10 local
crops, 65536 prototypes) on the same ViT and the same images; S-PCL is each group's baseline, so
the table's ``speedup_vs_baseline`` column is a method's throughput relative to S-PCL.

* CPU, always: ViT-Ti/16 at 96 px (36 tokens; DINO's local crops 48 px), batch 16, fp32;
  1 warm-up and 3 timed steps per method, about 30 s for the three. Single-threaded (the
  device name says so) and timed in CPU seconds of the process (``time.process_time``), so
  other work on a shared machine does not distort the ratios; on an idle machine this is the
  wall time of a one-thread run.
* CUDA, when present: ViT-B/16 at 224 px, batch 64, bf16 autocast (Triton kernels for the
  varlen attention and InfoNCE, SDPA for dense attention), 3 warm-up and 10 timed steps.

Each row records the method's analytic training FLOPs per step (``train_flops``), so ``tflops``
is achieved throughput. When the module ends it draws ``benchmarks/results/methods-<device>.png``:
training GFLOPs per image at ViT-B/16 224 px (analytic) next to the measured images/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from common import RESULTS_DIR, ROWS, device_slug, run, torch_threads

from spcl_fast.methods import build_method
from spcl_fast.methods import train_flops as flops
from spcl_fast.nn import create_vit

METHODS = {"spcl": "S-PCL", "mae": "MAE", "dino": "DINO"}


@dataclass(frozen=True)
class Setup:
    device: str
    model: str
    img_size: int
    batch_size: int
    dtype: str
    rounds: int
    warmup: int
    threads: int | None = None  # CPU: torch threads during the case
    cpu_time: bool = False  # time in process CPU seconds instead of wall seconds

    @property
    def group(self) -> str:
        return (f"{flops.MODEL_LABELS[self.model]} {self.img_size}px b{self.batch_size} "
                f"{self.dtype} {self.device}")


SETUPS = [
    Setup("cpu", "vit_tiny_patch16", 96, 16, "fp32", rounds=3, warmup=1, threads=1,
          cpu_time=True),
    Setup("cuda", "vit_base_patch16", 224, 64, "bf16", rounds=10, warmup=3),
]


@pytest.fixture(scope="module", autouse=True)
def _chart(request):
    """Draw the chart once every case of the module has run."""
    yield
    rows = ROWS.get("step", [])
    if rows:
        path = RESULTS_DIR / f"methods-{device_slug(rows[-1]['device'])}.png"
        plot_methods(rows, flops.flops_table(["vit_base_patch16"]), path)
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nsaved {path}")


def plot_methods(rows: list[dict], table: list[dict], path) -> None:
    """Two bar charts: analytic training GFLOPs/image (ViT-B/16 224 px) per method variant, and
    measured images/s per method for each benchmark group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    labels = [f"{METHODS[r['method']]}\n{r['variant']}" for r in table]
    colors = [f"C{list(METHODS).index(r['method'])}" for r in table]
    bars = left.barh(labels[::-1], [r["gflops"] for r in table][::-1], color=colors[::-1])
    left.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    left.set_xlabel("training GFLOPs per image (2 x MAC)")
    left.set_title("ViT-B/16, 224 px: compute per image (lower is better)")
    left.tick_params(axis="y", labelsize=8)
    left.margins(x=0.15)

    groups = list(dict.fromkeys(r["group"] for r in rows))
    rate = {(r["group"], r["method"]): r["images_per_s"] for r in rows}
    width = 0.8 / len(METHODS)
    for i, (key, name) in enumerate(METHODS.items()):
        values = [rate.get((g, key), 0.0) for g in groups]
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(groups))]
        bars = right.bar(xs, values, width, label=name, color=f"C{i}")
        base = [rate.get((g, "spcl")) for g in groups]
        right.bar_label(bars, [f"{v:.1f}\nx{v / s:.2f}" if s and v else "" for v, s in
                               zip(values, base, strict=True)], padding=2, fontsize=8)
    right.set_xticks(range(len(groups)), [g.replace(" ", "\n", 2) for g in groups], fontsize=8)
    right.set_ylabel("training images / s")
    right.set_title("measured training images/s, x S-PCL (higher is better)")
    right.margins(y=0.15)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


CASES = [(s, m) for s in SETUPS for m in METHODS]


@pytest.mark.parametrize("setup,method", CASES,
                         ids=[f"{s.device}-{s.model}-{s.img_size}px-{m}" for s, m in CASES])
def test_training_step(benchmark, setup, method):
    if setup.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU row: needs CUDA")
    with torch_threads(setup.threads):
        _bench(benchmark, setup, method)


def _bench(benchmark, setup: Setup, method: str) -> None:
    device, b = torch.device(setup.device), setup.batch_size
    torch.manual_seed(0)
    encoder = create_vit(setup.model, img_size=setup.img_size, patch_size=16,
                         pos_embed="sincos")
    model = build_method(method, encoder).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(b, 1, setup.img_size, setup.img_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
    plans = torch.Generator().manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.dtype == "bf16")
    step_count = [0]

    def step():
        plan = model.sample_plan(b, plans, "cpu").to(device)
        with autocast:
            loss = model(images, plan=plan)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(model, "after_step"):
            model.after_step(step_count[0])
        step_count[0] += 1

    step_flops = model.train_flops(model.sample_plan(b, torch.Generator().manual_seed(1), "cpu"))
    run(benchmark, step, suite="step", group=setup.group, provider=METHODS[method],
        device=device, flops=step_flops, items=b, item_name="images",
        baseline=method == "spcl", rounds=setup.rounds, warmup=setup.warmup, method=method,
        model=setup.model, img_size=setup.img_size, batch_size=b, dtype=setup.dtype,
        gflops_per_image=step_flops / b / 1e9, cpu_time=setup.cpu_time)
