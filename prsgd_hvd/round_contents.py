"""What an averaging round carries: the parameters, then model buffers and optimizer state.

Parameters come first, param group by param group, so the fused SGD step finds each group as one
contiguous run and the divergence is measured over the parameters only.

NOTE: [state layout]
With ``average_state=True`` the momentum buffers (and Adam moments, ...) are averaged too. State
appears lazily -- a parameter without a gradient on some rank has no momentum there yet -- and a
round whose tensors differ between ranks cannot be summed. So before such a round the ranks
compare the entries they hold with one 2-element allreduce (``agree_on_state_entries``); when
they differ they agree on the common ones, and the others stay local until every rank has them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .collectives import SetCollectives


class RoundContents:
    """The tensors one optimizer's rounds average, in a fixed order."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: Optional[torch.nn.Module],
                 average_state: bool):
        self.opt, self.model, self.average_state = optimizer, model, average_state

    def params(self) -> List[torch.Tensor]:
        """Every parameter once, in param-group order."""
        seen, out = set(), []
        for group in self.opt.param_groups:
            for p in group["params"]:
                # Integer/bool parameters cannot be trained: nothing to average
                # (horovod_compat.check_parameter_dtypes refuses the other non-float ones).
                if id(p) not in seen and p.is_floating_point():
                    seen.add(id(p))
                    out.append(p)
        return out

    def buffers(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.model is None:
            return []
        ids = {id(p) for p in params}
        return [b for b in self.model.buffers() if b.is_floating_point() and id(b) not in ids]

    def tensors(self, collectives: SetCollectives, params: Optional[List[torch.Tensor]] = None,
                buffers: bool = True) -> Tuple[List[torch.Tensor], int]:
        """(params + buffers + shared state, number of params). Collective only with
        ``average_state=True`` (see NOTE: [state layout]). ``params``: some of the parameters
        only (a fragment, prsgd_hvd.streaming), with the model buffers or without."""
        everything = self.params()
        params = everything if params is None else list(params)
        out = params + (self.buffers(everything) if buffers else [])
        if self.average_state:
            out += self.agree_on_state_entries(params, collectives)
        return out, len(params)

    def agree_on_state_entries(self, params: List[torch.Tensor],
                               collectives: SetCollectives) -> List[torch.Tensor]:
        """Collective: optimizer state shaped like its parameter, for the entries every rank has."""
        local = []
        for i, p in enumerate(params):
            st = self.opt.state.get(p, {})
            for key in sorted(st):
                v = st[key]
                if torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape:
                    local.append((i, key))
        if not collectives.same_everywhere(local, "state_layout"):
            common = set(local)
            for other in collectives.allgather(local, "state_layout"):
                common &= set(other)
            local = [entry for entry in local if entry in common]
        return [self.opt.state[params[i]][key] for i, key in local]
