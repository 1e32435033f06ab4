"""The compiled kernels (prsgd_hvd._C) against their pure-torch reference (ops_reference).

CPU and CUDA share every test body (pytorch/extension-cpp style); the CUDA cases skip where
torch has no GPU. Data is random with a fresh seed per test, printed so that a failure shows it
(pytest prints captured stdout of failing tests); set PRSGD_TEST_SEED to replay one. Outputs are
filled with NaN before each call, so an element a kernel forgets to write shows up.

Everything skips when the extension is not built, except test_extension_required, which fails
when PRSGD_REQUIRE_EXTENSION=1 (CI sets it) and the extension did not load.
"""
from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from prsgd_hvd import ops
from prsgd_hvd import ops_reference as ref

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"prsgd_hvd._C not built: {ops.extension_error()}")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))]

# Must match kChunkSize in csrc/segment_table.h and at::internal::GRAIN_SIZE on CPU.
CHUNK = 32768
# Element counts around every boundary the kernels have: empty, one element, the CPU vector
# step (16 fp32 / 8 fp64 with the generic 32-byte Vectorized, 64 with AVX-512), the CUDA ILP
# of 4, odd primes (never aligned after the first), and the CUDA chunk / CPU grain size +-1.
SMALL_SHAPES = [(), (0,), (1,), (3,), (4,), (5,), (7,), (8,), (9,), (15,), (16,), (17,),
                (31,), (32,), (33,), (63,), (64,), (65,), (13,), (2, 3, 5), (101,), (0, 4),
                (1, 1, 1), (4099,)]
BIG_SHAPES = [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,), (97, 89)]

