"""Local SGD across hosts: ranks on different hosts (network namespaces with their own address,
hostname and sshd, 100 Mbit/s tbf-shaped links), launched by ``horovodrun -H host1:1,...``
over ssh. On one host Horovod's local and cross ranks are trivial (local = global, one host);
here they are not, and the algorithms must still match the float64 reference.

The hosts come up once for the module (a few seconds); each horovodrun launch runs several
scenarios.
"""
import copy
import json
import subprocess

import pytest

from cluster_hosts import cluster_or_skip
from hvdrun import run_workers
from test_trajectories import HETEROGENEOUS, SCENARIOS, SGD_MOMENTUM, check_against_reference

RATE = "100mbit"
LAUNCH_TIMEOUT = 240

_by_name = {s["name"]: s for s in SCENARIOS}
# Algorithm 1 (with momentum, with fp16 deltas, with uneven data and finalize), Algorithm 2, 3.
ACROSS_HOSTS = [_by_name["sgd_momentum_i4"], _by_name["sgd_i2_fp16"],
                _by_name["uneven_data_finalize_i3"], _by_name["time_varying_lists_with_lrs"],
                HETEROGENEOUS[3][0]]

# Average within a host every 2 steps, across all hosts every 8: 2 hosts x 2 ranks.
HIERARCHICAL_COUNTED = {"name": "hierarchical_hosts_counted", "opt": "sgd",
                        "opt_kwargs": SGD_MOMENTUM, "steps": 17, "seed": 777,
                        "schedule": {"kind": "hierarchical", "levels": [[2, 2], [8, 4]]}}
# The same, saying "the ranks of a host" and "everyone" instead of counting ranks by hand.
HIERARCHICAL_BY_HOST = dict(copy.deepcopy(HIERARCHICAL_COUNTED), name="hierarchical_by_host",
                            schedule={"kind": "hierarchical", "levels": [[2, "host"], [8, "all"]]},
                            may_fail=True)


@pytest.fixture(scope="module")
def cluster():
    with cluster_or_skip(3, RATE, name="prsgdtraj") as c:
        yield c


@pytest.fixture(scope="module")
def three_hosts(cluster):
    return run_workers("cluster_worker.py", 3, ["--scenarios", json.dumps(ACROSS_HOSTS)],
                       timeout=LAUNCH_TIMEOUT, cluster=cluster)


@pytest.fixture(scope="module")
def two_by_two(cluster):
    """Both spellings in one launch: the counted one first (the other may raise at
    construction, on every rank alike, until the trunk knows "host")."""
    return run_workers("cluster_worker.py", 4,
                       ["--scenarios", json.dumps([HIERARCHICAL_COUNTED, HIERARCHICAL_BY_HOST])],
                       timeout=LAUNCH_TIMEOUT, cluster=cluster, slots=2,
                       env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})


def test_hosts_are_separate_and_links_shaped(cluster):
    for i in range(1, 4):
        routes = subprocess.run(cluster.exec_argv(i, ["ip", "route"]), capture_output=True,
                                text=True, check=True).stdout
        assert "default" not in routes, f"host{i} must have no default route: {routes}"
    # tbf on both ends: upload of one host and download of another, close to 100 Mbit/s.
    mbits = cluster.link_mbits(1, 2)
    assert 80 <= mbits <= 101, f"host1 -> host2 at {RATE}: {mbits:.1f} Mbit/s"


def test_ranks_are_on_different_hosts(three_hosts):
    topo = [r["_topology"] for r in three_hosts]
    assert [t["hostname"] for t in topo] == ["host1", "host2", "host3"]
    assert all(t["local_size"] == 1 and t["local_rank"] == 0 and t["cross_size"] == 3
               for t in topo), topo
    assert [t["cross_rank"] for t in topo] == [0, 1, 2]


@pytest.mark.parametrize("spec", ACROSS_HOSTS, ids=[s["name"] for s in ACROSS_HOSTS])
def test_trajectory_across_3_hosts_matches_float64_simulation(three_hosts, spec):
    check_against_reference(3, spec, three_hosts)


def _check_hierarchical(results, spec):
    assert "error" not in results[0][spec["name"]], results[0][spec["name"]]
    topo = [r["_topology"] for r in results]
    assert [t["hostname"] for t in topo] == ["host1", "host1", "host2", "host2"]
    assert [t["local_rank"] for t in topo] == [0, 1, 0, 1]
    assert all(t["local_size"] == 2 and t["cross_size"] == 2 for t in topo), topo
    # The reference counts ranks: a host's group is its 2 ranks, "all" is all 4. (Averaging
    # host rounds over all 4 ranks would miss it by far more than the tolerance.)
    counted = dict(spec, schedule=HIERARCHICAL_COUNTED["schedule"])
    check_against_reference(4, counted, results)


def test_hierarchical_groups_are_hosts_2x2(two_by_two):
    _check_hierarchical(two_by_two, HIERARCHICAL_COUNTED)


def test_hierarchical_host_spelling_2x2(two_by_two):
    _check_hierarchical(two_by_two, HIERARCHICAL_BY_HOST)
