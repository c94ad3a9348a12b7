"""The hang watchdog on Slurm (task 0 decides, every task dumps its own stack): a 2-task job
whose first training image is a named pipe nobody writes; and `orch why` on it."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from orchestrator.spec import JobState

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(420)]


def test_a_hung_task_is_named_and_the_job_ends(slurm_cluster, write_experiment, module_orch_home, shapes_data,
                                               tmp_path):
    from orch_testing import fifo_dataset
    from orchestrator.commands.why import why_cmd
    from orchestrator.submit import ResourceFlags, submit
    from orchestrator.watchdog import latest_report

    data, image = fifo_dataset(shapes_data, tmp_path)
    path = write_experiment(tmp_path / "hang", "hang", **{
        "schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 100000,
        "runtime.device": "auto", "runtime.hang_timeout": 60, "tracking.enable": False,
        "data.train.ann_file": str(data / "annotations" / "instances_train.json"),
        "data.train.img_dir": str(data / "train")})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="slurm", partition="dev", gpus=2, gpus_per_node=1))
    assert handle.wait(timeout_s=360) is JobState.FAILED
    record = handle.record()
    report = latest_report(record.output_dir)
    assert report is not None, record.error
    assert re.search(r"rank \d on \S+ blocked in read \(open64, detection/data/decode.py:\d+, image " + image,
                     report.reason), report.reason
    assert re.search(r"rank \d on \S+ waiting in", report.reason), report.reason
    assert {"rank-0.txt", "rank-1.txt"} <= set(os.listdir(report.folder))
    assert "hang: no rank advanced" in (record.error or ""), record.error
    text = CliRunner().invoke(why_cmd, [handle.job_id]).output
    assert f"hang report: {report.folder}" in text and "sbatch script" in text, text


def test_why_names_the_task_of_a_config_error(slurm_cluster, write_experiment, module_orch_home, tmp_path):
    from orchestrator.commands.why import why_cmd
    from orchestrator.submit import ResourceFlags, submit

    path = write_experiment(tmp_path / "bad", "bad", **{"runtime.device": "cuda", "tracking.enable": False})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="slurm", partition="dev", gpus=2, gpus_per_node=1))
    assert handle.wait(timeout_s=240) is JobState.FAILED
    text = CliRunner().invoke(why_cmd, [handle.job_id]).output
    assert re.search(r"first failure: task [01]", text), text
    assert "runtime.device=cuda but no CUDA GPU is visible" in text and "#SBATCH" in text, text
    assert text.splitlines()[-1].startswith("next: fix what the error names"), text
