"""Training throughput of orch's loop against a plain PyTorch loop, and the cost of MLflow.

Three variants run interleaved in one process (same model, data, batch size and threads), each
``--repeats`` times, and the medians are compared:

- ``plain``: a minimal loop in the style of torchvision's detection references
  (``references/detection/engine.py: train_one_epoch``): forward, ``sum(loss_dict)``,
  ``loss.item()`` + finiteness check, ``zero_grad``, ``backward``, ``step``, a per-iteration
  warmup ``LambdaLR``; same ``DataLoader`` as orch (``detection.data.build_loader``);
- ``orch``: ``detection.train.main`` with every default hook (LR, logging, checkpoint), MLflow
  off, a log line every 20 steps;
- ``orch log1``: the same with ``runtime.log_interval=1`` (a log line every step), MLflow off;
- ``orch log1+mlflow``: the same with MLflow on (every step's metrics recorded).

Images/s are measured between the end of iteration ``--warmup`` and the end of iteration
``--iters - 1`` (the last iteration's final checkpoint and the evaluation are outside the window,
as is model building). Goals: orch / plain >= 0.98; ``orch log1+mlflow`` at most 2 % slower than ``orch log1``.

Usage (writes the markdown table to --out as well as stdout):
    .venv/bin/python bench/bench_train_loop.py --iters 80 --warmup 10 --repeats 3 --threads 2 \\
        --out bench/results/train_loop.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def experiment(args, data: Path, work: Path, tracking: bool, log_interval: int):
    from orchestrator.config import build_experiment

    return build_experiment({
        "name": "bench",
        "model": {"type": args.model},
        "data": {
            "train": {"ann_file": str(data / "annotations/instances_train.json"), "img_dir": str(data / "train")},
            "val": None, "batch_size_per_gpu": args.batch, "workers_per_gpu": 0,
            "min_size": args.size, "max_size": args.size,
        },
        "optim": {"type": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
                  "auto_scale_lr": {"enable": True, "base_batch_size": args.batch}},
        "schedule": {"epochs": None, "iterations": args.iters, "warmup_iters": 20, "warmup_ratio": 0.01,
                     "policy": "constant", "milestones": []},
        "checkpoint": {"interval": 10**6, "max_keep": 1, "save_best": None},
        "runtime": {"seed": 0, "output_dir": str(work), "log_interval": log_interval,
                    "device": "cpu", "threads": args.threads},
        "tracking": {"enable": tracking, "uri": f"sqlite:///{work.parent / 'mlflow.db'}", "experiment": "bench"},
    }, source="bench_train_loop")


def time_orch(args, data: Path, tmp: Path, tracking: bool, tag: str, log_interval: int = 20) -> float:
    """Images/s of detection.train.main between the window's iterations."""
    from cluster.env import DistEnv
    from detection.hooks import Hook
    from detection.train import main

    marks: dict[int, float] = {}

    class Clock(Hook):
        def after_iter(self, trainer, log):
            marks[trainer.iter] = time.perf_counter()

    main(experiment(args, data, tmp / tag, tracking, log_interval), DistEnv.single(), hooks=[Clock()])
    first, last = args.warmup, args.iters - 1
    return (last - first) * args.batch / (marks[last] - marks[first])


def time_plain(args, data: Path) -> float:
    """Images/s of a torchvision-references style loop on the same model and DataLoader."""
    import random

    import numpy as np
    import torch

    from detection.config import DataConfig, DataSplit, ModelConfig
    from detection.data import build_dataset, build_loader
    from detection.models import build_model

    torch.set_num_threads(args.threads)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    cfg = DataConfig(train=DataSplit(str(data / "annotations/instances_train.json"), str(data / "train")),
                     batch_size_per_gpu=args.batch, workers_per_gpu=0, min_size=args.size, max_size=args.size)
    dataset = build_dataset(cfg.train, cfg, train=True)
    loader = build_loader(dataset, cfg, 0, 1, train=True, seed=0)
    model = build_model(ModelConfig(type=args.model), dataset.num_classes, cfg)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    warmup = 20
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.01 * (1 - it / warmup) + it / warmup if it < warmup else 1.0)
    marks: dict[int, float] = {}
    it, epoch = 0, 0
    while it < args.iters:
        loader.set_epoch(epoch)
        for images, targets in loader:
            images = [img.to("cpu") for img in images]
            targets = [{k: v.to("cpu") for k, v in t.items()} for t in targets]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            it += 1
            marks[it] = time.perf_counter()
            if it == args.iters:
                break
        epoch += 1
    first, last = args.warmup, args.iters - 1
    return (last - first) * args.batch / (marks[last] - marks[first])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--out", default=None, help="also write the markdown result here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging

    logging.basicConfig(level=logging.WARNING)
    from detection.shapes import make_shapes

    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    data = tmp / "shapes"
    make_shapes(str(data), n_train=args.train_images, n_val=0, size=args.size, seed=0)
    speeds: dict[str, list[float]] = {"plain": [], "orch": [], "orch log1": [], "orch log1+mlflow": []}
    start = time.time()
    load_before = os.getloadavg()[0]
    for rep in range(args.repeats):  # interleaved: machine load drifts hit every variant alike
        speeds["plain"].append(time_plain(args, data))
        speeds["orch"].append(time_orch(args, data, tmp, False, f"orch{rep}"))
        speeds["orch log1"].append(time_orch(args, data, tmp, False, f"log1-{rep}", log_interval=1))
        speeds["orch log1+mlflow"].append(time_orch(args, data, tmp, True, f"mlflow{rep}", log_interval=1))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in speeds.items()), flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    command = "python bench/bench_train_loop.py " + " ".join(sys.argv[1:])
    labels = {
        "plain": "plain loop (torchvision references style)",
        "orch": "orch `detection.train.main`, log every 20 steps, MLflow off",
        "orch log1": "orch, log line every step, MLflow off",
        "orch log1+mlflow": "orch, log line + MLflow metrics every step",
    }
    lines = [
        "# Training loop throughput: orch vs a plain PyTorch loop, and MLflow's cost",
        "",
        f"Command: `{command}`",
        "",
        f"Model {args.model} at {args.size} px, batch {args.batch}, {args.threads} thread(s), CPU "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {args.iters} iterations "
        f"per run, images/s measured over iterations {args.warmup}..{args.iters - 1}, {args.repeats} "
        f"interleaved repeats, medians. Load average at start {load_before:.1f}, at end "
        f"{os.getloadavg()[0]:.1f} (a machine shared with other work); wall {time.time() - start:.0f} s.",
        "",
        "| variant | images/s (median) | runs | vs plain |",
        "|---|---:|---|---:|",
    ]
    for key, label in labels.items():
        runs = ", ".join(f"{v:.2f}" for v in speeds[key])
        lines.append(f"| {label} | {med[key]:.2f} | {runs} | {med[key] / med['plain']:.3f} |")
    lines += [
        "",
        f"- orch / plain = **{med['orch'] / med['plain']:.3f}** (goal >= 0.98)",
        f"- MLflow every step vs off (both logging every step): **{100 * (1 - med['orch log1+mlflow'] / med['orch log1']):+.1f} %** "
        "slower (goal <= 2 %)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
