"""Single-process tests of DistributedLocalSGD (Horovod world of size 1, no horovodrun)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import prsgd_hvd as hvd


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    assert hvd.size() == 1
    yield


def model_and_sgd(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **kw)
    return model, opt


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def test_is_instance_of_the_users_class_and_keeps_its_state():
    model, opt = model_and_sgd(momentum=0.9)
    train(model, opt, 2)
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    wrapped = hvd.DistributedLocalSGD(opt, interval=2)
    assert wrapped is opt and isinstance(wrapped, torch.optim.SGD)
    assert type(wrapped).__name__ == "SGD"
    for p, b in zip(model.parameters(), bufs):
        torch.testing.assert_close(wrapped.state[p]["momentum_buffer"], b)


def test_registered_on_horovod_torch():
    import horovod.torch as htorch
    assert htorch.DistributedLocalSGD is hvd.DistributedLocalSGD
    assert htorch.FixedInterval is hvd.FixedInterval
    assert hvd.allreduce is htorch.allreduce  # and everything horovod.torch exports


@pytest.mark.parametrize("fused", [None, False])
def test_size_one_equals_plain_torch_and_counts_rounds(fused):
    model_a, opt_a = model_and_sgd(momentum=0.9, weight_decay=1e-2, nesterov=True)
    model_b = copy.deepcopy(model_a)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt_a = hvd.DistributedLocalSGD(opt_a, interval=3, fused=fused, warmup_steps=1)
    train(model_a, opt_a, 7)
    train(model_b, opt_b, 7)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert opt_a.local_step == 7
    assert opt_a.rounds == 3  # t=1 (warm-up), 3, 6
    opt_a.average_now()
    opt_a.finalize()
    assert opt_a.rounds == 5
    stats = opt_a.stats()
    assert {"local_step", "rounds", "bytes_sent", "comm_seconds", "exposed_comm_seconds"} <= set(stats)
    assert stats["bytes_sent"] == 0  # a world of one sends nothing


def test_fused_path_is_chosen_for_sgd_when_kernels_are_built():
    model, opt = model_and_sgd(momentum=0.9)
    opt = hvd.DistributedLocalSGD(opt, interval=2)
    assert opt.stats()["fused"] == hvd.ops.has_extension()
    model, opt = model_and_sgd()
    assert hvd.DistributedLocalSGD(opt, interval=2, fused=False).stats()["fused"] is False


def test_checkpoint_round_trip_mid_interval_keeps_the_schedule():
    model, opt = model_and_sgd(momentum=0.9)
    opt = hvd.DistributedLocalSGD(opt, interval=4)
    train(model, opt, 6)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    assert ckpt["opt"]["local_sgd"]["local_step"] == 6
    model2, opt2 = model_and_sgd(momentum=0.9)
    opt2 = hvd.DistributedLocalSGD(opt2, interval=4)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.local_step, opt2.rounds) == (6, 1)
    train(model2, opt2, 2, seed=1)
    assert opt2.rounds == 2  # t = 8 averaged, as an uninterrupted run would
    # A plain torch optimizer can still load the checkpoint (the extra key is ignored there).
    _, plain = model_and_sgd(momentum=0.9)
    sd = dict(ckpt["opt"])
    sd.pop("local_sgd")
    plain.load_state_dict(sd)


def test_checkpoint_mid_epoch_resumes_time_varying_where_it_stood():
    """Algorithm 2's position (epoch, where it began) travels in the checkpoint: a fresh
    optimizer that loads it averages at the same steps, with the same lr, as an uninterrupted
    run; from a fresh position it would end the epoch at step 4 instead of 5."""
    def schedule():
        return hvd.TimeVarying([1, 4, 2], lrs=[0.1, 0.05, 0.02])

    def record(opt, model, steps, seed):
        out = []
        for k in range(steps):
            train(model, opt, 1, seed=seed + k)
            out.append((opt.local_step, opt.rounds, opt.param_groups[0]["lr"]))
        return out

    model, opt = model_and_sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=schedule())
    whole = record(opt, model, 7, seed=10)
    model, opt = model_and_sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=schedule())
    first = record(opt, model, 3, seed=10)
    ckpt = copy.deepcopy(opt.state_dict())
    model2, opt2 = model_and_sgd()
    opt2 = hvd.DistributedLocalSGD(opt2, interval=schedule())
    opt2.load_state_dict(ckpt)
    assert first + record(opt2, model2, 4, seed=13) == whole
    assert [r for _, r, _ in whole] == [1, 1, 1, 1, 2, 2, 3]


def test_lr_scheduler_and_closure():
    model, opt = model_and_sgd()
    opt = hvd.DistributedLocalSGD(opt, interval=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    sched.step()
    assert torch.is_tensor(loss) and opt.local_step == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_scheduler_created_before_wrapping_works():
    """torch's scheduler patches step() on the instance; it is re-installed around ours."""
    model, opt = model_and_sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt = hvd.DistributedLocalSGD(opt, interval=2)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            sched.step()
    assert opt.local_step == 2 and opt.rounds == 1  # our step ran (a world of one averages too)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_foreign_step_patch_before_wrapping_is_a_clear_error():
    _, opt = model_and_sgd()
    opt.step = lambda *a, **k: None
    with pytest.raises(ValueError, match="replaced on the instance"):
        hvd.DistributedLocalSGD(opt, interval=2)


