"""Addresses and interfaces of a multi-node job (cluster.env): pure parts on literal inputs."""

import pytest

from cluster.env import is_loopback, resolve_reachable, route_interface, socket_ifname_env
from cluster.errors import ClusterError


def test_socket_ifname_env_keeps_what_the_user_set():
    assert socket_ifname_env({}, "eth0") == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert socket_ifname_env({"NCCL_SOCKET_IFNAME": "ib0"}, "eth0") == {"GLOO_SOCKET_IFNAME": "eth0"}


def test_loopback_is_never_a_master_address():
    assert is_loopback("127.0.1.1") and is_loopback("127.0.0.1") and not is_loopback("10.0.0.1")
    with pytest.raises(ClusterError, match="resolves only to loopback"):
        resolve_reachable("localhost")
    assert resolve_reachable("192.0.2.7") == "192.0.2.7"


def test_route_to_loopback_is_lo():
    assert route_interface("127.0.0.1") == ("lo", "127.0.0.1")
