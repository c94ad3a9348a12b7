"""Shared fixtures: a tiny synthetic shapes dataset and a seconds-long training experiment.

Other suites (torchrun, Slurm, Ray, k-fold) train ``tiny_experiment`` many times, so it is kept
as cheap as a real run can be: SSDlite at 64 px, 4 iterations of batch 2, one thread, no loader
workers, tracking in a per-test SQLite file.

Fixtures:
    shapes_data        (session) Path of a dataset dir from ``make_shapes`` (16 train / 8 val, 64 px)
    empty_store        (session) an MLflow SQLite file with its tables made and no run
    tracking_uri       ``sqlite:///<tmp>/mlflow.db`` for this test (a copy of ``empty_store``)
    make_experiment    function(**dotted_overrides) -> Path of a tiny experiment YAML in tmp
    tiny_experiment    Path of the tiny experiment YAML with no overrides
    tiny_checkpoint    (session) (experiment YAML, best checkpoint) of one tiny training run
    random_detector    (session) (experiment YAML, state dict) of a seeded random Faster R-CNN

The session fails when it leaves a process running: every process a test starts inherits
``ORCH_TEST_SESSION=<this session's id>`` (each pytest-xdist worker has its own), and at the
end, after every other fixture is torn down (shared clusters and servers included), what is
still alive of this session is given a few seconds, killed, and named.
"""

from __future__ import annotations

import copy
import gc
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

# Before anything imports torch: on this shared 2-core machine, spinning OpenMP threads of
# concurrent test processes slow each other down by 30x or more; sleeping waiters do not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

def pytest_configure(config):
    # Collection imports torch, torchvision and MLflow: with the cyclic collector paused (as
    # cluster.imports.heavy_imports does in the product), then frozen in pytest_collection_finish.
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        gc.disable()  # this process collects (an xdist controller does not)
    # In pytest_configure, not at import: every xdist worker (which inherits the controller's
    # environment) gets an id of its own, and loading this file by path again changes nothing.
    from cpu_accounting import register
    from orch_testing import SESSION_VAR

    os.environ[SESSION_VAR] = uuid.uuid4().hex
    register(config)  # CPU per test, only when ORCH_TEST_CPU_LOG is set


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """Fail the session (at its last teardown) when a process it started outlives it: servers,
    daemons, shippers, Ray, trainers. The first session fixture set up, so the last torn down:
    the clusters and servers that other session fixtures share are stopped before it looks."""
    from orch_testing import SESSION_VAR, reap_session

    yield
    left = reap_session(os.environ[SESSION_VAR])
    if left:
        pytest.fail(f"the test session left {len(left)} process(es) running (killed now; stop what a test "
                    "starts in its fixture's teardown):\n" + "\n".join(line[:400] for line in left), pytrace=False)


