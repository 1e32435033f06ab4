"""The fused outer round (ops.unflatten_average_outer_sgd_) against its pure-torch reference and
against torch.optim.SGD itself, run on copies (the outer SGD over fp32/fp64 theta0, then the
inner SGD over the parameters).

tests/test_ops.py style: CPU and CUDA share the bodies (CUDA skips without a GPU), a fresh seed
per test printed (PRSGD_TEST_SEED replays it), outputs prefilled with NaN so that an element a
kernel forgets shows up, shapes around every kernel boundary (empty, one, vector widths, odd
primes, the 32768-element chunk +-1). The CUDA kernel runs under the host emulation too
(tests/cuda_emu/emu_cases.py, test_unflatten_outer).
"""
from __future__ import annotations

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
CHUNK = 32768
SHAPES = [(), (0,), (1,), (3,), (4,), (5,), (7,), (8,), (9,), (15,), (16,), (17,), (31,), (33,),
          (63,), (65,), (2, 3, 5), (101,), (0, 4), (4099,), (CHUNK - 1,), (CHUNK + 1,)]
PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
         (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
         (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}
# Outer hyper-parameter sets: DiLoCo (Nesterov), heavy ball with dampening, weight decay and
# maximize, and plain SGD without momentum (no outer buffer at all).
OUTER = {
    "nesterov": dict(outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True),
    "dampened_wd_max": dict(outer_lr=0.5, outer_momentum=0.8, outer_dampening=0.3,
                            outer_weight_decay=1e-2, outer_maximize=True),
    "plain": dict(outer_lr=0.9),
}
INNER = {
    "none": None,
    "sgd": dict(lr=0.05),
    "momentum_nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampened_max": dict(lr=0.05, momentum=0.7, dampening=0.2, maximize=True),
}

# (outer, inner) pairs for the bit-for-bit test: every option of each at least once, with and
# without the inner pass, without the full product (it would cost a minute on 2 cores).
COMBOS = [("nesterov", "none"), ("nesterov", "momentum_nesterov_wd"),
          ("dampened_wd_max", "dampened_max"), ("dampened_wd_max", "none"), ("plain", "sgd"),
          ("plain", "momentum_nesterov_wd")]


def _name(x):
    return str(x).replace("torch.", "")


@pytest.fixture
def gen():
    seed = int(os.environ.get("PRSGD_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"PRSGD_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype, device, g, lo=-1.0, hi=1.0):
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(device)


def assert_bits(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.reshape(-1).view(BITS[actual.dtype]), expected.reshape(-1).view(BITS[actual.dtype])
    if not torch.equal(a, e):
        i = int((a != e).nonzero()[0])
        raise AssertionError(f"{what}: {int((a != e).sum())} of {a.numel()} elements differ; first "
                             f"at {i}: kernel {actual.reshape(-1)[i].item()!r}, reference "
                             f"{expected.reshape(-1)[i].item()!r}")


def assert_close(actual, expected, what):
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3,
           torch.bfloat16: 1.6e-2}[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: unwritten (NaN) elements"
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _case(device, flat_dtype, param_dtype, shapes, g, outer, inner, outer_first, first,
          no_grad=(), align=16):
    """Random inputs; the kernel's outputs and the reference's, on copies of the same inputs."""
    n = len(shapes)
    offsets = ref.segment_layout(shapes, flat_dtype, align=align)
    flat = rand((offsets[-1],), flat_dtype, device, g, -4, 4)
    old = [rand(s, param_dtype, device, g) for s in shapes]
    anchors = [rand(s, flat_dtype, device, g) for s in shapes]
    obufs = [rand(s, flat_dtype, device, g) if outer.get("outer_momentum") else None for s in shapes]
    grads = [None] * n if inner is None else [None if i in no_grad else rand(s, param_dtype, device, g)
                                              for i, s in enumerate(shapes)]
    bufs = [rand(s, param_dtype, device, g) if inner and inner.get("momentum") else None
            for s in shapes]
    ofirsts = [outer_first] * n if isinstance(outer_first, bool) else outer_first
    firsts = [first] * n if isinstance(first, bool) else first
    inner = inner or {}

    def run(kernels):
        # Outputs NaN where they are write-only: the params (divergence off), the buffers that
        # first_step initialises.
        p = [torch.full_like(o, float("nan")) for o in old]
        a = [x.clone() for x in anchors]
        ob = [None if b is None else (torch.full_like(b, float("nan")) if f else b.clone())
              for b, f in zip(obufs, ofirsts)]
        b = [None if x is None else (torch.full_like(x, float("nan")) if f and gr is not None
                                     else x.clone()) for x, f, gr in zip(bufs, firsts, grads)]
        kernels.unflatten_average_outer_sgd_(
            flat, p, a, ob, grads, b, scale=1.0 / 3.0, outer_first_step=ofirsts,
            first_step=firsts, align=align, **outer, **inner)
        return p, a, ob, b

    return run(ops), run(ref), dict(grads=grads, bufs=bufs, obufs=obufs)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS, ids=_name)
@pytest.mark.parametrize("outer,inner", COMBOS)
@pytest.mark.parametrize("first", ["later", "mixed"])
def test_kernel_matches_reference_bit_for_bit(device, flat_dtype, param_dtype, outer, inner,
                                              first, gen):
    n = len(SHAPES)
    # "mixed": first steps (buffers created) and later ones in the same call, the outer and
    # the inner flags crossing each other
    ofirst = {"later": False, "mixed": [i % 3 == 0 for i in range(n)]}[first]
    ifirst = {"later": False, "mixed": [i % 2 == 1 for i in range(n)]}[first]
    no_grad = (2, 9, n - 1)  # a 0-dim, one past a vector width, the last (past a chunk)
    ours, theirs, inputs = _case(device, flat_dtype, param_dtype, SHAPES, gen, OUTER[outer],
                                 INNER[inner], ofirst, ifirst, no_grad=no_grad)
    for i in range(n):
        what = f"shape {SHAPES[i]}"
        assert_bits(ours[0][i], theirs[0][i], f"params[{i}] {what}")
        assert_bits(ours[1][i], theirs[1][i], f"anchors[{i}] {what}")
        if ours[2][i] is not None:
            assert_bits(ours[2][i], theirs[2][i], f"outer_buffers[{i}] {what}")
        if ours[3][i] is not None:
            if inputs["grads"][i] is None:  # no inner update: the inner buffer is left alone
                assert torch.equal(ours[3][i], inputs["bufs"][i]), f"momentum_buffers[{i}] changed"
            else:
                assert_bits(ours[3][i], theirs[3][i], f"momentum_buffers[{i}] {what}")
    # With no inner update the params are the new theta0, rounded once.
    if inner == "none":
        for p, a in zip(ours[0], ours[1]):
            assert torch.equal(p, a.to(p.dtype))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype,param_dtype", PAIRS[:4], ids=_name)
@pytest.mark.parametrize("align", [1, 16])
def test_divergence_and_packed_layout(device, flat_dtype, param_dtype, align, gen):
    """divergence= adds ||old params - average||^2 (before anything is written), and changes
    nothing else; the packed layout (align=1) reads the same segments as the padded one."""
    shapes = SHAPES + [(97, 89)]
    offsets = ref.segment_layout(shapes, flat_dtype, align=align)
    flat = rand((offsets[-1],), flat_dtype, device, gen, -4, 4)
    old = [rand(s, param_dtype, device, gen) for s in shapes]
    anchors = [rand(s, flat_dtype, device, gen) for s in shapes]
    grads = [rand(s, param_dtype, device, gen) for s in shapes]
    kw = dict(scale=0.25, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True,
              outer_first_step=True, lr=0.1, align=align)
    results = []
    for kernels, divergence in ((ops, True), (ops, False), (ref, True)):
        p, a = [o.clone() for o in old], [x.clone() for x in anchors]
        ob = [torch.empty_like(x) for x in anchors]
        div = torch.full((1,), 0.5, dtype=torch.float64, device=device) if divergence else None
        kernels.unflatten_average_outer_sgd_(flat, p, a, ob, grads, None, divergence=div, **kw)
        results.append((p, a, ob, div))
    want = 0.5 + sum(float(((o.double() - s.double() * 0.25) ** 2).sum())
                     for o, s in zip(old, ref._segments(flat, old, align)))
    torch.testing.assert_close(results[0][3], results[2][3], rtol=1e-12, atol=0)
    assert float(results[0][3]) == pytest.approx(want, rel=1e-5)
    for k in range(3):
        for x, y in zip(results[0][k], results[1][k]):
            assert torch.equal(x, y), "divergence= changed the values written"
        for x, y in zip(results[0][k], results[2][k]):
            assert_bits(x, y, "kernel vs reference")


def _torch_outer_round(flat, params, theta, outer_opt, inner_opt, grads, scale):
    """The unfused round with torch's own optimizers: theta.grad = theta - ybar, outer step,
    params <- theta, then (if grads) the inner SGD step on the params."""
    offsets = ref.segment_layout(params, flat.dtype, align=16)
    with torch.no_grad():
        for i, (th, p) in enumerate(zip(theta, params)):
            ybar = flat[offsets[i]:offsets[i] + p.numel()].view(p.shape) * scale
            th.grad = th - ybar
    outer_opt.step()
    with torch.no_grad():
        for th, p in zip(theta, params):
            p.copy_(th)
            th.grad = None
    if grads is not None:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        inner_opt.step()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("outer", list(OUTER))
@pytest.mark.parametrize("inner", ["none", "momentum_nesterov_wd", "dampened_max"])
def test_matches_torch_optim_sgd(device, param_dtype, outer, inner, gen):
    """Three rounds (the first creates both momentum buffers, as torch does) against
    torch.optim.SGD run on copies: the outer SGD over fp32 theta0, the inner over the params."""
    shapes = [(8, 3, 3, 3), (8,), (16, 8), (), (5,), (0,), (CHUNK + 3,)]
    okw = {k[len("outer_"):]: v for k, v in OUTER[outer].items()}
    ikw = INNER[inner]
    flat_dtype = torch.float32
    init = [rand(s, param_dtype, device, gen) for s in shapes]
    # ours: the kernel, with buffers created like FusedOuterSgd creates them
    params = [p.clone() for p in init]
    theta = [p.to(flat_dtype, copy=True) for p in init]
    obufs = [torch.empty_like(t) for t in theta]
    bufs = [torch.empty_like(p) for p in params]
    # theirs: torch's optimizers on copies
    tparams = [torch.nn.Parameter(p.clone()) for p in init]
    ttheta = [p.detach().to(flat_dtype, copy=True) for p in init]
    outer_opt = torch.optim.SGD(ttheta, foreach=False, **okw)
    inner_opt = torch.optim.SGD(tparams, foreach=False, **(ikw or {"lr": 0.0}))
    total = ref.segment_layout(shapes, flat_dtype, align=16)[-1]
    for rnd in range(3):
        flat = rand((total,), flat_dtype, device, gen, -2, 2)  # the summed models
        grads = None if ikw is None else [rand(s, param_dtype, device, gen) for s in shapes]
        if grads is not None:
            grads[4] = None  # this param takes no inner update: it is theta0 after the round
        ops.unflatten_average_outer_sgd_(
            flat, params, theta, obufs, grads, bufs, scale=0.5, outer_first_step=rnd == 0,
            first_step=rnd == 0, align=16, **OUTER[outer], **(ikw or {}))
        _torch_outer_round(flat, tparams, ttheta, outer_opt, inner_opt, grads, 0.5)
        for i in range(len(shapes)):
            what = f"round {rnd} [{i}] shape {shapes[i]}"
            assert_close(theta[i], ttheta[i], f"theta0 {what}")
            # fp16/bf16: torch rounds the inner step's intermediates to 16 bits, the kernel once
            assert_close(params[i], tparams[i].detach(), f"params {what}")
            if okw.get("momentum"):
                assert_close(obufs[i], outer_opt.state[ttheta[i]]["momentum_buffer"],
                             f"outer buffer {what}")
            if ikw and ikw.get("momentum") and grads[i] is not None:
                assert_close(bufs[i], inner_opt.state[tparams[i]]["momentum_buffer"],
                             f"inner buffer {what}")
    # The rounds did move theta0 (a kernel that wrote nothing would fail above, but say it).
    assert any(not torch.equal(t, p.to(flat_dtype)) for t, p in zip(theta, init) if t.numel())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_errors(device, gen):
    p = [rand((5,), torch.float32, device, gen)]
    flat = rand((5,), torch.float32, device, gen)
    a = [rand((5,), torch.float32, device, gen)]
    kw = dict(scale=1.0, outer_lr=0.7, outer_momentum=0.9)
    with pytest.raises(ValueError, match="outer_buffers"):  # momentum without a buffer
        ops.unflatten_average_outer_sgd_(flat, p, a, [None], **kw)
    with pytest.raises(TypeError, match="anchors\\[0\\] has dtype"):
        ops.unflatten_average_outer_sgd_(flat, p, [a[0].double()], [a[0].clone()], **kw)
    with pytest.raises(ValueError, match="anchors\\[0\\] has shape"):
        ops.unflatten_average_outer_sgd_(flat, p, [a[0][:4]], [a[0].clone()], **kw)
    with pytest.raises(ValueError, match="one entry per param"):
        ops.unflatten_average_outer_sgd_(flat, p, a + a, [None, None], **kw)
    with pytest.raises(ValueError, match="momentum_buffers"):  # inner momentum without a buffer
        ops.unflatten_average_outer_sgd_(flat, p, a, [a[0].clone()], [p[0].clone()], [None],
                                         lr=0.1, momentum=0.9, **kw)
    before = [x.clone() for x in p + a]
    assert all(torch.equal(x, y) for x, y in zip(p + a, before)), "a refused call wrote"


@needs_ext
@pytest.mark.parametrize("buffers", ["all", "some None"])
def test_opcheck(buffers):
    """The schema says what the op mutates (torch.library.opcheck: schema, autograd
    registration, fake, and torch.compile's functionalization where every buffer is a tensor:
    NOTE: [opcheck and None buffers] in tests/test_ops.py)."""
    g = torch.Generator().manual_seed(0)
    p = [torch.rand(5, generator=g), torch.rand(3, generator=g), torch.rand(0)]
    bufs = [torch.rand(5, generator=g), torch.rand(3, generator=g), torch.rand(0)]
    grads = [torch.rand(5, generator=g), torch.rand(3, generator=g), torch.rand(0)]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if buffers == "some None":
        grads[1] = bufs[1] = None
        utils = utils[:-1]
    for div in (None, torch.zeros(1, dtype=torch.float64)):
        outer_bufs = [torch.rand(5, generator=g), torch.rand(3, generator=g), torch.rand(0)]
        args = (ref.flatten(p, align=16), [x.clone() for x in p], [x.clone() for x in p],
                outer_bufs, [True, False, False], grads, bufs, [False, True, False], 0.5, 0.7,
                0.9, 0.0, 0.0, True, False, 0.1, 0.9, 0.0, 1e-2, False, False, div, 16)
        torch.library.opcheck(torch.ops.prsgd_hvd.unflatten_average_outer_sgd_.default, args,
                              test_utils=utils)
