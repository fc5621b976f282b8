"""Same-patient films in an S-PCL batch (issue 37 §3): ``same_patient="exclude"`` takes them out
of the InfoNCE denominator, ``"positive"`` makes them extra positives
(:func:`~spcl_fast.methods.losses.multi_positive_nce`). The losses against references written
out row by row (values and gradients, fp64), the model's loss against them for every loss
variant, the default unchanged, the errors, and two gloo processes against one."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from spcl_fast.methods import SPCL, SPCLConfig
from spcl_fast.methods.losses import bounded_info_nce, bounded_similarity, multi_positive_nce
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.reference import info_nce_ref

GROUPS = {
    "one image": [7],
    "all one group": [3, 3, 3, 3],
    "all distinct": [0, 1, 2, 3, 4],
    "a group of three": [5, 1, 5, 2, 5, 1],
    "two pairs and a single": [0, 0, 9, 4, 4],
}


def _logit(u, v, temperature, kappa):
    cos = (u * v).sum()
    return cos / temperature if kappa is None else bounded_similarity(cos, temperature, kappa)


def _multi_positive_reference(z_a, z_b, groups, temperature, symmetric, negatives, kappa):
    """SupCon's L_out written out query by query: candidates and positives listed by hand."""
    a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    m, ids = len(a), groups.tolist()
    if negatives == "cross":
        directions = [(a, b), (b, a)] if symmetric else [(a, b)]
        queries = [(q[i], [(k[j], ids[j] == ids[i]) for j in range(m)])
                   for q, k in directions for i in range(m)]
        per_direction = m
    else:
        rows, row_ids = torch.cat([a, b]), ids + ids
        queries = [(rows[i], [(rows[j], row_ids[j] == row_ids[i])
                              for j in range(2 * m) if j != i])
                   for i in range(2 * m if symmetric else m)]
        per_direction = len(queries)
    losses = []
    for query, candidates in queries:
        logits = torch.stack([_logit(query, key, temperature, kappa) for key, _ in candidates])
        log_prob = logits - logits.logsumexp(0)
        positives = [log_prob[j] for j, (_, pos) in enumerate(candidates) if pos]
        losses.append(-torch.stack(positives).mean())
    # the mean over each direction's queries, then over directions
    chunks = torch.stack(losses).view(-1, per_direction).mean(dim=1)
    return chunks.mean()


def _grads(fn, z_a, z_b):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = fn(z_a, z_b)
    return (loss.detach(), *torch.autograd.grad(loss, (z_a, z_b)))


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("negatives, symmetric", [("cross", True), ("cross", False),
                                                  ("all", True), ("all", False)])
@pytest.mark.parametrize("kappa", [None, 1 / 64])
def test_multi_positive_nce_matches_the_written_out_loss(name, negatives, symmetric, kappa):
    groups = torch.tensor(GROUPS[name])
    g = torch.Generator().manual_seed(len(groups))
    z_a = torch.randn(len(groups), 5, generator=g, dtype=torch.float64)
    z_b = z_a + 0.5 * torch.randn(len(groups), 5, generator=g, dtype=torch.float64)
    got = _grads(lambda a, b: multi_positive_nce(a, b, groups, 0.2, symmetric, negatives,
                                                 kappa), z_a, z_b)
    want = _grads(lambda a, b: _multi_positive_reference(a, b, groups, 0.2, symmetric,
                                                         negatives, kappa), z_a, z_b)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("negatives, symmetric", [("cross", True), ("all", False)])
def test_multi_positive_nce_with_distinct_groups_is_info_nce(negatives, symmetric):
    z_a, z_b = torch.randn(2, 6, 8, dtype=torch.float64)
    groups = torch.tensor([4, 0, 2, 9, 1, 3])
    torch.testing.assert_close(
        multi_positive_nce(z_a, z_b, groups, 0.1, symmetric, negatives),
        info_nce_ref(z_a, z_b, 0.1, symmetric, negatives))


def test_multi_positive_nce_refuses_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"groups must be \(4,\) integer"):
        multi_positive_nce(z, z, torch.zeros(4))
    with pytest.raises(ValueError, match="one shape"):
        multi_positive_nce(z, z[:3], torch.arange(4))
    with pytest.raises(ValueError, match="negatives"):
        multi_positive_nce(z, z, torch.arange(4), negatives="some")


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("symmetric", [True, False])
def test_bounded_info_nce_with_groups_matches_the_written_out_loss(name, symmetric):
    groups = torch.tensor(GROUPS[name])
    m = len(groups)
    z_a, z_b = torch.randn(2, m, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(m))

    def reference(z_a, z_b):
        a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
        terms = []
        for q, k in [(a, b), (b, a)] if symmetric else [(a, b)]:
            for i in range(m):  # the positive, and the keys of other groups
                keys = [j for j in range(m) if j == i or groups[j] != groups[i]]
                logits = torch.stack([_logit(q[i], k[j], 0.07, 0.5) for j in keys])
                terms.append(logits.logsumexp(0) - logits[keys.index(i)])
        return torch.stack(terms).mean()

    got = _grads(lambda a, b: bounded_info_nce(a, b, 0.07, 0.5, symmetric, groups), z_a, z_b)
    want = _grads(reference, z_a, z_b)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


# --- the model --------------------------------------------------------------------------


def _model(**options) -> SPCL:
    torch.manual_seed(0)
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    return SPCL(enc, SPCLConfig(proj_hidden=16, proj_dim=8, **options))