PAIRS = [  # (flat dtype, param dtype) combinations the unflatten kernels support
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
]
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@pytest.fixture
def gen():
    seed = int(os.environ.get("PRSGD_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"PRSGD_TEST_SEED={seed}")
    g = torch.Generator().manual_seed(seed)
    yield g


def rand(shape, dtype, device, g, lo=-1.0, hi=1.0):
    x = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return x.to(dtype=dtype, device=device)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_close(actual, expected, what=""):
    tol = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12),
           torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: unwritten (NaN) elements"
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def make_params(shapes, dtype, device, g):
    return [rand(s, dtype, device, g) for s in shapes]


# ---------------------------------------------------------------------------------------------

def test_extension_required():
    if os.environ.get("PRSGD_REQUIRE_EXTENSION") != "1":
        pytest.skip("PRSGD_REQUIRE_EXTENSION is not set")
    assert ops.has_extension(), f"prsgd_hvd._C failed to load: {ops.extension_error()}"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src", FLOATS, ids=_name)
@pytest.mark.parametrize("dst", FLOATS + [None], ids=lambda d: _name(d) if d else "none")
def test_flatten(device, src, dst, gen):
    tensors = make_params(SMALL_SHAPES + BIG_SHAPES[:2], src, device, gen)
    base = rand((40, 30), src, device, gen)
    tensors += [base.t(), base[::3, 1:], rand((5, 6, 7), src, device, gen).permute(2, 0, 1),
                rand((64,), src, device, gen)[1:], base.t()[0]]
    total = sum(t.numel() for t in tensors)
    if dst is None:
        out = ops.flatten(tensors)
        expected = ref.flatten(tensors)
    else:
        out = torch.full((total,), float("nan"), dtype=dst, device=device)
        result = ops.flatten(tensors, out)
        assert result.data_ptr() == out.data_ptr()
        expected = ref.flatten(tensors, torch.empty_like(out))
    assert out.device.type == device
    assert torch.equal(out, expected), f"{_name(src)} -> {dst}"  # a pure copy/cast is exact


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_flatten_mixed_dtypes_and_many(device, gen):
    r = random.Random(gen.initial_seed())
    tensors = [rand((r.randrange(0, 300),), r.choice(FLOATS), device, gen) for _ in range(300)]
    for dst in (torch.float32, torch.bfloat16):
        out = torch.full((sum(t.numel() for t in tensors),), float("nan"), dtype=dst, device=device)
        ops.flatten(tensors, out)
        assert torch.equal(out, ref.flatten(tensors, torch.empty_like(out)))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("shapes", ["small", "big"])
def test_unflatten_average(device, flat_dtype, param_dtype, shapes, gen):
    shapes = SMALL_SHAPES if shapes == "small" else BIG_SHAPES
    total = sum(torch.Size(s).numel() for s in shapes)
    flat = rand((total,), flat_dtype, device, gen, -4, 4)
    scale = 1.0 / 3.0
    params = [torch.full(s, float("nan"), dtype=param_dtype, device=device) for s in shapes]
    expected = [torch.empty_like(p) for p in params]
    ops.unflatten_average_(flat, params, scale=scale)
    ref.unflatten_average_(flat, expected, scale=scale)
    for i, (a, e) in enumerate(zip(params, expected)):
        assert_close(a, e, f"params[{i}] shape {tuple(e.shape)}")


def _sgd_case(device, flat_dtype, param_dtype, shapes, gen, *, first_step, momentum, none_grads,
              **opts):
    """Runs the kernel and the reference on identical copies; returns both results."""
    n = len(shapes)
    total = sum(torch.Size(s).numel() for s in shapes)
    flat = rand((total,), flat_dtype, device, gen, -4, 4)
    grads = [rand(s, param_dtype, device, gen) for s in shapes]
    for i in none_grads:
        grads[i] = None
    if momentum == 0:
        bufs = [None] * n
    else:
        bufs = [rand(s, param_dtype, device, gen) for s in shapes]
    firsts = first_step if isinstance(first_step, bool) else [bool(f) for f in first_step]
    is_first = [firsts] * n if isinstance(firsts, bool) else firsts
    # Outputs start as NaN; buffers too where first_step means they are write-only.
    params = [torch.full(s, float("nan"), dtype=param_dtype, device=device) for s in shapes]
    bufs_k = [None if b is None else (nan_like(b) if is_first[i] and grads[i] is not None
                                      else b.clone()) for i, b in enumerate(bufs)]
    params_r = [torch.empty_like(p) for p in params]
    bufs_r = [None if b is None else b.clone() for b in bufs]
    kw = dict(scale=0.25, lr=0.05, momentum=momentum, first_step=firsts, **opts)
    ops.unflatten_average_sgd_(flat, params, grads, bufs_k, **kw)
    ref.unflatten_average_sgd_(flat, params_r, grads, bufs_r, **kw)
    return params, params_r, bufs_k, bufs_r, bufs, grads


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("momentum,dampening,nesterov",
                         [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True),
                          (0.9, 0.3, False), (0.9, 0.3, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("first_step", ["true", "false", "mixed"])
def test_unflatten_average_sgd(device, flat_dtype, param_dtype, momentum, dampening, nesterov,
                               weight_decay, maximize, first_step, gen):
    shapes = SMALL_SHAPES
    n = len(shapes)
    firsts = {"true": True, "false": False,
              "mixed": [bool(i % 3 == 1) for i in range(n)]}[first_step]
    none_grads = [2, 5, 11, n - 1]  # a 0-dim, and some that straddle vector boundaries
    params, params_r, bufs_k, bufs_r, bufs, grads = _sgd_case(
        device, flat_dtype, param_dtype, shapes, gen, first_step=firsts, momentum=momentum,
        none_grads=none_grads, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, maximize=maximize)
    for i in range(n):
        assert_close(params[i], params_r[i], f"params[{i}] shape {shapes[i]}")
        if bufs[i] is None:
            continue
        if grads[i] is None:  # no grad: the buffer is left alone
            assert torch.equal(bufs_k[i], bufs[i]), f"momentum_buffers[{i}] was modified"
        else:
            assert_close(bufs_k[i], bufs_r[i], f"momentum_buffers[{i}]")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS[:1] + PAIRS[-1:], ids=lambda d: _name(d))
def test_unflatten_average_sgd_big_and_many(device, flat_dtype, param_dtype, gen):
    r = random.Random(gen.initial_seed())
    # 300 tensors: more than one MultiTensorApply-style launch holds (it takes ~110), plus
    # chunk-boundary sizes.
    shapes = [(r.choice([0, 1, 3, 64, 65, 257, 1000]),) for _ in range(300)] + BIG_SHAPES
    params, params_r, bufs_k, bufs_r, _, _ = _sgd_case(
        device, flat_dtype, param_dtype, shapes, gen, first_step=False, momentum=0.9,
        none_grads=[0, 7, 299], dampening=0.1, weight_decay=1e-3, nesterov=False,
        maximize=False)
    for i in range(len(shapes)):
        assert_close(params[i], params_r[i], f"params[{i}]")
        if i not in (0, 7, 299):
            assert_close(bufs_k[i], bufs_r[i], f"momentum_buffers[{i}]")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(device, threads, gen):
    shapes = [(CHUNK * 3 + 5,), (17,), (CHUNK - 1,)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params, params_r, bufs_k, bufs_r, _, _ = _sgd_case(
            device, torch.float32, torch.float32, shapes, gen, first_step=False, momentum=0.9,
            none_grads=[], dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(params + bufs_k, params_r + bufs_r):
        assert_close(a, e)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov,dampening,weight_decay,maximize",
                         [(False, 0.0, 0.0, False), (True, 0.0, 5e-4, False),
                          (False, 0.2, 1e-2, True)])
def test_matches_torch_optim_sgd(device, nesterov, dampening, weight_decay, maximize, gen):
    """Two rounds against torch.optim.SGD run on a copy whose params were set to flat * scale."""
    shapes = [(8, 3, 3, 3), (8,), (16, 8), (), (5,), (0,)]
    lr, momentum, scale = 0.1, 0.9, 0.5
    ours = [torch.nn.Parameter(rand(s, torch.float32, device, gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torch.optim.SGD(theirs, lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                          foreach=False)
    bufs = [torch.empty_like(p) for p in ours]
    total = sum(p.numel() for p in ours)
    for rnd in range(2):
        flat = rand((total,), torch.float32, device, gen, -2, 2)  # the allreduced sum
        grads = [rand(s, torch.float32, device, gen) for s in shapes]
        grads[4] = None  # this param only takes the average
        with torch.no_grad():
            ref.unflatten_average_(flat, theirs, scale=scale)
        for p, g in zip(theirs, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ops.unflatten_average_sgd_(flat, ours, grads, bufs, scale=scale, lr=lr, momentum=momentum,
                                   dampening=dampening, weight_decay=weight_decay,
                                   nesterov=nesterov, maximize=maximize, first_step=rnd == 0)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a.detach(), b.detach(), f"round {rnd} params[{i}]")
            if grads[i] is not None:
                assert_close(bufs[i], opt.state[b]["momentum_buffer"], f"round {rnd} buf[{i}]")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_params_requiring_grad(device, gen):
    p = torch.nn.Parameter(rand((10,), torch.float32, device, gen))
    flat = rand((10,), torch.float32, device, gen)
    ops.unflatten_average_(flat, [p], scale=2.0)
    assert torch.equal(p.detach(), flat * 2.0)
    out = ops.flatten([p])
    assert not out.requires_grad and torch.equal(out, flat * 2.0)


# ---- divergence (NOTE: [Divergence] in csrc/common.h) ---------------------------------------


def assert_sum_close(actual, expected, what=""):
    """Two float64 sums of the same float32/float64 squares, added in different orders."""
    assert actual.dtype == torch.float64 and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-300,
                               msg=lambda m: f"{what}: {m}")


def _divergence_round(op, flat, params, grads, bufs, divergence, **kw):
    if op == "avg":
        kw = dict(scale=kw["scale"])
        return lambda impl: impl.unflatten_average_(flat, params, divergence=divergence, **kw)
    return lambda impl: impl.unflatten_average_sgd_(flat, params, grads, bufs,
                                                    divergence=divergence, **kw)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("op", ["avg", "sgd"])
@pytest.mark.parametrize("shapes", ["small", "big"])
def test_divergence(device, flat_dtype, param_dtype, op, shapes, gen):
    """Two rounds on the same tensors: the sums add up, and they match the reference; the
    params and buffers are bit-identical to a run without divergence."""
    shapes = SMALL_SHAPES if shapes == "small" else BIG_SHAPES + [(), (0,)]
    n = len(shapes)
    total = sum(torch.Size(s).numel() for s in shapes)
    kw = dict(scale=0.25, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ours = make_params(shapes, param_dtype, device, gen)
    theirs = [p.clone() for p in ours]
    plain = [p.clone() for p in ours]
    grads = [rand(s, param_dtype, device, gen) for s in shapes]
    grads[1] = grads[n - 3] = None
    bufs = [rand(s, param_dtype, device, gen) for s in shapes]
    bufs_r, bufs_p = [b.clone() for b in bufs], [b.clone() for b in bufs]
    div = torch.full((1,), 1.5, dtype=torch.float64, device=device)
    div_r = div.clone()
    for rnd in range(2):
        flat = rand((total,), flat_dtype, device, gen, -4, 4)
        _divergence_round(op, flat, ours, grads, bufs, div, **kw)(ops)
        _divergence_round(op, flat, theirs, grads, bufs_r, div_r, **kw)(ref)
        _divergence_round(op, flat, plain, grads, bufs_p, None, **kw)(ops)
        assert_sum_close(div, div_r, f"round {rnd}")
        assert div.item() > 1.5
        for i in range(n):
            assert torch.equal(ours[i], plain[i]), f"round {rnd}: params[{i}] changed by divergence"
            assert torch.equal(bufs[i], bufs_p[i]), f"round {rnd}: buffers[{i}] changed by divergence"
            assert_close(ours[i], theirs[i], f"round {rnd} params[{i}]")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["avg", "sgd"])
def test_divergence_is_distance_to_average_before_step(device, op, gen):
    """Hand-checkable values: params 3 (0-dim) and [1, 2], average 2 everywhere."""
    params = [torch.tensor(3.0, device=device), torch.tensor([1.0, 2.0], device=device)]
    flat = torch.full((3,), 8.0, device=device)
    div = torch.zeros((), dtype=torch.float64, device=device)  # 0-dim is fine too
    grads = [torch.ones_like(p) for p in params]
    _divergence_round(op, flat, params, grads, [None, None], div, scale=0.25, lr=0.5)(ops)
    assert div.item() == 1.0 + 1.0 + 0.0  # (3-2)^2 + (1-2)^2 + (2-2)^2, before the step
    expected = 2.0 if op == "avg" else 1.5
    assert all(torch.all(p == expected) for p in params)
    ops.unflatten_average_(flat[:0], [], scale=1.0, divergence=div)  # no elements: adds 0
    assert div.item() == 2.0


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_divergence_is_deterministic(device, gen):
    """The same inputs give the same bits, whatever the thread count (CPU) or timing (CUDA)."""
    shapes = [(CHUNK * 3 + 5,), (17,), (CHUNK - 1,), (), (2 * CHUNK,)]
    init = make_params(shapes, torch.float32, device, gen)
    flat = rand((sum(p.numel() for p in init),), torch.float32, device, gen, -4, 4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            div = torch.zeros(1, dtype=torch.float64, device=device)
            ops.unflatten_average_(flat, [p.clone() for p in init], scale=0.5, divergence=div)
            results.append(div)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results), results


# ---- accumulate: a delayed merge in one pass (NOTE: [Accumulate] in csrc/common.h) ----------

def assert_bits(actual, expected, what=""):
    """Same dtype, shape and bits (NaN payloads included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.reshape(-1).view(bits), expected.reshape(-1).view(bits)
    if not torch.equal(a, e):
        i = int((a != e).nonzero()[0])
        raise AssertionError(f"{what}: {int((a != e).sum())} of {a.numel()} elements differ; "
                             f"first at {i}: {actual.reshape(-1)[i].item()!r} vs "
                             f"{expected.reshape(-1)[i].item()!r}")


# The SGD options of the fused merge, as test_unflatten_average_sgd combines them (None: the
# plain accumulate of unflatten_average_).
ACCUMULATE_VARIANTS = {
    "avg": None,
    "sgd": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "momentum": dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False),
    "nesterov_wd": dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
                        maximize=False),
    "dampened_maximize": dict(momentum=0.9, dampening=0.3, weight_decay=1e-3, nesterov=False,
                              maximize=True),
}


def _accumulate_inputs(device, flat_dtype, param_dtype, shapes, align, gen, variant):
    """Old params, a flat buffer in the layout, grads (some None) and buffers (first steps
    mixed: those are prefilled with NaN, being write-only)."""
    n = len(shapes)
    old = make_params(shapes, param_dtype, device, gen)
    flat = rand((ops.segment_layout(shapes, flat_dtype, align=align)[-1],), flat_dtype, device,
                gen, -4, 4)
    opts = ACCUMULATE_VARIANTS[variant]
    grads = bufs = firsts = None
    if opts is not None:
        grads = [None if i % 7 == 2 else rand(s, param_dtype, device, gen)
                 for i, s in enumerate(shapes)]
        firsts = [i % 3 == 1 for i in range(n)]
        bufs = [None] * n
        if opts["momentum"] != 0:
            bufs = [nan_like(p) if firsts[i] and grads[i] is not None
                    else rand(s, param_dtype, device, gen) for i, (s, p) in enumerate(zip(shapes, old))]
    return old, flat, grads, bufs, firsts, opts


def _accumulate(impl, flat, params, grads, bufs, firsts, opts, *, scale, align, divergence=None):
    if opts is None:
        impl.unflatten_average_(flat, params, scale=scale, divergence=divergence, align=align,
                                accumulate=True)
    else:
        impl.unflatten_average_sgd_(flat, params, grads, bufs, scale=scale, lr=0.05,
                                    first_step=firsts, divergence=divergence, align=align,
                                    accumulate=True, **opts)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("variant", list(ACCUMULATE_VARIANTS))
@pytest.mark.parametrize("align", [1, ops.PADDED])
def test_accumulate_matches_reference_bit_for_bit(device, flat_dtype, param_dtype, variant,
                                                  align, gen):
    """params = old params + flat * scale (then the SGD step), every element: the kernel and
    the reference agree to the bit on params and buffers, at scale 1 (a merge) and another
    scale, with and without divergence, which is the distance from the old params to the
    point before the step."""
    shapes = SMALL_SHAPES + BIG_SHAPES[:3]  # chunk / grain boundaries: several threads
    old, flat, grads, bufs, firsts, opts = _accumulate_inputs(
        device, flat_dtype, param_dtype, shapes, align, gen, variant)
    for scale, measure in ((1.0, False), (1.0, True), (0.3, True)):
        ours, theirs = [p.clone() for p in old], [p.clone() for p in old]
        ob = None if bufs is None else [None if b is None else b.clone() for b in bufs]
        tb = None if bufs is None else [None if b is None else b.clone() for b in bufs]
        div = torch.full((1,), 0.5, dtype=torch.float64, device=device) if measure else None
        div_r = None if div is None else div.clone()
        _accumulate(ops, flat, ours, grads, ob, firsts, opts, scale=scale, align=align,
                    divergence=div)
        _accumulate(ref, flat, theirs, grads, tb, firsts, opts, scale=scale, align=align,
                    divergence=div_r)
        for i in range(len(shapes)):
            assert_bits(ours[i], theirs[i], f"scale {scale}: params[{i}] shape {shapes[i]}")
            if ob is not None and ob[i] is not None:
                assert_bits(ob[i], tb[i], f"scale {scale}: momentum_buffers[{i}]")
        if div is not None:
            assert_sum_close(div, div_r, f"scale {scale}")
            assert div.item() > 0.5
    # Guard: the old params count (an op that overwrote them would give the same bits only
    # if they were all zero).
    plain = [p.clone() for p in old]
    if opts is None:
        ops.unflatten_average_(flat, plain, scale=0.3, align=align)
    else:
        ops.unflatten_average_sgd_(flat, plain, grads,
                                   [None if b is None else b.clone() for b in bufs], scale=0.3,
                                   lr=0.05, first_step=firsts, align=align, **opts)
    assert any(not torch.equal(a, b) for a, b in zip(plain, ours) if a.numel())


# The bucket pairs of a round (prsgd_hvd.averaging.flat_dtype_for): what a merge meets.
BUCKET_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.float16),
                (torch.float32, torch.bfloat16), (torch.float64, torch.float64)]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", BUCKET_PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("variant", ["avg", "nesterov_wd", "dampened_maximize"])
@pytest.mark.parametrize("impl", ["ext", "reference"])
def test_accumulate_is_the_three_pass_merge(device, flat_dtype, param_dtype, variant, impl, gen):
    """What the delayed merge computed before it was one pass -- flatten x into the flat
    buffer, add the correction, write that at scale 1 (with the fused SGD step) -- is what
    accumulate computes from the correction alone, to the bit (prsgd_hvd.streaming.merge)."""
    k = ops if impl == "ext" else ref
    shapes = SMALL_SHAPES + BIG_SHAPES[:2]
    old, correction, grads, bufs, firsts, opts = _accumulate_inputs(
        device, flat_dtype, param_dtype, shapes, ops.PADDED, gen, variant)
    one, three = [p.clone() for p in old], [p.clone() for p in old]
    b1 = None if bufs is None else [None if b is None else b.clone() for b in bufs]
    b3 = None if bufs is None else [None if b is None else b.clone() for b in bufs]
    _accumulate(k, correction, one, grads, b1, firsts, opts, scale=1.0, align=ops.PADDED)
    payload = torch.empty_like(correction)
    k.flatten(three, out=payload, align=ops.PADDED)
    payload.add_(correction)
    if opts is None:
        k.unflatten_average_(payload, three, scale=1.0, align=ops.PADDED)
    else:
        k.unflatten_average_sgd_(payload, three, grads, b3, scale=1.0, lr=0.05,
                                 first_step=firsts, align=ops.PADDED, **opts)
    for i in range(len(shapes)):
        assert_bits(one[i], three[i], f"params[{i}] shape {shapes[i]}")
        if b1 is not None and b1[i] is not None:
            assert_bits(b1[i], b3[i], f"momentum_buffers[{i}]")


# ---- errors ---------------------------------------------------------------------------------

ERR = (ValueError, TypeError, RuntimeError)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_errors(device, gen):
    f32 = torch.float32
    p = [rand((3,), f32, device, gen), rand((2, 2), f32, device, gen)]
    flat = rand((7,), f32, device, gen)
    g = [torch.ones_like(t) for t in p]
    b = [torch.zeros_like(t) for t in p]
    sgd = dict(scale=0.5, lr=0.1, momentum=0.9)

    def raises(match, fn, *args, **kw):
        with pytest.raises(ERR, match=match):
            fn(*args, **kw)

    raises("'out' must be 1-D with 7", ops.flatten, p, torch.empty(8, device=device))
    raises("'out' must be 1-D with 7", ops.flatten, p, torch.empty(7, 1, device=device))
    raises("empty", ops.flatten, [])
    raises("tensors\\[0\\] has unsupported dtype", ops.flatten,
           [torch.ones(3, dtype=torch.int64, device=device)], torch.empty(3, device=device))
    raises("'out' must be float32", ops.flatten, p, torch.empty(7, dtype=torch.int32,
                                                                device=device))
    raises("'flat' must be 1-D with 7", ops.unflatten_average_, flat[:6], p, scale=1.0)
    raises("'flat' must be 1-D with 7", ops.unflatten_average_sgd_, flat[:6], p, g, b, **sgd)
    raises("'flat' must be contiguous", ops.unflatten_average_,
           rand((14,), f32, device, gen)[::2], p, scale=1.0)
    raises("unsupported dtypes.*params\\[1\\]", ops.unflatten_average_, flat,
           [p[0], p[1].double()], scale=1.0)
    raises("unsupported dtypes", ops.unflatten_average_, flat.half(), p, scale=1.0)
    # ops.* routes strided params to the reference (test_strided_tensors_take_the_reference);
    # the compiled op itself refuses them by name.
    raises("params\\[1\\] must be contiguous", torch.ops.prsgd_hvd.unflatten_average_, flat,
           [p[0], p[1].t()], 1.0)
    raises("same length", ops.unflatten_average_sgd_, flat, p, g[:1], b, **sgd)
    raises("same length", ops.unflatten_average_sgd_, flat, p, g, b[:1], **sgd)
    raises("first_step", ops.unflatten_average_sgd_, flat, p, g, b, first_step=[True], **sgd)
    raises("grads\\[1\\] has shape", ops.unflatten_average_sgd_, flat, p,
           [g[0], torch.ones(4, device=device)], b, **sgd)
    raises("grads\\[0\\] has dtype", ops.unflatten_average_sgd_, flat, p,
           [g[0].double(), g[1]], b, **sgd)
    raises("grads\\[1\\] must be contiguous", torch.ops.prsgd_hvd.unflatten_average_sgd_, flat,
           p, [g[0], g[1].t()], b, [False, False], 0.5, 0.1, 0.9, 0.0, 0.0, False, False, None)
    raises("momentum_buffers\\[1\\] is None", ops.unflatten_average_sgd_, flat, p, g,
           [b[0], None], **sgd)
    raises("momentum_buffers\\[0\\] has shape", ops.unflatten_average_sgd_, flat, p, g,
           [torch.zeros(2, device=device), b[1]], **sgd)
    raises("momentum_buffers\\[1\\] has dtype", ops.unflatten_average_sgd_, flat, p, g,
           [b[0], b[1].half()], **sgd)
    for name, fn, args, kwargs in [("unflatten_average_", ops.unflatten_average_, (flat, p),
                                    dict(scale=1.0)),
                                   ("unflatten_average_sgd_", ops.unflatten_average_sgd_,
                                    (flat, p, g, b), sgd)]:
        d64 = dict(dtype=torch.float64, device=device)
        raises(f"{name}: 'divergence' must be a float64 tensor", fn, *args,
               divergence=torch.zeros(1, device=device), **kwargs)
        raises("'divergence' must have exactly one element, got shape \\[2\\]", fn, *args,
               divergence=torch.zeros(2, **d64), **kwargs)
        raises("'divergence' must have exactly one element", fn, *args,
               divergence=torch.zeros(0, **d64), **kwargs)
        if device == "cuda":
            raises("'divergence' is on cpu but 'flat' is on cuda", fn, *args,
                   divergence=torch.zeros(1, dtype=torch.float64), **kwargs)
        else:  # no second device here: the dispatcher refuses the mix before our check
            with pytest.raises(ERR):
                fn(*args, divergence=torch.zeros(1, dtype=torch.float64, device="meta"), **kwargs)
        # the reference checks the same things with the same words
        ref_fn = getattr(ref, name)
        raises("'divergence' must be a float64", ref_fn, *args,
               divergence=torch.zeros(1, device=device), **kwargs)
        raises("'divergence' is on meta", ref_fn, *args,
               divergence=torch.zeros(1, dtype=torch.float64, device="meta"), **kwargs)
    # momentum 0: buffers may be None; a missing grad needs no buffer either.
    ops.unflatten_average_sgd_(flat, p, g, [None, None], scale=0.5, lr=0.1)
    ops.unflatten_average_sgd_(flat, p, [g[0], None], [b[0], None], **sgd)
    if device == "cuda":
        cpu = [t.cpu() for t in p]
        raises("params\\[0\\] is on cpu", ops.unflatten_average_, flat, cpu, scale=1.0)
        raises("grads\\[0\\] is on cpu", ops.unflatten_average_sgd_, flat, p,
               [g[0].cpu(), g[1]], b, **sgd)
        raises("momentum_buffers\\[1\\] is on cpu", ops.unflatten_average_sgd_, flat, p, g,
               [b[0], b[1].cpu()], **sgd)
        raises("is on cpu", ops.flatten, cpu, torch.empty(7, device=device))


@needs_ext
def test_schemas_mark_mutation():
    schema = str(torch.ops.prsgd_hvd.unflatten_average_sgd_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor?(b!)[] momentum_buffers" in schema
    assert "Tensor(a!)[] params" in str(torch.ops.prsgd_hvd.unflatten_average_.default._schema)
    # divergence is written in place, last, and optional (old positional calls keep working)
    # accumulate (NOTE: [Accumulate] in csrc/common.h) after them, for the same reason
    assert str(torch.ops.prsgd_hvd.unflatten_average_.default._schema).endswith(
        "Tensor(b!)? divergence=None, int align=1, bool accumulate=False) -> ()")
    assert schema.endswith("Tensor(c!)? divergence=None, int align=1, bool accumulate=False) -> ()")
    # flatten is functional; writing into `out` is its own in-place op, which returns nothing
    # (returning `out` would make it an alias of an output the schema does not declare).
    assert str(torch.ops.prsgd_hvd.flatten.default._schema).endswith(
        "flatten(Tensor[] tensors, int align=1) -> Tensor")
    assert str(torch.ops.prsgd_hvd.flatten_into.default._schema).endswith(
        "flatten_into(Tensor[] tensors, Tensor(a!) out, int align=1) -> ()")


# ---- torch.library.opcheck: schemas, fakes, dispatch (as pytorch/extension-cpp tests its ops) --


def _opcheck_cases(device, align, gen):
    """(name, op, args) for every op with awkward inputs: empty and 0-d tensors, mixed dtypes,
    grads and momentum buffers that are None, divergence off and on."""
    P = torch.ops.prsgd_hvd
    f32, f64 = torch.float32, torch.float64
    shapes = [(3, 5), (), (0,), (17,)]
    params = make_params(shapes, f32, device, gen)
    flat = ref.flatten(params, align=align)
    mixed = [params[0].half(), params[1].bfloat16(), params[2], params[3].double()]
    cases = [("flatten", P.flatten.default, (params, align)),
             ("flatten mixed", P.flatten.default, (mixed, align)),
             ("flatten_into", P.flatten_into.default,
              (mixed, torch.empty(ref.segment_layout(mixed, f32, align=align)[-1], dtype=f32,
                                  device=device), align))]
    for div in (None, torch.zeros(1, dtype=f64, device=device)):
        tag = "divergence" if div is not None else "no divergence"
        cases.append((f"unflatten_average_ {tag}", P.unflatten_average_.default,
                      (flat, [p.clone() for p in params], 0.5, div, align)))
        cases.append((f"unflatten_average_ accumulate {tag}", P.unflatten_average_.default,
                      (flat, [p.clone() for p in params], 1.0, div, align, True)))
        grads = [rand(s, f32, device, gen) for s in shapes]
        grads[1] = None
        full = [rand(s, f32, device, gen) for s in shapes]  # a buffer even where no grad is
        for momentum, bufs in ((0.0, [None] * len(shapes)), (0.9, full),
                               (0.9, full[:1] + [None] + full[2:])):
            nones = sum(b is None for b in bufs)
            cases.append((f"unflatten_average_sgd_ momentum={momentum} {nones} None buffers {tag}",
                          P.unflatten_average_sgd_.default,
                          (flat, [p.clone() for p in params], grads, bufs,
                           [True, False, False, momentum == 0.0], 0.5, 0.1, momentum, 0.0, 1e-2,
                           momentum != 0.0, True, div, align)))
        cases.append((f"unflatten_average_sgd_ accumulate {tag}", P.unflatten_average_sgd_.default,
                      (flat, [p.clone() for p in params], grads, full,
                       [False, True, False, False], 1.0, 0.1, 0.9, 0.1, 1e-2, True, False, div,
                       align, True)))
    return cases


# NOTE: [opcheck and None buffers] torch's auto_functionalized_v2 (what test_aot_dispatch_dynamic,
# i.e. torch.compile, runs for a mutating custom op) fails on a mutable optional-tensor list that
# holds a None: in torch/_higher_order_ops/auto_functionalize.py (2.13.0) it starts the list's
# base index as `{}` and then calls `.append(None)` on it ("'dict' object has no attribute
# 'append'"). The schema is right (`Tensor(b!)?[] momentum_buffers`: None is a param without a
# buffer) and the fake plays no part: a four-line op with that one argument type fails the same
# way. So those cases skip only that test; the same op with every buffer present runs it.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align", [1, ops.PADDED])
def test_opcheck(device, align, gen):
    for name, op, args in _opcheck_cases(device, align, gen):
        utils = OPCHECK_UTILS
        sgd = op is torch.ops.prsgd_hvd.unflatten_average_sgd_.default
        if sgd and any(b is None for b in args[3]):  # args[3]: momentum_buffers
            utils = OPCHECK_UTILS[:-1]  # NOTE: [opcheck and None buffers]
        try:
            torch.library.opcheck(op, args, test_utils=utils)
        except Exception as exc:  # name the case; opcheck's own message says which test failed
            raise AssertionError(f"opcheck({name}, align={align}) on {device}: {exc}") from exc


# ---- padded layout (NOTE: [Segment layout] in csrc/segment_table.h) --------------------------


@pytest.mark.parametrize("flat_dtype", FLOATS, ids=_name)
@pytest.mark.parametrize("align", [1, 2, 8, 16, 64])
def test_segment_layout(flat_dtype, align):
    shapes = [(3,), (0,), (), (5, 2), (1,), (4,), (0, 3), (7,)]
    offsets = ops.segment_layout(shapes, flat_dtype, align=align)
    unit = max(1, align // torch.empty((), dtype=flat_dtype).element_size())
    numels = [torch.Size(s).numel() for s in shapes]
    assert len(offsets) == len(shapes) + 1 and offsets[0] == 0
    for i, n in enumerate(numels):
        assert offsets[i] % unit == 0
        assert offsets[i] + n <= offsets[i + 1] < offsets[i] + n + unit  # least padding
    assert offsets[-1] % unit == 0
    if unit == 1:
        assert offsets[-1] == sum(numels)
    for bad in (0, 3, 12, 8192, 16.0):
        with pytest.raises(ValueError, match="'align' must be a power of two"):
            ops.segment_layout(shapes, flat_dtype, align=bad)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_tensors_take_the_reference(device, dtype, gen):
    """channels_last and transposed params (and their grads and buffers) are averaged and
    stepped exactly as the reference does, instead of being refused by the kernels."""
    def make():
        g2 = torch.Generator().manual_seed(5)
        conv = torch.randn(4, 3, 3, 3, generator=g2).to(device=device, dtype=dtype)
        return [conv.contiguous(memory_format=torch.channels_last),
                torch.randn(5, 3, generator=g2).to(device=device, dtype=dtype).t()]
    flat = rand((108 + 15,), torch.float32, device, gen)
    for op in ("avg", "sgd"):
        got, want = make(), make()
        grads = [torch.ones_like(t) for t in got]
        bufs_got = [torch.full_like(t, 0.5) for t in got]
        bufs_want = [torch.full_like(t, 0.5) for t in want]
        if op == "avg":
            ops.unflatten_average_(flat, got, scale=0.5)
            ref.unflatten_average_(flat, want, scale=0.5)
        else:
            kw = dict(scale=0.5, lr=0.1, momentum=0.9, weight_decay=0.01)
            ops.unflatten_average_sgd_(flat, got, grads, bufs_got, **kw)
            ref.unflatten_average_sgd_(flat, want, grads, bufs_want, **kw)
            for a, b in zip(bufs_got, bufs_want):
                assert torch.equal(a, b)
        for a, b in zip(got, want):
            assert torch.equal(a, b) and a.stride() == b.stride()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src", FLOATS, ids=_name)
@pytest.mark.parametrize("dst", FLOATS, ids=_name)
def test_flatten_padded(device, src, dst, gen):
    tensors = make_params(SMALL_SHAPES + BIG_SHAPES[:1], src, device, gen)
    base = rand((40, 30), src, device, gen)
    tensors += [base.t(), base[::3, 1:], rand((5,), src, device, gen)]  # strided: the copy_ path
    offsets = ops.segment_layout(tensors, dst, align=ops.PADDED)
    out = torch.full((offsets[-1],), float("nan"), dtype=dst, device=device)
    assert ops.flatten(tensors, out, align=16).data_ptr() == out.data_ptr()
    expected = ref.flatten(tensors, torch.empty_like(out), align=16)
    assert torch.equal(out, expected)  # padding written as zeros, values exact
    gaps = torch.ones(offsets[-1], dtype=torch.bool)
    for i, t in enumerate(tensors):
        gaps[offsets[i]:offsets[i] + t.numel()] = False
        assert torch.equal(out[offsets[i]:offsets[i] + t.numel()], t.reshape(-1).to(dst))
    assert gaps.any() and torch.all(out.cpu()[gaps] == 0)
    if dst == src:
        assert torch.equal(ops.flatten(tensors, align=16), expected)  # out allocated: same layout


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=lambda d: _name(d))
@pytest.mark.parametrize("op", ["avg", "sgd"])
def test_unflatten_padded(device, flat_dtype, param_dtype, op, gen):
    """The padded layout end to end: flatten -> (the allreduce's sum) -> unflatten, against the
    reference on the same padded buffer, divergence included."""
    shapes = SMALL_SHAPES + BIG_SHAPES[:1]
    n = len(shapes)
    flat = ops.flatten(make_params(shapes, param_dtype, device, gen),
                       torch.empty(ops.segment_layout(shapes, flat_dtype, align=16)[-1],
                                   dtype=flat_dtype, device=device), align=16)
    flat.mul_(3)  # a stand-in for the sum over 3 ranks; the padding stays zero
    old = make_params(shapes, param_dtype, device, gen)
    ours, theirs = [p.clone() for p in old], [p.clone() for p in old]
    div = torch.zeros(1, dtype=torch.float64, device=device)
    div_r = div.clone()
    if op == "avg":
        ops.unflatten_average_(flat, ours, scale=1 / 3, divergence=div, align=16)
        ref.unflatten_average_(flat, theirs, scale=1 / 3, divergence=div_r, align=16)
        bufs = bufs_r = []
    else:
        grads = [rand(s, param_dtype, device, gen) for s in shapes]
        grads[3] = None
        bufs = [rand(s, param_dtype, device, gen) for s in shapes]
        bufs_r = [b.clone() for b in bufs]
        kw = dict(scale=1 / 3, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                  first_step=[i % 2 == 0 for i in range(n)], align=16)
        ops.unflatten_average_sgd_(flat, ours, grads, bufs, divergence=div, **kw)
        ref.unflatten_average_sgd_(flat, theirs, grads, bufs_r, divergence=div_r, **kw)
    for i in range(n):
        assert_close(ours[i], theirs[i], f"params[{i}]")
    for i, (b, br) in enumerate(zip(bufs, bufs_r)):
        assert_close(b, br, f"momentum_buffers[{i}]")
    assert_sum_close(div, div_r)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_padded_layout_errors(device, gen):
    p = [rand((3,), torch.float32, device, gen), rand((2, 2), torch.float32, device, gen)]
    packed = rand((7,), torch.float32, device, gen)
    with pytest.raises(ERR, match="'align' must be a power of two"):
        ops.flatten(p, align=3)
    with pytest.raises(ERR, match="'align' must be a power of two"):
        ops.unflatten_average_(packed, p, scale=1.0, align=24)
    # a packed buffer is too small for the padded layout (3 -> 4, then 4: 8 elements)
    with pytest.raises(ERR, match="'flat' must be 1-D with 8"):
        ops.unflatten_average_(packed, p, scale=1.0, align=16)
    with pytest.raises(ERR, match="'flat' must be 1-D with 8"):
        ops.unflatten_average_sgd_(packed, p, [None, None], [None, None], scale=1.0, lr=0.1,
                                   align=16)
    with pytest.raises(ERR, match="'out' must be 1-D with 8"):
        ops.flatten(p, torch.empty(7, device=device), align=16)


# ---- CUDA only: the segment table cache across streams and in graphs -------------------------
# (NOTE: [Segment table cache] in csrc/cuda/cuda_ops.cpp)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _dirty_small_pool():
    """Leaves freed small blocks full of 0xff in the caching allocator, so that a table's fresh
    device memory holds garbage (not an old copy of the same table) until its upload lands."""
    junk = [torch.full((64,), -1, dtype=torch.int64, device="cuda") for _ in range(2000)]
    torch.cuda.synchronize()
    del junk


@needs_ext
@needs_cuda
def test_cached_table_waits_for_upload_on_another_stream(gen):
    """Defect: a cache miss uploads the table on stream s1 (here queued behind a long kernel);
    the same tensors on stream s2 hit the cache and must wait for that upload."""
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for trial in range(5):
        _dirty_small_pool()
        tensors = [rand((n,), torch.float32, "cuda", gen) for n in (1000, 3, 40000, 17)]
        total = sum(t.numel() for t in tensors)
        out1 = torch.full((total,), float("nan"), device="cuda")
        out2 = torch.full((total,), float("nan"), device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the upload
            ops.flatten(tensors, out1)
        with torch.cuda.stream(s2):  # no wait on s1: only the cache's event orders this
            ops.flatten(tensors, out2)
        torch.cuda.synchronize()
        expected = ref.flatten(tensors)
        assert torch.equal(out1, expected), f"trial {trial}: s1"
        assert torch.equal(out2, expected), f"trial {trial}: s2 ran before the table was uploaded"


@needs_ext
@needs_cuda
def test_graph_capture_replays_and_survives_cache_eviction(gen):
    shapes = [(64, 3), (5,), (33,), (CHUNK + 1,), ()]
    params = make_params(shapes, torch.float32, "cuda", gen)
    grads = [rand(s, torch.float32, "cuda", gen) for s in shapes]
    bufs = [rand(s, torch.float32, "cuda", gen) for s in shapes]
    offsets = ops.segment_layout(shapes, torch.float32, align=16)
    flat = torch.zeros(offsets[-1], device="cuda")
    kw = dict(scale=0.5, lr=0.1, momentum=0.9, weight_decay=1e-4, align=16)

    def round_():
        ops.flatten(params, flat, align=16)
        flat.mul_(2)  # the allreduce's sum of 2 identical ranks
        ops.unflatten_average_sgd_(flat, params, grads, bufs, **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up puts the tables on the device
        round_()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        round_()
    for replay in range(3):
        if replay == 2:  # push many other tables through the cache: the graph's must stay
            for k in range(300):
                ops.flatten([torch.ones(k + 1, device="cuda")])
            torch.cuda.synchronize()
        expect_p = [p.clone() for p in params]
        expect_b = [b.clone() for b in bufs]
        expect_flat = ref.flatten(expect_p, torch.empty_like(flat), align=16).mul_(2)
        ref.unflatten_average_sgd_(expect_flat, expect_p, grads, expect_b, **kw)
        g.replay()
        torch.cuda.synchronize()
        for i in range(len(shapes)):
            assert_close(params[i], expect_p[i], f"replay {replay} params[{i}]")
            assert_close(bufs[i], expect_b[i], f"replay {replay} buf[{i}]")


@needs_ext
@needs_cuda
def test_graph_capture_refuses_a_table_not_uploaded(gen):
    fresh = [rand((37,), torch.float32, "cuda", gen), rand((5,), torch.float32, "cuda", gen)]
    out = torch.empty(42, device="cuda")  # nothing is allocated or enqueued inside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not on the device yet. Run the same call once"):
        with torch.cuda.graph(g):
            ops.flatten(fresh, out)
    torch.cuda.synchronize()
    assert torch.equal(ops.flatten(fresh), ref.flatten(fresh))  # and nothing is left broken


# ---- CUDA only: every launch configuration computes the same bits ------------------------------
# (NOTE: [Launch configuration] in csrc/cuda/multi_segment.h; the benchmark switches among them)

LAUNCH_CONFIGS = [(1, 0, 1), (1, 0, 0), (0, 0, 1), (0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 2, 2),
                  (0, 2, 4), (0, 3, 0), (1, 3, 4)]


@needs_ext
@needs_cuda
@pytest.mark.parametrize("align", [1, 16])
def test_cuda_launch_configs_agree_with_reference(align, gen):
    """The default and every benchmark configuration: flatten and the fused step (with
    divergence) against the reference, and bit for bit against the default's output."""
    cfg_ops = torch.ops.prsgd_hvd_cuda
    default = tuple(cfg_ops.default_launch_config())
    assert tuple(cfg_ops.launch_config()) == default
    shapes = [(CHUNK * 3 + 5,), (17,), (CHUNK - 1,), (4099,), (2 * CHUNK,), (64, 3, 3), (1,),
              (CHUNK // 4 + 3,)]
    params0 = make_params(shapes, torch.float32, "cuda", gen)
    grads = [rand(s, torch.float32, "cuda", gen) for s in shapes]
    bufs0 = [rand(s, torch.float32, "cuda", gen) for s in shapes]
    offsets = ops.segment_layout(shapes, torch.float32, align=align)
    flat_in = rand((offsets[-1],), torch.float32, "cuda", gen)
    kw = dict(scale=0.25, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, align=align)
    want_p, want_b = [p.clone() for p in params0], [b.clone() for b in bufs0]
    want_div = torch.zeros(1, dtype=torch.float64, device="cuda")
    ref.unflatten_average_sgd_(flat_in, want_p, grads, want_b, divergence=want_div, **kw)
    want_flat = ref.flatten(params0, torch.empty_like(flat_in), align=align)
    first = None
    try:
        for cfg in [default] + LAUNCH_CONFIGS:
            cfg_ops.set_launch_config(*cfg)
            flat = torch.full_like(flat_in, float("nan"))
            ops.flatten(params0, flat, align=align)
            # Divergence reads the params before overwriting them: it needs the real ones.
            params, bufs = [p.clone() for p in params0], [b.clone() for b in bufs0]
            div = torch.zeros(1, dtype=torch.float64, device="cuda")
            ops.unflatten_average_sgd_(flat_in, params, grads, bufs, divergence=div, **kw)
            # Without it, params poisoned with NaN show any element left unwritten.
            poisoned, bufs2 = [nan_like(p) for p in params0], [b.clone() for b in bufs0]
            ops.unflatten_average_sgd_(flat_in, poisoned, grads, bufs2, **kw)
            assert torch.equal(flat, want_flat), f"flatten under {cfg}"
            for i in range(len(shapes)):
                assert_close(params[i], want_p[i], f"{cfg} params[{i}]")
                assert_close(bufs[i], want_b[i], f"{cfg} bufs[{i}]")
                assert torch.equal(poisoned[i], params[i]) and torch.equal(bufs2[i], bufs[i]), \
                    f"{cfg}: with and without divergence differ at [{i}]"
            torch.testing.assert_close(div, want_div, rtol=1e-12, atol=0)
            got = (params, bufs)
            if first is None:
                first = got
            else:
                for a, b in zip(first[0] + first[1], got[0] + got[1]):
                    assert torch.equal(a, b), f"{cfg} differs from the default configuration"
    finally:
        cfg_ops.set_launch_config(*default)
    with pytest.raises(RuntimeError, match="split_log2"):
        cfg_ops.set_launch_config(0, 9, 0)
    assert tuple(cfg_ops.launch_config()) == default
