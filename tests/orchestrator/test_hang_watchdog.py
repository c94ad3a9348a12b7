"""The hang watchdog of the local supervisor on a real hang: one training image is a named pipe
nobody writes (reading it blocks, as a hung network file system does), so one rank blocks in
its read while the other waits in the step's collective. Plus the watchdog's rules and the
reason line on literal heartbeats and py-spy stacks."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from orch_testing import fifo_dataset
from orchestrator import records
from orchestrator.launch import ResourceFlags
from orchestrator.spec import JobState
from orchestrator.submit import submit
from orchestrator.watchdog import HangSettings, Watchdog, latest_report
from orchestrator.watchdog_stacks import Where, hang_reason, parse_py_spy, where


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.usefixtures("local_orch_env")
def test_a_rank_blocked_in_a_read_is_named_and_the_job_ends(make_experiment, shapes_data, tmp_path):
    data, image = fifo_dataset(shapes_data, tmp_path)
    path = make_experiment(**{
        "schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 100000,
        "resources.gpus": 2, "runtime.hang_timeout": 60, "tracking.enable": False,
        "data.train.ann_file": str(data / "annotations" / "instances_train.json"),
        "data.train.img_dir": str(data / "train")})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="local"))
    _wait(lambda: records.load_record(handle.job_id).state.finished, 420, "the hung job to end")
    record = records.load_record(handle.job_id)
    started_beats = [json.loads(line)["t"] for r in (0, 1)
                     for line in open(Path(record.output_dir) / "heartbeat" / f"rank-{r}.jsonl")]
    assert record.state == JobState.FAILED
    assert record.ended_at - max(started_beats) < 180  # within 3 minutes of the last sign of life
    report = latest_report(record.output_dir)
    assert report is not None and record.error == report.reason, (record.error, report)
    assert "blocked in read" in report.reason and f"image {image}" in report.reason, report.reason
    assert "detection/data/decode.py" in report.reason and "waiting in" in report.reason, report.reason
    assert sorted(os.listdir(report.folder)) == ["rank-0.json", "rank-0.txt", "rank-1.json", "rank-1.txt", "reason.txt"]
    blocked = int(re.search(r"rank (\d) on \S+ blocked", report.reason).group(1))
    assert re.search(rf"rank {1 - blocked} on \S+ waiting in", report.reason), report.reason
    assert "read_image" in (Path(report.folder) / f"rank-{blocked}.txt").read_text()


def _beats(folder: Path, rank: int, beats: list[tuple[float, int, str]], pid: int = 1, host: str = "h") -> None:
    (folder / "heartbeat").mkdir(exist_ok=True)
    with open(folder / "heartbeat" / f"rank-{rank}.jsonl", "a") as handle:
        for t, step, phase in beats:
            line = {"t": t, "step": step, "total": 100, "phase": phase, "pid": pid, "host": host}
            if phase == "train":
                line.update(dt=2.0, images=4)
            handle.write(json.dumps(line) + "\n")


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_watchdog_rules(tmp_path):
    clock = Clock(1000.0)
    dog = Watchdog(str(tmp_path), HangSettings(hang_timeout=None, startup_timeout=100), 2, clock=clock, now=clock)
    _beats(tmp_path, 0, [(900.0, 5, "train")])  # an earlier attempt's beats do not count
    clock.t = 1099
    assert dog.check() is None
    _beats(tmp_path, 0, [(1099, 0, "start")])
    clock.t = 1101  # rank 1 never began: the start-up allowance is over
    stall = dog.check()
    assert stall.startup and "startup_timeout=100" in stall.describe()
    assert dog.check() is None  # reported once

    clock.t = 2000.0
    dog = Watchdog(str(tmp_path), HangSettings(startup_timeout=100), 2, clock=clock, now=clock)
    for rank in (0, 1):
        _beats(tmp_path, rank, [(2001, 0, "start"), (2003, 1, "train"), (2005, 2, "train")])
    clock.t = 2006
    assert dog.check() is None
    clock.t = 2006 + 299  # 20 x a 2 s step is less than the 300 s floor
    assert dog.check() is None
    _beats(tmp_path, 0, [(2305, 2, "eval")])  # an evaluation going on is progress
    clock.t = 2305
    assert dog.check() is None  # progress counts from when the watchdog saw it (clocks of hosts differ)
    clock.t = 2305 + 299
    assert dog.check() is None
    clock.t = 2305 + 301
    stall = dog.check()
    assert not stall.startup and stall.progress.step == 2 and "hang_timeout=300" in stall.describe()
    assert HangSettings(hang_timeout=60).limit(10.0) == 60 and HangSettings().limit(30.0) == 600


def test_settings_from_the_resolved_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  hang_timeout: 60\n  on_hang: wait\n")
    assert HangSettings.of_config(str(path)) == HangSettings(60, 1800.0, "wait")
    assert HangSettings.of_config(str(tmp_path / "none.yaml")) == HangSettings()


def frame(name, filename, line=1, native=False, **local_reprs):
    return {"name": name, "filename": filename, "line": 0 if native else line,
            "module": filename if native else None,
            "locals": None if native else [{"name": k, "repr": v} for k, v in local_reprs.items()]}


BLOCKED = [{"pid": 11, "os_thread_id": 11, "thread_name": "MainThread", "frames": [
    frame("open64", "/usr/lib/libc.so.6", native=True),
    frame("read_file", "/v/site-packages/torchvision/io/image.py", 52, path='"/d/train/000123.jpg"'),
    frame("read_image", "/src/detection/data/decode.py", 26, path='"/d/train/000123.jpg"'),
    frame("CocoDetection._load_image", "/src/detection/data/coco.py", 163),
]}]
WAITING = [{"pid": 10, "os_thread_id": 10, "thread_name": "MainThread", "frames": [
    frame("_engine_run_backward", "/v/site-packages/torch/autograd/graph.py", 825),
    frame("backward", "/v/site-packages/torch/_tensor.py", 626),
    frame("Trainer.run_step", "/src/detection/engine.py", 201),
]}]
BUFFERS = [{"pid": 15, "os_thread_id": 15, "thread_name": "MainThread", "frames": [
    frame("DistributedDataParallel._distributed_broadcast_coalesced",
          "/v/site-packages/torch/nn/parallel/distributed.py", 2051),
    frame("Trainer.run_step", "/src/detection/engine.py", 198),
]}]
REDUCE = [{"pid": 12, "os_thread_id": 12, "thread_name": "MainThread", "frames": [
    frame("all_reduce", "/v/site-packages/torch/distributed/distributed_c10d.py", 2501),
    frame("Trainer.run_step", "/src/detection/engine.py", 208),
]}]
LOADER = [{"pid": 13, "os_thread_id": 13, "thread_name": "MainThread", "frames": [
    frame("wait", "/py/threading.py", 331),
    frame("_DataLoaderIter._try_get_data", "/v/site-packages/torch/utils/data/dataloader.py", 1133),
    frame("Trainer.run_step", "/src/detection/engine.py", 190),
]}, {"pid": 14, "os_thread_id": 14, "thread_name": None, "frames": BLOCKED[0]["frames"]}]


def test_where_and_the_reason_line():
    blocked = where(parse_py_spy(BLOCKED), 11)
    assert blocked == Where("blocked in read", "open64, detection/data/decode.py:26, image 000123.jpg")
    assert where(parse_py_spy(WAITING), 10) == Where("waiting in backward (DDP's gradient all_reduce)",
                                                     "detection/engine.py:201")
    reduce = where(parse_py_spy(REDUCE), 12)
    assert reduce == Where("waiting in all_reduce", "detection/engine.py:208")
    assert where(parse_py_spy(BUFFERS), 15) == Where("waiting in distributed_broadcast_coalesced",
                                                     "detection/engine.py:198")
    worker = where(parse_py_spy(LOADER), 13)
    assert worker.state == "blocked in read" and worker.detail.startswith("loader worker pid 14; open64")
    reason = hang_reason({0: reduce, 1: blocked, 2: reduce, 3: reduce}, {0: "h1", 1: "h2", 2: "h1", 3: "h2"})
    assert reason == ("rank 1 on h2 blocked in read (open64, detection/data/decode.py:26, image 000123.jpg); "
                      "ranks 0, 2, 3 waiting in all_reduce (detection/engine.py:208)")


def test_without_native_frames_the_source_line_tells_a_read(tmp_path):
    source = tmp_path / "detection" / "reader.py"
    source.parent.mkdir()
    source.write_text("def load(path):\n    with open(path, 'rb') as handle:\n        return handle.read()\n")
    threads = parse_py_spy([{"pid": 3, "os_thread_id": 3, "thread_name": "MainThread", "frames": [
        frame("load", str(source), 2, path='"/d/train/7.jpg"'),
        frame("_SingleProcessDataLoaderIter._next_data", "/v/site-packages/torch/utils/data/dataloader.py", 790)]}])
    assert where(threads, 3) == Where("blocked in read", "open, detection/reader.py:2, image 7.jpg")


def test_the_training_thread_is_read_when_it_is_not_the_main_one():
    ray_main = {"pid": 11, "os_thread_id": 11, "thread_name": "MainThread", "frames": [
        frame("main_loop", "/v/site-packages/ray/_private/worker.py", 1069)]}
    trainer = {**BLOCKED[0], "os_thread_id": 12, "thread_name": "Thread-3 (train_fn)"}
    assert where(parse_py_spy([ray_main, trainer]), 11).state == "blocked in read"


def test_a_requeued_local_job_resumes():
    from orchestrator.launchers.local.plan import NodeCommand, NodeJob
    from orchestrator.launchers.local.supervisor import _resuming

    job = NodeJob(index=0, name="x", slots=1, commands=(NodeCommand(argv=("python", "-m", "orchestrator.worker", "c.yaml")),))
    assert _resuming(job).commands[0].argv[-2:] == ("--set", "runtime.resume=auto")
