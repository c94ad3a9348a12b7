"""Checkpoints: atomic files, newest-N retention, best-metric copies, exact resume.

A checkpoint is ``Trainer.state_dict()`` (:mod:`detection.engine` owns what it holds):
everything a run needs to continue as if never stopped: model, optimizer,
AMP scaler, iteration (the epoch, the LR and the sampler position follow from it: the LR is a
function of the iteration and the batch order a function of (seed, epoch)), best metric, history,
and every rank's RNG states (python, numpy, torch, cuda). In deterministic mode on CPU a run
stopped and resumed gives losses equal to an uninterrupted run (``tests/detection/test_checkpoint.py``).
It also names the training classes (``classes``: names and COCO category ids in label order, read
by :func:`read_classes` for ``orch predict``); checkpoints of older versions lack them and still load.

Files under ``<output_dir>/checkpoints``: ``iter_<N>.pth`` (or ``epoch_<N>.pth``), ``best_<metric>.pth``
and ``last_checkpoint`` (the file name of the newest). Each is written to a temporary file in
the same folder, fsynced and renamed (:func:`cluster.files.atomic_write`; ``torch.save`` streams
into the temporary file, so a large state is never held twice in memory), so a crash never leaves
a half-written file under a final name; the files get the mode the umask gives any new file. Everything is saved as tensors and plain types, so loading uses ``weights_only=True``.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from cluster.errors import ConfigError
from cluster.files import atomic_write, write_text_atomic
from detection.models import not_a_checkpoint

log = logging.getLogger(__name__)

POINTER = "last_checkpoint"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` durably and atomically (:func:`cluster.files.atomic_write`:
    a temporary file in the same folder, fsync, rename). The file gets the mode the umask gives
    any new file, so a team can read a shared ``work_dirs``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_write(path, "wb", durable=True) as handle:
            torch.save(obj, handle)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            # torch's zip writer reports a failed write (disk full, quota) as "unexpected pos N vs M".
            raise OSError(err.__context__.errno, err.__context__.strerror, path) from None
        raise


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain types (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Checkpointer` (CPU tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path!r} does not exist; check runtime.resume / --checkpoint") from None
    except IsADirectoryError:
        raise ConfigError(f"checkpoint {path!r} is a directory, not a file; give a .pth file in it") from None
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file is the user's input
        raise ConfigError(f"{not_a_checkpoint(path, err)}; check runtime.resume / --checkpoint") from None


def dataset_classes(dataset: Any) -> Optional[dict[str, list]]:
    """``{"names": [...], "cat_ids": [...]}`` of a training dataset in label order (label ``i + 1``
    is ``names[i]``, COCO category ``cat_ids[i]``), or None for a dataset without a label map.
    Stored in checkpoints so ``orch predict`` can name classes without the annotation file."""
    names = getattr(dataset, "class_names", None)
    label_map = getattr(dataset, "label_to_cat_id", None)
    if names is None or label_map is None:
        return None
    return {"names": [str(n) for n in names], "cat_ids": [int(label_map[i + 1]) for i in range(len(names))]}


def read_classes(path: str) -> Optional[tuple[tuple[str, ...], tuple[int, ...]]]:
    """``(class names, category ids)`` stored in the checkpoint ``path`` (label order), or None
    for a checkpoint saved before they were stored, or a plain state dict. The file is memory
    mapped, so no tensor is read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: no classes; loading the weights says why
        return None
    classes = state.get("classes") if isinstance(state, dict) else None
    if not isinstance(classes, dict):
        return None
    names, cat_ids = classes.get("names"), classes.get("cat_ids")
    if not (isinstance(names, list) and isinstance(cat_ids, list) and len(names) == len(cat_ids) and names):
        return None
    return tuple(str(n) for n in names), tuple(int(c) for c in cat_ids)


