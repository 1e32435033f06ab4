"""DistributedLocalSGD as a drop-in for hvd.DistributedOptimizer, under real horovodrun.

* Horovod's own optimizer tests (test/parallel/test_torch.py, v0.28.1) adapted to
  DistributedLocalSGD, and the patterns Horovod's examples use (clipping and AMP with
  synchronize(), the resume with broadcast_optimizer_state, an LR scheduler made before
  wrapping, no finalize()): one launch of 3 ranks runs them all (tests/workers/compat_worker.py).
* The whole DistributedOptimizer signature, backward_passes_per_step included, against the
  float64 reference (tests/reference.py).
* hvd.elastic.TorchState (what Horovod's elastic examples use) growing a job from 2 to 3.
"""
import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compat_worker import FORCE_OPTION_SETS, ForceNet, data, new_optimizer, torch_optimizers
from hvdrun import REPO, HorovodRunError, launch, run_workers
from reference import simulate_rounds
from test_trajectories import check_against_reference

NP = 3


class _Results(list):
    output = ""


@pytest.fixture(scope="module")
def compat():
    rc, output, out_dir = launch("compat_worker.py", NP, timeout=420,
                                 env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})
    if rc != 0:
        raise HorovodRunError(f"compat_worker.py exited with {rc}:\n{output[-6000:]}", output, rc)
    results = _Results(torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
                       for r in range(NP))
    results.output = output
    return results


def _cases(results, case):
    return [r[case] for r in results]


# ---- Horovod's test_torch.py, adapted ------------------------------------------------------------

def test_broadcast_state_with_every_torch_optimizer_carries_state_and_counters(compat):
    per_rank = _cases(compat, "broadcast_state")
    keys = list(per_rank[0])
    assert len(keys) >= 24  # 12+ optimizers x 2 option sets
    for key in keys:
        if "skipped_by_torch" in per_rank[0][key]:
            # torch.optim.Muon accepts only 2-D parameters; nothing of ours is involved.
            assert key.startswith("Muon"), per_rank[0][key]
            continue
        for rank, res in enumerate(per_rank):
            got = res[key]
            assert got["model_is_roots"], f"{key}: rank {rank} does not hold rank 0's model"
            assert got["state_equal"], f"{key}: rank {rank} does not hold rank 0's state"
            # Rank 0 checkpointed after 3 steps; after the resume step 4 averaged everywhere.
            assert (got["local_step"], got["rounds"]) == (4, 2), (key, rank, got)


def test_broadcast_state_options_come_from_rank0(compat):
    per_rank = _cases(compat, "broadcast_state_options")
    for name, res0 in per_rank[0].items():
        if "skipped_by_torch" in res0:
            assert name == "Muon"
            continue
        for res in per_rank:
            got, want = res[name]["got"], res[name]["expected"]
            for k, v in want.items():
                assert type(got[k]) is type(v), (name, k)
                assert got[k] == pytest.approx(v, abs=1e-5), (name, k)
            assert res[name]["rounds"] == 1


def test_integer_parameter_is_left_alone_and_the_rest_averaged(compat):
    per_rank = _cases(compat, "broadcast_state_no_grad")
    for res in per_rank:
        assert res["a_grad_is_none"] and res["b_grad_equal"]
        assert torch.equal(res["a"], torch.tensor([1, 3], dtype=torch.int32))
        assert torch.equal(res["b"], per_rank[0]["b"])  # finalize(): one averaged model
        # Step 2; step 4's round, started by step 3 (overlap) and joined by finalize() as its
        # own round (the round after it is dropped: prsgd_hvd.join), as without overlap.
        assert res["rounds"] == 2


