"""The examples run end to end under a real ``horovodrun -np 2 --gloo`` with tiny settings.

The ResNet-20 example reads a CIFAR-10-format folder this test writes (python pickles, the
layout torchvision uses): it must log, checkpoint, resume from the checkpoint and finish with
the averaged model. The Algorithm 2 and 3 examples must print their comparison tables.
"""
import csv
import pickle

import numpy as np
import pytest
import torch

from example_runner import rank0_lines, run_example

pytestmark = pytest.mark.timeout(300)


def write_tiny_cifar(root, n_train=64, n_test=32):
    """cifar-10-batches-py/ with data_batch_1..5 (n_train images in all) and test_batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, n):
        labels = rng.integers(0, 10, n).tolist()
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", n_train // 5 + (1 if i <= n_train % 5 else 0))
    dump("test_batch", n_test)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resnet20_cifar_folder_checkpoint_and_resume(tmp_path):
    write_tiny_cifar(tmp_path / "data")
    # 64 images / 2 ranks / batch 8 = 4 steps per epoch; stop mid-epoch 1 at step 3
    common = ["--data-dir", str(tmp_path / "data"), "--batch", "8", "--interval", "2",
              "--epochs", "2", "--csv", str(tmp_path / "log.csv"),
              "--checkpoint", str(tmp_path / "ckpt"), "--print-every", "1"]
    out = run_example("examples/resnet20_cifar10.py", 2, common + ["--max-steps", "3"])
    lines = rank0_lines(out)
    assert any(line.startswith("epoch 1/2 [") for line in lines), out[-3000:]
    assert any(line.startswith("final: test accuracy") for line in lines), out[-3000:]
    for r in range(2):
        ck = torch.load(tmp_path / "ckpt" / f"rank{r}.pt", weights_only=False)
        assert ck["total_steps"] == 3 and ck["epoch"] == 0 and ck["step_in_epoch"] == 3
        assert ck["optimizer"]["local_sgd"]["local_step"] == 3
        assert ck["optimizer"]["local_sgd"]["rounds"] == 1          # the average at t = 2
        assert "layers.0.bn1.running_mean" in ck["model"]
    rows = read_csv(tmp_path / "log.csv")
    assert [r["kind"] for r in rows] == ["train", "final"]
    assert rows[0]["step"] == "3" and rows[0]["rounds"] == "1"
    assert 0.0 <= float(rows[1]["test_accuracy"]) <= 1.0

    # Resume: finish epoch 1 (step 4, an epoch row with the averaged model's accuracy), then
    # epoch 2 and stop at step 6; the local-SGD counters continue from the checkpoint.
    out = run_example("examples/resnet20_cifar10.py", 2, common + ["--max-steps", "6", "--resume"])
    for r in range(2):
        ck = torch.load(tmp_path / "ckpt" / f"rank{r}.pt", weights_only=False)
        assert ck["total_steps"] == 6 and ck["epoch"] == 1 and ck["step_in_epoch"] == 2
        assert ck["optimizer"]["local_sgd"]["local_step"] == 6
        assert ck["optimizer"]["local_sgd"]["rounds"] == 3          # t = 2, 4, 6
    rows = read_csv(tmp_path / "log.csv")
    assert [r["kind"] for r in rows] == ["train", "final", "epoch", "train", "final"], rows
    assert rows[2]["step"] == "4" and rows[2]["test_accuracy"] != ""
    assert rows[4]["rounds"] == "4", rows                           # + finalize()


def test_resnet20_synthetic_time_varying(tmp_path):
    out = run_example("examples/resnet20_cifar10.py", 2,
                      ["--synthetic", "--synthetic-size", "64", "32", "--batch", "8",
                       "--epochs", "1", "--schedule", "time-varying", "--interval", "2",
                       "--csv", str(tmp_path / "log.csv"), "--checkpoint", str(tmp_path / "ck")])
    rows = read_csv(tmp_path / "log.csv")
    assert [r["kind"] for r in rows] == ["epoch", "final"], out[-3000:]
    assert rows[0]["step"] == "4"
    # K^s = round(2 s^(1/3)) = 2, 3: epochs end at steps 2 and 5, so one round in 4 steps
    assert rows[0]["rounds"] == "1"
    assert (tmp_path / "ck" / "rank1.pt").exists()


def test_resnet20_synthetic_baseline(tmp_path):
    out = run_example("examples/resnet20_cifar10.py", 2,
                      ["--synthetic", "--synthetic-size", "64", "32", "--batch", "8",
                       "--epochs", "1", "--baseline",
                       "--csv", str(tmp_path / "log.csv"), "--checkpoint", str(tmp_path / "ck")])
    assert any(l.startswith("hvd.DistributedOptimizer: 2 ranks") for l in rank0_lines(out))
    rows = read_csv(tmp_path / "log.csv")
    assert [r["kind"] for r in rows] == ["epoch", "final"]
    assert rows[1]["rounds"] == "4"             # one gradient allreduce per step


def test_time_varying_example():
    out = run_example("examples/time_varying.py", 2, ["--steps", "60"])
    lines = rank0_lines(out)
    table = [l for l in lines if l.startswith(("FixedInterval", "TimeVarying"))]
    assert len(table) == 3, out[-3000:]
    # FixedInterval(8): 60 steps -> 7 rounds + finalize; the explicit list: 2+4+8+16 = 30, +32
    # would pass 60, so 4 epochs end (+ finalize)
    rounds = [int(l[52:].split()[1]) for l in table]
    assert rounds[0] == 8 and rounds[2] == 5, table
    assert "(2,0.2) (4,0.2) (8,0.1) (16,0.1)" in table[2]


def test_heterogeneous_example_skewed():
    out = run_example("examples/heterogeneous.py", 2,
                      ["--seconds", "1", "--slow-ms", "10", "--skew", "--weights", "steps"])
    lines = rank0_lines(out)
    rows = {l.split()[0]: l for l in lines if l.startswith(("FixedInterval", "Heterogeneous"))}
    assert set(rows) == {"FixedInterval(8)", "Heterogeneous.by_speed(8)",
                         "Heterogeneous.every_seconds(0.08)"}, out[-3000:]
    # by_speed: the fast rank 0 takes more steps than the slowed rank 1 in the same wall time
    steps = eval(rows["Heterogeneous.by_speed(8)"].split("  ")[-1])
    assert steps[0] > steps[1]
