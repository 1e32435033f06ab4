"""What makes ``DistributedLocalSGD`` a one-line swap for ``hvd.DistributedOptimizer``: the
Horovod surface of the wrapper and of the package.

A Horovod script keeps every argument it passes to ``DistributedOptimizer`` and every pattern
Horovod documents around it (docs/migrating.md has the user-facing table). The jobs live in
their own modules; this one holds the wrapper's Horovod methods and the installation:

* the whole ``DistributedOptimizer`` signature, validated as Horovod validates it:
  prsgd_hvd.validation;
* ``synchronize()`` / ``skip_synchronize()`` for the gradient-clipping and AMP loops, and an LR
  scheduler made before wrapping: here (:class:`HorovodCompatMethods`);
* ``broadcast_optimizer_state`` that also carries the local-SGD counters: prsgd_hvd.broadcast;
* the state handler so ``hvd.elastic.TorchState`` syncs, restores and re-binds a wrapped
  optimizer: prsgd_hvd.elastic;
* the warning when a rank exits, or checkpoints, holding unaveraged local steps:
  prsgd_hvd.unaveraged;
* ranks outside ``process_set`` (NOTE: [ranks outside the process set]): prsgd_hvd.process_sets;
* :func:`install_on_horovod`: importing ``prsgd_hvd`` patches ``horovod.torch`` so that
  ``hvd.broadcast_optimizer_state``, ``hvd.Compression``, ``hvd.elastic`` and
  ``hvd.DistributedOptimizer`` (which refuses a wrapped optimizer) behave as ours.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Dict

# Names that used to be defined here, kept importable from here.
from .broadcast import broadcast_optimizer_state, broadcast_parameters  # noqa: F401
from .horovod_api import horovod
from .process_sets import OwnRankOnly, resolve_process_set  # noqa: F401
from .unaveraged import LocalStepsNotAveragedWarning, warn_if_unaveraged  # noqa: F401
from .validation import (check_horovod_arguments, is_horovod_distributed_optimizer,  # noqa: F401
                         take_lr_scheduler_patch)
from .wrapper_state import LocalSGDOptimizer, is_wrapped  # noqa: F401

__all__ = ["broadcast_optimizer_state", "HorovodCompatMethods", "LocalSGDOptimizer",
           "LocalStepsNotAveragedWarning", "OwnRankOnly", "install_on_horovod"]



# ---- an LR scheduler created before wrapping -----------------------------------------------

def reinstall_lr_scheduler_patch(optimizer) -> None:
    """torch's ``LRScheduler`` step tracking (``_opt_called``, its "lr_scheduler.step() before
    optimizer.step()" warning), now around the wrapper's step."""
    opt_ref = weakref.ref(optimizer)
    step = type(optimizer).step

    def step_tracked_by_lr_scheduler(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return step(opt, *args, **kwargs)

    step_tracked_by_lr_scheduler._wrapped_by_lr_sched = True
    step_tracked_by_lr_scheduler.__wrapped__ = step
    optimizer.step = step_tracked_by_lr_scheduler


# ---- methods of the wrapper ------------------------------------------------------------------

_SYNC_WARNING = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                 "optimizer.synchronize(). This can cause training slowdown. You may want to "
                 "consider using optimizer.skip_synchronize() context if you use "
                 "optimizer.synchronize() in your code.")


