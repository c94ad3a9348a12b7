"""Where predictions go: COCO result dicts streamed into a JSON file that appears whole or not at
all, and an output folder that is created only when its first file is written."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Optional

from cluster.errors import ConfigError
from cluster.files import atomic_write, write_bytes_atomic

#: Detections below this score are left out of results files: the floor of COCO test
#: submissions (a detector's own threshold is usually higher, so this rarely removes any).
RESULTS_SCORE_FLOOR = 0.001


def check_out_dir(path: str) -> None:
    """ConfigError when ``path`` (``--out``) is a file, or lies below a file."""
    absolute = os.path.abspath(path)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        raise ConfigError(f"--out {path} is a file, not a folder; give a folder for the predictions")
    probe = absolute
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--out {path}: {probe} is a file, so the folder cannot be made; give another --out")


class OutputDir:
    """Files under ``root``, each written atomically; ``root`` and subfolders appear when the
    first file in them is written (a run that fails before its first output leaves nothing)."""

    def __init__(self, root: str) -> None:
        check_out_dir(root)
        self.root = root

    def path(self, name: str) -> str:
        """The path of relative (POSIX) ``name`` (no folder is created)."""
        return os.path.join(self.root, *name.split("/"))

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``name`` atomically, making its folder; returns the path."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_bytes_atomic(path, data)
        return path


class JsonArrayWriter:
    """A JSON array written item by item into a temporary file beside ``path`` (constant memory
    for millions of detections) and renamed over ``path`` when a ``with`` block ends normally;
    an exception removes the temporary file. Nothing (not even the folder) is made before the
    first item or the end of the block. ``wrap = (key, fields)`` writes ``{fields..., key: [items]}``
    instead of a bare array."""

    def __init__(self, path: str, wrap: Optional[tuple[str, Mapping[str, Any]]] = None) -> None:
        self.path = path
        self.count = 0
        self._wrap = wrap
        self._handle: Any = None
        self._file = contextlib.ExitStack()  # the atomic write, entered at the first item

    def __enter__(self) -> "JsonArrayWriter":
        return self

    def _open(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._handle = self._file.enter_context(atomic_write(self.path, "w", encoding="utf-8"))
        if self._wrap:
            key, fields = self._wrap
            head = json.dumps(dict(fields))[:-1]  # '{"a": 1' : the array is the last field
            self._handle.write(f"{head}{', ' if fields else ''}{json.dumps(key)}: [")
        else:
            self._handle.write("[")

    def append(self, item: Any) -> None:
        """Add one item."""
        if self._handle is None:
            self._open()
        self._handle.write(("," if self.count else "") + "\n" + json.dumps(item))
        self.count += 1

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None and self._handle is None:
            self._open()  # an empty array is still a result
        if exc_type is None:
            self._handle.write("\n]" + ("}" if self._wrap else "") + "\n")
        self._file.__exit__(exc_type, exc, traceback)  # renames, or removes the temporary file


def detections_to_results(output: Mapping[str, Any], image_id: int, label_to_cat_id: Mapping[int, int],
                          masks: bool) -> list[dict[str, Any]]:
    """COCO result dicts (:func:`detection.evaluation.predictions_to_coco`) of one image's
    detections (a :class:`~detection.inference.model.Predictor` output: already above the floor)."""
    from detection.evaluation import predictions_to_coco

    return predictions_to_coco([output], [image_id], label_to_cat_id, with_masks=masks and "masks" in output)
