"""Each rank's heartbeat file (a line per step, phases announced before an evaluation or a
checkpoint, kept small) and the progress read back from it (orchestrator.progress)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from detection.hooks import HeartbeatHook
from orchestrator.progress import read_progress


def trainer_at(step, max_iters=10, iters_per_epoch=5):
    return SimpleNamespace(iter=step, max_iters=max_iters, iters_per_epoch=iters_per_epoch, epoch=step // iters_per_epoch)


def test_beats_per_step_and_phases(tmp_path):
    hook = HeartbeatHook(str(tmp_path), 1, unit="iter", eval_period=4, checkpoint_period=3, tick_s=0.05)
    hook.before_train(trainer_at(0))
    for step in range(1, 5):
        hook.after_iter(trainer_at(step), {"time": 0.5, "images": 4.0})
    hook.after_eval(trainer_at(4), {})
    hook.after_train(trainer_at(4), None)
    lines = [json.loads(line) for line in open(tmp_path / "heartbeat" / "rank-1.jsonl")]
    assert [(b["step"], b["phase"]) for b in lines] == [
        (0, "start"), (1, "train"), (2, "train"), (3, "checkpoint"), (4, "eval"), (4, "train"), (4, "end")]
    assert lines[1]["pid"] == os.getpid() and lines[1]["dt"] == 0.5


def test_an_evaluation_keeps_beating(tmp_path):
    hook = HeartbeatHook(str(tmp_path), 0, unit="iter", eval_period=1, tick_s=0.05)
    hook.after_iter(trainer_at(1), {"time": 0.1, "images": 2.0})
    import time

    time.sleep(0.5)  # a long evaluation
    hook.after_eval(trainer_at(1), {})
    lines = [json.loads(line) for line in open(tmp_path / "heartbeat" / "rank-0.jsonl")]
    assert len([b for b in lines if b["phase"] == "eval"]) >= 3
    assert lines[-1]["phase"] == "train"
    hook._close()


def test_file_stays_small(tmp_path):
    hook = HeartbeatHook(str(tmp_path), 0, unit="iter", max_bytes=2000)
    for step in range(1, 200):
        hook.after_iter(trainer_at(step, max_iters=1000), {"time": 0.1, "images": 2.0})
    assert os.path.getsize(tmp_path / "heartbeat" / "rank-0.jsonl") < 2500
    assert read_progress(str(tmp_path)).step == 199


def test_progress_of_two_ranks(tmp_path):
    folder = tmp_path / "heartbeat"
    folder.mkdir()
    for rank, last in ((0, 6), (1, 5)):
        with open(folder / f"rank-{rank}.jsonl", "w") as handle:
            for step in range(last + 1):
                beat = {"t": 1000.0 + step, "step": step, "total": 10, "phase": "train", "pid": 7, "host": "h"}
                if step:
                    beat.update(dt=1.0, images=8.0)
                handle.write(json.dumps(beat) + "\n")
            handle.write('{"t": 10')  # a line being written
    progress = read_progress(str(tmp_path))
    assert (progress.step, progress.total) == (5, 10)  # the slowest rank
    assert progress.images_per_s == 8.0 and progress.median_step_s == 1.0 and progress.eta_s == 5.0
    assert progress.last_beat == 1006.0 and sorted(progress.ranks) == [0, 1]
    assert progress.describe() == "step 5/10, 8.0 img/s, ETA 0:00:05"
    assert read_progress(str(tmp_path / "none")) is None
