"""Impossible requests on the real 2-node Slurm cluster (conftest.py: partitions dev and debug
(MaxTime 1 h), 2 nodes of 4 CPUs, 8000 MB and 2 fake GPUs each): ``orch submit`` refuses each at
once with one line, before any record, file or Slurm job exists. ``--wait-for-resources`` waits
for a drained node to come back, then gives up with the same kind of line."""

from __future__ import annotations

import subprocess
import time

import pytest

from orchestrator.cli import main as orch
from orchestrator.records import list_records

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def squeue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def experiment(slurm_cluster, write_experiment, module_orch_home, tmp_path):
    """A tiny experiment that asks for GPUs on Slurm (runtime.device auto: fake GRES)."""
    return write_experiment(tmp_path / "exp", "cap", **{"runtime.device": "auto"})


@pytest.mark.parametrize("flags, line", [
    (["--partition", "dev", "--gpus", "3", "--gpus-per-node", "1"],
     "job cap asks for 3 nodes but partition dev has 2 nodes; lower --nodes (or --gpus), or pick a bigger --partition"),
    (["--partition", "dev", "--gpus", "3", "--gpus-per-node", "3"],
     "job cap asks for 3 GPUs per node but the nodes of partition dev have at most 2 (gres gpu); "
     "lower --gpus-per-node (and raise --nodes), or pick another --partition"),
    (["--partition", "debug", "--gpus", "1", "--time", "02:00:00"],
     "job cap asks for a time limit of 02:00:00 (--time) but partition debug allows at most 01:00:00 (MaxTime); "
     "pass --time 01:00:00 or less, or another --partition"),
    (["--partition", "debug", "--gpus", "1"], "job cap asks for a time limit of 1-00:00:00 (orch's default: "
                                              "--time was not given) but partition debug allows at most 01:00:00"),
    (["--partition", "nope", "--gpus", "1"],
     "job cap asks for partition nope, which this Slurm cluster does not have; its partitions: dev (default), debug; "
     "pass one with --partition"),
    (["--partition", "dev", "--gpus", "2", "--cpus-per-task", "3"],
     "job cap asks for 6 CPUs per node (2 tasks, one per rank, x 3 cpus_per_task) but the nodes of partition dev "
     "have at most 4"),
    (["--partition", "dev", "--gpus", "1", "--mem-gb", "16"],
     "job cap asks for 16 GB per node (--mem-gb) but the nodes of partition dev have at most 7.8 GB"),
])
def test_impossible_requests_are_refused_at_once(experiment, tmp_path, capsys, flags, line):
    started = time.monotonic()
    assert orch(["submit", str(experiment), "--backend", "slurm", *flags]) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert err.startswith("orch: error: ") and line in err and "\n" not in err, err
    assert elapsed < 30, elapsed  # at once (Slurm answers in milliseconds; the rest is Python start-up)
    assert squeue() == "" and list_records() == []
    assert not (tmp_path / "exp" / "work").exists()  # no config.yaml, no journal


def test_gpus_alone_spread_over_the_partitions_nodes(experiment, capsys):
    # --gpus 4 on nodes of 2 GPUs: 2 nodes x 2 (as the README's --gpus 16 on 8-GPU nodes: 2 x 8)
    assert orch(["submit", str(experiment), "--backend", "slurm", "--partition", "dev", "--gpus", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=2" in out, out
    # what fits on one node stays on one node
    assert orch(["submit", str(experiment), "--backend", "slurm", "--partition", "dev", "--gpus", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in out and "#SBATCH --ntasks-per-node=2" in out, out
    assert orch(["submit", str(experiment), "--backend", "slurm", "--partition", "dev", "--gpus", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("orch: error: --gpus 3 does not fill whole nodes of partition dev (2 GPUs each); "
                   "give a multiple of 2, or --nodes / --gpus-per-node"), err
    assert squeue() == "" and list_records() == []


def test_what_fits_passes_preflight(experiment):
    from orchestrator.config import load_experiment, with_overrides
    from orchestrator.launch import Launch

    exp = with_overrides(load_experiment(str(experiment)), {"resources.partition": "debug", "resources.time": "00:30:00",
                                                            "resources.gpus": 4, "resources.gpus_per_node": 2,
                                                            "resources.mem_gb": 7})
    launch = Launch.for_backend("slurm")
    plan = launch.plan([exp])
    assert "#SBATCH --nodes=2" in plan.text and "#SBATCH --gpus-per-node=2" in plan.text
    launch.preflight(plan)  # no error
    assert squeue() == ""


def test_wait_for_resources_waits_for_a_drained_node(experiment, capsys, caplog):
    from orchestrator.config import load_experiment, with_overrides
    from orchestrator.launch import Launch

    exp = with_overrides(load_experiment(str(experiment)), {"resources.partition": "dev", "resources.gpus": 2,
                                                            "resources.gpus_per_node": 1})
    subprocess.run(["scontrol", "update", "nodename=node2", "state=drain", "reason=orch capacity test"], check=True)
    try:
        launch = Launch.for_backend("slurm")
        launch.preflight(launch.plan([exp]))  # ever: node2 may come back, so the job may queue (with a warning)
        assert "node not DOWN/DRAIN (2 in all)" in caplog.text and "wait in Slurm's queue" in caplog.text
        started = time.monotonic()
        flags = ["--backend", "slurm", "--partition", "dev", "--gpus", "2", "--gpus-per-node", "1"]
        assert orch(["submit", str(experiment), *flags, "--wait-for-resources", "3s"]) == 2
        waited = time.monotonic() - started
        err = capsys.readouterr().err.strip()
        assert err == ("orch: error: job cap asks for 2 nodes but partition dev has 1 node not DOWN/DRAIN (2 in all); "
                       "lower --nodes (or --gpus), or pick a bigger --partition"), err
        assert 3.0 <= waited < 30, waited
        assert squeue() == "" and list_records() == []
    finally:
        subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], check=True)
    # node2 back: the same request passes a wait at once.
    started = time.monotonic()
    launch = Launch.for_backend("slurm")
    launch.preflight(launch.plan([exp]), wait_s=60)
    assert time.monotonic() - started < 45  # well before the 60 s wait ends


def test_a_submission_sbatch_refuses_in_part_leaves_nothing_queued(slurm_cluster, write_experiment, module_orch_home,
                                                                  tmp_path, capsys):
    """Two experiments, two sbatch calls: Slurm takes the first and refuses the second (a node
    feature no node has, which only sbatch checks). All or nothing: the first is cancelled, its
    record says why, and the one error line says so."""
    first = write_experiment(tmp_path / "a", "first", **{"resources.slurm.additional": {"hold": True}})
    second = write_experiment(tmp_path / "b", "second", **{"resources.slurm.constraint": "nofeature"})
    before = {r.job_id for r in list_records()}
    assert orch(["submit", str(first), str(second), "--backend", "slurm", "--partition", "dev"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (before it: sbatch's own line, which submitit lets through)
    assert err.startswith("orch: error: sbatch refused second: ") and "Invalid feature specification" in err, err
    assert "the 1 job(s) of this submission Slurm had taken were cancelled: nothing runs" in err, err
    assert squeue() == ""
    [record] = [r for r in list_records() if r.job_id not in before]
    assert record.name == "first" and record.state.value == "CANCELLED" and "refused another part" in record.error
