"""Streaming rounds (``delay=``, ``fragments=``) under real horovodrun workers, held to the
float64 reference of tests/reference_streaming.py: Algorithm 1 with the fused SGD merge and the
reference path, several fragments' rounds in flight at once, warm-up, outer optimizers, 16-bit
deltas, uneven endings where finalize() drains what is in flight, checkpoints taken with rounds
in flight; Algorithms 2 and 3 with a delay and with fragments. One launch per world size runs every scenario."""
import json

import pytest
import torch

import prsgd_hvd as hvd
from hvdrun import run_workers
from reference_streaming import fragment_split, simulate_streaming, simulate_streaming_epochs
from workers.common import epoch_length, make_model, steps_for_rank

SGD_MOMENTUM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
DILOCO = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
SCENARIOS = [
    {"name": "d2_i4_fused_merge", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "delay": 2, "steps": 13},
    {"name": "d3_i4_reference_path", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "delay": 3, "steps": 12, "fused": False},
    {"name": "d1_i3_adam_warmup2", "opt": "adam", "opt_kwargs": {"lr": 0.01}, "interval": 3,
     "delay": 1, "warmup": 2, "steps": 10},
    {"name": "f3_d0_i6", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 6,
     "fragments": 3, "steps": 14},
    # tau=3 > I/F=2: two fragments' rounds in flight at once.
    {"name": "f2_d3_i4_two_in_flight", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "fragments": 2, "delay": 3, "steps": 13},
    {"name": "f3_d4_i6_outer_uneven_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
     "interval": 6, "fragments": 3, "delay": 4, "steps": 11, "extra_steps_per_rank": 2,
     "finalize": True, "outer": DILOCO},
    {"name": "d2_i4_uneven_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "delay": 2, "steps": 9, "extra_steps_per_rank": 3, "finalize": True},
    {"name": "d2_i4_outer_fp16_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
     "interval": 4, "delay": 2, "steps": 12, "compression": "fp16", "finalize": True,
     "outer": DILOCO, "rel_norm_tol": 1e-3},
    {"name": "f2_d2_i4_bf16", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "fragments": 2, "delay": 2, "steps": 12, "compression": "bf16", "rel_norm_tol": 1e-3},
    # Checkpoints with rounds in flight: at step 6 the rounds of steps 4 and 6 are.
    {"name": "f2_d3_i4_resume_two_in_flight", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
     "interval": 4, "fragments": 2, "delay": 3, "steps": 12, "resume_at": 6},
    {"name": "d2_i4_outer_adam_resume_in_flight", "opt": "adam", "opt_kwargs": {"lr": 0.01},
     "interval": 4, "delay": 2, "steps": 11, "resume_at": 5, "outer": DILOCO},
    # Algorithm 2.
    {"name": "time_varying_d1_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "delay": 1,
     "finalize": True, "schedule": {"kind": "time_varying", "epoch_lengths": [2, 3, 2, 4],
                                    "lrs": [0.1, 0.05, 0.02, 0.01], "epochs": 4}},
    # Algorithm 2 with fragments: tau=3 > K/F, two fragments' rounds in flight, an outer step
    # per fragment round; and tau=0, each fragment averaged at once after its step.
    {"name": "time_varying_f2_d3_outer_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
     "fragments": 2, "delay": 3, "finalize": True, "outer": DILOCO,
     "schedule": {"kind": "time_varying", "epoch_lengths": [4, 6, 4, 8],
                  "lrs": [0.1, 0.05, 0.02, 0.01], "epochs": 4}},
    {"name": "time_varying_f3_d0_finalize", "opt": "adam", "opt_kwargs": {"lr": 0.01},
     "fragments": 3, "finalize": True,
     "schedule": {"kind": "time_varying", "epoch_lengths": [3, 6, 3], "epochs": 3}},
]
# Algorithm 3: one interval per rank.
HETEROGENEOUS = {
    2: [{"name": "heterogeneous_d1_outer_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
         "delay": 1, "finalize": True, "outer": DILOCO,
         "schedule": {"kind": "heterogeneous", "intervals": [3, 2], "epochs": 4}},
        # Algorithm 3 with fragments: rank r averages fragment p after p*I_r/F of its steps.
        {"name": "heterogeneous_f2_d1_fp16_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
         "fragments": 2, "delay": 1, "finalize": True, "compression": "fp16",
         "rel_norm_tol": 1e-3,
         "schedule": {"kind": "heterogeneous", "intervals": [4, 2], "epochs": 3}}],
    3: [{"name": "heterogeneous_d1_steps_weights_finalize", "opt": "sgd",
         "opt_kwargs": SGD_MOMENTUM, "delay": 1, "finalize": True,
         "schedule": {"kind": "heterogeneous", "intervals": [3, 2, 4], "weights": "steps",
                      "epochs": 4}},
        {"name": "heterogeneous_f2_d1_steps_weights_outer_finalize", "opt": "sgd",
         "opt_kwargs": SGD_MOMENTUM, "fragments": 2, "delay": 1, "finalize": True,
         "outer": DILOCO,
         "schedule": {"kind": "heterogeneous", "intervals": [4, 2, 6], "weights": "steps",
                      "epochs": 3}}],
}
for i, s in enumerate(SCENARIOS + HETEROGENEOUS[2] + HETEROGENEOUS[3]):
    s["seed"] = 7100 + i
# 8-bit deltas (compression="int8") on streaming rounds: 4 fragments with two rounds in flight
# (tau=3 > I/F=2), uneven endings drained by finalize(); and DiLoCo's outer step on fragments.
# Within 5e-3 of exact streaming (measured 9e-4 and 1.8e-3 on 2 and 3 ranks; why the bound:
# test_trajectories.INT8_TOL). Seeds after the loop above: the others' stay as they were.
SCENARIOS += [
    {"name": "f4_d3_i8_int8_uneven_finalize", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM,
     "interval": 8, "fragments": 4, "delay": 3, "steps": 18, "extra_steps_per_rank": 1,
     "finalize": True, "compression": "int8", "rel_norm_tol": 5e-3, "seed": 7200},
    {"name": "f2_d3_i4_int8_outer", "opt": "sgd", "opt_kwargs": SGD_MOMENTUM, "interval": 4,
     "fragments": 2, "delay": 3, "steps": 13, "compression": "int8", "outer": DILOCO,
     "rel_norm_tol": 5e-3, "seed": 7201},
]
TOLERANCE = {"sgd": (1e-5, 1e-6), "adam": (1e-4, 1e-5)}
_cache = {}


def results_for(np):
    if np not in _cache:
        scenarios = SCENARIOS + HETEROGENEOUS[np]
        _cache[np] = run_workers("trajectory_worker.py", np, ["--scenarios", json.dumps(scenarios)])
    return _cache[np]


def expected_rounds(spec, np):
    """Rounds counted on every rank: settled ones (a delayed round settles when it merges),
    all of them plus one per fragment with finalize()."""
    F, tau = spec.get("fragments", 1), spec.get("delay", 0)
    if "schedule" in spec:
        epochs = spec["schedule"]["epochs"]
        return (epochs + 1) * F if spec.get("finalize") else epochs - 1
    last = max(steps_for_rank(spec, r, np) for r in range(np))
    merges = []
    for t in range(1, last + 1):
        if t <= spec.get("warmup", 0):
            merges += [t] * F
        elif t % (spec["interval"] // F) == 0:
            merges.append(t + tau)
    if spec.get("finalize"):
        return len(merges) + F
    return sum(1 for m in merges if m <= last)


def expected_merges(spec, np, rank):
    """(one-pass merges, fused ones) in stats() of `rank`'s final optimizer: every delayed
    round it merged goes through the one-pass MergeRound (NOTE: [streaming]) -- rounds restored
    from a checkpoint excepted, they merge per tensor -- and with torch.optim.SGD on the whole
    model the merges made at a step (not drained by finalize()) carry its update too."""
    F, tau = spec.get("fragments", 1), spec.get("delay", 0)
    if tau == 0:
        return 0, 0
    last = steps_for_rank(spec, rank, np)
    if "schedule" in spec:
        assert spec.get("finalize"), "every delayed epoch round merges only with finalize()"
        ends, t = [], 0
        for e in range(1, spec["schedule"]["epochs"] + 1):
            t += epoch_length(spec["schedule"], rank, e)
            ends.append(t)
        merge_at = [end + 1 + tau for end in ends]  # fragment 0's rounds (the only ones if F=1)
        one_pass = len(ends) * F
    else:
        every = spec["interval"] // F
        starts = [t for t in range(1, last + 1) if t > spec.get("warmup", 0) and t % every == 0
                  and t > spec.get("resume_at", 0)]
        merge_at = [t + tau for t in starts]
        one_pass = len(starts) if spec.get("finalize") else sum(m <= last for m in merge_at)
    fusable = F == 1 and spec["opt"] == "sgd" and spec.get("fused") is not False
    return one_pass, sum(m <= last for m in merge_at) if fusable else 0


def check(np, spec):
    simulate = simulate_streaming_epochs if "schedule" in spec else simulate_streaming
    ref_traj, ref_final, _ = simulate(spec, np)
    rtol, atol = TOLERANCE[spec["opt"]]
    results = results_for(np)
    for rank, res in enumerate(results):
        got = res[spec["name"]]
        assert got["local_step"] == len(ref_traj[rank])
        assert got["rounds"] == expected_rounds(spec, np), got["rounds"]
        merges = (got["stats"]["one_pass_merges"], got["stats"]["fused_merges"])
        assert merges == expected_merges(spec, np, rank), (rank, merges)
        if "rel_norm_tol" in spec:
            pairs = list(zip(got["traj"], ref_traj[rank])) + [(got["final"], ref_final[rank])]
            for t, (a, b) in enumerate(pairs):
                err = float((a - b).norm() / b.norm())
                assert err <= spec["rel_norm_tol"], f"rank {rank} step {t + 1}: rel. error {err:.2e}"
            continue
        for t in range(len(ref_traj[rank])):
            torch.testing.assert_close(
                got["traj"][t], ref_traj[rank][t], rtol=rtol, atol=atol,
                msg=lambda m: f"{spec['name']}: rank {rank} after step {t + 1} of {np}: {m}")
        torch.testing.assert_close(got["final"], ref_final[rank], rtol=rtol, atol=atol)
    if spec.get("finalize"):
        for res in results[1:]:
            assert torch.equal(res[spec["name"]]["final"], results[0][spec["name"]]["final"])


@pytest.mark.parametrize("np", [2, 3])
@pytest.mark.parametrize("spec", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_streaming_matches_float64_reference(np, spec):
    check(np, spec)


@pytest.mark.parametrize("np", [2, 3])
def test_streaming_heterogeneous_matches_float64_reference(np):
    for spec in HETEROGENEOUS[np]:
        check(np, spec)


def test_delay_changes_the_trajectory():
    """Guard: a delayed merge is not secretly an immediate round (nor no round at all)."""
    spec = next(s for s in SCENARIOS if s["name"] == "d2_i4_fused_merge")
    got = results_for(2)[0][spec["name"]]["final"]
    for other in ({**spec, "delay": 0}, {**spec, "delay": 1}):
        _, ref_final, _ = simulate_streaming(other, 2)
        assert float((got - ref_final[0]).norm()) > 1e-4 * float(ref_final[0].norm())


def test_fragment_split_is_about_equal_bytes_in_order():
    params = list(make_model(0).parameters())
    for F in (1, 2, 3, len(params)):
        split = fragment_split(params, F)
        assert [i for frag in split for i in frag] == list(range(len(params)))
        assert all(split)
