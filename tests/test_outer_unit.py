"""Single-process tests of outer=... (Horovod world of one: the outer step is a Lookahead).

The multi-rank paths (Algorithms 1-3, warm-up, finalize, 16-bit deltas, resume) are held to the
float64 reference in tests/test_trajectories.py (its "outer" scenarios).
"""
import copy

import pytest
import torch
from torch import nn

import prsgd_hvd as hvd
from prsgd_hvd.outer import diloco


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    assert hvd.size() == 1
    yield


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64),
             torch.randn(5, 2, generator=g, dtype=torch.float64)) for _ in range(steps)]


def grad_step(m, opt, x, y):
    opt.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    opt.step()


def lookahead_reference(m, data, interval, inner_kwargs, outer_kwargs, average_now_at=()):
    """Plain torch: theta0 = x^0; before the update of every interval-th step (and at each
    average_now), theta0 <- outer step on theta0 - x, x <- theta0; the inner update follows."""
    m = copy.deepcopy(m)
    inner = torch.optim.SGD(m.parameters(), **inner_kwargs)
    theta = [p.detach().clone() for p in m.parameters()]
    outer = torch.optim.SGD(theta, **outer_kwargs)

    def outer_round():
        with torch.no_grad():
            for th, p in zip(theta, m.parameters()):
                th.grad = th - p
        outer.step()
        with torch.no_grad():
            for th, p in zip(theta, m.parameters()):
                p.copy_(th)

    for t, (x, y) in enumerate(data, start=1):
        inner.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        if t % interval == 0:
            outer_round()
        inner.step()
        if t in average_now_at:
            outer_round()
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("fused", [None, False])
def test_world_of_one_is_a_lookahead(fused):
    """The outer step applies with one rank (DiLoCo with one replica), on the fused-SGD path
    too (it must not bypass the outer step) and in average_now() rounds."""
    inner_kwargs, outer_kwargs = {"lr": 0.1, "momentum": 0.9}, {"lr": 0.7, "momentum": 0.9,
                                                               "nesterov": True}
    m, data = model(), batches(9)
    want = lookahead_reference(m, data, 3, inner_kwargs, outer_kwargs, average_now_at=(4,))
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), **inner_kwargs), interval=3,
                                  fused=fused, outer=diloco(lr=0.7, momentum=0.9))
    for t, (x, y) in enumerate(data, start=1):
        grad_step(m, opt, x, y)
        if t == 4:
            opt.average_now()
    for p, w in zip(m.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    # and it is not plain local SGD (which a world of one would otherwise be)
    plain = copy.deepcopy(model())
    inner = torch.optim.SGD(plain.parameters(), **inner_kwargs)
    for x, y in data:
        grad_step(plain, inner, x, y)
    assert any(not torch.allclose(p, q) for p, q in zip(m.parameters(), plain.parameters()))


def test_outer_lr1_is_plain_local_sgd_with_one_rank():
    m, data = model(), batches(6)
    plain = copy.deepcopy(m)
    inner = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.5)
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
                                  interval=2, outer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    for x, y in data:
        grad_step(m, opt, x, y)
        grad_step(plain, inner, x, y)
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


@pytest.mark.parametrize("outer,error,words", [
    (5, TypeError, "callable"),
    (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), TypeError, "not an optimizer"),
    (lambda ps: None, TypeError, "not a torch.optim.Optimizer"),
    (lambda ps: torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.7), ValueError,
     "other tensors"),
    (lambda ps: torch.optim.SGD(ps[:1], lr=0.7), ValueError, "other tensors"),
    (lambda ps: torch.optim.LBFGS(ps), ValueError, "closure"),
])
def test_bad_outer_is_refused_at_construction(outer, error, words):
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(error, match=words):
        hvd.DistributedLocalSGD(opt, interval=2, outer=outer)
    assert type(opt) is torch.optim.SGD and not hasattr(opt, "_local_sgd")  # left as it was


def test_the_outer_tensors_are_fp32_copies_for_16_bit_parameters():
    m = nn.Linear(3, 2).half()
    seen = []

    def factory(ps):
        seen.extend(ps)
        return torch.optim.SGD(ps, lr=0.7)
    hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1), interval=2, outer=factory)
    assert [t.dtype for t in seen] == [torch.float32, torch.float32]
    assert all(t.data_ptr() != p.data_ptr() for t, p in zip(seen, m.parameters()))


def _train(m, opt, data):
    for x, y in data:
        grad_step(m, opt, x, y)


def test_checkpoint_carries_theta0_and_the_outer_state():
    """Resume mid-interval == uninterrupted, bit for bit; the entry holds theta0 and momentum."""
    data = batches(10)
    make = lambda m: hvd.DistributedLocalSGD(  # noqa: E731
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), interval=3, outer=diloco())
    m1 = model()
    o1 = make(m1)
    _train(m1, o1, data)
    m2 = model()
    o2 = make(m2)
    _train(m2, o2, data[:5])
    sd = copy.deepcopy({"model": m2.state_dict(), "opt": o2.state_dict()})
    assert sd["opt"]["local_sgd"]["outer"]["optimizer"]["state"], "no outer momentum saved"
    m3 = model()
    o3 = make(m3)
    m3.load_state_dict(sd["model"])
    o3.load_state_dict(sd["opt"])
    _train(m3, o3, data[5:])
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_with_and_without_outer_state_do_not_mix():
    data = batches(4)
    m = model()
    with_outer = hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1), interval=2,
                                         outer=diloco())
    _train(m, with_outer, data)
    m2 = model()
    without = hvd.DistributedLocalSGD(torch.optim.SGD(m2.parameters(), lr=0.1), interval=2)
    _train(m2, without, data[:3])
    before = (without.local_step, without.rounds)
    with pytest.raises(ValueError, match="wrapped without outer="):
        without.load_state_dict(with_outer.state_dict())
    assert (without.local_step, without.rounds) == before
    theta_before = [t.clone() for t in with_outer._local_sgd.outer.theta]
    step_before = with_outer.local_step
    with pytest.raises(ValueError, match="no outer state"):
        with_outer.load_state_dict(without.state_dict())
    assert with_outer.local_step == step_before
    assert all(torch.equal(a, b) for a, b in zip(theta_before, with_outer._local_sgd.outer.theta))


def test_outer_is_part_of_what_ranks_agree_on():
    m = model()
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1), interval=2,
                                  outer=diloco(lr=0.6))
    described = opt._local_sgd.description()["outer optimizer"]
    assert described["class"] == "SGD"
    assert described["param_groups"][0]["lr"] == 0.6
    assert described["param_groups"][0]["nesterov"] is True


def test_slowmo_is_sgd_with_slow_momentum_and_steps_like_slowmo_at_constant_lr():
    """slowmo(alpha, beta) builds SGD(lr=alpha, momentum=beta); with a constant inner lr gamma
    it takes SlowMo's own steps: u = beta*u + g/gamma, theta -= alpha*gamma*u."""
    from prsgd_hvd.outer import slowmo
    theta = [torch.zeros(3, dtype=torch.float64)]
    opt = slowmo(slowmo_lr=0.8, slowmo_momentum=0.6)(theta)
    assert type(opt) is torch.optim.SGD
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"]) == (0.8, 0.6, False)
    gamma, u, ref = 0.05, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for k in range(4):
        pseudo = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (k + 1)
        theta[0].grad = pseudo.clone()
        opt.step()
        u = 0.6 * u + pseudo / gamma
        ref = ref - 0.8 * gamma * u
        torch.testing.assert_close(theta[0], ref)
