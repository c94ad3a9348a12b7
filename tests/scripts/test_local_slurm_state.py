"""scripts/local_slurm.py runs as root: its state folder is used only when no other user could
have made or redirected it, and deleting it never follows a symlink. No Slurm is started."""

import importlib.util
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
_spec = importlib.util.spec_from_file_location("local_slurm_state", SCRIPTS / "local_slurm_state.py")
lss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lss)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def victim(tmp_path):
    """A folder a planted symlink points at, with a file that must survive."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious").write_text("keep me")
    return folder


def _one_line_refusal(call, *args):
    with pytest.raises(lss.UnsafeStateDir) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message and "--state-dir" in message
    return message


def test_made_state_dir_is_ours_and_removable(tmp_path):
    state = tmp_path / "slurm"
    lss.make_state_dir(state)
    assert oct(os.lstat(state).st_mode & 0o777) == oct(0o755) and (state / lss.MARKER).exists()
    assert lss.check_state_dir(state)
    (state / "run").mkdir()
    assert lss.remove_state_dir(state) and not state.exists()
    assert lss.remove_state_dir(state)  # nothing there: nothing to do


def test_a_symlink_is_refused_and_its_target_left_alone(tmp_path, victim):
    state = tmp_path / "orch-slurm"
    state.symlink_to(victim)
    message = _one_line_refusal(lss.check_state_dir, state)
    assert message.startswith(f"state dir {state} is a symlink (to {victim})")
    _one_line_refusal(lss.remove_state_dir, state)
    _one_line_refusal(lss.make_state_dir, state)
    assert (victim / "precious").read_text() == "keep me" and state.is_symlink()


def test_symlinks_inside_are_removed_not_followed(tmp_path, victim):
    state = tmp_path / "slurm"
    lss.make_state_dir(state)
    (state / "gpus").mkdir()
    (state / "gpus" / "link").symlink_to(victim)
    assert lss.remove_state_dir(state)
    assert (victim / "precious").read_text() == "keep me"


def test_a_folder_writable_by_others_is_refused(tmp_path):
    state = tmp_path / "slurm"
    state.mkdir()
    state.chmod(0o777)
    assert "is writable by other users (mode 777)" in _one_line_refusal(lss.check_state_dir, state)


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename our folder away and put a symlink in its place
    assert "which other users can write (mode 777)" in _one_line_refusal(lss.make_state_dir, shared / "slurm")
    shared.chmod(0o1777)  # sticky, like /tmp: only the owner may rename or delete
    lss.make_state_dir(shared / "slurm")


@needs_root
def test_a_folder_of_another_user_is_refused(tmp_path):
    state = tmp_path / "slurm"
    state.mkdir(mode=0o755)
    os.chown(state, pwd.getpwnam("nobody").pw_uid, -1)
    assert "belongs to uid" in _one_line_refusal(lss.check_state_dir, state)


def test_a_foreign_folder_is_not_deleted(tmp_path):
    other = tmp_path / "etc-like"
    other.mkdir(mode=0o755)
    (other / "passwd").write_text("keep me")
    assert "is not a local_slurm state dir" in _one_line_refusal(lss.remove_state_dir, other)
    assert (other / "passwd").exists()
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)  # what mktemp -d gives a caller (the Slurm tests): fine to reuse
    assert lss.remove_state_dir(empty) and not empty.exists()


def test_state_path_resolves_the_parent_but_not_the_last_part(tmp_path, victim):
    (tmp_path / "alias").symlink_to(tmp_path)
    (tmp_path / "link").symlink_to(victim)
    assert lss.state_path(str(tmp_path / "alias" / "link")) == tmp_path / "link"
    _one_line_refusal(lss.state_path, "/")


def test_down_on_a_planted_symlink_deletes_nothing(tmp_path, victim):
    state = tmp_path / "orch-slurm"
    state.symlink_to(victim)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "local_slurm.py"), "down", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"local_slurm: error: state dir {state} is a symlink (to {victim}); remove it or "
                                   "pass --state-dir DIR in a folder only root can write (e.g. one made by mktemp -d)")
    assert (victim / "precious").read_text() == "keep me"
