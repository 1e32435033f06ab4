"""One averaging round over a Horovod process set, from packing to writing back.

Read in this order; a round goes through the objects in it:

    Averager.start(tensors, identity, ...)  pack each bucket (kernel 1: flatten), encode it in
        -> PendingRound                     the wire format (prsgd_hvd.wire_formats) and start
                                            its collectives; owns the handles
    PendingRound.wait()                     everything arrived; the format rebuilds the flat sum
        -> Round                            the summed buckets and every rank's control record
    Round.check_identity()                  every rank was in the same round, or all raise
    (an update rule, prsgd_hvd.update_rules, then writes the round back: Round.write_back is
    the plain average, tensor = sum / weight_sum, kernel 2)

A bucket holds every tensor of one (device, dtype); fp16/bf16 tensors are summed in an fp32
buffer so that the mean of low-precision models is computed accurately and rounded once. The
layout is built once and reused until the set of tensors changes.

NOTE: [control records]
Bucket 0's flat buffer ends with one control record per rank of the process set, summed with the
payload in the same allreduce. A rank writes its own record (below) into its own slot and zeros
into the others, so the sum hands every rank every rank's record -- an allgather that costs no
extra collective. A record holds small integers and a weight, exact in fp32:

    weight       this rank's weight in the average (the divisor is the sum of weights)
    active       1 while the rank trains, 0 once it is in finalize() (the join protocol)
    kind, number the round's identity: which round this rank believes this is
    agree        the rank's schedule will agree on measured values right after this round
    fingerprint  (first round only) a checksum of the initial parameters, which must be equal
    layout       a checksum of the shapes and dtypes of what the rank sends

Ranks that disagree on the identity (an ``average_now()`` on one rank only, counters not
restored on resume) or on the layout raise the same error on every rank, before anything is
written back. (A wire format that does not send bucket 0's fp32 buffer as it is sends the
records as a small fp32 allreduce of their own: NOTE: [wire formats].)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .anchor import Anchor
from .collectives import FP32_EXACT, SetCollectives, small_checksum
from .horovod_api import is_layout_mismatch
from .waiting import wait_quietly
from .wire_formats import ALLGATHER, FULL_PRECISION, Message, WireFormat

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# A join round (finalize()) matches any kind; "final" is the join round right after finalize()
# released a prestarted round (prsgd_hvd.join: NOTE: [the round after a prestart]).
KINDS = ("scheduled", "average_now", "join", "final")
_JOINING = ("join", "final")
_FIELDS = ("weight", "active", "kind", "number", "agree", "fingerprint", "layout")
CONTROL_FIELDS = len(_FIELDS)  # per rank, after bucket 0's payload
# NOTE: [Segment layout] (csrc/segment_table.h): every tensor's segment starts on a 16-byte
# boundary of the flat buffer, so the CUDA kernels move every segment of an aligned tensor in
# 16-byte vectors. The padding is zeros (they sum to zero), at most 12 bytes per fp32 tensor,
# and is counted in bytes_sent like the rest of the buffer.
ALIGN = ops.PADDED


@dataclass(frozen=True)
class RoundId:
    """Which round this is: its kind and its number (rounds counted so far + 1)."""

    kind: str
    number: int

    def __str__(self) -> str:
        return f"{self.kind} round {self.number}"


class RoundMismatchError(RuntimeError):
    """The ranks took part in different rounds, or sent different layouts; raised on every rank."""


class RoundLayoutError(RuntimeError):
    """Horovod refused to sum the buckets (their shapes differ between ranks)."""


@dataclass
class Bucket:
    """Tensors of one (device, dtype) and the flat buffer they are averaged through."""

    index: int
    device: torch.device
    dtype: torch.dtype
    tensors: List[torch.Tensor]
    positions: List[int]            # each tensor's index in the list the layout was built from
    flat: torch.Tensor              # payload, then the control records in bucket 0
    offsets: List[int]              # where each tensor's segment starts (and the end, last)

    def __post_init__(self):
        # Views made once: slicing costs microseconds, and a round asks for them often.
        self.payload = self.flat[:self.offsets[-1]]
        self.control = self.flat[self.offsets[-1]:]

    def segment(self, first: int, last: int) -> torch.Tensor:
        """The part of the payload holding tensors[first:last] (contiguous by construction)."""
        return self.flat[self.offsets[first]:self.offsets[last]]


def flat_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _signature(tensors: Sequence[torch.Tensor]) -> Tuple:
    return tuple((t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)


class BucketLayout:
    """The buckets for one list of tensors. Tensors keep their relative order inside a bucket,
    so a caller that lists tensors group by group gets each group as one contiguous segment."""

    def __init__(self, tensors: Sequence[torch.Tensor], n_ranks: int):
        self.signature = _signature(tensors)
        self.tensors = list(tensors)
        by_key: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, t in enumerate(tensors):
            if not t.is_floating_point():
                raise TypeError(f"can only average floating-point tensors, got {t.dtype}")
            by_key.setdefault((t.device, t.dtype), []).append(i)
        if not by_key:  # nothing to average still needs bucket 0 for the control records
            by_key[(torch.device("cpu"), torch.float32)] = []
        self.buckets: List[Bucket] = []
        for b, ((device, dtype), positions) in enumerate(by_key.items()):
            ts = [tensors[i] for i in positions]
            offsets = ops.segment_layout(ts, flat_dtype_for(dtype), align=ALIGN)
            extra = n_ranks * len(_FIELDS) if b == 0 else 0
            flat = torch.empty(offsets[-1] + extra, dtype=flat_dtype_for(dtype), device=device)
            self.buckets.append(Bucket(b, device, dtype, ts, positions, flat, offsets))
        self._rows = None  # numpy view of bucket 0's control records (CPU)
        self.checksum = small_checksum(repr([(tuple(t.shape), str(t.dtype), t.device.type)
                                             for t in tensors]).encode())

    def write_record(self, rank: int, record: Tuple[float, ...]) -> None:
        """This rank's control record in its slot, zeros in the others (NOTE above)."""
        control = self.buckets[0].control
        if control.device.type == "cpu":  # through a numpy view: no tensor allocations
            if self._rows is None:
                self._rows = control.numpy().reshape(-1, len(_FIELDS))
            self._rows.fill(0.0)
            self._rows[rank] = record
        else:
            rows = control.view(-1, len(_FIELDS))
            rows.zero_()
            rows[rank] = torch.tensor(record, dtype=control.dtype)

    def read_records(self) -> List[Tuple[float, ...]]:
        return [tuple(r) for r in self.buckets[0].control.view(-1, len(_FIELDS)).tolist()]

    def leading(self, n: int) -> List[int]:
        """Per bucket, how many of its tensors are among the first ``n`` of the list."""
        return [sum(1 for p in b.positions if p < n) for b in self.buckets]


