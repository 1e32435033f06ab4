"""Small object collectives over a Horovod process set.

``horovod.torch.allgather_object`` (0.28) has no ``process_set`` argument; these do.
"""
from __future__ import annotations

import pickle
import zlib
from typing import Any, List

import torch

# Kept importable from here (it used to live here); process sets have their own module now.
from .process_sets import group_process_set  # noqa: F401

FP32_EXACT = 1 << 23  # integers below this survive an fp32 sum of one non-zero term exactly


def small_checksum(data: bytes) -> int:
    """A checksum that an fp32 control record carries exactly (>= 1, so 0 means 'none')."""
    return zlib.crc32(data) % (FP32_EXACT - 1) + 1


def allgather_object(obj: Any, process_set, name: str) -> List[Any]:
    """Every rank of ``process_set`` gets ``[obj of its rank 0, obj of its rank 1, ...]``."""
    import horovod.torch as hvd

    if process_set.size() == 1:
        return [obj]
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([payload.numel()], dtype=torch.int64),
                          name=f"{name}.sizes", process_set=process_set)
    gathered = hvd.allgather(payload, name=f"{name}.data", process_set=process_set)
    out, offset = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(gathered[offset:offset + n].numpy().tobytes()))
        offset += n
    return out


class SetCollectives:
    """Small collectives over one process set, named ``{prefix}.{purpose}``: a collective's
    name says what it is for, never how many came before it on this rank, so a worker that
    joins an elastic job late meets the others."""

    def __init__(self, process_set, prefix: str):
        self.process_set, self.prefix = process_set, prefix
        self.size, self.rank = process_set.size(), process_set.rank()
        # Global ranks of the set, to name ranks in errors.
        self.members = process_set.ranks if process_set.ranks is not None else list(range(self.size))

    def allgather(self, obj: Any, purpose: str) -> List[Any]:
        return allgather_object(obj, self.process_set, f"{self.prefix}.{purpose}")

    def same_everywhere(self, value: Any, purpose: str) -> bool:
        """Collective: does every rank hold the same ``value``? One 2-element allreduce of a
        checksum h and h^2 (equal sums mean equal values, by Cauchy-Schwarz)."""
        import horovod.torch as hvd

        if self.size == 1:
            return True
        h = float(zlib.crc32(repr(value).encode()) % (1 << 20))
        sums = hvd.allreduce(torch.tensor([h, h * h], dtype=torch.float64), op=hvd.Sum,
                             name=f"{self.prefix}.{purpose}", process_set=self.process_set)
        return sums.tolist() == [self.size * h, self.size * h * h]
