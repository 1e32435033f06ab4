"""synchronize_quietly / wait_quietly: Horovod's result and errors, without spinning, and
interruptible."""
import time

import pytest

from prsgd_hvd import waiting
from prsgd_hvd.waiting import synchronize_quietly


class FakeHorovod:
    """A handle that completes ``after`` seconds from now; counts the polls."""

    def __init__(self, after, error=None):
        self.done_at = time.perf_counter() + after
        self.error, self.polls, self.synchronized = error, 0, []

    def poll(self, handle):
        self.polls += 1
        return time.perf_counter() >= self.done_at

    def synchronize(self, handle):
        assert time.perf_counter() >= self.done_at, "synchronize before the handle completed"
        self.synchronized.append(handle)
        if self.error:
            raise self.error
        return f"result of {handle}"


def test_returns_the_result_and_sleeps_instead_of_spinning():
    hvd = FakeHorovod(after=0.3)
    cpu0, t0 = time.process_time(), time.perf_counter()
    assert synchronize_quietly(hvd, 7) == "result of 7"
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert hvd.synchronized == [7]
    # A spin polls millions of times and burns the whole wait; sleeping polls a few hundred.
    assert hvd.polls < 1000, hvd.polls
    assert cpu < 0.5 * wall, (cpu, wall)
    # Noticed soon after completion: at most MAX_SLEEP plus scheduling slack late.
    assert wall < 0.3 + waiting.MAX_SLEEP + 0.05


def test_short_collectives_are_noticed_quickly():
    hvd = FakeHorovod(after=0.002)
    t0 = time.perf_counter()
    synchronize_quietly(hvd, 1)
    assert time.perf_counter() - t0 < 0.002 + 0.01


def test_the_collectives_error_is_raised():
    hvd = FakeHorovod(after=0.01, error=RuntimeError("Mismatched allreduce shapes"))
    with pytest.raises(RuntimeError, match="Mismatched"):
        synchronize_quietly(hvd, 3)


def test_an_interrupted_wait_leaves_the_handle_for_a_later_one(monkeypatch):
    hvd = FakeHorovod(after=0.05)
    calls, real_sleep = [], time.sleep

    def sleep_once_interrupted(s):
        calls.append(s)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_sleep(s)
    monkeypatch.setattr(waiting.time, "sleep", sleep_once_interrupted)
    with pytest.raises(KeyboardInterrupt):
        synchronize_quietly(hvd, 5)
    assert hvd.synchronized == []            # not consumed
    assert synchronize_quietly(hvd, 5) == "result of 5"
