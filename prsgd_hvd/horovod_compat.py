"""What makes ``DistributedLocalSGD`` a one-line swap for ``hvd.DistributedOptimizer``.

A Horovod script keeps every argument it passes to ``DistributedOptimizer`` and every pattern
Horovod documents around it; this module gives each of them its meaning under model averaging
(docs/migrating.md has the user-facing table):

* the whole ``DistributedOptimizer`` signature: validated as Horovod validates it, honoured
  where it means something for averaging parameters, accepted with its non-effect documented
  where it does not, refused (``op=hvd.Adasum``/``hvd.Sum``) where it cannot be honoured;
* ``synchronize()`` / ``skip_synchronize()`` for the gradient-clipping and AMP loops;
* ``broadcast_optimizer_state`` that also carries the local-SGD counters and the schedule's
  position (the standard resume), installed on ``horovod.torch`` when the package is imported;
* a state handler so ``hvd.elastic.TorchState`` syncs, restores and re-binds a wrapped
  optimizer as ``LocalSGDState`` does;
* a warning when a rank exits, or checkpoints, holding local steps no average has seen;
* construction-time checks with specific messages: an optimizer already wrapped by
  ``hvd.DistributedOptimizer`` (and the reverse), ``process_set`` of the wrong type or not
  registered, parameters named only in part, parameters that cannot be averaged.

NOTE: [ranks outside the process set]
Horovod lets a rank that is not in ``process_set`` build the optimizer and train alone (its
hooks allreduce nothing). We do the same: such a rank averages over a process set of its own
(:class:`OwnRankOnly`, size 1, which sends nothing), so it never joins, and never blocks, the
members' rounds. Raising there instead would be an error on some ranks only, which hangs the
others in their first collective.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import threading
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["broadcast_optimizer_state", "HorovodCompatMethods", "LocalSGDOptimizer",
           "LocalStepsNotAveragedWarning", "OwnRankOnly", "install_on_horovod"]

_PREFIX = "DistributedLocalSGD"


def _hvd():
    import horovod.torch as hvd
    return hvd


def _is_wrapped(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_local_sgd")


class _WrappedOptimizerMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return _is_wrapped(obj)


class LocalSGDOptimizer(metaclass=_WrappedOptimizerMeta):
    """``isinstance(opt, LocalSGDOptimizer)``: ``opt`` was wrapped by ``DistributedLocalSGD``.

    (The wrapper is a dynamic subclass of the user's optimizer class, so there is no common
    base class to test against; Horovod's elastic state registry dispatches on this.)"""


# ---- construction-time checks --------------------------------------------------------------

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


class OwnRankOnly:
    """The process set of a rank that is not in the user's ``process_set``: just itself.

    It has the methods of a Horovod ``ProcessSet`` that the averaging code reads; with size 1
    no round sends anything (NOTE: [ranks outside the process set])."""

    process_set_id = None

    def __init__(self, outside_of):
        self.outside_of = outside_of
        self.ranks = [_hvd().rank()]

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def included(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"OwnRankOnly(rank {self.ranks[0]}, outside {self.outside_of})"


def resolve_process_set(process_set):
    """``(process set to average over, is this rank a member)``, or a specific error.

    Accepts ``None`` (all ranks) and Horovod ``ProcessSet`` objects. One built from ranks but
    not registered (``hvd.ProcessSet([0, 1])`` never passed to ``hvd.init`` or
    ``hvd.add_process_set``) is resolved to the registered set with the same ranks, if any.
    """
    hvd = _hvd()
    from horovod.common import process_sets as ps
    if process_set is None:
        process_set = hvd.global_process_set
    if not isinstance(process_set, ps.ProcessSet):
        raise TypeError(
            f"{_PREFIX}: 'process_set' must be a Horovod process set (hvd.global_process_set, "
            f"one returned by hvd.add_process_set(ranks), or one passed to "
            f"hvd.init(process_sets=[...])) or None for all ranks; got "
            f"{type(process_set).__name__} {process_set!r}")
    if not hvd.is_initialized():
        raise RuntimeError(f"{_PREFIX}: Horovod is not initialised; call hvd.init() before "
                           f"wrapping the optimizer")
    if process_set.process_set_id is None:
        registered = None
        if process_set.ranks is not None:
            for set_id, ranks in ps._basics._get_process_set_ids_and_ranks().items():
                if list(ranks) == list(process_set.ranks):
                    registered = ps.ProcessSet(list(ranks))
                    registered.process_set_id = set_id
        if registered is None:
            raise ValueError(
                f"{_PREFIX}: 'process_set' {process_set} is not registered with Horovod (or was "
                f"removed): create it with hvd.add_process_set(ranks) (needs "
                f"HOROVOD_DYNAMIC_PROCESS_SETS=1) or pass it to hvd.init(process_sets=[...]) "
                f"on every rank")
        process_set = registered
    if not process_set.included():
        return OwnRankOnly(process_set), False
    return process_set, True


def check_schedule_outside_process_set(schedule, prepared: Dict[str, Any]) -> None:
    """A rank outside ``process_set`` trains alone; a schedule that averages within groups
    would have it register Horovod process sets with the members, which it cannot do."""
    if not prepared["member"] and schedule.group_sizes():
        raise ValueError(
            f"{_PREFIX}: rank {_hvd().rank()} is not in 'process_set' "
            f"{prepared['user_process_set']}, so it trains alone; a Hierarchical schedule cannot "
            f"form groups there. Use an interval or a schedule without groups on ranks outside "
            f"the process set")


def check_horovod_arguments(*, backward_passes_per_step, op, gradient_predivide_factor,
                            num_groups, groups, sparse_as_dense) -> None:
    """``DistributedOptimizer``'s own arguments, validated as Horovod validates them.

    What each one does here is in :func:`DistributedLocalSGD`'s docstring and
    docs/migrating.md; only ``op`` can make a script impossible to honour.
    """
    hvd = _hvd()
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
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step < 1:
        raise ValueError(f"{_PREFIX}: backward_passes_per_step must be an int >= 1, got "
                         f"{backward_passes_per_step!r}")
    if isinstance(gradient_predivide_factor, bool) or \
            not isinstance(gradient_predivide_factor, (int, float)) or \
            not math.isfinite(gradient_predivide_factor) or gradient_predivide_factor <= 0:
        raise ValueError(f"{_PREFIX}: gradient_predivide_factor must be a finite number > 0, got "
                         f"{gradient_predivide_factor!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"{_PREFIX}: num_groups must be an int >= 0, got {num_groups!r}")
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
        elif isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
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


# ---- an LR scheduler created before wrapping -----------------------------------------------

def take_lr_scheduler_patch(optimizer):
    """An LR scheduler made before wrapping replaced ``optimizer.step`` on the instance with a
    wrapper that calls the *original class's* step, which would bypass ours forever (no
    averaging, silently). torch's wrapper is recognised by its marker and removed here;
    :func:`reinstall_lr_scheduler_patch` puts an equivalent one around our step after the
    class swap. Any other instance-level ``step`` is refused: we cannot know what it does.
    Only checks; :func:`finish` removes it once nothing can fail any more."""
    patched = vars(optimizer).get("step")
    if patched is None:
        return False
    if getattr(patched, "_wrapped_by_lr_sched", False) and \
            getattr(patched, "__wrapped__", None) is getattr(type(optimizer), "step", None):
        return True
    raise ValueError(f"{_PREFIX}: 'optimizer.step' was replaced on the instance by something "
                     f"other than a torch LR scheduler ({patched!r}); DistributedLocalSGD must "
                     f"own step(). Wrap the optimizer first, then patch or wrap it")


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


# ---- local steps no average has seen -------------------------------------------------------

class LocalStepsNotAveragedWarning(UserWarning):
    """A rank exits, or checkpoints, holding a model no average has seen (no ``finalize()``)."""


_live = weakref.WeakSet()   # wrapped optimizers, for the warning at exit
_quiet = threading.local()  # state_dict() calls made by us (broadcast, elastic commit)


@contextlib.contextmanager
def _no_unaveraged_warning():
    depth = getattr(_quiet, "depth", 0)
    _quiet.depth = depth + 1
    try:
        yield
    finally:
        _quiet.depth = depth


def unaveraged_steps(optimizer) -> int:
    ls = optimizer._local_sgd
    if ls.size <= 1 or ls.finalized:
        return 0  # a world of one (or a rank outside the process set), or averaged for good
    return max(0, ls.local_step - ls.averaged_step)


def warn_if_unaveraged(optimizer, when: str) -> None:
    """Called by ``state_dict()`` (``when="state_dict"``) and at interpreter exit. Once per
    optimizer and occasion: a checkpoint every epoch should not bury the log."""
    if getattr(_quiet, "depth", 0):
        return
    n = unaveraged_steps(optimizer)
    flag = f"_prsgd_warned_{when}"
    if n == 0 or getattr(optimizer, flag, False):
        return
    setattr(optimizer, flag, True)
    ls = optimizer._local_sgd
    # At exit Horovod has shut down already (its atexit handler was registered by hvd.init(),
    # after ours): the rank recorded at construction is what is left.
    rank = _hvd().rank() if _hvd().is_initialized() else optimizer._prsgd_global_rank
    what = ("this checkpoint holds rank {rank}'s own model" if when == "state_dict" else
            "rank {rank} exits with its own model").format(rank=rank)
    warnings.warn(
        f"{_PREFIX}: {what}: it took local steps after the last averaging round (it is at "
        f"step {ls.local_step}), so the {ls.size} ranks hold different models. Call "
        f"opt.finalize() on every rank after the training loop (or train inside `with "
        f"opt.local_sgd():`) to end with one averaged model, then checkpoint it.",
        LocalStepsNotAveragedWarning, stacklevel=3)


@atexit.register
def _warn_at_exit() -> None:
    for opt in list(_live):
        try:
            warn_if_unaveraged(opt, "exit")
        except Exception:  # noqa: BLE001  (never turn an exit into a traceback)
            pass


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
        self._prsgd_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``with opt.skip_synchronize(): opt.step()`` after ``opt.synchronize()``, as in
        Horovod. It skips nothing here: ``step()`` still counts the step and joins the
        averaging round the schedule asks for (skipping a round on one rank would hang the
        others)."""
        self._prsgd_skip_sync = getattr(self, "_prsgd_skip_sync", 0) + 1
        try:
            yield
        finally:
            self._prsgd_skip_sync -= 1

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's setter; gradients accumulate locally between ``step()`` calls anyway."""
        check_horovod_arguments(backward_passes_per_step=passes, op=_hvd().Average,
                                gradient_predivide_factor=1.0, num_groups=0, groups=None,
                                sparse_as_dense=False)
        self.backward_passes_per_step = passes

    def _compat_before_step(self) -> None:
        """Called first thing in ``step()``: Horovod's warning for ``synchronize()`` followed
        by ``step()`` outside ``skip_synchronize()`` (harmless here, but a script that does it
        is slow under ``hvd.DistributedOptimizer``, and the same script runs on both)."""
        if getattr(self, "_prsgd_synchronized", False) and not getattr(self, "_prsgd_skip_sync", 0):
            warnings.warn(_SYNC_WARNING, stacklevel=3)
        self._prsgd_synchronized = False


def prepare(optimizer, interval, named_parameters, process_set, *, backward_passes_per_step, op, gradient_predivide_factor, num_groups, groups,
            sparse_as_dense) -> Dict[str, Any]:
    """Every construction-time check of the Horovod arguments, before anything is changed or
    any collective runs (so a bad argument raises on every rank that passed it, at once).
    Returns what the factory needs: the materialised ``named_parameters``, the process set to
    average over, and whether an LR scheduler's step patch was taken off the instance."""
    check_not_wrapped_by_horovod(optimizer)
    check_interval_is_not_named_parameters(interval)
    check_horovod_arguments(backward_passes_per_step=backward_passes_per_step, op=op,
                            gradient_predivide_factor=gradient_predivide_factor,
                            num_groups=num_groups, groups=groups, sparse_as_dense=sparse_as_dense)
    named = check_named_parameters(optimizer, named_parameters)
    names = {id(p): n for n, p in (named or [])}
    check_parameter_dtypes(optimizer, names)
    averaging_set, member = resolve_process_set(process_set)
    return {"named_parameters": named, "process_set": averaging_set, "member": member,
            "user_process_set": process_set,
            "horovod_args": dict(backward_passes_per_step=backward_passes_per_step, op=op,
                                 gradient_predivide_factor=gradient_predivide_factor,
                                 sparse_as_dense=sparse_as_dense, groups=groups)}


def finish(optimizer, prepared: Dict[str, Any], lr_scheduler_patched: bool) -> None:
    """After the class swap: the attributes Horovod's wrapper has, the LR scheduler's step
    tracking, and the warning at exit."""
    for key, value in prepared["horovod_args"].items():
        setattr(optimizer, key, value)
    optimizer._prsgd_global_rank = _hvd().rank()
    if lr_scheduler_patched:
        del optimizer.step
        reinstall_lr_scheduler_patch(optimizer)
    _live.add(optimizer)


# ---- broadcast_optimizer_state -------------------------------------------------------------

def broadcast_optimizer_state(optimizer, root_rank: int, model=None) -> None:
    """``hvd.broadcast_optimizer_state`` that also carries what ``DistributedLocalSGD`` adds.

    Horovod's function broadcasts the optimizer's state tensors and options; for a wrapped
    optimizer the local-SGD counters (``local_step``, ``rounds``) and the schedule's position
    are sent from ``root_rank`` too. Without them, the standard resume (rank 0 loads a
    checkpoint, then broadcasts) leaves the other ranks at step 0, and the ranks average at
    different steps. Collective over all ranks, like Horovod's; one small extra allreduce
    checks that every rank passes a wrapped optimizer, or none does.

    NOTE: [broadcasting state leaves the parameters alone]
    Horovod initialises an empty optimizer state by stepping the base optimizer on zero
    gradients, which moves the parameters wherever weight decay is on -- on the ranks whose
    state was empty, i.e. all but rank 0 in the standard resume, right after
    ``broadcast_parameters`` made them equal. For a wrapped optimizer the parameters are put
    back: after the resume every rank holds exactly rank 0's model.
    """
    hvd = _hvd()
    from horovod.torch.functions import broadcast_optimizer_state as horovod_broadcast

    wrapped = _is_wrapped(optimizer)
    if hvd.size() > 1:
        count = int(hvd.allreduce(torch.tensor([int(wrapped)], dtype=torch.int32), op=hvd.Sum,
                                  name="prsgd_hvd.broadcast_optimizer_state.wrapped").item())
        if count not in (0, hvd.size()):
            raise ValueError(
                f"broadcast_optimizer_state: the optimizer is wrapped by DistributedLocalSGD on "
                f"{count} of {hvd.size()} ranks (rank {hvd.rank()}: "
                f"{'wrapped' if wrapped else 'not wrapped'}); wrap it on every rank, before "
                f"broadcasting its state")
    if not wrapped:
        horovod_broadcast(optimizer, root_rank, model=model)
        return
    ls = optimizer._local_sgd
    # A round in flight was packed from parameters the broadcast is about to replace.
    ls.discard_in_flight()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params] if not optimizer.state else None
    with _no_unaveraged_warning():
        horovod_broadcast(optimizer, root_rank, model=model)
        local = ls.local_state() if hvd.rank() == root_rank else None
    if kept is not None:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
    local = hvd.broadcast_object(local, root_rank=root_rank,
                                 name="prsgd_hvd.broadcast_optimizer_state.local_sgd")
    ls.load_local_state(local)


# ---- hvd.elastic.TorchState ------------------------------------------------------------------

def _optimizer_state_handler_class():
    from horovod.torch.elastic.state import StateHandler

    class LocalSGDOptimizerStateHandler(StateHandler):
        """What ``hvd.elastic.TorchState`` does with a wrapped optimizer (Horovod's
        ``OptimizerStateHandler`` plus the local-SGD counters, the agreement check and the
        re-binding to a new world)."""

        def __init__(self, optimizer):
            super().__init__(optimizer)
            self.save()

        def save(self):
            import copy
            with _no_unaveraged_warning():
                self._saved = copy.deepcopy(self.value.state_dict())

        def restore(self):
            # Horovod restores after a collective failed (HorovodInternalError): a round in
            # flight belongs to the broken world, and waiting for it would raise again here,
            # outside the elastic retry.
            self.value._local_sgd.abandon_in_flight()
            self.value.load_state_dict(self._saved)

        def sync(self):
            # Every worker, old and new, is here together: broadcast rank 0's state, counters
            # and schedule position, then the agreement check DistributedLocalSGD(...) skips
            # under the elastic launcher (a joining worker constructs while others sync).
            broadcast_optimizer_state(self.value, root_rank=0)
            self.value._local_sgd.check_ranks_agree()

        def on_reset(self):
            """Horovod was re-initialised with another set of workers: new rank and size."""
            self.value._local_sgd.rebind()

    return LocalSGDOptimizerStateHandler


def _install_elastic() -> None:
    from horovod.torch.elastic import state as hvd_state

    registry = hvd_state.get_handler_registry()
    if not any(t is LocalSGDOptimizer for t, _ in registry):
        # First match wins, and Horovod's optimizer handler matches every optimizer.
        hvd_state.set_handler_registry([(LocalSGDOptimizer, _optimizer_state_handler_class())]
                                       + list(registry))
    torch_state = hvd_state.TorchState
    if not getattr(torch_state.reset, "_prsgd_resets_handlers", False):
        previous = torch_state.reset

        def reset(self):
            previous(self)
            for handler in self._handlers.values():
                on_reset = getattr(handler, "on_reset", None)
                if on_reset is not None:
                    on_reset()

        reset._prsgd_resets_handlers = True
        torch_state.reset = reset


# ---- hvd.DistributedOptimizer on a wrapped optimizer -----------------------------------------

def _guarded_distributed_optimizer(horovod_factory):
    import functools

    @functools.wraps(horovod_factory)
    def DistributedOptimizer(optimizer, *args, **kwargs):  # noqa: N802 (Horovod's name)
        if _is_wrapped(optimizer):
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
    from .elastic import LocalSGDState

    factory = hvd_torch.DistributedOptimizer
    if not getattr(factory, "_prsgd_guarded", False):
        factory = _guarded_distributed_optimizer(factory)
    _install_elastic()
    hvd_elastic.LocalSGDState = LocalSGDState
    names = {"broadcast_optimizer_state": broadcast_optimizer_state,
             "DistributedOptimizer": factory, "Compression": Compression}
    for name, obj in names.items():
        setattr(hvd_torch, name, obj)
    return names
