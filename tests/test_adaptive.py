"""hvd.Adaptive: the interval grows with exposed communication, shrinks with divergence."""
import pytest

from hvdrun import run_workers
from prsgd_hvd.schedules import Adaptive


@pytest.fixture(scope="module")
def results():
    return run_workers("adaptive_worker.py", 2, timeout=120)


def test_interval_doubles_while_communication_shows(results):
    for res in results:
        assert res["grow"]["averaged_at"] == [1, 3, 7, 15, 23]
        assert res["grow"]["history"] == [2, 4, 8, 8, 8]
        assert res["grow"]["resumed"]


def test_interval_halves_while_models_drift_apart(results):
    for res in results:
        assert res["shrink"]["averaged_at"] == [8, 12, 14, 16]
        assert res["shrink"]["history"] == [4, 2, 2, 2]


def test_adaptive_arguments_are_checked():
    with pytest.raises(ValueError, match="min_interval <= initial <= max_interval"):
        Adaptive(initial=100, max_interval=64)
    with pytest.raises(ValueError, match="comm_fraction"):
        Adaptive(comm_fraction=0)
    with pytest.raises(ValueError, match="max_divergence"):
        Adaptive(max_divergence=-1.0)
