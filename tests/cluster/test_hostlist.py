"""Slurm hostlist expressions, expanded in Python (table tests)."""

import re

import pytest

from cluster.errors import ClusterError
from cluster.hostlist import expand_hostlist, expand_tasks_per_node


@pytest.mark.parametrize(
    "expr, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[001-002]", ["n001", "n002"]),
        ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
        ("rack[1-2]n[1,3]", ["rack1n1", "rack1n3", "rack2n1", "rack2n3"]),
        ("x[5],y", ["x5", "y"]),
        ("a,b[1-2],c[7]", ["a", "b1", "b2", "c7"]),
        ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
        (" h1 , h2 ", ["h1", "h2"]),
        ("[1-2]", ["1", "2"]),
        ("n[3,1]", ["n3", "n1"]),  # order kept as written
    ],
)
def test_expand(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    "expr, needle",
    [
        ("", "empty"),
        ("gpu[01-03", "never closed"),
        ("gpu01-03]", "without '['"),
        ("gpu[[1-2]]", "nested"),
        ("gpu[3-1]", "goes down"),
        ("gpu[a-b]", "bad range"),
        ("gpu[]", "bad range"),
        ("gpu[1-2-3]", "bad range"),
        ("a,,b", "stray comma"),
        ("gpu[1-99999999]", "too large"),
    ],
)
def test_malformed(expr, needle):
    with pytest.raises(ClusterError, match=re.escape(needle)):
        expand_hostlist(expr)


@pytest.mark.parametrize(
    "spec, counts",
    [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3]), ("8(x1)", [8])],
)
def test_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "2(x)", "x", "2(3)"])
def test_tasks_per_node_malformed(spec):
    with pytest.raises(ClusterError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(spec)