SHAPES_TRAIN = 16
SHAPES_VAL = 8
SHAPES_SIZE = 64


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A tiny COCO-format shapes dataset: ``annotations/instances_{train,val}.json`` and
    ``{train,val}/*.png`` under the returned folder. Shared by the whole session: do not modify."""
    from detection.shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, n_train=SHAPES_TRAIN, n_val=SHAPES_VAL, size=SHAPES_SIZE, seed=0)
    return out


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with MLflow's tables made and no run, copied into each test's
    ``tracking_uri``. Making the tables (MLflow's migrations) costs the first process that opens a
    new store about 1.1 CPU-s more than opening one that has them (1.6-1.8 against 0.6 here), paid
    once per session instead of by every training test. Making them on first use is still tested
    where a user meets it: the README's examples and the CLI tests write ./mlflow.db from nothing,
    and 32 shippers race to make one store's tables (tracking/test_ship_outages.py)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, empty_store) -> str:
    """A fresh SQLite MLflow store for one test (a copy of :func:`empty_store`; never the
    developer's ./mlflow.db)."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def tiny_experiment_dict(shapes_dir: Path, output_dir: Path, tracking_uri: str) -> dict[str, Any]:
    """The mapping of the tiny experiment (self-contained: no ``_base_``)."""
    shapes_dir = Path(shapes_dir)
    return {
        "name": "tiny",
        "model": {"type": "ssdlite320_mobilenet_v3_large"},
        "data": {
            "train": {
                "ann_file": str(shapes_dir / "annotations" / "instances_train.json"),
                "img_dir": str(shapes_dir / "train"),
            },
            "val": {
                "ann_file": str(shapes_dir / "annotations" / "instances_val.json"),
                "img_dir": str(shapes_dir / "val"),
            },
            "batch_size_per_gpu": 2,
            "workers_per_gpu": 0,
            "min_size": SHAPES_SIZE,
            "max_size": SHAPES_SIZE,
        },
        "optim": {
            "type": "adamw",
            "lr": 0.001,
            "weight_decay": 0.0001,
            "auto_scale_lr": {"enable": True, "base_batch_size": 2, "rule": "linear"},
        },
        "schedule": {
            "epochs": None,
            "iterations": 4,
            "warmup_iters": 1,
            "policy": "constant",
            "milestones": [],
        },
        "eval": {"interval": 4, "metric": ["bbox"], "classwise": True, "split": "val"},
        "checkpoint": {"interval": 2, "max_keep": 2, "save_best": "bbox_mAP", "rule": "greater"},
        "runtime": {
            "seed": 0,
            "deterministic": True,
            "output_dir": str(output_dir),
            "log_interval": 1,
            "device": "cpu",
            "threads": 1,
        },
        "resources": {"gpus": 1, "backend": "local"},
        "tracking": {"enable": True, "uri": tracking_uri, "experiment": "tiny-tests"},
    }


def _set_dotted(mapping: dict[str, Any], key: str, value: Any) -> None:
    node = mapping
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@pytest.fixture
def make_experiment(shapes_data, tmp_path, tracking_uri) -> Callable[..., Path]:
    """``make_experiment(**{"optim.lr": 0.01, "schedule.iterations": 2}, _name="exp.yaml")`` writes
    the tiny experiment with dotted-key overrides into this test's tmp dir and returns its path.
    A value of ``None`` for a dotted key sets YAML null."""

    def make(_name: str = "tiny.yaml", **overrides: Any) -> Path:
        mapping = copy.deepcopy(tiny_experiment_dict(shapes_data, tmp_path / "work", tracking_uri))
        for key, value in overrides.items():
            _set_dotted(mapping, key, value)
        path = tmp_path / _name
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return path

    return make


@pytest.fixture
def tiny_experiment(make_experiment) -> Path:
    """Path of a tiny experiment YAML: SSDlite at 64 px, 4 iterations, CPU, 1 thread, tracking in
    a tmp SQLite file (``tracking_uri``), outputs in ``<tmp_path>/work``."""
    return make_experiment()


@pytest.fixture
def local_orch_env(tmp_path, monkeypatch):
    """An isolated orch home and lease folder, a 2-slot CPU pool, one thread per process, no
    inherited MASTER_PORT, and ``tmp_path`` as the working directory (local/torchrun tests)."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("ORCH_CPU_SLOTS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ship(tracking_uri):
    """``ship(*folders, uri=tracking_uri) -> {run name: mlflow Run}``: sync the run journals under
    ``folders`` to MLflow (what the shipper beside a job does; idempotent) and return every run
    of the store, read back with ``MlflowClient``."""

    def run(*folders, uri: str = tracking_uri) -> dict:
        from mlflow.tracking import MlflowClient

        from orchestrator.tracking.sync import sync

        summary = sync([str(f) for f in folders], uri)
        assert not summary.failed and not summary.pending, summary.lines()
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        return {r.info.run_name: r for r in client.search_runs(experiments, max_results=1000)}

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_data, tmp_path_factory) -> tuple[Path, Path]:
    """``(experiment YAML, checkpoint)`` of the tiny experiment trained once per session (no
    tracking); prediction tests share it: do not modify either file."""
    from cluster.env import DistEnv
    from detection.train import main
    from orchestrator.config import load_experiment

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    mapping = tiny_experiment_dict(shapes_data, folder / "work", f"sqlite:///{folder / 'mlflow.db'}")
    mapping["tracking"]["enable"] = False
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    result = main(load_experiment(path), DistEnv.single())
    return path, Path(result.best["path"])


@pytest.fixture(scope="session")
def random_detector(shapes_data, tmp_path_factory) -> tuple[Path, Path]:
    """``(experiment YAML, state dict)`` of a Faster R-CNN (ResNet-18 FPN, 64 px) with seeded
    random weights. Unlike the briefly trained tiny SSDlite, whose outputs barely depend on the
    image, its detections change with every pixel: tests comparing two prediction paths use it."""
    import torch

    from detection import models
    from orchestrator.config import load_experiment

    folder = tmp_path_factory.mktemp("random_detector")
    mapping = tiny_experiment_dict(shapes_data, folder / "work", f"sqlite:///{folder / 'mlflow.db'}")
    mapping["tracking"]["enable"] = False
    mapping["model"] = {"type": "fasterrcnn", "backbone": "resnet18"}
    path = folder / "random.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    config = load_experiment(path)
    torch.manual_seed(0)
    checkpoint = folder / "random.pth"
    torch.save(models.build_model(config.model, 4, config.data).state_dict(), checkpoint)
    return path, checkpoint


@pytest.fixture(scope="session", autouse=True)
def _no_shipper_outlives_the_session(tmp_path_factory):
    """Fails the session when an MLflow shipper it started still runs at its end (after a
    minute's grace, torn down before :func:`nothing_left_running` looks;
    ``orch_testing.leftover_shippers``). ``ORCH_HOME`` is the session's own, so this session's
    jobs never share a shipper with another session's (or the user's ~/.orch)."""
    from orch_testing import SESSION_VAR, leftover_shippers

    saved = os.environ.get("ORCH_HOME")
    os.environ["ORCH_HOME"] = str(tmp_path_factory.mktemp("orch_home"))
    yield
    left = leftover_shippers(os.environ[SESSION_VAR])
    if saved is None:
        os.environ.pop("ORCH_HOME", None)
    else:
        os.environ["ORCH_HOME"] = saved
    assert not left, f"{len(left)} MLflow shipper process(es) outlived the tests that started them: {left}"


# Daemons one test session shares: the local Slurm cluster (one per machine) and Ray heads (two
# at once starve this 2-core machine). Under pytest-xdist (`make test` runs `-n 3 --dist
# loadgroup`) the tests of each run in one worker, one after another; other tests run beside them.
SHARED_DAEMONS = {"slurm": ("slurm", "slurm_cluster"), "ray": ("ray", "ray_head")}


def _group_of(item) -> str | None:
    """The one xdist group an item runs in: xdist joins every group name an item carries into a
    new group ("multihost_ray"), which would run beside the groups it was meant to join."""
    # The hosts of tests/multihost are one set per session, so all their tests run in one
    # worker, whatever cluster (Slurm, Ray) they start on those hosts.
    if "tests/multihost/" in Path(str(item.fspath)).as_posix():
        return "multihost"
    for group, (marker, fixture) in SHARED_DAEMONS.items():
        if item.get_closest_marker(marker) or fixture in getattr(item, "fixturenames", ()):
            return group
    return None


# Test files whose tests take minutes each (seconds of one clean-clone run's --durations, and
# their CPU seconds from ORCH_TEST_CPU_LOG): started first. pytest-xdist hands tests out in
# collection order (after the grouped ones), and these came last alphabetically: the README's
# examples (306 s) and the server outages (394 s) ran alone at the end of the run while the
# other workers were idle. Only the order changes; a file missing from the list runs in place.
LONG_FIRST = ("tests/orchestrator/tracking/test_job_outages.py", "tests/test_readme.py",
              "tests/detection/test_learning.py", "tests/bench/test_bench_gpu_smoke.py",
              "tests/orchestrator/tracking/test_scale_mlflow.py", "tests/orchestrator/tracking/test_ship_outages.py",
              "tests/orchestrator/tracking/test_mlflow_ui.py", "tests/orchestrator/kfold/test_kfold_run.py")


def _long_first(item) -> int:
    path = Path(str(item.fspath)).as_posix()
    return next((rank for rank, name in enumerate(LONG_FIRST) if path.endswith(name)), len(LONG_FIRST))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: xdist reads the group markers in its own pytest_collection_modifyitems, so a
    # marker added after it is never seen (every test of a "group" then ran on any worker).
    items.sort(key=_long_first)  # stable: every worker collects the same order
    for item in items:
        group = _group_of(item)
        if group is None:
            continue
        for node in item.listchain():
            node.own_markers[:] = [m for m in node.own_markers if m.name != "xdist_group"]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    # What collection imported stays for the whole session: out of every later full collection.
    gc.freeze()
    gc.enable()
    # pytest 9.2 keeps a node's id in `_id`; pytest-xdist 3.8 writes the group into `_nodeid`,
    # which 9.2 no longer reads, so --dist loadgroup silently stopped grouping (two local Slurm
    # clusters at once, multihost tests split over workers). Fail at once rather than flake.
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(lost)} test(s) (e.g. {lost[0]}): this pytest/xdist pair "
            "breaks --dist loadgroup; install the versions setup.cfg's dev extra names")
