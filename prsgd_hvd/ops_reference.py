"""Slow, obvious pure-torch versions of every op in :mod:`prsgd_hvd.ops`.

They define the semantics: the compiled kernels are tested against these, and the optimizer's
``fused=False`` path runs on them. Arithmetic is done in float32 (float64 inputs stay float64)
and rounded once when written, which is what the kernels do too.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

__all__ = ["segment_layout", "flatten", "unflatten_average_", "unflatten_average_sgd_",
           "unflatten_average_outer_sgd_"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else torch.Size(t).numel()


def segment_layout(tensors, flat_dtype: torch.dtype, *, align: int = 1) -> List[int]:
    """Offsets of the segments of a flat buffer of ``flat_dtype`` holding ``tensors`` (tensors or
    shapes): ``offsets[i]`` is where tensor i starts, ``offsets[-1]`` the buffer's numel.

    ``align`` (bytes, a power of two up to 4096): every segment starts at a multiple of ``align``
    bytes from the buffer's start, and the total is rounded up the same way; the gaps are zeros
    written by :func:`flatten`. ``align`` at most the element size (the default, 1) packs the
    segments back to back.
    """
    if not (isinstance(align, int) and 1 <= align <= 4096 and align & (align - 1) == 0):
        raise ValueError(f"'align' must be a power of two between 1 and 4096 (bytes), got {align!r}")
    unit = max(1, align // torch.empty((), dtype=flat_dtype).element_size())
    offsets, end = [], 0
    for t in tensors:
        start = -(-end // unit) * unit
        offsets.append(start)
        end = start + _numel(t)
    offsets.append(-(-end // unit) * unit)
    return offsets


def flatten(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None, *,
            align: int = 1) -> torch.Tensor:
    """Concatenate ``tensors`` (any shapes, contiguous or not) into one 1-D tensor.

    With ``out`` the values are cast to ``out.dtype`` and written into it; ``out`` must hold
    exactly the layout's total (:func:`segment_layout`; with the default ``align`` the total
    number of elements). Padding between segments is written as zeros.
    """
    tensors = list(tensors)
    if out is None:
        if not tensors:
            raise ValueError("flatten: 'tensors' is empty and no 'out' was given to take a dtype from")
        offsets = segment_layout(tensors, tensors[0].dtype, align=align)
        out = torch.empty(offsets[-1], dtype=tensors[0].dtype, device=tensors[0].device)
    offsets = segment_layout(tensors, out.dtype, align=align)
    total = offsets[-1]
    if out.dim() != 1 or out.numel() != total:
        raise ValueError(f"flatten: 'out' must be 1-D with {total} elements, got shape {tuple(out.shape)}")
    for i, t in enumerate(tensors):
        n = t.numel()
        out[offsets[i]:offsets[i] + n].copy_(t.reshape(-1))
        out[offsets[i] + n:offsets[i + 1]].zero_()
    return out


def _segments(flat: torch.Tensor, params: Sequence[torch.Tensor], align: int = 1):
    offsets = segment_layout(params, flat.dtype, align=align)
    total = offsets[-1]
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"'flat' must be 1-D with {total} elements (the params' total), "
                         f"got shape {tuple(flat.shape)}")
    for i, p in enumerate(params):
        yield flat[offsets[i]:offsets[i] + p.numel()].view(p.shape)


def _check_divergence(op_name: str, flat: torch.Tensor, divergence: Optional[torch.Tensor]) -> None:
    if divergence is None:
        return
    if divergence.dtype != torch.float64:
        raise TypeError(f"{op_name}: 'divergence' must be a float64 tensor (it accumulates in "
                        f"float64), got {divergence.dtype}")
    if divergence.numel() != 1:
        raise ValueError(f"{op_name}: 'divergence' must have exactly one element, got shape "
                         f"{list(divergence.shape)}")
    if divergence.device != flat.device:
        raise ValueError(f"{op_name}: 'divergence' is on {divergence.device} but 'flat' is on "
                         f"{flat.device}")


def _squared_distance(old: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
    """sum((old - avg)^2): difference and square in avg's dtype (opmath), sum in float64."""
    d = old.to(avg.dtype) - avg
    return (d * d).to(torch.float64).sum()


