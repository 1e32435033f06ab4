"""A streamed round between its start and its merge (NOTE: [streaming] in prsgd_hvd.streaming)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .averaging import Averager, PendingRound, RoundId
from .schedules import StepPlan


@dataclass
class DelayedRound:
    """A round started at step ``t`` that merges before the update of step ``merge_at``."""

    fragment: int
    averager: Averager
    identity: RoundId
    t: int
    merge_at: int
    plan: StepPlan
    n_params: int
    pending: Optional[PendingRound]             # None once settled
    # From a checkpoint: the correction per tensor key (prsgd_hvd.streaming_checkpoint), not in sent buffers.
    saved: Optional[Dict[Tuple, torch.Tensor]] = field(default=None, repr=False)

    @property
    def settled(self) -> bool:
        return self.pending is None
