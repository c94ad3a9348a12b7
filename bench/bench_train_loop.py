"""Training throughput of orch's loop against a plain PyTorch loop, and the cost of MLflow tracking.

Four variants run interleaved in one process (same model and initial weights, same batches in the
same order, same batch size and threads), each ``--repeats`` times:

- ``plain``: a minimal loop in the style of torchvision's detection references
  (``references/detection/engine.py: train_one_epoch``): forward, ``sum(loss_dict)``,
  ``loss.item()`` + finiteness check, ``zero_grad``, ``backward``, ``step``, a per-iteration
  warmup ``LambdaLR``; the same ``DataLoader`` as orch (``detection.data.build_loader``);
- ``orch``: ``detection.train.main`` with its default hooks (LR, logging, checkpoint), MLflow off,
  a log line every 20 steps;
- ``orch log1``: the same with a log line every step (``runtime.log_interval=1``), MLflow off;
- ``orch log1+mlflow``: the same with tracking on (every step's loss terms, lr, images/s recorded):
  the journal hook appends to ``<output>/journal`` and a real shipper process
  (``python -m orchestrator.tracking.shipper --follow``) replays it to MLflow *while training
  runs*, as on every backend: to a SQLite file, or with ``--server`` to a real ``mlflow server``
  on 127.0.0.1. The shipper's own CPU time (from ``wait4``) is reported beside the step cost.

Every variant computes the same losses (checked: the plain loop and orch agree), so their
iteration ``i`` does the same arithmetic. On a machine shared with other work, other processes
only ever *add* time, so the speed of a variant is taken from the sum over iterations of the
fastest of the repeats' times of that iteration (``timeit``'s "min" rule, per iteration); the
median run's wall-clock speed is shown too. Iterations ``--warmup..--iters-1`` are timed: model
building, the final checkpoint and MLflow run creation are outside the window.

Goals: orch / plain >= 0.98; ``orch log1+mlflow`` at most 1 % slower than ``orch log1``.

Usage (writes the markdown table to --out as well as stdout):
    .venv/bin/python bench/bench_train_loop.py --iters 60 --warmup 10 --repeats 5 --threads 1 \\
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

# Same OpenMP policy as orch's training entry point sets, for every variant alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_ITERS = 20


def experiment(args, data: Path, work: Path, tracking: bool, log_interval: int, uri: str = ""):
    """The orch experiment equal to the plain loop's setup."""
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
        "schedule": {"epochs": None, "iterations": args.iters, "warmup_iters": WARMUP_ITERS, "warmup_ratio": 0.01,
                     "policy": "constant", "milestones": []},
        "checkpoint": {"interval": 10**6, "max_keep": 1, "save_best": None},
        "runtime": {"seed": 0, "output_dir": str(work), "log_interval": log_interval, "device": "cpu",
                    "threads": args.threads},
        "tracking": {"enable": tracking, "uri": uri or f"sqlite:///{work.parent / 'mlflow.db'}", "experiment": "bench"},
    }, source="bench_train_loop")


def run_orch(args, data: Path, work: Path, tracking: bool, log_interval: int) -> tuple[dict, dict]:
    """(iteration -> wall time at its end, iteration -> loss) of ``detection.train.main``; with
    ``tracking``, a shipper process replays the journal to MLflow meanwhile."""
    import subprocess

    from cluster.env import DistEnv
    from detection.hooks import Hook
    from detection.train import main

    marks, losses = {}, {}
    uri = SHIP["uri"] or f"sqlite:///{work.parent / 'mlflow.db'}"
    shipper = None
    if tracking:  # beside training, as the worker starts it on every backend
        shipper = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.tracking.shipper", str(work / "journal"), "--uri", uri, "--follow",
             "--poll", "2", "--until-pid", str(os.getpid()), "--linger", "60"],  # never outlives the bench
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    class Clock(Hook):
        """Marks the end of every step; measures the journal hook's own cost directly."""

        def before_train(self, trainer):
            from detection.journal_hook import JournalHook

            for hook in trainer.hooks:
                if isinstance(hook, JournalHook):
                    original = hook.after_iter

                    def timed(trainer, log, original=original):
                        started = time.thread_time()
                        original(trainer, log)
                        MLFLOW_COST["main_s"] += time.thread_time() - started
                        MLFLOW_COST["steps"] += 1

                    hook.after_iter = timed
                    MLFLOW_COST["hooks"].append(hook)

        def after_iter(self, trainer, log):
            marks[trainer.iter] = time.perf_counter()
            losses[trainer.iter] = log["loss"]

    main(experiment(args, data, work, tracking, log_interval, uri), DistEnv.single(), hooks=[Clock()])
    if shipper is not None:  # it ends once the final status is shipped
        _, status, usage = os.wait4(shipper.pid, 0)
        shipper.returncode = status
        SHIP["cpu_s"] += usage.ru_utime + usage.ru_stime
        SHIP["runs"] += 1
    return marks, losses


MLFLOW_COST: dict = {"main_s": 0.0, "steps": 0, "hooks": []}
SHIP: dict = {"uri": "", "cpu_s": 0.0, "runs": 0}


