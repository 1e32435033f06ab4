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
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

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


class DeltaFormat(WireFormat):
    """What every delta format shares: the anchor, and error feedback's residuals.

    A rank sends ``weight_r * (x_r - anchor + residual_r)`` in some lossy form; what the form
    lost (in unweighted units) becomes the residual of the next round -- once the round is
    accepted, so a rerun round starts from the same residual. A subclass encodes
    (:meth:`_delta` gives it the weighted delta, :meth:`_keep_lost` takes what the receivers
    will decode from it) and decodes."""

    needs_anchor = True

    def __init__(self, error_feedback: bool = True):
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

    def _left_out(self, index: int) -> None:
        """This rank is left out of the round: its residual waits for the next one."""
        if index in self._residual:
            self._next_residual[index].copy_(self._residual[index])

    def _delta(self, index, payload, weight, anchor) -> torch.Tensor:
        """``weight * (payload - anchor + residual)``, in place in ``payload``."""
        delta = payload.sub_(anchor)
        if self.error_feedback:
            if index not in self._residual:
                self._residual[index] = torch.zeros_like(payload)
                self._next_residual[index] = torch.zeros_like(payload)
            delta.add_(self._residual[index])
        if weight != 1.0:
            delta.mul_(weight)
        return delta

    def _keep_lost(self, index, delta, sent, weight) -> None:
        """What the wire lost (``delta - sent``, ``sent`` being what the receivers decode),
        in unweighted units, goes into the next round's delta once this round is accepted."""
        if self.error_feedback:
            lost = self._next_residual[index].copy_(delta).sub_(sent)
            if weight != 1.0:
                lost.div_(weight)

    @torch.no_grad()
    def accepted(self, rnd) -> None:
        if not rnd.is_finite():
            return
        for index in list(self._next_residual):
            self._residual[index], self._next_residual[index] = \
                self._next_residual[index], self._residual[index]


class Delta16(DeltaFormat):
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

    def __init__(self, kind: str, error_feedback: bool = True):
        if kind not in ("fp16", "bf16"):
            raise ValueError(f"Delta16: kind must be 'fp16' or 'bf16', got {kind!r}")
        super().__init__(error_feedback)
        self.name = kind
        self.wire_dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        self.collective = ALLGATHER if kind == "bf16" else ALLREDUCE

    @torch.no_grad()
    def encode(self, bucket, weight, contribute, anchor):
        index, payload = bucket.index, bucket.payload
        wire = self._wire.get(index)
        if wire is None:
            wire = self._wire[index] = torch.empty_like(payload, dtype=self.wire_dtype)
        if not contribute:
            self._left_out(index)
            wire.zero_()
        else:
            delta = self._delta(index, payload, weight, anchor.bucket(index))
            wire.copy_(delta)
            if self.error_feedback:
                self._keep_lost(index, delta, wire.to(delta.dtype), weight)
        tensor = wire.view(torch.int16) if self.collective == ALLGATHER else wire
        return [Message(index, tensor, self.collective, f"bucket{index}")]

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


# Elements per scale of the 8-bit format. Bytes: 1 per element + 4 per chunk (0.4% at 1024).
# Smaller chunks follow the range of each tensor more closely (a chunk's step is its largest
# |delta| / 127, so one large value coarsens only its own 1024 neighbours; chunks run over the
# bucket's flat buffer and a tensor shares at most its first and last chunk with another);
# larger ones save little (4096: 0.1%). 1024 is also a natural block for a future kernel.
INT8_CHUNK = 1024
_ALIGN_BYTES = 16  # the codes and every rank's message start on a 16-byte boundary


