"""Faster R-CNN R50-FPN training speed on one GPU: orch's loop against torchvision's references.

Variants, run interleaved in one process on the same GPU (order rotated each repeat), each from
the same initial weights on the same batches (synthetic COCO-format data: random smooth images of
about ``--size`` x 1333*size/800 pixels, landscape and portrait, 1-5 boxes each), batch ``--batch``:

- ``ref``: torchvision's ``references/detection/engine.py: train_one_epoch`` re-implemented here
  line by line (its ``MetricLogger``/``SmoothedValue`` costs included: an ``.item()`` per loss term
  per step, a formatted line every 20 steps), with ``--amp``: float16 autocast + ``GradScaler``,
  cudnn.benchmark off (the reference does not set it);
- ``orch``: ``detection.train.main`` with the same settings (``runtime.amp=fp16``,
  ``runtime.cudnn_benchmark=false``), MLflow off, a log line every 20 steps;
- ``orch_cudnn``: + the cuDNN autotuner (orch's default on CUDA);
- ``orch_bf16``: ``runtime.amp=bf16`` (no loss scaling) + autotuner;
- ``orch_bf16_cl``: + ``runtime.channels_last``;
- ``orch_best``: + ``runtime.compile=backbone``.

``--layout finetune`` (default, as the COCO recipes train): the backbone starts from
``ResNet50_Weights.IMAGENET1K_V1`` as torchvision's builder and orch set it up (FrozenBatchNorm2d,
stages 1-2 frozen). The file is a stand-in with random values written into a temporary weights
cache that both torchvision (``$TORCH_HOME``) and orch (``model.weights_dir``) read: nothing is
downloaded. ``--layout scratch``: no weights (BatchNorm, every stage trains).

Speed: images / sum over timed iterations of the fastest repeat's time of that iteration (other
processes only add time), and the median repeat's; iterations ``warmup+1 .. iters-1`` are timed
(the last one holds orch's final checkpoint). Memory: ``torch.cuda.max_memory_allocated`` over
the run. Losses of every orch variant are compared with ``ref``'s, step by step.

Usage (writes the markdown table to --out as well as stdout):
    .venv/bin/python bench/bench_gpu.py --iters 60 --warmup 20 --repeats 3 --out bench/results/gpu.md
    .venv/bin/python bench/bench_gpu.py --device cpu --size 256 --iters 3 --repeats 1   # smoke test (CPU)
Without a CUDA device (and no ``--device cpu``) it prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as orch's training entry point sets it
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = "fasterrcnn_resnet50_fpn"
BACKBONE_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"
PRINT_FREQ = 20
FAST = {"runtime.cudnn_benchmark": True}
VARIANTS = {  # key: (description, runtime settings of orch; None = the reference loop)
    "ref": ("torchvision references train_one_epoch, --amp (fp16 + GradScaler)", None),
    "orch": ("orch, amp fp16, cudnn_benchmark false (the reference's settings)",
             {"runtime.amp": "fp16", "runtime.cudnn_benchmark": False}),
    "orch_cudnn": ("orch, amp fp16, cudnn_benchmark", {"runtime.amp": "fp16", **FAST}),
    "orch_bf16": ("orch, amp bf16, cudnn_benchmark", {"runtime.amp": "bf16", **FAST}),
    "orch_bf16_cl": ("orch, amp bf16, channels_last, cudnn_benchmark",
                     {"runtime.amp": "bf16", "runtime.channels_last": True, **FAST}),
    "orch_best": ("orch, amp bf16, channels_last, compile backbone, cudnn_benchmark",
                  {"runtime.amp": "bf16", "runtime.channels_last": True, "runtime.compile": "backbone", **FAST}),
}


# -- data ----------------------------------------------------------------------------------------
def make_data(folder: Path, images: int, size: int, seed: int = 0) -> tuple[str, str]:
    """A COCO-format dataset of ``images`` random smooth JPEGs about ``size`` x 1333*size/800 (one
    in four portrait), 1-5 boxes each in 3 categories; returns (ann_file, img_dir)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = folder / "train"
    img_dir.mkdir(parents=True)
    widths = [round(size * r) for r in (1333 / 800, 1.5, 1333 / 1000, 1.25, 1.125)]
    records, annotations = [], []
    for i in range(images):
        w, h = int(rng.choice(widths)), size
        if i % 4 == 3:
            w, h = h, w
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(img_dir / f"{i:06d}.jpg", quality=90)
        records.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.5) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 4)),
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    ann_file = folder / "instances_train.json"
    categories = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)]
    ann_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return str(ann_file), str(img_dir)


