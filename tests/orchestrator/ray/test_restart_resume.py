"""Where a Ray Train worker restarted by Ray resumes: the newest of the checkpoint Ray restored and
the job's own last checkpoint (found by the fault suite: a worker killed during a checkpoint's
report left Ray without the checkpoint the job had written, and the run restarted from zero)."""

from __future__ import annotations

from orchestrator.launchers.ray.worker import checkpoint_step, own_checkpoint, resume_point


def _write(folder, name, pointer=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x")
    if pointer:
        (folder / "last_checkpoint").write_text(name + "\n")
    return str(folder / name)


def test_checkpoint_step_from_names():
    assert checkpoint_step("/a/iter_12.pth") == 12 and checkpoint_step("epoch_3.pth") == 3
    assert checkpoint_step("/a/best_bbox_mAP.pth") == -1


def test_restart_prefers_the_newest(tmp_path):
    own = _write(tmp_path / "checkpoints", "iter_8.pth")
    restored = _write(tmp_path / "ray_restore" / "rank0", "iter_4.pth", pointer=False)
    assert own_checkpoint(str(tmp_path)) == own
    assert resume_point(restored, str(tmp_path), restarted=True) == own
    assert resume_point(None, str(tmp_path), restarted=True) == own  # Ray never got a report
    newer = _write(tmp_path / "ray_restore" / "rank0", "iter_12.pth", pointer=False)
    assert resume_point(newer, str(tmp_path), restarted=True) == newer


def test_first_start_ignores_old_checkpoints_of_the_folder(tmp_path):
    _write(tmp_path / "checkpoints", "iter_8.pth")
    assert resume_point(None, str(tmp_path), restarted=False) is None  # a fresh submission starts fresh
    assert own_checkpoint(str(tmp_path / "nothing")) is None
