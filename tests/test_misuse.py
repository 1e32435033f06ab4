"""Misuse and faults under real horovodrun ranks (tests/workers/misuse_worker.py): each must end
in a clear error on every rank in bounded time, or just work -- never a hang or a silent mix."""
import pytest
import torch

from hvdrun import run_workers
from misuse_worker import NAN_AT, UNEVEN_STEPS
from common import loss_fn
from reference import common_start, rounds_from_log, simulate_fixed_interval, simulate_rounds

# misuse_worker's model, data and optimizer (common.Net, seed 0, fresh()/sgd()).
SPEC = {"seed": 0, "opt": "sgd", "opt_kwargs": {"lr": 0.05, "momentum": 0.9}}
TOL = dict(rtol=1e-5, atol=1e-6)


def _results(case, np, timeout=240, env=None):
    out = run_workers("misuse_worker.py", np, ["--case", case], timeout=timeout, env=env)
    for rank, res in enumerate(out):
        for name, value in res.items():
            assert not (isinstance(value, dict) and "crashed" in value), \
                f"rank {rank}, {name}:\n{value['crashed']}"
    return out


@pytest.fixture(scope="module")
def agreement():
    return _results("agreement", 2)


@pytest.fixture(scope="module")
def local():
    return _results("local", 2)


@pytest.fixture(scope="module")
def uneven():
    return _results("uneven", 2)


def _every_rank_raised(results, scenario, *fragments):
    for rank, res in enumerate(results):
        msg = res[scenario]
        assert msg is not None, f"rank {rank} did not raise in {scenario}"
        for f in fragments:
            assert f in msg, f"rank {rank}, {scenario}: {f!r} not in {msg!r}"


def test_average_now_on_one_rank_raises_on_every_rank(agreement):
    _every_rank_raised(agreement, "average_now_on_one_rank", "RoundMismatchError",
                       "not in the same averaging round", "average_now round 1", "scheduled round")


def test_resume_on_rank_0_only_is_caught_at_the_next_round(agreement):
    _every_rank_raised(agreement, "resume_without_broadcasting_the_counters",
                       "not in the same averaging round", "broadcast_optimizer_state")


def test_same_shaped_parameters_in_another_order_are_caught(agreement):
    _every_rank_raised(agreement, "parameters_in_a_different_order",
                       "started from different parameters", "named_parameters")


def test_same_shaped_optimizers_built_in_another_order_pair_by_step_order(agreement):
    # Rank 1 builds b before a; rounds pair by the order of step() calls, the same everywhere.
    a, b = (r["same_shaped_optimizers_built_in_another_order"] for r in agreement)
    assert "error" not in a and "error" not in b, (a, b)
    assert torch.equal(a["a"], b["a"]) and torch.equal(a["b"], b["b"])
    assert not torch.equal(a["a"], a["b"])


def test_optimizers_built_in_another_order_are_caught_at_construction(agreement):
    _every_rank_raised(agreement, "optimizers_built_in_a_different_order", "ranks disagree",
                       "parameter 0 differs", "same order")


def test_every_option_that_shapes_the_collectives_is_compared(agreement):
    _every_rank_raised(agreement, "different_nonfinite_modes", "nonfinite differs", "'raise'",
                       "'exclude'")
    _every_rank_raised(agreement, "different_time_varying_callables", "schedule differs")
    _every_rank_raised(agreement, "different_model_buffers", "number of model buffers differs")


def test_add_param_group_on_one_rank_names_the_groups(agreement):
    _every_rank_raised(agreement, "add_param_group_on_one_rank", "param groups differs",
                       "add_param_group on every rank")


def test_step_after_finalize_is_refused(local):
    for res in local:
        assert "step() after finalize()" in res["step_after_finalize"]
        assert "average_now()" in res["step_after_finalize"]


def test_corrupted_checkpoints_are_rejected_whole(local):
    for res in local:
        c = res["corrupted_checkpoints"]
        assert "has no 'local_step'" in c["missing"]
        assert "local_sgd.local_step' must be an int >= 0, got -5" in c["negative"]
        assert "got 5.9" in c["fraction"]
        assert "must be a dict" in c["foreign"]
        assert "schedule state" in c["schedule"] or "epoch" in c["schedule"]
        # The whole state_dict -- counters, schedule, param groups, momentum -- is untouched,
        # though each bad checkpoint differs from it in all of them...
        for k in ("missing", "negative", "fraction", "foreign", "schedule"):
            assert c[k + " unchanged"], f"{k}: a refused checkpoint changed the optimizer"
        # ...and the same alteration in a valid checkpoint does change it (the check can fail).
        assert c["good counters"] == (3, 1) and c["counters after the good load"] == (7, 3)
        assert c["a good load changes the state"]


def test_copies_fail_clearly_and_state_dicts_save(local):
    for res in local:
        c = res["copies_and_pickles"]
        assert "cannot be pickled" in c["deepcopy"] and "state_dict()" in c["torch.save"]
        assert c["state_dict saves"] is None


