"""When the Ray hooks report: once per step that evaluated or saved, after the trainer's own hooks,
with that step's loss (driven through the real trainer hook order, without Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.launchers.ray.worker import StepReporter
from orchestrator.sweep.trial import TuneReportHook


class Recorder(StepReporter):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[dict, object]] = []

    def send(self, trainer, values, checkpoint):
        self.sent.append((values, checkpoint))


def _trainer(iter_: int, max_iters: int = 8):
    return SimpleNamespace(iter=iter_, max_iters=max_iters, iters_per_epoch=4, env=SimpleNamespace(rank=0))


def _step(hook, trainer, loss, metrics=None, checkpoints=()):
    # The trainer's order within one step: EvalHook (-> after_eval), CheckpointHook
    # (-> after_checkpoint), then the launcher's hooks' after_iter.
    if metrics is not None:
        hook.after_eval(trainer, metrics)
    for path in checkpoints:
        hook.after_checkpoint(trainer, path)
    hook.after_iter(trainer, {"loss": loss, "lr": 0.01})


def test_one_report_per_step_with_that_steps_loss():
    hook = Recorder()
    _step(hook, _trainer(1), 5.0)
    assert hook.sent == []  # nothing evaluated or saved
    _step(hook, _trainer(2), 4.0, {"bbox_mAP": 0.1}, ["/w/checkpoints/iter_2.pth", "/w/checkpoints/best_bbox_mAP.pth"])
    [(values, checkpoint)] = hook.sent
    assert checkpoint == "/w/checkpoints/iter_2.pth"  # best_ copies are not resume points
    assert values["loss"] == 4.0 and values["bbox_mAP"] == 0.1 and values["iteration"] == 2
    assert values["max_iters"] == 8 and values["epoch"] == 0.5
    _step(hook, _trainer(3), 3.0, None, ["/w/checkpoints/iter_3.pth"])
    values, checkpoint = hook.sent[-1]
    assert checkpoint == "/w/checkpoints/iter_3.pth" and values["bbox_mAP"] == 0.1  # last known metrics


def test_epoch_schedules_report_after_the_epoch():
    hook = Recorder()
    trainer = _trainer(4)
    hook.after_iter(trainer, {"loss": 2.0})
    hook.after_eval(trainer, {"bbox_mAP": 0.2})  # EvalHook.after_epoch
    hook.after_checkpoint(trainer, "/w/checkpoints/epoch_1.pth")
    hook.after_epoch(trainer)
    [(values, checkpoint)] = hook.sent
    assert values["loss"] == 2.0 and checkpoint == "/w/checkpoints/epoch_1.pth"


def test_tune_hook_sends_the_last_evaluation_after_training():
    sent = []
    hook = TuneReportHook()
    hook.send = lambda trainer, values, checkpoint: sent.append(values["iteration"])
    _step(hook, _trainer(4), 3.0, {"loss_eval": 1.0}, ["/w/checkpoints/iter_4.pth"])
    assert sent == [4]
    _step(hook, _trainer(8), 2.0, {"loss_eval": 0.5})
    assert sent == [4]  # the final report could end the trial: it waits for after_train
    hook.after_train(_trainer(8), None)
    assert sent == [4, 8]
