"""The CUDA kernels (csrc/cuda/kernels.cu), run on the CPU under the host emulation, against the
pure-torch reference (prsgd_hvd/ops_reference.py), bit for bit.

Not collected by the outer pytest run (no ``test_`` prefix): tests/test_cuda_emu.py builds the
emulated library once per session and runs this file in a child pytest with PRSGD_EMU_LIB set,
so that a kernel that traps (a misaligned 16-byte access) or deadlocks (a barrier that cannot
complete) fails the run instead of killing the parent; the AddressSanitizer +
UndefinedBehaviorSanitizer build runs it again. By hand:

    PRSGD_EMU_LIB=/path/to/libprsgd_cuda_emu.so python -m pytest tests/cuda_emu/emu_cases.py

Every case: tensors at odd element offsets inside canary-filled arenas (a write outside a tensor
changes a canary), outputs prefilled with NaN (an element the kernel forgets stays NaN), inputs
checked unchanged, sizes 0, 1, around the vector width and around the chunk size +-1, and an
emulated device (SM count, resident blocks per SM, block order, thread order) that changes
from case to case. The seed is printed; PRSGD_TEST_SEED replays one.
"""
from __future__ import annotations

import ctypes
import os
import random

import pytest
import torch

from prsgd_hvd import ops_reference as ref

CHUNK = 32768  # kChunkSize in csrc/segment_table.h
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}
FORWARD, REVERSE, SHUFFLED = 0, 1, 2
# (SMs, resident blocks per SM, block order, thread order). Few SMs make a grid smaller than
# the chunk count, so blocks loop over chunks; many make one block per chunk.
DEVICES = [(1, 1, FORWARD, FORWARD), (2, 3, REVERSE, REVERSE), (132, 8, SHUFFLED, SHUFFLED),
           (3, 5, SHUFFLED, FORWARD), (7, 6, FORWARD, REVERSE), (132, 5, REVERSE, SHUFFLED)]
# NOTE: [Launch configuration] (persistent, split_log2, unroll) of csrc/cuda/multi_segment.h:
# the default, the layout before issue 21, and the others the benchmark can select. Every case
# runs under one of them, picked at random; test_every_launch_config runs each one.
DEFAULT_LAUNCH = (0, 2, 0)
LAUNCHES = [DEFAULT_LAUNCH, (1, 0, 1), (0, 0, 0), (0, 1, 2), (0, 3, 4), (1, 2, 0), (1, 3, 2),
            (0, 2, 1), (0, 2, 4), (1, 1, 4)]
# Element counts: empty, one, around the 16-byte vector (4 fp32, 8 fp16/bf16, 2 fp64; 8 for a
# mixed pair), odd primes, and the chunk size +-1 (a chunk boundary inside a segment).
SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 257, 4099, CHUNK - 1, CHUNK, CHUNK + 1,
         2 * CHUNK + 3]
FLATTEN_PAIRS = [(s, d) for s in DTYPES for d in DTYPES
                 if s == d or torch.float64 not in (s, d)]  # what launch_flatten compiles
UNFLATTEN_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16),
                   (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
                   (torch.float32, torch.float16), (torch.float32, torch.bfloat16)]
# Elements of canary on each side of every tensor; none in the sanitized run, where each tensor
# is its own allocation so that AddressSanitizer sees an access past its end.
CANARY = 0 if os.environ.get("PRSGD_EMU_TIGHT") == "1" else 64


def _name(x):
    return str(x).replace("torch.", "")


@pytest.fixture(scope="session")
def lib():
    path = os.environ.get("PRSGD_EMU_LIB")
    if not path:
        pytest.skip("PRSGD_EMU_LIB is not set (tests/test_cuda_emu.py sets it)")
    lib = ctypes.CDLL(path)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.prsgd_emu_configure.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint64]
    lib.prsgd_emu_set_launch_config.argtypes = [ctypes.c_int] * 3
    lib.prsgd_emu_launches.argtypes = [ctypes.POINTER(I64), I64]
    lib.prsgd_emu_launches.restype = I64
    lib.prsgd_emu_layout.argtypes = [ctypes.c_int, P, I32, I64, P]
    lib.prsgd_emu_flatten.argtypes = [ctypes.c_int, P, P, P, P, I32, I64]
    lib.prsgd_emu_unflatten.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, I32, I64, ctypes.c_int,
                                        P, P, ctypes.c_int]
    lib.prsgd_emu_unflatten_outer.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, P, P, I32, I64,
                                              P, P, P]
    return lib


