"""The engine behind ``DistributedLocalSGD``: one optimizer's local SGD, step by step.

``LocalSGD.step()`` is a pipeline; each stage is one method below, in the order it runs:

    plan      schedule.plan(t) -> StepPlan (side-effect free; the same question serves the
              overlap lookahead at the end of step t-1)
    round     take the round prestarted for this step, or start one; wait for it
              (prsgd_hvd.averaging: Averager -> PendingRound -> Round)
    check     the round's identity and layout (every rank in the same round), the initial
              fingerprint, then the non-finite policy (prsgd_hvd.nonfinite)
    write     average and step in one pass (prsgd_hvd.fused_sgd) or write the average back and
              run the optimizer's own update; or just the update on a local step
    report    counters, telemetry, and schedule.on_round(report)
    prestart  if step t+1 averages before its update, start its round now (prsgd_hvd.overlap)

``finalize()`` is the join protocol (ranks that finished keep answering the others' rounds) and
``average_now()`` one round outside the schedule. Everything here is per optimizer; the wrapper's
methods (prsgd_hvd.optimizer) only translate the user's calls.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import agreement, ops, ops_reference
from .averaging import Averager, PendingRound, Round, RoundId, RoundLayoutError
from .collectives import group_process_set
from .fused_sgd import FusedSgdStep
from .nonfinite import NonFinitePolicy
from .overlap import InFlight
from .round_contents import RoundContents
from .schedules import RoundReport, Schedule, StepPlan, WarmUp

# Names of this process's averagers, to tell apart optimizers of the same structure.
_names_in_use: Dict[str, int] = {}


def _hvd():
    import horovod.torch as hvd
    return hvd


def _validated_counters(local: Any) -> Tuple[int, int]:
    if not isinstance(local, dict):
        raise ValueError(f"DistributedLocalSGD: the state's 'local_sgd' entry must be a dict "
                         f"(from optimizer.state_dict()), got {type(local).__name__}")
    counters = []
    for key in ("local_step", "rounds"):
        if key not in local:
            raise ValueError(f"DistributedLocalSGD: the state's 'local_sgd' entry has no "
                             f"'{key}'; it does not come from a DistributedLocalSGD optimizer")
        v = local[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"DistributedLocalSGD: 'local_sgd.{key}' must be an int >= 0, got {v!r}")
        counters.append(v)
    if not isinstance(local.get("schedule") or {}, dict):
        raise ValueError("DistributedLocalSGD: 'local_sgd.schedule' must be a dict")
    return counters[0], counters[1]


class LocalSGD:
    """Counters, schedule, averagers and the step pipeline of one wrapped optimizer."""

    def __init__(self, opt: torch.optim.Optimizer, schedule: Schedule, *, warmup_steps: int,
                 process_set, fuse_step: bool, use_kernels: bool,
                 model: Optional[torch.nn.Module], average_state: bool, names: Dict[int, str],
                 overlap: bool, nonfinite: str, compression: Optional[str],
                 error_feedback: bool, options: Dict[str, Any]):
        self.opt = opt
        self.schedule = schedule            # the user's; warm-up wraps it
        self.warmup_steps = warmup_steps
        self.planner: Schedule = WarmUp(schedule, warmup_steps) if warmup_steps else schedule
        self.contents = RoundContents(opt, model, average_state)
        self.names = names
        self.kernels = ops if use_kernels else ops_reference  # fused=False: no compiled code
        self.fused_step = FusedSgdStep(opt) if fuse_step else None
        self.policy = NonFinitePolicy(nonfinite)
        self.compression, self.error_feedback = compression, error_feedback
        self.wants_overlap = overlap
        self.options = options              # what the ranks must agree on (agreement.py)
        self.inflight = InFlight()
        self._name: Optional[str] = None
        # Counters (in state_dict) and what stats() reports.
        self.local_step = 0
        self.rounds = 0
        self.averaged_step = 0  # local_step when this rank last took a plain average
        self.finalized = False
        self.divergence: Optional[float] = None
        self._fingerprint = 0               # of the initial parameters, sent in round 1
        # The clock schedules read: since the last scheduled round (or the first step).
        self._since: Optional[float] = None
        self._waited_since = 0.0
        self._last_round_t = 0
        self._bind(process_set)

    # ---- the world: process set, averagers, schedule ------------------------------------------
    def _bind(self, process_set) -> None:
        hvd = _hvd()
        self.process_set = process_set
        self.rank, self.size = process_set.rank(), process_set.size()
        # Model buffers (BatchNorm statistics) change in the forward pass of the averaging step
        # itself, after a prestarted round packed them: such rounds are not started early.
        self.overlap = self.wants_overlap and self.size > 1 and \
            not self.contents.buffers(self.contents.params())
        name = self._name or "prsgd_hvd.unnamed"  # named at the first round: _claim_name()
        args = dict(kernels=self.kernels, compression=self.compression,
                    error_feedback=self.error_feedback)
        self.averager = Averager(process_set, name, **args)
        self.collectives = self.averager.collectives
        # Averagers over groups of ranks, for schedules that average within groups too
        # (Hierarchical); the whole process set uses self.averager.
        self.group_averagers: Dict[int, Averager] = {}
        # Hierarchical's "host" groups: the ranks of a host, numbered consecutively (as
        # horovodrun -H a:2,b:2 numbers them); otherwise there is no such group to offer.
        consecutive = hvd.rank() == hvd.cross_rank() * hvd.local_size() + hvd.local_rank()
        everyone = process_set.size() == hvd.size()
        local_size = hvd.local_size() if everyone and consecutive else None
        self.planner.bind(self.rank, self.size,
                          lambda obj: self.collectives.allgather(obj, "schedule"), local_size)
        members = self.collectives.members
        for g in self.planner.group_sizes():
            group = group_process_set(members, g, members[self.rank])
            self.group_averagers[g] = Averager(group, f"{name}.g{g}", **args)

    def _claim_name(self) -> None:
        """Name this optimizer's collectives, at its first round.

        NOTE: [collective names] A round's collectives are named by what they average (the
        parameters' names and shapes), so ranks meet in the right one whatever else they
        built before. Optimizers of the very same structure in one process (a GAN's twin
        networks) need one more distinction, and it must not be the order of construction,
        which may differ between ranks: it is the order of their first rounds, which follows
        the training loop's order of ``step()`` calls -- the same code on every rank."""
        if self._name is not None:
            return
        desc = agreement.describe_tensors(self.contents.params(), self.names, "param")
        base = f"prsgd_hvd.{agreement.small_checksum(repr(desc).encode()):07x}"
        k = _names_in_use.get(base, 0)
        _names_in_use[base] = k + 1
        self._name = base if k == 0 else f"{base}.{k}"
        self.averager.rename(self._name)
        for g, averager in self.group_averagers.items():
            averager.rename(f"{self._name}.g{g}")

    def rebind(self) -> None:
        """After an elastic reset (Horovod re-initialised with another set of workers): the
        new rank and size, fresh averagers, and the schedule re-derives what depends on N or
        says why it cannot (prsgd_hvd.elastic)."""
        if self.group_averagers:
            raise ValueError("DistributedLocalSGD: Hierarchical averaging cannot follow an "
                             "elastic resize (its groups are fixed process sets)")
        self.inflight.forget()  # died with the old Horovod
        self._bind(_hvd().global_process_set)

    def all_averagers(self) -> List[Averager]:
        return [self.averager, *self.group_averagers.values()]

    def averager_for(self, plan: StepPlan) -> Averager:
        return self.averager if plan.group is None else self.group_averagers[plan.group]

    # ---- cross-rank agreement -----------------------------------------------------------------
    def description(self) -> Dict[str, Any]:
        """Everything the ranks must agree on (NOTE in prsgd_hvd.agreement)."""
        params = self.contents.params()
        return {**self.options,
                "schedule": self.planner.describe(),
                "process set": list(self.collectives.members),
                "parameters": agreement.describe_tensors(params, self.names, "parameter"),
                "model buffers": agreement.describe_tensors(self.contents.buffers(params), {},
                                                            "buffer"),
                "param groups": [len(g["params"]) for g in self.opt.param_groups]}

    def check_ranks_agree(self) -> None:
        agreement.check_ranks_agree(self.description(), self.process_set)

    # ---- counters -----------------------------------------------------------------------------
    def local_state(self) -> Dict[str, Any]:
        return {"local_step": self.local_step, "rounds": self.rounds,
                "warmup_steps": self.warmup_steps, "world_size": self.size,
                "schedule": self.schedule.state_dict()}

    def validate_local_state(self, local: Any) -> Tuple[int, int]:
        """Check a saved ``local_state()`` whole, changing nothing; returns its counters."""
        counters = _validated_counters(local)
        trial = copy.deepcopy(self.schedule)  # a schedule that rejects the state raises here
        trial.load_state_dict(local.get("schedule") or {})
        return counters

    def load_local_state(self, local: Dict[str, Any]) -> None:
        """Apply a saved ``local_state()``: validated first, so a corrupted or foreign entry
        changes nothing."""
        self.local_step, self.rounds = self.validate_local_state(local)
        self.schedule.load_state_dict(local.get("schedule") or {})
        self._last_round_t = self.local_step
        self.averaged_step = self.local_step  # a resume starts from one (broadcast) model
        self.finalized = False

    # ---- the step pipeline --------------------------------------------------------------------
    def step(self, update: Callable[[], Any], skip_update: bool, fusable: bool = True) -> None:
        """Step t: ``update()`` is the optimizer's own update of this step (skipped when a
        GradScaler found inf/NaN: the step still counts and joins its rounds). ``fusable``:
        the update may be replaced by the fused average+SGD pass (no extra step arguments)."""
        if self.finalized:
            raise RuntimeError(
                "DistributedLocalSGD: step() after finalize(); finalize() ends local SGD on every "
                "rank (the others may have moved on, so a new round would wait for them forever). "
                "To use an averaged model in the middle of training, call average_now() on every "
                "rank instead.")
        t = self.local_step + 1
        plan = self._plan(t)
        if plan.lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = plan.lr
        if plan.average_before:
            self._scheduled_round(t, plan, update, skip_update, fusable)
        elif not skip_update:
            update()
        if plan.average_after:
            self._scheduled_round(t, plan, None, skip_update)
            self.averaged_step = t
        self.local_step = t
        self._prestart(t + 1)

    def _plan(self, t: int) -> StepPlan:
        now = time.perf_counter()
        if self._since is None:  # the first step: start the clock, fingerprint x^0
            self._since = now
            if self.local_step == 0 and self.rounds == 0 and self.size > 1:
                self._fingerprint = agreement.initial_fingerprint(self.contents.params())
        return self.planner.plan(t, now - self._since)

    def _scheduled_round(self, t: int, plan: StepPlan, update: Optional[Callable[[], Any]],
                         skip_update: bool, fusable: bool = False) -> None:
        """A round the schedule asked for; with ``update`` the update follows the average."""
        averager = self.averager_for(plan)
        waited = averager.wait_seconds
        rnd, excluded = self._round(RoundId("scheduled", self.rounds + 1), averager, t=t,
                                    weight=plan.weight, agree=plan.agree)
        skip_update = skip_update or excluded  # an excluded rank's gradient is not finite
        if update is not None and not skip_update and fusable and self.fused_step is not None \
                and self.fused_step.applies(rnd):
            self.divergence = self.fused_step(rnd)
        else:
            self._write_back(rnd)
            if update is not None and not skip_update:
                update()
        self.rounds += 1
        self._report(t, rnd, averager.wait_seconds - waited)

    def _round(self, identity: RoundId, averager: Averager, *, t: Optional[int] = None,
               weight: float = 1.0, active: bool = True, agree: bool = False,
               pending: Optional[PendingRound] = None) -> Tuple[Round, bool]:
        """Run one round (or finish ``pending``) and check it; returns it and whether this rank
        was left out of it (``nonfinite="exclude"``)."""
        self._claim_name()  # before the key: a retried first round must find its own key
        key = (t, identity.kind, averager.name, weight, agree)
        if pending is None:
            pending = self.inflight.take(key)
        if pending is None:
            pending = self._start(averager, identity, weight=weight, active=active, agree=agree)
        self.inflight.hold(pending, key)  # an interrupted wait resumes from here
        try:
            rnd = pending.wait()
        except BaseException as exc:
            if pending.failed:  # over; only an interrupted wait stays held, to be resumed
                self.inflight.release()
            if isinstance(exc, RoundLayoutError):
                raise agreement.explain_layout_mismatch(self.description(), averager.process_set,
                                                        str(exc)) from exc
            raise
        self.inflight.release()
        rnd.check_identity()
        if identity.number == 1:
            agreement.check_fingerprints(rnd.fingerprints(), rnd.members)
        where = (f"averaging round {identity.number} (after {self.local_step} local steps on "
                 f"rank {_hvd().rank()})")

        def rerun(contribute: bool) -> Round:
            return averager.start(rnd.layout.tensors, identity, weight=weight, active=active,
                                  contribute=contribute, agree=agree).wait()

        return self.policy.settle(rnd, averager.collectives, where, self.compression, rerun,
                                  self.opt)

    def _start(self, averager: Averager, identity: RoundId, **kwargs) -> PendingRound:
        self._claim_name()
        tensors, _ = self.contents.tensors(self.collectives)
        fingerprint = self._fingerprint if identity.number == 1 else 0
        return averager.start(tensors, identity, fingerprint=fingerprint, **kwargs)

    def _write_back(self, rnd: Round) -> None:
        """Average into every tensor; records this rank's divergence from the average."""
        n_params = len(self.contents.params())
        self.divergence = rnd.write_back(self.kernels, measured=n_params)

    def _report(self, t: int, rnd: Round, waited: float, kind: str = "scheduled") -> None:
        """Tell the schedule about its round, and restart its clock."""
        now = time.perf_counter()
        since = self._since if self._since is not None else now
        total_waited = sum(a.wait_seconds for a in self.all_averagers())
        report = RoundReport(
            t=t, kind=kind, steps=t - self._last_round_t,
            compute_seconds=max(0.0, (now - since) - (total_waited - self._waited_since)),
            waited_seconds=waited, divergence=self.divergence, agree=rnd.agree)
        self.planner.on_round(report)
        if kind != "join":
            self._since, self._waited_since, self._last_round_t = now, total_waited, t

    def _prestart(self, t: int) -> None:
        """Start step ``t``'s round now if it averages before its update (NOTE: [overlap])."""
        if not self.overlap or self.inflight.pending is not None:
            return
        try:
            plan = self.planner.plan(t, time.perf_counter() - (self._since or time.perf_counter()))
        except Exception:  # noqa: BLE001 - step t asks again and raises where the user sees it
            return
        if not plan.average_before:
            return
        averager = self.averager_for(plan)
        identity = RoundId("scheduled", self.rounds + 1)
        pending = self._start(averager, identity, weight=plan.weight, agree=plan.agree)
        self.inflight.hold(pending, (t, identity.kind, averager.name, plan.weight, plan.agree))

    # ---- rounds outside the schedule ----------------------------------------------------------
    def average_now(self) -> None:
        self._refuse_if_finalized("average_now()")
        self.inflight.cancel()  # a prestarted round is dropped on every rank alike
        rnd, _ = self._round(RoundId("average_now", self.rounds + 1), self.averager)
        self._write_back(rnd)
        self.rounds += 1
        self.averaged_step = self.local_step
        self._prestart(self.local_step + 1)

    def discard_in_flight(self) -> None:
        self.inflight.cancel()

    def abandon_in_flight(self) -> None:
        """Before an elastic restore: a collective failed, so the world the held round was
        started in is gone; drop the round without waiting for it."""
        self.inflight.forget()

    def finalize(self) -> None:
        """Join protocol: keep contributing this rank's model to the rounds of ranks that are
        still training, until a round in which no rank is (NOTE: [control records])."""
        if self.finalized:
            return
        pending = self.inflight.release()
        if pending is not None:
            # Prestarted for a step this rank will not take; the other ranks may take it, so
            # join it like any of their rounds.
            self._join(pending.averager, pending=pending, identity=pending.identity)
        if self.planner.group_sizes():
            # A prestarted round belonged to the next step: the walk starts after it.
            self._join_following_the_plan(self.local_step + (2 if pending else 1))
        else:
            while self._join(self.averager).active_ranks:
                pass
        self.finalized = True

    def _join(self, averager: Averager, pending: Optional[PendingRound] = None,
              identity: Optional[RoundId] = None, t: Optional[int] = None) -> Round:
        identity = identity or RoundId("join", self.rounds + 1)
        rnd, _ = self._round(identity, averager, active=False, pending=pending, t=t)
        self._write_back(rnd)
        self.rounds += 1
        if rnd.agree:  # a training rank's schedule agrees after this round: answer it
            self.planner.on_round(RoundReport(t=self.local_step, kind="join", agree=True))
        return rnd

    def _join_following_the_plan(self, t: int) -> None:
        """Schedules with group rounds (Hierarchical): rounds are a function of the step, the
        same on every rank, so a finished rank walks the steps it no longer takes (from ``t``)
        and answers each round -- its group's and the global ones -- until a global round
        finds no rank still training."""
        while True:
            plan = self.planner.plan(t)
            t += 1
            if not plan.averages:
                continue
            rnd = self._join(self.averager_for(plan))
            if plan.group is None and rnd.active_ranks == 0:
                return

    def _refuse_if_finalized(self, what: str) -> None:
        if self.finalized:
            raise RuntimeError(f"DistributedLocalSGD: {what} after finalize(); finalize() ends "
                               f"local SGD on every rank")

    # ---- telemetry ----------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        avs = self.all_averagers()
        return {
            "local_step": self.local_step,
            "rounds": self.rounds,
            "bytes_sent": sum(a.bytes_sent for a in avs),
            "comm_seconds": sum(a.comm_seconds for a in avs),
            "exposed_comm_seconds": sum(a.wait_seconds for a in avs),
            # ||x_i - x_avg||^2 over the parameters at the last round, measured inside the
            # write-back pass: the quantity the paper's lemma bounds by 4 gamma^2 I^2 G^2.
            "divergence": self.divergence,
            "fused": self.fused_step is not None,
            "overlap": self.overlap,
            "compression": self.compression,
            "excluded": [dict(e) for e in self.policy.excluded],
            "schedule": repr(self.schedule),
            "world_size": self.size,
        }

