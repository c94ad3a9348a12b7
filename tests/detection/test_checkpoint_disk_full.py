"""A checkpoint written to a full disk fails with the OSError that says so (torch's zip writer
would report "unexpected pos N vs M"), leaves no temporary file, and spares the older checkpoints
(found by the fault suite, tests/faults: disk_full)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from detection.checkpoint import atomic_save, load_checkpoint

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_is_an_oserror_naming_the_file(small_disk):
    atomic_save({"iter": 1, "w": torch.zeros(10)}, str(small_disk / "iter_1.pth"))
    with pytest.raises(OSError) as caught:
        atomic_save({"iter": 2, "w": torch.zeros(1_000_000)}, str(small_disk / "iter_2.pth"))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(small_disk / "iter_2.pth")
    assert sorted(os.listdir(small_disk)) == ["iter_1.pth"]
    assert load_checkpoint(str(small_disk / "iter_1.pth"))["iter"] == 1
