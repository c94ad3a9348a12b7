"""The hang watchdog of a Ray job (its driver reads the workers' heartbeats): a 2-worker job whose
first training image is a named pipe nobody writes ends FAILED with the blocked worker named."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from orch_testing import fifo_dataset
from orchestrator.spec import JobState
from orchestrator.submit import ResourceFlags, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_hung_worker_is_named_and_the_job_ends(ray_head, orch_home, make_experiment, shapes_data, tmp_path):
    from orchestrator.watchdog import latest_report

    data, image = fifo_dataset(shapes_data, tmp_path)
    path = make_experiment(**{
        "schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 100000,
        "runtime.hang_timeout": 60, "tracking.enable": False,
        "data.train.ann_file": str(data / "annotations" / "instances_train.json"),
        "data.train.img_dir": str(data / "train")})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="ray", gpus=2, address=ray_head.address))
    assert handle.wait(timeout_s=400) is JobState.FAILED
    record = handle.record()
    report = latest_report(record.output_dir)
    assert report is not None and record.error == report.reason, record.error
    assert re.search(r"rank \d on \S+ blocked in read \(open64, detection/data/decode.py:\d+, image " + image,
                     report.reason), report.reason
    assert {"rank-0.txt", "rank-1.txt"} <= set(os.listdir(report.folder))
    for rank in (0, 1):  # each on its own node, by a Ray task pinned there (this node too)
        assert "(dumped by a Ray task pinned to node " in (Path(report.folder) / f"rank-{rank}.txt").read_text()
