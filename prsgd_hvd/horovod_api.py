"""Where the package reaches Horovod beyond ``horovod.torch``'s documented calls, in one place.

Everything here depends on Horovod 0.28's internals or wording; a Horovod upgrade is checked
against this module.
"""
from __future__ import annotations

from typing import Dict, List


def horovod():
    """``horovod.torch``, imported when first needed (importing it loads Horovod's library)."""
    import horovod.torch as hvd
    return hvd


def registered_sets() -> Dict[int, List[int]]:
    """Process set id -> its ranks, for every set registered with Horovod. Horovod 0.28 has no
    public way to ask."""
    from horovod.common import process_sets as ps
    return {set_id: list(ranks)
            for set_id, ranks in ps._basics._get_process_set_ids_and_ranks().items()}


def is_layout_mismatch(exc: BaseException) -> bool:
    """Horovod's controller refused a collective because the ranks submitted different shapes
    or dtypes under one name. It reports that only as the error's text, which always starts
    with "Mismatched" ("Mismatched allreduce tensor shapes: ...", "Mismatched data types:
    ...", "Mismatched allgather tensor shapes: ..."), wrapped by the torch binding."""
    return "Mismatched " in str(exc)
