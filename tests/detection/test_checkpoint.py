"""Checkpoints: atomic writes survive a kill, retention, best copies, exact resume."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from orch_testing import root_conftest

from cluster.env import DistEnv
from cluster.errors import ConfigError
from detection.checkpoint import Checkpointer, atomic_save, load_checkpoint
from detection.config import CheckpointConfig
from detection.engine import Preempted, Trainer
from detection.hooks import Hook
from detection.lr_scaling import scale_lr
from detection.config import OptimConfig, ScheduleConfig
from detection.train import main
from orchestrator.config import load_experiment


class LossRecorder(Hook):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def after_iter(self, trainer, log):
        self.losses[trainer.iter] = log["loss"]


class StopAfter(Hook):
    """Asks to stop once ``n`` steps are done (like a Slurm preemption signal)."""

    def __init__(self, n):
        self.n = n

    def should_stop(self, trainer):
        return trainer.iter + 1 >= self.n


# Faster R-CNN samples RPN/RoI boxes with torch's global RNG, so exact equality needs the RNG
# states restored too (SSD would hide a missing restore).
RESUME_OVERRIDES = {
    "tracking.enable": False, "data.val": None, "schedule.iterations": 12,
    "model.type": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "model.options": {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32,
                      "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50},
    "checkpoint.interval": 100, "checkpoint.save_best": None, "optim.type": "sgd", "optim.lr": 0.01,
    "schedule.warmup_iters": 3,
}


def _resume_experiment(make_experiment, **extra):
    return make_experiment(**{**RESUME_OVERRIDES, **extra})


@pytest.fixture(scope="module")
def uninterrupted_losses(shapes_data, tmp_path_factory) -> dict[int, float]:
    """The losses of steps 1..12 of the resume experiment run without a stop, trained once for the
    module: the reference of every stopped-and-resumed run below. The LR (constant after 3 warmup
    steps) and the batch order (seed, epoch) do not depend on the schedule's length, so its first
    8 steps are those of an uninterrupted 8-step run too."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    mapping = root_conftest().tiny_experiment_dict(shapes_data, folder / "work", f"sqlite:///{folder / 'mlflow.db'}")
    for key, value in RESUME_OVERRIDES.items():
        root_conftest()._set_dotted(mapping, key, value)
    path = folder / "whole.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    whole = LossRecorder()
    main(load_experiment(path), DistEnv.single(), hooks=[whole])
    assert sorted(whole.losses) == list(range(1, 13))
    return whole.losses


@pytest.mark.parametrize("stop_at", [5, 8])  # mid-epoch, and exactly at the epoch boundary (8 steps/epoch)
def test_stopped_and_resumed_run_has_the_losses_of_an_uninterrupted_run(make_experiment, stop_at, uninterrupted_losses):
    path = _resume_experiment(make_experiment)
    split_dir = path.parent / "split"
    first = LossRecorder()
    with pytest.raises(Preempted) as stopped:
        main(load_experiment(path, [f"runtime.output_dir={split_dir}"]), DistEnv.single(), hooks=[first, StopAfter(stop_at)])
    assert stopped.value.checkpoint.endswith(f"iter_{stop_at}.pth")
    second = LossRecorder()
    result = main(load_experiment(path, [f"runtime.output_dir={split_dir}", "runtime.resume=auto"]),
                  DistEnv.single(), hooks=[second])
    assert result.iterations == 12
    assert sorted(first.losses) == list(range(1, stop_at + 1))
    assert sorted(second.losses) == list(range(stop_at + 1, 13))
    resumed = {**first.losses, **second.losses}
    assert resumed == uninterrupted_losses  # exactly equal floats, not approximately


