"""The rounds in flight in ``optimizer.state_dict()["local_sgd"]["in_flight"]`` (NOTE: [streaming]).

A settled round's correction c - x_sent lives in its averager's flat ``sent`` buffers. A
checkpoint (or an elastic reset, which replaces the averagers) takes it out per tensor, under a
key a fresh optimizer resolves without a collective -- ("param", i), ("buffer", j) or
("state", i, name) -- and a resumed job merges it per tensor with the same arithmetic (x in the
flat dtype, plus the correction, rounded once into x), exactly once, at the step it was due.
Validated whole before anything is applied.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from .averaging import RoundId, flat_dtype_for
from .delayed_round import DelayedRound
from .schedules import AVERAGE_BEFORE

if TYPE_CHECKING:  # pragma: no cover
    from .fragments import Fragments
    from .local_sgd import LocalSGD


class InFlightCheckpoint:
    def __init__(self, engine: "LocalSGD", frags: "Fragments"):
        self.e, self.frags = engine, frags

    def keys(self, tensors: List[torch.Tensor], n_params: int) -> List[Tuple]:
        """A name for each tensor of a round that a fresh optimizer can resolve without a
        collective: ("param", i), ("buffer", j) or ("state", i, key)."""
        contents = self.e.contents
        params = contents.params()
        index = {id(p): i for i, p in enumerate(params)}
        buffers = {id(b): j for j, b in enumerate(contents.buffers(params))}
        state = {id(v): (index[id(p)], k) for p, st in self.e.opt.state.items()
                 if id(p) in index for k, v in st.items() if torch.is_tensor(v)}
        out = []
        for t in tensors:
            if id(t) in index:
                out.append(("param", index[id(t)]))
            elif id(t) in buffers:
                out.append(("buffer", buffers[id(t)]))
            else:
                out.append(("state", *state[id(t)]))
        return out

    def resolve(self, key: Tuple) -> Optional[torch.Tensor]:
        contents = self.e.contents
        params = contents.params()
        try:
            if key[0] == "param":
                return params[key[1]]
            if key[0] == "buffer":
                return contents.buffers(params)[key[1]]
            if key[0] == "state":
                return self.e.opt.state[params[key[1]]][key[2]]
        except (IndexError, KeyError, TypeError):
            return None
        return None

    def entries(self, in_flight: List[DelayedRound]) -> List[Dict[str, Any]]:
        """Settled rounds in flight as {fragment, t, merge_at, number, correction by key}."""
        return [{"fragment": r.fragment, "t": r.t, "merge_at": r.merge_at,
                 "number": r.identity.number, "correction": self.corrections(r)}
                for r in in_flight]

    def corrections(self, r: DelayedRound) -> Dict[Tuple, torch.Tensor]:
        """A settled round's correction per tensor key (a copy)."""
        if r.saved is not None:
            return {k: v.clone() for k, v in r.saved.items()}
        layout = r.averager.layout
        keys = self.keys(layout.tensors, r.n_params)
        corrections = {}
        for b, sent in zip(layout.buckets, r.averager.sent):
            for j, pos in enumerate(b.positions):
                seg = sent[b.offsets[j]:b.offsets[j] + b.tensors[j].numel()]
                corrections[keys[pos]] = seg.view(b.tensors[j].shape).clone()
        return corrections

    def validate(self, saved: Any, local_step: int) -> None:
        """Check a saved :meth:`local_state` whole, changing nothing."""
        if not isinstance(saved, list):
            raise ValueError("DistributedLocalSGD: 'local_sgd.in_flight' must be the list a "
                             "streaming optimizer's state_dict() saved")
        for entry in saved:
            ok = isinstance(entry, dict) and isinstance(entry.get("correction"), dict) and \
                entry.get("fragment") in range(self.frags.fragments) and \
                isinstance(entry.get("merge_at"), int) and entry["merge_at"] > local_step
            if not ok:
                raise ValueError(f"DistributedLocalSGD: 'local_sgd.in_flight' holds a round this "
                                 f"optimizer (fragments={self.frags.fragments}) "
                                 f"cannot merge: {str(entry)[:200]}")
            for key, value in entry["correction"].items():
                target = self.resolve(key) if isinstance(key, tuple) else None
                if target is None or not torch.is_tensor(value) or value.shape != target.shape:
                    raise ValueError(f"DistributedLocalSGD: the checkpoint's round in flight "
                                     f"names {key!r}, which this optimizer does not have with "
                                     f"that shape; it was saved from another model or optimizer")

    def rounds(self, saved: List[Dict[str, Any]]) -> List[DelayedRound]:
        """The rounds of a validated checkpoint entry, each with its correction per tensor."""
        return [DelayedRound(
            e["fragment"], self.frags.averager(e["fragment"]),
            RoundId("scheduled", int(e.get("number", 0))), int(e.get("t", 0)), e["merge_at"],
            AVERAGE_BEFORE, 0, None, saved=dict(e["correction"])) for e in saved]

    @torch.no_grad()
    def merge_saved(self, r: DelayedRound) -> None:
        """A round restored from a checkpoint: the same arithmetic per tensor (x in the flat
        dtype, plus the correction, rounded once into x)."""
        for key, correction in r.saved.items():
            x = self.resolve(key)
            flat = x.to(flat_dtype_for(x.dtype))
            x.copy_(flat + correction.to(device=x.device, dtype=flat.dtype))
