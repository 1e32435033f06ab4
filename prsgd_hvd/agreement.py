"""Cross-rank agreement: every rank must average the same things on the same schedule.

Each round is a collective, so ranks that differ in anything that shapes the sequence of
collectives hang, and ranks that differ in what they send mix unrelated models. Three checks,
each raising the same error on every rank (each rank sees everything every rank said):

* at construction (``check_ranks_agree``): one allgather of the whole configuration -- every
  option of ``DistributedLocalSGD`` except the few that only affect this rank's arithmetic --
  and a description of every parameter and model buffer. The collective has a fixed name, so
  ranks that build their optimizers in a different order meet in it and are told so;
* at every round (``Round.check_identity``, prsgd_hvd.averaging): the round's kind and number
  and a checksum of its layout ride in the round's control records;
* at the first round of a fresh run (``initial_fingerprint``): a checksum of the initial
  parameter values, which must be equal after ``hvd.broadcast_parameters``. It tells apart
  same-shaped parameters listed in a different order, and two same-shaped optimizers paired
  with each other's counterpart.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .collectives import allgather_object, small_checksum

AGREE_COLLECTIVE = "prsgd_hvd.agree"


def describe_tensors(tensors: Sequence[torch.Tensor], names: Dict[int, str], prefix: str):
    return [(names.get(id(t), f"{prefix} #{i}"), tuple(t.shape), str(t.dtype), t.device.type)
            for i, t in enumerate(tensors)]


def describe_optimizer(options: Dict[str, Any], schedule: Dict[str, Any], members: List[int],
                       contents, names: Dict[int, str], optimizer) -> Dict[str, Any]:
    """Everything about one optimizer the ranks must agree on: its options (the config's
    ``agreement()``), its schedule's description, the process set and what its rounds carry."""
    params = contents.params()
    return {**options,
            "schedule": schedule,
            "process set": list(members),
            "parameters": describe_tensors(params, names, "parameter"),
            "model buffers": describe_tensors(contents.buffers(params), {}, "buffer"),
            "param groups": [len(g["params"]) for g in optimizer.param_groups]}


def check_ranks_agree(mine: Dict[str, Any], process_set) -> None:
    """Collective over ``process_set``: raise on every rank unless every rank passed the same
    ``mine`` (a dict of picklable descriptions)."""
    if process_set.size() == 1:
        return
    problems = _differences(allgather_object(mine, process_set, AGREE_COLLECTIVE), process_set)
    if problems:
        raise ValueError("DistributedLocalSGD: the ranks disagree, so averaging would hang or "
                         "mix different models:\n  " + "\n  ".join(problems) +
                         "\nBuild the model and the optimizer the same way, in the same order, "
                         "with the same arguments on every rank.")


def _differences(everyone: List[Dict[str, Any]], process_set) -> List[str]:
    """One line per key on which the ranks' descriptions differ."""
    members = process_set.ranks if process_set.ranks is not None else list(range(len(everyone)))
    problems = []
    for key in sorted({k for e in everyone for k in e}):
        values = [e.get(key, "<missing>") for e in everyone]
        if any(v != values[0] for v in values):
            problems.append(describe_mismatch(key, values, members))
    return problems


def describe_mismatch(key: str, values: List[Any], members: List[int]) -> str:
    if key in ("parameters", "model buffers") and all(isinstance(v, list) for v in values):
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            counts = ", ".join(f"rank {m}: {len(v)}" for m, v in zip(members, values))
            return f"number of {key} differs ({counts})"
        for i, entries in enumerate(zip(*values)):
            if any(e != entries[0] for e in entries):
                per_rank = "; ".join(f"rank {m}: {e[0]} {tuple(e[1])} {e[2]} on {e[3]}"
                                     for m, e in zip(members, entries))
                return f"{key[:-1]} {i} differs ({per_rank})"
    groups: Dict[str, List[int]] = {}
    for m, v in zip(members, values):
        groups.setdefault(repr(v), []).append(m)
    return f"{key} differs: " + "; ".join(f"ranks {rs}: {v}" for v, rs in groups.items())


def explain_layout_mismatch(mine: Dict[str, Any], process_set, horovod_error: str) -> ValueError:
    """After Horovod refused to sum a round (shapes differ): find out what differs. Collective;
    Horovod reports the failure to every rank of the set, so all of them get here."""
    problems = _differences(allgather_object(mine, process_set, f"{AGREE_COLLECTIVE}.layout"),
                            process_set)
    return ValueError("DistributedLocalSGD: the ranks tried to average different tensors: "
                      + ("; ".join(problems) or horovod_error) +
                      ". Every rank must have the same parameters (add_param_group on every "
                      "rank alike) and the same model buffers.")


def initial_fingerprint(params: Sequence[torch.Tensor]) -> int:
    """A checksum of up to 64 values of each parameter, taken exactly (no reduction, so equal
    tensors give equal checksums whatever the thread count or device)."""
    parts = []
    for p in params:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        parts.append(flat[::step][:64].to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return small_checksum(b"".join(parts))


def check_fingerprints(fingerprints: List[int], members: List[int]) -> None:
    given = [f for f in fingerprints if f]
    if len(given) < 2 or len(set(given)) == 1:
        return
    groups: Dict[int, List[int]] = {}
    for m, f in zip(members, fingerprints):
        if f:
            groups.setdefault(f, []).append(m)
    raise ValueError(
        f"DistributedLocalSGD: the ranks started from different parameters (ranks "
        f"{' vs '.join(str(v) for v in groups.values())} differ at the first step). Either "
        f"the model was not broadcast before training -- call "
        f"hvd.broadcast_parameters(model.state_dict(), root_rank=0) after building it -- or "
        f"the optimizers list same-shaped parameters in a different order on different ranks, "
        f"or several optimizers were built in a different order (pass named_parameters= so "
        f"the ranks can be checked by name).")
