"""The lease folder: which candidate is used, and a shared /tmp folder accepted only when it is
ours (real folder, our uid, mode 0700)."""

import os
import pwd
import stat
import tempfile

import pytest

from cluster.errors import ClusterError
from cluster.lease import runtime_dir
from cluster.ports import lease_port


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """``tempfile.gettempdir()`` is ``tmp_path/tmp`` (where ``/tmp/orch-<uid>`` goes)."""
    root = tmp_path / "tmp"
    root.mkdir()
    root.chmod(0o1777)  # like /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_xdg_runtime_dir_missing_on_the_node_falls_back_to_tmp(tmp_path, tmp_root):
    # sbatch exports the login node's XDG_RUNTIME_DIR; /run/user/<uid> need not exist on the node.
    missing = tmp_path / "run" / "user" / "4242"
    fallback = tmp_root / f"orch-{os.getuid()}"
    assert runtime_dir({"XDG_RUNTIME_DIR": str(missing)}) == fallback
    assert not missing.exists() and _mode(fallback) == 0o700
    lease = lease_port(environ={"XDG_RUNTIME_DIR": str(missing)}, ports=(20000, 20999))  # what the Slurm task does
    try:
        assert list((fallback / "ports").iterdir())
    finally:
        lease.release()


def test_xdg_runtime_dir_that_cannot_be_created_falls_back_to_tmp(tmp_path, tmp_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert runtime_dir({"XDG_RUNTIME_DIR": str(blocker / "1000")}) == tmp_root / f"orch-{os.getuid()}"


def test_xdg_runtime_dir_of_ours_is_used(tmp_path, tmp_root):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    assert runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}) == xdg / "orch"
    assert _mode(xdg / "orch") == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_xdg_runtime_dir_of_another_user_is_skipped(tmp_path, tmp_root):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o777)
    os.chown(xdg, pwd.getpwnam("nobody").pw_uid, -1)
    assert runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}) == tmp_root / f"orch-{os.getuid()}"
    assert not (xdg / "orch").exists()


def test_orch_runtime_dir_wins_and_must_be_creatable(tmp_path, tmp_root):
    explicit = tmp_path / "deep" / "rt"
    assert runtime_dir({"ORCH_RUNTIME_DIR": str(explicit), "XDG_RUNTIME_DIR": str(tmp_path)}) == explicit
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ClusterError) as err:
        runtime_dir({"ORCH_RUNTIME_DIR": str(blocker / "rt")})
    assert f"cannot create the orch runtime folder {blocker / 'rt'}" in str(err.value)
    assert "ORCH_RUNTIME_DIR" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ClusterError, match="is not a folder this user can write"):
        runtime_dir({"ORCH_RUNTIME_DIR": str(blocker)})


def test_a_precreated_open_tmp_folder_of_ours_is_tightened(tmp_root):
    folder = tmp_root / f"orch-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    assert runtime_dir({}) == folder
    assert _mode(folder) == 0o700


def test_a_symlink_in_tmp_is_refused(tmp_path, tmp_root):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder = tmp_root / f"orch-{os.getuid()}"
    folder.symlink_to(elsewhere)
    with pytest.raises(ClusterError) as err:
        runtime_dir({})
    message = str(err.value)
    assert message.startswith(f"the orch runtime folder {folder} is not a folder owned by this user")
    assert "ORCH_RUNTIME_DIR" in message and "\n" not in message
    assert not list(elsewhere.iterdir())


def test_a_plain_file_in_tmp_is_refused(tmp_root):
    (tmp_root / f"orch-{os.getuid()}").write_text("")
    with pytest.raises(ClusterError, match="is not a folder owned by this user"):
        runtime_dir({})


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_a_tmp_folder_of_another_user_is_refused_and_left_alone(tmp_root):
    folder = tmp_root / f"orch-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    os.chown(folder, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(ClusterError, match=f"the orch runtime folder {folder} is not a folder owned by this user"):
        runtime_dir({})
    assert _mode(folder) == 0o777
