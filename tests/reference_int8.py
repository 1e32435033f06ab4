"""Reference of the 8-bit delta wire format (``compression="int8"``), from its documented rule.

Plain torch in float64, none of prsgd_hvd's code. The package computes in float32; this
computes every operation exactly in float64 and rounds the result to float32 where the rule
says a float32 value is made (``f32``). For +, -, *, / a float64 result rounded to float32
equals the float32 operation's result (53 >= 2 * 24 + 2 bits: double rounding is innocuous),
so the package must match this bit for bit. The rule (README, ``Int8Delta``): per chunk of
``chunk`` consecutive elements of a rank's weighted delta d (the last chunk shorter)

    scale = f32(max |d| / 127)                       0 for an all-zero chunk; inf/NaN when the
                                                     chunk holds inf/NaN
    code  = round half to even of f32(d / scale),    clamped to -127..127; 0 where the scale is
                                                     0 (nothing to send) or not finite
    decoded = f32(code * scale)                      NaN for every element of a non-finite chunk

(a rank left out of the round sends zeros and keeps its residual); the receivers add the
decoded messages in rank order in float32, then the anchor times the
weight sum; the residual is f32(d - decoded), divided by the weight when it is not 1.

Unlike the package (whole chunks as rows, then the tail), this pads the delta with zeros to a
whole number of chunks: zeros change no chunk's max|d|.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

F64 = torch.float64


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(F64)


def _chunks(d: torch.Tensor, chunk: int) -> torch.Tensor:
    n = d.numel()
    rows = -(-n // chunk)
    padded = torch.zeros(rows * chunk, dtype=F64)
    padded[:n] = d
    return padded.view(rows, chunk)


def quantize(d: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes as int64, scales as float64 holding float32 values) of a weighted delta ``d``
    (float64 holding float32 values)."""
    n = d.numel()
    rows = _chunks(d.to(F64), chunk)
    amax = rows.abs().max(dim=1).values  # NaN if the chunk holds one (torch's max propagates it)
    finite = torch.isfinite(rows).all(dim=1)
    amax = torch.where(finite, amax, torch.where(torch.isnan(rows).any(dim=1),
                                                 torch.full_like(amax, float("nan")),
                                                 torch.full_like(amax, float("inf"))))
    scale = f32(amax / 127)
    codes = torch.zeros_like(rows)
    live = finite & (scale != 0)
    q = f32(rows[live] / scale[live].unsqueeze(1))
    codes[live] = torch.round(q).clamp(-127, 127)
    return codes.reshape(-1)[:n].to(torch.int64), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    n = codes.numel()
    rows = _chunks(codes.to(F64), chunk)
    return f32(rows * scale.unsqueeze(1)).reshape(-1)[:n]


def weighted_delta(x, anchor, residual, weight) -> torch.Tensor:
    """f32(f32(f32(x - anchor) + residual) * weight), as a rank builds what it sends."""
    d = f32(x.to(F64) - anchor.to(F64))
    if residual is not None:
        d = f32(d + residual)
    return d if weight == 1.0 else f32(d * weight)


def residual(d: torch.Tensor, decoded: torch.Tensor, weight: float) -> torch.Tensor:
    lost = f32(d - decoded)
    return lost if weight == 1.0 else f32(lost / weight)


def decode_sum(decoded: Sequence[torch.Tensor], anchor: torch.Tensor,
               weight_sum: float) -> torch.Tensor:
    """The flat sum every rank rebuilds: ranks' decoded deltas in rank order, then the anchor
    times the weight sum (one float32 rounding each)."""
    total = decoded[0]
    for t in decoded[1:]:
        total = f32(total + t)
    return f32(total + f32(anchor.to(F64) * weight_sum))


def message_bytes(n: int, chunk: int) -> int:
    """Bytes a rank sends for n elements: scales (fp32) and codes, each block padded to 16."""
    pad = lambda b: -(-b // 16) * 16  # noqa: E731
    return pad(pad(4 * -(-n // chunk)) + n)


def round_of_ranks(xs: List[torch.Tensor], anchor: torch.Tensor, residuals, weights,
                   chunk: int):
    """One round over all ranks: (the flat sum, each rank's codes and scales, new residuals).
    Weight 0: the rank is left out of the round -- it sends zero codes and scales, whatever its
    model holds, and keeps its residual for the next round."""
    decoded, sent, lost = [], [], []
    for x, e, w in zip(xs, residuals, weights):
        if w == 0.0:
            n = x.numel()
            decoded.append(torch.zeros(n, dtype=F64))
            sent.append((torch.zeros(n, dtype=torch.int64), torch.zeros(-(-n // chunk), dtype=F64)))
            lost.append(torch.zeros(n, dtype=F64) if e is None else e)
            continue
        d = weighted_delta(x, anchor, e, w)
        codes, scale = quantize(d, chunk)
        dec = dequantize(codes, scale, chunk)
        decoded.append(dec)
        sent.append((codes, scale))
        lost.append(residual(d, dec, w))
    return decode_sum(decoded, anchor, sum(weights)), sent, lost
