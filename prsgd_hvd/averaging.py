"""Packing tensors into flat buffers and averaging them across ranks with Horovod.

One averaging round:

    start():  pack each bucket (kernel 1: flatten)  ->  hvd.allreduce_async_(Sum)
    wait():   the sums have arrived
    write_back() (kernel 2: unflatten_average_), or the caller's fused average+SGD step on the
              same flat buffers, scaled by ``Round.scale``

A bucket holds every tensor of one (device, dtype); fp16/bf16 tensors are summed in an fp32
buffer so that the mean of low-precision models is computed accurately and rounded once.
The bucket layout is built once and reused until the set of tensors changes.

NOTE: [control elements]
Bucket 0's flat buffer carries two extra elements after the payload, summed with it in the same
allreduce: this rank's weight in the average and 1.0 if this rank is still training (0.0 once
it is in ``finalize()``). The sums give the divisor of the (possibly weighted) mean and tell a
finishing rank whether the round it joined was someone's scheduled round or the final one --
the join protocol of ``finalize()`` -- without a second collective per round. (With
compression they travel in a tiny fp32 allreduce of their own: 16 bits cannot count exactly.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .compression import DeltaCodec

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_N_CONTROL = 2  # weight, still-training flag


@dataclass
class Bucket:
    """Tensors of one (device, dtype) and the flat buffer they are averaged through."""

    index: int
    device: torch.device
    dtype: torch.dtype
    tensors: List[torch.Tensor]
    flat: torch.Tensor              # payload, then the control elements in bucket 0
    # Where each tensor's segment starts in the payload (and one past the end, last).
    offsets: List[int] = field(default_factory=list)
    handle: Optional[int] = None

    @property
    def payload(self) -> torch.Tensor:
        return self.flat[:self.offsets[-1]]

    @property
    def control(self) -> torch.Tensor:
        return self.flat[self.offsets[-1]:]

    def segment(self, first: int, last: int) -> torch.Tensor:
        """The part of the payload holding tensors[first:last] (contiguous by construction)."""
        return self.flat[self.offsets[first]:self.offsets[last]]


@dataclass
class Round:
    """The outcome of one round: the summed buckets and what the control elements said."""

    buckets: List[Bucket]
    weight_sum: float     # divisor of the mean
    active_ranks: int     # ranks still training (0: every rank is finishing)
    prescaled: bool = False  # the payloads already hold the average (compressed rounds)

    @property
    def scale(self) -> float:
        return 1.0 if self.prescaled else 1.0 / self.weight_sum

    _finite: Optional[bool] = field(default=None, repr=False)

    def is_finite(self) -> bool:
        # NaN and inf survive a sum, so one reduction per bucket finds them without the
        # temporary of isfinite(); a sum that overflows only raises a false alarm, which the
        # caller's per-rank check clears. Computed once per round (the compression codec and
        # the optimizer both ask).
        if self._finite is None:
            self._finite = all(math.isfinite(float(b.payload.sum()))
                               for b in self.buckets if b.tensors)
        return self._finite


def flat_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _signature(tensors: Sequence[torch.Tensor]) -> Tuple:
    return tuple((t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)


class Averager:
    """Averages lists of tensors over a Horovod process set, one allreduce per bucket."""

    def __init__(self, process_set, name: str = "prsgd_hvd", kernels=ops,
                 compression: Optional[str] = None, error_feedback: bool = True):
        import horovod.torch as hvd  # imported here so that importing this module stays cheap

        self._hvd = hvd
        # 16-bit deltas from the last common average (prsgd_hvd.compression); None: full precision.
        self.codec = DeltaCodec(compression, error_feedback) if compression else None
        self._compressed_round = False
        self._control_handle = None
        self.kernels = kernels  # prsgd_hvd.ops, or prsgd_hvd.ops_reference for fused=False
        self.process_set = process_set
        self.name = name
        self.size = process_set.size()
        self._buckets: List[Bucket] = []
        self._signature: Optional[Tuple] = None
        self._started_at = 0.0
        self.in_flight = False
        # Telemetry, read by DistributedLocalSGD.stats().
        self.bytes_sent = 0
        self.comm_seconds = 0.0
        self.wait_seconds = 0.0

    # ---- layout ---------------------------------------------------------------------------
    def buckets_for(self, tensors: Sequence[torch.Tensor]) -> List[Bucket]:
        """The bucket layout for ``tensors`` (cached; rebuilt only when the tensors change).

        Tensors keep their relative order inside a bucket, so a caller that lists tensors
        group by group gets each group as one contiguous segment of the flat buffer.
        """
        sig = _signature(tensors)
        if sig != self._signature:
            by_key: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
            for t in tensors:
                if not t.is_floating_point():
                    raise TypeError(f"can only average floating-point tensors, got {t.dtype}")
                by_key.setdefault((t.device, t.dtype), []).append(t)
            if not by_key:  # nothing to average still needs bucket 0 for the control elements
                by_key[(torch.device("cpu"), torch.float32)] = []
            buckets = []
            for i, ((device, dtype), ts) in enumerate(by_key.items()):
                offsets = [0]
                for t in ts:
                    offsets.append(offsets[-1] + t.numel())
                extra = _N_CONTROL if i == 0 else 0
                flat = torch.empty(offsets[-1] + extra, dtype=flat_dtype_for(dtype), device=device)
                buckets.append(Bucket(i, device, dtype, ts, flat, offsets=offsets))
            self._buckets, self._signature = buckets, sig
            if self.codec is not None:
                self.codec.reset()
        return self._buckets

    # ---- one round ------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, tensors: Sequence[torch.Tensor], weight: float = 1.0,
              active: bool = True, contribute: bool = True) -> None:
        """Pack ``tensors`` (times ``weight``) and start summing them across ranks.

        ``contribute=False`` sends zeros instead (a rank left out of the average still takes
        part in the collective)."""
        if self.in_flight:
            raise RuntimeError("an averaging round is already in flight; wait() for it first")
        buckets = self.buckets_for(tensors)
        self._started_at = time.perf_counter()
        compressed = self.codec is not None and self.size > 1 and self.codec.ready(len(buckets))
        self._compressed_round = compressed
        for b in buckets:
            if not contribute:
                b.payload.zero_()
            else:
                self.kernels.flatten(b.tensors, out=b.payload)
                if weight != 1.0 and not compressed:
                    b.payload.mul_(weight)
            if b.index == 0:
                b.control[0].fill_(weight)
                b.control[1].fill_(1.0 if active else 0.0)
            if self.size == 1:
                continue
            name = f"{self.name}.bucket{b.index}"
            if compressed:
                wire = self.codec.encode(b.index, b.payload, weight, contribute)
                if self.codec.uses_allgather:
                    b.handle = self._hvd.allgather_async(
                        wire.view(torch.int16), name=name, process_set=self.process_set)
                else:
                    b.handle = self._hvd.allreduce_async_(
                        wire, name=name, op=self._hvd.Sum, process_set=self.process_set)
                self.bytes_sent += wire.numel() * wire.element_size()
            else:
                b.handle = self._hvd.allreduce_async_(
                    b.flat, name=name, op=self._hvd.Sum, process_set=self.process_set)
                self.bytes_sent += b.flat.numel() * b.flat.element_size()
        if compressed:
            control = buckets[0].control
            self._control_handle = self._hvd.allreduce_async_(
                control, name=f"{self.name}.control", op=self._hvd.Sum,
                process_set=self.process_set)
            self.bytes_sent += control.numel() * control.element_size()
        self.in_flight = True

    def wait(self) -> Round:
        """Block until every bucket's sum has arrived."""
        if not self.in_flight:
            raise RuntimeError("no averaging round in flight; call start() first")
        t0 = time.perf_counter()
        received = []
        for b in self._buckets:
            received.append(self._hvd.synchronize(b.handle) if b.handle is not None else None)
            b.handle = None
        if self._control_handle is not None:
            self._hvd.synchronize(self._control_handle)
            self._control_handle = None
        now = time.perf_counter()
        self.wait_seconds += now - t0
        self.comm_seconds += now - self._started_at
        self.in_flight = False
        weight_sum, active = self._buckets[0].control.tolist()
        rnd = Round(self._buckets, weight_sum, int(round(active)), prescaled=self._compressed_round)
        if self.codec is not None and self.size > 1:
            self._advance_codec(rnd, received)
        return rnd

    @torch.no_grad()
    def _advance_codec(self, rnd: Round, received: List[Optional[torch.Tensor]]) -> None:
        """Compressed rounds: rebuild the average from the deltas. Every accepted round (a
        non-finite one is retried or raised by the caller) sets the common anchor."""
        for b, got in zip(rnd.buckets, received):
            if rnd.prescaled:
                self.codec.decode(b.index, b.payload, got, self.size, rnd.weight_sum)
        if not rnd.is_finite():
            return
        for b in rnd.buckets:
            average = b.payload if rnd.prescaled else b.payload * rnd.scale
            self.codec.commit(b.index, average)

    @torch.no_grad()
    def write_back(self, rnd: Round, measured: Optional[Sequence[int]] = None) -> Optional[float]:
        """``tensor = sum / weight_sum`` for every tensor of the round.

        With ``measured`` (per bucket, how many leading tensors to measure) it also returns
        this rank's squared distance from the average over those tensors, taken in the same
        pass (``divergence=`` of the kernels)."""
        total = None if measured is None else 0.0
        for i, b in enumerate(rnd.buckets):
            n = 0 if measured is None else measured[i]
            if n:
                acc = torch.zeros(1, dtype=torch.float64, device=b.device)
                self.kernels.unflatten_average_(b.segment(0, n), b.tensors[:n], scale=rnd.scale,
                                                divergence=acc)
                total += float(acc)
            if n < len(b.tensors):
                self.kernels.unflatten_average_(b.segment(n, len(b.tensors)), b.tensors[n:],
                                                scale=rnd.scale)
        return total

    def average_(self, tensors: Sequence[torch.Tensor], active: bool = True) -> Round:
        """Blocking: replace every tensor by its mean over the process set."""
        self.start(tensors, active=active)
        rnd = self.wait()
        self.write_back(rnd)
        return rnd
