"""Atomic writes: readers see the old file or the new one, and the new one gets the mode any
new file gets (0666 less the umask: outputs on shared storage stay readable by the team)."""

from __future__ import annotations

import os

from cluster.files import read_json, write_bytes_atomic, write_json_atomic, write_text_atomic


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
