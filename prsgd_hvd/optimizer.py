"""``DistributedLocalSGD``: Parallel Restarted SGD as a drop-in for ``hvd.DistributedOptimizer``.

Each rank steps its own copy of the model; the copies are averaged when the schedule says so
(every I steps for Algorithm 1). See DESIGN.md §3 for the exact semantics every path honours.

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
import zlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from . import horovod_compat, ops, ops_reference
from .averaging import Averager, Bucket, Round
from .collectives import allgather_object, group_process_set
from .compression import resolve_compression
from .schedules import Schedule, StepPlan, as_schedule

__all__ = ["DistributedLocalSGD"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_instances = 0  # DistributedLocalSGD objects created in this process (names their allreduces)
_AVERAGE_EVERY_STEP = StepPlan(average_before=True)


def _hvd():
    import horovod.torch as hvd
    return hvd


class _LocalSGDState:
    """Everything the wrapper adds to the optimizer, kept off the optimizer's own namespace."""

    def __init__(self, opt: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int,
                 process_set, fused: bool, use_kernels: bool, model: Optional[torch.nn.Module],
                 average_state: bool, names: Dict[int, str], overlap: bool, nonfinite: str,
                 compression: Optional[str], error_feedback: bool):
        global _instances
        _instances += 1
        self.opt = opt
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.process_set = process_set
        self.fused = fused                      # fused average+SGD step on averaging rounds
        self.model = model
        self.average_state = average_state
        self.names = names
        self.local_step = 0
        self.rounds = 0
        self.averaged_step = 0  # local_step when this rank last took a plain average
        self.rank = process_set.rank()
        self.size = process_set.size()
        self.overlap = overlap and self.size > 1
        self.nonfinite = nonfinite
        self.excluded: List[Dict[str, Any]] = []  # rounds that left non-finite ranks out
        self.divergence: Optional[float] = None  # ||x_i - avg||^2 at the last round
        self.prestarted_for: Optional[int] = None  # the step whose round is in flight
        # fused=False is the reference path: no compiled code anywhere in the round.
        # Tensor names are per optimizer instance (ranks construct optimizers in the same
        # order), so a rebuilt optimizer never meets an old one's round in flight.
        self._averager_args = dict(kernels=ops if use_kernels else ops_reference,
                                   compression=compression, error_feedback=error_feedback)
        self._wants_overlap = overlap
        self.averager = Averager(process_set, name=f"prsgd_hvd.average{_instances}",
                                 **self._averager_args)
        self._fused_layout_key: Optional[Tuple] = None
        self._fused_segments: List[List[Tuple[Optional[int], int, int]]] = []
        schedule.bind(self.rank, self.size, self.allgather)
        # Averagers over groups of ranks, for schedules that average within groups too
        # (Hierarchical); the whole process set uses self.averager.
        self.group_averagers: Dict[int, Averager] = {}
        if schedule.group_sizes():
            members = process_set.ranks if process_set.ranks is not None else \
                list(range(_hvd().size()))
            my_rank = members[self.rank]
            for g in schedule.group_sizes():
                self.group_averagers[g] = Averager(
                    group_process_set(members, g, my_rank), name=f"{self.averager.name}.g{g}",
                    **self._averager_args)
        self.in_flight: Optional[Averager] = None  # the averager whose round was prestarted

    def exposed_seconds(self) -> float:
        return sum(a.wait_seconds for a in self.all_averagers())

    def rebind(self) -> None:
        """After an elastic reset (Horovod re-initialised with another set of workers): take
        the new rank and size, fresh averagers, and re-bind the schedule, which re-derives
        what depends on N or says why it cannot (prsgd_hvd.elastic)."""
        hvd = _hvd()
        if self.group_averagers:
            raise ValueError("DistributedLocalSGD: Hierarchical averaging cannot follow an "
                             "elastic resize (its groups are fixed process sets)")
        self.process_set = hvd.global_process_set
        self.rank, self.size = hvd.rank(), hvd.size()
        self.overlap = self._wants_overlap and self.size > 1
        self.in_flight, self.prestarted_for = None, None  # died with the old Horovod
        self.averager = Averager(self.process_set, name=self.averager.name,
                                 **self._averager_args)
        self.schedule.bind(self.rank, self.size, self.allgather)

    def local_state(self) -> Dict[str, Any]:
        return {"local_step": self.local_step, "rounds": self.rounds,
                "warmup_steps": self.warmup_steps, "world_size": self.size,
                "schedule": self.schedule.state_dict()}

    def load_local_state(self, local: Dict[str, Any]) -> None:
        self.local_step = int(local["local_step"])
        self.rounds = int(local["rounds"])
        self.averaged_step = self.local_step  # a resume starts from one (broadcast) model
        self.schedule.load_state_dict(local.get("schedule", {}))

    def all_averagers(self) -> List[Averager]:
        return [self.averager, *self.group_averagers.values()]

    def allgather(self, obj: Any, purpose: str = "schedule") -> List[Any]:
        """Collective over the process set (schedules use it to agree on measured values).

        The collective's name depends only on what it is for, never on how many were made
        before on this rank: a worker that joins an elastic job late must meet the others."""
        return allgather_object(obj, self.process_set, f"{self.averager.name}.{purpose}")

    # ---- what gets averaged ------------------------------------------------------------------
    def params(self) -> List[torch.Tensor]:
        seen, out = set(), []
        for group in self.opt.param_groups:
            for p in group["params"]:
                # Integer/bool parameters cannot be trained: nothing to average
                # (horovod_compat.check_parameter_dtypes refuses the other non-float ones).
                if id(p) not in seen and p.is_floating_point():
                    seen.add(id(p))
                    out.append(p)
        return out

    def tensors(self) -> List[torch.Tensor]:
        """Params (group by group, so each group is contiguous in its bucket), then extras."""
        params = self.params()
        out = list(params)
        if self.model is not None:
            ids = {id(p) for p in params}
            out += [b for b in self.model.buffers()
                    if b.is_floating_point() and id(b) not in ids]
        if self.average_state:
            out += self.shared_state_tensors(params)
        return out

    def shared_state_tensors(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """Optimizer state shaped like its parameter, for the entries *every* rank has.

        NOTE: [state layout] State appears lazily (a parameter without a gradient on some rank
        has no momentum there yet), and a round whose tensors differ between ranks cannot be
        summed. Each round with average_state=True therefore checks, with one 2-element
        allreduce, that every rank lists the same entries, and when they differ the ranks
        agree on the common ones; the others stay local until every rank has them.
        """
        local = []
        for i, p in enumerate(params):
            st = self.opt.state.get(p, {})
            for key in sorted(st):
                v = st[key]
                if torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape:
                    local.append((i, key))
        if self.size > 1:
            h = float(zlib.crc32(repr(local).encode()) % (1 << 20))
            sums = _hvd().allreduce(torch.tensor([h, h * h], dtype=torch.float64), op=_hvd().Sum,
                                    name="prsgd_hvd.state_layout", process_set=self.process_set)
            if sums.tolist() != [self.size * h, self.size * h * h]:  # someone lists others
                common = set(local)
                for other in self.allgather(local, "state_layout"):
                    common &= set(other)
                local = [entry for entry in local if entry in common]
        return [self.opt.state[params[i]][key] for i, key in local]

    # ---- cross-rank agreement ----------------------------------------------------------------
    def check_ranks_agree(self) -> None:
        """One small collective at construction: every rank must have the same schedule and
        the same parameters in the same order, or the first round would hang or mix models.
        Raises the same error on every rank, naming the difference and the ranks."""
        if self.size == 1:
            return
        params = self.params()
        mine = {
            "schedule": self.schedule.describe(),
            "warmup_steps": self.warmup_steps,
            "average_state": self.average_state,
            "model buffers": self.model is not None,
            "compression": self.averager.codec.kind if self.averager.codec else None,
            "parameters": [(self.names.get(id(p), f"#{i}"), tuple(p.shape), str(p.dtype),
                            p.device.type) for i, p in enumerate(params)],
        }
        everyone = self.allgather(mine, "agree")
        problems = []
        for key in mine:
            values = [e[key] for e in everyone]
            if any(v != values[0] for v in values):
                problems.append(_describe_mismatch(key, values))
        if problems:
            raise ValueError("DistributedLocalSGD: the ranks disagree, so averaging would hang or "
                             "mix different models:\n  " + "\n  ".join(problems))

    # ---- schedule ----------------------------------------------------------------------------
    def before_step(self, t: int) -> StepPlan:
        if t <= self.warmup_steps:
            return _AVERAGE_EVERY_STEP
        return self.schedule.before_step(t)

    def after_step(self, t: int) -> bool:
        return t > self.warmup_steps and self.schedule.after_step(t)

    def round_weight(self, t: int) -> float:
        return 1.0 if t <= self.warmup_steps else self.schedule.round_weight()

    # ---- overlap -----------------------------------------------------------------------------
    # NOTE: [overlap]
    # Algorithm 1 averages x^{t-1}, which is final as soon as step t-1 returns. So when step t
    # will average, step t-1 ends by packing the parameters and starting the allreduce; step
    # t's forward and backward run while Horovod's background thread moves the bytes, and step
    # t only waits for what is left. The packed copy is a snapshot: code that changes the
    # parameters between step() calls (other than through this optimizer) must pass
    # overlap=False. Anything that ends the run early (finalize, average_now, load_state_dict)
    # first completes the round in flight, because every rank has started it.
    def averager_for(self, t: int) -> Averager:
        """The averager of step ``t``'s round: the whole process set, or this rank's group."""
        if t <= self.warmup_steps:
            return self.averager
        group = self.schedule.before_step_group(t)
        return self.averager if group is None else self.group_averagers[group]

    def prestart(self, t: int) -> None:
        """Start the round of step ``t`` now, if step ``t`` averages before its update."""
        if not self.overlap or self.in_flight is not None:
            return
        if t <= self.warmup_steps or self.schedule.will_average_before(t):
            self.in_flight = self.averager_for(t)
            self.in_flight.start(self.tensors(), weight=self.round_weight(t))
            self.prestarted_for = t

    def complete_in_flight(self) -> Optional[Round]:
        """Wait for a prestarted round, if any; its sums are returned for the caller to use."""
        if self.in_flight is None:
            return None
        averager, self.in_flight, self.prestarted_for = self.in_flight, None, None
        return averager.wait()

    # ---- the fused path ----------------------------------------------------------------------
    def fused_segments(self, buckets: List[Bucket]) -> List[List[Tuple[Optional[int], int, int]]]:
        """Per bucket: runs (group index or None for non-params, first, last) of its tensors."""
        key = tuple(id(b.flat) for b in buckets)
        if key != self._fused_layout_key:
            group_of: Dict[int, int] = {}
            for gi, group in enumerate(self.opt.param_groups):
                for p in group["params"]:
                    group_of.setdefault(id(p), gi)
            layout = []
            for b in buckets:
                runs: List[Tuple[Optional[int], int, int]] = []
                for i, t in enumerate(b.tensors):
                    g = group_of.get(id(t))
                    if runs and runs[-1][0] == g:
                        runs[-1] = (g, runs[-1][1], i + 1)
                    else:
                        runs.append((g, i, i + 1))
                layout.append(runs)
            self._fused_layout_key, self._fused_segments = key, layout
        return self._fused_segments

    def can_fuse(self, buckets: List[Bucket]) -> bool:
        for b in buckets:
            if b.tensors and (b.device.type not in ("cpu", "cuda") or b.dtype not in _FUSED_DTYPES):
                return False
        for group in self.opt.param_groups:
            if group.get("differentiable", False):
                return False
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    return False
        return True

    @torch.no_grad()
    def fused_write_back_and_step(self, rnd: Round) -> None:
        """Kernel 2 of the round: average and apply ``torch.optim.SGD``'s update in one pass
        (measuring this rank's divergence from the average in the same pass)."""
        scale = rnd.scale
        divergence = 0.0
        for b, runs in zip(rnd.buckets, self.fused_segments(rnd.buckets)):
            acc = torch.zeros(1, dtype=torch.float64, device=b.device)
            for g, first, last in runs:
                flat = b.segment(first, last)
                tensors = b.tensors[first:last]
                if g is None:
                    ops.unflatten_average_(flat, tensors, scale=scale)
                    continue
                group = self.opt.param_groups[g]
                momentum = float(group["momentum"])
                grads, bufs, firsts = [], [], []
                for p in tensors:
                    grads.append(p.grad)
                    buf, first = None, False
                    if p.grad is not None and momentum != 0:
                        state = self.opt.state[p]
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = torch.empty_like(p, memory_format=torch.preserve_format)
                            state["momentum_buffer"] = buf
                            first = True
                    bufs.append(buf)
                    firsts.append(first)
                ops.unflatten_average_sgd_(
                    flat, tensors, grads, bufs, scale=scale, lr=float(group["lr"]),
                    momentum=momentum, dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group.get("maximize", False)), first_step=firsts,
                    divergence=acc)
            divergence += float(acc)
        self.divergence = divergence

    def params_per_bucket(self, buckets: List[Bucket]) -> List[int]:
        """How many leading tensors of each bucket are parameters (tensors() lists them first)."""
        ids = {id(p) for p in self.params()}
        return [sum(1 for t in b.tensors if id(t) in ids) for b in buckets]

    def write_back(self, rnd: Round, averager: Optional[Averager] = None) -> None:
        """Average into every tensor; records this rank's divergence from the average."""
        averager = averager or self.averager
        self.divergence = averager.write_back(rnd, self.params_per_bucket(rnd.buckets))

    # ---- rounds ------------------------------------------------------------------------------
    def _round(self, weight: float = 1.0, active: bool = True,
               prestarted: Optional[Round] = None,
               averager: Optional[Averager] = None) -> Tuple[Round, bool]:
        """One round, checked for non-finite values; returns it and whether this rank was left
        out of it (``nonfinite="exclude"``; the caller then skips this step's update)."""
        averager = averager or self.averager
        if prestarted is not None:
            rnd = prestarted
        else:
            averager.start(self.tensors(), weight=weight, active=active)
            rnd = averager.wait()
        if self.nonfinite == "ignore" or rnd.is_finite():
            return rnd, False
        # NOTE: [non-finite rounds] The sum is identical on every rank, so every rank gets
        # here together and can afford one more collective to find the culprits: their own
        # tensors still hold their local values (nothing was written back yet).
        mine = not all(bool(torch.isfinite(t).all()) for t in self.tensors())
        flags = allgather_object(mine, averager.process_set, f"{averager.name}.nonfinite")
        members = averager.process_set.ranks or list(range(len(flags)))  # global ranks
        bad = [members[r] for r, flag in enumerate(flags) if flag]
        where = (f"averaging round {self.rounds + 1} (after {self.local_step} local steps on "
                 f"rank {self.rank})")
        if not bad:
            if averager.codec is None:
                return rnd, False  # the sum overflowed fp32 but every model is finite: go on
            raise FloatingPointError(
                f"DistributedLocalSGD: the 16-bit compressed sum overflowed at {where}: the "
                f"models moved further from the last average than {averager.codec.kind} can "
                f"hold. Average more often, or use compression=hvd.Compression.bf16 (wider "
                f"range) or no compression.")
        if self.nonfinite == "raise" or len(bad) == averager.size:
            raise FloatingPointError(
                f"DistributedLocalSGD: non-finite values (inf/NaN) in the model of rank(s) "
                f"{bad} at {where}; averaging them would poison every rank. Lower "
                f"the learning rate, clip gradients, use a GradScaler, or pass "
                f"nonfinite='exclude' to leave such ranks out of the average.")
        self.excluded.append({"round": self.rounds + 1, "ranks": bad})
        averager.start(self.tensors(), weight=0.0 if mine else weight, active=active,
                       contribute=not mine)
        return averager.wait(), mine

    def scheduled_round(self, update, kwargs, weight: float, then_step: bool,
                        t: Optional[int] = None) -> None:
        """A round the schedule asked for; with ``then_step`` the update follows the average."""
        averager = self.averager if t is None else self.averager_for(t)
        prestarted = self.complete_in_flight() if t is not None and self.prestarted_for == t else None
        rnd, excluded = self._round(weight, prestarted=prestarted, averager=averager)
        if excluded:  # this rank's gradient was taken at a non-finite point
            update = _skip_update
        if then_step and update is not _skip_update and self.fused and not kwargs \
                and self.can_fuse(rnd.buckets):
            self.fused_write_back_and_step(rnd)
        else:
            self.write_back(rnd, averager)
            if then_step:
                update(**kwargs)
        self.rounds += 1

    def average_now(self) -> None:
        # A prestarted round already holds the current parameters (nothing may change them
        # between steps, NOTE: [overlap]): its result is the average asked for.
        was_global = self.in_flight is self.averager
        prestarted = self.complete_in_flight()
        if prestarted is not None and (not was_global or prestarted.weight_sum != self.size):
            prestarted = None
        rnd, _ = self._round(prestarted=prestarted)
        self.write_back(rnd)
        self.rounds += 1
        self.averaged_step = self.local_step
        self.prestart(self.local_step + 1)

    def discard_in_flight(self) -> None:
        self.complete_in_flight()

    def finalize(self) -> None:
        """Join protocol: keep contributing this rank's model to the rounds of ranks that are
        still training, until a round in which no rank is (see NOTE: [control elements])."""
        averager = self.in_flight
        prestarted = self.complete_in_flight()
        if prestarted is not None:
            # Prestarted for a step this rank will not take; the other ranks may take it, so
            # join it like any of their rounds.
            rnd, _ = self._round(prestarted=prestarted, averager=averager)
            self.write_back(rnd, averager)
            self.rounds += 1
        while True:
            rnd, _ = self._round(active=False)
            self.write_back(rnd)
            self.rounds += 1
            if rnd.active_ranks == 0:
                self.averaged_step = self.local_step
                return