def test_parameters_the_round_cannot_take_are_named_at_construction(local):
    for res in local:
        assert "appears twice in param group 0" in res["bad_parameters"]["duplicate"]
        assert "on device 'meta'" in res["bad_parameters"]["meta"]


def test_lbfgs_takes_its_closure_and_ends_averaged(local):
    """Against float64 LBFGS on two ranks: rounds at steps 2 and 4 average, then LBFGS steps
    from the average (its closure runs there); finalize() averages once more."""
    a, b = (r["lbfgs_with_closure"] for r in local)
    assert a["rounds"] == b["rounds"] == 3
    for stop, key in ((2, "after_round"), (4, "params")):
        models, _, _ = common_start(SPEC, 2)
        opts = [torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3) for m in models]
        losses = [[], []]

        def update(r, t):
            def closure():
                opts[r].zero_grad()
                loss = loss_fn(models[r], 0, r, t, dtype=torch.float64)
                loss.backward()
                return loss
            losses[r].append(float(opts[r].step(closure).detach()))
        want = simulate_rounds(models, opts, lambda r, t: None, [stop] * 2,
                               [[2, 4][:stop // 2]] * 2, update=update, finalize=stop == 4)
        for r, res in enumerate((a, b)):
            torch.testing.assert_close(res[key], want[r], **TOL, msg=lambda m: f"rank {r}, {key}: {m}")
            assert res["losses"][:stop] == pytest.approx(losses[r], rel=1e-5), r
    assert not torch.equal(a["after_round"], b["after_round"]), "each rank's own LBFGS step"


def test_channels_last_parameters_match_the_reference_path(local):
    for res in local:
        c = res["channels_last"]
        torch.testing.assert_close(c["None"], c["False"], rtol=1e-5, atol=1e-6)
        assert c["still channels_last"]
    torch.testing.assert_close(local[0]["channels_last"]["None"], local[1]["channels_last"]["None"])


def test_an_interrupted_wait_resumes_when_the_step_is_retried(local):
    for res in local:
        r = res["interrupted_wait"]
        assert torch.equal(r["params interrupt=True"], r["params interrupt=False"])
        assert r["rounds interrupt=True"] == r["rounds interrupt=False"]
    assert local[1]["interrupted_wait"]["interrupted at"] == 4


@pytest.mark.parametrize("scenario,when", [("adaptive", "before"), ("by_speed", "after")])
def test_schedules_that_agree_on_measurements_survive_uneven_endings(uneven, scenario, when):
    """The rounds depend on measurements, so the reference replays the rounds each rank made
    (Adaptive: Algorithm 1, before the update; by_speed: after an epoch's last step); a rank
    that has finished joins the others' rounds with its model unchanged."""
    a, b = (r[scenario] for r in uneven)
    assert torch.equal(a["params"], b["params"]), "finalize() must leave one model"
    assert a["rounds"] == b["rounds"]
    steps = UNEVEN_STEPS[scenario]
    rounds = [rounds_from_log(r[scenario]["rounds_log"]) for r in uneven]
    assert len(rounds[1]) > len(rounds[0]) >= 1, "the longer rank had rounds the other joined"
    models, opts, grad = common_start(SPEC, 2)
    want = simulate_rounds(models, opts, grad, steps, rounds, when=when)
    torch.testing.assert_close(a["params"], want[0], **TOL)


def test_excluded_rank_drops_its_nonfinite_momentum_and_rejoins(uneven):
    for res in uneven:
        r = res["exclude_with_momentum"]
        assert r["excluded"] == [{"round": 2, "ranks": [1]}], "excluded once, then back"
        assert all(r["finite"][3:])
    torch.testing.assert_close(uneven[0]["exclude_with_momentum"]["params"],
                               uneven[1]["exclude_with_momentum"]["params"])
    # Values: round 2 (step 4) is rank 0's model alone; rank 1 takes it, skips its update and
    # restarts its momentum; rounds 3, 4 and finalize() are plain averages again.
    def nan_grad(r, t, model):
        if r == 1 and t == NAN_AT:
            model.fc1.weight.grad.fill_(float("nan"))
    models, opts, grad = common_start({**SPEC, "hook": nan_grad}, 2)
    want = simulate_rounds(models, opts, grad, [8, 8], [[2, 4, 6, 8]] * 2, excluded={2: [1]})
    torch.testing.assert_close(uneven[0]["exclude_with_momentum"]["params"], want[0], **TOL)


def test_hierarchical_ranks_may_end_at_different_steps():
    out = _results("hierarchical", 4, env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})
    first = out[0]["hierarchical"]
    for res in out[1:]:
        assert torch.equal(res["hierarchical"]["params"], first["params"])
        assert res["hierarchical"]["rounds"] == first["rounds"]
    # Groups {0,1}, {2,3} every 2 steps, all 4 every 4; finished ranks answer with their model.
    spec = {**SPEC, "steps_per_rank": UNEVEN_STEPS["hierarchical"], "finalize": True,
            "schedule": {"kind": "hierarchical", "levels": [[2, 2], [4, 4]]}}
    _, finals, _ = simulate_fixed_interval(spec, 4)
    torch.testing.assert_close(first["params"], finals[0], **TOL)
