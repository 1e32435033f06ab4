"""The wrapper's own state and warnings, in one process (a world of one that believes it has
two ranks, so the unaveraged-steps warning has something to say)."""
import warnings

import pytest
import torch

import prsgd_hvd as hvd
from prsgd_hvd.unaveraged import LocalStepsNotAveragedWarning


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()


def _stepped(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=8,
                                  overlap=False)
    opt._local_sgd.world.size = 2  # the warning counts ranks; the rounds stay a world of one
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    return opt


def _unaveraged(ws):
    return [str(w.message) for w in ws if issubclass(w.category, LocalStepsNotAveragedWarning)]


def test_a_per_rank_checkpoint_does_not_warn_but_a_plain_state_dict_does():
    opt = _stepped()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with opt.per_rank_checkpoint():
            sd = opt.state_dict()
        assert _unaveraged(ws) == []
        assert sd["local_sgd"]["local_step"] == 3  # the checkpoint is the full one
        opt.state_dict()
    assert len(_unaveraged(ws)) == 1 and "holds rank 0's own model" in _unaveraged(ws)[0]


def test_wrapper_state_lives_in_the_engine_not_on_the_users_optimizer():
    opt = _stepped(steps=0)
    opt.synchronize()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with opt.skip_synchronize():
            assert opt._local_sgd.wrapper.skip_sync_depth == 1
        opt.step()  # after synchronize(), outside skip_synchronize(): Horovod's warning
    assert any("skip_synchronize" in str(w.message) for w in ws)
    assert not [k for k in vars(opt) if k.startswith("_prsgd")]
