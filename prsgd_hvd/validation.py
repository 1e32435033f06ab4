"""Everything ``DistributedLocalSGD(...)`` checks before it changes anything or runs a collective.

A bad argument raises on every rank that passed it, at once, with a message that names it;
the result is one frozen :class:`Arguments`: the engine's configuration, the process set to
average over and what the wrapper keeps from Horovod's signature. The checks of Horovod's own
arguments follow Horovod's (docs/migrating.md has what each one means here).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import ops
from .checks import int_at_least, is_int
from .compression import resolve_compression
from .config import LocalSGDConfig
from .horovod_api import horovod
from .nonfinite import NonFinitePolicy
from .process_sets import resolve_process_set
from .outer import check_factory as check_outer_factory
from .outer_host import resolve_outer_device
from .schedules import as_schedule
from .streaming_checks import check_streaming

_PREFIX = "DistributedLocalSGD"



@dataclass(frozen=True, eq=False)
class Arguments:
    """What the factory needs after validation."""

    config: LocalSGDConfig
    process_set: Any                 # to average over (OwnRankOnly outside the user's set)
    horovod_args: Dict[str, Any]     # set on the wrapper, as Horovod's wrapper has them
    lr_scheduler_patched: bool       # an LR scheduler's step patch to put back around ours


def validate(optimizer, interval, named_parameters, warmup_steps, process_set, fused, model,
             average_state, overlap, nonfinite, compression, error_feedback, *,
             backward_passes_per_step, op, gradient_predivide_factor, num_groups, groups,
             sparse_as_dense, outer=None, delay=0, fragments=1, outer_device=None) -> Arguments:
    """Every check of ``DistributedLocalSGD``'s arguments, in the order a user meets them."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedLocalSGD: 'optimizer' must be a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")
    if hasattr(optimizer, "_local_sgd"):
        raise ValueError("DistributedLocalSGD: this optimizer is already wrapped")
    lr_scheduler_patched = take_lr_scheduler_patch(optimizer)
    check_not_wrapped_by_horovod(optimizer)
    check_interval_is_not_named_parameters(interval)
    op = horovod().Average if op is None else op
    check_horovod_arguments(backward_passes_per_step=backward_passes_per_step, op=op,
                            gradient_predivide_factor=gradient_predivide_factor,
                            num_groups=num_groups, groups=groups, sparse_as_dense=sparse_as_dense)
    named = check_named_parameters(optimizer, named_parameters)
    names = {id(p): n for n, p in (named or [])}
    check_parameter_dtypes(optimizer, names)
    averaging_set, member = resolve_process_set(process_set)
    int_at_least(warmup_steps, 0, "DistributedLocalSGD: 'warmup_steps'")
    if fused not in (None, True, False):
        raise ValueError(f"DistributedLocalSGD: 'fused' must be None, True or False, got {fused!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"DistributedLocalSGD: 'model' must be a torch.nn.Module, "
                        f"got {type(model).__name__}")
    schedule = as_schedule(interval)
    check_parameter_devices(optimizer, names)
    if not member and schedule.group_sizes():
        # A rank outside process_set trains alone; it cannot register group process sets
        # with the members.
        raise ValueError(
            f"{_PREFIX}: rank {horovod().rank()} is not in 'process_set' {process_set}, so it "
            f"trains alone; a Hierarchical schedule cannot form groups there. Use an interval "
            f"or a schedule without groups on ranks outside the process set")
    is_sgd = type(optimizer) is torch.optim.SGD
    if fused is True:
        check_fused_possible(optimizer, is_sgd)
    use_kernels = fused is not False and ops.has_extension()
    NonFinitePolicy(nonfinite)  # validates the mode
    compression = resolve_compression(compression)
    if overlap not in (True, False):
        raise ValueError(f"DistributedLocalSGD: 'overlap' must be True or False, got {overlap!r}")
    if outer is not None:  # what it builds is checked when the engine builds it
        check_outer_factory(outer)
    outer_device = resolve_outer_device(outer_device, outer)
    check_streaming(delay, fragments, schedule, nonfinite,
                    sum(1 for g in optimizer.param_groups for p in g["params"]
                        if p.is_floating_point()))
    config = LocalSGDConfig(
        schedule=schedule, warmup_steps=warmup_steps, use_kernels=use_kernels,
        fuse_step=use_kernels and is_sgd, model=model, average_state=average_state, names=names,
        overlap=overlap, nonfinite=nonfinite, compression=compression,
        error_feedback=bool(error_feedback), optimizer_name=type(optimizer).__name__,
        outer=outer, delay=delay, fragments=fragments, outer_device=outer_device)
    horovod_args = dict(backward_passes_per_step=backward_passes_per_step, op=op,
                        gradient_predivide_factor=gradient_predivide_factor,
                        sparse_as_dense=sparse_as_dense, groups=groups)
    return Arguments(config, averaging_set, horovod_args, lr_scheduler_patched)


