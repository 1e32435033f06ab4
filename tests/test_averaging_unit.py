"""The round's objects on their own, in one process: BucketLayout, Averager -> PendingRound ->
Round (control records, identity checks, write-back), the anchor and the 16-bit delta wire
format."""
import time

import pytest
import torch

import prsgd_hvd as hvd
from prsgd_hvd import ops_reference
from prsgd_hvd.averaging import (CONTROL_FIELDS, Averager, BucketLayout, Round, RoundId,
                                 RoundMismatchError)
from prsgd_hvd.anchor import Anchor
from prsgd_hvd.wire_formats import ALLGATHER, FULL_PRECISION, Delta16


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()


def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, generator=g), torch.randn(7, generator=g).half(),
            torch.randn((), generator=g), torch.randn(2, 2, generator=g).half()]


def test_layout_groups_by_dtype_keeps_order_and_sums_low_precision_in_fp32():
    ts = tensors()
    layout = BucketLayout(ts, n_ranks=3)
    assert [b.dtype for b in layout.buckets] == [torch.float32, torch.float16]
    assert [b.positions for b in layout.buckets] == [[0, 2], [1, 3]]
    assert layout.buckets[1].flat.dtype == torch.float32
    assert layout.buckets[0].control.numel() == 3 * CONTROL_FIELDS  # records ride in bucket 0
    assert layout.buckets[1].control.numel() == 0
    assert layout.leading(3) == [2, 1]  # of the first 3 tensors, 2 are fp32 and 1 fp16
    assert BucketLayout(tensors(), 3).checksum == layout.checksum  # shapes, not values
    assert BucketLayout(ts[:3], 3).checksum != layout.checksum


@pytest.mark.parametrize("kernels", ["ops", "reference"])
def test_a_round_of_one_rank_carries_its_record_and_writes_back_the_weighted_mean(kernels):
    ts = tensors()
    before = [t.clone() for t in ts]
    kernels = hvd.ops if kernels == "ops" else ops_reference
    averager = Averager(hvd.global_process_set, "unit.round", kernels=kernels)
    pending = averager.start(ts, RoundId("average_now", 5), weight=2.0, agree=True, fingerprint=9)
    with pytest.raises(RuntimeError, match="average_now round 5 is still in flight"):
        averager.start(ts, RoundId("scheduled", 6))
    rnd = pending.wait()
    assert averager.pending is None
    assert rnd.weight_sum == 2.0 and rnd.active_ranks == 1 and rnd.agree
    assert rnd.fingerprints() == [9]
    rnd.check_identity()
    assert rnd.is_finite()
    divergence = rnd.write_back(kernels, measured=2)
    for t, b in zip(ts, before):  # sum / weight_sum with one rank: the tensor itself
        torch.testing.assert_close(t, b)
    assert divergence == pytest.approx(0.0, abs=1e-6)
    assert averager.bytes_sent == 0  # a world of one sends nothing


def test_contribute_false_sends_zeros_with_weight_zero():
    ts = [torch.ones(4)]
    averager = Averager(hvd.global_process_set, "unit.zero")
    rnd = averager.start(ts, RoundId("scheduled", 1), contribute=False).wait()
    assert rnd.weight_sum == 0.0 and torch.equal(rnd.buckets[0].payload, torch.zeros(4))


def _round(records):
    layout = BucketLayout([torch.zeros(2)], n_ranks=len(records))
    return Round(layout, RoundId("scheduled", 3), records, members=list(range(len(records))))


def _record(kind, number, layout=1, weight=1.0, active=1.0):
    from prsgd_hvd.averaging import KINDS
    return (weight, active, float(KINDS.index(kind) + 1), float(number), 0.0, 0.0, float(layout))


def test_identity_checks():
    _round([_record("scheduled", 3), _record("scheduled", 3)]).check_identity()
    _round([_record("scheduled", 3), _record("join", 3, active=0.0)]).check_identity()
    with pytest.raises(RoundMismatchError, match="rank 0: scheduled round 3; rank 1: average_now round 3"):
        _round([_record("scheduled", 3), _record("average_now", 3)]).check_identity()
    with pytest.raises(RoundMismatchError, match="rank 1: scheduled round 1"):
        _round([_record("scheduled", 3), _record("scheduled", 1)]).check_identity()
    with pytest.raises(RoundMismatchError, match=r"different sets of tensors.*\[0\] vs \[1\]"):
        _round([_record("scheduled", 3, layout=1), _record("scheduled", 3, layout=2)]).check_identity()
    r = _round([_record("join", 3, weight=1.0, active=0.0), _record("scheduled", 3, weight=3.0)])
    assert r.weight_sum == 4.0 and r.active_ranks == 1 and r.scale == 0.25