class Averager:
    """Averages lists of tensors over one Horovod process set: one round at a time, the
    messages of its wire format per bucket. ``name`` prefixes the round's collectives in
    Horovod (and its timeline); it must say what is averaged, so that ranks meet in the same
    collective."""

    def __init__(self, process_set, name: str, kernels=ops, wire: Optional[WireFormat] = None,
                 keep_anchor: bool = False):
        import horovod.torch as hvd  # imported here so that importing this module stays cheap

        self.hvd = hvd
        self.process_set = process_set
        self.name = name
        self.kernels = kernels  # prsgd_hvd.ops, or prsgd_hvd.ops_reference for fused=False
        self.collectives = SetCollectives(process_set, name)
        self.size, self.rank = self.collectives.size, self.collectives.rank
        self.members = self.collectives.members  # global ranks, to name ranks in errors
        self.wire = wire or FULL_PRECISION
        # The common point of the last round (NOTE: [the anchor]), for the wire format and the
        # update rules; a world of one sends nothing, so only a rule can need it there.
        self.anchor = Anchor(kept=keep_anchor or (self.wire.needs_anchor and self.size > 1))
        self.layout: Optional[BucketLayout] = None
        self.pending: Optional[PendingRound] = None
        # What this rank sent in its last round, per bucket (``keep_sent``): a delayed merge
        # (prsgd_hvd.streaming) needs x_sent after the sum has overwritten the send buffer.
        self.sent: List[torch.Tensor] = []
        # Telemetry, read by DistributedLocalSGD.stats().
        self.bytes_sent = 0
        self.comm_seconds = 0.0
        self.wait_seconds = 0.0

    def rename(self, name: str) -> None:
        self.name = self.collectives.prefix = name

    def layout_for(self, tensors: Sequence[torch.Tensor]) -> BucketLayout:
        if self.layout is None or self.layout.signature != _signature(tensors):
            if self.pending is not None:
                raise RuntimeError("the tensors changed while an averaging round was in flight")
            self.layout = BucketLayout(tensors, self.size)
            self.anchor.reset()
            self.wire.reset()
            self.sent = []
        return self.layout

    def sent_buffers(self, layout: BucketLayout) -> List[torch.Tensor]:
        """One flat buffer per bucket, shaped like its payload (made once per layout)."""
        if not self.sent:
            self.sent = [torch.empty_like(b.payload) for b in layout.buckets]
        return self.sent

    @torch.no_grad()
    def start(self, tensors: Sequence[torch.Tensor], identity: RoundId, *, weight: float = 1.0,
              active: bool = True, contribute: bool = True, agree: bool = False,
              fingerprint: int = 0, keep_sent: bool = False) -> "PendingRound":
        """Pack ``tensors`` (times ``weight``) and start summing them across ranks.

        ``contribute=False`` sends zeros and weight 0 (a rank left out of the average still
        takes part in the collective). ``keep_sent``: copy the packed tensors (unweighted)
        into :meth:`sent_buffers` before they are encoded."""
        if self.pending is not None:
            raise RuntimeError(f"{self.pending.identity} is still in flight; wait() for it first")
        layout = self.layout_for(tensors)
        started = time.perf_counter()
        wire = self.wire.for_round(layout, self.anchor) if self.size > 1 else FULL_PRECISION
        if not contribute:
            weight = 0.0
        record = (weight, 1.0 if active else 0.0, float(KINDS.index(identity.kind) + 1),
                  float(identity.number % FP32_EXACT), 1.0 if agree else 0.0, float(fingerprint),
                  float(layout.checksum))
        messages: List[Message] = []
        for b in layout.buckets:
            if not contribute:
                b.payload.zero_()
            else:
                self.kernels.flatten(b.tensors, out=b.payload, align=ALIGN)
            if keep_sent:
                self.sent_buffers(layout)[b.index].copy_(b.payload)
            if b.index == 0:
                layout.write_record(self.rank, record)
            messages += wire.messages(b, weight, contribute, self.anchor)
        pending = PendingRound(self, layout, identity, wire, messages, started)
        if self.size > 1:
            pending.handles = [self._send(m) for m in messages]
        self.pending = pending
        return pending

    def _send(self, m: Message) -> int:
        name = f"{self.name}.{m.name}"
        self.bytes_sent += m.tensor.numel() * m.tensor.element_size()
        if m.collective == ALLGATHER:
            return self.hvd.allgather_async(m.tensor, name=name, process_set=self.process_set)
        return self.hvd.allreduce_async_(m.tensor, name=name, op=self.hvd.Sum,
                                         process_set=self.process_set)


