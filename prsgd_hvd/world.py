"""Where one optimizer's rounds happen: its process set, the averagers over it, their names.

A :class:`World` binds an optimizer to Horovod: this rank and the size of the process set, one
:class:`~prsgd_hvd.averaging.Averager` over the whole set and one per group a schedule averages
within (``Hierarchical``), the schedule bound to them (rank, size, an allgather, the ranks of
this host), and the name their collectives carry. After an elastic reset it binds again.

NOTE: [collective names] A round's collectives are named by what they average (the
parameters' names and shapes), so ranks meet in the right one whatever else they built
before. Optimizers of the very same structure in one process (a GAN's twin networks) need one
more distinction, and it must not be the order of construction, which may differ between
ranks: it is the order of their first rounds, which follows the training loop's order of
``step()`` calls -- the same code on every rank. So the name is claimed at the first round.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from .averaging import Averager
from .collectives import small_checksum
from .config import LocalSGDConfig
from .horovod_api import horovod
from .process_sets import group_process_set
from .schedules import Schedule, StepPlan
from .wire_formats import for_option as wire_format_for

# Names of this process's averagers, to tell apart optimizers of the same structure.
_names_in_use: Dict[str, int] = {}



def host_local_size(process_set) -> Optional[int]:
    """Hierarchical's "host" groups: the ranks of a host, numbered consecutively (as
    horovodrun -H a:2,b:2 numbers them) in a process set of every rank; otherwise None."""
    hvd = horovod()
    consecutive = hvd.rank() == hvd.cross_rank() * hvd.local_size() + hvd.local_rank()
    everyone = process_set.size() == hvd.size()
    return hvd.local_size() if everyone and consecutive else None


class World:
    def __init__(self, process_set, planner: Schedule, config: LocalSGDConfig,
                 describe_params: Callable[[], list], keep_anchor: bool = False):
        self.planner, self.config = planner, config
        self.describe_params = describe_params  # for the name: what the rounds average
        self.keep_anchor = keep_anchor          # an update rule reads the anchor
        self.name: Optional[str] = None         # claimed at the first round (NOTE above)
        self.bind(process_set)

    def _averager(self, process_set, name: str) -> Averager:
        # A wire format keeps per-bucket state: one per averager.
        return Averager(process_set, name, kernels=self.config.kernels,
                        wire=wire_format_for(self.config.compression, self.config.error_feedback),
                        keep_anchor=self.keep_anchor)

    def bind(self, process_set) -> None:
        self.process_set = process_set
        self.rank, self.size = process_set.rank(), process_set.size()
        name = self.name or "prsgd_hvd.unnamed"
        self.averager = self._averager(process_set, name)
        self.collectives = self.averager.collectives
        self.planner.bind(self.rank, self.size,
                          lambda obj: self.collectives.allgather(obj, "schedule"),
                          host_local_size(process_set))
        # fragments=F (prsgd_hvd.streaming): fragment p's rounds on their own averager over
        # the whole set -- its own layout, anchor and wire state, and its own names, so the
        # rounds of several fragments may be in flight at once. Fragment 0 uses self.averager.
        self.fragment_averagers: List[Averager] = [self.averager] + [
            self._averager(process_set, f"{name}.f{p}")
            for p in range(1, self.config.fragments)]
        # Averagers over groups of ranks, for schedules that average within groups too; the
        # whole process set uses self.averager.
        self.group_averagers: Dict[int, Averager] = {}
        members = self.collectives.members
        for g in self.planner.group_sizes():
            group = group_process_set(members, g, members[self.rank])
            self.group_averagers[g] = self._averager(group, f"{name}.g{g}")

    def rebind(self) -> None:
        """After an elastic reset: Horovod's new world, fresh averagers; the schedule
        re-derives what depends on N or says why it cannot."""
        if self.group_averagers:
            raise ValueError("DistributedLocalSGD: Hierarchical averaging cannot follow an "
                             "elastic resize (its groups are fixed process sets)")
        self.bind(horovod().global_process_set)

    def claim_name(self) -> None:
        """Name this optimizer's collectives (NOTE: [collective names]); once."""
        if self.name is not None:
            return
        base = f"prsgd_hvd.{small_checksum(repr(self.describe_params()).encode()):07x}"
        k = _names_in_use.get(base, 0)
        _names_in_use[base] = k + 1
        self.name = base if k == 0 else f"{base}.{k}"
        self.averager.rename(self.name)
        for p, averager in enumerate(self.fragment_averagers[1:], start=1):
            averager.rename(f"{self.name}.f{p}")
        for g, averager in self.group_averagers.items():
            averager.rename(f"{self.name}.g{g}")

    @staticmethod
    def global_rank() -> int:
        return horovod().rank()

    @property
    def whole_set_averagers(self) -> List[Averager]:
        """The averagers whose rounds are over the whole process set (one per fragment)."""
        return self.fragment_averagers

    @property
    def averagers(self) -> List[Averager]:
        return [*self.fragment_averagers, *self.group_averagers.values()]

    def averager_for(self, plan: StepPlan) -> Averager:
        return self.averager if plan.group is None else self.group_averagers[plan.group]

    def total(self, counter: str) -> float:
        """A telemetry counter summed over every averager (``bytes_sent``, ...)."""
        return sum(getattr(a, counter) for a in self.averagers)
