"""The wrapper's identity and what its methods remember between calls.

``is_wrapped`` / ``LocalSGDOptimizer`` tell a wrapped optimizer from any other; what the
Horovod-compatible methods remember lives in the engine (``optimizer._local_sgd.wrapper``),
not as attributes on the user's optimizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Set

import torch


def is_wrapped(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_local_sgd")


class _WrappedOptimizerMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return is_wrapped(obj)


class LocalSGDOptimizer(metaclass=_WrappedOptimizerMeta):
    """``isinstance(opt, LocalSGDOptimizer)``: ``opt`` was wrapped by ``DistributedLocalSGD``.

    (The wrapper is a dynamic subclass of the user's optimizer class, so there is no common
    base class to test against; Horovod's elastic state registry dispatches on this.)"""


@dataclass
class WrapperState:
    global_rank: int                 # at construction: at exit Horovod may be shut down already
    synchronized: bool = False       # synchronize() was called since the last step()
    skip_sync_depth: int = 0         # inside `with opt.skip_synchronize():`
    warned: Set[str] = field(default_factory=set)  # occasions of the unaveraged-steps warning