def write_backbone_cache(folder: Path) -> Path:
    """torchvision's cache folder holding a stand-in for ``BACKBONE_WEIGHTS`` (random values)."""
    import torch
    from torchvision.models import get_weight, resnet50

    cache = folder / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(resnet50().state_dict(), cache / get_weight(BACKBONE_WEIGHTS).url.rsplit("/", 1)[1])
    return cache


# -- runs ----------------------------------------------------------------------------------------
def fingerprint(model) -> float:
    """A number that differs between different initial weights (sum of every tensor's values)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))


def experiment(args, data, work: Path, settings: dict):
    """The orch experiment equal to the reference loop's setup, with ``settings`` (dotted keys)."""
    from orchestrator.config import build_experiment

    mapping = {
        "name": "bench_gpu",
        "model": {"type": MODEL, "backbone_weights": "IMAGENET1K_V1" if args.cache else None,
                  "weights_dir": str(args.cache) if args.cache else None},
        "data": {"train": {"ann_file": data[0], "img_dir": data[1]}, "val": None,
                 "batch_size_per_gpu": args.batch, "workers_per_gpu": args.workers,
                 "min_size": args.size, "max_size": args.max_size},
        "optim": {"type": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4,
                  "auto_scale_lr": {"enable": True, "base_batch_size": args.batch}},
        "schedule": {"epochs": None, "iterations": args.iters, "warmup_iters": min(1000, args.iters - 1),
                     "warmup_ratio": 0.001, "policy": "constant", "milestones": []},
        "checkpoint": {"interval": 10**6, "max_keep": 1, "save_best": None},
        "runtime": {"seed": 0, "output_dir": str(work), "log_interval": PRINT_FREQ, "device": args.device},
        "tracking": {"enable": False},
    }
    for key, value in settings.items():
        section, name = key.split(".")
        mapping[section][name] = value
    return build_experiment(mapping, source="bench_gpu")


def run_orch(args, data, work: Path, settings: dict) -> dict:
    """One run of ``detection.train.main``: per-step clock and loss, initial weights, peak memory."""
    import torch

    from cluster.env import DistEnv
    from detection.hooks import Hook
    from detection.train import main

    marks, start = [], {}

    class Clock(Hook):
        def before_train(self, trainer):
            start["fingerprint"] = fingerprint(trainer.model)
            marks.append((time.perf_counter(), math.nan))

        def after_iter(self, trainer, log):
            marks.append((time.perf_counter(), log["loss"]))

    if settings.get("runtime.compile"):
        import torch._dynamo

        torch._dynamo.reset()  # every run compiles from the start, as a fresh job does
    main(experiment(args, data, work, settings), DistEnv.single(), hooks=[Clock()])
    shutil.rmtree(work, ignore_errors=True)  # the final checkpoint
    return {"marks": marks, **start}


