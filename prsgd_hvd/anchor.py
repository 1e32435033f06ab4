"""The anchor: the common point of the last accepted round, kept per bucket of a round's layout.

NOTE: [the anchor]
After a round every rank holds the same point before its own update: the average (or, for an
update rule that does more than average, whatever that rule makes of it). Two stages of a round
read that point, so it lives here, once per averager, and both are handed the same object:

* a wire format that sends changes (prsgd_hvd.wire_formats: 16-bit deltas) encodes
  ``x_i - anchor`` and decodes the sum back on top of it;
* an update rule may read it (an outer optimizer's anchor is the model after the last full
  round) and owns moving it: the plain rules make the anchor follow the average
  (``UpdateRule.advance_anchor``).

It is kept only when some stage asks for it (a full copy of the model in the flat buffers'
dtype costs memory and one pass per round); it is dropped when the layout changes, and then the
next round is sent in full precision and sets it again. Only finite rounds move it: a round with
inf/NaN is rerun or raised by the non-finite policy, never the common point.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .averaging import Round


class Anchor:
    """Per bucket index: a flat tensor shaped like the bucket's payload (fp32 for fp16/bf16)."""

    def __init__(self, kept: bool):
        self.kept = kept
        self._flat: Dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """The layout changed: there is no common point in the new layout yet."""
        self._flat.clear()

    def ready(self, n_buckets: int) -> bool:
        return len(self._flat) == n_buckets

    def bucket(self, index: int) -> torch.Tensor:
        return self._flat[index]

    def follow(self, rnd: "Round") -> None:
        """The round's average is the new common point (the plain update rules)."""
        if not self.kept or not rnd.is_finite():  # checked first: most rounds keep none
            return
        with torch.no_grad():
            for b in rnd.buckets:
                flat = self._flat.get(b.index)
                if flat is None:
                    self._flat[b.index] = b.payload * rnd.scale
                else:
                    torch.mul(b.payload, rnd.scale, out=flat)
