"""Packing tensors into flat buffers and averaging them across ranks with Horovod.

One averaging round:

    start():  pack each bucket (kernel 1: ops.flatten)  ->  hvd.allreduce_async_(Sum)
    finish(): wait for the allreduce, then write the mean back (kernel 2: ops.unflatten_average_,
              or the caller's fused average+SGD step on the same flat buffer)

A bucket holds every tensor of one (device, dtype); fp16/bf16 tensors are summed in an fp32
buffer so that the mean of low-precision models is computed accurately and rounded once.
The bucket layout is built once and reused until the set of tensors changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Bucket:
    """Tensors of one (device, dtype) and the flat buffer they are averaged through."""

    index: int
    device: torch.device
    dtype: torch.dtype
    tensors: List[torch.Tensor]
    flat: torch.Tensor
    handle: Optional[int] = None
    # Where each tensor's segment starts in ``flat`` (and one past the end, last).
    offsets: List[int] = field(default_factory=list)

    def segment(self, first: int, last: int) -> torch.Tensor:
        """The part of ``flat`` holding tensors[first:last] (contiguous by construction)."""
        return self.flat[self.offsets[first]:self.offsets[last]]


def flat_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _signature(tensors: Sequence[torch.Tensor]) -> Tuple:
    return tuple((t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)


class Averager:
    """Averages lists of tensors over a Horovod process set, one allreduce per bucket."""

    def __init__(self, process_set, name: str = "prsgd_hvd", kernels=ops):
        import horovod.torch as hvd  # imported here so that importing this module stays cheap

        self._hvd = hvd
        self.kernels = kernels  # prsgd_hvd.ops, or prsgd_hvd.ops_reference for fused=False
        self.process_set = process_set
        self.name = name
        self.size = process_set.size()
        self._buckets: List[Bucket] = []
        self._signature: Optional[Tuple] = None
        self._started_at: Optional[float] = None
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
            buckets = []
            for i, ((device, dtype), ts) in enumerate(by_key.items()):
                offsets = [0]
                for t in ts:
                    offsets.append(offsets[-1] + t.numel())
                flat = torch.empty(offsets[-1], dtype=flat_dtype_for(dtype), device=device)
                buckets.append(Bucket(i, device, dtype, ts, flat, offsets=offsets))
            self._buckets, self._signature = buckets, sig
        return self._buckets

    # ---- one round ------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, tensors: Sequence[torch.Tensor]) -> List[Bucket]:
        """Pack ``tensors`` and start summing them across ranks; returns the buckets."""
        if self.in_flight:
            raise RuntimeError("an averaging round is already in flight; finish() it first")
        buckets = self.buckets_for(tensors)
        self._started_at = time.perf_counter()
        for b in buckets:
            self.kernels.flatten(b.tensors, out=b.flat)
            if self.size > 1:
                b.handle = self._hvd.allreduce_async_(
                    b.flat, name=f"{self.name}.bucket{b.index}", op=self._hvd.Sum,
                    process_set=self.process_set)
                self.bytes_sent += b.flat.numel() * b.flat.element_size()
        self.in_flight = True
        return buckets

    def wait(self) -> List[Bucket]:
        """Block until every bucket's sum has arrived; ``flat`` then holds the sum over ranks."""
        if not self.in_flight:
            raise RuntimeError("no averaging round in flight; call start() first")
        t0 = time.perf_counter()
        for b in self._buckets:
            if b.handle is not None:
                self._hvd.synchronize(b.handle)
                b.handle = None
        now = time.perf_counter()
        self.wait_seconds += now - t0
        self.comm_seconds += now - self._started_at
        self.in_flight = False
        return self._buckets

    @torch.no_grad()
    def write_back(self, buckets: Sequence[Bucket]) -> None:
        """``tensor = sum / size`` for every tensor of ``buckets`` (after :meth:`wait`)."""
        scale = 1.0 / self.size
        for b in buckets:
            self.kernels.unflatten_average_(b.flat, b.tensors, scale=scale)

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Blocking: replace every tensor by its mean over the process set."""
        self.start(tensors)
        self.write_back(self.wait())
