"""Process facts (psutil) and stopping a process group with a grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.lease import is_alive, process_start_time
from cluster.process import group_alive, stop_group


def test_start_time_is_the_clock_ticks_that_leases_and_records_have_always_stored():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        assert process_start_time(proc.pid) == stat[stat.rindex(")") + 2:].split()[19]
        assert is_alive(proc.pid, process_start_time(proc.pid)) and not is_alive(proc.pid, "1")
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None and not is_alive(proc.pid)


def test_stop_group_waits_for_a_clean_stop_and_kills_what_ignores_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                 "time.sleep(30)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        assert stop_group(polite.pid, grace_s=10) is True
        started = time.monotonic()
        assert stop_group(stubborn.pid, grace_s=0.5) is False
        assert time.monotonic() - started < 5
        time.sleep(0.2)
        assert not group_alive(polite.pid) and not group_alive(stubborn.pid)
        assert stop_group(polite.pid) is True  # already gone
    finally:
        for proc in (polite, stubborn):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stubborn.stdout.close()

