"""The fused averaging kernels, with their pure-torch references beside them.

``flatten``, ``unflatten_average_``, ``unflatten_average_sgd_`` and
``unflatten_average_outer_sgd_`` dispatch to the compiled
extension (``prsgd_hvd._C``, CPU and, where built, CUDA) when it is loaded, and to
:mod:`prsgd_hvd.ops_reference` otherwise. ``has_extension()`` says which. The semantics are the
reference's; see its docstrings.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import ops_reference as _reference

__all__ = ["has_extension", "extension_error", "segment_layout", "flatten", "unflatten_average_",
           "unflatten_average_sgd_", "unflatten_average_outer_sgd_", "PADDED"]

# NOTE: [Segment layout] (csrc/segment_table.h). Every op takes `align` (bytes): 1, the default,
# packs the segments back to back; PADDED (16) starts every segment on a 16-byte boundary, which
# lets the CUDA kernels run every segment of an aligned tensor in 16-byte vector accesses. The
# padding is zeros written by flatten() (an allreduce of it stays zero) and costs at most
# align - element size bytes per tensor. The flat buffer must be allocated with
# segment_layout(...)[-1] elements, and all three ops of a round must get the same `align`.
PADDED = 16
segment_layout = _reference.segment_layout

try:  # the compiled kernels register torch.ops.prsgd_hvd.* when imported
    from . import _C  # type: ignore[attr-defined]  # noqa: F401
    _EXTENSION_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


# Fake (meta) implementations: what torch.compile, FakeTensor and torch.library.opcheck see of
# the compiled ops (shapes and dtypes, no data), as pytorch/extension-cpp registers them beside
# its dispatch. The argument checks stay in C++, except one: a fake is also the Meta kernel, so
# a call mixing meta and real tensors dispatches here, and must fail as the C++ op would
# instead of doing nothing.
def _check_devices(op: str, anchor: str, device: torch.device, **lists) -> None:
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            torch._check(t is None or t.device == device, lambda: (
                f"{op}: {name}[{i}] is on {t.device} but '{anchor}' is on {device}"))


if _C is not None:
    @torch.library.register_fake("prsgd_hvd::flatten")
    def _flatten_fake(tensors, align=1):
        torch._check(len(tensors) > 0, lambda: "flatten: 'tensors' is empty")
        _check_devices("flatten", "tensors[0]", tensors[0].device, tensors=tensors)
        total = segment_layout(tensors, tensors[0].dtype, align=align)[-1]
        return tensors[0].new_empty((total,))

    @torch.library.register_fake("prsgd_hvd::flatten_into")
    def _flatten_into_fake(tensors, out, align=1):
        _check_devices("flatten", "out", out.device, tensors=tensors)

    @torch.library.register_fake("prsgd_hvd::unflatten_average_")
    def _unflatten_average_fake(flat, params, scale, divergence=None, align=1, accumulate=False):
        _check_devices("unflatten_average_", "flat", flat.device, params=params,
                       divergence=[divergence])

    @torch.library.register_fake("prsgd_hvd::unflatten_average_sgd_")
    def _unflatten_average_sgd_fake(flat, params, grads, momentum_buffers, first_step, scale, lr,
                                    momentum, dampening, weight_decay, nesterov, maximize,
                                    divergence=None, align=1, accumulate=False):
        _check_devices("unflatten_average_sgd_", "flat", flat.device, params=params, grads=grads,
                       momentum_buffers=momentum_buffers, divergence=[divergence])


if _C is not None:
    @torch.library.register_fake("prsgd_hvd::unflatten_average_outer_sgd_")
    def _unflatten_average_outer_sgd_fake(flat, params, anchors, outer_buffers, outer_first_step,
                                          grads, momentum_buffers, first_step, scale, outer_lr,
                                          outer_momentum, outer_dampening, outer_weight_decay,
                                          outer_nesterov, outer_maximize, lr, momentum,
                                          dampening, weight_decay, nesterov, maximize,
                                          divergence=None, align=1):
        _check_devices("unflatten_average_outer_sgd_", "flat", flat.device, params=params,
                       anchors=anchors, outer_buffers=outer_buffers, grads=grads,
                       momentum_buffers=momentum_buffers, divergence=[divergence])


def _dense(tensors) -> bool:
    """The kernels write params (and read grads and buffers) as dense arrays; tensors with
    other strides (channels_last, views) take the reference path, which honours any layout."""
    return all(t is None or t.is_contiguous() for t in tensors)


def has_extension() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def extension_error() -> Optional[str]:
    """Why the compiled kernels are not loaded (None when they are)."""
    return _EXTENSION_ERROR


def flatten(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None, *,
            align: int = 1) -> torch.Tensor:
    """Pack ``tensors`` into one 1-D buffer (cast to ``out.dtype`` when ``out`` is given), laid
    out by :func:`segment_layout` with ``align``; padding is written as zeros."""
    if _C is None:
        return _reference.flatten(tensors, out, align=align)
    tensors = list(tensors)
    if not tensors and out is None:  # the dispatcher would have no tensor to pick a device from
        raise ValueError("flatten: 'tensors' is empty and no 'out' was given to take a dtype from")
    # Optimizer ops: params are leaves that require grad, and this is not differentiable.
    with torch.no_grad():
        if out is None:
            return torch.ops.prsgd_hvd.flatten(tensors, int(align))
        # Two ops, so that each schema says exactly what it does (csrc/ops.cpp).
        torch.ops.prsgd_hvd.flatten_into(tensors, out, int(align))
        return out


def unflatten_average_(flat: torch.Tensor, params: Sequence[torch.Tensor], *, scale: float,
                       divergence: Optional[torch.Tensor] = None, align: int = 1,
                       accumulate: bool = False) -> None:
    """``params[i] = flat[segment_i] * scale`` (segments laid out with ``align``).

    ``divergence``: optional 1-element float64 tensor on ``flat``'s device; the op adds
    ``sum((old params[i] - flat[segment_i] * scale)**2)`` to it, in the same pass.
    ``accumulate``: ``params[i] = old params[i] + flat[segment_i] * scale`` instead (one
    pass of a delayed merge; the reference's docstring has the arithmetic).
    """
    if _C is None or not _dense(params):
        return _reference.unflatten_average_(flat, params, scale=scale, divergence=divergence,
                                             align=align, accumulate=accumulate)
    with torch.no_grad():
        if divergence is None and align == 1 and not accumulate:  # the schema's defaults
            torch.ops.prsgd_hvd.unflatten_average_(flat, list(params), float(scale))
        else:
            torch.ops.prsgd_hvd.unflatten_average_(flat, list(params), float(scale), divergence,
                                                   int(align), bool(accumulate))


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
    """One pass: average, then ``torch.optim.SGD``'s update applied to the average.

    ``divergence``: as in :func:`unflatten_average_`, measured from the params before the
    step to the average. ``align``: the layout of ``flat`` (:func:`segment_layout`).
    ``accumulate``: the step applies at old params + flat * scale (:func:`unflatten_average_`).
    """
    if _C is None or not (_dense(params) and _dense(grads) and _dense(momentum_buffers)):
        return _reference.unflatten_average_sgd_(
            flat, params, grads, momentum_buffers, scale=scale, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, first_step=first_step, divergence=divergence, align=align,
            accumulate=accumulate)
    params = list(params)
    n = len(params)
    firsts = [bool(first_step)] * n if isinstance(first_step, bool) else [bool(f) for f in first_step]
    with torch.no_grad():
        torch.ops.prsgd_hvd.unflatten_average_sgd_(
            flat, params, list(grads), list(momentum_buffers), firsts, float(scale), float(lr),
            float(momentum), float(dampening), float(weight_decay), bool(nesterov),
            bool(maximize), divergence, int(align), bool(accumulate))


def _flags(name: str, value: Union[bool, Sequence[bool]], n: int):
    if isinstance(value, bool):
        return [value] * n
    flags = [bool(f) for f in value]
    if len(flags) != n:
        raise ValueError(f"'{name}' must be a bool or have one entry per param ({n}), got {len(flags)}")
    return flags


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
    """One pass of an outer round (``outer=torch.optim.SGD``): average, the outer SGD step of
    theta0 (``anchors``) on the pseudo-gradient ``theta0 - average``, and the params set to
    the new theta0 or, with ``grads``, to its inner SGD step. Semantics: the reference's
    (:func:`prsgd_hvd.ops_reference.unflatten_average_outer_sgd_`)."""
    n = len(params)
    grads = [None] * n if grads is None else list(grads)
    momentum_buffers = [None] * n if momentum_buffers is None else list(momentum_buffers)
    kw = dict(scale=scale, outer_lr=outer_lr, outer_momentum=outer_momentum,
              outer_dampening=outer_dampening, outer_weight_decay=outer_weight_decay,
              outer_nesterov=outer_nesterov, outer_maximize=outer_maximize, lr=lr,
              momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    if _C is None or not all(_dense(ts) for ts in (params, anchors, outer_buffers, grads,
                                                      momentum_buffers)):
        return _reference.unflatten_average_outer_sgd_(
            flat, params, anchors, outer_buffers, grads, momentum_buffers,
            outer_first_step=outer_first_step, first_step=first_step, divergence=divergence,
            align=align, **kw)
    with torch.no_grad():
        torch.ops.prsgd_hvd.unflatten_average_outer_sgd_(
            flat, list(params), list(anchors), list(outer_buffers),
            _flags("outer_first_step", outer_first_step, n), grads, momentum_buffers,
            _flags("first_step", first_step, n), *(float(kw[k]) if not isinstance(kw[k], bool)
                                                   else kw[k] for k in kw),
            divergence, int(align))