def test_resume_auto_with_a_longer_schedule_continues_exactly(make_experiment, caplog, uninterrupted_losses):
    # Same world size, schedule.iterations 4 -> 8: iterations 5..8 are trained, with the losses of
    # an uninterrupted run (the LR of steps 1..8 does not depend on the length), and no
    # world-size change is reported.
    path = _resume_experiment(make_experiment, **{"schedule.iterations": 8})
    split_dir = path.parent / "split"
    first = LossRecorder()
    main(load_experiment(path, [f"runtime.output_dir={split_dir}", "schedule.iterations=4"]),
         DistEnv.single(), hooks=[first])
    second = LossRecorder()
    with caplog.at_level(logging.INFO, logger="detection.checkpoint"):
        result = main(load_experiment(path, [f"runtime.output_dir={split_dir}", "runtime.resume=auto"]),
                      DistEnv.single(), hooks=[second])
    assert result.iterations == 8
    assert sorted(first.losses) == [1, 2, 3, 4] and sorted(second.losses) == [5, 6, 7, 8]
    assert {**first.losses, **second.losses} == {k: v for k, v in uninterrupted_losses.items() if k <= 8}
    assert "world size" not in caplog.text and "LR rule re-applied" not in caplog.text
    assert "at iteration 4; schedule changed from 4 to 8 iterations" in caplog.text


def test_resume_auto_on_another_world_size_still_rescales(make_experiment, caplog):
    # A checkpoint of world size 2 at iteration 4 of 16 (faked by editing a world-size-1 one)
    # resumed on world size 1 with 8 iterations: the same fraction, 2 of 8, and a warning.
    path = make_experiment(**{"tracking.enable": False, "data.val": None})
    first = main(load_experiment(path), DistEnv.single())
    state = load_checkpoint(first.last_checkpoint)
    assert state["iter"] == 4 and state["world_size"] == 1
    # "run_id": an entry of older versions' checkpoints (always None there), ignored on load.
    atomic_save({**state, "world_size": 2, "max_iters": 16, "run_id": None}, first.last_checkpoint)
    steps = LossRecorder()
    with caplog.at_level(logging.WARNING, logger="detection.checkpoint"):
        result = main(load_experiment(path, ["runtime.resume=auto", "schedule.iterations=8"]),
                      DistEnv.single(), hooks=[steps])
    assert sorted(steps.losses) == [3, 4, 5, 6, 7, 8] and result.iterations == 8
    assert "(world size 2, iteration 4/16) on world size 1: continuing at iteration 2/8" in caplog.text