# What Trainer.state_dict writes and a resume needs; a plain state dict lacks them.
RESUME_KEYS = ("model", "optimizer", "iter", "max_iters", "world_size", "rng")


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`get_rng_state`, in rank order (a collective: every rank calls it)."""
    state = get_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, state)
        return out
    return [state]


def _state_difference(own: dict[str, Any], saved: Any) -> Optional[str]:
    """The first way ``saved`` (a checkpoint's model state) does not fit ``own``, or None."""
    if not isinstance(saved, dict):
        return "its 'model' entry is not a state dict"
    for key, value in own.items():
        if key not in saved:
            return f"{key!r} missing from the checkpoint"
        shape = getattr(saved[key], "shape", None)
        if shape is not None and tuple(shape) != tuple(value.shape):
            return f"{key!r} is {list(shape)} in the checkpoint, {list(value.shape)} in this model"
    extra = next((key for key in saved if key not in own), None)
    return f"{extra!r} is not in this model" if extra is not None else None


class Checkpointer:
    """Writes and reads the files of a :class:`~detection.engine.Trainer`'s state (see the
    module docstring); what a checkpoint holds is ``Trainer.state_dict()``, and the checkpointer's
    own part of it is the best-metric record.

    Every rank calls :meth:`save` (the RNG states are gathered); rank 0 writes. ``cfg`` is the
    ``checkpoint`` section; ``seed`` (``runtime.seed``) reseeds a resume on another world size.
    """

    def __init__(self, output_dir: str, cfg: Any, rank: int = 0, unit: str = "iter", seed: int = 0) -> None:
        self.dir = os.path.join(output_dir, "checkpoints")
        self.cfg = cfg
        self.rank, self.seed = rank, seed
        self.unit = unit  # "iter" or "epoch": names of periodic files
        self.best: dict[str, Any] = {}
        self.last_path: Optional[str] = None
        if rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            # Left by a crash during a save (``.<name>.*.tmp``; ``.tmp-*`` from older versions):
            # never a valid checkpoint.
            for stale in glob.glob(os.path.join(self.dir, ".tmp-*")) + glob.glob(os.path.join(self.dir, ".*.tmp")):
                os.unlink(stale)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpointer's part of a checkpoint (gathered by ``Trainer.state_dict``): the
        best-metric record ``{"metric", "value", "iter", "epoch", "path"}``."""
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave (a checkpoint without it: no best yet)."""
        self.best = dict(state.get("best") or {})

    # -- saving ---------------------------------------------------------------------------
    def save(self, trainer: Any, reason: str = "interval") -> str:
        """Write the periodic checkpoint of the current step; prune; move the pointer."""
        count = trainer.iter if self.unit == "iter" or reason == "preempted" else trainer.iter // trainer.iters_per_epoch
        unit = "iter" if reason == "preempted" else self.unit
        path = os.path.join(self.dir, f"{unit}_{count}.pth")
        state = trainer.state_dict()
        if self.rank == 0:
            atomic_save(state, path)
            write_text_atomic(os.path.join(self.dir, POINTER), os.path.basename(path) + "\n", durable=True)
            self._prune()
            log.info("checkpoint %s (%s)", path, reason)
        self.last_path = path
        self._barrier()
        trainer.call_hooks("after_checkpoint", path)
        return path

    def update_best(self, trainer: Any, metrics: dict[str, float]) -> bool:
        """Record ``metrics`` against ``checkpoint.save_best``; write ``best_<metric>.pth`` when
        it improved. Returns whether it improved."""
        name = self.cfg.save_best
        if not name or name not in metrics:
            if name and trainer.iter == trainer.max_iters:
                log.warning("checkpoint.save_best: metric %r not among %s", name, sorted(metrics))
            return False
        value = float(metrics[name])
        old = self.best.get("value")
        better = old is None or (value > old if self.cfg.rule == "greater" else value < old)
        if not better:
            return False
        path = os.path.join(self.dir, f"best_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.pth")
        self.best = {"metric": name, "value": value, "iter": trainer.iter,
                     "epoch": trainer.iter // trainer.iters_per_epoch, "path": path}
        state = trainer.state_dict()
        if self.rank == 0:
            atomic_save(state, path)
        self._barrier()
        trainer.call_hooks("after_checkpoint", path)
        return True

    def _prune(self) -> None:
        if self.cfg.max_keep is None or self.cfg.max_keep <= 0:
            return
        periodic = []
        for path in glob.glob(os.path.join(self.dir, "*.pth")):
            match = re.fullmatch(r"(iter|epoch)_(\d+)\.pth", os.path.basename(path))
            if match:
                periodic.append((os.stat(path).st_mtime_ns, int(match.group(2)), path))
        for _, _, path in sorted(periodic)[: -self.cfg.max_keep]:
            os.unlink(path)

    @staticmethod
    def _barrier() -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # -- loading --------------------------------------------------------------------------
    def find_resume(self, spec: Optional[str]) -> Optional[str]:
        """The checkpoint ``runtime.resume`` names: ``auto`` = the pointer's file (None when the
        folder has none yet: a fresh start), else the path itself, which must exist."""
        if not spec:
            return None
        if spec == "auto":
            pointer = os.path.join(self.dir, POINTER)
            if not os.path.isfile(pointer):
                return None
            with open(pointer) as handle:
                path = os.path.join(self.dir, handle.read().strip())
            if not os.path.isfile(path):
                raise ConfigError(f"{pointer} names {path}, which is missing; pass runtime.resume=PATH")
            return path
        if os.path.isdir(spec):
            raise ConfigError(f"runtime.resume: {spec!r} is a directory, not a file; give a .pth file or 'auto'")
        if not os.path.isfile(spec):
            raise ConfigError(f"runtime.resume: checkpoint {spec!r} does not exist; give a file or 'auto'")
        return spec

    def resume(self, trainer: Any, path: str) -> None:
        """Check that ``path`` is an orch training checkpoint of this model and hand it to
        ``trainer.load_state_dict`` (same world size: the exact position and RNG states; another:
        the same fraction of training, the LR rule re-applied, the RNG reseeded with
        ``runtime.seed``); says which in the log. Checkpoints of older versions load too (their
        ``run_id`` entry is ignored)."""
        state = load_checkpoint(path)
        missing = [k for k in RESUME_KEYS if k not in state] if isinstance(state, dict) else list(RESUME_KEYS)
        if missing:
            raise ConfigError(
                f"runtime.resume: {path} is not an orch training checkpoint (no {', '.join(missing)}); "
                "to start from its weights use runtime.load_from (or model.weights) instead"
            )
        # Compared first: torch's own size-mismatch error is a multi-line list of every tensor.
        difference = _state_difference(trainer.model.state_dict(), state["model"])
        if difference is None:
            try:
                trainer.load_state_dict(state, reseed=self.seed)
            except (RuntimeError, ValueError, KeyError, AttributeError) as err:
                difference = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if difference is not None:
            raise ConfigError(
                f"runtime.resume: {path} belongs to another model.type or class count ({difference}); "
                "use runtime.load_from for weights of another model, or a fresh runtime.output_dir"
            )
        self.last_path = path
        if state["world_size"] != trainer.env.world_size:
            log.warning(
                "resumed from %s (world size %d, iteration %d/%d) on world size %d: continuing at "
                "iteration %d/%d; LR rule re-applied: %s (was lr %.6g); RNG reseeded",
                path, state["world_size"], state["iter"], state["max_iters"], trainer.env.world_size,
                trainer.iter, trainer.max_iters, trainer.lr_scaling.describe(), state["lr"],
            )
        elif state["max_iters"] == trainer.max_iters:
            log.info("resumed from %s at iteration %d", path, trainer.iter)
        elif trainer.iter < trainer.max_iters:
            log.info("resumed from %s at iteration %d; schedule changed from %d to %d iterations",
                     path, trainer.iter, state["max_iters"], trainer.max_iters)
        else:
            log.warning("resumed from %s at iteration %d, past the schedule's end (%d iterations now): "
                        "nothing left to train; lengthen schedule.iterations/epochs to continue",
                        path, trainer.iter, trainer.max_iters)
