"""``python -m cluster.pdeath PARENT -- CMD``: CMD dies with PARENT; ``--signal TERM`` lets it clean up
first (what a private Ray head needs to stop the Ray processes it started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.lease import is_alive

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import signal, sys, time
def bye(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
import os
open(sys.argv[1] + ".ready", "w").write(str(os.getpid()))
time.sleep(60)
"""


def _parent(extra: list[str], marker: Path) -> subprocess.Popen:
    """A parent process that starts the child through cluster.pdeath and then just waits."""
    code = ("import os, subprocess, sys, time; "
            f"subprocess.Popen([sys.executable, '-m', 'cluster.pdeath', str(os.getpid()), *{extra!r}, '--', "
            f"sys.executable, '-c', {CHILD!r}, {str(marker)!r}]); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts as gone)."""
    return not is_alive(pid)


def _wait(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("extra, expected", [(["--signal", "TERM"], "SIGTERM"), ([], None)])
def test_child_gets_the_chosen_signal_when_its_parent_is_killed(tmp_path, extra, expected):
    marker = tmp_path / "got"
    parent = _parent(extra, marker)
    try:
        ready = Path(str(marker) + ".ready")
        _wait(lambda: ready.exists() and ready.read_text())
        child = int(ready.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        if expected:
            _wait(lambda: marker.exists() and marker.read_text() == expected)
        else:  # SIGKILL by default: no handler runs, the child is just gone
            _wait(lambda: _gone(child))
            assert not marker.exists()
    finally:
        parent.kill()


def test_unknown_signal_is_refused():
    out = subprocess.run([sys.executable, "-m", "cluster.pdeath", "1", "--signal", "NOPE", "--", "true"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 2 and "unknown signal 'NOPE'" in out.stderr
