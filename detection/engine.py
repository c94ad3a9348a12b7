"""The training loop: forward, backward, step, and hooks for everything else.

Kept deliberately close to torchvision's detection reference loop (the benchmark in
``bench/bench_train_loop.py`` holds it to >= 98 % of that loop's speed). Per step the trainer
sums the loss terms of ``accumulation_steps`` micro-batches, all-reduces them once (together with
the ranks' stop requests, so DDP ranks always agree), refuses a non-finite loss before the
optimizer step, clips and steps. Logging, LR schedule, evaluation, checkpoints and MLflow are
hooks (:mod:`detection.hooks`, :mod:`detection.journal_hook`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cluster.errors import OrchError, TrainingError
from detection.hooks.base import Hook

log = logging.getLogger(__name__)


class Preempted(OrchError):
    """A hook's ``should_stop`` asked the run to stop (Slurm preemption, Ray/ASHA stop): a
    checkpoint was written first, so ``runtime.resume=auto`` continues exactly. Exit code 1 (the
    run did not finish); launchers catch it to requeue."""

    exit_code = 1

    def __init__(self, message: str, checkpoint: Optional[str] = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What :func:`detection.train.main` returns (the same on every rank)."""

    metrics: dict[str, float] = field(default_factory=dict)  # last evaluation
    best: dict[str, Any] = field(default_factory=dict)  # {"metric", "value", "epoch", "iter", "path"}
    output_dir: str = ""
    last_checkpoint: Optional[str] = None
    iterations: int = 0
    epochs: int = 0


def move_to(batch: Any, device: torch.device) -> tuple[list, list]:
    """``(images, targets)`` on ``device``; targets keep only tensors moved."""
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def epoch_batches(loader: Any, epoch: int, skip: int = 0) -> Iterator:
    """An iterator over the batches of ``epoch`` starting at batch ``skip`` (a resumed epoch)."""
    loader.set_epoch(epoch)
    if skip:
        loader.batch_sampler.skip_batches(skip)
    return iter(loader)


