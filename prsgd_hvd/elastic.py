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
* ``sync()`` also runs the cross-rank agreement check, which the optimizer's constructor
  skips under the elastic launcher (a joining worker constructs while the others sync);
* on reset the optimizer re-binds to the new world: new rank and size, new averagers, and the
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

    def sync(self):
        import horovod.torch as hvd

        super().sync()
        ls = self.optimizer._local_sgd
        ls.load_local_state(hvd.broadcast_object(ls.local_state(), root_rank=0,
                                                 name="prsgd_hvd.elastic.local_state"))
        # Every worker, old and new, is here together: the place for the agreement check
        # that DistributedLocalSGD(...) skips under the elastic launcher.
        ls.check_ranks_agree()

    def reset(self):
        super().reset()
        self.optimizer._local_sgd.rebind()