def _describe_mismatch(key: str, values: List[Any]) -> str:
    if key == "parameters":
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            counts = ", ".join(f"rank {r}: {len(v)}" for r, v in enumerate(values))
            return f"number of parameters differs ({counts})"
        for i, entries in enumerate(zip(*values)):
            if any(e != entries[0] for e in entries):
                per_rank = "; ".join(f"rank {r}: {e[0]} {e[1]} {e[2]} on {e[3]}"
                                     for r, e in enumerate(entries))
                return f"parameter {i} differs ({per_rank})"
    groups: Dict[str, List[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(repr(v), []).append(r)
    return f"{key} differs: " + "; ".join(f"ranks {rs}: {v}" for v, rs in groups.items())


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
        ls: _LocalSGDState = self._local_sgd
        base_step = super(self.__class__, self).step
        loss = None
        if closure is not None:
            # The gradient must be taken at the local point x_i^{t-1}, before any averaging.
            with torch.enable_grad():
                loss = closure()
        update = base_step
        if self._take_grad_scaler_verdict():
            update = _skip_update
        t = ls.local_step + 1
        plan = ls.before_step(t)
        if plan.lr is not None:
            for group in self.param_groups:
                group["lr"] = plan.lr
        if plan.average_before:
            waited = ls.exposed_seconds()
            ls.scheduled_round(update, kwargs, ls.round_weight(t), then_step=True, t=t)
            if t > ls.warmup_steps:
                ls.schedule.observe(t, ls.divergence, ls.exposed_seconds() - waited)
                ls.schedule.round_done()
        else:
            update(**kwargs)
        if ls.after_step(t):
            waited = ls.exposed_seconds()
            ls.scheduled_round(update, kwargs, ls.schedule.round_weight(), then_step=False)
            ls.schedule.observe(t, ls.divergence, ls.exposed_seconds() - waited)
            ls.schedule.round_done()
            ls.averaged_step = t
        ls.local_step = t
        ls.prestart(t + 1)
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
                for p in self._local_sgd.params():
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
        round prestarted for a step no rank takes is completed here too, and counted.)
        """
        self._local_sgd.finalize()

    @contextlib.contextmanager
    def local_sgd(self):
        """``with opt.local_sgd(): <training loop>`` calls :meth:`finalize` when the loop ends
        (not when it raises: the error ends the job, a final average would wait forever)."""
        yield self
        self.finalize()

    def stats(self) -> Dict[str, Any]:
        ls: _LocalSGDState = self._local_sgd
        return {
            "local_step": ls.local_step,
            "rounds": ls.rounds,
            "bytes_sent": sum(a.bytes_sent for a in ls.all_averagers()),
            "comm_seconds": sum(a.comm_seconds for a in ls.all_averagers()),
            "exposed_comm_seconds": sum(a.wait_seconds for a in ls.all_averagers()),
            # ||x_i - x_avg||^2 over the parameters at the last round, measured inside the
            # write-back pass: the quantity the paper's lemma bounds by 4 gamma^2 I^2 G^2.
            "divergence": ls.divergence,
            "fused": ls.fused,
            "overlap": ls.overlap,
            "compression": ls.averager.codec.kind if ls.averager.codec else None,
            "excluded": [dict(e) for e in ls.excluded],
            "schedule": repr(ls.schedule),
            "world_size": ls.size,
        }

    def state_dict(self) -> Dict[str, Any]:
        horovod_compat.warn_if_unaveraged(self, "state_dict")
        sd = super(self.__class__, self).state_dict()
        sd["local_sgd"] = self._local_sgd.local_state()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        local = state_dict.pop("local_sgd", None)
        # A round prestarted from the parameters being replaced is finished and dropped; the
        # next step averages the loaded parameters itself.
        self._local_sgd.discard_in_flight()
        super(self.__class__, self).load_state_dict(state_dict)
        if local is not None:
            self._local_sgd.load_local_state(local)


def _skip_update(**kwargs) -> None:
    """The update of a step whose gradients overflowed (the round still happens)."""


def _check_named_parameters(optimizer, named_parameters) -> Dict[int, str]:
    if named_parameters is None:
        return {}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("DistributedLocalSGD: 'named_parameters' must be (name, tensor) pairs, "
                         "e.g. model.named_parameters()")
    names = [n for n, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"DistributedLocalSGD: 'named_parameters' has duplicate names: {dups}")
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in named if id(p) not in in_opt]
    if missing:
        raise ValueError(f"DistributedLocalSGD: 'named_parameters' names parameters that are not in "
                         f"the optimizer: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {id(p): n for n, p in named}


def DistributedLocalSGD(optimizer: torch.optim.Optimizer, interval=1,
                        named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                        warmup_steps: int = 0, process_set=None, fused: Optional[bool] = None,
                        model: Optional[torch.nn.Module] = None, average_state: bool = False,
                        overlap: bool = True, nonfinite: str = "raise", compression=None,
                        error_feedback: bool = True, backward_passes_per_step: int = 1,
                        op=None, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                        groups=None, sparse_as_dense: bool = False):
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
            rank (see prsgd_hvd/compression.py): half the bytes, and the averaged model stays
            within about 1e-3 (relative) of exact averaging. ``None``: full precision.
        error_feedback: with compression, carry what the 16-bit cast lost into the next
            round, so rounding errors do not accumulate.
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

    ``synchronize()`` and ``skip_synchronize()`` are there for Horovod's gradient-clipping and
    AMP loops; ``hvd.broadcast_optimizer_state`` carries the local-SGD counters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedLocalSGD: 'optimizer' must be a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")
    if hasattr(optimizer, "_local_sgd"):
        raise ValueError("DistributedLocalSGD: this optimizer is already wrapped")
    lr_scheduler_patched = horovod_compat.take_lr_scheduler_patch(optimizer)
    compat = horovod_compat.prepare(
        optimizer, interval, named_parameters, process_set,
        backward_passes_per_step=backward_passes_per_step,
        op=_hvd().Average if op is None else op,
        gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
        groups=groups, sparse_as_dense=sparse_as_dense)
    named_parameters, process_set = compat["named_parameters"], compat["process_set"]
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"DistributedLocalSGD: 'warmup_steps' must be an int >= 0, got {warmup_steps!r}")
    if fused not in (None, True, False):
        raise ValueError(f"DistributedLocalSGD: 'fused' must be None, True or False, got {fused!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"DistributedLocalSGD: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    schedule = as_schedule(interval)
    names = _check_named_parameters(optimizer, named_parameters)
    horovod_compat.check_schedule_outside_process_set(schedule, compat)

    is_sgd = type(optimizer) is torch.optim.SGD
    if fused is True:
        if not ops.has_extension():
            raise ValueError("DistributedLocalSGD: fused=True but the compiled kernels are not "
                             f"loaded ({ops.extension_error()}); rebuild with "
                             "`pip install --no-build-isolation -e .` or pass fused=None")
        if not is_sgd:
            raise ValueError(f"DistributedLocalSGD: fused=True needs torch.optim.SGD, got "
                             f"{type(optimizer).__name__}; pass fused=None to use the kernels "
                             "for averaging and the optimizer's own step")
    use_kernels = fused is not False and ops.has_extension()
    fuse_step = use_kernels and is_sgd

    base_cls = type(optimizer)
    methods = {k: v for k, v in [*vars(horovod_compat.HorovodCompatMethods).items(),
                                 *vars(_LocalSGDMethods).items()]
               if k not in ("__dict__", "__weakref__")}
    cls = type(base_cls.__name__, (base_cls,), methods)
    if nonfinite not in ("raise", "exclude", "ignore"):
        raise ValueError(f"DistributedLocalSGD: 'nonfinite' must be 'raise', 'exclude' or "
                         f"'ignore', got {nonfinite!r}")
    compression = resolve_compression(compression)
    if overlap not in (True, False):
        raise ValueError(f"DistributedLocalSGD: 'overlap' must be True or False, got {overlap!r}")
    state = _LocalSGDState(optimizer, schedule, warmup_steps, process_set, fuse_step,
                           use_kernels, model, average_state, names, overlap, nonfinite,
                           compression, bool(error_feedback))
    # Before the class swap: a mismatch leaves the optimizer as it was. Under Horovod's elastic
    # launcher a worker that joins builds its optimizer while the others are already in
    # state.sync(), so there the check runs in the elastic state's sync() instead (the
    # TorchState handler in prsgd_hvd.horovod_compat, which LocalSGDState uses too).
    if os.environ.get("HOROVOD_ELASTIC") != "1":
        state.check_ranks_agree()
    optimizer.__class__ = cls
    optimizer._local_sgd = state
    horovod_compat.finish(optimizer, compat, lr_scheduler_patched)
    return optimizer
