"""Robustness under real horovodrun workers: AMP overflow, non-finite models, crashes."""
import math
import time

import pytest
import torch

from hvdrun import launch, run_workers
from reference import common_start, simulate_rounds
from robustness_worker import AMP_OVERFLOWS, bn_loss, bn_net

NP = 3
SGD_MOMENTUM = {"lr": 0.05, "momentum": 0.9}
TOL = dict(rtol=1e-5, atol=1e-6)


def _fixed(seed, opt_kwargs, steps, interval, hook=None, **kwargs):
    """Float64 reference of ``steps`` steps of Algorithm 1 on NP ranks (common.Net)."""
    spec = {"seed": seed, "opt": "sgd", "opt_kwargs": opt_kwargs, "hook": hook}
    models, opts, grad = common_start(spec, NP)
    rounds = [[t for t in range(1, steps + 1) if t % interval == 0]] * NP
    final = simulate_rounds(models, opts, grad, [steps] * NP, rounds, **kwargs)
    return final, models, opts


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


def test_amp_values_match_the_reference_with_the_skipped_updates(faults):
    """Every rank after every step against the float64 run in which exactly those updates are
    skipped: rank 1's at local step 3, and rank 2's at step 4, an averaging step, where it must
    take the average of all three models (its own included) and not update."""
    for steps in range(1, 7):
        want, _, _ = _fixed(7, SGD_MOMENTUM, steps, 2, skips=set(AMP_OVERFLOWS), finalize=False)
        for r, f in enumerate(faults):
            torch.testing.assert_close(f["amp"][steps - 1]["params"], want[r], **TOL,
                                       msg=lambda m: f"rank {r} after step {steps}: {m}")


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


def _nan_in_rank1s_first_gradient(r, t, model):
    if r == 1 and t == 1:
        model.fc2.bias.grad.fill_(float("nan"))


@pytest.mark.parametrize("steps,key", [(2, "after_step2"), (4, "final")])
def test_nonfinite_exclude_every_rank_matches_the_reference(faults, steps, key):
    """The healthy ranks too: round 1 is the mean of ranks 0 and 2 only, then each applies its
    own update; round 2 (step 4) is a full average again."""
    want, _, _ = _fixed(8, {"lr": 0.05}, steps, 2, hook=_nan_in_rank1s_first_gradient,
                        excluded={1: [1]}, finalize=False)
    for r, f in enumerate(faults):
        torch.testing.assert_close(f["exclude"][key], want[r], **TOL, msg=lambda m: f"rank {r}: {m}")


# fused=None takes the fused average+SGD pass, which must average the momentum before the step
# reads it; False is the unfused path.
@pytest.mark.parametrize("fused", [None, False])
def test_average_state_averages_the_state_every_rank_has(faults, fused):
    """Rounds at steps 2 and 4, then average_now() after step 5. Momentum is averaged with the
    parameters, before this step's update -- the mean of the ranks' own buffers, not a sum and
    not rank 0's. The branch's momentum exists on rank 0 only (the branch gets a gradient only
    there): the design (prsgd_hvd/round_contents.py, NOTE: [state layout]) averages the entries
    every rank has, so it stays rank 0's own, exactly as rank 0 alone would have it."""
    for when, steps in (("step4", 4), ("end", 5)):
        ref = _fixed(10, SGD_MOMENTUM, steps, 2, average_state=True, finalize=when == "end")
        for r, f in enumerate(faults):
            got = f["state"][f"{when} fused={fused}"]
            where = f"{when}, fused={fused}, rank {r}"
            torch.testing.assert_close(got["params"], ref[0][r], **TOL, msg=lambda m: f"{where}: {m}")
            model, opt = ref[1][r], ref[2][r]
            for name, p in model.named_parameters():
                buf = opt.state[p].get("momentum_buffer")
                if buf is None:
                    assert got["momentum"][name] is None, f"{where}: {name}"
                    continue
                torch.testing.assert_close(got["momentum"][name], buf.float(), **TOL,
                                           msg=lambda m: f"{where}, momentum of {name}: {m}")
    states = [f["state"][f"end fused={fused}"] for f in faults]
    assert [s["momentum"]["branch.weight"] is not None for s in states] == [True, False, False]
    assert all(s["rounds"] == 3 for s in states)


# overlap=True must not prestart rounds that carry model buffers: BatchNorm changes them in the
# averaging step's own forward pass.
@pytest.mark.parametrize("overlap", [True, False])
def test_model_buffers_are_averaged_across_ranks(faults, overlap):
    """BatchNorm running statistics (model=) against the float64 run that averages them, with
    the parameters, at every round (after that step's forward pass) and at finalize(); the
    integer batch counter stays each rank's own."""
    models = [bn_net().double() for _ in range(NP)]
    opts = [torch.optim.SGD(m.parameters(), **SGD_MOMENTUM) for m in models]

    def grad(r, t):
        opts[r].zero_grad()
        bn_loss(models[r], r, t).backward()
    final = simulate_rounds(models, opts, grad, [5] * NP, [[2, 4]] * NP)
    for r, f in enumerate(faults):
        got = f["buffers"][f"overlap={overlap}"]
        torch.testing.assert_close(got["running_mean"], models[r][1].running_mean.float(), **TOL)
        torch.testing.assert_close(got["running_var"], models[r][1].running_var.float(), **TOL)
        torch.testing.assert_close(got["params"], final[r], **TOL)
        assert got["num_batches_tracked"] == 5
    # Not vacuous: the ranks' statistics differ before averaging (rank-dependent inputs).
    assert not torch.allclose(models[0][1].running_mean, bn_net().double()[1].running_mean)


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
