"""``hvd.broadcast_optimizer_state`` that also carries what ``DistributedLocalSGD`` adds.

Installed on ``horovod.torch`` when the package is imported (prsgd_hvd.horovod_compat), so a
Horovod script's standard resume -- rank 0 loads a checkpoint, then broadcasts -- carries the
local-SGD counters and the schedule's position too.
"""
from __future__ import annotations

import torch

from .horovod_api import horovod
from .unaveraged import no_unaveraged_warning
from .wrapper_state import is_wrapped



def broadcast_optimizer_state(optimizer, root_rank: int, model=None) -> None:
    """``hvd.broadcast_optimizer_state`` that also carries what ``DistributedLocalSGD`` adds.

    Horovod's function broadcasts the optimizer's state tensors and options; for a wrapped
    optimizer the local-SGD counters (``local_step``, ``rounds``) and the schedule's position
    are sent from ``root_rank`` too. Without them, the standard resume (rank 0 loads a
    checkpoint, then broadcasts) leaves the other ranks at step 0, and the ranks average at
    different steps. Collective over all ranks, like Horovod's; one small extra allreduce
    checks that every rank passes a wrapped optimizer, or none does.

    NOTE: [broadcasting state leaves the parameters alone]
    Horovod initialises an empty optimizer state by stepping the base optimizer on zero
    gradients, which moves the parameters wherever weight decay is on -- on the ranks whose
    state was empty, i.e. all but rank 0 in the standard resume, right after
    ``broadcast_parameters`` made them equal. For a wrapped optimizer the parameters are put
    back: after the resume every rank holds exactly rank 0's model.
    """
    hvd = horovod()
    from horovod.torch.functions import broadcast_optimizer_state as horovod_broadcast

    wrapped = is_wrapped(optimizer)
    if hvd.size() > 1:
        count = int(hvd.allreduce(torch.tensor([int(wrapped)], dtype=torch.int32), op=hvd.Sum,
                                  name="prsgd_hvd.broadcast_optimizer_state.wrapped").item())
        if count not in (0, hvd.size()):
            raise ValueError(
                f"broadcast_optimizer_state: the optimizer is wrapped by DistributedLocalSGD on "
                f"{count} of {hvd.size()} ranks (rank {hvd.rank()}: "
                f"{'wrapped' if wrapped else 'not wrapped'}); wrap it on every rank, before "
                f"broadcasting its state")
    if not wrapped:
        horovod_broadcast(optimizer, root_rank, model=model)
        return
    ls = optimizer._local_sgd
    # A prestarted round was packed from parameters the broadcast is about to replace; streamed
    # rounds settle, and the root's travel with its state (NOTE: [streaming]).
    ls.settle_in_flight()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params] if not optimizer.state else None
    with no_unaveraged_warning():
        horovod_broadcast(optimizer, root_rank, model=model)
        local = ls.checkpoint.local_state() if hvd.rank() == root_rank else None
    if kept is not None:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
    local = hvd.broadcast_object(local, root_rank=root_rank,
                                 name="prsgd_hvd.broadcast_optimizer_state.local_sgd")
    ls.checkpoint.load(local)


def _bits(tensor):
    """A bf16 tensor as the int16 view of its storage (what a broadcast copies); others as is."""
    if torch.is_tensor(tensor) and tensor.dtype == torch.bfloat16:
        return tensor.detach().view(torch.int16)
    return tensor


def broadcast_parameters(params, root_rank: int) -> None:
    """``hvd.broadcast_parameters`` that also takes bf16 tensors.

    Horovod 0.28's collectives have no bf16 type ("Tensor type torch.BFloat16Tensor is not
    supported"), so the usual first lines of a Horovod script fail on a model with bf16
    parameters. A broadcast copies bits, so bf16 tensors travel as their int16 view, in place;
    everything else, the arguments and the errors are Horovod's. Installed on ``horovod.torch``
    and ``horovod.torch.functions`` (whose ``broadcast_optimizer_state`` broadcasts the state
    through it) when the package is imported."""
    from horovod.torch.functions import _horovod_broadcast_parameters
    if isinstance(params, dict):
        params = {name: _bits(p) for name, p in params.items()}
    elif isinstance(params, list):
        params = [(p[0], _bits(p[1])) if isinstance(p, tuple) else _bits(p) for p in params]
    _horovod_broadcast_parameters(params, root_rank)
