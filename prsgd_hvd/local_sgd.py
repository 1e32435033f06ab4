"""The engine behind ``DistributedLocalSGD``: one optimizer's local SGD, step by step.

``LocalSGD.step()`` is a pipeline; its stages, in the order they run:

    plan      schedule.plan(t, elapsed) -> StepPlan (side-effect free; the same question
              serves the overlap lookahead at the end of step t-1)
    round     take the round prestarted for this step, or start one; wait for it
              (prsgd_hvd.round_stage; prsgd_hvd.averaging: Averager -> PendingRound -> Round,
              in the averager's wire format, prsgd_hvd.wire_formats)
    check     the round's identity and layout (every rank in the same round), the initial
              fingerprint, then the non-finite policy (prsgd_hvd.round_stage, .nonfinite)
    write     the round's update rule (prsgd_hvd.update_rules): the fused average+SGD pass,
              or the plain average followed by the optimizer's own update
    report    counters, and schedule.on_round(report) (the clock: prsgd_hvd.clock)
    prestart  if step t+1 averages before its update, start its round now (prsgd_hvd.overlap)

Its collaborators each hold one job: the frozen configuration (prsgd_hvd.config), the world --
process set, averagers, names -- (prsgd_hvd.world), the round and check stages with the round in
flight (prsgd_hvd.round_stage, .overlap), the write stage (prsgd_hvd.update_rules), the
schedule's clock (prsgd_hvd.clock), the join protocol of ``finalize()`` (prsgd_hvd.join), the
checkpoint entry (prsgd_hvd.checkpoint) and stats (prsgd_hvd.telemetry). The wrapper's methods
(prsgd_hvd.optimizer) only translate the user's calls.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import agreement, checkpoint, fused_outer, telemetry
from .averaging import Averager, PendingRound, Round, RoundId
from .clock import ScheduleClock
from .config import LocalSGDConfig
from .fused_sgd import FusedAverageSgd
from .join import JoinProtocol
from .nonfinite import NonFinitePolicy
from .outer import OuterOptimizer
from .overlap import Prestarts
from .round_contents import RoundContents
from .round_stage import RoundStage
from .schedules import StepPlan
from .streaming import Streaming
from .update_rules import PlainAverage, WriteStage
from .world import World
from .wrapper_state import WrapperState


class LocalSGD:
    """Counters and the step pipeline of one wrapped optimizer."""

    def __init__(self, opt: torch.optim.Optimizer, config: LocalSGDConfig, process_set):
        self.opt, self.config = opt, config
        self.schedule = config.schedule    # the user's; the planner puts warm-up in front
        self.planner = config.planner()
        self.contents = RoundContents(opt, config.model, config.average_state)
        # outer=F: theta0 and the outer optimizer (prsgd_hvd.outer), built and checked here,
        # before the wrapper changes anything. Its rounds over the whole set are the outer
        # rules' (fused for torch.optim.SGD: prsgd_hvd.fused_outer), the others' the usual.
        self.outer = OuterOptimizer(config.outer, self.contents.params(), config.outer_device) \
            if config.outer is not None else None
        fused = FusedAverageSgd(opt) if config.fuse_step else None
        outer_rules = fused_outer.outer_rules(
            self.outer, config.kernels, lambda: [a.anchor for a in self.world.whole_set_averagers],
            config.use_kernels and not config.streaming, fused) if self.outer is not None else None
        self.write_stage = WriteStage(PlainAverage(config.kernels), fused, outer=outer_rules)
        self.policy = NonFinitePolicy(config.nonfinite)
        self.clock = ScheduleClock()
        self.world = World(process_set, self.planner, config, self._describe_params,
                           keep_anchor=self.write_stage.needs_anchor)
        self.round_stage = RoundStage(self.world, self.contents, self.policy, opt,
                                       self.description, lambda: self.local_step)
        self.inflight = self.round_stage.inflight
        self.wrapper = WrapperState(global_rank=self.world.global_rank())
        # delay=/fragments= (NOTE: [streaming]): rounds behind local steps; None: off.
        self.streaming = Streaming(self) if config.streaming else None
        self.prestarts = Prestarts(self)  # NOTE: [overlap]
        self.checkpoint = checkpoint.CheckpointEntry(self)  # the "local_sgd" entry
        # Counters (in state_dict) and what stats() reports.
        self.local_step = 0
        self.rounds = 0
        self.averaged_step = 0  # local_step when this rank last took a plain average
        self.finalized = False
        self.divergence: Optional[float] = None

    # ---- the world ----------------------------------------------------------------------------
    @property
    def overlap(self) -> bool:
        """Whether rounds start early (stats()["overlap"])."""
        return self.prestarts.on

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def collectives(self):
        return self.world.collectives

    def _describe_params(self):
        return agreement.describe_tensors(self.contents.params(), self.config.names, "param")

    def rebind(self) -> None:
        """After an elastic reset (prsgd_hvd.elastic): the held round died with the old
        Horovod; the world binds to the new one."""
        self.inflight.forget()
        if self.streaming is not None:
            self.streaming.forget()
        self.world.rebind()
        self.prestarts.decide()

    def check_ranks_agree(self) -> None:
        agreement.check_ranks_agree(self.description(), self.world.process_set)

    def description(self) -> Dict[str, Any]:
        """Everything the ranks must agree on (NOTE in prsgd_hvd.agreement)."""
        described = agreement.describe_optimizer(
            self.config.agreement(), self.planner.describe(), self.world.collectives.members,
            self.contents, self.config.names, self.opt)
        described["outer optimizer"] = self.outer.describe() if self.outer is not None else None
        return described

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
        if self.streaming is not None:
            self.streaming.step(t, plan, update, skip_update, fusable)
            self.local_step = t
            return
        if plan.average_before:
            self.scheduled_round(t, plan, update, skip_update, fusable)
        elif not skip_update:
            update()
        if plan.average_after:
            self.scheduled_round(t, plan, None, skip_update)
            self.averaged_step = t
        self.local_step = t
        self.prestarts.prestart(t + 1)

    def _plan(self, t: int) -> StepPlan:
        if not self.clock.started:  # the first step: fingerprint x^0 (checked in round 1)
            if self.local_step == 0 and self.rounds == 0 and self.size > 1:
                self.round_stage.fingerprint = agreement.initial_fingerprint(
                    self.contents.params())
        if self.outer is not None and not self.outer.started:
            self.outer.start()  # theta0 = x^0, the (broadcast) parameters before any update
        return self.planner.plan(t, self.clock.elapsed())

    def scheduled_round(self, t: int, plan: StepPlan, update: Optional[Callable[[], Any]],
                        skip_update: bool, fusable: bool = False,
                        averager: Optional[Averager] = None, report: bool = True) -> bool:
        """A round the schedule asked for, at once; with ``update`` the update follows the
        average (returns True: it was applied, fused or not, or skipped as it must be).
        ``report=False``: a fragment's round within an epoch, which the schedule does not hear
        of (NOTE: [fragment rounds])."""
        averager = averager or self.world.averager_for(plan)
        waited = averager.wait_seconds
        updates = update is not None and not skip_update
        rnd, excluded, updated = self.run_round(
            RoundId("scheduled", self.rounds + 1), averager, t=t, weight=plan.weight,
            agree=plan.agree, update_follows=updates and fusable, plan=plan)
        if updates and not excluded and not updated:  # an excluded rank's gradient is not finite
            update()
        if report:
            self.planner.on_round(self.clock.report(
                t, averager.wait_seconds - waited, self.world.total("wait_seconds"),
                self.divergence, rnd.agree))
        return update is not None

    def run_round(self, identity: RoundId, averager: Averager, *, t: Optional[int] = None,
                  weight: float = 1.0, active: bool = True, agree: bool = False,
                  pending: Optional[PendingRound] = None, update_follows: bool = False,
                  plan: Optional[StepPlan] = None,
                  drop: Optional[Callable[[Round], bool]] = None) -> Tuple[Round, bool, bool]:
        """One round through the stages round, check and write, counted; returns it, whether
        this rank was left out of it, and whether its update rule applied the update too.
        ``drop``: a completed round it holds for true is neither written nor counted."""
        tensors, n_params = None, lambda: len(self.contents.params())
        if self.streaming is not None and pending is None:  # a fragment's tensors
            tensors, n = self.streaming.frags.tensors_for(averager)
            n_params = lambda: n  # noqa: E731
        rnd, excluded = self.round_stage.run(identity, averager, t=t, weight=weight,
                                              active=active, agree=agree, pending=pending,
                                              tensors=tensors)
        if drop is not None and drop(rnd):  # not written, not counted: prsgd_hvd.join's
            return rnd, excluded, False     # NOTE: [the round after a prestart]
        updated = self._write_back(rnd, n_params, update_follows=update_follows and not excluded,
                                   plan=plan)
        self.rounds += 1
        return rnd, excluded, updated

    def _write_back(self, rnd: Round, n_params: Callable[[], int], update_follows: bool = False,
                    plan: Optional[StepPlan] = None) -> bool:
        """Stage 'write': the round's update rule writes every tensor (prsgd_hvd.update_rules)
        and records this rank's divergence; True when it applied this step's update too.
        ``n_params()``: how many of the round's first tensors are parameters."""
        self.divergence, updated = self.write_stage.write(
            rnd, n_params, update_follows=update_follows, plan=plan)
        return updated

    # ---- rounds outside the schedule ----------------------------------------------------------
    def average_now(self) -> None:
        self._refuse_if_finalized("average_now()")
        self.inflight.cancel()  # a prestarted round is dropped on every rank alike
        if self.streaming is not None:
            self.streaming.drain()  # the rounds in flight merge first (NOTE: [streaming])
        for averager in self.world.whole_set_averagers:  # every fragment
            self.run_round(RoundId("average_now", self.rounds + 1), averager)
        self.averaged_step = self.local_step
        self.prestarts.prestart(self.local_step + 1)

    def finalize(self) -> None:
        """Collective: the join protocol (prsgd_hvd.join), then local SGD is over."""
        if not self.finalized:
            JoinProtocol(self).run()
            self.finalized = True

    def settle_in_flight(self) -> None:
        """Before a broadcast of the optimizer state: the prestarted round is dropped, streamed
        rounds settle (the root's are part of the state it sends)."""
        self.inflight.cancel()
        if self.streaming is not None:
            self.streaming.settle_all()

    def discard_in_flight(self) -> None:
        self.inflight.cancel()
        if self.streaming is not None:
            self.streaming.discard()

    def abandon_in_flight(self) -> None:
        """Before an elastic restore: a collective failed, so the world the held round was
        started in is gone; drop the round without waiting for it."""
        self.inflight.forget()
        if self.streaming is not None:
            self.streaming.forget()

    def _refuse_if_finalized(self, what: str) -> None:
        if self.finalized:
            raise RuntimeError(f"DistributedLocalSGD: {what} after finalize(); finalize() ends "
                               f"local SGD on every rank")

    # ---- telemetry ----------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        return telemetry.stats(self)