class Trainer:
    """A small loop over ``max_iters`` optimizer steps of ``accumulation_steps`` batches each.

    ``model`` is the bare detector; ``train_model`` what is called (the DDP wrapper, or the model
    itself). ``loader`` is a :class:`detection.data.DetectionLoader` (seeded batch order per
    epoch, resumable at a batch). The forward pass runs under autocast to ``amp_dtype`` when
    given (float16 when only a ``scaler`` is: the scaler is for float16 gradients). Every step
    sums ``accumulation_steps`` batches, clips the gradient norm to ``grad_clip`` (when set;
    unscaled first) and records the loss in ``history`` every ``log_interval`` steps.

    The trainer is the one owner of training state: :meth:`state_dict` is what a checkpoint holds
    and :meth:`load_state_dict` continues from one (the checkpointer saves and loads them). Hooks
    read the trainer's attributes and never set them; they report through :meth:`report_eval`
    and :meth:`defer_eval`.
    """

    def __init__(
        self,
        *,
        env: Any,
        model: torch.nn.Module,
        train_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        device: torch.device,
        max_iters: int,
        iters_per_epoch: int,
        output_dir: str = "",
        lr_scaling: Any = None,
        hooks: Sequence[Hook] = (),
        checkpointer: Any = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        amp_dtype: Optional[torch.dtype] = None,
        accumulation_steps: int = 1,
        grad_clip: Optional[float] = None,
        log_interval: int = 10,
    ) -> None:
        self.env = env
        self.model, self.train_model, self.optimizer = model, train_model, optimizer
        self.loader, self.device = loader, device
        self.max_iters, self.iters_per_epoch = max_iters, iters_per_epoch
        self.output_dir, self.lr_scaling = output_dir, lr_scaling
        self.hooks = list(hooks)
        self.checkpointer, self.scaler = checkpointer, scaler
        self.amp_dtype = amp_dtype if amp_dtype is not None else (torch.float16 if scaler is not None else None)
        self.accumulation = accumulation_steps
        self.grad_clip = grad_clip
        self.iter = 0  # finished optimizer steps
        self.epoch = 0  # 0-based epoch in progress (in after_epoch: the epoch just finished)
        self.log_interval = max(1, int(log_interval))
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.metrics: dict[str, float] = {}  # of the last evaluation
        self.pending_rng: Optional[dict] = None  # set by a resume; applied at the first batch
        # A stop was asked at this step (preemption: USR2 comes ~90 s before the time limit):
        # hooks leave slow work (an evaluation, a periodic save) to the resumed run.
        self.stopping = False
        self.pending_eval = False  # an evaluation skipped for a stop; the resumed run does it first
        self.distributed = env.world_size > 1 and dist.is_available() and dist.is_initialized()
        self._speed_window = [0.0, 0.0]  # images and seconds since the last logged step

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: model, optimizer, AMP scaler, the position (``iter``; the
        epoch, LR and batch order follow from it), the schedule and world size it was taken on,
        the last evaluation (``metrics``, ``history``, ``pending_eval``), the checkpointer's
        best-metric record, every rank's RNG states and the training classes. Tensors and plain
        types only (``weights_only`` loading). Every rank must call it: the RNG states are
        gathered."""
        from detection.checkpoint import dataset_classes, gather_rng_states

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iter": self.iter,
            "epoch": self.iter // self.iters_per_epoch,
            "max_iters": self.max_iters,
            "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.env.world_size,
            "lr": self.lr_scaling.lr if self.lr_scaling is not None else self.optimizer.param_groups[0]["lr"],
            **(self.checkpointer.state_dict() if self.checkpointer is not None else {"best": {}}),
            "history": self.history,
            "metrics": dict(self.metrics),
            "rng": gather_rng_states(),
            "pending_eval": self.pending_eval,
            "classes": dataset_classes(getattr(self.loader, "dataset", None)),
        }

    def load_state_dict(self, state: dict[str, Any], reseed: int = 0) -> None:
        """Continue from ``state`` (:meth:`state_dict` of this or an older version). On the same
        world size: the exact position and, at the first batch, this rank's RNG states (whatever
        the schedule length now is: a longer schedule continues where the state stopped). On
        another world size: the same fraction of training, the RNG seeded with ``reseed + rank +
        iter`` (the LR follows from the iteration). Raises what torch raises for a state of
        another model or optimizer."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.checkpointer is not None:
            self.checkpointer.load_state_dict(state)
        self.history = state.get("history") or {"train": [], "eval": []}
        self.metrics = dict(state.get("metrics") or {})
        self.pending_eval = bool(state.get("pending_eval"))
        if state["world_size"] == self.env.world_size:
            self.iter = int(state["iter"])
            self.pending_rng = state["rng"][self.env.rank]
            return
        self.iter = min(self.max_iters, round(state["iter"] / max(1, state["max_iters"]) * self.max_iters))
        seed = reseed + self.env.rank + self.iter
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # -- what hooks report ----------------------------------------------------------------
    def report_eval(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Record an evaluation of the current step (the same ``metrics`` on every rank) and tell
        the hooks (``after_eval``); returns the history record (``iter``, ``epoch``, ``metrics``)."""
        self.metrics = dict(metrics)
        self.pending_eval = False
        record = {"iter": self.iter, "epoch": self.iter / self.iters_per_epoch, "metrics": self.metrics}
        self.history["eval"].append(record)
        self.call_hooks("after_eval", self.metrics)
        return record

    def defer_eval(self) -> None:
        """An evaluation is due but the run is stopping: the checkpoint records it as pending and
        the resumed run does it first."""
        self.pending_eval = True

    def call_hooks(self, name: str, *args: Any) -> None:
        """Call ``name`` on every hook in order."""
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def train(self) -> TrainResult:
        """Run to ``max_iters``; return the result. Raises :class:`TrainingError` on a non-finite
        loss and :class:`Preempted` when a hook asked to stop."""
        try:
            self.call_hooks("before_train")
            while self.iter < self.max_iters:
                self._run_epoch()
        except BaseException as err:
            for hook in self.hooks:
                with contextlib.suppress(Exception):
                    hook.on_error(self, err)
            raise
        result = TrainResult(
            metrics=dict(self.metrics), output_dir=self.output_dir,
            iterations=self.iter, epochs=self.iter // self.iters_per_epoch,
        )
        if self.checkpointer is not None:
            result.best = dict(self.checkpointer.best)
            result.last_checkpoint = self.checkpointer.last_path
        self.call_hooks("after_train", result)
        return result

    def _run_epoch(self) -> None:
        epoch = self.epoch = self.iter // self.iters_per_epoch
        done_in_epoch = self.iter - epoch * self.iters_per_epoch
        end = min((epoch + 1) * self.iters_per_epoch, self.max_iters)
        skip = done_in_epoch * self.accumulation
        if self.pending_rng is not None and skip == 0:
            # Resumed at an epoch boundary: the uninterrupted run built this epoch's iterator
            # after its checkpoint, so restore first and let the iterator draw from it.
            self._restore_rng()
        batches = epoch_batches(self.loader, epoch, skip)
        stop = False
        while self.iter < end and not stop:
            log_values, stop = self.run_step(batches)
            self.iter += 1
            self.stopping = stop and self.iter < self.max_iters
            self._speed_window[0] += log_values["images"]
            self._speed_window[1] += log_values["time"]
            if self.iter % self.log_interval == 0 or self.iter == self.max_iters:
                self.history["train"].append({"iter": self.iter, "loss": log_values["loss"]})
                images, seconds = self._speed_window
                log_values["images_per_s"] = images / seconds if seconds > 0 else 0.0
                self._speed_window = [0.0, 0.0]
            self.call_hooks("after_iter", log_values)
        if self.iter == (epoch + 1) * self.iters_per_epoch:
            self.call_hooks("after_epoch")  # before a stop too: a resumed run starts the next epoch
        if stop and self.iter < self.max_iters:  # a stop on the last step is just the end
            self._preempt()

    def run_step(self, batches: Iterator) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the log values and whether any rank asked to stop. On
        logged steps (every ``log_interval``, and the last) the loop adds ``images_per_s``,
        averaged since the previous logged step."""
        start = time.perf_counter()
        stop_local = any(hook.should_stop(self) for hook in self.hooks)
        totals: Optional[dict[str, torch.Tensor]] = None
        data_time = 0.0
        images_seen = 0
        for micro in range(self.accumulation):
            t0 = time.perf_counter()
            images, targets = move_to(next(batches), self.device)
            if self.pending_rng is not None:
                # Resumed mid-epoch: the uninterrupted run's iterator existed already (whatever it
                # drew came before the checkpoint), so restore once the first batch is fetched.
                self._restore_rng()
            data_time += time.perf_counter() - t0
            images_seen += len(images)
            last = micro == self.accumulation - 1
            # DDP: all-reduce gradients only on the last micro-batch.
            sync = contextlib.nullcontext() if last or not self.distributed else self.train_model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss_dict = self.train_model(images, targets)
                loss = sum(loss_dict.values())
                scaled = loss / self.accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            detached = {k: v.detach() for k, v in loss_dict.items()}
            totals = detached if totals is None else {k: totals[k] + detached[k] for k in totals}
        names = list(totals)
        # One collective per step: mean loss terms over ranks and micro-batches, plus stop flags.
        packed = torch.stack([totals[k].float() for k in names] + [torch.tensor(float(stop_local), device=self.device)])
        if self.distributed:
            dist.all_reduce(packed)
            packed[:-1] /= self.env.world_size
        values = packed.tolist()
        # SSD/RetinaNet name their terms "classification"...; prefix so every term reads loss_*.
        terms = {(k if k.startswith("loss") else f"loss_{k}"): v / self.accumulation for k, v in zip(names, values[:-1])}
        total = sum(terms.values())
        if not math.isfinite(total):
            bad = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            raise TrainingError(
                f"non-finite loss at iteration {self.iter + 1} (epoch {self.iter // self.iters_per_epoch + 1}): "
                f"{bad}; lower optim.lr, set optim.grad_clip, or check the data"
            )
        if self.scaler is not None and self.grad_clip:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        log_values = {"loss": total, **terms}
        log_values["lr"] = self.optimizer.param_groups[0]["lr"]
        log_values["time"] = time.perf_counter() - start
        log_values["data_time"] = data_time
        log_values["images"] = float(images_seen * self.env.world_size)
        return log_values, values[-1] > 0

    def _restore_rng(self) -> None:
        from detection.checkpoint import set_rng_state

        set_rng_state(self.pending_rng)
        self.pending_rng = None

    def _preempt(self) -> None:
        path = self.checkpointer.save(self, reason="preempted") if self.checkpointer is not None else None
        raise Preempted(
            f"stopped at iteration {self.iter} on request (preemption); checkpoint {path}; "
            "run again with runtime.resume=auto to continue", checkpoint=path,
        )
