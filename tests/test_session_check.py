"""The session-end check of tests/conftest.py: a pytest run that leaves a process running fails
and names it (also a daemon that detached and was reparented, and under pytest-xdist, per
worker); a server that a session fixture stops in its teardown is not a leftover."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent

LEAKY = '''
import subprocess, sys, time
import pytest

SLEEP = "import time; time.sleep(300)  # KIND TAG"


@pytest.fixture(scope="session")
def server():
    """Started for the session, stopped in its teardown: not a leftover."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEP.replace("KIND", "server")], start_new_session=True)
    yield proc
    time.sleep(0.5)  # a slow stop: the check must come after it
    proc.kill()
    proc.wait()


def test_uses_the_server(server):
    assert server.poll() is None


def test_leaves_a_daemon_behind():
    # Double fork: the sleeper is reparented, no longer a descendant of pytest; its environment marks it.
    subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                    + repr(SLEEP.replace("KIND", "daemon")) + "], start_new_session=True)"], check=True)


def test_leaves_a_child_behind():
    subprocess.Popen([sys.executable, "-c", SLEEP.replace("KIND", "child")], env={"PATH": "/usr/bin"})
'''


def _run_nested(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "orch_testing.py", "cpu_accounting.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    tag = tmp_path.name
    (tmp_path / "test_leaky.py").write_text(LEAKY.replace("TAG", tag))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", "/dev/null", *args, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)


def _sleepers(tag: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if tag in " ".join(p.info["cmdline"] or ())]


@pytest.mark.slow  # a nested pytest run with two xdist workers: ~20 s here
def test_a_session_that_leaves_processes_running_fails_and_names_them(tmp_path):
    tag = tmp_path.name
    done = _run_nested(tmp_path, "-n", "2")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "3 passed" in out, out
    # Each xdist worker checks its own processes: one worker left both, or each left one (and
    # pytest may print each error twice: in ERRORS and in the short summary).
    assert "left 2 process(es) running" in out or "left 1 process(es) running" in out, out
    assert "left 3 process(es)" not in out, out
    assert f"# daemon {tag}" in out and f"# child {tag}" in out, out
    assert f"# server {tag}" not in out, out  # stopped by its fixture before the check
    deadline = time.monotonic() + 10
    while _sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sleepers(tag) == []  # killed by the check
