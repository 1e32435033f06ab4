"""Horovod process sets: the user's, resolved; a rank's own when it is outside; groups of ranks.

NOTE: [ranks outside the process set]
Horovod lets a rank that is not in ``process_set`` build the optimizer and train alone (its
hooks allreduce nothing). We do the same: such a rank averages over a process set of its own
(:class:`OwnRankOnly`, size 1, which sends nothing), so it never joins, and never blocks, the
members' rounds. Raising there instead would be an error on some ranks only, which hangs the
others in their first collective.
"""
from __future__ import annotations

from typing import List, Tuple

from .horovod_api import horovod, registered_sets

_PREFIX = "DistributedLocalSGD"



def registered_with_ranks(ranks: List[int]):
    """The registered Horovod ``ProcessSet`` of exactly ``ranks``, or None."""
    from horovod.common import process_sets as ps
    for set_id, set_ranks in registered_sets().items():
        if set_ranks == list(ranks):
            found = ps.ProcessSet(list(set_ranks))
            found.process_set_id = set_id
            return found
    return None


class OwnRankOnly:
    """The process set of a rank that is not in the user's ``process_set``: just itself.

    It has the methods of a Horovod ``ProcessSet`` that the averaging code reads; with size 1
    no round sends anything (NOTE: [ranks outside the process set])."""

    process_set_id = None

    def __init__(self, outside_of):
        self.outside_of = outside_of
        self.ranks = [horovod().rank()]

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def included(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"OwnRankOnly(rank {self.ranks[0]}, outside {self.outside_of})"


def resolve_process_set(process_set) -> Tuple[object, bool]:
    """``(process set to average over, is this rank a member)``, or a specific error.

    Accepts ``None`` (all ranks) and Horovod ``ProcessSet`` objects. One built from ranks but
    not registered (``hvd.ProcessSet([0, 1])`` never passed to ``hvd.init`` or
    ``hvd.add_process_set``) is resolved to the registered set with the same ranks, if any.
    """
    hvd = horovod()
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
            registered = registered_with_ranks(process_set.ranks)
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


def group_process_set(members: List[int], group_size: int, my_rank: int):
    """The Horovod process set of ``my_rank``'s group when ``members`` (global ranks, in
    order) are cut into consecutive groups of ``group_size``.

    Collective over ``members``: every member registers every group, in the same order. A
    set with the same ranks that already exists (``hvd.init(process_sets=[...])``) is reused;
    otherwise it is added, which Horovod allows only with HOROVOD_DYNAMIC_PROCESS_SETS=1.
    """
    from horovod.common import process_sets as ps

    mine = None
    for start in range(0, len(members), group_size):
        ranks = list(members[start:start + group_size])
        group = registered_with_ranks(ranks)
        if group is None:
            try:
                group = ps.add_process_set(ranks)
            except ValueError as exc:
                raise ValueError(
                    f"Hierarchical averaging needs a Horovod process set for ranks {ranks}: run "
                    f"with HOROVOD_DYNAMIC_PROCESS_SETS=1 so it can be created, or create the "
                    f"groups in hvd.init(process_sets=[...]) ({exc})") from exc
        if my_rank in ranks:
            mine = group
    return mine
