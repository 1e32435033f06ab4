"""``DistributedLocalSGD``: Parallel Restarted SGD as a drop-in for ``hvd.DistributedOptimizer``.

Each rank steps its own copy of the model; the copies are averaged when the schedule says so
(every I steps for Algorithm 1). README.md, "What exactly happens", states the exact semantics
every path honours; docs/architecture.md follows one round through the modules.

NOTE: [the wrapper is the user's optimizer]
``DistributedLocalSGD(opt, ...)`` changes ``opt``'s class in place to a dynamic subclass of it,
the way Horovod's ``DistributedOptimizer`` builds a dynamic subclass, so the result *is* an
instance of the user's class (``isinstance`` holds, ``lr_scheduler``, ``GradScaler`` and
``state_dict()`` keep working). Unlike Horovod we keep the object instead of re-constructing it,
so state loaded before wrapping and constructor arguments that ``param_groups`` do not carry are
kept. The subclass's ``__module__`` is Horovod's optimizer module on purpose: Horovod's
``broadcast_optimizer_state`` initialises empty optimizer state by calling the *base* class's
``step()`` for its own wrappers (and ``optimizer.step()`` for anything else), and our ``step()``
must not run there -- it would advance the local-SGD counters and could start an averaging round.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from . import horovod_compat, unaveraged, validation
from .local_sgd import LocalSGD

__all__ = ["DistributedLocalSGD"]


class _LocalSGDMethods:
    """Methods of the dynamic subclass (copied into it, as Horovod does)."""

    # NOTE: [the wrapper is the user's optimizer] explains this module name.
    __module__ = "horovod.torch.optimizer"

    # NOTE: [GradScaler counts iterations]
    # A GradScaler skips optimizer.step() on a rank whose gradients overflowed. Skipping ours
    # would shift that rank's averaging schedule against the others' -- a hang or silent drift
    # (pytorch#76282 for torch's post-local-SGD). Declaring that we handle scaling ourselves
    # makes the scaler always call step(), with `grad_scale` and `found_inf` set on us; step()
    # then counts the iteration and joins its round, and only the update is skipped.
    _step_supports_amp_scaling = True

    @property
    def local_step(self) -> int:
        """Calls of ``step()`` so far on this rank."""
        return self._local_sgd.local_step

    @property
    def rounds(self) -> int:
        """Averaging rounds so far (scheduled ones, ``average_now()`` and ``finalize()``)."""
        return self._local_sgd.rounds

    def step(self, closure=None, **kwargs):
        self._compat_before_step()
        ls: LocalSGD = self._local_sgd
        base_step = super(self.__class__, self).step
        if self._needs_closure_in_step:
            # LBFGS re-evaluates the closure during its own step: hand it over (it then runs
            # at the averaged point on an averaging step, as LBFGS's step is the update).
            result = []
            ls.step(lambda: result.append(base_step(closure, **kwargs)),
                    self._take_grad_scaler_verdict(), fusable=False)
            return result[0] if result else None
        loss = None
        if closure is not None:
            # The gradient must be taken at the local point x_i^{t-1}, before any averaging.
            with torch.enable_grad():
                loss = closure()
        ls.step(lambda: base_step(**kwargs), self._take_grad_scaler_verdict(),
                fusable=not kwargs)
        return loss

    def _take_grad_scaler_verdict(self) -> bool:
        """Apply what a GradScaler left on us (NOTE: [GradScaler counts iterations]): unscale
        the gradients, and return True when this step's update must be skipped."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        grad_scale = getattr(self, "grad_scale", None)
        # Hide both from a base optimizer that would act on them again (torch's fused ones).
        self.found_inf = self.grad_scale = None
        if float(found_inf) > 0:
            return True
        if grad_scale is not None:
            with torch.no_grad():
                for p in self._local_sgd.contents.params():
                    if p.grad is not None:
                        p.grad.mul_(grad_scale.to(p.grad.device).reciprocal().to(p.grad.dtype))
        return False

    def average_now(self) -> None:
        """Collective: average every rank's model now, outside the schedule.

        Every rank of the process set must call it at the same point. Counts as a round.
        """
        self._local_sgd.average_now()

    def finalize(self) -> None:
        """Collective: end training with every rank holding the same averaged model.

        Ranks may call it after different numbers of steps (uneven data): a rank that has
        finished keeps joining the averaging rounds of the ranks still training, contributing
        its model and taking the average (as ``hvd.join`` does for gradients), until every rank
        has called ``finalize()``; then all take one last plain average. (With overlap, a
        round prestarted for a step no rank takes is completed here as that last average;
        finalize() makes the same rounds, with the same values, as without overlap.)
        """
        self._local_sgd.finalize()

    @contextlib.contextmanager
    def local_sgd(self):
        """``with opt.local_sgd(): <training loop>`` calls :meth:`finalize` when the loop ends
        (not when it raises: the error ends the job, a final average would wait forever)."""
        yield self
        self.finalize()

    @contextlib.contextmanager
    def per_rank_checkpoint(self):
        """``with opt.per_rank_checkpoint(): torch.save(..., f"rank{r}.pt")`` saves this rank's
        own model and optimizer state on purpose -- one file per rank, the exact resume of
        local SGD mid-interval -- so ``state_dict()`` inside does not warn that the checkpoint
        holds one rank's model (LocalStepsNotAveragedWarning)."""
        with unaveraged.no_unaveraged_warning():
            yield self

    def stats(self) -> Dict[str, Any]:
        """Counters and telemetry: ``local_step``, ``rounds``, ``bytes_sent``, ``comm_seconds``,
        ``exposed_comm_seconds``, ``divergence``, ``fused``, ``overlap``, ``compression``,
        ``excluded``, ``schedule``, ``world_size``."""
        return self._local_sgd.stats()

    def state_dict(self) -> Dict[str, Any]:
        unaveraged.warn_if_unaveraged(self, "state_dict")
        sd = super(self.__class__, self).state_dict()
        sd["local_sgd"] = self._local_sgd.checkpoint.local_state()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        local = state_dict.pop("local_sgd", None)
        ls: LocalSGD = self._local_sgd
        if local is not None:  # validate before anything is applied (all or nothing)
            ls.checkpoint.validate(local)
        # A round prestarted from the parameters being replaced is finished and dropped; the
        # next step averages the loaded parameters itself.
        ls.discard_in_flight()
        super(self.__class__, self).load_state_dict(state_dict)
        if local is not None:
            ls.checkpoint.load(local)

    # NOTE: [no pickling] The dynamic class cannot be found by name, and the engine holds
    # Horovod handles and process sets that mean nothing in another process. Checkpoints are
    # state_dict()s, which carry everything (the local-SGD counters included).
    def __reduce_ex__(self, protocol):
        raise TypeError("DistributedLocalSGD: a wrapped optimizer cannot be pickled (torch.save(opt)) "
                        "or copied; save optimizer.state_dict() instead -- it carries the local-SGD "
                        "counters and schedule -- and load it into a newly wrapped optimizer")

    def __deepcopy__(self, memo):
        self.__reduce_ex__(4)

    def __copy__(self):
        self.__reduce_ex__(4)