def test_interrupted_wait_resumes():
    import horovod.torch as horovod_torch
    # A world of one has no handles; give the pending round one that fails once.
    averager = Averager(hvd.global_process_set, "unit.interrupt")
    pending = averager.start([torch.ones(3)], RoundId("scheduled", 1))
    handle = horovod_torch.allreduce_async_(torch.ones(2), name="unit.interrupt.extra")
    pending.handles[0] = handle
    real, calls = horovod_torch.synchronize, []

    def flaky(h):
        calls.append(h)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(h)
    horovod_torch.synchronize = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            pending.wait()
        assert averager.pending is pending and pending.handles[0] == handle
        pending.wait().check_identity()
    finally:
        horovod_torch.synchronize = real
    assert averager.pending is None and calls == [handle, handle]


def _compressed_rounds(error_feedback, rounds=40):
    """One rank: each round the model moves by d_k from the common average, sends the 16-bit
    change, and takes the decoded average (as the write-back does). Returns how far the final
    average is from x0 + sum(d_k), the model that exact averaging would give."""
    g = torch.Generator().manual_seed(1)
    fmt = Delta16("fp16", error_feedback=error_feedback)
    x = torch.randn(2000, generator=g)
    layout = BucketLayout([x], n_ranks=1)
    bucket = layout.buckets[0]
    anchor = Anchor(kept=True)
    assert fmt.for_round(layout, anchor) is FULL_PRECISION  # no common point yet
    exact = x.clone()
    bucket.payload.copy_(x)
    first = Round(layout, RoundId("scheduled", 1), [(1.0,) + (0.0,) * (CONTROL_FIELDS - 1)],
                  anchor=anchor)
    anchor.follow(first)                    # the first (full-precision) common average
    assert fmt.for_round(layout, anchor) is fmt
    for k in range(rounds):
        d = 1e-2 * torch.randn(2000, generator=g)
        exact += d
        bucket.payload.copy_(x + d)
        wire = fmt.messages(bucket, 1.0, True, anchor)
        bucket.payload.copy_(x + d)
        retry = fmt.messages(bucket, 1.0, True, anchor)  # a rerun sends the same
        assert [m.name for m in wire] == ["bucket0", "control"] and wire[1].control
        assert torch.equal(wire[0].tensor, retry[0].tensor)
        assert wire[0].tensor.dtype == torch.float16
        fmt.decode(bucket, [wire[0].tensor.clone()], size=1, weight_sum=1.0, anchor=anchor)
        rnd = Round(layout, RoundId("scheduled", k + 2), [(1.0,) + (0.0,) * (CONTROL_FIELDS - 1)],
                    anchor=anchor, wire=fmt)
        x = bucket.payload * rnd.scale      # the plain average's write-back
        anchor.follow(rnd)
        rnd.accept()
    return (x - exact).abs().mean().item()


def test_delta_format_error_feedback_keeps_rounding_from_accumulating():
    with_ef, without = _compressed_rounds(True), _compressed_rounds(False)
    assert with_ef < 1e-5, "within one round's 16-bit error of exact averaging"
    assert with_ef < without / 3, (with_ef, without)
    fmt = Delta16("bf16")
    assert fmt.collective == ALLGATHER and fmt.needs_anchor