def run_plain(args, data: Path) -> tuple[dict, dict]:
    """The same for a torchvision-references style loop on the same model and DataLoader."""
    import random

    import numpy as np
    import torch

    from detection.config import DataConfig, DataSplit, ModelConfig
    from detection.data import build_dataset, build_loader
    from detection.models import build_model

    torch.set_num_threads(args.threads)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as orch seeds rank 0
    cfg = DataConfig(train=DataSplit(str(data / "annotations/instances_train.json"), str(data / "train")),
                     batch_size_per_gpu=args.batch, workers_per_gpu=0, min_size=args.size, max_size=args.size)
    dataset = build_dataset(cfg.train, cfg, train=True)
    model = build_model(ModelConfig(type=args.model), dataset.num_classes, cfg)
    loader = build_loader(dataset, cfg, 0, 1, train=True, seed=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.01 * (1 - it / WARMUP_ITERS) + it / WARMUP_ITERS if it < WARMUP_ITERS else 1.0)
    marks, losses = {}, {}
    it, epoch = 0, 0
    while it < args.iters:
        loader.set_epoch(epoch)
        for images, targets in loader:
            images = [img.to("cpu") for img in images]
            targets = [{k: v.to("cpu") for k, v in t.items()} for t in targets]
            loss_dict = model(images, targets)
            losses_sum = sum(loss for loss in loss_dict.values())
            loss_value = losses_sum.item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            losses_sum.backward()
            optimizer.step()
            scheduler.step()
            it += 1
            marks[it], losses[it] = time.perf_counter(), loss_value
            if it == args.iters:
                break
        epoch += 1
    return marks, losses


def start_server(tmp: Path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite behind it, one worker): (process, uri)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--out", default=None, help="also write the markdown result here")
    parser.add_argument("--server", action="store_true", help="ship to a real `mlflow server` on 127.0.0.1 "
                        "(default: a SQLite file)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from detection.shapes import make_shapes

    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    server = start_server(tmp) if args.server else None
    SHIP["uri"] = server[1] if server else ""
    data = tmp / "shapes"
    make_shapes(str(data), n_train=args.train_images, n_val=0, size=args.size, seed=0)
    variants = {
        "plain": ("plain loop (torchvision references style)", lambda rep: run_plain(args, data)),
        "orch": ("orch `detection.train.main`, log line every 20 steps, MLflow off",
                 lambda rep: run_orch(args, data, tmp / f"orch{rep}", False, 20)),
        "log1": ("orch, log line every step, MLflow off",
                 lambda rep: run_orch(args, data, tmp / f"log1-{rep}", False, 1)),
        "mlflow": ("orch, log line + MLflow metrics every step (journal + shipper process to "
                   + ("a real mlflow server)" if args.server else "SQLite)"),
                   lambda rep: run_orch(args, data, tmp / f"mlflow{rep}", True, 1)),
    }
    window = range(args.warmup + 1, args.iters)  # iteration i's time: end of i-1 to end of i
    times: dict[str, list[list[float]]] = {key: [] for key in variants}
    losses: dict[str, dict] = {}
    start, load_before = time.time(), os.getloadavg()[0]
    keys = list(variants)
    for rep in range(args.repeats):  # interleaved, so drifts of the machine's load hit all alike
        for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:  # rotated: no variant always first
            marks, losses[key] = variants[key][1](rep)
            times[key].append([marks[i] - marks[i - 1] for i in window])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k} {args.batch * len(window) / sum(v[-1]):.2f} img/s" for k, v in times.items()), flush=True)
    images = args.batch * len(window)
    best = {k: images / sum(min(col) for col in zip(*runs)) for k, runs in times.items()}
    median = {k: statistics.median(images / sum(run) for run in runs) for k, runs in times.items()}
    same = max(abs(losses["plain"][i] - losses["orch"][i]) for i in losses["plain"])
    lines = [
        "# Training loop throughput: orch vs a plain PyTorch loop, and MLflow's cost",
        "",
        f"Command: `.venv/bin/python bench/bench_train_loop.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.model} at {args.size} px, batch {args.batch}, {args.threads} thread(s), CPU "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), iterations "
        f"{args.warmup + 1}..{args.iters - 1} of {args.iters} timed, {args.repeats} interleaved repeats "
        "(order rotated each repeat). "
        f"Largest loss difference plain vs orch over all iterations: {same:.2e} (same work). "
        f"Load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (machine shared "
        f"with other work); wall {time.time() - start:.0f} s. *Best* = images / sum over iterations "
        "of the fastest repeat of that iteration (other processes only add time); *median* = the "
        "median repeat's speed.",
        "",
        "| variant | best img/s | vs plain | median img/s | vs plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, (label, _) in variants.items():
        lines.append(f"| {label} | {best[key]:.2f} | {best[key] / best['plain']:.3f} | "
                     f"{median[key]:.2f} | {median[key] / median['plain']:.3f} |")
    lines += [
        "",
        f"- orch / plain: **{best['orch'] / best['plain']:.3f}** (best), {median['orch'] / median['plain']:.3f} "
        "(median); goal >= 0.98",
        f"- MLflow every step vs off, both logging every step: **{100 * (1 - best['mlflow'] / best['log1']):+.1f} %** "
        f"(best), {100 * (1 - median['mlflow'] / median['log1']):+.1f} % (median) slower; goal <= 1 %",
        "",
    ]
    steps = MLFLOW_COST["steps"]
    step_ms = 1000 * args.batch / best["log1"]
    main_ms = 1000 * MLFLOW_COST["main_s"] / steps
    ship_ms = 1000 * SHIP["cpu_s"] / steps
    lines += [
        f"Tracking's own cost, measured directly over {steps} logged steps: {main_ms:.4f} ms CPU per step in the "
        f"training thread (the journal hook: collect values, append) = **{100 * main_ms / step_ms:.3f} %** of a "
        f"{step_ms:.0f} ms step; the shipper process (another core; import, run creation and replay to "
        f"{'a real mlflow server' if args.server else 'SQLite'} included) used {SHIP['cpu_s']:.2f} s CPU for "
        f"{SHIP['runs']} runs = {ship_ms:.2f} ms per logged step.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if server:
        server[0].terminate()
        server[0].wait(30)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
