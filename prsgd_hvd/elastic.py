"""Elastic training (``hvd.elastic``) with DistributedLocalSGD.

    state = prsgd_hvd.elastic.LocalSGDState(model, opt, epoch=0)

    @hvd.elastic.run
    def train(state):
        for ...:
            ... opt.step() ...
            if opt.rounds > last_rounds:      # commit right after an averaging round, when
                state.commit()                # the models are (nearly) common
                last_rounds = opt.rounds

``LocalSGDState`` is Horovod's ``TorchState`` that insists on a wrapped optimizer. Both work:
importing prsgd_hvd registers a state handler for wrapped optimizers with Horovod's
``TorchState`` (prsgd_hvd.horovod_compat), so ``hvd.elastic.TorchState(model, opt)`` does the
same. With a wrapped optimizer the state

* saves and restores the optimizer's ``state_dict()``, which carries the local-SGD counters and
  schedule position;
* on ``sync()`` broadcasts rank 0's optimizer state, counters and schedule position, so a
  worker that joins follows the same averaging schedule (the model itself is broadcast from
  rank 0, so after a reset every worker restarts from a common model), then runs the
  cross-rank agreement check, which the optimizer's constructor skips under the elastic
  launcher (a joining worker constructs while the others sync);
* on reset re-binds the optimizer to the new world: new rank and size, new averagers, and the
  schedule re-derives what depends on N (``TimeVarying.paper``'s N, ``Heterogeneous.by_speed``
  recalibrates). ``Heterogeneous`` with explicit per-rank counts and ``Hierarchical`` cannot
  follow a resize and say so.
"""
from __future__ import annotations

# `import prsgd_hvd as hvd` makes this module `hvd.elastic`, where horovod.torch.elastic used
# to be: keep every name of it (run, TorchState, ...) so `@hvd.elastic.run` still works.
from horovod.torch.elastic import *  # noqa: F401,F403
from horovod.torch.elastic import TorchState, run  # noqa: F401

__all__ = ["LocalSGDState", "TorchState", "run"]


class LocalSGDState(TorchState):
    """``hvd.elastic.TorchState`` for an optimizer wrapped by ``DistributedLocalSGD``."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        if optimizer is None or not hasattr(optimizer, "_local_sgd"):
            raise TypeError("LocalSGDState: 'optimizer' must be wrapped by "
                            "DistributedLocalSGD (use hvd.elastic.TorchState otherwise)")
        super().__init__(model=model, optimizer=optimizer, **kwargs)
