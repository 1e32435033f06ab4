"""Single-process checks of delay=/fragments= (Horovod world of size 1): every bad combination
is a clear error at construction that names the fix, and the fragment split."""
import pytest
import torch
from torch import nn

import prsgd_hvd as hvd


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    yield


def sgd(n_layers=3):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kwargs,words", [
    ({"interval": 4, "delay": 4}, ["delay=4 must be smaller", "Use delay <= 3"]),
    ({"interval": 4, "delay": -1}, ["'delay' must be an int >= 0"]),
    ({"interval": 4, "delay": True}, ["'delay' must be an int >= 0"]),
    ({"interval": 4, "fragments": 0}, ["'fragments' must be an int >= 1"]),
    ({"interval": 6, "fragments": 4}, ["fragments=4 must divide interval=6"]),
    ({"interval": 8, "fragments": 8}, ["only 6 parameter tensors", "fragments <= 6"]),
    ({"interval": 4, "delay": 1, "nonfinite": "exclude"}, ["nonfinite='exclude'", "'raise'"]),
    ({"interval": hvd.TimeVarying([2, 3]), "fragments": 2},
     ["fragments=2 must divide epoch_lengths=[2, 3]", "3 is not a multiple of 2"]),
    ({"interval": hvd.Heterogeneous([6]), "fragments": 4},
     ["fragments=4 must divide intervals=6", "6 is not a multiple of 4"]),
    ({"interval": hvd.Heterogeneous.by_speed(4), "fragments": 2}, ["timed from the end"]),
    ({"interval": hvd.TimeVarying([3, 2, 4]), "delay": 2}, ["delay=2 must be smaller", "(2 with"]),
    ({"interval": hvd.Heterogeneous([3]), "delay": 3}, ["delay=3 must be smaller"]),
    ({"interval": hvd.Hierarchical({2: 1, 4: 1}), "delay": 1}, ["Hierarchical", "interleave"]),
    ({"interval": hvd.Adaptive(4), "delay": 1}, ["divergence measured at each round"]),
    ({"interval": hvd.Heterogeneous.by_speed(4), "delay": 1}, ["timed from the end of each round"]),
    ({"interval": hvd.Heterogeneous.every_seconds(1.0), "fragments": 2}, ["timed from the end"]),
])
def test_bad_streaming_arguments_are_clear_errors(kwargs, words):
    model, opt = sgd()
    with pytest.raises(ValueError) as err:
        hvd.DistributedLocalSGD(opt, **kwargs)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
    assert not hasattr(opt, "_local_sgd"), "a refused optimizer must be left as it was"


def test_fragments_split_whole_tensors_in_order_about_equal_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 1))
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), interval=4,
                                  fragments=2, delay=1)
    split = opt._local_sgd.streaming.frags.split()
    params = list(model.parameters())
    assert [t for frag in split for t in frag] == params  # whole tensors, in order
    sizes = [sum(t.numel() for t in frag) for frag in split]
    assert sizes == [110, 121], sizes  # the first fragment closes once it holds half


def test_streaming_in_a_world_of_one_is_plain_sgd():
    """One rank: every round's average is the model itself, so merges add nothing."""
    model, opt = sgd()
    ref_model, ref_opt = sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=4, delay=2, fragments=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(11):
        x = torch.randn(5, 4, generator=g)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    opt.finalize()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
    assert opt.stats()["delay"] == 2 and opt.stats()["fragments"] == 2


def test_checkpoint_with_rounds_in_flight_refused_by_a_job_that_does_not_stream():
    model, opt = sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=4, delay=3)
    for _ in range(5):  # the round of step 4 merges before step 7: in flight now
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    with opt.per_rank_checkpoint():
        sd = opt.state_dict()
    assert len(sd["local_sgd"]["in_flight"]) == 1
    model2, plain = sgd()
    plain = hvd.DistributedLocalSGD(plain, interval=4)
    with pytest.raises(ValueError, match="rounds in flight"):
        plain.load_state_dict(sd)
    model3, other = sgd(n_layers=2)
    other = hvd.DistributedLocalSGD(other, interval=4, delay=3)
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(sd)


def test_fragments_with_a_callable_epoch_length_that_f_does_not_divide_fail_at_that_epoch():
    """Epoch lengths from a callable are known only as each epoch starts: the step that would
    make the first fragment round of an epoch F does not divide raises, naming the epoch."""
    model, opt = sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=hvd.TimeVarying(lambda s: 4 if s == 1 else 3),
                                  fragments=2, delay=1)
    x = torch.randn(5, 4)
    for _ in range(4):  # epoch 1: 4 steps, fragment rounds after steps 2 and 4
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"fragments=2 must divide every epoch's length .* "
                                         r"epoch 2 .* has 3 steps"):
        opt.step()


def test_fragments_with_epochs_in_a_world_of_one_follow_plain_sgd():
    """Algorithm 2 with fragments and a delay, one rank: each fragment's round is the model
    itself, so the merges add nothing; the learning rate still follows the epochs."""
    model, opt = sgd()
    ref_model, ref_opt = sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=hvd.TimeVarying([4, 6, 2], lrs=[0.1, 0.05, 0.02]),
                                  fragments=2, delay=1)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 13):
        ref_lr = 0.1 if t <= 4 else 0.05 if t <= 10 else 0.02
        for group in ref_opt.param_groups:
            group["lr"] = ref_lr
        x = torch.randn(5, 4, generator=g)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        assert opt.param_groups[0]["lr"] == ref_lr
    opt.finalize()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
    # epochs 1-3: 2 fragment rounds each, then finalize(): one per fragment
    assert opt.stats()["rounds"] == 3 * 2 + 2


@pytest.mark.parametrize("schedule,warmup,steps,first", [
    # epochs of 6 with F=3: rounds after steps 2 (fragment 1), 4 (2), 6 (0), 8 (1), ...
    (lambda: hvd.TimeVarying([6], repeat_last=True), 0, 7, [1, 2, 0, 1]),   # mid-epoch, after fragment 0
    (lambda: hvd.TimeVarying([6], repeat_last=True), 0, 8, [2, 0, 1, 2]),   # fragment 1 of epoch 2 was its last
    (lambda: hvd.Heterogeneous([3]), 0, 6, [1, 2, 0, 1]),  # at an epoch's end
    # warm-up of 2: its steps left take every fragment, then epoch 1 from its start
    (lambda: hvd.TimeVarying([6], repeat_last=True), 2, 1, [0, 1, 2, 1, 2, 0]),
    # an interval of 6, F=3: fragment (t/2) mod 3 before the update of the even steps t
    (lambda: 6, 0, 7, [1, 2, 0, 1]),
])
def test_a_finished_rank_answers_the_fragment_rounds_in_the_order_the_others_make_them(
        schedule, warmup, steps, first):
    """finalize()'s walk (prsgd_hvd.fragments, NOTE: [fragment rounds]): from the step after a
    rank's last, the fragments whose rounds the ranks still training make, in order."""
    model, opt = sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=schedule(), fragments=3, delay=1,
                                  warmup_steps=warmup)
    x = torch.randn(5, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    frags = opt._local_sgd.streaming.frags
    walk = frags.walk(opt.local_step + 1)
    got = [opt._local_sgd.world.fragment_averagers.index(next(walk)) for _ in first]
    assert got == first
