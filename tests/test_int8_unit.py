"""The 8-bit delta wire format (``compression="int8"``, prsgd_hvd.wire_formats.Int8Delta) in one
process, ranks simulated side by side: what each rank sends and what every rank decodes must
equal tests/reference_int8.py bit for bit -- fp32, fp16 and bf16 parameters, sizes that are no
multiple of the chunk, zero chunks, a chunk with one huge value, subnormal scales, inf/NaN,
weights, a rank left out -- and error feedback must keep the rounding from accumulating."""
import pytest
import torch

import prsgd_hvd as hvd
import reference_int8 as ref
from prsgd_hvd import ops_reference
from prsgd_hvd.anchor import Anchor
from prsgd_hvd.averaging import ALIGN, CONTROL_FIELDS, BucketLayout, Round, RoundId
from prsgd_hvd.compression import resolve_compression
from prsgd_hvd.nonfinite import NonFinitePolicy
from prsgd_hvd.wire_formats import ALLGATHER, FULL_PRECISION, INT8_CHUNK, Int8Delta, for_option

C = INT8_CHUNK
F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()


def exact_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit for bit, NaN where NaN is due (float32 values compared as float64)."""
    torch.testing.assert_close(got.to(F64), want.to(F64), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


class SimRank:
    """One rank: its model tensors, their bucket, its anchor and its own format instance."""

    def __init__(self, shapes, dtype, n_ranks, error_feedback=True):
        self.tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
        self.layout = BucketLayout(self.tensors, n_ranks)
        assert len(self.layout.buckets) == 1
        self.bucket = self.layout.buckets[0]
        self.anchor = Anchor(kept=True)
        self.fmt = Int8Delta(error_feedback)

    def pack(self, values):
        with torch.no_grad():
            for t, v in zip(self.tensors, values):
                t.copy_(v)
        ops_reference.flatten(self.tensors, out=self.bucket.payload, align=ALIGN)
        return self.bucket.payload.clone()

    def set_anchor(self, values):
        self.pack(values)
        record = (1.0,) + (0.0,) * (CONTROL_FIELDS - 1)
        self.anchor.follow(Round(self.layout, RoundId("scheduled", 1), [record],
                                 anchor=self.anchor))
        assert self.fmt.for_round(self.layout, self.anchor) is self.fmt


def records(weights, number):
    return [(w, 1.0, 1.0, float(number), 0.0, 0.0, 0.0) for w in weights]


def run_round(ranks, models, weights, number, contribute=None):
    """Every rank encodes its model, the messages are gathered in rank order (as Horovod's
    allgather delivers them) and every rank decodes. Returns (packed x per rank, messages,
    the Round of every rank)."""
    contribute = contribute or [True] * len(ranks)
    xs, sent = [], []
    for rk, model, w, c in zip(ranks, models, weights, contribute):
        xs.append(rk.pack(model))
        msgs = rk.fmt.messages(rk.bucket, w if c else 0.0, c, rk.anchor)
        assert [m.name for m in msgs] == ["bucket0", "control"]
        assert msgs[0].collective == ALLGATHER and msgs[0].tensor.dtype == torch.uint8
        assert msgs[1].control and msgs[1].tensor.dtype == torch.float32  # records ride apart
        sent.append(msgs[0].tensor.clone())
    gathered = torch.cat(sent)
    used = [w if c else 0.0 for w, c in zip(weights, contribute)]
    rounds = []
    for rk in ranks:
        rk.fmt.decode(rk.bucket, [gathered.clone()], size=len(ranks), weight_sum=sum(used),
                      anchor=rk.anchor)
        rounds.append(Round(rk.layout, RoundId("scheduled", number), records(used, number),
                            anchor=rk.anchor, wire=rk.fmt))
    return xs, sent, rounds


def check_message(message, codes, scale, n, what):
    """A rank's message: its scales (fp32), then its codes (int8), each padded to 16 bytes."""
    assert message.numel() == ref.message_bytes(n, C), what
    chunks = -(-n // C)
    codes_at = -(-4 * chunks // 16) * 16
    exact_equal(message[:4 * chunks].view(torch.float32), scale, f"{what}: scales")
    assert torch.equal(message[codes_at:codes_at + n].view(torch.int8).to(torch.int64), codes), \
        f"{what}: codes"
    assert not message[4 * chunks:codes_at].any() and not message[codes_at + n:].any(), \
        f"{what}: padding"


def draw(shapes, dtype, g, spread):
    """Parameters of ``dtype``; tensor i moves by about spread[i] from the anchor."""
    anchor = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    model = [(a.float() + sp * torch.randn(s, generator=g)).to(dtype)
             for a, s, sp in zip(anchor, shapes, spread)]
    return anchor, model


CASES = {
    # name: (shapes, dtype, weights)
    "fp32_awkward_sizes": ([(37,), (5000,), (3, 1,), (1025,)], torch.float32, [1.0, 1.0, 1.0]),
    "fp16_weights": ([(1023,), (2, 700)], torch.float16, [1.0, 2.0, 0.5]),
    "bf16_one_element": ([()], torch.bfloat16, [1.0, 1.0]),
    "bf16_whole_chunks": ([(3 * C,)], torch.bfloat16, [0.25, 1.0, 3.0]),
    "fp32_single_chunk_two_ranks": ([(1,), (1000,)], torch.float32, [1.0, 1.0]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_encode_decode_equal_the_reference_bit_for_bit(name):
    """Two rounds (the second carries the first's residuals) on 2-3 ranks: every message byte
    and every rank's decoded sum equal the reference; all ranks hold the same bits."""
    shapes, dtype, weights = CASES[name]
    n_ranks = len(weights)
    g = torch.Generator().manual_seed(len(name))
    spread = [10.0 ** -(1 + i % 3) for i in range(len(shapes))]  # tensors move by 1e-1..1e-3
    anchor_vals, _ = draw(shapes, dtype, g, spread)
    ranks = [SimRank(shapes, dtype, n_ranks) for _ in range(n_ranks)]
    for rk in ranks:
        rk.set_anchor(anchor_vals)
    residuals = [None] * n_ranks
    for number in (2, 3):
        models = [draw(shapes, dtype, g, spread)[1] for _ in range(n_ranks)]
        anchor = ranks[0].anchor.bucket(0).clone()
        xs, sent, rounds = run_round(ranks, models, weights, number)
        want, want_sent, lost = ref.round_of_ranks([x.to(F64) for x in xs], anchor, residuals,
                                                   weights, C)
        n = xs[0].numel()
        for r, (msg, (codes, scale)) in enumerate(zip(sent, want_sent)):
            check_message(msg, codes, scale, n, f"{name} round {number} rank {r}")
        for r, rk in enumerate(ranks):
            exact_equal(rk.bucket.payload, want, f"{name} round {number}: rank {r}'s sum")
        # not vacuous: 8 bits lose something (a lone element is sent exactly: 127 * scale)
        assert n < 16 or all(bool(e.abs().max() > 0) for e in lost)
        for rk, rnd in zip(ranks, rounds):
            assert rnd.is_finite()
            rk.anchor.follow(rnd)
            rnd.accept()
        residuals = lost


def test_zero_huge_tiny_and_nonfinite_chunks():
    """One tensor of 4 chunks + a tail: chunk 0 unchanged (scale 0, codes 0), chunk 1 holds one
    huge change (its other elements round to 0, the other chunks keep their precision), chunk
    2 moves by ~1e-41 (a subnormal scale), chunk 3 and the tail are ordinary. Then rank 1 gets
    inf and rank 2 NaN: their chunks decode to NaN on every rank (never to silent zeros), the
    other chunks still equal the reference, and the round does not move the residuals."""
    n = 4 * C + 100
    ranks = [SimRank([(n,)], torch.float32, 3) for _ in range(3)]
    g = torch.Generator().manual_seed(7)
    base = torch.randn(n, generator=g)
    base[2 * C:3 * C] = 0.0
    for rk in ranks:
        rk.set_anchor([base])
    models = []
    for r in range(3):
        x = base + 1e-2 * torch.randn(n, generator=g)
        x[:C] = base[:C]
        x[C + 5] = 1e30
        x[2 * C:3 * C] = 1e-41 * torch.randn(C, generator=g)
        models.append([x])
    anchor = ranks[0].anchor.bucket(0).clone()
    xs, sent, rounds = run_round(ranks, models, [1.0] * 3, 2)
    want, want_sent, lost = ref.round_of_ranks([x.to(F64) for x in xs], anchor, [None] * 3,
                                               [1.0] * 3, C)
    for r, (msg, (codes, scale)) in enumerate(zip(sent, want_sent)):
        check_message(msg, codes, scale, n, f"rank {r}")
        assert scale[0] == 0 and not codes[:C].any()
        assert 0 < scale[2] < torch.finfo(torch.float32).tiny, "chunk 2's scale is subnormal"
        assert codes[C + 5] == 127 and (codes[C:2 * C] != 0).sum() == 1
        assert (codes[3 * C:] != 0).sum() > C // 2, "ordinary chunks keep their precision"
    for rk in ranks:
        exact_equal(rk.bucket.payload, want, "sum")
    for rk, rnd in zip(ranks, rounds):
        rk.anchor.follow(rnd)
        rnd.accept()

    residual_before = [rk.fmt._residual[0].clone() for rk in ranks]
    models = [[m[0].clone()] for m in models]
    models[1][0][C + 17] = float("inf")
    models[2][0][3 * C + 3] = float("nan")
    anchor = ranks[0].anchor.bucket(0).clone()
    xs, sent, rounds = run_round(ranks, models, [1.0] * 3, 3)
    want, want_sent, _ = ref.round_of_ranks([x.to(F64) for x in xs], anchor, residual_before,
                                            [1.0] * 3, C)
    for r, (msg, (codes, scale)) in enumerate(zip(sent, want_sent)):
        check_message(msg, codes, scale, n, f"non-finite round, rank {r}")
    for rk, rnd in zip(ranks, rounds):
        got = rk.bucket.payload
        exact_equal(got, want, "non-finite round's sum")
        assert torch.isnan(got[C:2 * C]).all() and torch.isnan(got[3 * C:4 * C]).all()
        assert torch.isfinite(got[:C]).all() and torch.isfinite(got[4 * C:]).all()
        assert not rnd.is_finite()
        rnd.accept()
    for rk, before in zip(ranks, residual_before):
        assert torch.equal(rk.fmt._residual[0], before), "a non-finite round moved a residual"


class FakeSet:
    """The collectives NonFinitePolicy asks: which ranks hold non-finite models."""

    def __init__(self, flags):
        self.flags, self.size, self.members = flags, len(flags), list(range(len(flags)))

    def allgather(self, obj, name):
        return self.flags


@pytest.mark.parametrize("mode", ["raise", "exclude"])
def test_nonfinite_policy_on_an_int8_round(mode):
    """A rank whose model holds inf: the policy raises naming it, or ("exclude") reruns the
    round with that rank sending zeros; the rerun's sum equals the reference of the healthy
    ranks (weight 0 for the sick one), bit for bit, and the sick rank's residual waits."""
    n = 3000
    ranks = [SimRank([(n,)], torch.float32, 3) for _ in range(3)]
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    for rk in ranks:
        rk.set_anchor([base])
    warm = [[base + 1e-2 * torch.randn(n, generator=g)] for _ in range(3)]
    _, _, rounds = run_round(ranks, warm, [1.0] * 3, 2)  # a round that leaves residuals
    for rk, rnd in zip(ranks, rounds):
        rk.anchor.follow(rnd)
        rnd.accept()
    kept = [rk.fmt._residual[0].clone() for rk in ranks]
    assert kept[1].abs().max() > 0
    models = [[base + 1e-2 * torch.randn(n, generator=g)] for _ in range(3)]
    models[1][0][2000] = float("inf")
    anchor = ranks[0].anchor.bucket(0).clone()
    _, _, rounds = run_round(ranks, models, [1.0] * 3, 3)
    # every rank sees the inf (checked now: the simulated reruns below share the buckets)
    assert not any(rnd.is_finite() for rnd in rounds)
    flags = [r == 1 for r in range(3)]
    policy = NonFinitePolicy(mode)
    outcomes = {}

    def rerun(r):
        def again(contribute):
            xs, _, rerun_rounds = run_round(ranks, models, [1.0] * 3, 3,
                                            contribute=[not f for f in flags])
            outcomes["xs"] = xs
            return rerun_rounds[r]
        return again

    for r, (rk, rnd) in enumerate(zip(ranks, rounds)):
        opt = torch.optim.SGD(rk.tensors, lr=0.1)
        if mode == "raise":
            with pytest.raises(FloatingPointError, match=r"rank\(s\) \[1\]"):
                policy.settle(rnd, FakeSet(flags), lambda: "round 3", "int8", rerun(r), opt)
            continue
        got, left_out = policy.settle(rnd, FakeSet(flags), lambda: "round 3", "int8", rerun(r), opt)
        assert left_out == flags[r] and got.weight_sum == 2.0 and got.is_finite()
    if mode == "raise":
        return
    xs = outcomes["xs"]
    want, _, lost = ref.round_of_ranks([x.to(F64) for x in xs], anchor, kept, [1.0, 0.0, 1.0], C)
    for rk in ranks:
        exact_equal(rk.bucket.payload, want, "the healthy ranks' sum")
    for r, (rk, rnd) in enumerate(zip(ranks, rounds)):
        Round(rk.layout, RoundId("scheduled", 3), records([1.0, 0.0, 1.0], 3), anchor=rk.anchor,
              wire=rk.fmt).accept()
        carried = kept[1] if r == 1 else lost[r]
        exact_equal(rk.fmt._residual[0], carried, f"rank {r}'s residual after the rerun")


def _rounds_of_one_rank(error_feedback, rounds=60):
    """One rank: each round the model moves by m_k from the common point, sends the 8-bit
    change and takes the decoded point. Returns (max |point - x0 - sum m_k| after the last
    round, that round's largest scale)."""
    g = torch.Generator().manual_seed(3)
    n = 3 * C + 77
    rk = SimRank([(n,)], torch.float32, 1, error_feedback=error_feedback)
    x = torch.randn(n, generator=g)
    rk.set_anchor([x])
    exact = x.double()
    for k in range(rounds):
        m = 1e-2 * torch.randn(n, generator=g)
        exact = exact + m.double()
        model = rk.anchor.bucket(0)[:n] + m
        _, sent, (rnd,) = run_round([rk], [[model]], [1.0], k + 2)
        rk.anchor.follow(rnd)
        rnd.accept()
    scale = sent[0][:4 * 4].view(torch.float32)
    return float((rk.anchor.bucket(0)[:n].double() - exact).abs().max()), float(scale.max())


def test_error_feedback_keeps_rounding_from_accumulating():
    """With error feedback the common point is x0 + sum m_k minus the last residual (at most
    half a step of the last round, plus float32 rounding of the sums); without it the lost
    halves add up over the rounds."""
    on, step = _rounds_of_one_rank(True)
    off, _ = _rounds_of_one_rank(False)
    assert on <= 0.5 * step + 1e-5, (on, step)
    assert on < off / 3, (on, off)


def test_option_names_and_message_size():
    assert resolve_compression("int8") == "int8"
    fmt = for_option("int8", error_feedback=False)
    assert isinstance(fmt, Int8Delta) and not fmt.error_feedback and fmt.needs_anchor
    assert not fmt.control_inline and fmt.name == "int8"
    with pytest.raises(ValueError, match="'int8'"):
        resolve_compression("int4")
    # about one byte per element: codes, 4 bytes of scale per chunk, padding to 16 bytes
    for n in (1, C, C + 1, 6_320_000):
        size = Int8Delta().message_bytes(n)[2]
        assert size == ref.message_bytes(n, C)
        assert n + 4 * (n // C) <= size <= n + 4 * (-(-n // C)) + 30
    # no common point yet: the first round goes in full precision
    rk = SimRank([(10,)], torch.float32, 2)
    assert rk.fmt.for_round(rk.layout, rk.anchor) is FULL_PRECISION


def test_reset_drops_the_residuals_and_the_next_round_starts_afresh():
    """A layout change or an elastic reset (new averagers) leaves no residual: after reset()
    and a new common point the first message is the reference's without a residual."""
    n = 2500
    ranks = [SimRank([(n,)], torch.float32, 2) for _ in range(2)]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g)
    for rk in ranks:
        rk.set_anchor([base])
    models = [[base + 1e-2 * torch.randn(n, generator=g)] for _ in range(2)]
    _, _, rounds = run_round(ranks, models, [1.0, 1.0], 2)
    for rk, rnd in zip(ranks, rounds):
        rnd.accept()
        assert rk.fmt._residual[0].abs().max() > 0
        rk.fmt.reset()
        rk.anchor.reset()
        assert rk.fmt.for_round(rk.layout, rk.anchor) is FULL_PRECISION
        rk.set_anchor([base])
    xs, sent, _ = run_round(ranks, models, [1.0, 1.0], 3)
    want, want_sent, _ = ref.round_of_ranks([x.to(F64) for x in xs], ranks[0].anchor.bucket(0),
                                            [None, None], [1.0, 1.0], C)
    for r, (msg, (codes, scale)) in enumerate(zip(sent, want_sent)):
        check_message(msg, codes, scale, xs[0].numel(), f"after reset, rank {r}")
    exact_equal(ranks[0].bucket.payload, want, "sum after reset")


def test_a_nonfinite_int8_round_from_finite_models_names_the_8_bit_overflow():
    """Every model finite but the round not (x - anchor overflowed float32, so a chunk's scale
    did): the error says so for the 8-bit format, not the 16-bit one."""
    n = 1  # one element: the anchor's own finiteness check (a sum) must not overflow
    ranks = [SimRank([(n,)], torch.float32, 2) for _ in range(2)]
    for rk in ranks:
        rk.set_anchor([torch.full((n,), -2e38)])
    models = [[torch.full((n,), 2e38)] for _ in range(2)]
    _, _, rounds = run_round(ranks, models, [1.0] * 2, 2)
    assert not rounds[0].is_finite()
    opt = torch.optim.SGD(ranks[0].tensors, lr=0.1)
    with pytest.raises(FloatingPointError, match="8-bit compressed round is not finite .* "
                                                 "overflowed float32"):
        NonFinitePolicy("raise").settle(rounds[0], FakeSet([False, False]), lambda: "round 2",
                                        "int8", None, opt)
