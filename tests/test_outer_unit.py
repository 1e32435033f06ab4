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


# ---- SlowMo with a changing inner learning rate (prsgd_hvd.outer.slowmo(opt, ...)) ----------
def slowmo_paper(thetas, pseudo_grads, gammas, alpha, beta):
    """SlowMo's Algorithm 1 in float64: u <- beta*u + g/gamma_t, x0 <- x0 - alpha*gamma_t*u."""
    x0 = [t.clone() for t in thetas]
    u = [torch.zeros_like(t) for t in thetas]
    for gs, gamma in zip(pseudo_grads, gammas):
        for k, g in enumerate(gs):
            u[k] = beta * u[k] + g / gamma
            x0[k] = x0[k] - alpha * gamma * u[k]
    return x0


def test_slowmo_over_the_inner_optimizer_follows_its_changing_lr():
    """slowmo(inner, alpha, beta) is SlowMo's own update with gamma read at every step: held to
    the paper's rule through a StepLR, and apart from the SGD form (which is SlowMo only at a
    constant gamma) by far more than rounding."""
    from prsgd_hvd.outer import slowmo
    from prsgd_hvd.slowmo import SlowMo
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    inner = torch.optim.SGD([w], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    start = [torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    theta = [t.clone() for t in start]
    opt = slowmo(inner, slowmo_lr=0.9, slowmo_momentum=0.7)(theta)
    sgd_theta = [t.clone() for t in start]
    sgd = slowmo(slowmo_lr=0.9, slowmo_momentum=0.7)(sgd_theta)
    assert isinstance(opt, SlowMo) and type(sgd) is torch.optim.SGD
    g = torch.Generator().manual_seed(3)
    grads, gammas = [], []
    for _ in range(5):
        gs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in start]
        grads.append(gs)
        gammas.append(inner.param_groups[0]["lr"])
        for t, s, gr in zip(theta, sgd_theta, gs):
            t.grad, s.grad = gr.clone(), gr.clone()
        opt.step()
        sgd.step()
        inner.step()
        sched.step()
    assert len(set(gammas)) == 5
    want = slowmo_paper(start, grads, gammas, 0.9, 0.7)
    for t, w_ in zip(theta, want):
        torch.testing.assert_close(t, w_, rtol=1e-12, atol=1e-12)
    assert opt.state[theta[0]]["inner_lr"] == gammas[-1]
    apart = max(float((s - w_).abs().max()) for s, w_ in zip(sgd_theta, want))
    assert apart > 1e-2, apart


def test_slowmo_state_dict_round_trip_and_callable_lr():
    """An honest torch optimizer: u in state, alpha/beta in param_groups, restored by
    load_state_dict into a fresh one, which then steps as the original does."""
    from prsgd_hvd.slowmo import SlowMo
    gamma = [0.1]
    a = [torch.ones(4, dtype=torch.float64)]
    opt = SlowMo(a, lambda: gamma[0], lr=0.8, momentum=0.5)
    a[0].grad = torch.full((4,), 0.3, dtype=torch.float64)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["lr"] == 0.8 and saved["param_groups"][0]["momentum"] == 0.5
    assert torch.is_tensor(saved["state"][0]["slow_momentum"])
    b = [a[0].clone()]
    fresh = SlowMo(b, lambda: gamma[0], lr=0.1, momentum=0.0)
    fresh.load_state_dict(saved)
    gamma[0] = 0.05
    for t in (a[0], b[0]):
        t.grad = torch.full((4,), -0.2, dtype=torch.float64)
    opt.step()
    fresh.step()
    assert torch.equal(a[0], b[0])
    assert fresh.param_groups[0]["lr"] == 0.8


@pytest.mark.parametrize("call,error,words", [
    (lambda o: __import__("prsgd_hvd").outer.slowmo("fast"), TypeError, "inner optimizer"),
    (lambda o: __import__("prsgd_hvd").outer.slowmo(o, slowmo_momentum=1.0), ValueError, r"\[0, 1\)"),
    (lambda o: __import__("prsgd_hvd").outer.slowmo(o, slowmo_lr=-1.0), ValueError, "> 0"),
    (lambda o: __import__("prsgd_hvd").outer.slowmo(1.0, 0.5, 0.4), TypeError, "two"),
])
def test_slowmo_bad_arguments(call, error, words):
    inner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(error, match=words):
        call(inner)


def test_slowmo_first_form_positional_is_still_sgd():
    from prsgd_hvd.outer import slowmo
    g = slowmo(0.8, 0.6)([torch.zeros(2)]).param_groups[0]
    assert (g["lr"], g["momentum"]) == (0.8, 0.6)
    g = slowmo(0.8, slowmo_momentum=0.3)([torch.zeros(2)]).param_groups[0]
    assert (g["lr"], g["momentum"]) == (0.8, 0.3)


def test_slowmo_refuses_an_ambiguous_or_bad_inner_lr():
    from prsgd_hvd.outer import slowmo
    w1, w2 = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    inner = torch.optim.SGD([{"params": [w1], "lr": 0.1}, {"params": [w2], "lr": 0.2}])
    theta = [torch.zeros(2)]
    opt = slowmo(inner)(theta)
    theta[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="different learning rates"):
        opt.step()
    opt = slowmo(lambda: 0.0)(theta)
    with pytest.raises(ValueError, match="divides by it"):
        opt.step()
    assert torch.equal(theta[0], torch.zeros(2))  # nothing applied


def test_slowmo_is_what_ranks_agree_on_and_takes_the_unfused_step():
    from prsgd_hvd.outer import slowmo
    m = model()
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = hvd.DistributedLocalSGD(inner, interval=2, outer=slowmo(inner, 0.9, 0.4))
    described = opt._local_sgd.description()["outer optimizer"]
    assert described == {"class": "SlowMo", "param_groups": [{"lr": 0.9, "momentum": 0.4}]}
    _train(m, opt, batches(4))
    assert opt.stats()["rounds"] == 2 and opt.stats()["fused_outer_rounds"] == 0


# ---- outer_device: theta0 and the outer state in host memory ----------------------------------
@pytest.mark.parametrize("kwargs,error,words", [
    ({"outer_device": "cpu"}, ValueError, "no outer optimizer"),
    ({"outer": diloco(), "outer_device": "gpu0"}, ValueError, "not a device"),
    ({"outer": diloco(), "outer_device": "meta"}, ValueError, "'cpu'"),
    ({"outer": diloco(), "outer_device": 0}, TypeError, "device name"),
    ({"outer": diloco(), "outer_device": "cuda:7"}, ValueError, "CUDA"),
])
def test_bad_outer_device_is_refused_at_construction(kwargs, error, words):
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    if kwargs.get("outer_device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(error, match=words):
        hvd.DistributedLocalSGD(opt, interval=2, **kwargs)
    assert type(opt) is torch.optim.SGD and not hasattr(opt, "_local_sgd")


def _job(outer, outer_device, fused=None, inner="sgd"):
    m = model()
    inner_opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if inner == "sgd" \
        else torch.optim.Adam(m.parameters(), lr=0.01)
    opt = hvd.DistributedLocalSGD(inner_opt, interval=3, fused=fused, outer=outer,
                                  outer_device=outer_device)
    return m, opt


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("outer", ["diloco", "adam"])
def test_outer_device_gives_the_same_bits_from_host_memory(monkeypatch, fused, outer):
    """outer_device="cpu" forces the staged copy path (here host and round are both the CPU):
    the same bits as without it, on the fused kernel (DiLoCo) and through the outer optimizer's
    own step() once per chunk (Adam, whose step counter stays where torch keeps it); theta0
    and the state found on the host, staged one tensor per chunk."""
    from prsgd_hvd import outer_host
    monkeypatch.setattr(outer_host, "STAGE_BYTES", 8)  # every tensor a chunk of its own
    make = {"diloco": diloco, "adam": lambda: (lambda ps: torch.optim.Adam(ps, lr=0.05))}[outer]
    data = batches(10)
    m0, o0 = _job(make(), None, fused)
    m1, o1 = _job(make(), "cpu", fused)
    _train(m0, o0, data)
    _train(m1, o1, data)
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p, q)
    assert o1.stats()["fused_outer_rounds"] == o0.stats()["fused_outer_rounds"]
    assert (o1.stats()["fused_outer_rounds"] > 0) == (outer == "diloco" and fused is None)
    where = o1._local_sgd.outer.placement()
    assert where["outer_device"] == "cpu" and where["theta"] == ["cpu"]
    assert where["state"] == ["cpu"] and where["chunks"] == 4  # the model's 4 tensors
    biggest = max(p.numel() * 8 for p in m1.parameters())
    per_elem = {"diloco": 2, "adam": 3}[outer]  # theta0 + momentum; theta0 + Adam's moments
    assert where["staged_bytes_max"] == per_elem * biggest
    assert o1.stats()["outer_device"] == "cpu" and o0.stats()["outer_device"] is None
    assert o0._local_sgd.outer.placement()["chunks"] == 0
    # the optimizer's state is keyed by the host tensors again, nothing left behind
    outer_opt = o1._local_sgd.outer.opt
    held = [p for g in outer_opt.param_groups for p in g["params"]]
    assert all(any(p is t for t in o1._local_sgd.outer.theta) for p in held)
    assert set(map(id, outer_opt.state)) == set(map(id, held))


def test_outer_device_checkpoints_load_either_way(monkeypatch):
    """A checkpoint saved with outer_device="cpu" holds host tensors; it resumes bit for bit
    into a job with the option or without it, and so does one saved without it."""
    from prsgd_hvd import outer_host
    monkeypatch.setattr(outer_host, "STAGE_BYTES", 8)
    data = batches(10)
    m_ref, o_ref = _job(diloco(), None)
    _train(m_ref, o_ref, data)
    for saved_on, loaded_on in [("cpu", None), (None, "cpu"), ("cpu", "cpu")]:
        m, o = _job(diloco(), saved_on)
        _train(m, o, data[:5])
        sd = copy.deepcopy({"model": m.state_dict(), "opt": o.state_dict()})
        entry = sd["opt"]["local_sgd"]["outer"]
        assert all(a.device.type == "cpu" for a in entry["anchor"])
        assert entry["optimizer"]["state"], "no outer momentum saved"
        m2, o2 = _job(diloco(), loaded_on)
        m2.load_state_dict(sd["model"])
        o2.load_state_dict(sd["opt"])
        if loaded_on is not None:
            assert o2._local_sgd.outer.placement()["state"] == ["cpu"]
        _train(m2, o2, data[5:])
        for p, q in zip(m_ref.parameters(), m2.parameters()):
            assert torch.equal(p, q), (saved_on, loaded_on)


def test_outer_device_broadcast_optimizer_state_keeps_host_tensors(monkeypatch):
    """hvd.broadcast_optimizer_state (through the checkpoint entry) leaves theta0 and the
    outer state in host memory and the job on the same bits."""
    data = batches(8)
    m0, o0 = _job(diloco(), None)
    m1, o1 = _job(diloco(), "cpu")
    _train(m0, o0, data[:4])
    _train(m1, o1, data[:4])
    hvd.broadcast_optimizer_state(o1, root_rank=0)
    hvd.broadcast_optimizer_state(o0, root_rank=0)
    where = o1._local_sgd.outer.placement()
    assert where["theta"] == ["cpu"] and where["state"] == ["cpu"]
    _train(m0, o0, data[4:])
    _train(m1, o1, data[4:])
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p, q)


def test_outer_device_with_streaming_rounds(monkeypatch):
    """Streaming jobs (delay=, fragments=) take the outer step in their settle, through the
    same staged chunks: the same bits as without outer_device, through finalize()."""
    from prsgd_hvd import outer_host
    monkeypatch.setattr(outer_host, "STAGE_BYTES", 8)
    data = batches(13)
    finals = []
    for outer_device in (None, "cpu"):
        m = model()
        opt = hvd.DistributedLocalSGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                      interval=4, delay=1, fragments=2, outer=diloco(),
                                      outer_device=outer_device)
        _train(m, opt, data)
        opt.finalize()
        finals.append([p.detach().clone() for p in m.parameters()])
    for p, q in zip(*finals):
        assert torch.equal(p, q)
    where = opt._local_sgd.outer.placement()
    assert where["theta"] == ["cpu"] and where["state"] == ["cpu"] and where["chunks"] >= 1
    assert opt.stats()["rounds"] > 4
