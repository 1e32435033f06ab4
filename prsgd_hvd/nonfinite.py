"""What a round does when some rank's model holds inf/NaN (``DistributedLocalSGD(nonfinite=)``).

NOTE: [non-finite rounds]
A NaN or inf in one rank's model survives the sum, so averaging it would poison every rank. The
summed buffers are identical on every rank, so every rank sees the problem in the same round and
can afford one more collective to find the culprits: their own tensors still hold their local
values (nothing was written back yet). Then:

* ``"raise"``: every rank raises ``FloatingPointError`` naming the ranks and the round;
* ``"exclude"``: the round is run again with the culprits sending zeros (weight 0); they take the
  healthy ranks' average, skip this step's update, and drop optimizer state that went non-finite
  (their momentum would otherwise poison every later step), so they rejoin as fresh optimizers;
* ``"ignore"``: no check (saves one read of the summed buffer per round).

A sum that overflowed while every model is finite is a false alarm and goes on, except with
compressed deltas, where it means the change since the last average no longer fits.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .averaging import Round
from .collectives import SetCollectives

MODES = ("raise", "exclude", "ignore")


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class NonFinitePolicy:
    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"DistributedLocalSGD: 'nonfinite' must be 'raise', 'exclude' or "
                             f"'ignore', got {mode!r}")
        self.mode = mode
        self.excluded: List[Dict[str, Any]] = []  # rounds that left non-finite ranks out

    def settle(self, rnd: Round, collectives: SetCollectives, where: Callable[[], str],
               compressed_kind: Optional[str], rerun: Callable[[bool], Round],
               optimizer: torch.optim.Optimizer) -> Tuple[Round, bool]:
        """Returns the round to write back and whether this rank was left out of it (its
        update must then be skipped). ``rerun(contribute)`` runs the same round again;
        ``where()`` names the round in messages (built only when there is one to give)."""
        if self.mode == "ignore" or rnd.is_finite():
            return rnd, False
        mine = not _all_finite(rnd.layout.tensors)
        flags = collectives.allgather(mine, "nonfinite")
        bad = [collectives.members[r] for r, flag in enumerate(flags) if flag]
        if not bad:
            if compressed_kind is None:
                return rnd, False  # the sum overflowed but every model is finite: go on
            if compressed_kind == "int8":  # codes cannot overflow; a scale can, with x - anchor
                raise FloatingPointError(
                    f"DistributedLocalSGD: the 8-bit compressed round is not finite at {where()} "
                    f"though every model is: the change since the last average overflowed "
                    f"float32. Average more often, or use no compression.")
            raise FloatingPointError(
                f"DistributedLocalSGD: the 16-bit compressed sum overflowed at {where()}: the "
                f"models moved further from the last average than {compressed_kind} can "
                f"hold. Average more often, or use compression=hvd.Compression.bf16 (wider "
                f"range) or no compression.")
        if self.mode == "raise" or len(bad) == collectives.size:
            raise FloatingPointError(
                f"DistributedLocalSGD: non-finite values (inf/NaN) in the model of rank(s) "
                f"{bad} at {where()}; averaging them would poison every rank. Lower "
                f"the learning rate, clip gradients, use a GradScaler, or pass "
                f"nonfinite='exclude' to leave such ranks out of the average.")
        self.excluded.append({"round": rnd.identity.number, "ranks": bad})
        rnd = rerun(not mine)
        if mine:
            _drop_nonfinite_state(optimizer)
        return rnd, mine


def _drop_nonfinite_state(optimizer: torch.optim.Optimizer) -> None:
    for p, state in list(optimizer.state.items()):
        if any(torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
               for v in state.values()):
            del optimizer.state[p]
