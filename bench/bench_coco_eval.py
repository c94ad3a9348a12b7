"""COCO evaluation speed of orch's own path, ``detection.evaluation.evaluate_coco``, with
``engine="pycocotools"`` (the reference) and ``engine="faster"`` (faster-coco-eval).

The data is synthetic and seeded: ``--images`` 640x480 images, ``--classes`` categories with
gapped ids (drawn from 1..90, as in real COCO), about 7 ground-truth boxes per image (sizes
log-uniform from 4 to 400 px, so all three area ranges are filled; 1 % crowd), and ``--dets``
detections (default 100 per image): three jittered copies of every ground-truth box (10 % with a
wrong class) plus false positives spread at random over the images (so some images have more
than 100 and the maxDets cut matters); scores uniform in [0, 1).

Every evaluation runs in its own child process (``--child``), engines alternating, so each peak
RSS belongs to one engine and a busy machine's drift hits both alike. A child builds the data and
the ground truth ``COCO`` first (not timed), then times ``evaluate_coco(gt, preds,
classwise=True, engine=...)``: results in, metrics dict out, everything included (loading the
results, matching, accumulation, per-class AP). It reports wall and CPU seconds and its
VmHWM (peak RSS) and the RSS it had before evaluating (the data itself). The table shows
medians over ``--repeats``; the run fails unless both engines give the same 12 numbers
and per-class APs to 1e-12 (see :func:`check_same`).

Goal: faster >= 10x pycocotools, end to end.

Usage:
    .venv/bin/python bench/bench_coco_eval.py                      # 5000 images, 500,000 dets
    .venv/bin/python bench/bench_coco_eval.py --images 500         # quick: 500 images, 50,000 dets
    .venv/bin/python bench/bench_coco_eval.py --repeats 5 --out bench/results/coco_eval.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("pycocotools", "faster")


def make_dataset(images: int, classes: int, dets: int, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(COCO ground-truth dict, list of COCO result dicts), the same for the same arguments."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    cat_ids = np.sort(rng.choice(np.arange(1, 91), size=classes, replace=False))
    per_image = rng.poisson(7, size=images)
    n_gt = int(per_image.sum())
    gt_image = np.repeat(np.arange(1, images + 1), per_image)
    w = np.minimum(np.exp(rng.uniform(np.log(4), np.log(400), n_gt)), width - 1)
    h = np.minimum(np.exp(rng.uniform(np.log(4), np.log(400), n_gt)), height - 1)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    gt_cat = rng.choice(cat_ids, n_gt)
    crowd = (rng.random(n_gt) < 0.01).astype(int)
    annotations = [
        {"id": i + 1, "image_id": img, "category_id": cat, "bbox": [bx, by, bw, bh], "area": bw * bh, "iscrowd": c}
        for i, (img, cat, bx, by, bw, bh, c) in enumerate(zip(
            gt_image.tolist(), gt_cat.tolist(), x.tolist(), y.tolist(), w.tolist(), h.tolist(), crowd.tolist()))
    ]
    gt = {
        "images": [{"id": i, "file_name": f"{i:06d}.jpg", "width": width, "height": height} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": f"class_{c}"} for c in cat_ids.tolist()],
        "annotations": annotations,
    }

    copies = min(3, dets // max(n_gt, 1))
    src = np.repeat(np.arange(n_gt), copies)  # jittered copies of the ground truth
    jitter = rng.normal(0, 0.1, size=(len(src), 4)) * np.stack([w, h, w, h], 1)[src]
    tp = np.stack([x[src], y[src], w[src], h[src]], 1) + jitter
    tp[:, 2:] = np.maximum(tp[:, 2:], 1.0)
    tp_cat = np.where(rng.random(len(src)) < 0.1, rng.choice(cat_ids, len(src)), gt_cat[src])
    n_fp = dets - len(src)
    fp_image = rng.integers(1, images + 1, n_fp)
    fw = np.exp(rng.uniform(np.log(4), np.log(300), n_fp))
    fh = np.exp(rng.uniform(np.log(4), np.log(300), n_fp))
    fp = np.stack([rng.uniform(0, width - fw), rng.uniform(0, height - fh), fw, fh], 1)
    image = np.concatenate([gt_image[src], fp_image])
    order = np.argsort(image, kind="stable")  # grouped by image, as orch writes them
    boxes = np.concatenate([tp, fp])[order]
    cats = np.concatenate([tp_cat, rng.choice(cat_ids, n_fp)])[order]
    scores = rng.random(dets)
    preds = [{"image_id": img, "category_id": cat, "bbox": box, "score": s}
             for img, cat, box, s in zip(image[order].tolist(), cats.tolist(), boxes.tolist(), scores.tolist())]
    return gt, preds


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> None:
    """One evaluation with one engine; prints one JSON line."""
    from pycocotools.coco import COCO

    from detection.evaluation import STAT_NAMES, evaluate_coco

    gt_dict, preds = make_dataset(args.images, args.classes, args.dets, args.seed)
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()  # orch's ground truth is a pycocotools COCO (CocoDetection.coco / load_coco)
    rss_before = _status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate_coco(gt, preds, iou_types=("bbox",), classwise=True, engine=args.child)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({
        "engine": args.child, "wall_s": wall, "cpu_s": cpu, "peak_rss_kib": _status_kib("VmHWM"),
        "rss_before_kib": rss_before, "stats": [metrics[f"bbox_{n}"] for n in STAT_NAMES],
        "per_class": {k: v for k, v in metrics.items() if "/" in k}, "n_gt": len(gt_dict["annotations"]),
    }))


def run_child(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", engine, "--images", str(args.images), "--classes",
               str(args.classes), "--dets", str(args.dets), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same(runs: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """Raise unless every run gives the reference's 12 numbers and per-class APs to 1e-12;
    return the largest differences (stats, per-class). They are not always bit-identical:
    pycocotools divides by ``tp + fp + np.spacing(1)``, faster-coco-eval by ``tp + fp``, so a
    precision can differ in its last bit (~1e-16)."""
    ref = runs["pycocotools"][0]
    worst_stat = worst_class = 0.0
    for engine, results in runs.items():
        for result in results:
            worst_stat = max([worst_stat] + [abs(a - b) for a, b in zip(result["stats"], ref["stats"])])
            if set(result["per_class"]) != set(ref["per_class"]):
                raise SystemExit(f"{engine} reports other classes than pycocotools")
            for key, value in result["per_class"].items():
                worst_class = max(worst_class, abs(value - ref["per_class"][key]))
    if worst_stat > 1e-12 or worst_class > 1e-12:
        raise SystemExit(f"the engines disagree: 12 stats by up to {worst_stat:g}, per-class AP by {worst_class:g}")
    return worst_stat, worst_class


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], worst: tuple[float, float],
           load: tuple[float, float]) -> str:
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_kib", "rss_before_kib")}
           for e, rs in runs.items()}
    ref, fast = med["pycocotools"], med["faster"]
    lines = [
        "# COCO evaluation: `evaluate_coco` with pycocotools vs faster-coco-eval",
        "",
        f"{args.images} images, {args.classes} classes, {runs['faster'][0]['n_gt']} ground-truth boxes, "
        f"{args.dets} detections (seed {args.seed}); bbox, classwise; median of {args.repeats} "
        f"(one process per evaluation, engines alternating).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {load[0]:.2f} before, {load[1]:.2f} after.",
        "",
        "| engine | wall s | CPU s | peak RSS MiB | RSS before eval MiB | all wall s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for engine in ENGINES:
        m = med[engine]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs[engine])
        lines.append(f"| {engine} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_kib'] / 1024:.0f} | "
                     f"{m['rss_before_kib'] / 1024:.0f} | {walls} |")
    lines += [
        "",
        f"Speedup (median wall): **{ref['wall_s'] / fast['wall_s']:.1f}x**; CPU time: "
        f"{ref['cpu_s'] / fast['cpu_s']:.1f}x. Largest difference between the engines: {worst[0]:.1e} in the 12 "
        f"numbers, {worst[1]:.1e} in per-class AP. bbox_mAP = {runs['faster'][0]['stats'][0]:.6f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dets", type=int, default=None, help="detections in all (default: 100 per image)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dets is None:
        args.dets = 100 * args.images
    if args.child:
        child(args)
        return
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    for repeat in range(args.repeats):
        for engine in ENGINES:
            result = run_child(args, engine)
            runs[engine].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {engine}: {result['wall_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU, "
                  f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB", file=sys.stderr, flush=True)
    worst = check_same(runs)
    text = report(args, runs, worst, (load_before, os.getloadavg()[0]))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
