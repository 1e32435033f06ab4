"""Small object collectives over a Horovod process set.

``horovod.torch.allgather_object`` (0.28) has no ``process_set`` argument; these do.
"""
from __future__ import annotations

import pickle
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
