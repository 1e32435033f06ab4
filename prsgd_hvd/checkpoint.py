"""The ``"local_sgd"`` entry of ``optimizer.state_dict()``: counters and the schedule's position.

Validated whole before anything is applied, so a corrupted or foreign entry changes nothing.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, Tuple

from .checks import int_at_least
from .schedules import Schedule

if TYPE_CHECKING:  # pragma: no cover
    from .local_sgd import LocalSGD


def local_state(local_step: int, rounds: int, warmup_steps: int, world_size: int,
                schedule: Schedule) -> Dict[str, Any]:
    return {"local_step": local_step, "rounds": rounds, "warmup_steps": warmup_steps,
            "world_size": world_size, "schedule": schedule.state_dict()}


def validated_counters(local: Any, schedule: Schedule) -> Tuple[int, int]:
    """Check a saved :func:`local_state` whole, changing nothing; returns its counters."""
    if not isinstance(local, dict):
        raise ValueError(f"DistributedLocalSGD: the state's 'local_sgd' entry must be a dict "
                         f"(from optimizer.state_dict()), got {type(local).__name__}")
    counters = []
    for key in ("local_step", "rounds"):
        if key not in local:
            raise ValueError(f"DistributedLocalSGD: the state's 'local_sgd' entry has no "
                             f"'{key}'; it does not come from a DistributedLocalSGD optimizer")
        counters.append(int_at_least(local[key], 0, f"DistributedLocalSGD: 'local_sgd.{key}'"))
    if not isinstance(local.get("schedule") or {}, dict):
        raise ValueError("DistributedLocalSGD: 'local_sgd.schedule' must be a dict")
    trial = copy.deepcopy(schedule)  # a schedule that rejects the state raises here
    trial.load_state_dict(local.get("schedule") or {})
    return counters[0], counters[1]


def validate_outer(local: Dict[str, Any], outer) -> None:
    """A checkpoint with an outer optimizer's state loads only into a job with ``outer=`` and
    the reverse (``outer``: the job's prsgd_hvd.outer.OuterOptimizer or None); changes nothing."""
    saved = local.get("outer")
    if outer is None and saved is not None:
        raise ValueError("DistributedLocalSGD: this checkpoint carries an outer optimizer's state "
                         "('local_sgd.outer': theta0 and its optimizer), but this optimizer was "
                         "wrapped without outer=; wrap it with the outer= of the job that saved it")
    if outer is not None and saved is None:
        raise ValueError("DistributedLocalSGD: this job has an outer optimizer (outer=), but the "
                         "checkpoint has no outer state ('local_sgd.outer'): it was saved without "
                         "outer=. Resume it without outer=, or start the outer optimizer afresh "
                         "by loading the checkpoint with its 'local_sgd' entry removed")
    if outer is not None:
        outer.validate_state(saved)


class CheckpointEntry:
    """One optimizer's ``"local_sgd"`` entry: what it saves, checks and applies. The engine's
    counters, theta0 and the outer state (prsgd_hvd.outer), the rounds in flight
    (prsgd_hvd.streaming_checkpoint)."""

    def __init__(self, engine: "LocalSGD"):
        self.e = engine

    def local_state(self) -> Dict[str, Any]:
        e = self.e
        # Rounds in flight settle first (they are counted then): the counters below include them.
        in_flight = e.streaming.local_state() if e.streaming is not None else None
        local = local_state(e.local_step, e.rounds, e.config.warmup_steps, e.size, e.schedule)
        if e.outer is not None:  # theta0 and the outer optimizer's state
            local["outer"] = e.outer.state_dict()
        if in_flight is not None:  # rounds in flight, settled: their corrections
            local["in_flight"] = in_flight
        return local

    def validate(self, local: Any) -> Tuple[int, int]:
        """Check a saved entry whole, changing nothing; returns its counters."""
        e = self.e
        counters = validated_counters(local, e.schedule)
        validate_outer(local, e.outer)
        if e.streaming is not None:
            e.streaming.validate_state(local.get("in_flight", []), counters[0])
        elif local.get("in_flight"):
            raise ValueError("DistributedLocalSGD: this checkpoint has rounds in flight "
                             "('local_sgd.in_flight': it was saved with delay= or fragments=), "
                             "but this optimizer does not stream; wrap it with the delay= and "
                             "fragments= of the job that saved it")
        return counters

    def load(self, local: Dict[str, Any]) -> None:
        """Apply a saved entry, validated first (all or nothing)."""
        e = self.e
        e.local_step, e.rounds = self.validate(local)
        e.schedule.load_state_dict(local.get("schedule") or {})
        e.clock.restart_at(e.local_step)
        if e.outer is not None:
            e.outer.load_state(local["outer"])
            for averager in e.world.averagers:  # the deltas' origin is the loaded theta0 now:
                averager.anchor.reset()          # the next round goes in full precision and
                averager.wire.reset()            # sets it
        if e.streaming is not None:
            e.streaming.load_state(local.get("in_flight", []))
        e.averaged_step = e.local_step  # a resume starts from one (broadcast) model
        e.finalized = False
