"""Wire formats: how one bucket of a round travels, and how the sum is rebuilt on arrival.

NOTE: [wire formats]
A wire format turns a packed bucket (``Bucket.payload``: this rank's tensors, flat) into the
messages that carry it -- each a tensor plus the collective that moves it: ``allreduce`` (Sum,
in place) when the sum can be taken on the wire, ``allgather`` when it cannot (bf16, which
Horovod 0.28 does not sum; formats with per-chunk scales) -- and, once they arrived, rebuilds the
*flat sum over ranks of weight_r * x_r* in ``payload``. Everything after that (checks, update
rules) sees the same thing whatever the format: ``payload * Round.scale`` is the average.

The control records (NOTE: [control records] in prsgd_hvd.averaging) ride the same way for
every format: bucket 0's ``control`` block, n_ranks fp32 slots, must come back summed exactly.
A format whose bucket-0 message is that fp32 buffer itself carries them for free
(``control_inline``); any other gets them as one more fp32 allreduce, added by
:meth:`WireFormat.messages` and named ``<averager>.control`` for every such format.

A format may keep per-bucket state (error feedback); the round tells it when it was accepted
(:meth:`WireFormat.accepted`) so a rerun round starts from the same state. A format that sends
changes reads the common point of the last round from the averager's
:class:`~prsgd_hvd.anchor.Anchor` (``needs_anchor``) and falls back to full precision while
there is none (``for_round``). New formats are one class here (plus its kernels and tests) and
a name in :func:`for_option`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from .anchor import Anchor

if TYPE_CHECKING:  # pragma: no cover
    from .averaging import Bucket, BucketLayout, Round

ALLREDUCE, ALLGATHER = "allreduce", "allgather"


@dataclass
class Message:
    """One collective of a round: ``tensor`` moved by ``collective``, named
    ``<averager>.<name>``."""

    bucket: int
    tensor: torch.Tensor
    collective: str
    name: str
    control: bool = False  # the control records (NOTE above), not part of the bucket's payload


class WireFormat:
    """How a bucket travels (NOTE: [wire formats])."""

    name: Optional[str] = None   # the ``compression`` option it implements; None: full precision
    needs_anchor = False
    control_inline = False       # bucket 0's message is its fp32 flat buffer, records included

    def for_round(self, layout: "BucketLayout", anchor: Anchor) -> "WireFormat":
        """The format this round uses (a delta format needs a common point first)."""
        return self

    def messages(self, bucket: "Bucket", weight: float, contribute: bool,
                 anchor: Anchor) -> List[Message]:
        out = self.encode(bucket, weight, contribute, anchor)
        if bucket.index == 0 and not self.control_inline:
            out.append(Message(0, bucket.control, ALLREDUCE, "control", control=True))
        return out

    def encode(self, bucket: "Bucket", weight: float, contribute: bool,
               anchor: Anchor) -> List[Message]:
        """``bucket.payload`` holds this rank's packed tensors (zeros when it does not
        contribute); return the messages that carry ``weight`` times it."""
        raise NotImplementedError

    def decode(self, bucket: "Bucket", received: List[torch.Tensor], size: int,
               weight_sum: float, anchor: Anchor) -> None:
        """Write the flat sum over ranks into ``bucket.payload`` from what arrived (one result
        per message of :meth:`encode`, in order)."""
        raise NotImplementedError

    def accepted(self, rnd: "Round") -> None:
        """The round was written back: per-round state (error feedback) moves on."""

    def reset(self) -> None:
        """The layout changed: per-bucket state is void."""


class FullPrecision(WireFormat):
    """The flat buffer itself (fp32 for fp16/bf16 tensors), summed in place; control records
    at its end, so a round is one allreduce per bucket."""

    control_inline = True

    def encode(self, bucket, weight, contribute, anchor):
        if contribute and weight != 1.0:
            bucket.payload.mul_(weight)
        return [Message(bucket.index, bucket.flat, ALLREDUCE, f"bucket{bucket.index}")]

    def decode(self, bucket, received, size, weight_sum, anchor):
        pass  # summed in place


FULL_PRECISION = FullPrecision()


class Delta16(WireFormat):
    """16-bit changes from the anchor, with error feedback.

    ``hvd.DistributedOptimizer(compression=hvd.Compression.fp16)`` casts what it sends. Casting
    *weights* to 16 bits would lose their low bits at every round (a bf16 weight keeps 3
    significant digits). What changes between two rounds is small, so this sends that:

        delta_r = x_r - anchor (+ residual_r)     anchor: the last common point, fp32, the
        send 16-bit(weight_r * delta_r)            same on every rank (NOTE: [the anchor])
        sum = anchor * sum(weights) + sum of what arrived   (in fp32)

    The rounding error of a round is relative to the change, not to the weights, and error
    feedback (what did not survive the cast is added to the next round's delta) keeps those
    errors from accumulating. The first round has no anchor yet and is sent in full precision.
    Horovod 0.28 sums fp16 but rejects bf16, so ``bf16`` allgathers the 16-bit deltas (each
    rank still sends half the bytes; each receives N halves) and sums them in fp32.
    """

    needs_anchor = True

    def __init__(self, kind: str, error_feedback: bool = True):
        if kind not in ("fp16", "bf16"):
            raise ValueError(f"Delta16: kind must be 'fp16' or 'bf16', got {kind!r}")
        self.name = kind
        self.wire_dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        self.collective = ALLGATHER if kind == "bf16" else ALLREDUCE
        self.error_feedback = error_feedback
        self._residual: Dict[int, torch.Tensor] = {}       # carried into the next delta
        self._next_residual: Dict[int, torch.Tensor] = {}  # becomes it when the round is accepted
        self._wire: Dict[int, torch.Tensor] = {}

    def for_round(self, layout, anchor):
        return self if anchor.ready(len(layout.buckets)) else FULL_PRECISION

    def reset(self) -> None:
        self._residual.clear()
        self._next_residual.clear()
        self._wire.clear()

    @torch.no_grad()
    def encode(self, bucket, weight, contribute, anchor):
        index, payload = bucket.index, bucket.payload
        wire = self._wire.get(index)
        if wire is None:
            wire = self._wire[index] = torch.empty_like(payload, dtype=self.wire_dtype)
        if not contribute:  # left out of this round: its residual waits for the next one
            if index in self._residual:
                self._next_residual[index].copy_(self._residual[index])
            wire.zero_()
        else:
            self._encode_delta(index, payload, weight, anchor.bucket(index), wire)
        tensor = wire.view(torch.int16) if self.collective == ALLGATHER else wire
        return [Message(index, tensor, self.collective, f"bucket{index}")]

    def _encode_delta(self, index, payload, weight, anchor, wire) -> None:
        delta = payload.sub_(anchor)
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
            # once this round is accepted, so a retried round starts from the same.
            lost = self._next_residual[index].copy_(delta).sub_(wire.to(delta.dtype))
            if weight != 1.0:
                lost.div_(weight)

    @torch.no_grad()
    def decode(self, bucket, received, size, weight_sum, anchor):
        got, payload = received[0], bucket.payload
        if self.collective == ALLGATHER:
            summed = got.view(self.wire_dtype).view(size, -1).to(payload.dtype).sum(0)
        else:
            summed = got.to(payload.dtype)
        # Each rank sent weight_r * (x_r - anchor): adding the anchor sum(weights) times gives
        # the sum of weight_r * x_r, the same quantity a full-precision round delivers.
        torch.add(summed, anchor.bucket(bucket.index), alpha=weight_sum, out=payload)

    @torch.no_grad()
    def accepted(self, rnd) -> None:
        if not rnd.is_finite():
            return
        for index in list(self._next_residual):
            self._residual[index], self._next_residual[index] = \
                self._next_residual[index], self._residual[index]


def for_option(compression: Optional[str], error_feedback: bool = True) -> WireFormat:
    """The wire format of ``DistributedLocalSGD(compression=...)`` (after resolve_compression),
    a new one per averager (formats keep per-bucket state)."""
    if compression is None:
        return FULL_PRECISION
    return Delta16(compression, error_feedback)
