"""The frozen configuration of one ``DistributedLocalSGD`` optimizer.

Built once by the factory (prsgd_hvd.optimizer) from the validated arguments and read by the
engine and its collaborators; nothing changes it afterwards. :meth:`LocalSGDConfig.agreement`
is the one list of options the ranks must agree on (prsgd_hvd.agreement), so an option added
here is either in it or says why not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from . import ops, ops_reference
from .schedules import Schedule, WarmUp


@dataclass(frozen=True, eq=False)
class LocalSGDConfig:
    schedule: Schedule                       # the user's (its position is state, not config)
    warmup_steps: int = 0
    use_kernels: bool = True                 # fused != False and the extension is loaded
    fuse_step: bool = False                  # the fused average+SGD update rule applies
    model: Optional[torch.nn.Module] = None  # its floating-point buffers are averaged too
    average_state: bool = False
    names: Mapping[int, str] = field(default_factory=dict)  # id(param) -> name, for messages
    overlap: bool = True
    nonfinite: str = "raise"
    compression: Optional[str] = None        # resolve_compression: None, "fp16", "bf16", "int8"
    error_feedback: bool = True
    optimizer_name: str = ""
    outer: Optional[Callable] = None          # outer=F (prsgd_hvd.outer); agreed on by its
                                              # optimizer's description (LocalSGD.description)
    delay: int = 0                            # rounds merge this many steps later (streaming)
    fragments: int = 1                        # rounds of 1/F of the model, staggered (streaming)
    outer_device: Optional[torch.device] = None  # theta0 + outer state there (prsgd_hvd.outer_host);
                                              # not agreed on: where a rank keeps them changes
                                              # neither its values nor its collectives

    @property
    def streaming(self) -> bool:
        """Rounds run behind local steps (prsgd_hvd.streaming); off: today's pipeline as is."""
        return self.delay > 0 or self.fragments > 1

    @property
    def kernels(self):
        """prsgd_hvd.ops, or the pure-torch reference for fused=False (no compiled code)."""
        return ops if self.use_kernels else ops_reference

    def planner(self) -> Schedule:
        """The schedule the pipeline asks: the user's, behind the warm-up."""
        return WarmUp(self.schedule, self.warmup_steps) if self.warmup_steps else self.schedule

    def agreement(self) -> Dict[str, Any]:
        """Every option that shapes the sequence of collectives or what they carry. Only the
        kernels' choice (``fused``) may differ between ranks: it changes this rank's
        arithmetic path, not what it sends."""
        return {"warmup_steps": self.warmup_steps, "average_state": self.average_state,
                "model": self.model is not None, "overlap": self.overlap,
                "nonfinite": self.nonfinite, "compression": self.compression,
                "error_feedback": bool(self.error_feedback), "optimizer": self.optimizer_name,
                "delay": self.delay, "fragments": self.fragments}