@pytest.fixture
def rng():
    seed = int(os.environ.get("PRSGD_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"PRSGD_TEST_SEED={seed}")
    return random.Random(seed)


_device_ids: dict = {}


_launch = [DEFAULT_LAUNCH]
_forced_launch = [None]  # set by test_every_launch_config


def configure(lib, device, seed, launch=None):
    """kernels.cu caches SM count and occupancy per device id (up to 64), so every distinct
    (SMs, blocks per SM) gets an id of its own. `launch`: a launch configuration, else one of
    LAUNCHES picked with `seed` (printed, so that a failure names it)."""
    sms, per_sm, block_order, thread_order = device
    dev = _device_ids.setdefault((sms, per_sm), len(_device_ids))
    assert dev < 64, "too many emulated devices"
    lib.prsgd_emu_configure(dev, sms, per_sm, block_order, thread_order, seed)
    if launch is None:
        launch = _forced_launch[0] or LAUNCHES[seed % len(LAUNCHES)]
    print(f"device {device}, launch configuration (persistent, split_log2, unroll) {launch}")
    assert lib.prsgd_emu_set_launch_config(*launch) == 0
    _launch[0] = launch


def launches(lib):
    buf = (ctypes.c_int64 * 64)()
    n = lib.prsgd_emu_launches(buf, 64)
    return list(buf[:min(n, 64)])


def arr(values, ctype):
    return (ctype * max(1, len(values)))(*values)


def ptrs(tensors):
    return arr([0 if t is None or t.numel() == 0 else t.data_ptr() for t in tensors],
               ctypes.c_void_p)


class Arena:
    """A tensor at `misalign` elements past a 64-byte boundary, between canaries of random bits."""

    def __init__(self, numel, dtype, misalign, rng, fill=None):
        self.buf = torch.empty(2 * CANARY + misalign + numel, dtype=dtype)
        raw = self.buf.view(torch.uint8)
        raw.copy_(torch.tensor(bytearray(rng.randbytes(raw.numel())), dtype=torch.uint8))
        self.lo, self.hi = CANARY + misalign, CANARY + misalign + numel
        self.t = self.buf[self.lo:self.hi]
        if fill is not None:
            self.t.copy_(fill.reshape(-1))
        self.before = self.buf.clone()

    def canaries_intact(self):
        bits = BITS[self.buf.dtype]
        now, then = self.buf.view(bits), self.before.view(bits)
        return torch.equal(now[:self.lo], then[:self.lo]) and torch.equal(now[self.hi:], then[self.hi:])

    def unchanged(self):
        bits = BITS[self.buf.dtype]
        return torch.equal(self.buf.view(bits), self.before.view(bits))


def rand(n, dtype, rng, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def assert_bits_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bits = BITS[actual.dtype]
    a, e = actual.reshape(-1).view(bits), expected.reshape(-1).view(bits)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().reshape(-1)
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} elements differ; first at "
                             f"{i}: kernel {actual.reshape(-1)[i].item()!r}, reference "
                             f"{expected.reshape(-1)[i].item()!r}")


def layout(lib, numels, flat_dtype, align):
    offsets = (ctypes.c_int64 * (len(numels) + 1))()
    assert lib.prsgd_emu_layout(len(numels), arr(numels, ctypes.c_int64), DTYPES[flat_dtype],
                                align, offsets) == 0
    return list(offsets)


def sizes_for(rng, k=14):
    """A random pick of SIZES, always with the chunk boundary ones and 0 and 1."""
    must = [0, 1, CHUNK - 1, CHUNK + 1]
    return must + [rng.choice(SIZES) for _ in range(k - len(must))]


def expected_grids(device, chunks_per_launch):
    """One block per task (a chunk cut in 2^split_log2), or the resident grid if persistent."""
    sms, per_sm = device[0], device[1]
    persistent, split_log2, _ = _launch[0]
    tasks = [c << split_log2 for c in chunks_per_launch]
    return [min(t, sms * per_sm) if persistent else t for t in tasks]


def chunks(numels):
    return sum((n + CHUNK - 1) // CHUNK for n in numels)


# ---- layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flat_dtype", list(DTYPES), ids=_name)
@pytest.mark.parametrize("align", [1, 2, 16, 64])
def test_layout_matches_reference(lib, flat_dtype, align, rng):
    numels = [rng.choice(SIZES[:12]) for _ in range(40)]
    offsets = layout(lib, numels, flat_dtype, align)
    shapes = [torch.Size([n]) for n in numels]
    assert offsets == ref.segment_layout(shapes, flat_dtype, align=align)
    unit = max(1, align // torch.empty((), dtype=flat_dtype).element_size())
    assert all(o % unit == 0 for o in offsets)
    assert all(offsets[i] + numels[i] <= offsets[i + 1] < offsets[i] + numels[i] + unit
               for i in range(len(numels)))


def test_layout_refuses_bad_alignment(lib):
    out = (ctypes.c_int64 * 3)()
    for bad in (0, 3, 24, 8192):
        assert lib.prsgd_emu_layout(2, arr([1, 2], ctypes.c_int64), 0, bad, out) == -1


# ---- flatten ------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", FLATTEN_PAIRS, ids=_name)
@pytest.mark.parametrize("align", [1, 16])
def test_flatten(lib, src, dst, align, rng):
    device = DEVICES[rng.randrange(len(DEVICES))]
    configure(lib, device, rng.randrange(2**63))
    numels = sizes_for(rng)
    sources = [Arena(n, src, rng.randrange(8), rng, fill=rand(n, src, rng, -3, 3)) for n in numels]
    if src in (torch.float16, torch.bfloat16) and src == dst:
        # NaN payloads survive a same-dtype flatten (a bit copy, like copy_).
        sources[0].t.view(torch.int16)[:1] = 0x7d01 if src == torch.float16 else 0x7f81
        sources[0].before = sources[0].buf.clone()
    offsets = layout(lib, numels, dst, align)
    flat = Arena(offsets[-1], dst, rng.randrange(8), rng, fill=torch.full((offsets[-1],), float("nan"), dtype=dst))
    err = lib.prsgd_emu_flatten(len(numels), ptrs([a.t for a in sources]),
                                arr(numels, ctypes.c_int64), arr([DTYPES[src]] * len(numels), ctypes.c_int32),
                                flat.t.data_ptr(), DTYPES[dst], align)
    assert err == 0, f"cudaError {err}"
    expected = ref.flatten([a.t for a in sources], torch.empty(offsets[-1], dtype=dst), align=align)
    assert_bits_equal(flat.t, expected, f"flatten {_name(src)} -> {_name(dst)} align {align}")
    assert flat.canaries_intact(), "flatten wrote outside the flat buffer"
    assert all(a.unchanged() for a in sources), "flatten wrote into a source tensor"
    assert launches(lib) == expected_grids(device, [chunks(numels)])


@pytest.mark.parametrize("src,dst", [(torch.float64, torch.float32), (torch.float16, torch.float64)],
                         ids=_name)
def test_flatten_refuses_uncompiled_casts(lib, src, dst, rng):
    """The glue sends fp64 casts to copy_; the launcher says so instead of running anything."""
    configure(lib, DEVICES[0], 0)
    a = Arena(5, src, 0, rng)
    flat = Arena(5, dst, 0, rng)
    err = lib.prsgd_emu_flatten(1, ptrs([a.t]), arr([5], ctypes.c_int64), arr([DTYPES[src]], ctypes.c_int32),
                                flat.t.data_ptr(), DTYPES[dst], 1)
    assert err == 1  # cudaErrorInvalidValue
    assert flat.unchanged() and launches(lib) == []


def test_flatten_mixed_source_dtypes(lib, rng):
    """One launch per source dtype group, each writing only its own segments."""
    device = DEVICES[rng.randrange(len(DEVICES))]
    configure(lib, device, rng.randrange(2**63))
    kinds = [torch.float32, torch.float16, torch.bfloat16]
    numels = sizes_for(rng, 18)
    dts = [rng.choice(kinds) for _ in numels]
    sources = [Arena(n, d, rng.randrange(8), rng, fill=rand(n, d, rng)) for n, d in zip(numels, dts)]
    offsets = layout(lib, numels, torch.float32, 16)
    flat = Arena(offsets[-1], torch.float32, 0, rng, fill=torch.full((offsets[-1],), float("nan")))
    assert lib.prsgd_emu_flatten(len(numels), ptrs([a.t for a in sources]), arr(numels, ctypes.c_int64),
                                 arr([DTYPES[d] for d in dts], ctypes.c_int32), flat.t.data_ptr(),
                                 DTYPES[torch.float32], 16) == 0
    expected = ref.flatten([a.t for a in sources], torch.empty(offsets[-1]), align=16)
    assert_bits_equal(flat.t, expected, "mixed flatten")
    assert flat.canaries_intact()
    per_group = [chunks([n for n, d in zip(numels, dts) if d == k]) for k in DTYPES]
    assert launches(lib) == expected_grids(device, [c for c in per_group if c > 0])


# ---- unflatten_average_ / unflatten_average_sgd_ -------------------------------------------------

SGD_VARIANTS = {
    "avg": None,
    "sgd": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "momentum": dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
    "dampened": dict(momentum=0.9, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True),
}


@pytest.mark.parametrize("flat_dtype,param_dtype", UNFLATTEN_PAIRS, ids=_name)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
@pytest.mark.parametrize("divergence", [False, True], ids=["plain", "divergence"])
@pytest.mark.parametrize("align", [1, 16])
def test_unflatten(lib, flat_dtype, param_dtype, variant, divergence, align, rng,
                   accumulate=False, scale=1.0 / 3.0):
    """accumulate: the params take old + flat * scale (then the step), NOTE: [Accumulate] in
    csrc/common.h; test_unflatten_accumulate runs it."""
    device = DEVICES[rng.randrange(len(DEVICES))]
    configure(lib, device, rng.randrange(2**63))
    opts = SGD_VARIANTS[variant]
    sgd = opts is not None
    numels = sizes_for(rng)
    n = len(numels)
    offsets = layout(lib, numels, flat_dtype, align)
    flat_values = rand(offsets[-1], flat_dtype, rng, -4, 4)
    flat = Arena(offsets[-1], flat_dtype, rng.randrange(8), rng, fill=flat_values)
    old = [rand(k, param_dtype, rng) for k in numels]
    reads = divergence or accumulate  # the kernel reads the old params
    # Params prefilled with NaN unless the kernel reads them; misaligned at random, each role
    # on its own, so that every mix of aligned and misaligned pointers is met.
    params = [Arena(k, param_dtype, rng.randrange(8), rng,
                    fill=o if reads else torch.full((k,), float("nan"), dtype=param_dtype))
              for k, o in zip(numels, old)]
    grads = [None if (not sgd or rng.random() < 0.2) else
             Arena(k, param_dtype, rng.randrange(8), rng, fill=rand(k, param_dtype, rng)) for k in numels]
    first = [rng.random() < 0.4 for _ in numels]
    momentum = sgd and opts["momentum"] != 0
    bufs = [None] * n
    if momentum:
        # A buffer that first_step initialises is write-only: prefilled with NaN.
        bufs = [Arena(k, param_dtype, rng.randrange(8), rng,
                      fill=torch.full((k,), float("nan"), dtype=param_dtype) if f and g is not None
                      else rand(k, param_dtype, rng))
                for k, f, g in zip(numels, first, grads)]
    # The reference, on plain copies.
    p_ref = [(o.clone() if reads else torch.zeros(k, dtype=param_dtype)) for k, o in zip(numels, old)]
    b_ref = [None if b is None else b.t.clone() for b in bufs]
    g_ref = [None if g is None else g.t.clone() for g in grads]
    div_ref = torch.full((1,), 0.25, dtype=torch.float64) if divergence else None
    div = div_ref.clone() if divergence else None
    if sgd:
        ref.unflatten_average_sgd_(flat_values, p_ref, g_ref, b_ref, scale=scale, lr=0.05,
                                   first_step=first, divergence=div_ref, align=align,
                                   accumulate=accumulate, **opts)
    else:
        ref.unflatten_average_(flat_values, p_ref, scale=scale, divergence=div_ref, align=align,
                               accumulate=accumulate)
    hyper = [scale, 0.05] + ([opts["momentum"], opts["dampening"], opts["weight_decay"],
                              float(opts["nesterov"]), float(opts["maximize"])] if sgd else [0.0] * 5)
    err = lib.prsgd_emu_unflatten(
        n, ptrs([p.t for p in params]), ptrs([None if g is None else g.t for g in grads]),
        ptrs([None if b is None else b.t for b in bufs]), arr([int(f) for f in first], ctypes.c_uint8),
        arr(numels, ctypes.c_int64), arr([DTYPES[param_dtype]] * n, ctypes.c_int32),
        flat.t.data_ptr(), DTYPES[flat_dtype], align, int(sgd), arr(hyper, ctypes.c_double),
        div.data_ptr() if divergence else None, int(accumulate))
    assert err == 0, f"cudaError {err}"
    for i in range(n):
        assert_bits_equal(params[i].t, p_ref[i], f"params[{i}] (numel {numels[i]})")
        assert params[i].canaries_intact(), f"wrote outside params[{i}]"
        if bufs[i] is not None:
            if grads[i] is None:
                assert bufs[i].unchanged(), f"momentum_buffers[{i}] changed without a grad"
            else:
                assert_bits_equal(bufs[i].t, b_ref[i], f"momentum_buffers[{i}]")
                assert bufs[i].canaries_intact(), f"wrote outside momentum_buffers[{i}]"
        if grads[i] is not None:
            assert grads[i].unchanged(), f"grads[{i}] changed"
    assert flat.unchanged(), "flat changed"
    grid = expected_grids(device, [chunks(numels)])
    if divergence:
        # Float64 sums of the same squares in another order: equal to rounding, not to the bit.
        torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=0)
        assert launches(lib) == grid + [1]  # and the one-block reduction of the block sums
    else:
        assert launches(lib) == grid


# The accumulate mode (a delayed merge: scale 1, the correction in flat; the fused form with
# every SGD variant): each dtype pair at least once, divergence and alignment mixed, and one
# other scale. A subset, as for the outer kernel, to keep this suite's time on 2 cores.
ACCUMULATE_CASES = [(F32, F32, "avg", False, 16, 1.0), (F32, F32, "momentum", True, 1, 1.0),
                    (F32, F32, "dampened", False, 16, 1.0), (F32, F32, "sgd", True, 16, 0.3),
                    (F32, F16, "momentum", False, 16, 1.0), (F32, BF16, "dampened", True, 16, 1.0),
                    (F32, BF16, "avg", False, 1, 1.0), (F64, F64, "momentum", False, 16, 1.0),
                    (F16, F16, "avg", True, 1, 0.3), (BF16, BF16, "sgd", False, 16, 1.0)]


@pytest.mark.parametrize("flat_dtype,param_dtype,variant,divergence,align,scale", ACCUMULATE_CASES,
                         ids=_name)
def test_unflatten_accumulate(lib, flat_dtype, param_dtype, variant, divergence, align, scale, rng):
    """params = old params + flat * scale, then the SGD step: bit for bit the reference, with
    canaries, NaN-poisoned write-only buffers and misaligned roles as test_unflatten."""
    test_unflatten(lib, flat_dtype, param_dtype, variant, divergence, align, rng,
                   accumulate=True, scale=scale)


@pytest.mark.parametrize("flat_dtype,param_dtype", [UNFLATTEN_PAIRS[0], UNFLATTEN_PAIRS[4]], ids=_name)
def test_divergence_independent_of_scheduling(lib, flat_dtype, param_dtype, rng):
    """A fixed grid gives the same float64 bits whatever order blocks and threads run in."""
    numels = sizes_for(rng, 10)
    offsets = layout(lib, numels, flat_dtype, 16)
    flat = rand(offsets[-1], flat_dtype, rng, -4, 4)
    old = [rand(k, param_dtype, rng) for k in numels]
    results = []
    launch = LAUNCHES[rng.randrange(len(LAUNCHES))]
    for order in (FORWARD, REVERSE, SHUFFLED):
        configure(lib, (5, 3, order, order), rng.randrange(2**63), launch)
        params = [o.clone() for o in old]
        div = torch.zeros(1, dtype=torch.float64)
        assert lib.prsgd_emu_unflatten(
            len(numels), ptrs(params), ptrs([None] * len(numels)), ptrs([None] * len(numels)),
            arr([0] * len(numels), ctypes.c_uint8), arr(numels, ctypes.c_int64),
            arr([DTYPES[param_dtype]] * len(numels), ctypes.c_int32), flat.data_ptr(),
            DTYPES[flat_dtype], 16, 0, arr([0.5] + [0.0] * 6, ctypes.c_double), div.data_ptr(),
            0) == 0
        results.append(div.view(torch.int64).item())
    assert len(set(results)) == 1, results


def test_tensor_pointer_is_not_read_for_empty_or_gradless(lib, rng):
    """Empty tensors never enter the table, and a param without a grad never touches its buffer:
    null (or dangling) pointers there must be harmless."""
    configure(lib, DEVICES[2], 1)
    numels = [0, 5, 0]
    offsets = layout(lib, numels, torch.float32, 16)
    flat = torch.arange(offsets[-1], dtype=torch.float32)
    p = [torch.empty(0), torch.full((5,), float("nan")), torch.empty(0)]
    dangling = ctypes.c_void_p(16)  # would crash if dereferenced
    params = (ctypes.c_void_p * 3)(dangling, p[1].data_ptr(), dangling)
    grads = (ctypes.c_void_p * 3)(dangling, None, dangling)
    bufs = (ctypes.c_void_p * 3)(dangling, dangling, dangling)
    assert lib.prsgd_emu_unflatten(3, params, grads, bufs, arr([1, 1, 1], ctypes.c_uint8),
                                   arr(numels, ctypes.c_int64), arr([0, 0, 0], ctypes.c_int32),
                                   flat.data_ptr(), 0, 16, 1, arr([1.0, 0.1, 0.9, 0, 0, 0, 0], ctypes.c_double),
                                   None, 0) == 0
    assert torch.equal(p[1], flat[offsets[1]:offsets[1] + 5])


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda c: "persistent%d-split%d-unroll%d" % c)
def test_every_launch_config(lib, launch, rng):
    """Each launch configuration, bit for bit: the fp32 kernels whose unroll it may force, and
    an fp16 one that keeps its own; packed and padded; with and without divergence."""
    _forced_launch[0] = launch
    try:
        test_flatten(lib, torch.float32, torch.float32, 1, rng)
        test_flatten(lib, torch.float16, torch.float32, 16, rng)
        test_unflatten(lib, torch.float32, torch.float32, "momentum", True, 1, rng)
        test_unflatten(lib, torch.float32, torch.float32, "sgd", False, 16, rng)
        test_unflatten(lib, torch.float32, torch.float32, "avg", True, 16, rng)
        test_unflatten(lib, torch.float16, torch.float16, "dampened", False, 16, rng)
        test_unflatten(lib, torch.float32, torch.float32, "momentum", False, 16, rng,
                       accumulate=True, scale=1.0)
    finally:
        _forced_launch[0] = None


# ---- unflatten_average_outer_sgd_ -------------------------------------------------------------

# (outer options, inner options or None, divergence, align): the DiLoCo round without the inner
# pass, measured, packed; the full restart with inner momentum, padded; dampening, weight decay
# and maximize on the outer side with a plain inner SGD.
OUTER_VARIANTS = {
    "diloco": (dict(outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True), None, True, 1),
    "full": (dict(outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True),
             dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True), False, 16),
    "dampened": (dict(outer_lr=0.5, outer_momentum=0.8, outer_dampening=0.3,
                      outer_weight_decay=1e-2, outer_maximize=True), dict(lr=0.05), True, 16),
}
_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
# Every variant on fp32 and each dtype pair at least once (the full product would add a
# minute to this suite on 2 cores; the CPU kernel runs the product in tests/test_ops_outer.py).
OUTER_CASES = [(F32, F32, "diloco"), (F32, F32, "full"), (F32, F32, "dampened"),
               (F32, F16, "full"), (F32, BF16, "dampened"), (F32, BF16, "diloco"),
               (F64, F64, "full"), (F16, F16, "diloco"), (BF16, BF16, "full")]


