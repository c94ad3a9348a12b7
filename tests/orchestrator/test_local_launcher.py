"""The local backend against real processes: parallel jobs on CPU slots, ports, failure, cancel.

Every test trains (or tries to train) the tiny experiment through ``orchestrator.submit`` ->
``LocalLauncher`` -> the detached supervisor -> ``python -m orchestrator.worker``.
"""

import os
import time
from pathlib import Path

import pytest

from cluster.errors import ClusterError, LaunchError
from cluster.gpus import lease_devices, list_device_leases
from orch_testing import port_leases
from orchestrator import records as jobs
from cluster.process import group_alive
from orch_testing import shipped_run
from orchestrator.cli import main as cli
from orchestrator.jobs import JobHandle
from orchestrator.launchers.local import LocalLauncher
from orchestrator.spec import JobState
from orchestrator.submit import ResourceFlags, submit

TIMEOUT_S = 600


pytestmark = pytest.mark.usefixtures("local_orch_env")


def experiments(make_experiment, tmp_path, names, **overrides):
    return [str(make_experiment(_name=f"{n}.yaml", name=n, **{"runtime.output_dir": str(tmp_path / "work" / n)},
                                **overrides)) for n in names]


def max_overlap(records):
    events = sorted([(r.started_at, 1) for r in records] + [(r.ended_at, -1) for r in records])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_three_jobs_on_two_slots(make_experiment, tmp_path):
    paths = experiments(make_experiment, tmp_path, ["a", "b", "c"])
    from orchestrator.config import load_experiment
    from orchestrator.launch import job_spec as build_job_spec

    launcher = LocalLauncher()
    plan = launcher.plan([build_job_spec(load_experiment(p), "local") for p in paths])  # creates the journals
    handles = [JobHandle(job_id) for job_id in launcher.submit(plan)]
    # returns at once, before any job ends: training happens in the supervisor
    assert JobState.SUCCEEDED not in [jobs.load_record(h.job_id).state for h in handles]
    assert [h.wait(TIMEOUT_S) for h in handles] == [JobState.SUCCEEDED] * 3
    records = [jobs.load_record(h.job_id) for h in handles]
    assert max_overlap(records) == 2  # two at once on two slots, the third queued
    for record, job in zip(records, plan.jobs):
        assert record.exit_code == 0 and record.output_dir == str(job.output_dir)
        run = shipped_run(record)  # shipped by the shipper each worker started
        assert run.info.status == "FINISHED" and run.info.run_name == job.name
        assert (Path(record.output_dir) / "result.json").exists()
        assert "iter 4/4" in Path(record.log_path).read_text()
    assert all(len(r.extra["devices"]) == 1 for r in records)
    assert any("waiting for 1 CPU slot" in Path(r.log_path).read_text() for r in records)
    assert list_device_leases("cpu") == [] and port_leases() == []


