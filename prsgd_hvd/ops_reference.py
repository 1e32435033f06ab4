"""Slow, obvious pure-torch versions of every op in :mod:`prsgd_hvd.ops`.

They define the semantics: the compiled kernels are tested against these, and the optimizer's
``fused=False`` path runs on them. Arithmetic is done in float32 (float64 inputs stay float64)
and rounded once when written, which is what the kernels do too.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["flatten", "unflatten_average_", "unflatten_average_sgd_"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flatten(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenate ``tensors`` (any shapes, contiguous or not) into one 1-D tensor.

    With ``out`` the values are cast to ``out.dtype`` and written into it; ``out`` must hold
    exactly the total number of elements.
    """
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if out is None:
        if not tensors:
            raise ValueError("flatten: 'tensors' is empty and no 'out' was given to take a dtype from")
        out = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    if out.dim() != 1 or out.numel() != total:
        raise ValueError(f"flatten: 'out' must be 1-D with {total} elements, got shape {tuple(out.shape)}")
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset:offset + n].copy_(t.reshape(-1))
        offset += n
    return out


def _segments(flat: torch.Tensor, params: Sequence[torch.Tensor]):
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"'flat' must be 1-D with {total} elements (the params' total), "
                         f"got shape {tuple(flat.shape)}")
    offset = 0
    for p in params:
        n = p.numel()
        yield flat[offset:offset + n].view(p.shape)
        offset += n


def unflatten_average_(flat: torch.Tensor, params: Sequence[torch.Tensor], *, scale: float) -> None:
    """``params[i] = flat[segment_i] * scale`` (segments laid out as :func:`flatten` does)."""
    for p, seg in zip(params, _segments(flat, params)):
        op = _opmath(p.dtype)
        p.copy_(seg.to(op) * scale)


def unflatten_average_sgd_(
    flat: torch.Tensor,
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    scale: float,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: Union[bool, Sequence[bool]] = False,
) -> None:
    """Average, then apply exactly ``torch.optim.SGD``'s update to the average, per tensor.

    ``grads[i] is None`` means the param takes no local update: it only receives the average.
    With ``momentum != 0`` every param with a grad needs a buffer tensor; where ``first_step``
    (one bool, or one per tensor) is true the buffer is initialised to the (decayed) gradient,
    as ``torch.optim.SGD`` does when it creates it, instead of being read.
    """
    n = len(params)
    if len(grads) != n or len(momentum_buffers) != n:
        raise ValueError(f"'params', 'grads' and 'momentum_buffers' must have the same length, "
                         f"got {n}, {len(grads)}, {len(momentum_buffers)}")
    firsts = [bool(first_step)] * n if isinstance(first_step, bool) else [bool(f) for f in first_step]
    if len(firsts) != n:
        raise ValueError(f"'first_step' must be a bool or have one entry per param ({n}), got {len(firsts)}")
    for p, g, buf, first, seg in zip(params, grads, momentum_buffers, firsts, _segments(flat, params)):
        op = _opmath(p.dtype)
        x = seg.to(op) * scale
        if g is not None:
            d = g.to(op)
            if maximize:
                d = -d
            if weight_decay != 0:
                d = d + weight_decay * x
            if momentum != 0:
                if buf is None:
                    raise ValueError("'momentum_buffers' needs a tensor for every param with a grad "
                                     "when momentum != 0 (pass first_step=True to initialise it)")
                b = d.clone() if first else buf.to(op) * momentum + (1 - dampening) * d
                buf.copy_(b)
                d = d + momentum * b if nesterov else b
            x = x - lr * d
        p.copy_(x)
