"""16-bit compression of model averaging, done right for models.

``hvd.DistributedOptimizer(compression=hvd.Compression.fp16)`` casts what it sends. Casting
*weights* to 16 bits would lose their low bits at every round (a bf16 weight keeps 3 significant
digits). What changes between two rounds is small, so we send that instead:

    delta_i = x_i - anchor (+ residual_i)         anchor: the last common average, fp32, the
    send fp16(delta_i) ; sum over ranks            same on every rank
    average = anchor + sum / N   (in fp32)  ->  the new anchor, on every rank alike

The rounding error of a round is relative to the change, not to the weights, and error
feedback (the part of delta_i that did not survive the cast is added to the next round's
delta) keeps those errors from accumulating across rounds. The first round has no anchor yet
and is sent in full precision.

Horovod 0.28 sums fp16 but rejects bf16 tensors, so the bf16 variant allgathers the 16-bit
deltas (each rank still sends half the bytes; each receives N halves) and sums them in fp32.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["Compression", "BF16Compressor", "resolve_compression"]


def _horovod_compression():
    from horovod.torch.compression import Compression as HorovodCompression
    from horovod.torch.compression import Compressor
    return HorovodCompression, Compressor


_HorovodCompression, _Compressor = _horovod_compression()


class BF16Compressor(_Compressor):
    """bf16 wire format (also usable with ``hvd.DistributedOptimizer`` where Horovod can sum
    bf16; for model averaging ``DistributedLocalSGD`` allgathers it, see the module doc)."""

    @staticmethod
    def compress(tensor):
        ctx = tensor.dtype
        if tensor.dtype.is_floating_point:
            tensor = tensor.to(torch.bfloat16)
        return tensor, ctx

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) if ctx.is_floating_point else tensor


class Compression(_HorovodCompression):
    """Horovod's ``Compression`` (``none``, ``fp16``) plus ``bf16``."""

    bf16 = BF16Compressor


def resolve_compression(compression: Any) -> Optional[str]:
    """``None``/``Compression.none`` -> None; ``Compression.fp16``/"fp16"; ``.bf16``/"bf16"."""
    if compression is None or compression is _HorovodCompression.none:
        return None
    if compression is _HorovodCompression.fp16 or compression == "fp16":
        return "fp16"
    if compression is BF16Compressor or compression == "bf16":
        return "bf16"
    raise ValueError(f"DistributedLocalSGD: 'compression' must be None, hvd.Compression.fp16, "
                     f"hvd.Compression.bf16 (or 'fp16'/'bf16'), got {compression!r}")


class DeltaCodec:
    """Per-bucket state of 16-bit delta compression: anchor, residual and wire buffers."""

    def __init__(self, kind: str, error_feedback: bool = True):
        self.kind = kind
        self.wire_dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        self.error_feedback = error_feedback
        self._anchor: Dict[int, torch.Tensor] = {}
        self._residual: Dict[int, torch.Tensor] = {}       # carried into the next delta
        self._next_residual: Dict[int, torch.Tensor] = {}  # becomes it when the round commits
        self._wire: Dict[int, torch.Tensor] = {}

    @property
    def uses_allgather(self) -> bool:
        return self.kind == "bf16"

    def reset(self) -> None:
        """The bucket layout changed: the next round is sent in full precision again."""
        self._anchor.clear()
        self._residual.clear()
        self._next_residual.clear()
        self._wire.clear()

    def ready(self, n_buckets: int) -> bool:
        return len(self._anchor) == n_buckets

    @torch.no_grad()
    def encode(self, index: int, payload: torch.Tensor, weight: float,
               contribute: bool) -> torch.Tensor:
        """``payload`` holds this rank's packed tensors; returns the 16-bit buffer to send."""
        wire = self._wire.get(index)
        if wire is None:
            wire = self._wire[index] = torch.empty_like(payload, dtype=self.wire_dtype)
        if not contribute:  # left out of this round: its residual waits for the next one
            if index in self._residual:
                self._next_residual[index].copy_(self._residual[index])
            return wire.zero_()
        delta = payload.sub_(self._anchor[index])
        if self.error_feedback:
            if index not in self._residual:
                self._residual[index] = torch.zeros_like(payload)
                self._next_residual[index] = torch.zeros_like(payload)
            delta.add_(self._residual[index])
        if weight != 1.0:
            delta.mul_(weight)
        wire.copy_(delta)
        if self.error_feedback:
            # What the cast lost, in unweighted units, goes into the next round's delta --
            # once this round is accepted (commit), so a retried round starts from the same.
            lost = self._next_residual[index].copy_(delta).sub_(wire.to(delta.dtype))
            if weight != 1.0:
                lost.div_(weight)
        return wire

    @torch.no_grad()
    def decode(self, index: int, payload: torch.Tensor, received: torch.Tensor, size: int,
               weight_sum: float) -> None:
        """Write the new average into ``payload`` from the summed (or gathered) deltas."""
        if self.uses_allgather:
            summed = received.view(self.wire_dtype).view(size, -1).to(payload.dtype).sum(0)
        else:
            summed = received.to(payload.dtype)
        payload.copy_(self._anchor[index]).add_(summed, alpha=1.0 / weight_sum)

    @torch.no_grad()
    def commit(self, index: int, average: torch.Tensor) -> None:
        """The round was accepted: its average is the new common anchor."""
        anchor = self._anchor.get(index)
        if anchor is None:
            self._anchor[index] = average.clone()
            return
        anchor.copy_(average)
        if index in self._next_residual:
            self._residual[index], self._next_residual[index] = \
                self._next_residual[index], self._residual[index]