@pytest.mark.slow
def test_parallel_ddp_jobs_get_distinct_ports(make_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CPU_SLOTS", "4")
    paths = experiments(make_experiment, tmp_path, ["p", "q"], **{"resources.gpus": 2})
    _, handles = submit(paths, (), ResourceFlags(backend="local"))
    assert [h.wait(TIMEOUT_S) for h in handles] == [JobState.SUCCEEDED] * 2
    records = [jobs.load_record(h.job_id) for h in handles]
    assert max_overlap(records) == 2
    ports = [r.extra["port"] for r in records]
    assert all(ports) and ports[0] != ports[1]
    assert all(len(r.extra["devices"]) == 2 for r in records)
    assert not set(records[0].extra["devices"]) & set(records[1].extra["devices"])


def test_failing_job_records_failed(make_experiment, tmp_path, shapes_data):
    ann = tmp_path / "ann.json"  # never written: only the worker finds out (as if only compute nodes saw the data)
    paths = experiments(make_experiment, tmp_path, ["bad"], **{"data.train.ann_file": str(ann)})
    _, handles = submit(paths, (), ResourceFlags(backend="local"), check_data=False)
    assert handles[0].wait(TIMEOUT_S) == JobState.FAILED
    record = jobs.load_record(handles[0].job_id)
    assert record.exit_code not in (None, 0)
    assert record.error and "ann.json" in Path(record.log_path).read_text()
    assert list_device_leases("cpu") == []
    assert _run_status(record) == "FAILED"  # not left RUNNING by a worker that never logged


def _run_status(record) -> str:
    """The MLflow status of the job's run, once its final status was shipped (the worker's
    shipper, or the one the supervisor starts when the job ended without training ending it)."""
    return shipped_run(record).info.status


def test_cancel_kills_workers_and_frees_the_lease(make_experiment, tmp_path, capsys):
    paths = experiments(make_experiment, tmp_path, ["long"], **{"schedule.iterations": 100000})
    _, handles = submit(paths, (), ResourceFlags(backend="local"))
    deadline = time.monotonic() + TIMEOUT_S
    while jobs.load_record(handles[0].job_id).state != JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    record = jobs.load_record(handles[0].job_id)
    assert len(list_device_leases("cpu")) == 1
    assert cli(["cancel", record.job_id]) == 0
    assert handles[0].wait(60) == JobState.CANCELLED
    assert _run_status(jobs.load_record(record.job_id)) == "KILLED"
    for pid in record.extra["pids"]:
        assert not group_alive(pid)
    deadline = time.monotonic() + 30
    while list_device_leases("cpu"):  # the supervisor frees it as it records the end
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "CANCELLED" in capsys.readouterr().out
    handles[0].cancel()  # idempotent
    assert jobs.load_record(record.job_id).state == JobState.CANCELLED


def test_capacity_errors_come_at_once(make_experiment, tmp_path):
    too_big = experiments(make_experiment, tmp_path, ["big"], **{"resources.gpus": 3})
    with pytest.raises(ClusterError) as err:  # what was asked, what the node has and why, which flag
        submit(too_big, (), ResourceFlags(backend="local", wait_for_resources=5.0))  # this node never grows
    assert str(err.value) == ("job big asks for 3 CPU slots but this node has 2 (no GPU; ORCH_CPU_SLOTS=2); "
                              "lower --gpus to 2 or less, or use --backend torchrun/slurm/ray for more nodes")
    held = lease_devices(2)
    try:
        one = experiments(make_experiment, tmp_path, ["one"])
        with pytest.raises(ClusterError, match="--no-wait"):
            submit(one, (), ResourceFlags(backend="local", no_wait=True))
    finally:
        held.release()
    assert jobs.list_records() == []  # nothing half-submitted


def test_plan_is_pure_and_ordered(make_experiment, tmp_path):
    from orchestrator.config import load_experiment
    from orchestrator.launch import job_spec as build_job_spec

    specs = [build_job_spec(load_experiment(p), "local", write=False)
             for p in experiments(make_experiment, tmp_path, ["s"]) +
             experiments(make_experiment, tmp_path, ["l"], **{"resources.gpus": 2})]
    before = sorted(os.listdir(tmp_path))
    plan = LocalLauncher().plan(specs)
    assert sorted(os.listdir(tmp_path)) == before
    assert [e.index for e in plan.request.jobs] == [1, 0]  # largest first
    text = str(plan)
    assert text.index("job 1: l") < text.index("job 2: s")
    assert "RANK=1" in text and "MASTER_PORT={port}" in text and "-m orchestrator.worker" in text
    with pytest.raises(LaunchError, match="--nodes"):
        LocalLauncher().plan([build_job_spec(load_experiment(experiments(
            make_experiment, tmp_path, ["n"], **{"resources.nodes": 2, "resources.gpus": 2})[0]), "local", write=False)])


def command_plan(commands_per_job, max_parallel=None):
    """A local submission whose jobs run the given commands instead of the trainer (fast, no torch):
    same records, supervisor, leases and process groups as a real submission."""
    import sys

    from orchestrator.config.schema import Experiment, Resources
    from orchestrator.launchers.local import NodeCommand, NodeJob, NodePlan, NodeRequest, PortRule
    from orchestrator.spec import JobSpec

    specs, entries = [], []
    for index, commands in enumerate(commands_per_job):
        exp = Experiment(name=f"cmd{index}", resources=Resources(gpus=len(commands)))
        specs.append(JobSpec(name=exp.name, experiment=exp, config_path=Path("/dev/null"),
                             output_dir=Path("/tmp"), backend="local"))
        entries.append(NodeJob(index=index, name=exp.name, slots=len(commands), port=PortRule("lease"),
                               commands=tuple(NodeCommand((sys.executable, "-c", code), {"P": "{port}"})
                                              for code in commands)))
    plan = NodePlan("local", tuple(specs), NodeRequest(jobs=tuple(entries), max_parallel=max_parallel), ())
    return [JobHandle(job_id) for job_id in LocalLauncher().submit(plan)]


def test_max_parallel_caps_running_jobs(monkeypatch):
    monkeypatch.setenv("ORCH_CPU_SLOTS", "4")
    handles = command_plan([["import time; time.sleep(1)"]] * 4, max_parallel=2)
    assert [h.wait(120) for h in handles] == [JobState.SUCCEEDED] * 4
    assert max_overlap([jobs.load_record(h.job_id) for h in handles]) == 2


def test_one_failing_rank_stops_the_others_and_logs_follow(capsys):
    handles = command_plan([[
        "import os, sys; print('rank0 port', os.environ['P'], flush=True); sys.exit(3)",
        "import time; time.sleep(600)",  # would block forever in a collective
    ]])
    assert cli(["logs", "-f", handles[0].job_id]) == 0  # follows until the job has ended
    out = capsys.readouterr()
    record = jobs.load_record(handles[0].job_id)
    assert f"rank0 port {record.extra['port']}" in out.out  # the leased {port} reached the env
    assert "FAILED (exit status 3)" in out.err
    assert record.state == JobState.FAILED and record.exit_code == 3
    assert all(not group_alive(pid) for pid in record.extra["pids"])


def test_too_big_names_where_the_node_size_comes_from(monkeypatch):
    from cluster.gpus import DevicePool
    from orchestrator.launchers.local.launcher import too_big

    gpus = DevicePool("gpu", ("0", "3"), 8)
    assert too_big("wide", 4, gpus) == ("job wide asks for 4 GPUs but this node has 2 (GPUs 0,3; CUDA_VISIBLE_DEVICES "
                                        "limits them); lower --gpus to 2 or less, or use --backend torchrun/slurm/ray "
                                        "for more nodes")
    monkeypatch.delenv("ORCH_CPU_SLOTS", raising=False)
    cpus = DevicePool("cpu", ("cpu0", "cpu1"), 1)
    assert "this node has 2 (no GPU; resources.local.cpu_slots=2);" in too_big("wide", 4, cpus, cpu_slots=2)
    assert "this node has 2 (no GPU: one slot per CPU core; resources.local.cpu_slots or ORCH_CPU_SLOTS" in too_big(
        "wide", 4, cpus)
