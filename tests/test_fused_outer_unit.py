"""Single-process tests of the fused outer round (prsgd_hvd.fused_outer) in a Horovod world of
one, where the outer step still applies (a Lookahead): held to plain torch (torch.optim.SGD as
both optimizers, no prsgd_hvd code), with several param groups on both sides, and to the
unfused rule it stands in for. The multi-rank paths are tests/test_trajectories.py's outer_*
scenarios (which assert that the fused rule wrote their rounds).
"""
import copy

import pytest
import torch
from torch import nn

import prsgd_hvd as hvd
from prsgd_hvd import ops

pytestmark = pytest.mark.skipif(not ops.has_extension(), reason="the fused rule needs the kernels")


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    assert hvd.size() == 1
    yield


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def batches(steps, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g).to(dtype), torch.randn(5, 2, generator=g).to(dtype))
            for _ in range(steps)]


def inner_groups(ps):
    return [{"params": ps[:1], "lr": 0.1, "momentum": 0.9},
            {"params": ps[1:], "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3, "nesterov": True}]


def outer_groups(ps):
    """Two outer groups that cut across the inner ones: DiLoCo's Nesterov and a dampened,
    decayed heavy ball."""
    return [{"params": ps[:2], "lr": 0.7, "momentum": 0.9, "nesterov": True},
            {"params": ps[2:], "lr": 0.5, "momentum": 0.8, "dampening": 0.2, "weight_decay": 1e-2}]


def loss_step(m, opt, x, y):
    opt.zero_grad()
    ((m(x).float() - y.float()) ** 2).mean().backward()
    opt.step()


def reference(m, data, interval, average_now_at=()):
    """Plain torch: theta0 = x^0; before the update of every interval-th step (and after the
    steps in average_now_at), theta0 <- SGD step on theta0 - x, x <- theta0."""
    m = copy.deepcopy(m)
    inner = torch.optim.SGD(inner_groups(list(m.parameters())), lr=0.1)
    theta = [p.detach().clone() for p in m.parameters()]
    outer = torch.optim.SGD(outer_groups(theta), lr=0.1)

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
    return m, theta, outer


def wrapped(m, fused=None, outer=outer_groups):
    return hvd.DistributedLocalSGD(torch.optim.SGD(inner_groups(list(m.parameters())), lr=0.1),
                                   interval=3, fused=fused,
                                   outer=lambda ps: torch.optim.SGD(outer(ps), lr=0.1))


def train(m, opt, data, average_now_at=()):
    for t, (x, y) in enumerate(data, start=1):
        loss_step(m, opt, x, y)
        if t in average_now_at:
            opt.average_now()


def test_fused_rounds_match_torch_with_param_groups():
    """Scheduled rounds (the inner update fused in) and average_now() rounds (none follows),
    two outer and two inner groups crossing each other: params, theta0 and the outer momentum
    buffers -- torch's own state entries -- as torch.optim.SGD computes them."""
    data = batches(10)
    want_m, want_theta, want_outer = reference(model(), data, 3, average_now_at=(4,))
    m = model()
    opt = wrapped(m)
    train(m, opt, data, average_now_at=(4,))
    stats = opt.stats()
    assert stats["fused_outer_rounds"] == stats["rounds"] == 4
    assert stats["fused_outer_updates"] == 3  # steps 3, 6, 9; not the average_now() round
    for p, w in zip(m.parameters(), want_m.parameters()):
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6)
    outer = opt._local_sgd.outer
    for th, w in zip(outer.theta, want_theta):
        torch.testing.assert_close(th, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outer.opt.state[th]["momentum_buffer"],
                                   want_outer.state[w]["momentum_buffer"], rtol=1e-5, atol=1e-6)
        assert th.grad is None  # the fused rule never sets the pseudo-gradient as .grad


def test_fused_and_unfused_agree_and_unfused_takes_over_the_state():
    """fused=False (the reference path) gives the same model; and a round that falls back to
    the unfused rule after fused ones (a step hook on the outer optimizer: the kernel would skip
    it) continues from the momentum buffers the kernel wrote, with torch's own step()."""
    data = batches(12)
    m1, m2 = model(), model()
    fused, unfused = wrapped(m1), wrapped(m2, fused=False)
    train(m1, fused, data[:6])
    train(m2, unfused, data[:6])
    assert fused.stats()["fused_outer_rounds"] == 2 and unfused.stats()["fused_outer_rounds"] == 0
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    calls = []
    fused._local_sgd.outer.opt.register_step_post_hook(lambda *a: calls.append(1))
    train(m1, fused, data[6:])
    train(m2, unfused, data[6:])
    assert len(calls) == 2, "the hooked outer optimizer's own step() must run (unfused rounds)"
    assert fused.stats()["fused_outer_rounds"] == 2
    want, _, _ = reference(model(), data, 3)
    for p, q, w in zip(m1.parameters(), m2.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["differentiable", "tensor_lr"])
def test_options_the_kernel_cannot_honour_fall_back(option):
    def outer(ps):
        groups = outer_groups(ps)
        if option == "tensor_lr":
            groups[1]["lr"] = torch.tensor(0.5)
        return groups
    kw = {"differentiable": True} if option == "differentiable" else {}
    data = batches(6)
    m = model()
    opt = hvd.DistributedLocalSGD(torch.optim.SGD(inner_groups(list(m.parameters())), lr=0.1),
                                  interval=3, outer=lambda ps: torch.optim.SGD(outer(ps), lr=0.1, **kw))
    train(m, opt, data)
    assert opt.stats()["rounds"] == 2 and opt.stats()["fused_outer_rounds"] == 0
    want, _, _ = reference(model(), data, 3)
    for p, w in zip(m.parameters(), want.parameters()):
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_parameters(dtype):
    """fp16/bf16 parameters with fp32 theta0: the fused round rounds once, the unfused one
    (and torch) after every op; both stay within a few 16-bit ulps of each other."""
    data = batches(9, dtype)
    m1, m2 = model(dtype), model(dtype)
    fused, unfused = wrapped(m1), wrapped(m2, fused=False)
    train(m1, fused, data)
    train(m2, unfused, data)
    assert fused.stats()["fused_outer_rounds"] == 3 and fused.stats()["fused_outer_updates"] == 3
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=0.02, atol=0.02)
    for th1, th2 in zip(fused._local_sgd.outer.theta, unfused._local_sgd.outer.theta):
        assert th1.dtype == torch.float32
        torch.testing.assert_close(th1, th2, rtol=0.02, atol=0.02)
    # and the rounds did move theta0 away from x^0
    assert any(not torch.equal(th, p.float()) for th, p in zip(fused._local_sgd.outer.theta,
                                                               model(dtype).parameters()))


