"""Algorithm 3 with measured speeds: a rank slowed down on purpose runs fewer local steps."""
import pytest

from hvdrun import run_workers
from speed_worker import BASE, SLOW

SLOW_STEP = BASE + SLOW
RATIO = SLOW_STEP / BASE  # 5: the fast rank should run about 5x the steps


@pytest.fixture(scope="module")
def results():
    return run_workers("speed_worker.py", 2, timeout=180)


def test_by_speed_gives_the_fast_rank_proportionally_more_steps(results):
    fast, slow = results[0]["by_speed"], results[1]["by_speed"]
    assert fast["intervals"] == slow["intervals"], "ranks must agree on the intervals"
    i_fast, i_slow = fast["intervals"]
    assert i_slow == 2, "the slowest rank keeps base_interval"
    assert RATIO * 0.6 <= i_fast / i_slow <= RATIO * 1.4, fast["intervals"]
    # Calibration: 6 timed steps (the first step is not timed) in epochs of base_interval=2,
    # ended by an average; then 3 epochs of the agreed counts.
    for res in (fast, slow):
        assert res["steps_per_epoch"][:4] == [2, 2, 2, 1]
    assert fast["steps_per_epoch"][4:] == [i_fast] * 3
    assert slow["steps_per_epoch"][4:] == [i_slow] * 3


def test_by_speed_no_rank_waits_more_than_a_step_per_epoch(results):
    for rank, res in enumerate(results):
        for epoch, wait in enumerate(res["by_speed"]["waits"][4:]):
            assert wait <= SLOW_STEP + 0.03, f"rank {rank} waited {wait:.3f} s in epoch {epoch + 5}"


def test_every_seconds_fast_rank_runs_more_steps_and_waits_little(results):
    fast, slow = results[0]["every_seconds"], results[1]["every_seconds"]
    assert len(fast["steps_per_epoch"]) == len(slow["steps_per_epoch"]) == 5
    for f, s in zip(fast["steps_per_epoch"][1:], slow["steps_per_epoch"][1:]):
        assert RATIO * 0.6 <= f / s <= RATIO * 1.4, (fast["steps_per_epoch"], slow["steps_per_epoch"])
    for rank, res in enumerate(results):
        for epoch, wait in enumerate(res["every_seconds"]["waits"][1:]):
            assert wait <= SLOW_STEP + 0.03, f"rank {rank} waited {wait:.3f} s in epoch {epoch + 2}"
