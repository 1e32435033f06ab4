"""What ``delay=`` and ``fragments=`` (NOTE: [streaming] in prsgd_hvd.streaming) can stream,
checked at construction: a bad combination raises here, naming the fix, before anything runs.
"""
from __future__ import annotations

from typing import List, Optional

from .checks import int_at_least
from .schedules import (Adaptive, FixedInterval, Heterogeneous, Hierarchical, Schedule,
                        TimeVarying)

_P = "DistributedLocalSGD"


def check_streaming(delay, fragments, schedule: Schedule, nonfinite: str, n_params: int) -> None:
    int_at_least(delay, 0, f"{_P}: 'delay'")
    int_at_least(fragments, 1, f"{_P}: 'fragments'")
    if delay == 0 and fragments == 1:
        return
    what = f"delay={delay}" if fragments == 1 else \
        (f"fragments={fragments}" if delay == 0 else f"delay={delay}, fragments={fragments}")
    if nonfinite == "exclude":
        raise ValueError(
            f"{_P}: nonfinite='exclude' cannot be combined with {what}: a rank left out of a "
            f"round takes the others' average instead of that step's update, but a streamed "
            f"round merges after local steps that already applied it. Use nonfinite='raise' "
            f"(the default) or 'ignore'")
    reason = _unstreamable(schedule)
    if reason is not None:
        raise ValueError(f"{_P}: {what} cannot be used with {schedule!r}: {reason}. Use delay=0 "
                         f"and fragments=1 with this schedule, or an interval (Algorithm 1)")
    if fragments > 1:
        lengths = _known_lengths(schedule)
        if lengths is None:
            raise ValueError(
                f"{_P}: fragments={fragments} needs an interval (Algorithm 1) or epochs "
                f"(TimeVarying, Heterogeneous with fixed intervals): each fragment is averaged "
                f"once per interval or epoch, the rounds K/F steps apart; {schedule!r} has "
                f"neither. Use fragments=1 (delay= works with it)")
        bad = [k for k in lengths if k % fragments]
        if bad:
            what_len = ("interval" if isinstance(schedule, FixedInterval) else
                        "intervals" if isinstance(schedule, Heterogeneous) else "epoch_lengths")
            raise ValueError(
                f"{_P}: fragments={fragments} must divide {what_len}="
                f"{lengths[0] if len(lengths) == 1 else list(lengths)} (the fragments' rounds "
                f"are K/F steps apart, and {bad[0]} is not a multiple of {fragments}); e.g. "
                f"{what_len} that are multiples of {fragments}, or fragments that divide "
                f"{'it' if len(lengths) == 1 else 'each'}")
        if fragments > n_params:
            raise ValueError(
                f"{_P}: fragments={fragments} but the optimizer has only {n_params} parameter "
                f"tensors; a fragment is made of whole tensors. Use fragments <= {n_params}")
    gap = _shortest_gap(schedule, fragments)
    if delay and gap is not None and delay >= gap:
        raise ValueError(
            f"{_P}: delay={delay} must be smaller than the number of steps between two rounds "
            f"of the same {'fragment' if fragments > 1 else 'model'} ({gap} with {schedule!r}); "
            f"a round merges before the next one of its kind starts. Use delay <= {gap - 1}")


def _known_lengths(schedule: Schedule) -> Optional[List[int]]:
    """The steps between two rounds of the whole model where fragments can spread theirs:
    the interval, each rank's interval, or the epoch lengths given up front (a callable's
    are checked as each epoch starts: prsgd_hvd.fragments). None: no such steps."""
    if isinstance(schedule, FixedInterval):
        return [schedule.interval]
    if isinstance(schedule, Heterogeneous) and schedule.mode == "fixed":
        return list(schedule.intervals)
    if isinstance(schedule, TimeVarying):
        spec = schedule.epoch_lengths.spec
        return [] if callable(spec) else list(spec)
    return None


def _unstreamable(schedule: Schedule) -> Optional[str]:
    if isinstance(schedule, Hierarchical):
        return ("its group rounds and whole-set rounds interleave on different process sets; "
                "streaming them is not supported")
    if isinstance(schedule, Adaptive):
        return ("it picks the next interval from the divergence measured at each round, which a "
                "delayed round only measures when it merges")
    if isinstance(schedule, Heterogeneous) and schedule.mode != "fixed":
        return ("its epochs are timed from the end of each round on every rank (by_speed, "
                "every_seconds), and a streamed round ends at no common moment")
    return None


def _shortest_gap(schedule: Schedule, fragments: int) -> Optional[int]:
    """The fewest steps between two rounds of one averager, where the schedule says it up
    front (a callable's epoch lengths are checked when the rounds start)."""
    if isinstance(schedule, FixedInterval):
        return schedule.interval
    if isinstance(schedule, Heterogeneous):
        return min(schedule.intervals) if schedule.intervals else None
    if isinstance(schedule, TimeVarying) and not callable(schedule.epoch_lengths.spec):
        return min(schedule.epoch_lengths.spec)
    return None
