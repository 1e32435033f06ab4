"""Mismatched configurations raise the same clear error on every rank instead of hanging."""
import pytest
import torch

from hvdrun import run_workers


@pytest.fixture(scope="module")
def results():
    return run_workers("mismatch_worker.py", 3, timeout=120)


def test_agreeing_ranks_construct_fine(results):
    assert all(r["agree"] is None for r in results)


@pytest.mark.parametrize("case,words", [
    ("interval", ["schedule differs", "'interval': 3", "ranks [1]", "ranks [0, 2]"]),
    ("shape", ["parameter 0 differs", "0.weight", "(5, 3)", "rank 1"]),
    ("warmup", ["warmup_steps differs", "ranks [1]"]),
    ("schedule_kind", ["schedule differs", "TimeVarying", "FixedInterval"]),
    # docs/robustness.md promises these too: each shapes the collectives or what they carry.
    ("overlap", ["overlap differs", "ranks [1]: False", "ranks [0, 2]: True"]),
    ("compression", ["compression differs", "ranks [1]: 'fp16'", "ranks [0, 2]: None"]),
    ("optimizer", ["optimizer differs", "ranks [1]: 'Adam'", "ranks [0, 2]: 'SGD'"]),
    ("average_state", ["average_state differs", "ranks [1]: True", "ranks [0, 2]: False"]),
    ("outer_lr", ["outer optimizer differs", "'lr': 0.6", "'lr': 0.7", "ranks [1]"]),
    ("outer_missing", ["outer optimizer differs", "ranks [1]: None", "'nesterov': True"]),
    ("delay", ["delay differs", "ranks [1]: 2", "ranks [0, 2]: 0"]),
    ("fragments", ["fragments differs", "ranks [1]: 2", "ranks [0, 2]: 1"]),
])
def test_mismatch_is_reported_on_every_rank(results, case, words):
    messages = [r[case] for r in results]
    assert all(m is not None for m in messages), f"every rank must raise: {messages}"
    assert len(set(messages)) == 1, "every rank reports the same difference"
    for w in words:
        assert w in messages[0], f"{w!r} not in: {messages[0]}"


def test_broadcast_optimizer_state_carries_theta0_and_the_outer_state(results):
    for rank, r in enumerate(results):
        got = r["outer_broadcast"]
        assert got["started"], f"rank {rank}: theta0 not marked as set"
        for i, (theta, buf) in enumerate(zip(got["theta"], got["momentum"])):
            assert torch.allclose(theta, torch.full_like(theta, i + 1 - 0.7 * 1.9)), \
                f"rank {rank}: theta0[{i}] is not rank 0's"
            assert buf is not None and torch.equal(buf, torch.ones_like(buf)), \
                f"rank {rank}: the outer momentum of tensor {i} is not rank 0's"
