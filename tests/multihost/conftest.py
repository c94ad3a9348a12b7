"""One set of hosts for the whole session: ``scripts/local_hosts.py up --hosts 2`` (network
namespaces h1, h2 on a private bridge, each with its own hostname, /etc/hosts with Debian's
``127.0.1.1`` line and sshd), always taken down at the end. Needs root, ``ip``, ``sshd``; skipped
otherwise. Every test here is marked ``multihost`` and ``slow`` and runs in one xdist group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_hosts.py"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.multihost)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("multihost"))


class Hosts:
    """The running hosts: ``names``, ``addr[name]``, ``run(name, argv)`` inside one of them."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        state = json.loads((state_dir / "hosts.json").read_text())
        self.names = [h["name"] for h in state["hosts"]]
        self.addr = {h["name"]: h["addr"] for h in state["hosts"]}

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)

    def run(self, name: str, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "exec", name, "--state-dir", str(self.state_dir), "--", *argv],
                              capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def local_hosts():
    """Hosts h1, h2 up for the session (state in a fresh folder under /run, which only root writes)."""
    if os.geteuid() != 0 or not (shutil.which("ip") and os.path.exists("/usr/sbin/sshd")):
        pytest.skip("needs root, iproute2 and openssh-server (network namespaces and sshd)")
    state = Path(tempfile.mkdtemp(prefix="orch-hosts-test-", dir="/run"))
    state.chmod(0o755)
    up = subprocess.run([sys.executable, str(SCRIPT), "up", "--hosts", "2", "--state-dir", str(state)],
                        capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        yield Hosts(state)
    finally:  # also after a failed `up`: it cleans what it made, and only that
        down = subprocess.run([sys.executable, str(SCRIPT), "down", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
