"""Progress on rank 0: a tqdm bar (loss, lr, images/s, ETA) on a terminal, plain log lines
every ``interval`` iterations otherwise (batch logs, Slurm output files)."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Optional

from detection.hooks.base import Hook

log = logging.getLogger("detection.train")


class LoggerHook(Hook):
    """Rank 0 only (the builder adds it there): a line every ``interval`` iterations and at the
    end; ``name`` titles the bar and the first line. ``tty=None`` asks ``sys.stderr.isatty()``."""

    def __init__(self, interval: int = 10, name: str = "train", tty: Optional[bool] = None) -> None:
        self.interval, self.name = max(1, int(interval)), name
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar: Any = None
        self._start = 0.0
        self._start_iter = 0

    def before_train(self, trainer: Any) -> None:
        self._start, self._start_iter = time.perf_counter(), trainer.iter
        log.info("training %s: %d iterations (%d per epoch), %s", self.name, trainer.max_iters,
                 trainer.iters_per_epoch, trainer.lr_scaling.describe())
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.max_iters, initial=trainer.iter, unit="it", dynamic_ncols=True,
                            desc=self.name, file=sys.stderr)

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        if trainer.iter % self.interval and trainer.iter != trainer.max_iters:
            if self.bar is not None:
                self.bar.update(1)
            return
        # The trainer's speed since its last logged step (the same interval in a run); this step's otherwise.
        speed = log_values.get("images_per_s", log_values["images"] / log_values["time"] if log_values["time"] else 0.0)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{log_values['loss']:.3f}", lr=f"{log_values['lr']:.2e}",
                                 img_s=f"{speed:.1f}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self._start
        done = trainer.iter - self._start_iter
        eta = elapsed / done * (trainer.max_iters - trainer.iter) if done else 0.0
        terms = " ".join(f"{k}={v:.3f}" for k, v in log_values.items()
                         if k.startswith("loss_"))
        log.info("iter %d/%d epoch %d loss %.4f (%s) lr %.3g %.1f img/s eta %s",
                 trainer.iter, trainer.max_iters, trainer.epoch + 1, log_values["loss"], terms,
                 log_values["lr"], speed, datetime.timedelta(seconds=round(eta)))

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        main = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k and k.endswith(("mAP", "mAP_50", "mAP_75")))
        self._write(f"eval at iter {trainer.iter}: {main}")

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        log.debug("checkpoint written: %s", path)

    def after_train(self, trainer: Any, result: Any) -> None:
        self._close()
        elapsed = time.perf_counter() - self._start
        log.info("done: %d iterations in %s; best %s; output %s", result.iterations,
                 datetime.timedelta(seconds=round(elapsed)), result.best or "-", result.output_dir)

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self._close()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
