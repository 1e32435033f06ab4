"""Elastic training (``hvd.elastic``) with DistributedLocalSGD.

    state = prsgd_hvd.elastic.LocalSGDState(model, opt, epoch=0)

    @hvd.elastic.run
    def train(state):
        for ...:
            ... opt.step() ...
            if opt.rounds > last_rounds:      # commit right after an averaging round, when
                state.commit()                # the models are (nearly) common
                last_rounds = opt.rounds

``LocalSGDState`` is Horovod's ``TorchState`` (it saves and restores the model and the
optimizer, whose ``state_dict()`` carries the local-SGD counters and schedule position) plus:

* ``sync()`` also sends rank 0's counters and schedule position to every rank, so a worker
  that joins follows the same averaging schedule (Horovod's optimizer sync sends only the
  state tensors); the model itself is broadcast from rank 0, so after a reset every worker
  restarts from a common model;
* on reset the optimizer re-binds to the new world: new rank and size, new averagers, and the
  schedule re-derives what depends on N (``TimeVarying.paper``'s N, ``Heterogeneous.by_speed``
  recalibrates). ``Heterogeneous`` with explicit per-rank counts and ``Hierarchical`` cannot
  follow a resize and say so.
"""
from __future__ import annotations

from horovod.torch.elastic import TorchState

__all__ = ["LocalSGDState"]


class LocalSGDState(TorchState):
    """``hvd.elastic.TorchState`` for an optimizer wrapped by ``DistributedLocalSGD``."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        if optimizer is None or not hasattr(optimizer, "_local_sgd"):
            raise TypeError("LocalSGDState: 'optimizer' must be wrapped by "
                            "DistributedLocalSGD (use hvd.elastic.TorchState otherwise)")
        super().__init__(model=model, optimizer=optimizer, **kwargs)

    def sync(self):
        import horovod.torch as hvd

        super().sync()
        ls = self.optimizer._local_sgd
        ls.load_local_state(hvd.broadcast_object(ls.local_state(), root_rank=0,
                                                 name="prsgd_hvd.elastic.local_state"))

    def reset(self):
        super().reset()
        self.optimizer._local_sgd.rebind()
