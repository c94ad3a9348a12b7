"""Fixtures of the fault suite: real daemons started once per session, an isolated orch
environment per scenario, and the results file the summary reads.

    fault_seeds        the seeds to run: ``ORCH_FAULTS_N`` seeds from ``ORCH_FAULTS_START`` (default
                       the CI set, ``fault_schedule.CI_SEEDS`` seeds from 0)
    fault_mlflow       (module) an ``mlflow server`` on 127.0.0.1 that scenarios may stop and restart
                       (same port)
    fault_slurm        (module, on first use) a 2-node local Slurm with accounting
                       (``scripts/local_slurm.py``; the Slurm tests' one when it runs); its state dir
    fault_context      a scenario's :class:`fault_run.Context`: own ORCH_HOME, lease folder, a 4-slot
                       CPU pool, one thread per process, cwd in the scenario's folder
    fault_results      (session) outcomes, written after each scenario to ``$ORCH_FAULTS_RESULTS``
                       (default ``<pytest basetemp>/faults-results.json``)
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
VAL_IMAGES = 48  # an evaluation of ~1-3 s: long enough to land a signal inside it


def _load(path: Path, name: str):
    """A helper module of another test folder, by path (its folder is not on sys.path here)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    """The tiny shapes dataset with a larger validation split (16 train / 48 val, 64 px)."""
    from detection.shapes import make_shapes

    out = tmp_path_factory.mktemp("fault_shapes")
    make_shapes(out, n_train=16, n_val=VAL_IMAGES, size=64, seed=0)
    return out


@pytest.fixture(scope="module")
def fault_mlflow(tmp_path_factory):
    """A running ``mlflow server`` (:class:`ship_helpers.MlflowServer`: ``uri``, ``stop``, ``start``)."""
    helpers = _load(TESTS / "orchestrator" / "tracking" / "ship_helpers.py", "orch_faults_ship_helpers")
    server = helpers.MlflowServer(tmp_path_factory.mktemp("fault_mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _slurm_answers(conf: str) -> bool:
    """The cluster of ``conf`` (one this session started) answers, with both nodes up."""
    if not Path(conf).is_file():
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=dict(os.environ, SLURM_CONF=conf),
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "node1" in out and "node2" in out


@pytest.fixture(scope="module")
def fault_slurm():
    """A 2-node Slurm cluster (2 fake GPUs a node, accounting); its state dir. The one the Slurm
    tests' session fixture (tests/orchestrator/slurm) started is reused when it runs (same
    ``scripts/local_slurm.py`` layout: scenarios stop and restart its slurmd); otherwise one is
    started for this module, with ``SLURM_CONF`` pointing at it meanwhile, and stopped (wiped)
    at the end. Never two at once: both would share munge and /etc/hosts."""
    conf = os.environ.get("SLURM_CONF")
    if conf and _slurm_answers(conf):
        yield Path(conf).parent
        return
    script = REPO / "scripts" / "local_slurm.py"
    # Not under pytest's 0700 folders: MariaDB runs as user mysql and must reach its datadir.
    state = Path(tempfile.mkdtemp(prefix="orch-slurm-faults-", dir="/tmp"))
    state.chmod(0o755)
    try:
        subprocess.run([sys.executable, str(script), "up", "--nodes", "2", "--gpus-per-node", "2", "--accounting",
                        "--state-dir", str(state)], check=True, timeout=900)
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")
        yield state
    finally:
        subprocess.run([sys.executable, str(script), "down", "--state-dir", str(state)], timeout=180)
        if conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = conf


class Results:
    """Outcomes of the session's scenarios, rewritten to ``path`` after each one."""

    def __init__(self, path: Path, seeds: list[int]) -> None:
        self.path = path
        self.started = time.time()
        self.meta = {"seeds": seeds, "command": " ".join(sys.argv), "cores": os.cpu_count(),
                     "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.outcomes: list[dict] = []

    def add(self, outcome: dict) -> None:
        self.outcomes.append(outcome)
        self.write()

    def write(self) -> None:
        load = os.getloadavg()
        data = {**self.meta, "seconds": round(time.time() - self.started, 1), "loadavg_end": [round(x, 2) for x in load],
                "outcomes": self.outcomes}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


@pytest.fixture(scope="session")
def fault_results(tmp_path_factory):
    path = Path(os.environ.get("ORCH_FAULTS_RESULTS") or tmp_path_factory.getbasetemp() / "faults-results.json")
    from fault_schedule import selected_seeds

    results = Results(path.resolve(), selected_seeds())
    yield results
    results.write()
    print(f"\nfault suite results: {results.path} (python tests/faults/summary.py {results.path})")


@pytest.fixture
def fault_context(fault_data, fault_mlflow, tmp_path, monkeypatch):
    """The :class:`fault_run.Context` of one scenario (``slurm_dir`` filled by the test)."""
    from fault_run import Context

    root = _load(TESTS / "conftest.py", "orch_faults_root_conftest")
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("ORCH_CPU_SLOTS", "4")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    for name in ("MASTER_PORT", "ORCH_PORT_RANGE", "CUDA_VISIBLE_DEVICES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def write_experiment(folder: Path, name: str, overrides: dict) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        mapping = root.tiny_experiment_dict(fault_data, folder / "work", fault_mlflow.uri)
        mapping["name"] = name
        for key, value in overrides.items():
            root._set_dotted(mapping, key, value)
        path = folder / "experiment.yaml"
        import yaml

        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return path

    yield Context(folder=tmp_path, write_experiment=write_experiment, mlflow=fault_mlflow, slurm_dir=None,
                  setenv=monkeypatch.setenv)
    # The scenario's host shipper ships what is left and exits (within OWNER_GRACE_S of its jobs'
    # end): let it, while this module's server still answers. Stopped with the module, the server
    # would leave it waiting an hour (LINGER_S) for a destination gone for good — a leftover the
    # session check names (run 16: the module's last scenario, its shipper still shipping).
    _wait_no_shipper(tmp_path / "home", timeout_s=120)


def _wait_no_shipper(home: Path, timeout_s: float) -> None:
    from orch_testing import processes_with_env

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(
            "tracking.shipper --host" in argv for _, argv in processes_with_env("ORCH_HOME", str(home))):
        time.sleep(0.5)
