"""Small object collectives over a Horovod process set.

``horovod.torch.allgather_object`` (0.28) has no ``process_set`` argument; these do.
"""
from __future__ import annotations

import pickle
import zlib
from typing import Any, List

import torch


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


def group_process_set(members: List[int], group_size: int, my_rank: int):
    """The Horovod process set of ``my_rank``'s group when ``members`` (global ranks, in
    order) are cut into consecutive groups of ``group_size``.

    Collective over ``members``: every member registers every group, in the same order. A
    set with the same ranks that already exists (``hvd.init(process_sets=[...])``) is reused;
    otherwise it is added, which Horovod allows only with HOROVOD_DYNAMIC_PROCESS_SETS=1.
    """
    from horovod.common import process_sets as ps

    existing = {tuple(ranks): set_id
                for set_id, ranks in ps._basics._get_process_set_ids_and_ranks().items()}
    mine = None
    for start in range(0, len(members), group_size):
        ranks = list(members[start:start + group_size])
        if tuple(ranks) in existing:
            group = ps.ProcessSet(ranks)
            group.process_set_id = existing[tuple(ranks)]
        else:
            try:
                group = ps.add_process_set(ranks)
            except ValueError as exc:
                raise ValueError(
                    f"Hierarchical averaging needs a Horovod process set for ranks {ranks}: run "
                    f"with HOROVOD_DYNAMIC_PROCESS_SETS=1 so it can be created, or create the "
                    f"groups in hvd.init(process_sets=[...]) ({exc})") from exc
        if my_rank in ranks:
            mine = group
    return mine
