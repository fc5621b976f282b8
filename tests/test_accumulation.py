"""Gradient accumulation is the same optimisation as one big batch (issue 38, item 2): for the
methods whose loss couples the batch (:class:`~spcl_fast.methods.base.BatchLoss`: in-batch
negatives) the trainer caches the micro-batches' embeddings and takes the loss over all of them
(GradCache), so an accumulated step's gradients equal those of the whole batch in one pass, on
the same draws; for per-image losses (MAE, DINO) plain accumulation is exact."""

import copy

import pytest
import torch

from spcl_fast.methods import SPCL, BatchLoss, SPCLConfig
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.run.presets import smoke
from spcl_fast.train.trainer import Trainer, _join, _part

CASES = {
    "spcl": {},
    "spcl_intra": dict(intra_weight=1.0, intra_queries=3),
    # unequal subsets: micro-batches draw different query counts (padded when joined)
    "spcl_intra_batch": dict(intra_weight=0.5, intra_queries=12, intra_negatives="batch",
                             ratio_range=(0.2, 0.8)),
    "spcl_intra_pixels": dict(intra_weight=1.0, intra_queries=3, intra_target="pixels"),
    "spcl_predictor_vicreg_3": dict(predictor_hidden=16, vicreg_var=1.0, vicreg_cov=0.1,
                                    num_subsets=3, negatives="all"),
    "spcl_bounded_crop": dict(similarity="bounded", crop_scale=(0.5, 1.0), keep=0.5),
    # the reconstruction term over unequal subsets (per-image sums, joined)
    "spcl_recon": dict(recon_weight=1.0, recon_dim=16, recon_depth=1, recon_heads=2, keep=0.5,
                       ratio_range=(0.2, 0.8)),
    # patient ids from the stream (nih-demo has them) into the joined batch's loss
    "spcl_exclude_patients": dict(dataset="nih-demo", same_patient="exclude"),
    "spcl_positive_patients_recon": dict(dataset="nih-demo", same_patient="positive",
                                         negatives="all", recon_weight=1.0, recon_dim=16,
                                         recon_depth=1, recon_heads=2),
    "simclr": dict(method="simclr", simclr_proj_hidden=32, simclr_proj_dim=16),
    "mae": dict(method="mae", decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "dino": dict(method="dino", dino_out_dim=64, dino_local_crops=2),
}


def _step_and_reference(options: dict, accum_steps: int = 2):
    """One accumulated training step, and the same step's loss and gradients from one forward
    pass over the whole batch on the same plans (joined) and the same global RNG state."""
    config = smoke().replace(batch_size=8, accum_steps=accum_steps, grad_clip=0.0, depth=1,
                             **options)
    trainer = Trainer(config)
    initial = copy.deepcopy(trainer.model)
    seen = {"plans": []}
    draw, next_batch = trainer.plans.sample, trainer.stream.next_batch

    def sample(model, x):
        seen["plans"].append(draw(model, x))
        return seen["plans"][-1]

    def batch():
        seen["images"], seen["groups"] = next_batch()
        return seen["images"], seen["groups"]

    trainer.plans.sample, trainer.stream.next_batch = sample, batch
    rng = torch.get_rng_state()
    out = trainer.train_step()

    torch.set_rng_state(rng)
    plan = type(seen["plans"][0]).concat(seen["plans"])
    kwargs = {"groups": seen["groups"]} if trainer.uses_groups else {}
    want = initial(trainer.transform(seen["images"]), plan=plan, **kwargs)
    want["loss"].backward()
    return trainer, initial, out, want


@pytest.mark.parametrize("case", list(CASES))
def test_an_accumulated_step_has_the_gradients_of_the_whole_batch(case):
    trainer, initial, out, want = _step_and_reference(CASES[case])
    assert len(trainer.stream.next().split(trainer.micro_batch)) == 2
    torch.testing.assert_close(out["loss"], want["loss"].detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    want_grads = {n: p.grad for n, p in initial.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if case == "dino":  # the centre moves once per step, by the whole batch's teacher logits
        initial.after_step(0)
        torch.testing.assert_close(trainer.model.center, initial.center)


def test_contrastive_methods_are_batch_losses_and_per_image_ones_are_not():
    kinds = {case: isinstance(Trainer(smoke().replace(depth=1, **CASES[case])).model, BatchLoss)
             for case in ("spcl", "simclr", "mae")}
    assert kinds == {"spcl": True, "simclr": True, "mae": False}


def test_join_pads_later_dims_and_part_cuts_the_padding_off():
    a, b = torch.ones(2, 3, 4), torch.full((1, 5, 4), 2.0)
    joined = _join([a, b])
    assert joined.shape == (3, 5, 4) and joined[:2, 3:].eq(0).all()
    assert torch.equal(_part(joined, a, 0), a) and torch.equal(_part(joined, b, 2), b)
    flags = _join([torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)])
    assert flags.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("options", [{}, dict(keep=0.5, intra_weight=1.0, intra_queries=3)])
def test_accumulated_training_follows_the_unaccumulated_run(options):
    """End to end: the same losses over steps with 1 and 4 micro-batches per step (the
    partition draws are image by image, so micro-batches draw what their batch would). Weights
    are not compared: AdamW turns the float noise of gradients that are 0 in exact arithmetic
    (the key bias: softmax ignores it) into full-size steps that change no output."""
    losses = []
    for accum in (1, 4):
        trainer = Trainer(smoke().replace(batch_size=8, accum_steps=accum, depth=1, **options))
        torch.manual_seed(0)
        losses.append(torch.stack([trainer.train_step()["loss"] for _ in range(3)]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(same_patient="exclude", num_subsets=3),
    dict(same_patient="positive", negatives="all", recon_weight=1.0, recon_dim=16,
         recon_depth=1, recon_heads=2),
])
def test_patient_ids_join_over_micro_batches(options):
    """The trainer's GradCache steps (embed without a graph, join, the loss of the whole batch,
    re-embed each micro-batch and backpropagate its share) with patient ids that span the two
    micro-batches: the ids travel in the embedding, so the joined loss and gradients are those
    of the whole batch in one pass (the synthetic set the Trainer runs here has no ids)."""
    torch.manual_seed(0)
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = SPCL(enc, SPCLConfig(proj_hidden=16, proj_dim=8, **options))
    x, groups = torch.rand(8, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 3, 0, 4])
    g = torch.Generator().manual_seed(1)
    plans = [model.sample_plan(4, g, "cpu") for _ in range(2)]
    micro = [(x[:4], plans[0], groups[:4]), (x[4:], plans[1], groups[4:])]
    want = model(x, plan=type(plans[0]).concat(plans), groups=groups)
    want["loss"].backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        cached = [model(xs, plan=p, groups=ids, embed_only=True) for xs, p, ids in micro]
    embedded = {name: _join([c[name] for c in cached]) for name in cached[0]}
    assert torch.equal(embedded["groups"], groups)
    for value in embedded.values():
        value.requires_grad_(value.is_floating_point())
    out = model.batch_loss(embedded)
    out["loss"].backward()
    offset = 0
    for xs, p, ids in micro:
        again = model(xs, plan=p, groups=ids, embed_only=True)
        pairs = [(v, _part(embedded[k].grad, v, offset)) for k, v in again.items()
                 if v.requires_grad]
        torch.autograd.backward(*zip(*pairs, strict=True))
        offset += xs.shape[0]
    torch.testing.assert_close(out["loss"], want["loss"].detach())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
