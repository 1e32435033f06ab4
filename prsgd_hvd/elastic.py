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
``TorchState`` (``install_state_handler`` below), so ``hvd.elastic.TorchState(model, opt)``
does the same. With a wrapped optimizer the state

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

from .broadcast import broadcast_optimizer_state
from .unaveraged import no_unaveraged_warning
from .wrapper_state import LocalSGDOptimizer

__all__ = ["LocalSGDState", "TorchState", "run"]


class LocalSGDState(TorchState):
    """``hvd.elastic.TorchState`` for an optimizer wrapped by ``DistributedLocalSGD``."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        if optimizer is None or not hasattr(optimizer, "_local_sgd"):
            raise TypeError("LocalSGDState: 'optimizer' must be wrapped by "
                            "DistributedLocalSGD (use hvd.elastic.TorchState otherwise)")
        super().__init__(model=model, optimizer=optimizer, **kwargs)


# ---- hvd.elastic.TorchState with a wrapped optimizer -----------------------------------------

def _optimizer_state_handler_class():
    from horovod.torch.elastic.state import StateHandler

    class LocalSGDOptimizerStateHandler(StateHandler):
        """What ``hvd.elastic.TorchState`` does with a wrapped optimizer (Horovod's
        ``OptimizerStateHandler`` plus the local-SGD counters, the agreement check and the
        re-binding to a new world)."""

        def __init__(self, optimizer):
            super().__init__(optimizer)
            self.save()

        def prepare_save(self):
            """Before any handler of the state saves (install_state_handler): the collective
            part of this optimizer's save -- streamed rounds in flight settle, which waits for
            them. If a peer died, it raises here, before the model's handler has saved, so a
            failed commit leaves the last commit whole (model, optimizer and objects alike)."""
            streaming = self.value._local_sgd.streaming
            if streaming is not None:
                streaming.settle_all()

        def save(self):
            import copy
            with no_unaveraged_warning():
                self._saved = copy.deepcopy(self.value.state_dict())

        def restore(self):
            # Horovod restores after a collective failed (HorovodInternalError): a round in
            # flight belongs to the broken world, and waiting for it would raise again here,
            # outside the elastic retry.
            self.value._local_sgd.abandon_in_flight()
            self.value.load_state_dict(self._saved)

        def sync(self):
            # Every worker, old and new, is here together: broadcast rank 0's state, counters
            # and schedule position, then the agreement check DistributedLocalSGD(...) skips
            # under the elastic launcher (a joining worker constructs while others sync).
            broadcast_optimizer_state(self.value, root_rank=0)
            self.value._local_sgd.check_ranks_agree()

        def on_reset(self):
            """Horovod was re-initialised with another set of workers: new rank and size."""
            self.value._local_sgd.rebind()

    return LocalSGDOptimizerStateHandler


def install_state_handler() -> None:
    """Register the handler with Horovod's ``TorchState``, make its ``save()`` call
    ``prepare_save`` of every handler that has one before any handler saves, and its
    ``reset()`` call ``on_reset`` (once, however often the package loads)."""
    from horovod.torch.elastic import state as hvd_state

    registry = hvd_state.get_handler_registry()
    if not any(t is LocalSGDOptimizer for t, _ in registry):
        # First match wins, and Horovod's optimizer handler matches every optimizer.
        hvd_state.set_handler_registry([(LocalSGDOptimizer, _optimizer_state_handler_class())]
                                       + list(registry))
    torch_state = hvd_state.TorchState
    if not getattr(torch_state.save, "_prsgd_prepares_handlers", False):
        previous_save = torch_state.save

        def save(self):
            # Collective work first (prepare_save), then Horovod's save of every handler: a
            # commit that fails does so before anything was overwritten.
            for handler in self._handlers.values():
                prepare = getattr(handler, "prepare_save", None)
                if prepare is not None:
                    prepare()
            previous_save(self)

        save._prsgd_prepares_handlers = True
        torch_state.save = save
    if not getattr(torch_state.reset, "_prsgd_resets_handlers", False):
        previous = torch_state.reset

        def reset(self):
            previous(self)
            for handler in self._handlers.values():
                on_reset = getattr(handler, "on_reset", None)
                if on_reset is not None:
                    on_reset()

        reset._prsgd_resets_handlers = True
        torch_state.reset = reset