PATIENTS = torch.tensor([3, 1, 3, 0, 3, 1])
VARIANTS = {
    "cross": {},
    "cross one way": dict(symmetric=False),
    "all": dict(negatives="all"),
    "three subsets, predictor": dict(num_subsets=3, predictor_hidden=8, keep=0.75),
    "bounded": dict(similarity="bounded", kappa=0.1, temperature=0.07),
}


def _pair_reference(model, x, plan, same_patient):
    """The model's loss rebuilt from its embeddings with the references: the mean over pairs
    of subsets of info_nce_ref / the bounded loss with the patients' groups (exclude) or of
    the written-out multi-positive loss (positive)."""
    c = model.config
    out = model.embed(x, plan, groups=PATIENTS)
    z = out["z"].double()
    queries = out["queries"].double() if "queries" in out else z[:, :-1]
    losses = []
    for i, j in itertools.combinations(range(c.num_subsets), 2):
        q, k = queries[:, i], z[:, j]
        kappa = c.kappa if c.similarity == "bounded" else None
        if same_patient == "positive":
            losses.append(_multi_positive_reference(q, k, PATIENTS, c.temperature, c.symmetric,
                                                    c.negatives, kappa))
        elif kappa is None:
            losses.append(info_nce_ref(q, k, c.temperature, c.symmetric, c.negatives, PATIENTS))
        else:
            losses.append(bounded_info_nce(q, k, c.temperature, kappa, c.symmetric, PATIENTS))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("same_patient", ["exclude", "positive"])
def test_the_model_loss_is_the_reference_on_its_embeddings(variant, same_patient):
    model = _model(same_patient=same_patient, **VARIANTS[variant])
    assert model.uses_groups
    x = torch.rand(6, 1, 32, 32)
    plan = model.sample_plan(6, torch.Generator().manual_seed(1), "cpu")
    out = model(x, plan=plan, groups=PATIENTS)
    params = [p for p in model.parameters() if p.requires_grad]
    want = _pair_reference(model, x, plan, same_patient)
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out["loss"], params)
    for a, b in zip(got, torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the ids travel in the embedding, for batch_loss of joined micro-batches
    assert torch.equal(model(x, plan=plan, groups=PATIENTS, embed_only=True)["groups"],
                       PATIENTS)


def test_negative_is_todays_loss_and_ignores_ids():
    model = _model()
    assert not model.uses_groups
    x = torch.rand(6, 1, 32, 32)
    plan = model.sample_plan(6, torch.Generator().manual_seed(2), "cpu")
    plain = model(x, plan=plan)
    assert torch.equal(model(x, plan=plan, groups=PATIENTS)["loss"], plain["loss"])
    assert "groups" not in model(x, plan=plan, groups=PATIENTS, embed_only=True)
    z = model.embed(x, plan)["z"]
    assert torch.equal(plain["loss"], model._contrastive(z[:, 0], z[:, 1]))
    # every image its own patient: no same-patient pair, so both options are today's loss
    distinct = torch.arange(6)
    for option in ("exclude", "positive"):
        got = _model(same_patient=option)(x, plan=plan, groups=distinct)["loss"]
        torch.testing.assert_close(got, plain["loss"])


def test_missing_or_bad_ids_are_refused():
    model = _model(same_patient="exclude")
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"--same-patient exclude needs each image's patient "
                                         r"id.*synthetic"):
        model(x)
    with pytest.raises(ValueError, match=r"groups must be a \(2,\) integer tensor"):
        model(x, groups=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"groups must be a \(2,\) integer tensor"):
        model(x, groups=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same_patient must be one of negative, exclude, "
                                         "positive, got 'both'"):
        SPCLConfig(same_patient="both").check()


# --- two processes ----------------------------------------------------------------------

WORLD, M_LOCAL = 2, 3
GLOBAL_IDS = torch.tensor([0, 1, 0, 2, 1, 0])  # patients span the ranks


def _worker(rank, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, WORLD * M_LOCAL, 4, generator=g, dtype=torch.float64)
        weight = torch.randn(5, 4, generator=g, dtype=torch.float64)
        rows = slice(rank * M_LOCAL, (rank + 1) * M_LOCAL)
        for negatives, symmetric in [("cross", True), ("cross", False), ("all", True),
                                     ("all", False)]:
            enc = torch.nn.Linear(4, 5, bias=False, dtype=torch.float64)
            with torch.no_grad():
                enc.weight.copy_(weight)
            ddp = torch.nn.parallel.DistributedDataParallel(enc)
            z = ddp(torch.cat([x[0, rows], x[1, rows]]))
            loss = multi_positive_nce(z[:M_LOCAL], z[M_LOCAL:], GLOBAL_IDS[rows], 0.2,
                                      symmetric, negatives, gather_distributed=True)
            loss.backward()  # DDP averages the gradient over the ranks
            single = torch.nn.Linear(4, 5, bias=False, dtype=torch.float64)
            with torch.no_grad():
                single.weight.copy_(weight)
            want = _multi_positive_reference(single(x[0]), single(x[1]), GLOBAL_IDS, 0.2,
                                             symmetric, negatives, None)
            want.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / WORLD, want.detach())
            torch.testing.assert_close(enc.weight.grad, single.weight.grad)
        del ddp, loss, z
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_info_nce.py: gloo's threads can abort a normal exit


def test_two_processes_see_the_global_batch_and_its_patients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(f"file://{tmp_path}/store",), nprocs=WORLD, join=True)