def run_reference(args, data) -> dict:
    """One run of the reference loop on the same data, model and initial weights as orch's."""
    import random

    import numpy as np
    import torch
    from torchvision.models import detection as tvd, get_weight

    from detection.config import DataConfig, DataSplit
    from detection.data import build_dataset, build_loader
    from reference_loop import Limited, train_one_epoch

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False  # the reference leaves it off
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as orch seeds rank 0
    cfg = DataConfig(train=DataSplit(*data), batch_size_per_gpu=args.batch, workers_per_gpu=args.workers,
                     min_size=args.size, max_size=args.max_size)
    dataset = build_dataset(cfg.train, cfg, train=True)  # in orch's order: data, model, loader
    weights = get_weight(BACKBONE_WEIGHTS) if args.cache else None
    model = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=weights, num_classes=dataset.num_classes,
                                        min_size=args.size, max_size=args.max_size)
    result = {"fingerprint": fingerprint(model)}
    model.to(device)
    loader = build_loader(dataset, cfg, 0, 1, train=True, seed=0, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None  # --amp
    marks = [(time.perf_counter(), math.nan)]
    train_one_epoch(model, optimizer, Limited(loader, args.iters), device, 0, PRINT_FREQ, scaler, marks)
    return {"marks": marks, **result}


def measure(run, device) -> dict:
    """``run()`` with the peak GPU memory of the run added (None on the CPU)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = run()
    result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the whole benchmark (AMP and cuDNN options then do nothing)")
    parser.add_argument("--size", type=int, default=800, help="shorter image side (longer: 1333/800 of it)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (per GPU)")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=None, help="untimed first iterations (default: 20, "
                        "at most iters - 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: min(8, cores))")
    parser.add_argument("--layout", choices=("finetune", "scratch"), default="finetune")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default=None, help="also write the markdown result here")
    parser.add_argument("--json", default=None, help="also write the raw results (per-step times and losses) here")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if args.iters < 3:
        parser.error("--iters must be at least 3 (one timed iteration between warmup and the last)")
    import logging

    logging.basicConfig(level=logging.WARNING)
    args.warmup = min(20 if args.warmup is None else args.warmup, args.iters - 2)
    args.max_size = round(args.size * 1333 / 800)
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    args.lr = 0.02 * args.batch / 16  # torchvision's 0.02 for 16 images, scaled linearly
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-gpu-"))
    try:
        return run_all(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_all(args, tmp: Path) -> int:
    import torch
    import torchvision

    args.cache = None
    if args.layout == "finetune":
        os.environ["TORCH_HOME"] = str(tmp)  # torchvision reads the stand-in from here, never downloads
        args.cache = write_backbone_cache(tmp)
    data = make_data(tmp / "data", args.batch * (args.iters + 4), args.size)
    runs = {key: [] for key in args.variants}
    keys, started = list(args.variants), time.time()
    for rep in range(args.repeats):  # interleaved, order rotated: drifts hit every variant alike
        for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
            settings = VARIANTS[key][1]
            run = (lambda: run_reference(args, data)) if settings is None else (
                lambda: run_orch(args, data, tmp / f"{key}-{rep}", settings))
            runs[key].append(measure(run, args.device))
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    window = range(args.warmup + 1, args.iters)  # step i: end of i-1 to end of i; the last holds a checkpoint
    images = args.batch * len(window)
    rows, raw = [], {}
    base = runs.get("ref") or runs[keys[0]]
    base_losses = [loss for _, loss in base[0]["marks"][1:]]
    for key in keys:
        steps = [[run["marks"][i][0] - run["marks"][i - 1][0] for i in window] for run in runs[key]]
        best = images / sum(min(column) for column in zip(*steps))
        median = statistics.median(images / sum(s) for s in steps)
        losses = [loss for _, loss in runs[key][0]["marks"][1:]]
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, base_losses))
        peak = max((r["peak_mib"] or 0) for r in runs[key]) or None
        rows.append((key, best, median, peak, diff, runs[key][0]["fingerprint"]))
        raw[key] = {"best_img_s": best, "median_img_s": median, "peak_mib": peak, "losses": losses,
                    "max_rel_loss_diff_vs_first": diff, "fingerprint": runs[key][0]["fingerprint"],
                    "step_times": steps}
    ref_best = rows[0][1]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "CPU")
    same_init = len({round(r[5], 3) for r in rows}) == 1
    lines = [
        "# GPU training speed: orch vs torchvision's reference loop, Faster R-CNN R50-FPN",
        "",
        f"Command: `python bench/bench_gpu.py {' '.join(sys.argv[1:])}`",
        "",
        f"{device_name}; torch {torch.__version__}, torchvision {torchvision.__version__}; {MODEL} ({args.layout} "
        f"layout), images {args.size}x{args.max_size}-ish (landscape and portrait), batch {args.batch}, "
        f"{args.workers} loader workers, iterations {args.warmup + 1}..{args.iters - 1} of {args.iters} timed, "
        f"{args.repeats} interleaved repeats; wall {time.time() - started:.0f} s. Same initial weights in every "
        f"variant: {'yes' if same_init else 'NO'}. *Best* = images / sum over iterations of the fastest repeat "
        f"of that iteration; *median* = the median repeat's speed; loss diff = largest relative difference of "
        f"a step's loss from {rows[0][0]}'s.",
        "",
        f"| variant | best img/s | vs {rows[0][0]} | median img/s | peak memory MiB | loss diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, best, median, peak, diff, _ in rows:
        memory = f"{peak:.0f}" if peak else "-"
        lines.append(f"| {VARIANTS[key][0]} | {best:.2f} | {best / ref_best:.3f} | {median:.2f} | {memory} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "same_init": same_init, "variants": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