class PendingRound:
    """A round whose collectives are in flight. ``wait()`` may be called again after it was
    interrupted (an exception, e.g. KeyboardInterrupt, while waiting): it resumes with the
    handles that have not completed, so the averager is never left 'in flight' for good.

    A round whose collective *failed* (a mismatch, a dead peer) is over: ``wait()`` collects
    the rest of its handles, marks it ``failed`` and raises; there is nothing left to wait for
    (Horovod consumes a handle when it reports its result or its error)."""

    def __init__(self, averager: Averager, layout: BucketLayout, identity: RoundId,
                 wire: WireFormat, messages: List[Message], started_at: float):
        self.averager, self.layout, self.identity = averager, layout, identity
        self.wire, self.messages, self.started_at = wire, messages, started_at
        self.handles: List[Optional[int]] = [None] * len(messages)  # one per message
        self.received: List[Optional[torch.Tensor]] = [None] * len(messages)
        self.failed = False

    def wait(self) -> "Round":
        if self.failed:
            raise RuntimeError(f"{self.identity} failed; it cannot be waited for again")
        av = self.averager
        t0 = time.perf_counter()
        try:
            for i, handle in enumerate(self.handles):
                if handle is not None:
                    self.received[i] = self._collect(handle)
                    self.handles[i] = None
        except Exception as exc:  # Horovod reports a shape mismatch as a failed collective
            if self.failed and is_layout_mismatch(exc):
                raise RoundLayoutError(str(exc)) from exc
            raise
        finally:
            av.wait_seconds += time.perf_counter() - t0
        av.comm_seconds += time.perf_counter() - self.started_at
        av.pending = None
        rnd = Round(self.layout, self.identity, self.layout.read_records(), members=av.members,
                    anchor=av.anchor, wire=self.wire)
        if av.size > 1:
            self._decode(rnd)
        return rnd

    def _decode(self, rnd: "Round") -> None:
        """The wire format rebuilds each bucket's flat sum from what arrived."""
        per_bucket: List[List[torch.Tensor]] = [[] for _ in self.layout.buckets]
        for m, got in zip(self.messages, self.received):
            if not m.control:
                per_bucket[m.bucket].append(got)
        for b, received in zip(self.layout.buckets, per_bucket):
            self.wire.decode(b, received, self.averager.size, rnd.weight_sum, self.averager.anchor)

    def _collect(self, handle: int):
        hvd = self.averager.hvd
        wait_quietly(hvd, handle)  # an interrupt here leaves the round resumable
        try:
            return hvd.synchronize(handle)
        except Exception:  # the collective's error (an interrupt leaves the handle alive)
            # Wait for the rest: a later round reuses their names.
            self._end(wait=True, consumed=handle)
            raise

    def abandon(self) -> None:
        """Drop the round without waiting (its world is gone, e.g. before an elastic reset)."""
        self._end(wait=False)

    def _end(self, wait: bool, consumed: Optional[int] = None) -> None:
        """The round is over: collect its other handles (all, or only those that completed),
        ignoring their errors, so that nothing refers to consumed handles and the averager
        can start again."""
        hvd = self.averager.hvd
        for h in self.handles:
            if h is None or h == consumed:
                continue
            try:
                if wait or hvd.poll(h):
                    hvd.synchronize(h)
            except Exception:  # noqa: BLE001 - the first error is the one reported
                pass
        self.failed = True
        self.handles = [None] * len(self.handles)
        self.averager.pending = None


