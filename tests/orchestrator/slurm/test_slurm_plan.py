"""Fast tests of the Slurm backend's pure parts: the sbatch script (golden files), the resource
layout, option validation, time parsing and the reading of Slurm's answers. No Slurm needed.

Regenerate the golden files after an intended change with ``ORCH_REGEN_GOLDEN=1 pytest ...``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from cluster.errors import ConfigError, LaunchError
from orchestrator.config import with_overrides
from orchestrator.config.schema import Experiment
from orchestrator.launchers.slurm import SlurmLauncher, parse_time, sbatch_parameters
from orchestrator.launchers.slurm.launcher import _shape
from orchestrator.launchers.slurm.state import parse_exit_code, to_state
from orchestrator.spec import JobSpec, JobState

GOLDEN = Path(__file__).parent / "golden"
HEADLINE = {  # orch submit exp.yaml --partition dev --gpus 16 --gpus-per-node 8 --time 2-00:00:00 ...
    "resources.gpus": 16,
    "resources.gpus_per_node": 8,
    "resources.partition": "dev",
    "resources.time": "2-00:00:00",
    "resources.cpus_per_task": 6,
    "resources.mem_gb": 480,
    "resources.slurm.account": "vision",
    "resources.slurm.qos": "high",
    "resources.slurm.constraint": "a100",
    "resources.slurm.exclude": "gpu13",
    "resources.slurm.setup": ["module load cuda/12.1", "source /shared/venvs/orch/bin/activate"],
    "resources.slurm.additional": {"reservation": "paper-deadline", "mail_type": "END"},
}


def job(name: str = "faster_rcnn", out: str = "/shared/work/faster_rcnn", **changes) -> JobSpec:
    exp = with_overrides(Experiment(name=name), {**HEADLINE, **changes})
    return JobSpec(name=name, experiment=exp, config_path=Path(out) / "config.yaml", output_dir=Path(out), backend="slurm")


def check_golden(name: str, text: str) -> None:
    # The interpreter path differs between machines; everything else must match byte for byte.
    text = text.replace(sys.executable, "{python}")
    path = GOLDEN / name
    if os.environ.get("ORCH_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_dry_run_script_is_golden():
    plan = SlurmLauncher().plan([job()])
    check_golden("sbatch_2x8.sh", plan.text)
    assert "#SBATCH --nodes=2" in plan.text and "#SBATCH --ntasks-per-node=8" in plan.text
    assert plan.groups[0].script == plan.text


def test_set_of_runs_is_one_array_with_parallelism_cap():
    jobs = [job(f"grid-{i}", f"/shared/work/grid/{i}", **{"resources.slurm.array_parallelism": 2}) for i in range(3)]
    plan = SlurmLauncher().plan(jobs)
    assert len(plan.groups) == 1
    check_golden("sbatch_array3.sh", plan.text)
    assert "#SBATCH --array=0-2%2" in plan.text
    assert "#SBATCH --job-name=grid" in plan.text


def test_plan_is_pure(tmp_path):
    out = tmp_path / "never"
    SlurmLauncher().plan([job(out=str(out))])
    assert not out.exists()


def test_cpu_experiment_asks_for_tasks_not_gpus():
    params = sbatch_parameters(job(**{"runtime.device": "cpu", "resources.gpus": 2, "resources.gpus_per_node": 1}))
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 1 and "gpus_per_node" not in params


def test_gpus_not_divisible_is_a_clear_error():
    # Built without the config validator (which has its own check), as a launcher may be handed
    # specs from code, not only from YAML.
    spec = job()
    for changes, message in (({"gpus": 12}, r"--gpus 12 does not fill whole nodes of --gpus-per-node 8"),
                             ({"nodes": 3}, r"--nodes 3 x --gpus-per-node 8 != --gpus 16"),
                             ({"gpus": 5, "gpus_per_node": None, "nodes": 2}, r"--gpus 5 does not split evenly over --nodes 2")):
        resources = dataclasses.replace(spec.experiment.resources, **changes)
        bad = dataclasses.replace(spec, experiment=dataclasses.replace(spec.experiment, resources=resources))
        with pytest.raises(ConfigError, match=message):
            SlurmLauncher().plan([bad])


def test_unknown_sbatch_option_lists_valid_ones():
    bad = job(**{"resources.slurm.additional": {"reservaton": "x"}})
    with pytest.raises(LaunchError, match=r"resources\.slurm\.additional\.reservaton: unknown sbatch option") as err:
        SlurmLauncher().plan([bad])
    message = str(err.value)
    assert "reservation" in message and "gpus_per_task" in message and "\n" not in message


def test_submitit_parameter_in_additional_is_passed_as_parameter():
    params = sbatch_parameters(job(**{"resources.slurm.additional": {"gpus-per-task": 1, "signal_delay_s": 120}}))
    assert params["gpus_per_task"] == 1 and params["signal_delay_s"] == 120


@pytest.mark.parametrize(
    "text,minutes",
    [("30", 30), ("90:30", 91), ("02:00:00", 120), ("2-00:00:00", 2880), ("1-12", 2160), ("1-00:30", 1470), (None, 1440)],
)
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


def test_bad_time_names_the_key():
    with pytest.raises(ConfigError, match=r"resources.time='two days'.*--time"):
        parse_time("two days")


@pytest.mark.parametrize(
    "raw,state",
    [("PENDING", JobState.PENDING), ("REQUEUED", JobState.PENDING), ("RUNNING", JobState.RUNNING),
     ("COMPLETED", JobState.SUCCEEDED), ("CANCELLED by 0", JobState.CANCELLED), ("CANCELLED+", JobState.CANCELLED),
     ("OUT_OF_MEMORY", JobState.FAILED), ("TIMEOUT", JobState.FAILED), ("", JobState.UNKNOWN)],
)
def test_slurm_states(raw, state):
    assert to_state(raw) is state


def test_exit_codes():
    assert parse_exit_code("0:0") == 0
    assert parse_exit_code("1:0") == 1
    assert parse_exit_code("0:15") == -15
    assert parse_exit_code("n/a") is None


def test_unreachable_slurm_refuses_before_anything_is_written(tiny_experiment, tmp_path, monkeypatch):
    # No sinfo on PATH: Slurm cannot answer. The refusal must come from preflight, before
    # build_job_spec writes config.yaml or creates the MLflow run (no orphan RUNNING run).
    from orchestrator.submit import ResourceFlags, submit

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(LaunchError, match="Slurm is not reachable.*SLURM_CONF.*another --backend"):
        SlurmLauncher().preflight(SlurmLauncher().plan([job(out=str(tmp_path / "never"))]))
    with pytest.raises(LaunchError, match="Slurm is not reachable"):
        submit([str(tiny_experiment)], (), ResourceFlags(backend="slurm"))
    assert not (tmp_path / "work").exists() and not (tmp_path / "home").exists()


def test_sets_larger_than_max_array_size_become_several_arrays():
    jobs = [job(f"grid-{i}", f"/shared/work/grid/{i}", **{"resources.slurm.array_parallelism": 4}) for i in range(7)]
    launcher = SlurmLauncher()
    launcher.max_array_size = 3  # as `fit` reads it from `scontrol show config`
    plan = launcher.plan(jobs)
    assert [g.indices for g in plan.groups] == [(0, 1, 2), (3, 4, 5), (6,)]
    # the throttle is shared out over the arrays (4 over 3 arrays: 2 each, at most the array's size)
    assert [g.params.get("array_parallelism") for g in plan.groups[:2]] == [2, 2]
    assert "#SBATCH --array=0-2%2" in plan.groups[0].script
    assert sorted(i for g in plan.groups for i in g.indices) == list(range(7))  # every job once


def test_without_max_parallel_the_throttle_is_what_the_partition_holds():
    jobs = [job(f"grid-{i}", f"/shared/work/grid/{i}") for i in range(5)]
    launcher = SlurmLauncher()
    # Slurm never asked (a dry run away from it): the default cap, at most the array's size
    assert launcher.plan(jobs).groups[0].params["array_parallelism"] == 5
    launcher.at_once[_shape(sbatch_parameters(jobs[0]))] = 3  # as `fit` reads it from the nodes
    assert "#SBATCH --array=0-4%3" in launcher.plan(jobs).text



def test_requeue_on_node_fail_asks_slurm_to_requeue_the_job():
    script = SlurmLauncher().plan([job(**{"resources.slurm.requeue_on_node_fail": True})]).groups[0].script
    assert "#SBATCH --requeue\n" in script
    assert "requeue" not in sbatch_parameters(job()).get("additional_parameters", {})
