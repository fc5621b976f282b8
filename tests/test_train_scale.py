"""Training at scale, in one process: data sharding and partition streams, exact resume with
accumulation, mixed precision and DataLoader-fed dataset pools, skipped non-finite steps,
compile-readiness, MFU and LR scaling, the global-batch S-PCL loss."""

import json
import math
import os
import signal
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from devtools.fixtures import make_chestxray14, make_chexpert
from spcl_fast.data import TensorImages
from spcl_fast.run.data import load_split, materialize
from spcl_fast.run.model import build_model
from spcl_fast.run.presets import PRESETS, demo, smoke
from spcl_fast.train.__main__ import parse_args
from spcl_fast.train.engine import train
from spcl_fast.train.interrupt import GracefulStop
from spcl_fast.train.monitor import peak_tflops, read_metrics, throughput
from spcl_fast.train.sharding import BatchStream, PlanSampler
from spcl_fast.train.trainer import Trainer, peak_lrs, step_lr

TIMING = {"images_per_s", "tflops_per_device", "mfu"}  # wall-clock fields: differ run to run


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: more threads only contend (the smoke preset trains on one as well)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class _Images(torch.utils.data.Dataset):
    """Map-style dataset of images whose single pixel is their index."""

    def __init__(self, n):
        self.n = n
        self.patient_ids = [f"p{i // 3}" for i in range(n)]  # three films per patient

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((1, 1, 1), float(i))}


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_batch_stream_shards_each_epoch_over_ranks_once(world, accum):
    n, batch = 44, 8  # 5 full batches per epoch, 4 images dropped
    source = TensorImages(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1),
                          patient_ids=_Images(n).patient_ids)
    single = BatchStream(source, batch, seed=3)
    ranks = [BatchStream(source, batch, seed=3, rank=r, world=world, accum_steps=accum)
             for r in range(world)]
    loaders = [BatchStream(_Images(n), batch, seed=3, rank=r, world=world, accum_steps=accum)
               for r in range(world)]
    for _epoch in range(2):
        seen = []
        for _ in range(n // batch):
            whole = single.next().flatten()
            parts = [s.next().flatten().view(accum, -1) for s in ranks]
            # micro-step k of the ranks together is the k-th slice of the one-process batch
            assert torch.equal(torch.cat(parts, dim=1).flatten(), whole)
            for stream, part in zip(loaders, parts, strict=True):  # DataLoader path: the same
                images, groups = stream.next_batch()
                assert torch.equal(images.flatten(), part.flatten())
                # each film's patient comes with it, numbered in first-seen order
                assert torch.equal(groups, images.flatten().long() // 3)
            seen += whole.tolist()
        assert len(set(seen)) == len(seen) == n // batch * batch
    with pytest.raises(ValueError, match="multiple of processes x accum_steps"):
        BatchStream(source, 8, seed=0, world=3)
    with pytest.raises(TypeError, match="a split is a dataset, not a tensor"):
        BatchStream(torch.zeros(n, 1, 1, 1), 8, seed=0)
    assert BatchStream(TensorImages(torch.zeros(8, 1, 1, 1)), 8, seed=0).next_batch()[1] is None


def test_plan_streams_do_not_depend_on_the_number_of_processes():
    model = build_model(smoke())
    images = torch.rand(8, 1, 32, 32)
    one = PlanSampler(seed=5, num_shards=2).sample(model, images)
    halves = [PlanSampler(seed=5, num_shards=2, rank=r, world=2).sample(model, images[4 * r:][:4])
              for r in range(2)]
    both = type(halves[0]).concat(halves)
    assert torch.equal(one.token_index, both.token_index)
    assert torch.equal(one.cu_seqlens, both.cu_seqlens) and one.max_seqlen == both.max_seqlen
    # one stream is what a single process always drew
    plain = model.sample_plan(8, torch.Generator().manual_seed(6), "cpu")
    assert torch.equal(PlanSampler(seed=5, num_shards=1).sample(model, images).token_index,
                       plain.token_index)
    # encoding the concatenated plan equals encoding each half on its own
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        pooled = model.encoder.forward_partitioned(x, both)
        parts = [model.encoder.forward_partitioned(x[4 * r: 4 * r + 4], halves[r])
                 for r in range(2)]
    torch.testing.assert_close(pooled, torch.cat(parts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_plans_of_baselines_concatenate(method):
    config = smoke().replace(method=method, decoder_dim=32, decoder_depth=1,
                                 decoder_heads=2, dino_out_dim=64, dino_local_crops=2)
    model = build_model(config)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    halves = [model.sample_plan(3, g, "cpu") for g in gens]
    both = type(halves[0]).concat(halves)
    assert both.num_images == 6
    with torch.no_grad():
        whole = model(torch.rand(6, 1, 32, 32, generator=gens[0]), plan=both)["loss"]
    assert torch.isfinite(whole)


def test_gathering_spcl_equals_spcl_in_a_one_process_group():
    config = smoke().replace(subset_jitter=0.5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref, glob = build_model(config), build_model(config, global_batch_loss=True)
        assert glob.gather_distributed and not ref.gather_distributed
        x = torch.rand(4, 1, 32, 32)
        plan = ref.sample_plan(4, torch.Generator().manual_seed(0), "cpu")
        outs = []
        for model in (ref, glob):
            torch.manual_seed(1)  # the subset jitter draws from the global RNG
            out = model(x, plan=plan)
            out["loss"].backward()
            outs.append((out, model.encoder.blocks[0].attn.qkv.weight.grad))
    finally:
        dist.destroy_process_group()
    # Same forward (jitter included); the gathering loss sums its two directions in two passes
    # instead of one, so the loss and gradients agree to rounding.
    for key in outs[0][0]:
        torch.testing.assert_close(outs[0][0][key], outs[1][0][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_accumulation_resumes_exactly(tmp_path, precision):
    config = smoke().replace(precision=precision, accum_steps=2, steps=4,
                                 save_every=2)
    summary = train(config, tmp_path / "full")
    assert summary["skipped_steps"] == 0
    train(config, tmp_path / "resumed", resume=tmp_path / "full" / "ckpt-00000002.pt")
    full = _records(tmp_path / "full")
    assert _records(tmp_path / "resumed") == full[2:]  # bit for bit
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full)
    state = torch.load(tmp_path / "full" / "ckpt-00000004.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")
    if precision == "fp16":
        assert full[-1]["loss_scale"] > 0 and full[-1]["overflow_steps"] >= 0


def test_dataset_pool_through_the_dataloader_resumes_exactly(tmp_path):
    a = make_chestxray14(tmp_path / "nih", n=24, size=32)
    b = make_chexpert(tmp_path / "chexpert", size=32)
    config = smoke().replace(dataset="chestxray14+chexpert", data_root=f"{a},{b}",
                                 num_workers=1, batch_size=8, steps=6, save_every=3,
                                 accum_steps=2)
    train(config, tmp_path / "full")
    train(config, tmp_path / "resumed", resume=tmp_path / "full" / "ckpt-00000003.pt")
    full = _records(tmp_path / "full")
    assert full[-1]["epoch"] >= 1  # crossed an epoch boundary (the loader restarts there)
    assert _records(tmp_path / "resumed") == full[3:]
    with pytest.raises(ValueError, match="one per dataset"):
        train(config.replace(data_root=a), tmp_path / "bad")


def test_corrupt_latest_checkpoint_falls_back_and_continues_exactly(tmp_path):
    config = smoke().replace(steps=6, save_every=2, keep_last=3, deterministic=True)
    train(config, tmp_path / "full")
    assert not torch.are_deterministic_algorithms_enabled()  # the run's setting is undone
    reference = _records(tmp_path / "full")
    (tmp_path / "full" / "ckpt-00000006.pt").write_bytes(b"torn")
    with open(tmp_path / "full" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and a torn metrics line, as a kill -9 leaves
    with pytest.warns(UserWarning) as caught:
        summary = train(config, tmp_path / "full", resume=tmp_path / "full")
    messages = " ".join(str(w.message) for w in caught)
    assert "could not read" in messages and "set aside unreadable ckpt-00000006.pt" in messages
    assert summary["steps"] == 6 and _records(tmp_path / "full") == reference
    assert (tmp_path / "full" / "ckpt-00000006.pt.corrupt").read_bytes() == b"torn"


def test_nan_batch_is_skipped_and_the_run_continues(tmp_path, monkeypatch):
    trainer = Trainer(smoke().replace(steps=4))
    trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    real = trainer.stream.next_batch

    def nan_batch():
        images, groups = real()
        return images * float("nan"), groups

    monkeypatch.setattr(trainer.stream, "next_batch", nan_batch)
    out = trainer.train_step()
    assert not torch.isfinite(out["loss"])
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # the update was skipped ...
    for s, m in zip(trainer.optimizer.state.values(), moments, strict=True):
        assert torch.equal(s["exp_avg"], m) and int(s["step"]) == 1  # ... moments and count too
    monkeypatch.setattr(trainer.stream, "next_batch", real)
    assert torch.isfinite(trainer.train_step()["loss"])
    counters = trainer.counters()
    assert counters["skipped_steps"] == 1 and counters["bad_streak"] == 0

    calls = {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        images, groups = real_next(self)
        return (images * float("nan") if calls["n"] == 2 else images), groups

    real_next = BatchStream.next_batch
    monkeypatch.setattr(BatchStream, "next_batch", poisoned)
    with pytest.warns(UserWarning, match="skipping this checkpoint"):  # step 2 was bad
        summary = train(smoke().replace(steps=4, save_every=2), tmp_path / "run")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert [r["skipped_steps"] for r in _records(tmp_path / "run")] == [0, 1, 1, 1]


@pytest.mark.parametrize("layout", ["packed", "inplace"])
def test_training_forward_compiles_without_graph_breaks(layout):
    trainer = Trainer(smoke().replace(layout=layout, precision="bf16"))
    x = trainer.transform(trainer.stream.next())
    plan = trainer.plans.sample(trainer.model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(trainer.net)(x, plan=plan)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_lr_scaling_is_opt_in():
    config = smoke().replace(lr=1.5e-4, min_lr=1e-6, batch_size=2048, steps=100,
                             warmup_steps=10)
    assert peak_lrs(config.optim) == (1.5e-4, 1e-6)
    scaled = config.replace(lr_base_batch=256)
    assert peak_lrs(scaled.optim) == pytest.approx((1.2e-3, 8e-6))
    assert step_lr(9, scaled.optim) == pytest.approx(1.2e-3)
    assert step_lr(100, scaled.optim) == pytest.approx(8e-6)
    assert demo().optim.lr_base_batch == 0  # the demo's learning rate is the one it states
    for name in ("vit_tiny_224", "vit_base_448", "vit_large_512"):
        preset = PRESETS[name]()
        assert preset.optim.precision == "bf16" and preset.model.patch_size == 16
        assert preset.data.image_size == int(name.rsplit("_", 1)[1])
        # the recipe the study chose for the demo
        assert (preset.spcl.keep, preset.spcl.intra_weight, preset.data.batch_grouping,
                preset.data.group_grid) == (0.5, 1.0, "similar", 1) == (
            demo().spcl.keep, demo().spcl.intra_weight, demo().data.batch_grouping,
            demo().data.group_grid)


def test_peak_table_mfu_and_override(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert peak_tflops(cpu, "bf16") is None and peak_tflops(cpu, "bf16", 100.0) == 100.0
    for name, precision, peak in [("NVIDIA H100 80GB HBM3", "bf16", 989.0),
                                  ("NVIDIA H100 PCIe", "bf16", 756.0),
                                  ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
                                  ("NVIDIA A10", "bf16", 125.0),
                                  ("Tesla V100-SXM2-32GB", "bf16", None),
                                  ("Some Future GPU", "bf16", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert peak_tflops(cuda, precision) == peak, name
    rates = throughput(images_per_s=32_000, gflops_per_image=101.0, world=8, peak=989.0)
    assert rates["tflops_per_device"] == pytest.approx(404.0)
    assert rates["mfu"] == pytest.approx(404.0 / 989.0)
    assert throughput(10.0, 1.0, 1, None)["mfu"] is None


def test_metrics_reader_drops_torn_lines_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path, 5) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert read_metrics(path, 1) == [{"step": 1, "loss": 2.0}]


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    config = smoke().replace(steps=2, tensorboard=True)
    if installed:
        train(config, tmp_path)
        assert any((tmp_path / "tensorboard").iterdir())
    else:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            summary = train(config, tmp_path)
        assert summary["steps"] == 2


def test_yes_no_options_may_stand_alone():
    preset, over, _ = parse_args(["--compile", "--steps", "3", "--tensorboard"])
    assert over == {"compile": "true", "steps": "3", "tensorboard": "true"}
    assert parse_args(["--fsdp", "false"])[1] == {"fsdp": "false"}


def test_second_sigint_aborts():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_training_survives_unreadable_images(tmp_path):
    """Truncated, garbage and missing files in a real-layout dataset: the run warns about each,
    skips it, trains to the end and probes with every image's own labels."""
    root = make_chestxray14(tmp_path / "nih", n=24, size=32)
    images = sorted((tmp_path / "nih" / "images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:40])  # truncated PNG
    images[4].write_bytes(b"not an image at all")
    images[7].unlink()
    config = smoke().replace(dataset="chestxray14", data_root=root, steps=6,
                                 probe=True, probe_steps=5, num_images=None, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(config, tmp_path / "run")
    messages = "\n".join(str(w.message) for w in caught)
    for bad in (images[0].name, images[4].name):
        assert f"{bad}" in messages and "skipped" in messages
    assert "1 listed files are absent" in messages
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert all(math.isfinite(r["loss"]) for r in _records(tmp_path / "run"))
    assert "mean_auroc" in summary["probe"]["pretrained"]


def test_probe_leaves_out_the_stand_ins_of_unreadable_images(tmp_path):
    root = make_chestxray14(tmp_path / "nih", n=24, size=32)
    config = smoke().replace(dataset="chestxray14", data_root=root, num_images=None)
    source, labels, _ = load_split(config, "train")
    first = source.ids[0]
    want = source.images(1, len(source))
    (tmp_path / "nih" / "images" / first).write_bytes(b"garbage")
    with pytest.warns(UserWarning) as caught:
        images, got = materialize(source, labels)
    messages = " ".join(str(w.message) for w in caught)
    assert f"{first}" in messages and "1 unreadable images left out of the probe" in messages
    # item 0 is unreadable: item 1 stood in for it, and is counted once, with its own labels
    assert len(images) == len(got) == len(source) - 1
    torch.testing.assert_close(images, want)
    torch.testing.assert_close(got, labels[1:], equal_nan=True)
