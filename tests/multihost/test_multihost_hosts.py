"""The hosts of scripts/local_hosts.py are hosts: own hostname, own name resolution with Debian's
127.0.1.1 trap, own sshd on its address only, no route off the bridge; and cluster.reach finds
the interface towards the master and fails at once, in one line naming both hosts, when the
master is cut off. No training (seconds)."""

import subprocess
import sys


def test_each_host_is_its_own_host(local_hosts):
    h1, h2 = local_hosts.names
    for name in (h1, h2):
        assert local_hosts.run(name, ["hostname"]).stdout.strip() == name
    resolved = local_hosts.run(h1, [sys.executable, "-c", "import socket; print(socket.gethostbyname('h1'), socket.gethostbyname('h2'))"])
    # The trap is present on purpose: a host's own name resolves to loopback there.
    assert resolved.stdout.split() == ["127.0.1.1", local_hosts.addr[h2]]
    ssh = subprocess.run(["ssh", "-o", "BatchMode=yes", h2, "hostname; ip -4 -o addr show eth0"],
                         capture_output=True, text=True, timeout=30)
    assert ssh.returncode == 0 and ssh.stdout.split()[0] == h2 and local_hosts.addr[h2] in ssh.stdout
    # sshd listens on the host's address only; the host has no route off the bridge.
    probe = "import socket\ntry:\n socket.create_connection(('127.0.0.1', 22), timeout=2); print('open')\nexcept OSError: print('closed')"
    assert local_hosts.run(h1, [sys.executable, "-c", probe]).stdout.strip() == "closed"
    routes = local_hosts.run(h1, ["ip", "-4", "route", "get", "1.1.1.1"])
    assert routes.returncode != 0 and "unreachable" in routes.stderr
    again = local_hosts.script("up", "--hosts", "2")
    assert again.returncode == 0 and "already up" in again.stderr
    assert local_hosts.script("status").returncode == 0


def test_reach_names_the_interface_and_fails_at_once_naming_both_hosts(local_hosts):
    h1, h2 = local_hosts.names
    reach = [sys.executable, "-m", "cluster.reach", "--master", h1, "--addr", local_hosts.addr[h1], "--port", "22", "--"]
    ok = local_hosts.run(h2, reach + ["true"])
    assert ok.returncode == 0, ok.stderr
    assert f"orch: {h2}: the master {h1} at {local_hosts.addr[h1]}:22 via eth0 ({local_hosts.addr[h2]})" in ok.stdout
    assert "GLOO_SOCKET_IFNAME=eth0" in ok.stdout
    subprocess.run(["ip", "-n", h1, "link", "set", "eth0", "down"], check=True)
    try:
        cut = local_hosts.run(h2, reach + ["true"], timeout=30)
    finally:
        subprocess.run(["ip", "-n", h1, "link", "set", "eth0", "up"], check=True)
    lines = cut.stderr.strip().splitlines()
    assert cut.returncode == 1 and len(lines) == 1, cut.stderr
    assert lines[0].startswith(f"orch: error: host {h2} cannot reach the master {h1} at {local_hosts.addr[h1]}:22")