def test_delta_format_decodes_the_weighted_sum_of_the_ranks():
    """Three ranks' bf16 messages, gathered: decode rebuilds sum_r w_r x_r on top of the
    anchor, as a full-precision round would deliver it."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, generator=g)
    xs = [base + 1e-2 * torch.randn(64, generator=g) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    anchor = Anchor(kept=True)
    layout = BucketLayout([torch.zeros(64)], n_ranks=3)
    bucket = layout.buckets[0]
    bucket.payload.copy_(base)
    anchor.follow(Round(layout, RoundId("scheduled", 1), [(1.0,) + (0.0,) * (CONTROL_FIELDS - 1)] * 1,
                        anchor=anchor))
    sent = []
    for x, w in zip(xs, weights):
        fmt = Delta16("bf16")
        bucket.payload.copy_(x)
        sent.append(fmt.messages(bucket, w, True, anchor)[0].tensor.clone())
    fmt.decode(bucket, [torch.cat(sent)], size=3, weight_sum=sum(weights), anchor=anchor)
    expected = sum(w * x.double() for w, x in zip(weights, xs))
    torch.testing.assert_close(bucket.payload.double(), expected, rtol=0, atol=2e-3)
    assert not torch.allclose(bucket.payload.double(), expected, rtol=0, atol=1e-7), \
        "bf16 deltas are not exact (the test would not see a missing anchor term otherwise)"


class HandlesOf:
    """Stands in for Horovod's handle table under a PendingRound: ``done`` handles complete at
    once, ``errors`` fail; a handle is consumed by synchronize, as in Horovod (poll on a
    consumed handle raises ValueError, like horovod_torch_poll)."""

    def __init__(self, live, done=(), errors=None):
        self.live, self.done, self.errors = set(live), set(done), dict(errors or {})
        self.synchronized = []

    def poll(self, h):
        if h not in self.live:
            raise ValueError(f"Handle {h} was not created or has been cleared.")
        return h in self.done

    def synchronize(self, h):
        self.live.discard(h)
        self.synchronized.append(h)
        if h in self.errors:
            raise self.errors[h]


def in_flight_round(handles, fake):
    from prsgd_hvd.overlap import InFlight
    averager = Averager(hvd.global_process_set, "unit.inflight")
    pending = averager.start(tensors(), RoundId("scheduled", 1))  # two buckets
    pending.handles = list(handles)
    averager.hvd = fake
    held = InFlight()
    held.hold(pending, "key")
    return averager, pending, held


def test_a_failed_collective_ends_the_round_and_a_cancel_does_not_touch_its_handles():
    # A dead peer fails the first bucket; Horovod's elastic restore then discards the round
    # that is still held (the CI failure: poll on the consumed handle raised ValueError).
    fake = HandlesOf(live=[11, 12], done=[11, 12], errors={11: RuntimeError("peer gone")})
    averager, pending, held = in_flight_round([11, 12], fake)
    with pytest.raises(RuntimeError, match="peer gone"):
        pending.wait()
    assert pending.failed and averager.pending is None
    assert fake.synchronized == [11, 12] and not fake.live  # the rest collected, nothing leaked
    held.cancel()  # no poll of a consumed handle
    with pytest.raises(RuntimeError, match="failed; it cannot be waited for again"):
        pending.wait()
    averager.start(tensors(), RoundId("scheduled", 1))  # the averager can start again


def test_an_interrupted_wait_is_resumed_with_the_handles_left():
    fake = HandlesOf(live=[21, 22], done=[21])
    averager, pending, held = in_flight_round([21, 22], fake)
    real_sleep, calls = time.sleep, []

    def interrupt(s):
        calls.append(s)
        raise KeyboardInterrupt
    time.sleep = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            pending.wait()
    finally:
        time.sleep = real_sleep
    assert not pending.failed and pending.handles == [None, 22] and fake.synchronized == [21]
    fake.done.add(22)
    pending.wait()
    assert fake.synchronized == [21, 22] and averager.pending is None


def test_forgetting_a_round_collects_what_completed_and_never_waits():
    fake = HandlesOf(live=[31, 32], done=[31], errors={31: RuntimeError("shut down")})
    averager, pending, held = in_flight_round([31, 32], fake)
    t0 = time.perf_counter()
    held.forget()
    assert time.perf_counter() - t0 < 0.5
    assert fake.synchronized == [31] and held.pending is None and averager.pending is None
    assert pending.failed
    held.cancel()  # nothing held any more


def _one_bucket_round(values, weight, anchor, number=1):
    layout = BucketLayout([torch.zeros(len(values))], n_ranks=1)
    layout.buckets[0].payload.copy_(torch.tensor(values))
    return Round(layout, RoundId("scheduled", number),
                 [(weight,) + (0.0,) * (CONTROL_FIELDS - 1)], anchor=anchor)


def test_the_anchor_follows_finite_averages_and_only_when_kept():
    kept = Anchor(kept=True)
    kept.follow(_one_bucket_round([2.0, 4.0, 6.0, 8.0], 2.0, kept))  # the sum, weight 2
    assert kept.ready(1) and torch.equal(kept.bucket(0), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    kept.follow(_one_bucket_round([float("nan"), 0.0, 0.0, 0.0], 1.0, kept, 2))
    # a NaN round is no common point
    assert torch.equal(kept.bucket(0), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    kept.reset()
    assert not kept.ready(1)
    unkept = Anchor(kept=False)
    unkept.follow(_one_bucket_round([2.0, 4.0, 6.0, 8.0], 2.0, unkept))
    assert not unkept.ready(1)  # nothing stored: no stage asked for it


def test_the_write_stage_fuses_only_when_the_update_follows_and_the_rule_applies():
    from prsgd_hvd.update_rules import PlainAverage, UpdateRule, WriteStage

    class Fused(UpdateRule):
        fuses_update, needs_measured = True, False
        ok = True

        def applies(self, rnd):
            return self.ok

        def apply(self, rnd, measured):
            self.seen = measured
            return 7.0

    ts = [torch.zeros(2)]
    rnd = Averager(hvd.global_process_set, "unit.write").start(ts, RoundId("scheduled", 1),
                                                               weight=2.0).wait()
    fused = Fused()
    stage = WriteStage(PlainAverage(ops_reference), fused)
    asked = []
    n_params = lambda: asked.append(1) or 1  # noqa: E731
    assert stage.write(rnd, n_params, update_follows=True) == (7.0, True)
    assert fused.seen == 0 and asked == []  # the fused rule knows its parameters
    assert stage.write(rnd, n_params, update_follows=False) == (0.0, False)
    assert asked == [1]
    fused.ok = False
    assert stage.choose(rnd, update_follows=True) is stage.average