def _point(p: torch.Tensor, seg: torch.Tensor, scale: float, accumulate: bool) -> torch.Tensor:
    """The point a param is set to (before any step), in opmath: ``seg * scale``, or with
    ``accumulate`` the old param plus it -- a delayed merge x + (c - x_sent) when ``seg`` is
    the correction and ``scale`` 1 (csrc/common.h, NOTE: [Accumulate])."""
    op = _opmath(p.dtype)
    x = seg.to(op) * scale
    return p.to(op) + x if accumulate else x


def unflatten_average_(flat: torch.Tensor, params: Sequence[torch.Tensor], *, scale: float,
                       divergence: Optional[torch.Tensor] = None, align: int = 1,
                       accumulate: bool = False) -> None:
    """``params[i] = flat[segment_i] * scale`` (segments laid out as :func:`flatten` with the
    same ``align`` does).

    With ``divergence`` (a 1-element float64 tensor on ``flat``'s device), also adds to it the
    sum over all elements of all params of ``(old params[i] - flat[segment_i] * scale)**2``,
    the old value being the param's before this call: this rank's squared distance from the
    average. The difference is taken in opmath (float32; float64 for float64 params).

    ``accumulate``: ``params[i] = old params[i] + flat[segment_i] * scale`` instead, the sum
    taken in opmath and rounded once into the param; ``divergence`` then measures the distance
    of the old params from that point.
    """
    _check_divergence("unflatten_average_", flat, divergence)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for p, seg in zip(params, _segments(flat, params, align)):
        x = _point(p, seg, scale, accumulate)
        if divergence is not None:
            total += _squared_distance(p, x)
        p.copy_(x)
    if divergence is not None:
        divergence.add_(total.reshape(divergence.shape))


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
    divergence: Optional[torch.Tensor] = None,
    align: int = 1,
    accumulate: bool = False,
) -> None:
    """Average, then apply exactly ``torch.optim.SGD``'s update to the average, per tensor.

    ``grads[i] is None`` means the param takes no local update: it only receives the average.
    With ``momentum != 0`` every param with a grad needs a buffer tensor; where ``first_step``
    (one bool, or one per tensor) is true the buffer is initialised to the (decayed) gradient,
    as ``torch.optim.SGD`` does when it creates it, instead of being read.

    ``divergence`` as in :func:`unflatten_average_`: the distance of the params before this
    call (x_i^{t-1}) from the average, not from the stepped values.

    ``accumulate``: the step applies at ``old params[i] + flat[segment_i] * scale`` (as in
    :func:`unflatten_average_`) instead of at the average: a delayed merge and the next
    step's update in one pass.
    """
    n = len(params)
    if len(grads) != n or len(momentum_buffers) != n:
        raise ValueError(f"'params', 'grads' and 'momentum_buffers' must have the same length, "
                         f"got {n}, {len(grads)}, {len(momentum_buffers)}")
    firsts = [bool(first_step)] * n if isinstance(first_step, bool) else [bool(f) for f in first_step]
    if len(firsts) != n:
        raise ValueError(f"'first_step' must be a bool or have one entry per param ({n}), got {len(firsts)}")
    _check_divergence("unflatten_average_sgd_", flat, divergence)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for p, g, buf, first, seg in zip(params, grads, momentum_buffers, firsts,
                                         _segments(flat, params, align)):
        op = _opmath(p.dtype)
        x = _point(p, seg, scale, accumulate)
        if divergence is not None:
            total += _squared_distance(p, x)
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
    if divergence is not None:
        divergence.add_(total.reshape(divergence.shape))


def _sgd_math(x: torch.Tensor, g: torch.Tensor, buf: Optional[torch.Tensor], first: bool, *,
              lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              maximize: bool) -> torch.Tensor:
    """``torch.optim.SGD``'s update of ``x`` (opmath) by the gradient ``g`` (opmath), in the
    operation order of :func:`unflatten_average_sgd_`; ``buf`` (any float dtype) is read
    unless ``first`` and written when momentum is on. Returns the new x (opmath)."""
    d = -g if maximize else g
    if weight_decay != 0:
        d = d + weight_decay * x
    if momentum != 0:
        b = d.clone() if first else buf.to(x.dtype) * momentum + (1 - dampening) * d
        buf.copy_(b)
        d = d + momentum * b if nesterov else b
    return x - lr * d


def _per_param(name: str, values, n: int) -> List:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"'{name}' must have one entry per param ({n}), got {len(values)}")
    return values


