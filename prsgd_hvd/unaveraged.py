"""A warning when a rank exits, or checkpoints, holding local steps no average has seen.

Under local SGD the ranks hold different models between rounds. A rank that exits without
``finalize()`` leaves its own model behind, and a checkpoint taken then is one rank's model.
Once per optimizer and occasion (a checkpoint every epoch should not bury the log); state
dicts taken by the package itself (broadcast, elastic commit) never warn.
"""
from __future__ import annotations

import atexit
import contextlib
import threading
import warnings
import weakref

_PREFIX = "DistributedLocalSGD"


class LocalStepsNotAveragedWarning(UserWarning):
    """A rank exits, or checkpoints, holding a model no average has seen (no ``finalize()``)."""


_live = weakref.WeakSet()   # wrapped optimizers, for the warning at exit
_quiet = threading.local()  # state_dict() calls made by us (broadcast, elastic commit)


def track(optimizer) -> None:
    """Warn at interpreter exit if ``optimizer`` still holds unaveraged local steps then."""
    _live.add(optimizer)


@contextlib.contextmanager
def no_unaveraged_warning():
    depth = getattr(_quiet, "depth", 0)
    _quiet.depth = depth + 1
    try:
        yield
    finally:
        _quiet.depth = depth


def unaveraged_steps(optimizer) -> int:
    ls = optimizer._local_sgd
    if ls.size <= 1 or ls.finalized:
        return 0  # a world of one (or a rank outside the process set), or averaged for good
    return max(0, ls.local_step - ls.averaged_step)


def warn_if_unaveraged(optimizer, when: str) -> None:
    """Called by ``state_dict()`` (``when="state_dict"``) and at interpreter exit."""
    if getattr(_quiet, "depth", 0):
        return
    n = unaveraged_steps(optimizer)
    ls = optimizer._local_sgd
    if n == 0 or when in ls.wrapper.warned:
        return
    ls.wrapper.warned.add(when)
    from horovod.torch import is_initialized, rank
    # At exit Horovod has shut down already (its atexit handler was registered by hvd.init(),
    # after ours): the rank recorded at construction is what is left.
    r = rank() if is_initialized() else ls.wrapper.global_rank
    what = ("this checkpoint holds rank {rank}'s own model" if when == "state_dict" else
            "rank {rank} exits with its own model").format(rank=r)
    warnings.warn(
        f"{_PREFIX}: {what}: it took local steps after the last averaging round (it is at "
        f"step {ls.local_step}), so the {ls.size} ranks hold different models. Call "
        f"opt.finalize() on every rank after the training loop (or train inside `with "
        f"opt.local_sgd():`) to end with one averaged model, then checkpoint it.",
        LocalStepsNotAveragedWarning, stacklevel=3)


@atexit.register
def _warn_at_exit() -> None:
    for opt in list(_live):
        try:
            warn_if_unaveraged(opt, "exit")
        except Exception:  # noqa: BLE001  (never turn an exit into a traceback)
            pass
