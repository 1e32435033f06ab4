"""prsgd_hvd: Parallel Restarted SGD (local SGD with periodic model averaging) for Horovod.

``import prsgd_hvd as hvd`` gives everything ``horovod.torch`` exports plus
``DistributedLocalSGD`` and the schedules; importing the package also registers those names on
``horovod.torch``, so ``import horovod.torch as hvd; import prsgd_hvd`` works too.
"""
from horovod.torch import *  # noqa: F401,F403  (the drop-in promise: every horovod.torch name)
import horovod.torch as _horovod_torch

import importlib as _importlib

from . import ops  # noqa: F401
# `hvd.elastic` is horovod.torch.elastic's API plus LocalSGDState. The star import above bound
# the name to Horovod's module, so `from . import elastic` would return that: import ours.
elastic = _importlib.import_module(".elastic", __name__)
from .compression import Compression  # horovod's Compression plus bf16 (shadows horovod's name)
from .optimizer import DistributedLocalSGD
from .schedules import (Adaptive, FixedInterval, Heterogeneous, Hierarchical, RoundReport, Schedule,
                        StepPlan,
                        TimeVarying)

__version__ = "0.1.0"

# The names this package adds to horovod.torch.
_EXPORTS = {
    "DistributedLocalSGD": DistributedLocalSGD,
    "FixedInterval": FixedInterval,
    "TimeVarying": TimeVarying,
    "Heterogeneous": Heterogeneous,
    "Hierarchical": Hierarchical,
    "Adaptive": Adaptive,
}
for _name, _obj in _EXPORTS.items():
    setattr(_horovod_torch, _name, _obj)
del _name, _obj

# What a Horovod script reaches through horovod.torch behaves as ours too (and these names
# here shadow Horovod's from the star import): broadcast_optimizer_state carries the local-SGD
# counters, Compression has bf16, DistributedOptimizer refuses a wrapped optimizer,
# hvd.elastic.TorchState handles a wrapped optimizer and hvd.elastic.LocalSGDState exists.
from . import horovod_compat as _horovod_compat  # noqa: E402
from .horovod_compat import LocalSGDOptimizer  # noqa: E402,F401
globals().update(_horovod_compat.install_on_horovod())
