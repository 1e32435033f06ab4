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


# The every_seconds tests hold the schedule to the clocks the ranks measured (speed_worker saves
# time.perf_counter() around every opt.step() call), not to step times an unloaded machine
# would have: on a shared 2-core machine a rank can stall for a tenth of a second, which once
# gave the fast rank 7 steps instead of ~24 in an epoch. Sleeps only give upper bounds (load
# can lengthen a step, never shorten it).
PERIOD = 0.25  # Heterogeneous.every_seconds(0.25) in speed_worker


def _epochs(res):
    """(index of the step whose call (re)started the clock, indices of the epoch's steps)."""
    out, end = [], 0
    for e, n in enumerate(res["steps_per_epoch"]):
        first = 0 if e == 0 else end + 1
        last = first + n - 1
        # The clock starts inside step 1's call, and restarts inside the call that ends an epoch.
        restart = 0 if e == 0 else end
        out.append((restart, list(range(max(first, restart + 1), last + 1))))
        end = last
    return out


def test_every_seconds_ends_each_epoch_at_the_first_step_past_the_period(results):
    """The rule, on each rank: an epoch ends at the first step that begins ``seconds`` or more
    after the last average. The package reads its clock inside step(), between our stamps,
    so a step that did not end its epoch began less than PERIOD after the restarting call
    returned, and the step that ended it returned PERIOD or more after that call began.
    Load lengthens the steps, and the brackets with them."""
    for rank, res in enumerate(results):
        r = res["every_seconds"]
        before, after = r["before"], r["after"]
        assert len(before) == sum(r["steps_per_epoch"]) and len(r["steps_per_epoch"]) == 5
        for e, (restart, steps) in enumerate(_epochs(r)):
            assert steps, f"rank {rank}: epoch {e + 1} ended in the step that started its clock"
            for j in steps[:-1]:
                assert before[j] - after[restart] < PERIOD, \
                    f"rank {rank} epoch {e + 1}: step {j + 1} began {before[j] - after[restart]:.3f} s " \
                    f"after the clock restarted and did not end the epoch"
            j = steps[-1]
            assert after[j] - before[restart] >= PERIOD, \
                f"rank {rank} epoch {e + 1}: ended by step {j + 1}, only " \
                f"{after[j] - before[restart]:.3f} s after the clock restarted"


def _median_step(r):
    """Median time between the starts of consecutive steps that did not average (seconds)."""
    ends = set()
    total = 0
    for n in r["steps_per_epoch"]:
        total += n
        ends.add(total - 1)
    gaps = [r["before"][j] - r["before"][j - 1] for j in range(1, len(r["before"]))
            if j - 1 not in ends and j not in ends]
    return sorted(gaps)[len(gaps) // 2]


def test_every_seconds_fast_rank_runs_more_steps_and_waits_little(results):
    fast, slow = results[0]["every_seconds"], results[1]["every_seconds"]
    # A step takes at least its sleep, so an epoch holds at most PERIOD / sleep + 1 steps.
    for r, sleep in ((fast, BASE), (slow, SLOW_STEP)):
        for n in r["steps_per_epoch"][1:]:
            assert n <= PERIOD / sleep + 1, r["steps_per_epoch"]
    # Both ranks' epochs last PERIOD, so over epochs 2-5 their steps are in the inverse ratio
    # of the step times they measured (5 on an idle machine: rank 1 sleeps 5x as long).
    n_fast, n_slow = sum(fast["steps_per_epoch"][1:]), sum(slow["steps_per_epoch"][1:])
    want = _median_step(slow) / _median_step(fast)
    assert n_fast > n_slow and want / 2 <= n_fast / n_slow <= want * 2, \
        (fast["steps_per_epoch"], slow["steps_per_epoch"], want)
    # Both ranks end an epoch at the first step past the period on clocks restarted together
    # by the round, so at a round a rank waits for about the rest of the other's last step:
    # on average at most about one (slow) step, measured, not the ~0.2 s of fixed counts.
    step = max(_median_step(fast), _median_step(slow))
    for rank, res in enumerate(results):
        waits = res["every_seconds"]["waits"][1:]
        assert sum(waits) / len(waits) <= 1.5 * step + 0.01, (rank, waits, step)