def test_resume_past_the_end_of_a_shorter_schedule_says_nothing_is_left(tmp_path, caplog):
    path = Checkpointer(str(tmp_path), CheckpointConfig()).save(_fake_trainer(iteration=6, max_iters=10))
    target = _fake_trainer(max_iters=4)
    with caplog.at_level(logging.WARNING, logger="detection.checkpoint"):
        Checkpointer(str(tmp_path), CheckpointConfig()).resume(target, path)
    assert target.iter == 6 and target.pending_rng is not None
    assert "past the schedule's end (4 iterations now): nothing left to train" in caplog.text


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    final = tmp_path / "ckpt" / "iter_1.pth"
    atomic_save({"k": 0, "w": torch.zeros(4_000_000)}, str(final))
    script = textwrap.dedent(f"""
        import torch
        from detection.checkpoint import atomic_save
        k = 0
        while True:
            k += 1
            atomic_save({{"k": k, "w": torch.full((4_000_000,), float(k))}}, {str(final)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        # Kill while a temporary file is being written: the moment a torn file would appear.
        while not any(p.name.endswith(".tmp") for p in final.parent.iterdir()):
            assert time.time() < deadline and proc.poll() is None, "writer never started a save"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(str(final))
    assert torch.equal(state["w"], torch.full((4_000_000,), float(state["k"])))


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".tmp-abc.pth").write_bytes(b"half a checkpoint (an older version's name)")
    (folder / ".iter_4.pth.x1y2.tmp").write_bytes(b"half a checkpoint")
    Checkpointer(str(tmp_path), CheckpointConfig())
    assert os.listdir(folder) == []


def test_checkpoints_are_readable_by_the_team_as_the_umask_says(tmp_path):
    old = os.umask(0o027)
    try:
        path = Checkpointer(str(tmp_path), CheckpointConfig()).save(_fake_trainer(iteration=3))
        atomic_save({"k": 1}, str(tmp_path / "other.pth"))
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"  # the group reads; mkstemp alone gives 0o600
    assert oct(os.stat(tmp_path / "other.pth").st_mode & 0o777) == "0o640"
    assert oct(os.stat(os.path.join(os.path.dirname(path), "last_checkpoint")).st_mode & 0o777) == "0o640"


def _fake_trainer(world_size=1, iteration=0, max_iters=10, model=None, checkpointer=None):
    """A real Trainer of a tiny model, without data (the checkpoint tests never step it)."""
    model = model if model is not None else torch.nn.Linear(2, 1)
    trainer = Trainer(
        env=DistEnv(world_size=world_size, master_port=1 if world_size > 1 else None, rank=0), model=model,
        train_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loader=None,
        device=torch.device("cpu"), max_iters=max_iters, iters_per_epoch=5, checkpointer=checkpointer,
        lr_scaling=scale_lr(OptimConfig(lr=0.02), ScheduleConfig(epochs=2), world_size, 2),
    )
    trainer.iter = iteration
    return trainer


# The entries of a checkpoint written before Trainer.state_dict owned them (Checkpointer.state).
OLD_FORMAT = {"model", "optimizer", "scaler", "iter", "epoch", "max_iters", "iters_per_epoch", "world_size", "lr",
              "best", "history", "metrics", "rng", "run_id", "pending_eval", "classes"}


def test_a_checkpoint_of_the_older_format_resumes_everything_it_holds(tmp_path):
    saved = _fake_trainer(iteration=7, max_iters=10, checkpointer=Checkpointer(str(tmp_path), CheckpointConfig()))
    state = saved.state_dict()
    assert set(state) == OLD_FORMAT - {"run_id"}  # the same entries, less the dead run_id
    old = {**state, "run_id": None, "history": {"train": [{"iter": 5, "loss": 1.5}], "eval": []},
           "metrics": {"bbox_mAP": 0.25}, "pending_eval": True,
           "best": {"metric": "bbox_mAP", "value": 0.25, "iter": 5, "epoch": 1, "path": "best_bbox_mAP.pth"}}
    del old["classes"]  # older still: no classes
    folder = tmp_path / "work_dirs" / "exp" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(old, folder / "iter_7.pth")  # as the older version wrote it
    (folder / "last_checkpoint").write_text("iter_7.pth\n")
    checkpointer = Checkpointer(str(folder.parent), CheckpointConfig())
    target = _fake_trainer(max_iters=10, model=torch.nn.Linear(2, 1), checkpointer=checkpointer)
    checkpointer.resume(target, checkpointer.find_resume("auto"))
    assert (target.iter, target.history, target.metrics, target.pending_eval) == (
        7, old["history"], {"bbox_mAP": 0.25}, True)
    assert checkpointer.best == old["best"] and target.pending_rng is not None
    assert all(torch.equal(v, saved.model.state_dict()[k]) for k, v in target.model.state_dict().items())


def test_max_keep_and_pointer(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(max_keep=2))
    trainer = _fake_trainer()
    for step in range(1, 5):
        trainer.iter = step
        ckpt.save(trainer)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["iter_3.pth", "iter_4.pth", "last_checkpoint"]
    assert ckpt.find_resume("auto").endswith("iter_4.pth")


@pytest.mark.parametrize("rule, values, best", [("greater", [0.2, 0.5, 0.4], 0.5), ("less", [0.9, 0.3, 0.6], 0.3)])
def test_save_best_follows_the_rule(tmp_path, rule, values, best):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_best="bbox_mAP", rule=rule))
    trainer = _fake_trainer(checkpointer=ckpt)
    improved = []
    for step, value in enumerate(values, 1):
        trainer.iter = step
        improved.append(ckpt.update_best(trainer, {"bbox_mAP": value}))
    assert improved == [True, True, False]
    assert ckpt.best["value"] == best and ckpt.best["iter"] == 2
    assert load_checkpoint(ckpt.best["path"])["iter"] == 2
    assert load_checkpoint(ckpt.best["path"])["best"] == ckpt.best  # the best file names itself
    assert not ckpt.update_best(trainer, {"other": 1.0})  # metric absent: nothing to compare


def test_resume_errors_and_auto_without_checkpoint(tmp_path):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
    assert ckpt.find_resume("auto") is None and ckpt.find_resume(None) is None
    with pytest.raises(ConfigError, match="does not exist"):
        ckpt.find_resume(str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        ckpt.find_resume(str(tmp_path))


@pytest.mark.parametrize("content", ["not a checkpoint\n", '{"model": {}, "iter": 3}\n'])
def test_a_text_or_json_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not a PyTorch checkpoint (it is a text file")
    assert "\n" not in message and "weights_only" not in message


def test_resume_from_a_torch_file_without_orch_keys_says_use_load_from(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"a": 1}, path)
    with pytest.raises(ConfigError, match=r"not an orch training checkpoint \(no model, optimizer") as err:
        Checkpointer(str(tmp_path), CheckpointConfig()).resume(_fake_trainer(), str(path))
    assert str(path) in str(err.value) and "runtime.load_from" in str(err.value)


@pytest.mark.parametrize("other, detail", [
    (torch.nn.Linear(2, 3), r"'weight' is \[1, 2\] in the checkpoint, \[3, 2\] in this model"),  # class count
    (torch.nn.Sequential(torch.nn.Linear(2, 1)), "'0.weight' missing from the checkpoint"),  # model type
])
def test_resume_into_another_model_is_one_line(tmp_path, other, detail):
    path = Checkpointer(str(tmp_path), CheckpointConfig()).save(_fake_trainer(iteration=3))
    target = _fake_trainer(model=other)
    with pytest.raises(ConfigError, match=detail) as err:
        Checkpointer(str(tmp_path), CheckpointConfig()).resume(target, path)
    message = str(err.value)
    assert f"runtime.resume: {path} belongs to another model.type or class count" in message
    assert "runtime.load_from" in message and "\n" not in message


def test_resume_on_another_world_size_keeps_progress_and_says_so(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
    saved = _fake_trainer(world_size=2, iteration=6, max_iters=10)
    path = ckpt.save(saved)
    target = _fake_trainer(world_size=1, iteration=0, max_iters=20)  # twice the steps at half the batch
    with caplog.at_level(logging.WARNING, logger="detection.checkpoint"):
        Checkpointer(str(tmp_path), CheckpointConfig()).resume(target, path)
    assert target.iter == 12 and target.pending_rng is None
    assert "world size 1" in caplog.text and "LR rule re-applied" in caplog.text


def test_load_from_takes_weights_only(make_experiment):
    first = main(load_experiment(make_experiment(**{"tracking.enable": False})), DistEnv.single())
    saved = load_checkpoint(first.last_checkpoint)["model"]
    seen = {}

    class Capture(Hook):
        def before_train(self, trainer):
            seen["iter"] = trainer.iter
            seen["equal"] = all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())

    exp = load_experiment(make_experiment(**{"tracking.enable": False, "runtime.load_from": first.last_checkpoint,
                                             "runtime.output_dir": str(tmp_out(first))}))
    result = main(exp, DistEnv.single(), hooks=[Capture()])
    assert seen == {"iter": 0, "equal": True} and result.iterations == 4  # weights, not the position


def tmp_out(result):
    return os.path.join(os.path.dirname(result.output_dir), "finetune")


class EvalCounter(Hook):
    """Records the iterations at which evaluations happened."""

    def __init__(self):
        self.at: list[int] = []

    def after_eval(self, trainer, metrics):
        self.at.append(trainer.iter)


def test_a_stop_where_an_evaluation_is_due_checkpoints_first_and_evaluates_after_resume(make_experiment):
    """Slurm's USR2 comes ~90 s before the time limit: an evaluation due at the stopping step
    (minutes on COCO) must not delay the checkpoint. It is recorded as pending in the checkpoint
    and done first by the resumed run, so no evaluation is lost either."""
    path = make_experiment(**{"schedule.iterations": 8, "eval.interval": 4, "checkpoint.interval": 100,
                              "tracking.enable": False})
    first, second = EvalCounter(), EvalCounter()
    with pytest.raises(Preempted) as stopped:
        main(load_experiment(path), DistEnv.single(), hooks=[first, StopAfter(4)])
    assert first.at == [] and stopped.value.checkpoint.endswith("iter_4.pth")
    assert torch.load(stopped.value.checkpoint, weights_only=False)["pending_eval"] is True
    main(load_experiment(path, ["runtime.resume=auto"]), DistEnv.single(), hooks=[second])
    assert second.at == [4, 8]  # the skipped evaluation first, at the step it was due
