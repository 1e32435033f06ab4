"""Waiting for a Horovod collective without burning a core.

``hvd.synchronize(handle)`` waits in C++ by polling the handle in a loop that only calls
``std::this_thread::yield()`` (``WaitAndClear`` in Horovod 0.28.1's ``mpi_ops_v2.cc``): the
waiting thread keeps a core busy for the whole collective. Gradient allreduces are short, so
Horovod can afford that; a local-SGD round is long by design (seconds of a slow link), and the
busy core is taken from whatever else runs: Gloo's own network thread and reductions, the other
ranks of a host, the data loaders. Measured on 3 hosts sharing 2 cores at 100 Mbit/s
(docs/cluster.md): a 25 MB ``hvd.allreduce`` ran at 79% of the link-limited ring speed while
its callers spun; the same allreduce waited for here, in the same run, at 93% (torch's gloo
``all_reduce``: 94%).

So: poll, and sleep between polls for a small fraction of the time already waited (at most
``MAX_SLEEP``). A round that completes after t seconds is noticed within ``t / 64 + 50 us``,
about 1.5%, and the first polls come quickly enough for the short rounds of fast links.
"""
from __future__ import annotations

import time

MIN_SLEEP = 50e-6   # seconds; Python's sleep is not finer than this anyway
MAX_SLEEP = 2e-3
SHARE = 1 / 64      # sleep at most this share of the time waited so far


def wait_quietly(hvd, handle) -> None:
    """Return once ``handle`` has completed (successfully or not), polling with growing sleeps
    instead of Horovod's spin. Nothing is collected: an exception while waiting (an interrupt)
    leaves the handle alive for a later wait, and ``hvd.synchronize(handle)`` afterwards
    returns at once with the result or raises the collective's error."""
    start = time.perf_counter()
    while not hvd.poll(handle):
        waited = time.perf_counter() - start
        time.sleep(min(MAX_SLEEP, max(MIN_SLEEP, waited * SHARE)))


def synchronize_quietly(hvd, handle):
    """``hvd.synchronize(handle)`` (its result and its errors) without the spin. Horovod
    consumes the handle in ``synchronize``, even when it raises: callers that keep handles
    wait with ``wait_quietly`` and forget the handle before collecting it (PendingRound)."""
    wait_quietly(hvd, handle)
    return hvd.synchronize(handle)
