"""The Ray launcher's plan (pure) and the dry runs of ``orch submit --backend ray`` / ``orch sweep``."""

from __future__ import annotations

import sys

import pytest

from cluster.errors import ConfigError
from orchestrator.cli import main as orch
from orchestrator.config import load_experiment
from orchestrator.launchers import get_launcher
from orchestrator.launchers.ray.cluster import LocalRay, is_loopback
from orchestrator.launch import job_spec as build_job_spec


def _plan(path, **changes):
    from orchestrator.config import with_overrides

    exp = with_overrides(load_experiment(path), {"resources.backend": "ray", **changes})
    return get_launcher("ray").plan([build_job_spec(exp, "ray", write=False)])


def test_plan_text_names_everything_ray_will_do(tiny_experiment, tmp_path):
    plan = _plan(tiny_experiment, **{"resources.gpus": 2, "resources.ray.max_failures": 3})
    text = plan.text
    assert plan.backend == "ray" and len(plan.jobs) == 1
    assert "ray job tiny" in text
    assert "cluster address:      none: a private Ray head on 127.0.0.1" in text
    assert "workers:              2 (ScalingConfig num_workers)" in text
    # runtime.device=cpu in the tiny experiment: no GPUs, gloo.
    assert "resources per worker: CPU 1\n" in text and "(gloo)" in text
    assert f"storage path:         {tmp_path / 'work' / 'ray'}" in text
    assert "max_failures=3 (restart up to 3 times, from the last reported checkpoint)" in text
    assert "hooks=[RayReportHook]" in text
    assert plan.requests[0].num_workers == 2


def test_plan_on_an_existing_cluster_with_gpus(tiny_experiment):
    plan = _plan(tiny_experiment, **{"resources.ray.address": "10.0.0.5:6379", "runtime.device": "cuda",
                                     "resources.ray.gpus_per_worker": 0.5, "resources.ray.storage_path": "s3://b/x"})
    assert "cluster address:      10.0.0.5:6379" in plan.text
    assert "resources per worker: CPU 1, GPU 0.5" in plan.text and "(nccl)" in plan.text
    assert "storage path:         s3://b/x" in plan.text


def test_plan_is_pure(tiny_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    _plan(tiny_experiment)
    assert not (tmp_path / "home").exists() and not (tmp_path / "work").exists()


def test_plan_imports_no_ray(tiny_experiment):
    import subprocess

    code = ("import sys; from orchestrator.config import load_experiment, with_overrides; "
            "from orchestrator.launchers import get_launcher; from orchestrator.launch import job_spec as build_job_spec; "
            f"e = with_overrides(load_experiment({str(tiny_experiment)!r}), {{'resources.backend': 'ray'}}); "
            "get_launcher('ray').plan([build_job_spec(e, 'ray', write=False)]); "
            "print(sorted(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resources.nodes": 2, "resources.gpus": 2}, "needs shared storage for checkpoints; set resources.ray.storage_path"),
        ({"resources.ray.cpus_per_worker": 0}, "resources.ray.cpus_per_worker=0.0 must be > 0"),
        ({"resources.ray.max_failures": -2}, "use -1 (retry forever), 0 or more"),
    ],
)
def test_plan_refuses_bad_options(tiny_experiment, changes, message):
    with pytest.raises(ConfigError) as err:
        _plan(tiny_experiment, **changes)
    assert message in str(err.value)