def test_inner_adam_fuses_the_outer_round_only():
    """An inner optimizer other than SGD: the outer round is fused, its update is Adam's own."""
    data = batches(6)
    m1, m2 = model(), model()
    make = lambda m, fused: hvd.DistributedLocalSGD(  # noqa: E731
        torch.optim.Adam(m.parameters(), lr=0.01), interval=3, fused=fused,
        outer=lambda ps: torch.optim.SGD(outer_groups(ps), lr=0.1))
    o1, o2 = make(m1, None), make(m2, False)
    train(m1, o1, data)
    train(m2, o2, data)
    assert o1.stats()["fused_outer_rounds"] == 2 and o1.stats()["fused_outer_updates"] == 0
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_averaged_inner_state_is_averaged_before_the_fused_step():
    """average_state=True puts the inner momentum buffers in the round, after the parameters:
    the fused rule must average them first and step with the averaged buffers (and not touch
    them as parameters). One round written by the rule, against plain torch doing the unfused
    order: average everything, the outer SGD step, the inner SGD step."""
    from prsgd_hvd.anchor import Anchor
    from prsgd_hvd.averaging import BucketLayout, Round, RoundId
    from prsgd_hvd.fused_outer import FusedOuterSgd
    from prsgd_hvd.fused_sgd import FusedAverageSgd
    from prsgd_hvd.outer import OuterOptimizer

    m, (x, y) = model(), batches(1)[0]
    inner = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    loss_step(m, inner, x, y)  # creates the inner momentum buffers
    params = list(m.parameters())
    bufs = [inner.state[p]["momentum_buffer"] for p in params]
    outer = OuterOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
                           params)
    outer.start()
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    layout = BucketLayout(params + bufs, 1)
    b = layout.buckets[0]
    b.payload.copy_(torch.randn(b.payload.shape, generator=torch.Generator().manual_seed(1)))
    layout.write_record(0, (2.0, 1.0, 1.0, 1.0, 0.0, 0.0, float(layout.checksum)))  # weight 2
    rnd = Round(layout, RoundId("scheduled", 1), layout.read_records(), members=[0],
                anchor=Anchor(kept=False))
    averages = [b.flat[o:o + t.numel()].view(t.shape) * 0.5 for o, t in zip(b.offsets, b.tensors)]
    # plain torch, on copies
    want_p = [nn.Parameter(a.clone()) for a in averages[:len(params)]]
    want_theta = [p.detach().clone() for p in params]  # theta0 = x^0 = the params now
    want_outer = torch.optim.SGD(want_theta, lr=0.7, momentum=0.9, nesterov=True)
    for th, a in zip(want_theta, want_p):
        th.grad = th - a.detach()
    want_outer.step()
    want_inner = torch.optim.SGD(want_p, lr=0.1, momentum=0.9, weight_decay=1e-2)
    with torch.no_grad():
        for wp, th, a, g in zip(want_p, want_theta, averages[len(params):], grads):
            wp.copy_(th)
            wp.grad = g.clone()
            want_inner.state[wp]["momentum_buffer"] = a.clone()
    want_inner.step()
    counted = []
    rule = FusedOuterSgd(outer, FusedAverageSgd(inner), counted.append)
    assert rule.applies(rnd) and rule.fuses_update
    rule.write(rnd, len(params))
    assert counted == [True]
    for p, w, buf, wp in zip(params, want_p, bufs, want_p):
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buf, want_inner.state[wp]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    for th, w in zip(outer.theta, want_theta):
        torch.testing.assert_close(th, w, rtol=1e-5, atol=1e-6)