@pytest.mark.parametrize("interval,exc,match", [
    (0, ValueError, "interval"), (-3, ValueError, "interval"), (1.5, TypeError, "interval"),
    ("4", TypeError, "interval"), (True, TypeError, "interval"), (None, TypeError, "interval"),
])
def test_bad_interval(interval, exc, match):
    _, opt = model_and_sgd()
    with pytest.raises(exc, match=match):
        hvd.DistributedLocalSGD(opt, interval=interval)


def test_bad_arguments_name_the_argument():
    model, opt = model_and_sgd()
    with pytest.raises(ValueError, match="warmup_steps"):
        hvd.DistributedLocalSGD(opt, interval=2, warmup_steps=-1)
    with pytest.raises(ValueError, match="fused"):
        hvd.DistributedLocalSGD(opt, interval=2, fused="yes")
    with pytest.raises(TypeError, match="optimizer"):
        hvd.DistributedLocalSGD(model, interval=2)
    with pytest.raises(TypeError, match="model"):
        hvd.DistributedLocalSGD(opt, interval=2, model=opt)
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="named_parameters.*not in the optimizer"):
        hvd.DistributedLocalSGD(opt, interval=2, named_parameters=other.named_parameters())
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="fused=True"):
        hvd.DistributedLocalSGD(adam, interval=2, fused=True)
    wrapped = hvd.DistributedLocalSGD(opt, interval=2)
    with pytest.raises(ValueError, match="already wrapped"):
        hvd.DistributedLocalSGD(wrapped, interval=2)


def test_model_buffers_and_optimizer_state_are_included_when_asked():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    opt = hvd.DistributedLocalSGD(opt, interval=1, model=model, average_state=True)
    train_bn = lambda: (opt.zero_grad(), model(torch.randn(6, 4)).sum().backward(), opt.step())
    train_bn()
    ls = opt._local_sgd
    tensors, n_params = ls.contents.tensors(ls.collectives)
    assert n_params == len(list(model.parameters()))
    ids = {id(t) for t in tensors}
    assert id(model[1].running_mean) in ids and id(model[1].running_var) in ids
    assert id(model[1].num_batches_tracked) not in ids  # integer buffers are not averaged
    assert id(opt.state[model[0].weight]["exp_avg"]) in ids


def test_new_arguments_are_validated_by_name():
    model, opt = model_and_sgd()
    with pytest.raises(ValueError, match="compression"):
        hvd.DistributedLocalSGD(opt, interval=2, compression="int4")
    with pytest.raises(ValueError, match="nonfinite"):
        hvd.DistributedLocalSGD(opt, interval=2, nonfinite="skip")
    with pytest.raises(ValueError, match="overlap"):
        hvd.DistributedLocalSGD(opt, interval=2, overlap="yes")
    with pytest.raises(ValueError, match="group size 2.*does not divide the 1 ranks"):
        hvd.DistributedLocalSGD(opt, interval=hvd.Hierarchical({2: 2}))
    with pytest.raises(TypeError, match="Hierarchical"):
        hvd.Hierarchical([2, 4])
    # A failed wrap leaves the optimizer as it was.
    assert type(opt) is torch.optim.SGD and not hasattr(opt, "_local_sgd")


@pytest.mark.parametrize("fused", [None, False])
def test_param_groups_dtypes_and_add_param_group_after_wrapping(fused):
    """Several groups with their own lr, fp32/fp64/bf16 parameters, a group added later."""
    def build():
        torch.manual_seed(3)
        a, b, c = nn.Linear(4, 3), nn.Linear(3, 3).double(), nn.Linear(3, 2).to(torch.bfloat16)
        opt = torch.optim.SGD([{"params": a.parameters(), "lr": 0.1},
                               {"params": b.parameters(), "lr": 0.05, "momentum": 0.9}],
                              lr=0.2, momentum=0.5, weight_decay=1e-3)
        return (a, b, c), opt

    def loss(mods, x):
        a, b, c = mods
        return c(torch.tanh(b(torch.tanh(a(x)).double())).to(torch.bfloat16)).float().pow(2).mean()

    mods_a, opt_a = build()
    mods_b, opt_b = build()
    opt_a = hvd.DistributedLocalSGD(opt_a, interval=2, fused=fused)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 7):
        if t == 3:
            opt_a.add_param_group({"params": mods_a[2].parameters(), "lr": 0.3})
            opt_b.add_param_group({"params": mods_b[2].parameters(), "lr": 0.3})
        x = torch.randn(5, 4, generator=g)
        for mods, opt in ((mods_a, opt_a), (mods_b, opt_b)):
            opt.zero_grad()
            loss(mods, x).backward()
            opt.step()
    assert opt_a.rounds == 3
    for ma, mb in zip(mods_a, mods_b):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            tol = 2e-2 if pa.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