def test_force_allreduce_parameters_one_rank_never_touches_are_averaged(compat):
    per_rank = _cases(compat, "force_allreduce")
    for key, res0 in per_rank[0].items():
        if "skipped_by_torch" in res0:
            assert key.startswith("Muon")
            continue
        for res in per_rank[1:]:
            torch.testing.assert_close(res[key]["all"], res0["all"], rtol=0, atol=0)
        assert res0["rounds"] == 3  # interval 1: steps 1, 2, the prestarted 3 as finalize()'s
    # Values: every optimizer class against its own float64 run of the same three ranks.
    checked = 0
    for (name, cls), opt_params in itertools.product(torch_optimizers(), FORCE_OPTION_SETS):
        key = f"{name}{opt_params}"
        if "skipped_by_torch" in per_rank[0][key]:
            continue
        torch.manual_seed(0)
        models = [ForceNet().double()]
        models += [copy.deepcopy(models[0]) for _ in range(NP - 1)]
        opts = [new_optimizer(cls, opt_params, m) for m in models]

        def grad(r, t):
            x, y = (v.double() for v in data(r))
            y1, y2 = models[r](x)
            opts[r].zero_grad()
            F.mse_loss(y1 if r == 0 else y2, y, reduction="sum").backward()
        want = simulate_rounds(models, opts, grad, [2] * NP, [[1, 2]] * NP)
        # lr 0.2 on summed losses: gradients of order 10, so fp32 rounding reaches ~2e-6.
        torch.testing.assert_close(per_rank[0][key]["all"], want[0], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")
        checked += 1
    assert checked >= 20


def test_duplicate_and_missing_names_raise_like_horovod(compat):
    for res in _cases(compat, "names"):
        assert res["duplicate"].startswith("ValueError") and "duplicate" in res["duplicate"]
        assert res["missing"].startswith("ValueError") and "not named" in res["missing"]
        assert "param_groups[0]['params'][2]" in res["missing"]
        assert res["positional_names"].startswith("TypeError")
        assert "named_parameters=model.named_parameters()" in res["positional_names"]
        assert res["unnamed"] is None


def test_dynamic_requires_grad_two_optimizers(compat):
    per_rank = _cases(compat, "dynamic_requires_grad")
    for res in per_rank:
        assert res["violations"] == 0
        assert res["rounds"] == (4, 4)  # 10 steps at interval 3: 3 rounds, then finalize()
        torch.testing.assert_close(res["gen"], per_rank[0]["gen"], rtol=0, atol=0)
        torch.testing.assert_close(res["disc"], per_rank[0]["disc"], rtol=0, atol=0)


def test_gradient_clipping_with_synchronize_and_skip_synchronize(compat):
    for res in _cases(compat, "clipping_and_sync_warning"):
        clip = res["clip"]
        assert abs(clip["prior"]) > abs(clip["clipped"])
        # The update used the clipped local gradient: w = 0.5 - 0.1 * clipped.
        assert clip["weight"] == pytest.approx(0.5 - 0.1 * clip["clipped"])
        assert clip["sync_warnings"] == [] and clip["local_step"] == 1
        assert clip["rounds_after_step2"] == 1, "skip_synchronize() must not skip rounds"


def test_synchronize_then_step_warns_as_horovod_does(compat):
    for res in _cases(compat, "clipping_and_sync_warning"):
        assert len(res["sync_warning"]) == 1
        assert "optimizer.step() called without optimizer.skip_synchronize()" in res["sync_warning"][0]


def test_sparse_embeddings_with_and_without_sparse_as_dense(compat):
    per_rank = _cases(compat, "sparse_embeddings")
    for key, res0 in per_rank[0].items():
        assert res0["grad_is_sparse"] and res0["rounds"] == 2  # step 2; step 4's, prestarted, as finalize()'s
        assert not torch.equal(res0["weight"], res0["before"]), key
        for res in per_rank[1:]:
            assert torch.equal(res[key]["weight"], res0["weight"]), key
        # Values: the float64 run (round at step 2, before its update; finalize()).
        cls = {"SparseAdam": torch.optim.SparseAdam, "SGD": torch.optim.SGD}[key.split("/")[0]]
        torch.manual_seed(0)
        models = [torch.nn.Embedding(10, 3, sparse=True).double() for _ in range(NP)]
        for m in models[1:]:
            m.load_state_dict(models[0].state_dict())
        opts = [cls(list(m.parameters()), lr=0.1) for m in models]
        inputs = [torch.LongTensor([[1, 2, 4, 5], [4, 3, 2, 9]])] + \
            [torch.LongTensor([[1, 3, 4], [4, 7, 9]])] * (NP - 1)

        def grad(r, t):
            opts[r].zero_grad()
            models[r](inputs[r]).sum().backward()
        want = simulate_rounds(models, opts, grad, [3] * NP, [[2]] * NP)
        torch.testing.assert_close(res0["weight"].double().reshape(-1), want[0], rtol=1e-5,
                                   atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_process_sets_a_rank_outside_trains_alone(compat):
    per_rank = _cases(compat, "process_sets")
    even, odd = per_rank[0::2], per_rank[1::2]
    for res in even:
        assert res["world_size"] == 2 and res["rounds"] == 3  # steps 2, 4, finalize()
        torch.testing.assert_close(res["flat"], even[0]["flat"], rtol=0, atol=0)
        assert res["resolved_world_size"] == 2  # an unregistered ProcessSet([0, 2]) resolved
    for res in odd:  # outside the set: exactly plain torch training, no error, no hang
        assert res["world_size"] == 1 and res["equals_plain_torch"]
    for res in per_rank:
        assert res["string"].startswith("TypeError") and "'process_set' must be a Horovod" in res["string"]
        assert res["unregistered"].startswith("ValueError") and "not registered" in res["unregistered"]


# ---- the DistributedOptimizer signature -----------------------------------------------------------

def test_every_distributed_optimizer_argument(compat):
    for res in _cases(compat, "arguments"):
        assert "op=hvd.Adasum cannot be used for model averaging" in res["adasum"]
        assert "op=hvd.Sum cannot be used" in res["sum"] and res["sum"].startswith("ValueError")
        assert "backward_passes_per_step must be an int >= 1" in res["bpps0"]
        assert "gradient_predivide_factor" in res["predivide0"]
        assert "only appear once in groups" in res["groups_bad"]
        assert "sparse_as_dense must be True or False" in res["sparse_as_dense_bad"]
        assert "'compression' must be" in res["compression_bad"]
        assert res["full_signature"] == {"ok": True, "num_groups_warning": True}
        assert res["bf16_reachable"] == "BF16Compressor"
        assert res["elastic_names"] == ("LocalSGDState", "TorchState")
        assert "already wrapped by hvd.DistributedOptimizer" in res["hvd_then_local"]
        assert "already wrapped by hvd.DistributedLocalSGD" in res["local_then_hvd"]
        assert "parameter phase has dtype torch.complex64" in res["complex"]


SIGNATURE_SCENARIOS = [
    # imagenet_resnet50.py's gradient accumulation: 3 backward passes per step().
    {"name": "backward_passes_per_step_3", "opt": "sgd",
     "opt_kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, "interval": 3,
     "steps": 9, "backward_passes": 3},
    # Every other argument with a non-default value: none changes the numbers.
    {"name": "every_horovod_argument", "opt": "adam", "opt_kwargs": {"lr": 0.01}, "interval": 2,
     "steps": 7, "backward_passes": 2, "broadcast_state": True,
     "hvd_kwargs": {"op": "Average", "gradient_predivide_factor": 4.0, "groups": 3,
                    "sparse_as_dense": True}},
]
for _i, _s in enumerate(SIGNATURE_SCENARIOS):
    _s["seed"] = 777 + _i


@pytest.fixture(scope="module")
def signature_results():
    return run_workers("trajectory_worker.py", 2, ["--scenarios", json.dumps(SIGNATURE_SCENARIOS)])


@pytest.mark.parametrize("spec", SIGNATURE_SCENARIOS, ids=[s["name"] for s in SIGNATURE_SCENARIOS])
def test_horovod_arguments_match_the_float64_reference(signature_results, spec):
    check_against_reference(2, spec, signature_results)


# ---- patterns of Horovod scripts -----------------------------------------------------------------

def test_amp_loop_with_synchronize_unscale_and_skip_synchronize(compat):
    for res in _cases(compat, "amp"):
        assert res["scaler"]["rounds"] == res["plain"]["rounds"] == 3  # 2, 4, 6 (prestarted) as finalize()'s
        torch.testing.assert_close(res["scaler"]["flat"], res["plain"]["flat"], rtol=1e-5, atol=1e-6)
    assert torch.equal(compat[0]["amp"]["scaler"]["flat"], compat[1]["amp"]["scaler"]["flat"])


def test_lr_scheduler_created_before_wrapping_works_like_after(compat):
    for res in _cases(compat, "lr_scheduler_before_wrapping"):
        before, after = res["before"], res["after"]
        assert before["rounds"] == after["rounds"] == 3  # steps 3, 6, then finalize()
        assert before["local_step"] == 7 and before["lr"] == after["lr"] == pytest.approx(0.0125)
        assert torch.equal(before["flat"], after["flat"])
        assert before["scheduler_warnings"] == [] and after["scheduler_warnings"] == []


def test_standard_resume_gives_every_rank_the_counters(compat):
    per_rank = _cases(compat, "resume")
    for res in per_rank:
        assert res["fresh_counters"] == (0, 0)
        assert res["counters_after_broadcast"] == (5, 1), "rank 0's counters on every rank"
        # The resumed run averages at step 8 on every rank, as the uninterrupted one did.
        assert res["rounds"] == res["straight_rounds"] == 2
        assert res["after_broadcast_is_roots"]
    # Rank 0 checkpointed mid-interval without finalize(): it was told.
    assert any("this checkpoint holds rank 0's own model" in m
               for m in per_rank[0]["checkpoint_warnings"])


def test_warning_when_local_steps_were_never_averaged(compat):
    for res in _cases(compat, "unaveraged_warning"):
        assert len(res["messages"]) == 1  # once per optimizer, never after finalize()
        assert "took local steps after the last averaging round (it is at step 3)" in res["messages"][0]
        assert "opt.finalize()" in res["messages"][0]


def test_warning_at_exit_without_finalize(compat):
    # The worker leaves one optimizer with an un-averaged step: every rank says so at exit.
    for rank in range(NP):
        assert f"rank {rank} exits with its own model" in compat.output, compat.output[-4000:]


def test_wrapping_before_hvd_init_says_so():
    """The real cause, not a process-set error: hvd.init() was never called."""
    code = ("import torch, prsgd_hvd as hvd\n"
            "try:\n"
            "    hvd.DistributedLocalSGD(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), interval=2)\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "ERR DistributedLocalSGD: Horovod is not initialised; call hvd.init()" in out.stdout, \
        out.stdout + out.stderr
