"""torchvision's detection training loop (``references/detection/engine.py: train_one_epoch`` and
the ``MetricLogger`` / ``SmoothedValue`` of ``references/detection/utils.py``), re-implemented for
``bench_gpu.py`` with the same work per step: the same calls in the same order, an ``.item()`` per
logged tensor, a formatted log line every ``print_freq`` steps (kept in ``lines``, not printed).
One process only (``reduce_dict`` is the identity there). The only addition: ``marks`` receives
``(time, loss)`` after every step.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque

import torch


class SmoothedValue:
    """references/detection/utils.py: a window of 20 values and a global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def __str__(self):
        values = torch.tensor(list(self.deque))
        return self.fmt.format(median=values.median().item(), avg=values.mean().item(),
                               global_avg=self.total / self.count, max=max(self.deque), value=self.deque[-1])


class MetricLogger:
    """references/detection/utils.py: meters updated every step (``.item()`` of each tensor), a
    line every ``print_freq`` steps with the peak GPU memory. The lines are kept, not printed."""

    def __init__(self, delimiter="  "):
        self.meters, self.delimiter, self.lines = defaultdict(SmoothedValue), delimiter, []

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v.item() if isinstance(v, torch.Tensor) else v)

    def log_every(self, iterable, print_freq, header):
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == len(iterable) - 1:
                memory = f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}" if torch.cuda.is_available() else ""
                meters = self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())
                self.lines.append(f"{header} [{i}/{len(iterable)}] {meters} time: {iter_time} data: {data_time} {memory}")
            end = time.time()
        self.lines.append(f"{header} Total time: {time.time() - start:.0f} s")


class Limited:
    """The first ``n`` batches of a loader (one epoch of the benchmark)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            yield batch


def train_one_epoch(model, optimizer, data_loader, device, epoch, print_freq, scaler=None, marks=None):
    """references/detection/engine.py, unchanged but for ``marks`` (the clock and losses per step)."""
    model.train()
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    lr_scheduler = None
    if epoch == 0:
        warmup_factor = 1.0 / 1000
        warmup_iters = min(1000, len(data_loader) - 1)
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup_iters)
    for images, targets in metric_logger.log_every(data_loader, print_freq, header):
        images = list(image.to(device) for image in images)
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=scaler is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_dict_reduced = loss_dict  # utils.reduce_dict: unchanged on one process
        losses_reduced = sum(loss for loss in loss_dict_reduced.values())
        loss_value = losses_reduced.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"Loss is {loss_value}, stopping training")
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        metric_logger.update(loss=losses_reduced, **loss_dict_reduced)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        marks.append((time.perf_counter(), loss_value))
    return metric_logger