@dataclass
class Round:
    """A completed round: the summed buckets and every rank's control record."""

    layout: BucketLayout
    identity: RoundId
    records: List[Tuple[float, ...]]   # one per rank of the set (NOTE: [control records])
    members: List[int] = field(default_factory=list)
    anchor: Optional[Anchor] = None    # the averager's (NOTE: [the anchor])
    wire: WireFormat = FULL_PRECISION  # the format the round travelled in
    _finite: Optional[bool] = field(default=None, repr=False)
    # A rule adds the payload to the tensors instead of writing it (update_rules.MergeRound).
    accumulate = False

    def __post_init__(self):
        self.buckets: List[Bucket] = self.layout.buckets
        self._columns = dict(zip(_FIELDS, zip(*self.records)))
        self.weight_sum = sum(self._field("weight"))       # the divisor of the mean
        self.active_ranks = int(round(sum(self._field("active"))))  # ranks still training
        self.agree = any(self._field("agree"))             # a schedule agrees after this round

    @classmethod
    def local(cls, layout: BucketLayout, identity: RoundId) -> "Round":
        """A round of this rank alone, whose payload is what to write (scale 1, no anchor):
        how a delayed merge (prsgd_hvd.streaming) hands its merged point to the update rules."""
        record = (1.0, 1.0, float(KINDS.index(identity.kind) + 1), 0.0, 0.0, 0.0, 0.0)
        return cls(layout, identity, [record])

    def _field(self, name: str) -> Tuple[float, ...]:
        return self._columns[name]

    def count(self, kind: str) -> int:
        """How many ranks sent this round as ``kind``."""
        code = float(KINDS.index(kind) + 1)
        return sum(1 for k in self._field("kind") if k == code)

    @property
    def scale(self) -> float:
        """The payloads hold the weighted sum; times this is the average."""
        return 1.0 / self.weight_sum

    def accept(self) -> None:
        """The round was written back: the wire format's per-round state moves on."""
        self.wire.accepted(self)

    def fingerprints(self) -> List[int]:
        return [int(f) for f in self._field("fingerprint")]

    def check_identity(self) -> None:
        """Raise :class:`RoundMismatchError` (on every rank alike: all see the same records)
        unless every rank believes this is the same round and sent the same layout."""
        kinds = [KINDS[int(k) - 1] if 1 <= int(k) <= len(KINDS) else f"kind {k}"
                 for k in self._field("kind")]
        numbers = [int(n) for n in self._field("number")]
        layouts = [int(c) for c in self._field("layout")]
        training = {k for k in kinds if k not in _JOINING}
        if len(set(numbers)) > 1 or len(training) > 1:
            per_rank = "; ".join(f"rank {m}: {k} round {n}"
                                 for m, k, n in zip(self.members, kinds, numbers))
            raise RoundMismatchError(
                f"DistributedLocalSGD: the ranks are not in the same averaging round ({per_rank}). "
                f"Every rank must call step(), average_now() and finalize() at the same points "
                f"of the schedule and start from the same counters: after resuming from a "
                f"checkpoint on rank 0 only, broadcast the optimizer state with "
                f"hvd.broadcast_optimizer_state(optimizer, root_rank=0), which carries them.")
        if len(set(layouts)) > 1:
            groups: Dict[int, List[int]] = {}
            for m, c in zip(self.members, layouts):
                groups.setdefault(c, []).append(m)
            raise RoundMismatchError(
                f"DistributedLocalSGD: at {self.identity} the ranks average different sets of "
                f"tensors (same total size, different shapes or dtypes): ranks "
                f"{' vs '.join(str(v) for v in groups.values())}. Every rank must have the same "
                f"parameters, param groups and model buffers, in the same order.")

    def is_finite(self) -> bool:
        # NaN and inf survive a sum, so one reduction per bucket finds them without the
        # temporary of isfinite(); a sum that overflows only raises a false alarm, which the
        # non-finite policy's per-rank check clears. Computed once per round.
        if self._finite is None:
            self._finite = all(math.isfinite(float(b.payload.sum()))
                               for b in self.buckets if b.tensors)
        return self._finite

    @torch.no_grad()
    def write_back(self, kernels, measured: int = 0) -> Optional[float]:
        """``tensor = sum / weight_sum`` for every tensor of the round (kernel 2).

        With ``measured`` > 0 it also returns this rank's squared distance from the average
        over the first ``measured`` tensors of the list (the parameters), taken in the same
        pass (``divergence=`` of the kernels)."""
        total = None if measured == 0 else 0.0
        for b, n in zip(self.buckets, self.layout.leading(measured)):
            if n:
                acc = torch.zeros(1, dtype=torch.float64, device=b.device)
                kernels.unflatten_average_(b.segment(0, n), b.tensors[:n], scale=self.scale,
                                           divergence=acc, align=ALIGN)
                total += float(acc)
            if n < len(b.tensors):
                kernels.unflatten_average_(b.segment(n, len(b.tensors)), b.tensors[n:],
                                           scale=self.scale, align=ALIGN)
        return total