class HorovodCompatMethods:
    """Methods of ``hvd.DistributedOptimizer`` that Horovod scripts call, with their meaning
    under local SGD. Copied into the wrapper's dynamic subclass beside its own methods."""

    __module__ = "horovod.torch.optimizer"  # see NOTE: [the wrapper is the user's optimizer]

    def synchronize(self) -> None:
        """Horovod waits here for the gradient allreduces to finish, so that code between
        ``synchronize()`` and ``step()`` (gradient clipping, ``GradScaler.unscale_``) sees the
        averaged gradients. Under local SGD gradients never leave the rank: there is nothing to
        wait for, and that code sees this rank's own gradients -- which is what it will step
        with. Averaging rounds happen in ``step()`` on the schedule, whatever this says."""
        self._local_sgd.wrapper.synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``with opt.skip_synchronize(): opt.step()`` after ``opt.synchronize()``, as in
        Horovod. It skips nothing here: ``step()`` still counts the step and joins the
        averaging round the schedule asks for (skipping a round on one rank would hang the
        others)."""
        state = self._local_sgd.wrapper
        state.skip_sync_depth += 1
        try:
            yield
        finally:
            state.skip_sync_depth -= 1

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's setter; gradients accumulate locally between ``step()`` calls anyway."""
        check_horovod_arguments(backward_passes_per_step=passes, op=horovod().Average,
                                gradient_predivide_factor=1.0, num_groups=0, groups=None,
                                sparse_as_dense=False)
        self.backward_passes_per_step = passes

    def _compat_before_step(self) -> None:
        """Called first thing in ``step()``: Horovod's warning for ``synchronize()`` followed
        by ``step()`` outside ``skip_synchronize()`` (harmless here, but a script that does it
        is slow under ``hvd.DistributedOptimizer``, and the same script runs on both)."""
        state = self._local_sgd.wrapper
        if state.synchronized and not state.skip_sync_depth:
            warnings.warn(_SYNC_WARNING, stacklevel=3)
        state.synchronized = False


# ---- installing on Horovod -------------------------------------------------------------------

def _guarded_distributed_optimizer(horovod_factory):
    import functools

    @functools.wraps(horovod_factory)
    def DistributedOptimizer(optimizer, *args, **kwargs):  # noqa: N802 (Horovod's name)
        if is_wrapped(optimizer):
            raise ValueError(
                "hvd.DistributedOptimizer: this optimizer is already wrapped by "
                "hvd.DistributedLocalSGD, which replaces DistributedOptimizer (it averages "
                "models instead of gradients); the two cannot be stacked. Use one of them on "
                "the plain torch optimizer.")
        return horovod_factory(optimizer, *args, **kwargs)

    DistributedOptimizer._prsgd_guarded = True
    return DistributedOptimizer


def install_on_horovod() -> Dict[str, Any]:
    """Called when ``prsgd_hvd`` is imported: after ``import horovod.torch as hvd; import
    prsgd_hvd``, ``hvd.broadcast_optimizer_state``, ``hvd.Compression.bf16``,
    ``hvd.elastic.LocalSGDState``/``TorchState`` and ``hvd.DistributedOptimizer`` behave as
    ``prsgd_hvd``'s. Returns the names to export from ``prsgd_hvd`` as well."""
    import horovod.torch as hvd_torch
    import horovod.torch.elastic as hvd_elastic
    from .compression import Compression
    from .elastic import LocalSGDState, install_state_handler

    factory = hvd_torch.DistributedOptimizer
    if not getattr(factory, "_prsgd_guarded", False):
        factory = _guarded_distributed_optimizer(factory)
    install_state_handler()
    hvd_elastic.LocalSGDState = LocalSGDState
    # bf16 through hvd.broadcast_parameters, also where Horovod's broadcast_optimizer_state
    # calls it by its module's global name; Horovod's own function is kept under another name.
    import horovod.torch.functions as hvd_functions
    if not hasattr(hvd_functions, "_horovod_broadcast_parameters"):
        hvd_functions._horovod_broadcast_parameters = hvd_functions.broadcast_parameters
    hvd_functions.broadcast_parameters = broadcast_parameters
    names = {"broadcast_optimizer_state": broadcast_optimizer_state,
             "broadcast_parameters": broadcast_parameters,
             "DistributedOptimizer": factory, "Compression": Compression}
    for name, obj in names.items():
        setattr(hvd_torch, name, obj)
    return names