class Int8Delta(DeltaFormat):
    """8-bit changes from the anchor with a scale per chunk, allgathered; error feedback.

    Like :class:`Delta16`, each rank r encodes ``d_r = weight_r * (x_r - anchor + residual_r)``
    (the first round goes in full precision and sets the anchor), but in 8 bits: per chunk k of
    ``chunk`` consecutive elements of the bucket's flat payload (the last one shorter)

        scale_k = fp32(max|d_r[k]| / 127)            (0 for an all-zero chunk)
        code_i  = round_half_even(d_i / scale_k)     in -127..127, int8
        decoded_i = fp32(code_i * scale_k)           error <= scale_k / 2 per element

    all in the payload's dtype (fp32 for fp32/fp16/bf16 parameters), nothing random: the same
    delta gives the same bytes. A rank's message is one uint8 tensor -- its scales (fp32), then
    its codes, each block padded to 16 bytes -- and is allgathered (int8 codes cannot be summed
    on the wire: the sum would overflow, and each rank's codes have their own scales). Every
    rank decodes every rank's message and sums them in rank order 0, 1, ..., N-1 in the
    payload's dtype, so all ranks hold the same bits; then the anchor times the weight sum is
    added, as for the 16-bit formats. What the quantisation lost, ``d_r - decoded_r``
    (unweighted), is the next round's residual (``error_feedback=True``).

    inf/NaN: a chunk holding one has scale inf/NaN; its codes are sent as 0 and it decodes to
    NaN (0 * inf, anything * NaN) on every rank, so the round is non-finite and the non-finite
    policy sees it like a 16-bit round. A left-out rank (weight 0) sends zero codes and scales.
    """

    name = "int8"
    collective = ALLGATHER

    def __init__(self, error_feedback: bool = True, chunk: int = INT8_CHUNK):
        super().__init__(error_feedback)
        self.chunk = chunk
        self._work: Dict[int, torch.Tensor] = {}  # per bucket: d / scale, then a rank's decoded

    def message_bytes(self, n: int) -> Tuple[int, int, int]:
        """(number of chunks, where the codes start, bytes per rank) for n elements."""
        chunks = -(-n // self.chunk)
        codes_at = _padded(4 * chunks)
        return chunks, codes_at, _padded(codes_at + n)

    def reset(self) -> None:
        super().reset()
        self._work.clear()

    def _views(self, message: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A rank's (scales fp32, codes int8) inside its message."""
        chunks, codes_at, _ = self.message_bytes(n)
        return (message[:4 * chunks].view(torch.float32),
                message[codes_at:codes_at + n].view(torch.int8))

    def _parts(self, flat: torch.Tensor, scales: torch.Tensor):
        """(rows, their scales as a column) for the whole chunks of ``flat``, then its tail:
        at most two views, so every operation covers all chunks at once."""
        n, c = flat.numel(), self.chunk
        whole = n // c
        if whole:
            yield flat[:whole * c].view(whole, c), scales[:whole].unsqueeze(1)
        if n > whole * c:
            yield flat[whole * c:].view(1, -1), scales[whole:].unsqueeze(1)

    @torch.no_grad()
    def encode(self, bucket, weight, contribute, anchor):
        index, payload = bucket.index, bucket.payload
        n = payload.numel()
        message = self._wire.get(index)
        if message is None:
            message = self._wire[index] = torch.zeros(self.message_bytes(n)[2], dtype=torch.uint8,
                                                      device=payload.device)
            self._work[index] = torch.empty_like(payload)
        if not contribute:
            self._left_out(index)
            message.zero_()  # scales 0 and codes 0: decodes to zeros
        else:
            delta = self._delta(index, payload, weight, anchor.bucket(index))
            scales, codes = self._views(message, n)
            work = self._work[index]
            for (d, s), (q, _) in zip(self._parts(delta, scales), self._parts(work, scales)):
                self._quantize(d, s, q)
            codes.copy_(work)  # whole numbers in -127..127: exact
            if self.error_feedback:
                for q, s in self._parts(work, scales):
                    q.mul_(s.to(q.dtype))  # what the receivers decode for this rank
                self._keep_lost(index, delta, work, weight)
        return [Message(index, message, ALLGATHER, f"bucket{index}")]

    @staticmethod
    def _quantize(d: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> None:
        """Rows ``d`` -> their scales (written into ``scale``, a column of the message) and
        codes as whole numbers in ``q``."""
        amax = torch.amax(d.abs(), dim=1, keepdim=True)  # NaN and inf propagate
        scale.copy_(amax / 127)
        step = scale.to(d.dtype)
        # An all-zero chunk (or one whose scale underflowed to 0) divides by 1: codes 0.
        torch.div(d, torch.where(step == 0, torch.ones_like(step), step), out=q)
        # A non-finite scale leaves NaN quotients: send 0 (the scale carries the NaN/inf).
        q.round_().clamp_(-127, 127).nan_to_num_(0.0)

    @torch.no_grad()
    def decode(self, bucket, received, size, weight_sum, anchor):
        payload, work = bucket.payload, self._work[bucket.index]
        n = payload.numel()
        if n == 0:  # a bucket without tensors (bucket 0 of an empty list: records only)
            return
        rows = received[0].view(size, -1)
        # Rank order on every rank: the same sum, bit for bit (fp32 addition is not associative).
        for i, r in enumerate(range(size)):
            scales, codes = self._views(rows[r], n)
            into = payload if i == 0 else work
            into.copy_(codes)
            for q, s in self._parts(into, scales):
                q.mul_(s.to(q.dtype))
            if i:
                payload.add_(work)
        # sum_r weight_r * (x_r - anchor) + sum(weights) * anchor = sum_r weight_r * x_r;
        # the product rounded first (add's alpha may fuse it, differently on each device)
        payload.add_(torch.mul(anchor.bucket(bucket.index), weight_sum, out=work))


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES


def for_option(compression: Optional[str], error_feedback: bool = True) -> WireFormat:
    """The wire format of ``DistributedLocalSGD(compression=...)`` (after resolve_compression),
    a new one per averager (formats keep per-bucket state)."""
    if compression is None:
        return FULL_PRECISION
    if compression == "int8":
        return Int8Delta(error_feedback)
    return Delta16(compression, error_feedback)
