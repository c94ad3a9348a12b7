"""CPU seconds per test, every process it started counted: ``ORCH_TEST_CPU_LOG=FILE pytest ...``.

Each test process (every pytest-xdist worker) moves itself into a cgroup of its own under the
cgroup-v1 ``cpuacct`` hierarchy (root only); whatever it starts stays in that group however it
detaches (double-forked supervisors, shippers, servers, daemons, processes in network namespaces,
Ray's workers), and the group's ``cpuacct.usage`` counts the CPU of its exited processes too. A
test's line holds the group's growth while the test ran (setup and teardown included, so a shared
session fixture is charged to the test that first needed it, and a background daemon's CPU to the
tests that ran beside it in the same worker).

One JSON object per line is appended to FILE: ``{"test", "worker", "cpu_s", "wall_s"}``, and a
last one per worker with ``"test": null`` and the worker's total. Sum per test file, per xdist
group, or sort it: ``python tests/cpu_accounting.py FILE``. Without root or cpuacct it does
nothing. The groups are removed at the end when nothing is left in them.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
LOG_VAR = "ORCH_TEST_CPU_LOG"


class CpuAccounting:
    """The pytest plugin: one cgroup for this test process, one log line per test."""

    def __init__(self, log: Path):
        self.log = log
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.group = CPUACCT / f"orch-tests-{uuid.uuid4().hex[:12]}-{self.worker}"
        self.group.mkdir()
        (self.group / "cgroup.procs").write_text(str(os.getpid()))
        self.started = self.usage()

    def usage(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def write(self, **line) -> None:
        with open(self.log, "a") as out:  # one short line per write: appends do not interleave
            out.write(json.dumps({**line, "worker": self.worker}) + "\n")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        cpu, wall = self.usage(), time.monotonic()
        yield
        self.write(test=item.nodeid, cpu_s=round(self.usage() - cpu, 3), wall_s=round(time.monotonic() - wall, 3))

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config):
        self.write(test=None, cpu_s=round(self.usage() - self.started, 3), wall_s=None)
        (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
        try:
            self.group.rmdir()
        except OSError:  # something this process started still runs: the session check names it
            pass


def register(config) -> None:
    """Install the plugin when ``ORCH_TEST_CPU_LOG`` names a file and this process may make cgroups."""
    log = os.environ.get(LOG_VAR)
    if log and os.geteuid() == 0 and (CPUACCT / "cpuacct.usage").exists() and not config.pluginmanager.has_plugin("orch-cpu"):
        config.pluginmanager.register(CpuAccounting(Path(log)), "orch-cpu")


def summary(path: str, top: int = 40) -> None:
    """Print the CPU per test file and the costliest tests of a log."""
    lines = [json.loads(line) for line in open(path)]
    tests = [l for l in lines if l["test"]]
    per_file = collections.Counter()
    for l in tests:
        per_file[l["test"].split("::")[0]] += l["cpu_s"]
    print(f"{sum(l['cpu_s'] for l in tests):.0f} CPU-s in {len(tests)} tests; workers: " +
          ", ".join(f"{l['worker']} {l['cpu_s']:.0f}" for l in lines if not l["test"]))
    for name, cpu in per_file.most_common(top):
        print(f"{cpu:8.1f}  {name}")
    print()
    for l in sorted(tests, key=lambda l: -l["cpu_s"])[:top]:
        print(f"{l['cpu_s']:8.1f} {l['wall_s']:8.1f}  {l['test']}")


if __name__ == "__main__":
    summary(*sys.argv[1:2])