def check_fused_possible(optimizer, is_sgd: bool) -> None:
    if not ops.has_extension():
        raise ValueError("DistributedLocalSGD: fused=True but the compiled kernels are not "
                         f"loaded ({ops.extension_error()}); rebuild with "
                         "`pip install --no-build-isolation -e .` or pass fused=None")
    if not is_sgd:
        raise ValueError(f"DistributedLocalSGD: fused=True needs torch.optim.SGD, got "
                         f"{type(optimizer).__name__}; pass fused=None to use the kernels "
                         "for averaging and the optimizer's own step")


def _horovod_step_functions():
    from horovod.torch import optimizer as hvd_optimizer
    return {inspect.unwrap(vars(c)["step"]) for c in (hvd_optimizer._DistributedOptimizer,
                                                      hvd_optimizer._DistributedAdasumOptimizer)}


def is_horovod_distributed_optimizer(optimizer) -> bool:
    """True for what ``hvd.DistributedOptimizer(...)`` returned (its classes copy the step
    function of Horovod's ``_DistributedOptimizer`` into a dynamic subclass; torch's
    ``Optimizer.__init__`` then wraps it in its profiling hook, hence the unwrap)."""
    steps = _horovod_step_functions()
    return any(inspect.unwrap(vars(c)["step"]) in steps
               for c in type(optimizer).__mro__ if "step" in vars(c))


def check_not_wrapped_by_horovod(optimizer) -> None:
    if is_horovod_distributed_optimizer(optimizer):
        raise ValueError(
            f"{_PREFIX}: this optimizer is already wrapped by hvd.DistributedOptimizer. "
            f"DistributedLocalSGD replaces DistributedOptimizer (it averages models instead of "
            f"gradients); the two cannot be stacked. Wrap the plain torch optimizer: "
            f"opt = hvd.DistributedLocalSGD(torch.optim.SGD(...), interval=I, ...)")


def check_interval_is_not_named_parameters(interval) -> None:
    """``DistributedOptimizer(opt, model.named_parameters())`` passes the names second;
    here the second positional argument is ``interval``. Say so instead of 'bad interval'."""
    looks_named = False
    if hasattr(interval, "__next__"):  # a generator: named_parameters() returns one
        looks_named = True
    elif isinstance(interval, (list, tuple)) and interval and all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in interval):
        looks_named = True
    if looks_named:
        raise TypeError(
            f"{_PREFIX}: the second positional argument is 'interval' (hvd.DistributedOptimizer "
            f"takes named_parameters there). Pass the names by keyword: "
            f"hvd.DistributedLocalSGD(opt, interval=I, named_parameters=model.named_parameters())")