def unflatten_average_outer_sgd_(
    flat: torch.Tensor,
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    outer_buffers: Sequence[Optional[torch.Tensor]],
    grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
    momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    scale: float,
    outer_lr: float,
    outer_momentum: float = 0.0,
    outer_dampening: float = 0.0,
    outer_weight_decay: float = 0.0,
    outer_nesterov: bool = False,
    outer_maximize: bool = False,
    outer_first_step: Union[bool, Sequence[bool]] = False,
    lr: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: Union[bool, Sequence[bool]] = False,
    divergence: Optional[torch.Tensor] = None,
    align: int = 1,
) -> None:
    """An outer round (``outer=torch.optim.SGD(...)``, prsgd_hvd.fused_outer) in one pass, per
    tensor:

        ybar        = flat[segment_i] * scale                  the average of the ranks
        g           = anchors[i] - ybar                        the pseudo-gradient
        anchors[i]  = torch.optim.SGD's update of the anchor theta0 by g with the outer_*
                      hyper-parameters; outer_buffers[i] is its momentum buffer (initialised
                      to the decayed g where outer_first_step, as SGD does when it creates it)
        params[i]   = anchors[i], or, with grads[i], torch.optim.SGD's update of it by grads[i]
                      with the inner hyper-parameters and momentum_buffers[i] (Algorithm 1's
                      restart x = theta0' - lr * G); rounded once to the param's dtype.

    ``anchors`` and ``outer_buffers`` have ``flat``'s dtype (fp32 for fp16/bf16 params: the
    outer optimizer's tensors); with ``outer_momentum == 0`` the buffers are not used (None is
    fine). ``grads``/``momentum_buffers``/``first_step``: as in :func:`unflatten_average_sgd_`
    (None: no inner update anywhere). Arithmetic in opmath (fp32; fp64 for fp64), rounded when
    stored. ``divergence``: as in :func:`unflatten_average_`, the distance of the params before
    this call from the average ybar.
    """
    n = len(params)
    anchors = _per_param("anchors", anchors, n)
    outer_buffers = _per_param("outer_buffers", outer_buffers, n)
    grads = [None] * n if grads is None else _per_param("grads", grads, n)
    momentum_buffers = [None] * n if momentum_buffers is None else \
        _per_param("momentum_buffers", momentum_buffers, n)
    ofirsts = [bool(outer_first_step)] * n if isinstance(outer_first_step, bool) else \
        [bool(f) for f in _per_param("outer_first_step", outer_first_step, n)]
    firsts = [bool(first_step)] * n if isinstance(first_step, bool) else \
        [bool(f) for f in _per_param("first_step", first_step, n)]
    _check_divergence("unflatten_average_outer_sgd_", flat, divergence)
    for i, (p, a) in enumerate(zip(params, anchors)):
        if a.dtype != flat.dtype or a.shape != p.shape:
            raise ValueError(f"unflatten_average_outer_sgd_: anchors[{i}] must have flat's dtype "
                             f"({flat.dtype}) and params[{i}]'s shape {tuple(p.shape)}, got "
                             f"{a.dtype} {tuple(a.shape)}")
        if outer_momentum != 0 and outer_buffers[i] is None:
            raise ValueError("unflatten_average_outer_sgd_: 'outer_buffers' needs a tensor for "
                             "every param when outer_momentum != 0 (pass outer_first_step=True "
                             "to initialise it)")
        if momentum != 0 and grads[i] is not None and momentum_buffers[i] is None:
            raise ValueError("unflatten_average_outer_sgd_: 'momentum_buffers' needs a tensor "
                             "for every param with a grad when momentum != 0")
    outer = dict(lr=outer_lr, momentum=outer_momentum, dampening=outer_dampening,
                 weight_decay=outer_weight_decay, nesterov=outer_nesterov,
                 maximize=outer_maximize)
    inner = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for p, a, ob, of, g, b, f, seg in zip(params, anchors, outer_buffers, ofirsts, grads,
                                          momentum_buffers, firsts, _segments(flat, params, align)):
        op = _opmath(p.dtype)
        ybar = seg.to(op) * scale
        if divergence is not None:
            total += _squared_distance(p, ybar)
        theta = a.to(op)
        theta = _sgd_math(theta, theta - ybar, ob, of, **outer)
        a.copy_(theta)
        x = theta if g is None else _sgd_math(theta, g.to(op), b, f, **inner)
        p.copy_(x)
    if divergence is not None:
        divergence.add_(total.reshape(divergence.shape))
