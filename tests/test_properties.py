"""Property tests (hypothesis) of the public ops against their definitions and references.

``sample_partitions``: the plan invariants over random shapes, ratios, keeps, masks, blocks and
subset counts. ``partition_attention``: the torch path in fp64, and the Triton path under the
interpreter on tiny shapes, against ``partition_attention_ref`` on random ragged
``cu_seqlens`` (empty and one-token segments included), packed and in place, values and
gradients. ``info_nce`` against ``info_nce_ref``. Invalid inputs: any value drawn for an
argument either runs or raises the documented error naming that argument.

Bounded by the ``ci`` profile of tests/conftest.py (25 examples a test; ``HYPOTHESIS_PROFILE=
thorough`` for 500). Tensors are drawn from a seed that hypothesis draws, so a failure prints
everything needed to reproduce it (the falsifying example and a ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_helpers import needs_kernel

from spcl_fast import info_nce, partition_attention, sample_partitions
from spcl_fast.reference import info_nce_ref, partition_attention_ref

seeds = st.integers(0, 2**32 - 1)
fractions = st.floats(0.01, 0.99)


# ---------------------------------------------------------------- sample_partitions


@st.composite
def partition_args(draw):
    """Arguments of a valid call, and the valid mask as a tensor or None."""
    k = draw(st.sampled_from([2, 2, 3, 4]))
    block = draw(st.sampled_from([1, 1, 2, 3]))
    if block > 1:
        grid = draw(st.integers(1, 7))
        n = grid * grid
    else:
        n = draw(st.integers(1, 40))
    b = draw(st.integers(1, 5))
    args = dict(batch_size=b, num_tokens=n, keep=draw(st.floats(0.05, 1.0)), num_subsets=k,
                block_size=block, shared=draw(st.booleans()))
    if k == 2:
        if draw(st.booleans()):
            lo = draw(fractions)
            args["ratio_range"] = (lo, draw(st.floats(lo, 0.99)))
        else:
            args["ratio"] = draw(fractions)
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(draw(seeds))
        args["valid_mask"] = torch.rand(b, n, generator=g) < draw(st.floats(0.0, 1.0))
    return args, draw(seeds)


def _plan(args, seed):
    return sample_partitions(**args, generator=torch.Generator().manual_seed(seed))


@given(partition_args())
def test_sample_partitions_invariants(case):
    args, seed = case
    plan = _plan(args, seed)
    b, n, k = args["batch_size"], args["num_tokens"], args["num_subsets"]
    cu, idx = plan.cu_seqlens, plan.token_index
    assert cu.dtype == torch.int32 and idx.dtype == torch.int64
    assert cu.shape == (k * b + 1,) and cu[0] == 0 and cu[-1] == idx.numel()
    lengths = plan.seqlens.tolist()
    assert min(lengths) >= 0 and plan.max_seqlen == max(lengths)
    assert idx.unique().numel() == idx.numel() and (idx >= 0).all() and (idx < b * n).all()
    valid = args.get("valid_mask", torch.ones(b, n, dtype=torch.bool))
    assert valid.reshape(-1)[idx].all(), "an invalid token was chosen"
    segments = plan.segment_ids()
    assert torch.equal(idx // n, segments // k), "a segment holds another image's tokens"
    for s in range(k * b):
        rows = idx[cu[s]:cu[s + 1]]
        assert torch.equal(rows, rows.sort().values), "rows not ascending within a segment"
    sizes = torch.tensor(lengths).view(b, k)
    for i in range(b):
        n_valid, row = int(valid[i].sum()), sizes[i].tolist()
        n_keep = sum(row)
        assert n_keep in {max(r, min(n_valid, k)) for r in _rounded(args["keep"] * n_valid)}
        if n_keep < k:
            assert row == [1] * n_keep + [0] * (k - n_keep), "few tokens: one per subset"
            continue
        assert min(row) >= 1, "an image with enough tokens got an empty subset"
        if k > 2:
            assert max(row) - min(row) <= 1, "subsets of unequal size"
        elif "ratio" in args:
            assert row[0] in {min(max(r, 1), n_keep - 1)
                              for r in _rounded(args["ratio"] * n_keep)}
        else:
            lo, hi = args["ratio_range"]
            assert min(max(math.floor(lo * n_keep), 1), n_keep - 1) <= row[0]
            assert row[0] <= max(min(math.ceil(hi * n_keep), n_keep - 1), 1)


def _rounded(x: float) -> set[int]:
    """``round(x)``; both neighbours when ``x`` is within float32 noise of a half (the op
    rounds a float32 product)."""
    if abs(x % 1 - 0.5) < 1e-4:
        return {math.floor(x), math.ceil(x)}
    return {round(x)}


@given(partition_args())
def test_sample_partitions_is_reproducible_and_blocks_stay_whole(case):
    args, seed = case
    a, b = _plan(args, seed), _plan(args, seed)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    block, n, k = args["block_size"], args["num_tokens"], args["num_subsets"]
    if block > 1 and "valid_mask" not in args:
        # Tokens go in block order, so per image only the blocks at the size boundaries
        # (between subsets, and between kept and left out) are split: at most K of them.
        grid = math.isqrt(n)
        per_side = -(-grid // block)
        y, x = torch.arange(n) // grid, torch.arange(n) % grid
        block_of = (y // block) * per_side + x // block
        owner = torch.full((args["batch_size"], n), -1)
        owner.view(-1)[a.token_index] = a.segment_ids() % k
        for row in owner:
            split = sum(row[block_of == j].unique().numel() > 1 for j in range(per_side**2))
            assert split <= k
    if args["shared"] and "valid_mask" not in args and "ratio_range" not in args:
        a_rows = [a.token_index[a.cu_seqlens[k * i]:a.cu_seqlens[k * i + 1]] % n
                  for i in range(args["batch_size"])]
        assert all(torch.equal(r, a_rows[0]) for r in a_rows), "shared split differs by image"


_BAD_PARTITION_VALUES = {
    "batch_size": st.one_of(st.integers(-3, 0), st.floats(), st.booleans(), st.just("2")),
    "num_tokens": st.one_of(st.integers(-3, 0), st.floats(), st.just(None)),
    "ratio": st.one_of(st.floats(), st.just("0.5"), st.just(None)),
    "keep": st.one_of(st.floats(), st.just("1"), st.just(None)),
    "ratio_range": st.one_of(st.tuples(st.floats(), st.floats()), st.just((0.2,)),
                             st.just((0.1, 0.2, 0.3)), st.just(0.3)),
    "num_subsets": st.one_of(st.integers(-2, 1), st.floats(), st.booleans()),
    "block_size": st.one_of(st.integers(-2, 0), st.integers(2, 4), st.floats()),
    "valid_mask": st.sampled_from(["list", "float", "shape", "1d"]),
}


@given(st.sampled_from(sorted(_BAD_PARTITION_VALUES)), st.data())
def test_sample_partitions_rejects_bad_arguments_by_name(name, data):
    value = data.draw(_BAD_PARTITION_VALUES[name], label=name)
    args = dict(batch_size=2, num_tokens=6)
    if name == "valid_mask":
        value = {"list": [[True] * 6] * 2, "float": torch.ones(2, 6),
                 "shape": torch.ones(2, 7, dtype=torch.bool),
                 "1d": torch.ones(12, dtype=torch.bool)}[value]
    args[name] = value
    try:
        plan = sample_partitions(**args)
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("sample_partitions: ") and name in str(exc), str(exc)
    else:  # a value that happens to be valid (ratio 0.3, keep 0.7, num_subsets=True ...)
        assert plan.cu_seqlens[-1] == plan.token_index.numel()


@pytest.mark.parametrize("name,value,error", [
    ("keep", "1", TypeError), ("ratio", None, TypeError), ("ratio_range", (0.2,), TypeError),
    ("ratio_range", 0.3, TypeError), ("valid_mask", [[True] * 6] * 2, ValueError),
])
def test_sample_partitions_argument_types_found_by_hypothesis(name, value, error):
    """These raised Python's own errors (a comparison of str and float, an unpacking, a list
    without .dtype) instead of one naming the argument."""
    with pytest.raises(error, match=f"sample_partitions: {name} must be"):
        sample_partitions(2, 6, **{name: value})


# ---------------------------------------------------------------- partition_attention


HEAD_DIMS, SCALES = st.integers(1, 9), st.floats(0.05, 3.0)


@st.composite
def attention_case(draw, head_dims=HEAD_DIMS, max_len=9, max_segments=5, heads=3,
                   scales=SCALES):
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_segments))
    assume(sum(lengths) > 0 or draw(st.booleans()))  # all-empty plans: sometimes
    inplace = draw(st.booleans())
    extra = draw(st.integers(0, 4)) if inplace else 0
    scale = draw(st.one_of(st.none(), scales))
    return (lengths, draw(st.integers(1, heads)), draw(head_dims), inplace, extra, scale,
            draw(seeds))


def _attention_inputs(case, dtype, device="cpu"):
    lengths, heads, head_dim, inplace, extra, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    rows = total + extra
    token_index = torch.randperm(rows, generator=g)[:total] if inplace else None
    qkv = torch.randn(rows, 3, heads, head_dim, generator=g, dtype=torch.float64)
    qkv = qkv.to(device=device, dtype=dtype).requires_grad_()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    token_index = None if token_index is None else token_index.to(device)
    grad = torch.randn(rows, heads, head_dim, generator=g, dtype=torch.float64)
    return qkv, cu.to(device), max(lengths), token_index, scale, grad.to(device, dtype)


def _out_and_grad(fn, qkv, grad):
    out = fn(*qkv.unbind(1))
    (g,) = torch.autograd.grad(out, qkv, grad)
    return out, g


@given(attention_case())
def test_partition_attention_torch_path_matches_the_reference(case):
    qkv, cu, max_seqlen, token_index, scale, grad = _attention_inputs(case, torch.float64)
    out, g = _out_and_grad(lambda q, k, v: partition_attention(
        q, k, v, cu, max_seqlen, token_index, scale, impl="torch"), qkv, grad)
    ref, g_ref = _out_and_grad(lambda q, k, v: partition_attention_ref(
        q, k, v, cu, token_index, scale), qkv, grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def _check_triton(case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qkv, cu, max_seqlen, token_index, scale, grad = _attention_inputs(case, torch.float32,
                                                                      device)
    out, g = _out_and_grad(lambda q, k, v: partition_attention(
        q, k, v, cu, max_seqlen, token_index, scale, impl="triton"), qkv, grad)
    gt, g_gt = _out_and_grad(lambda q, k, v: partition_attention_ref(
        q, k, v, cu, token_index, scale), qkv.detach().double().requires_grad_(), grad.double())
    # docs/architecture.md §5's rule with ref_lp = the fp32 reference (the interpreter's dots are
    # exact fp32; a GPU's fp32 dots are TF32, hence the tolerance there).
    lp, g_lp = _out_and_grad(lambda q, k, v: partition_attention_ref(
        q, k, v, cu, token_index, scale), qkv, grad)
    # The absolute tolerance scales with the tensor's magnitude: fp32 rounding is relative, and
    # a sharp softmax (a large softmax_scale) makes gradients of size ~20, whose summation in
    # another order (the kernel's online softmax) differs by ~1e-6 of that.
    tol = 1e-5 if device == "cpu" else 5e-3
    for name, kernel, exact, low in zip(("out", "dq", "dk", "dv"), (out, *g.unbind(1)),
                                        (gt, *g_gt.unbind(1)), (lp, *g_lp.unbind(1)),
                                        strict=True):
        if not kernel.numel():
            continue
        err = (kernel.double() - exact).abs().max().item()
        ref_err = (low.double() - exact).abs().max().item()
        scale_tol = tol * max(1.0, exact.abs().max().item())
        assert err <= 2 * ref_err + scale_tol, (name, err, ref_err, scale_tol)


# A kernel program runs as Python under the interpreter: few, tiny cases (about 2 s each), the
# default softmax scale or up to twice it.
@needs_kernel
@pytest.mark.interpret
@settings(max_examples=4)
@given(attention_case(head_dims=st.just(16), max_len=12, max_segments=3, heads=1,
                      scales=st.floats(0.05, 0.5)))
def test_partition_attention_triton_path_matches_the_reference(case):
    _check_triton(case)


# Found by the property test: at softmax_scale 2.0 (8x the default for Dh=16, logits up to ~30)
# dq and dk of size ~20 are within ~1e-6 of them, outside a magnitude-blind 1e-5 tolerance.
@needs_kernel
@pytest.mark.interpret
def test_partition_attention_triton_sharp_softmax():
    _check_triton(([18, 9, 18, 3], 1, 16, False, 0, 2.0, 0))


@st.composite
def bad_attention_call(draw):
    """A call with one argument drawn from a wide space; its name."""
    rows, heads, head_dim = 6, 2, 8
    g = torch.Generator().manual_seed(draw(seeds))
    args = dict(q=torch.randn(rows, heads, head_dim, generator=g),
                k=torch.randn(rows, heads, head_dim, generator=g),
                v=torch.randn(rows, heads, head_dim, generator=g),
                cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), max_seqlen=4,
                token_index=None, softmax_scale=None)
    name = draw(st.sampled_from(["cu_seqlens", "max_seqlen", "token_index", "softmax_scale",
                                 "k", "q"]))
    if name == "cu_seqlens":
        values = draw(st.lists(st.integers(-3, 9), min_size=0, max_size=5))
        dtype = draw(st.sampled_from([torch.int32, torch.int32, torch.int64, torch.float32]))
        args[name] = torch.tensor(values, dtype=dtype)
        args["max_seqlen"] = 9
    elif name == "max_seqlen":
        args[name] = draw(st.one_of(st.integers(-3, 9), st.floats(), st.just(None)))
    elif name == "token_index":
        values = draw(st.lists(st.integers(-2, 8), min_size=6, max_size=6))
        dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32]))
        args[name] = torch.tensor(values, dtype=dtype)
    elif name == "softmax_scale":
        args[name] = draw(st.floats())
    else:
        shape = draw(st.sampled_from([(rows, heads, 9), (rows + 1, heads, head_dim), (rows, 8),
                                      (rows, heads, head_dim)]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64]))
        args[name] = torch.zeros(shape, dtype=dtype) if dtype == torch.int64 else \
            torch.randn(shape, generator=g).to(dtype)
    return name, args


@given(bad_attention_call())
def test_partition_attention_rejects_bad_arguments_by_name(call):
    name, args = call
    try:
        out = partition_attention(**args, impl="torch")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        assert message.startswith("partition_attention: "), message
        named = [name, "max_seqlen"] if name == "cu_seqlens" else [name]
        if name in ("q", "k"):
            named += ["q, k, v", "head_dim"]
        assert any(n in message for n in named), message
    else:  # a draw that is valid after all; finite unless the scale overflows the logits
        assert out.shape == args["q"].shape
        assert torch.isfinite(out).all() or args["softmax_scale"] > 1e30


# ---------------------------------------------------------------- info_nce


@given(st.integers(1, 12), st.integers(1, 16), st.floats(0.05, 2.0), st.booleans(),
       st.sampled_from(["cross", "all"]), seeds)
def test_info_nce_matches_the_reference(m, d, temperature, symmetric, negatives, seed):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    loss = info_nce(z_a, z_b, temperature, symmetric, negatives, impl="torch")
    ref = info_nce_ref(z_a, z_b, temperature, symmetric, negatives)
    grads = torch.autograd.grad(loss, (z_a, z_b))
    ref_grads = torch.autograd.grad(ref, (z_a, z_b))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@given(st.sampled_from(["temperature", "symmetric", "negatives", "z_b"]), st.data())
def test_info_nce_rejects_bad_arguments_by_name(name, data):
    g = torch.Generator().manual_seed(1)
    args = dict(z_a=torch.randn(4, 8, generator=g), z_b=torch.randn(4, 8, generator=g),
                temperature=0.1, symmetric=True, negatives="cross")
    drawn = {
        "temperature": st.one_of(st.floats(), st.integers(-2, 2), st.booleans(),
                                 st.just("0.1"), st.just(None)),
        "symmetric": st.one_of(st.booleans(), st.integers(0, 1), st.just("yes")),
        "negatives": st.one_of(st.sampled_from(["cross", "all"]), st.text(max_size=5)),
        "z_b": st.sampled_from([(4, 9), (5, 8), (8,), (4, 8)]),
    }[name]
    value = data.draw(drawn, label=name)
    args[name] = torch.randn(value, generator=torch.Generator().manual_seed(0)) \
        if name == "z_b" else value
    try:
        loss = info_nce(**args, impl="torch")
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("info_nce: ") and name in str(exc), str(exc)
    else:
        assert torch.isfinite(loss)


# Found by the property test: a temperature whose inverse overflows float32 gave a NaN loss.
def test_info_nce_refuses_temperatures_below_its_floor():
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for temperature in (1e-40, 9e-5):
        with pytest.raises(ValueError, match="temperature must be at least 0.0001"):
            info_nce(z, z.flip(0), temperature=temperature, impl="torch")
    # The smallest accepted temperature still gives a finite loss and finite gradients.
    z = z.requires_grad_()
    loss = info_nce(z, z.flip(0), temperature=1e-4, impl="torch")
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
