"""The torchrun backend: golden dry-run texts, and real 2-process / 2-"node" runs (gloo, CPU) that
train the tiny model into ONE MLflow run with world size 2.

Regenerate the golden files with ``ORCH_UPDATE_GOLDEN=1 pytest tests/orchestrator/test_torchrun_launcher.py``.
"""

import os
from pathlib import Path

import pytest

from cluster.errors import LaunchError
from orchestrator import records as jobs
from orchestrator.config import load_experiment
from orchestrator.launchers.torchrun import TorchrunLauncher, torchrun_path
from orchestrator.spec import JobState
from orchestrator.launch import job_spec as build_job_spec
from orchestrator.submit import ResourceFlags, submit

GOLDEN = Path(__file__).parent / "golden"
TIMEOUT_S = 600


pytestmark = pytest.mark.usefixtures("local_orch_env")


def dry_plan(path, **resources):
    exp = load_experiment(str(path), extra={f"resources.{k}": v for k, v in resources.items()})
    return TorchrunLauncher().plan([build_job_spec(exp, "torchrun", write=False)])


def check_golden(name, text, tmp_path):
    text = text.replace(str(tmp_path), "<TMP>").replace(str(Path(torchrun_path()).parent), "<BIN>")
    path = GOLDEN / name
    if os.environ.get("ORCH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize(
    "name, resources",
    [
        ("torchrun_one_node.txt", {"gpus": 2}),
        ("torchrun_ssh_hosts.txt", {"gpus": 8, "nodes": 2, "gpus_per_node": 4, "torchrun.hosts": ["gpu01", "gpu02"]}),
        ("torchrun_by_hand.txt", {"gpus": 16, "nodes": 2, "gpus_per_node": 8, "torchrun.node_rank": 1,
                                  "torchrun.master_addr": "gpu01", "torchrun.rdzv_port": 29633}),
        ("torchrun_print_only.txt", {"gpus": 16, "nodes": 2, "gpus_per_node": 8}),
    ],
)
def test_dry_run_text(tiny_experiment, tmp_path, name, resources):
    check_golden(name, dry_plan(tiny_experiment, **resources).text, tmp_path)


def test_plan_errors(tiny_experiment):
    with pytest.raises(LaunchError, match="--hosts h1,h2"):
        TorchrunLauncher().preflight(dry_plan(tiny_experiment, gpus=16, nodes=2, gpus_per_node=8))
    with pytest.raises(LaunchError, match="rdzv_port"):
        dry_plan(tiny_experiment, gpus=2, nodes=2, gpus_per_node=1, **{"torchrun.node_rank": 1})
    with pytest.raises(LaunchError, match="--hosts names 3 hosts but the job spans 2 node"):
        dry_plan(tiny_experiment, gpus=2, nodes=2, gpus_per_node=1, **{"torchrun.hosts": ["a", "b", "c"]})
    with pytest.raises(LaunchError, match="remote nodes cannot reach the master"):
        dry_plan(tiny_experiment, gpus=2, nodes=2, gpus_per_node=1, **{"torchrun.hosts": ["localhost", "gpu02"]})


def test_several_nodes_without_hosts_refused_before_anything_is_written(tiny_experiment, tmp_path):
    # --dry-run still prints the per-node lines; the real submit refuses in preflight, before
    # config.yaml or an MLflow run exists.
    flags = ResourceFlags(backend="torchrun", gpus=16, nodes=2, gpus_per_node=8)
    plan, handles = submit([str(tiny_experiment)], (), flags, dry_run=True)
    assert handles == [] and "# node 1:" in plan.text
    with pytest.raises(LaunchError, match="spans several nodes: give --hosts"):
        submit([str(tiny_experiment)], (), flags)
    assert not (tmp_path / "work").exists() and not (tmp_path / "home").exists()


def one_mlflow_run_with_world_size_2(record):
    import mlflow

    from orch_testing import shipped_run

    run = shipped_run(record)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "2" or run.data.params.get("world_size") == "2"
    runs = mlflow.MlflowClient(record.tracking_uri).search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]


def run_and_check(path, flags):
    _, handles = submit([str(path)], (), flags)
    state = handles[0].wait(TIMEOUT_S)
    record = jobs.load_record(handles[0].job_id)
    assert state == JobState.SUCCEEDED, Path(record.log_path).read_text()[-3000:]
    assert record.exit_code == 0 and record.extra["port"] and len(record.extra["devices"]) == 2
    one_mlflow_run_with_world_size_2(record)
    return record


@pytest.mark.slow
def test_two_processes_one_node(tiny_experiment):
    record = run_and_check(tiny_experiment, ResourceFlags(backend="torchrun", gpus=2))
    assert len(record.extra["pids"]) == 1  # one torchrun agent, two workers


@pytest.mark.slow
def test_two_nodes_on_this_machine(tiny_experiment):
    # Two torchrun agents (hosts naming this machine start without ssh), c10d rendezvous.
    record = run_and_check(tiny_experiment, ResourceFlags(backend="torchrun", gpus=2, nodes=2, gpus_per_node=1,
                                                        hosts="localhost,localhost"))
    assert len(record.extra["pids"]) == 2
    # One host, so one sampler (rank 0) covering both agents' process groups: both ranks counted.
    import socket

    from mlflow.tracking import MlflowClient
    from orch_testing import shipped_run

    run = shipped_run(record)
    processes = MlflowClient(record.tracking_uri).get_metric_history(run.info.run_id,
                                                                     f"system/{socket.gethostname()}/processes")
    assert max(m.value for m in processes) >= 2, processes
    assert not (Path(record.output_dir) / "system").exists()  # no other host to relay