@pytest.mark.parametrize("flat_dtype,param_dtype,variant", OUTER_CASES, ids=_name)
def test_unflatten_outer(lib, flat_dtype, param_dtype, variant, rng):
    """The outer round's kernel against ops_reference.unflatten_average_outer_sgd_, bit for
    bit: theta0, both momentum buffers and the params, with first steps and later ones mixed."""
    device = DEVICES[rng.randrange(len(DEVICES))]
    configure(lib, device, rng.randrange(2**63))
    outer, inner, divergence, align = OUTER_VARIANTS[variant]
    numels = sizes_for(rng, 10)
    n = len(numels)
    offsets = layout(lib, numels, flat_dtype, align)
    flat_values = rand(offsets[-1], flat_dtype, rng, -4, 4)
    flat = Arena(offsets[-1], flat_dtype, rng.randrange(8), rng, fill=flat_values)
    old = [rand(k, param_dtype, rng) for k in numels]
    params = [Arena(k, param_dtype, rng.randrange(8), rng,
                    fill=o if divergence else torch.full((k,), float("nan"), dtype=param_dtype))
              for k, o in zip(numels, old)]
    anchors = [Arena(k, flat_dtype, rng.randrange(8), rng, fill=rand(k, flat_dtype, rng))
               for k in numels]
    ofirst = [rng.random() < 0.4 for _ in numels]
    first = [rng.random() < 0.4 for _ in numels]
    obufs = [Arena(k, flat_dtype, rng.randrange(8), rng,
                   fill=torch.full((k,), float("nan"), dtype=flat_dtype) if f
                   else rand(k, flat_dtype, rng)) for k, f in zip(numels, ofirst)]
    grads = [None if (inner is None or rng.random() < 0.2) else
             Arena(k, param_dtype, rng.randrange(8), rng, fill=rand(k, param_dtype, rng))
             for k in numels]
    momentum = inner is not None and inner.get("momentum", 0) != 0
    bufs = [None if not momentum else
            Arena(k, param_dtype, rng.randrange(8), rng,
                  fill=torch.full((k,), float("nan"), dtype=param_dtype) if f and g is not None
                  else rand(k, param_dtype, rng)) for k, f, g in zip(numels, first, grads)]
    p_ref = [(o.clone() if divergence else torch.zeros(k, dtype=param_dtype))
             for k, o in zip(numels, old)]
    a_ref = [a.t.clone() for a in anchors]
    ob_ref = [b.t.clone() for b in obufs]
    b_ref = [None if b is None else b.t.clone() for b in bufs]
    g_ref = [None if g is None else g.t.clone() for g in grads]
    div_ref = torch.full((1,), 0.25, dtype=torch.float64) if divergence else None
    div = div_ref.clone() if divergence else None
    scale = 1.0 / 3.0
    ref.unflatten_average_outer_sgd_(flat_values, p_ref, a_ref, ob_ref, g_ref, b_ref, scale=scale,
                                     outer_first_step=ofirst, first_step=first,
                                     divergence=div_ref, align=align, **outer, **(inner or {}))
    hyper = lambda d, prefix: [float(d.get(prefix + k, 0.0)) for k in _HYPER]  # noqa: E731
    err = lib.prsgd_emu_unflatten_outer(
        n, ptrs([p.t for p in params]), ptrs([a.t for a in anchors]), ptrs([b.t for b in obufs]),
        arr([int(f) for f in ofirst], ctypes.c_uint8), ptrs([None if g is None else g.t for g in grads]),
        ptrs([None if b is None else b.t for b in bufs]), arr([int(f) for f in first], ctypes.c_uint8),
        arr(numels, ctypes.c_int64), arr([DTYPES[param_dtype]] * n, ctypes.c_int32),
        flat.t.data_ptr(), DTYPES[flat_dtype], align,
        arr([scale] + hyper(outer, "outer_"), ctypes.c_double),
        arr([0.0] + hyper(inner or {}, ""), ctypes.c_double), div.data_ptr() if divergence else None)
    assert err == 0, f"cudaError {err}"
    for i in range(n):
        assert_bits_equal(params[i].t, p_ref[i], f"params[{i}] (numel {numels[i]})")
        assert_bits_equal(anchors[i].t, a_ref[i], f"anchors[{i}] (numel {numels[i]})")
        assert_bits_equal(obufs[i].t, ob_ref[i], f"outer_buffers[{i}] (numel {numels[i]})")
        for what, arena in (("params", params[i]), ("anchors", anchors[i]), ("outer_buffers", obufs[i])):
            assert arena.canaries_intact(), f"wrote outside {what}[{i}]"
        if bufs[i] is not None:
            if grads[i] is None:
                assert bufs[i].unchanged(), f"momentum_buffers[{i}] changed without a grad"
            else:
                assert_bits_equal(bufs[i].t, b_ref[i], f"momentum_buffers[{i}]")
                assert bufs[i].canaries_intact(), f"wrote outside momentum_buffers[{i}]"
        if grads[i] is not None:
            assert grads[i].unchanged(), f"grads[{i}] changed"
    assert flat.unchanged(), "flat changed"
    grid = expected_grids(device, [chunks(numels)])
    if divergence:
        torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=0)
        assert launches(lib) == grid + [1]
    else:
        assert launches(lib) == grid


def test_launch_config_refuses_out_of_range(lib):
    for bad in [(2, 0, 0), (0, -1, 0), (0, 4, 0), (0, 0, 3), (0, 0, 8), (-1, 0, 0)]:
        assert lib.prsgd_emu_set_launch_config(*bad) == -1, bad