def test_submit_dry_run_prints_the_ray_plan(tiny_experiment, capsys):
    assert orch(["submit", str(tiny_experiment), "--backend", "ray", "--gpus", "2", "--address", "auto", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cluster address:      auto" in out and "workers:              2" in out


def test_sweep_dry_run(make_experiment, capsys):
    path = make_experiment(**{"sweep": {"space": {"optim.lr": {"grid": [0.01, 0.001]}}, "num_samples": 1}})
    assert orch(["sweep", str(path), "--dry-run", "--num-samples", "3", "--max-concurrent", "2"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr: grid [0.01, 0.001]" in out and "6 trials (num_samples 3)" in out
    assert "max concurrent:  2" in out


def test_sweep_errors_are_one_line(make_experiment, capsys):
    path = make_experiment(**{"sweep": {"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}})
    assert orch(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "orch: error: sweep.space.optim.lr.uniform: low 0.1 must be below high 0.01"


def test_loopback_detection():
    assert is_loopback(None) and is_loopback("127.0.0.1:6379") and is_loopback("localhost:1")
    assert not is_loopback("auto") and not is_loopback("10.1.2.3:6379") and not is_loopback("ray://head:10001")


def test_local_head_command_uses_run_time_ports():
    head = LocalRay(num_cpus=2, num_gpus=0)
    head.temp_dir = "/tmp/orch-ray-x"
    argv = head.command([1001, 1002, 1003, 1004, 1005, 1006, 1007])
    assert argv[1:5] == ["start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    assert "--port=1001" in argv and "--runtime-env-agent-port=1007" in argv
    assert "--include-dashboard=false" in argv and "--num-cpus=2" in argv and "--temp-dir=/tmp/orch-ray-x" in argv


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, then closed: nothing listens there afterwards
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_preflight_refuses_an_address_where_nothing_listens(tiny_experiment, tmp_path, monkeypatch):
    from cluster.errors import LaunchError
    from orchestrator.submit import ResourceFlags, submit

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    port = _free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        plan = _plan(tiny_experiment, **{"resources.ray.address": address})
        with pytest.raises(LaunchError, match=f"no Ray cluster answers at 127.0.0.1:{port} .*ray start --head"):
            get_launcher("ray").preflight(plan)
    # Through `orch submit`: refused before config.yaml, a record or an MLflow run exists.
    with pytest.raises(LaunchError, match="no Ray cluster answers"):
        submit([str(tiny_experiment)], (), ResourceFlags(backend="ray", address=f"127.0.0.1:{port}"))
    assert not (tmp_path / "work").exists() and not (tmp_path / "home").exists()


def test_preflight_passes_when_something_listens(tiny_experiment, monkeypatch, caplog):
    import logging
    import socket

    # Something that is not Ray: the capacity question gets no answer (ray.init would retry for
    # minutes; its child process is stopped after the timeout) and the check is skipped.
    monkeypatch.setattr("orchestrator.launchers.ray.capacity.QUERY_TIMEOUT_S", 2.0)
    caplog.set_level(logging.DEBUG, logger="orchestrator.launchers.ray.capacity")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            get_launcher("ray").preflight(_plan(tiny_experiment, **{"resources.ray.address": address}))
    assert caplog.text.count("capacity not checked") == 2


def test_preflight_auto_needs_a_local_cluster(tiny_experiment, tmp_path, monkeypatch):
    import socket

    from cluster.errors import LaunchError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("orchestrator.launchers.ray.capacity.QUERY_TIMEOUT_S", 2.0)  # a listener that is not Ray
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's own variable: <RAY_TMPDIR>/ray/ray_current_cluster
    plan = _plan(tiny_experiment, **{"resources.ray.address": "auto"})
    with pytest.raises(LaunchError, match="address=auto but no Ray cluster runs here"):
        get_launcher("ray").preflight(plan)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
    with pytest.raises(LaunchError, match="no Ray cluster answers"):  # a stale file of a dead head
        get_launcher("ray").preflight(plan)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{server.getsockname()[1]}")  # wins over the file
        get_launcher("ray").preflight(plan)


def test_ray_workers_get_the_submitters_orch_home(tmp_path, monkeypatch):
    """The driver's job-level runtime environment carries its ORCH_HOME (the submitter's) to every
    worker of the job, whatever the environment the cluster was started with."""
    from orchestrator.launchers.ray.driver import job_runtime_env

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    assert job_runtime_env()["env_vars"] == {"ORCH_HOME": str(tmp_path / "home")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_HOME", "relative")
    assert job_runtime_env()["env_vars"] == {"ORCH_HOME": str(tmp_path / "relative")}