def DistributedLocalSGD(optimizer: torch.optim.Optimizer, interval=1,
                        named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                        warmup_steps: int = 0, process_set=None, fused: Optional[bool] = None,
                        model: Optional[torch.nn.Module] = None, average_state: bool = False,
                        overlap: bool = True, nonfinite: str = "raise", compression=None,
                        error_feedback: bool = True, backward_passes_per_step: int = 1,
                        op=None, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                        groups=None, sparse_as_dense: bool = False, outer=None,
                        delay: int = 0, fragments: int = 1, outer_device=None):
    """Wrap ``optimizer`` for Parallel Restarted SGD (local SGD with periodic model averaging).

    Takes every argument of ``hvd.DistributedOptimizer`` (docs/migrating.md), so swapping the
    call is one line; those that mean something for averaging models are honoured, the others
    are validated as Horovod validates them and documented below.

    Args:
        optimizer: any ``torch.optim.Optimizer``; it is returned, re-classed (see the NOTE above).
        interval: an ``int >= 1`` (average every ``interval`` steps, Algorithm 1) or a schedule
            (``FixedInterval``, ...).
        named_parameters: ``model.named_parameters()``, for error messages that name parameters.
            As in Horovod, it must name every parameter of the optimizer (or be omitted).
        warmup_steps: average at every step for the first ``warmup_steps`` steps.
        process_set: the Horovod process set to average over (default: all ranks). As in
            Horovod, a rank outside it may wrap its optimizer too: it trains alone, never
            averaging (and never blocking the members).
        fused: ``None`` uses the compiled kernels when available (the fused average+update for
            ``torch.optim.SGD``), ``True`` requires them, ``False`` uses the pure-torch reference.
        model: when given, its floating-point buffers (BatchNorm statistics) are averaged too.
        average_state: also average optimizer state tensors shaped like their parameter
            (momentum buffers, Adam moments). Off by default: the paper keeps them local.
        overlap: start an averaging round's allreduce as soon as the previous step ends, so it
            runs during the forward and backward pass of the step that uses it (Algorithm 1
            rounds). Needs the parameters left alone between ``step()`` calls; see
            NOTE: [overlap].
        nonfinite: what a round does when some rank's model holds inf/NaN: ``"raise"`` (every
            rank raises ``FloatingPointError`` naming the ranks and the round), ``"exclude"``
            (average the healthy ranks only; the others take that average and skip the step's
            update; listed in ``stats()["excluded"]``), or ``"ignore"`` (no check: saves one
            read of the summed buffer per round).
        compression: ``hvd.Compression.fp16`` or ``hvd.Compression.bf16`` sends each round as
            the 16-bit change since the last common average, which is kept in fp32 on every
            rank (prsgd_hvd/wire_formats.py, Delta16): half the bytes, and the averaged model stays
            within about 1e-3 (relative) of exact averaging. ``"int8"`` sends that change in 8
            bits (Int8Delta): rank r's d_r = weight_r * (x_r - anchor + residual_r) is cut into
            chunks of 1024 consecutive elements of each flat bucket; a chunk travels as one fp32
            scale s = max|d_r| / 127 and int8 codes round(d_r / s) (to nearest, ties to even:
            deterministic), about 1 byte per element plus 4 per chunk. The messages are
            allgathered (an int8 sum would overflow); every rank decodes every rank's codes
            times its scales and adds them in rank order in fp32, so all ranks get the same
            bits, then adds the anchor times the sum of weights. Each element is off by at
            most s / 2 per round, which error feedback sends in the next round (the tests hold
            jobs to 5e-3 of exact averaging). A chunk holding inf/NaN decodes to NaN on every
            rank, so the non-finite policy sees the round as with the other formats. With
            every format a job's first round, and the first after an elastic reset, goes in
            full precision (there is no common point yet). ``None``: full precision.
        error_feedback: with compression, carry what the 16-bit cast or the 8-bit rounding lost
            into the next round, so rounding errors do not accumulate. The residuals are this
            rank's own state: not saved in ``state_dict()``, dropped at an elastic reset.
        backward_passes_per_step: Horovod's gradient accumulation. Gradients stay local here,
            so they accumulate in ``.grad`` over any number of backward passes anyway: call
            ``step()`` once per accumulated batch, as with Horovod. Validated (int >= 1); no
            other effect.
        op: ``hvd.Average`` (or ``None``), the only reduction that is model averaging;
            ``hvd.Adasum`` and ``hvd.Sum`` raise a ``ValueError`` saying why.
        gradient_predivide_factor: Horovod splits the gradient average into a scale before
            and after the sum, to keep fp16 gradient sums in range. Models are summed in fp32
            (or as 16-bit deltas, see ``compression``), so there is nothing to split: validated
            (a finite number > 0), no effect.
        num_groups, groups: Horovod's grouping of gradient allreduces. Every round already
            sends all parameters of one (device, dtype) as one buffer, the coarsest grouping
            there is: validated as Horovod does, no effect.
        sparse_as_dense: Horovod densifies sparse gradients before allreducing them. Gradients
            are never sent here and parameters (embeddings included) are dense, so sparse
            gradients (``nn.Embedding(sparse=True)`` with ``SparseAdam`` or ``SGD``) work either
            way: validated (a bool), no effect.

        outer: an outer optimizer (DiLoCo): a callable that takes a list of tensors and
            returns a ``torch.optim.Optimizer`` over exactly them, e.g.
            ``lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)`` or
            ``prsgd_hvd.outer.diloco()``. It is called once, here, over copies of the
            parameters (theta0, fp32 for fp16/bf16 parameters); closure-only optimizers
            (LBFGS) are refused. theta0 is the model after the last round over the whole
            process set (initially the parameters at the first ``step()``). Every such round --
            scheduled, ``average_now()`` and ``finalize()``'s -- computes the average ybar, sets
            ``theta0 - ybar`` as the outer tensors' ``.grad``, steps the outer optimizer and
            puts every rank's parameters at the new theta0 (Algorithm 1's update then applies
            to it). Warm-up rounds are plain averages theta0 follows; ``Hierarchical`` group
            rounds are plain group averages and leave theta0 alone. Only parameters take the
            outer step: model buffers and averaged optimizer state are averaged. Weighted
            averages keep their weights. ``lambda ps: torch.optim.SGD(ps, lr=1.0)`` is plain
            PR-SGD. theta0 and the outer state are in ``state_dict()["local_sgd"]["outer"]``.
            It cannot be changed after wrapping (wrap a new optimizer). With
            ``torch.optim.SGD`` as the outer optimizer a round is one fused kernel pass
            (``stats()["fused_outer_rounds"]``). Rounds start early (``overlap``) as without
            ``outer``, except with ``Hierarchical`` schedules.
        delay: streaming rounds (``0 <= delay < interval``). The round made before the update
            of step t packs the model as usual and starts; the rank applies the updates of
            steps t, ..., t+delay-1 without it and, before the update of step t+delay, merges
            it keeping its local progress: ``x <- x + (c - x_sent)``, c the round's average
            (with ``outer``, the new theta0), for every tensor the round carries. An epoch
            end (Algorithms 2 and 3) counts as "before the update of the next step". 0: the
            round is waited for where it starts (the paper). ``state_dict()`` carries the
            rounds in flight; ``average_now()`` and ``finalize()`` merge them first. Replaces
            ``overlap``. Not with ``Hierarchical``, ``Adaptive``, ``by_speed``/
            ``every_seconds`` or ``nonfinite="exclude"`` (each refused, saying why).
        fragments: split the parameters into this many fragments of about equal bytes
            (whole tensors, in order); fragment p is averaged at the steps t with
            ``(t - p*interval/fragments) % interval == 0``, each delayed by ``delay``: the
            rounds spread over the interval, the peak bandwidth drops F-fold. Needs an int
            interval that it divides. Warm-up, ``average_now()`` and ``finalize()`` rounds
            take every fragment. 1: the whole model at once.
        outer_device: with ``outer``, where theta0 and the outer optimizer's state live
            (torchft's DiLoCo calls it ``backup_device``): ``"cpu"`` keeps these two or more
            copies of the model in host memory (page-locked when CUDA is available) instead of
            beside the parameters. At each outer round they are copied to the round's device in
            chunks of consecutive tensors of at most 32 MiB of theta0, the outer step runs there
            (the fused kernel, or the outer optimizer's own ``step()`` once per chunk), and
            theta0' and the state are copied back, so device memory holds one chunk's copies at
            a time; the values are those of ``outer_device=None``, bit for bit. The
            checkpoint entry holds them as host tensors. ``stats()["outer_device"]``. A CUDA
            device is accepted too; ``None`` (default): beside each parameter.

    ``synchronize()`` and ``skip_synchronize()`` are there for Horovod's gradient-clipping and
    AMP loops; ``hvd.broadcast_optimizer_state`` carries the local-SGD counters.
    """
    args = validation.validate(
        optimizer, interval, named_parameters, warmup_steps, process_set, fused, model,
        average_state, overlap, nonfinite, compression, error_feedback,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
        groups=groups, sparse_as_dense=sparse_as_dense, outer=outer, delay=delay,
        fragments=fragments, outer_device=outer_device)
    engine = LocalSGD(optimizer, args.config, args.process_set)
    # Before the class swap: a mismatch leaves the optimizer as it was. Under Horovod's elastic
    # launcher a worker that joins builds its optimizer while the others are already in
    # state.sync(), so there the check runs in the elastic state's sync() instead (the
    # TorchState handler in prsgd_hvd.elastic, which LocalSGDState uses too).
    if os.environ.get("HOROVOD_ELASTIC") != "1":
        engine.check_ranks_agree()
    base_cls = type(optimizer)
    methods = {k: v for k, v in [*vars(horovod_compat.HorovodCompatMethods).items(),
                                 *vars(_LocalSGDMethods).items()]
               if k not in ("__dict__", "__weakref__")}
    cls = type(base_cls.__name__, (base_cls,), methods)
    cls._needs_closure_in_step = issubclass(base_cls, torch.optim.LBFGS)
    optimizer.__class__ = cls
    optimizer._local_sgd = engine
    # What Horovod's wrapper has as attributes, the LR scheduler's step tracking around our
    # step, and the warning at exit.
    for key, value in args.horovod_args.items():
        setattr(optimizer, key, value)
    if args.lr_scheduler_patched:
        del optimizer.step
        horovod_compat.reinstall_lr_scheduler_patch(optimizer)
    unaveraged.track(optimizer)
    return optimizer
