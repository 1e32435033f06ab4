"""Robustness under real horovodrun workers: AMP overflow, non-finite models, crashes."""
import math
import time

import pytest
import torch

from hvdrun import launch, run_workers


@pytest.fixture(scope="module")
def faults():
    return run_workers("robustness_worker.py", 3, ["--case", "faults"], timeout=180)


def test_amp_overflow_on_one_rank_skips_its_update_but_not_its_rounds(faults):
    for t in range(6):
        steps = {r[t_]["local_step"] for r in [f["amp"] for f in faults] for t_ in [t]}
        rounds = {f["amp"][t]["rounds"] for f in faults}
        assert steps == {t + 1} and rounds == {(t + 1) // 2}, "every rank keeps the same schedule"
    rank1 = faults[1]["amp"]
    # Step 3 is not an averaging step: rank 1's skipped update leaves its model unchanged...
    assert torch.equal(rank1[2]["params"], rank1[1]["params"])
    # ...while rank 0 did update, and the scaler backed off only where it overflowed.
    assert not torch.equal(faults[0]["amp"][2]["params"], faults[0]["amp"][1]["params"])
    assert rank1[2]["scale"] < faults[0]["amp"][2]["scale"]
    # Step 4 averages: all ranks took the same average, then their own update; all finite.
    for f in faults:
        assert all(math.isfinite(x) for x in f["amp"][-1]["params"].tolist())


def test_nonfinite_model_raises_on_every_rank_naming_the_rank(faults):
    for f in faults:
        msg = f["raise"]["error"]
        assert msg is not None, "every rank must raise"
        assert "rank(s) [1]" in msg and "averaging round 1" in msg and "nonfinite='exclude'" in msg


def test_nonfinite_exclude_averages_the_healthy_ranks_and_heals_the_sick_one(faults):
    for f in faults:
        assert f["exclude"]["error"] is None
        assert f["exclude"]["stats"]["excluded"] == [{"round": 1, "ranks": [1]}]
        assert torch.isfinite(f["exclude"]["final"]).all()
    healthy_mean = (faults[0]["exclude"]["after_step1"] + faults[2]["exclude"]["after_step1"]) / 2
    # Rank 1 took the healthy ranks' average and skipped its (NaN-point) update at step 2.
    torch.testing.assert_close(faults[1]["exclude"]["after_step2"], healthy_mean, rtol=1e-6, atol=1e-7)


def test_average_state_averages_the_state_every_rank_has(faults):
    states = [f["state"] for f in faults]
    assert [s["has_branch_momentum"] for s in states] == [True, False, False]
    assert all(s["rounds"] == 3 for s in states)
    for s in states[1:]:  # fc1's momentum exists everywhere: averaged by average_now()
        torch.testing.assert_close(s["fc1_momentum"], states[0]["fc1_momentum"], rtol=1e-6, atol=1e-7)


def test_elastic_state_syncs_restores_and_rebinds(faults):
    el = [f["elastic"] for f in faults]
    for e in el:
        assert e["synced_step"] == 1 and e["synced_epoch"] == 0, "rank 0's schedule and state"
        torch.testing.assert_close(e["synced_params"], el[0]["synced_params"])  # common model
        assert e["restored_step"] == 1 and e["restored_equal"]
        assert e["rounds_after_reset"] == 1  # step 2 of the re-bound optimizer averaged


def test_a_crashing_rank_ends_the_job_quickly_with_its_error():
    start = time.monotonic()
    rc, output, _ = launch("robustness_worker.py", 2, ["--case", "crash"], timeout=120)
    assert rc != 0
    assert "boom on rank 1 at step 3" in output
    assert time.monotonic() - start < 90
