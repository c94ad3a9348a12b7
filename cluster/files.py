"""Files that readers never see half-written: write to a temporary file in the same folder,
then ``os.replace`` it over the target (atomic on POSIX). Standard library only."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def write_text_atomic(path: PathLike, text: str, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never
    half of one. ``durable`` also survives a power loss (fsync of the file before the rename)."""
    write_bytes_atomic(path, text.encode("utf-8"), durable)


def write_bytes_atomic(path: PathLike, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_text_atomic`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); the result gets the mode any new file gets
        # (0666 less the umask), so that a team can read a job's outputs on shared storage.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: PathLike, data: Any, durable: bool = False, indent: Optional[int] = 1,
                      sort_keys: bool = True) -> None:
    """Write ``data`` as JSON atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n", durable)


def read_json(path: PathLike) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def unlink_quietly(path: PathLike) -> None:
    """Remove ``path`` if it exists (releasing twice is fine)."""
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


__all__ = ["read_json", "unlink_quietly", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]