def check_horovod_arguments(*, backward_passes_per_step, op, gradient_predivide_factor,
                            num_groups, groups, sparse_as_dense) -> None:
    """``DistributedOptimizer``'s own arguments, validated as Horovod validates them.

    What each one does here is in :func:`DistributedLocalSGD`'s docstring and
    docs/migrating.md; only ``op`` can make a script impossible to honour.
    """
    hvd = horovod()
    if op != hvd.Average:
        names = {hvd.Adasum: "hvd.Adasum", hvd.Sum: "hvd.Sum"}
        name = names.get(op, repr(op))
        why = {
            "hvd.Adasum": "Adasum combines gradient *updates* so that their sum adapts to how "
                          "orthogonal they are; the models it would be given are not updates",
            "hvd.Sum": "summing N models gives a model N times too large",
        }.get(name, "only the mean of the models is Parallel Restarted SGD")
        raise ValueError(
            f"{_PREFIX}: op={name} cannot be used for model averaging ({why}). "
            f"DistributedLocalSGD always averages (op=hvd.Average, the default): drop the "
            f"argument, or keep hvd.DistributedOptimizer for {name}")
    int_at_least(backward_passes_per_step, 1, f"{_PREFIX}: backward_passes_per_step")
    if isinstance(gradient_predivide_factor, bool) or \
            not isinstance(gradient_predivide_factor, (int, float)) or \
            not math.isfinite(gradient_predivide_factor) or gradient_predivide_factor <= 0:
        raise ValueError(f"{_PREFIX}: gradient_predivide_factor must be a finite number > 0, got "
                         f"{gradient_predivide_factor!r}")
    int_at_least(num_groups, 0, f"{_PREFIX}: num_groups")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` (as in Horovod); "
                      "neither changes what DistributedLocalSGD sends", DeprecationWarning,
                      stacklevel=3)
    if groups is not None:
        if isinstance(groups, list):
            seen = set()
            for group in groups:
                if not isinstance(group, (list, tuple)):
                    raise ValueError(f"{_PREFIX}: groups must be an int > 0 or a list of lists "
                                     f"of torch.Tensor, got an entry {type(group).__name__}")
                for p in group:
                    if not isinstance(p, torch.Tensor):
                        raise ValueError(f"{_PREFIX}: groups must consist of torch.Tensor, got "
                                         f"{type(p).__name__}")
                    if id(p) in seen:
                        raise ValueError(f"{_PREFIX}: a parameter can only appear once in groups")
                    seen.add(id(p))
        elif not is_int(groups) or groups <= 0:
            raise ValueError(f"{_PREFIX}: groups must be an int > 0 or a list of lists of "
                             f"torch.Tensor, got {groups!r}")
    if sparse_as_dense not in (True, False):
        raise ValueError(f"{_PREFIX}: sparse_as_dense must be True or False, got "
                         f"{sparse_as_dense!r}")


def _where(optimizer, target) -> str:
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is target:
                return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, {p.dtype})"
    return f"a tensor of shape {tuple(target.shape)}"


def check_named_parameters(optimizer, named_parameters) -> Optional[List[Tuple[str, Any]]]:
    """Materialise ``named_parameters`` (often a generator) and, as Horovod does, refuse a
    list that names only some of the optimizer's parameters: the rest would be reported by
    position in every later error, and it usually means the wrong model was passed."""
    if named_parameters is None:
        return None
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError(f"{_PREFIX}: named_parameters should be a sequence of (name, parameter) "
                         f"tuples, usually produced by model.named_parameters()")
    names = [n for n, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{_PREFIX}: named_parameters has duplicate names: {dups}")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    foreign = [n for n, p in named if id(p) not in in_optimizer]
    if foreign:
        raise ValueError(
            f"{_PREFIX}: named_parameters names parameters that are not in the optimizer: "
            f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}; pass the named_parameters() of "
            f"the model whose parameters the optimizer was built with")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in named_ids]
    if unnamed:
        listed = "; ".join(_where(optimizer, p) for p in unnamed[:5])
        raise ValueError(
            f"{_PREFIX}: named_parameters was specified, but {len(unnamed)} of the optimizer's "
            f"parameters were not named: {listed}{' ...' if len(unnamed) > 5 else ''}. Pass "
            f"the named_parameters() of every module whose parameters the optimizer holds "
            f"(e.g. itertools.chain(a.named_parameters(prefix='a'), b.named_parameters(prefix='b')))")
    return named


def check_parameter_dtypes(optimizer, names: Dict[int, str]) -> None:
    """Integer and bool parameters (never trained: they cannot require grad) are left out of
    averaging; any other dtype that is not floating point cannot be averaged: say which."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.is_floating_point() or not (p.is_complex() or p.requires_grad):
                continue
            name = names.get(id(p), f"param_groups[{gi}]['params'][{pi}]")
            raise ValueError(
                f"{_PREFIX}: parameter {name} has dtype {p.dtype}, which model averaging does "
                f"not support (floating-point parameters are averaged; integer and bool ones are "
                f"left alone). Keep it out of the optimizer, or store it as real/imaginary "
                f"floating-point parameters (torch.view_as_real)")


def take_lr_scheduler_patch(optimizer):
    """An LR scheduler made before wrapping replaced ``optimizer.step`` on the instance with a
    wrapper that calls the *original class's* step, which would bypass ours forever (no
    averaging, silently). torch's wrapper is recognised by its marker and removed here;
    ``prsgd_hvd.horovod_compat.reinstall_lr_scheduler_patch`` puts an equivalent one around
    our step after the class swap. Any other instance-level ``step`` is refused: we cannot
    know what it does.
    Only checks; the factory removes it once nothing can fail any more."""
    patched = vars(optimizer).get("step")
    if patched is None:
        return False
    if getattr(patched, "_wrapped_by_lr_sched", False) and \
            getattr(patched, "__wrapped__", None) is getattr(type(optimizer), "step", None):
        return True
    raise ValueError(f"{_PREFIX}: 'optimizer.step' was replaced on the instance by something "
                     f"other than a torch LR scheduler ({patched!r}); DistributedLocalSGD must "
                     f"own step(). Wrap the optimizer first, then patch or wrap it")


def check_parameter_devices(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> None:
    """What the averaging kernels and the collectives cannot take, refused by name now rather
    than at the first round."""
    for gi, group in enumerate(optimizer.param_groups):
        seen = set()
        for i, p in enumerate(group["params"]):
            what = names.get(id(p), f"parameter {i} of param group {gi}")
            if id(p) in seen:
                # torch.optim would update it twice per step; the fused pass once.
                raise ValueError(f"DistributedLocalSGD: {what} appears twice in param group {gi}; "
                                 "list each parameter once")
            seen.add(id(p))
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"DistributedLocalSGD: {what} is on device '{p.device}'; model "
                                 "averaging runs on CPU and CUDA tensors (materialise the model, "
                                 "e.g. model.to_empty(device=...), before wrapping)")
