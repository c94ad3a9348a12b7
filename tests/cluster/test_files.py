"""Atomic writes: readers see the old file or the new one, and the new one gets the mode any
new file gets (0666 less the umask: outputs on shared storage stay readable by the team)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cluster.files import (atomic_path, atomic_write, file_lock, lock_fd, read_json, write_bytes_atomic,
                           write_json_atomic, write_text_atomic)


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "hello")
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        os.umask(0o077)
        write_bytes_atomic(tmp_path / "c.bin", b"\0")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.txt").st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "c.bin").st_mode & 0o777) == "0o600"
    assert (tmp_path / "a.txt").read_text() == "hello" and read_json(tmp_path / "b.json") == {"x": 1}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})

    try:
        write_bytes_atomic(path, "not bytes")  # fails while writing, after the temporary file was made
    except TypeError:
        pass
    assert read_json(path) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["x.json"]


def test_atomic_path_moves_on_success_and_removes_on_failure(tmp_path):
    target = tmp_path / "video.mp4"
    with atomic_path(target, durable=True) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not target.exists()
        with open(tmp, "wb") as handle:  # as a library that wants a file name writes it
            handle.write(b"frames")
    assert target.read_bytes() == b"frames"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w", encoding="utf-8") as handle:
            handle.write("half")
            raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"frames" and os.listdir(tmp_path) == ["video.mp4"]


def test_file_lock_excludes_another_process_and_is_dropped_when_it_dies(tmp_path):
    lock = tmp_path / "leases.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cluster.files import file_lock
        with file_lock({str(lock)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with file_lock(lock, blocking=False) as held:
            assert held is False
        with file_lock(lock, shared=True, blocking=False) as held:
            assert held is False
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with file_lock(lock, blocking=False) as held:  # the kernel dropped the dead holder's lock
        assert held is True


def test_lock_fd_holds_until_closed_and_a_child_that_inherits_it_holds_it_too(tmp_path):
    lock = tmp_path / "shipper.lock"
    fd = lock_fd(lock, blocking=False)
    assert fd is not None and lock_fd(lock, blocking=False) is None  # each open file is its own holder
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(fd,))
    try:
        os.close(fd)  # the child's inherited descriptor still holds the lock
        with file_lock(lock, blocking=False) as held:
            assert held is False
    finally:
        child.communicate(b"")
    with file_lock(lock, blocking=False) as held:
        assert held is True


def test_fsync_paths_syncs_files_and_folders_and_skips_missing(tmp_path, monkeypatch):
    import os

    from cluster import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    paths = []
    for i in range(5):
        (tmp_path / str(i)).mkdir()
        files.write_text_atomic(tmp_path / str(i) / "meta.json", "{}")
        paths += [tmp_path / str(i) / "meta.json", tmp_path / str(i)]
    files.fsync_paths(paths + [tmp_path / "0", tmp_path / "gone"])  # a repeat and a missing path
    assert sorted(synced) == sorted(str(p) for p in paths)
