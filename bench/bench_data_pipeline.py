"""Images per second per loader worker: orch's data pipeline against torchvision's references.

Generates COCO-like data (640x480 JPEGs at quality 90 with random shapes on noisy backgrounds,
and an instances JSON), then measures, interleaved and ``--repeats`` times each:

- ``ref <preset>``: the path of torchvision's ``references/detection/train.py`` with
  ``--use-v2`` and the default ``pil`` backend, rebuilt here: ``torchvision.datasets.CocoDetection``
  (PIL decode) wrapped by ``wrap_dataset_for_transforms_v2(target_keys=boxes, labels, image_id)``,
  images without annotations removed, and ``DetectionPresetTrain``'s v2 transforms on the PIL
  image, then ``ToImage``, ``ToDtype(float, scale=True)``, ``ConvertBoundingBoxFormat(XYXY)``,
  ``SanitizeBoundingBoxes``, ``ToPureTensor``; ``lsj`` with a PIL ``FixedSizeCrop`` as theirs;
- ``orch <preset>``: ``detection.data.build_dataset`` / ``build_loader`` with
  ``data.train_pipeline: <preset>`` (torchvision decoders, v2 transforms on uint8 tensors, per
  sample seeds);
- ``orch default``: no ``train_pipeline`` (resize to 800/1333 in the loader, flip), and
  ``orch default, main``: the same as orch did it before (PIL decode, float resize).

Each variant runs through a real ``DataLoader`` with ONE worker process (so images/s = per-worker
throughput, IPC included) and in-process (workers=0, the bare CPU cost). A shared machine only
adds time, so the best of the repeats is reported. The same seed must give the same tensors: the
orch and reference outputs of each preset are compared sample by sample (JPEG decoders agree
exactly; resizes differ by their rounding).

Workers per GPU: one Faster R-CNN R50-FPN training step on a 2-image batch takes about 0.23 s on
a V100 (torchvision's published number: 0.2288 s/it, 8 V100s, 2 images per GPU) and about 0.1 s
on an A100-class GPU (the usual ~2.2x A100/V100 speed-up; not measured here), so a GPU eats about
20 images/s; the table shows how many workers of each variant that takes.

Usage:
    .venv/bin/python bench/bench_data_pipeline.py --images 300 --measure 120 --repeats 3 \\
        --out bench/results/data_pipeline.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

GPU_IMAGES_PER_S = 2 / 0.1  # Faster R-CNN R50-FPN, 2-image batch in ~0.1 s on an A100-class GPU
MEAN = (123.0, 117.0, 104.0)
CATEGORIES = ("rectangle", "ellipse", "triangle")


# --- data --------------------------------------------------------------------------------------

def make_data(out: Path, count: int, seed: int = 0) -> tuple[str, str]:
    """``count`` 640x480 JPEGs (quality 90) with 1-6 shapes each, and their COCO file."""
    rng = np.random.default_rng(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ys, xs = np.mgrid[0:480, 0:640]
    for image_id in range(1, count + 1):
        colour = rng.integers(0, 256, 3)
        tilt = rng.uniform(-0.2, 0.2, 3)
        base = colour + tilt * (xs[..., None] - 320) + rng.normal(0, 12, (480, 640, 3))
        picture = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(rng.integers(1, 7)):
            w, h = (int(v) for v in rng.integers(24, 260, 2))
            x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 480 - h))
            kind = int(rng.integers(0, 3))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            if kind == 0:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
            elif kind == 1:
                draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
            else:
                draw.polygon([(x, y + h - 1), (x + w // 2, y), (x + w - 1, y + h - 1)], fill=fill)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": kind + 1,
                                # floats, as in COCO's files (integer boxes stay integer through v2 resizes)
                                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
        name = f"{image_id:06d}.jpg"
        picture.save(img_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 640, "height": 480})
    ann_file = out / "instances.json"
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(ann_file), str(img_dir)


# --- the references' path, rebuilt ---------------------------------------------------------------

class PilFixedSizeCrop:
    """The references' lsj FixedSizeCrop on a PIL image and a v2 target: crop at most ``size``
    at one uniform offset, pad bottom/right with the mean, drop boxes left empty."""

    def __init__(self, size: int, fill=MEAN) -> None:
        self.size, self.fill = size, tuple(int(v) for v in fill)

    def __call__(self, image, target):
        from torchvision import tv_tensors
        from torchvision.transforms import functional as F

        width, height = image.size
        crop_h, crop_w = min(height, self.size), min(width, self.size)
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        if (crop_h, crop_w) != (height, width):
            r = float(torch.rand(1))
            top, left = int(max(height - self.size, 0) * r), int(max(width - self.size, 0) * r)
            image = F.crop(image, top, left, crop_h, crop_w)
            boxes[:, 0::2] = (boxes[:, 0::2] - left).clamp(0, crop_w)
            boxes[:, 1::2] = (boxes[:, 1::2] - top).clamp(0, crop_h)
            keep = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
            boxes, target = boxes[keep], {**target, "labels": target["labels"][keep]}
        if (crop_h, crop_w) != (self.size, self.size):
            image = F.pad(image, [0, 0, self.size - crop_w, self.size - crop_h], fill=self.fill)
        target = {**target, "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.size, self.size))}
        return image, target


def reference_transforms(preset: str):
    """``DetectionPresetTrain(data_augmentation=preset, backend="pil", use_v2=True)``."""
    from collections import defaultdict

    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    flip = T.RandomHorizontalFlip(p=0.5)
    steps = {
        "hflip": [flip],
        "lsj": [T.ScaleJitter(target_size=(1024, 1024), antialias=True), PilFixedSizeCrop(1024), flip],
        "multiscale": [T.RandomShortestSize(min_size=tuple(range(480, 801, 32)), max_size=1333), flip],
        "ssd": [T.RandomPhotometricDistort(), T.RandomZoomOut(fill=defaultdict(lambda: MEAN, {tv_tensors.Mask: 0})),
                T.RandomIoUCrop(), flip],
        "ssdlite": [T.RandomIoUCrop(), flip],
    }[preset]
    return T.Compose([*steps, T.ToImage(), T.ToDtype(torch.float, scale=True),
                      T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), T.SanitizeBoundingBoxes(),
                      T.ToPureTensor()])


def reference_dataset(ann_file: str, img_dir: str, preset: str):
    import contextlib
    import io

    import torchvision
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' index prints
        dataset = torchvision.datasets.CocoDetection(img_dir, ann_file, transforms=reference_transforms(preset))
    dataset = wrap_dataset_for_transforms_v2(dataset, target_keys=["boxes", "labels", "image_id"])
    with_boxes = [i for i, image_id in enumerate(dataset.ids) if dataset.coco.getAnnIds(imgIds=image_id)]
    return torch.utils.data.Subset(dataset, with_boxes)


def _collate(batch):
    return tuple(zip(*batch))


def reference_loader(dataset, workers: int, batch: int):
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset), batch, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate)


# --- orch's path -------------------------------------------------------------------------------------

def orch_config(ann_file: str, img_dir: str, pipeline, workers: int, batch: int):
    from detection.config import DataConfig, DataSplit

    return DataConfig(train=DataSplit(ann_file, img_dir), train_pipeline=pipeline, batch_size_per_gpu=batch,
                      workers_per_gpu=workers, min_size=800, max_size=1333)


def orch_main_dataset(ann_file: str, img_dir: str):
    """orch's default pipeline as it was before the v2 work: PIL decode, float resize, float
    images handed over tensor by tensor (a plain list collate, as ``reference_loader``)."""
    from detection.data.coco import CocoDetection
    from detection.data.transforms import Compose, RandomHorizontalFlip, Resize, ToTensor

    class PilCoco(CocoDetection):
        def _load_image(self, info):
            with Image.open(info["path"]) as handle:
                return handle.convert("RGB")

    return PilCoco(ann_file, img_dir, transforms=Compose([ToTensor(), Resize(800, 1333), RandomHorizontalFlip(0.5)]))


def orch_loader(dataset, ann_file: str, img_dir: str, pipeline, workers: int, batch: int):
    from detection.data import build_loader

    return build_loader(dataset, orch_config(ann_file, img_dir, pipeline, workers, batch), 0, 1, train=True, seed=0)


# --- measuring ---------------------------------------------------------------------------------------

def timed(loader, images: int) -> tuple[float, float, float]:
    """``(images/s, images per CPU-second of the workers, main-process CPU ms per image)`` of
    ``loader``, from its first batch (workers up) until ``images`` more arrived. Without workers
    the CPU figure is this process's. On a busy machine the CPU figures are the steadier ones."""
    import psutil

    me = psutil.Process()

    def cpu(procs) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    seen, start = 0, None
    iterator = iter(loader)
    for batch_images, _ in iterator:
        if start is None:
            workers = me.children(recursive=True) or [me]
            start, workers_start, main_start = time.perf_counter(), cpu(workers), cpu([me])
            continue
        seen += len(batch_images)
        if seen >= images:
            break
    wall, used, main_used = time.perf_counter() - start, cpu(workers) - workers_start, cpu([me]) - main_start
    del iterator
    return seen / wall, seen / used, main_used / seen * 1000


def compare(orch_set, fetch_other, count: int) -> dict:
    """Pixel and box differences between orch's sample ``index`` (seeded as training seeds it) and
    ``fetch_other(index, seed)``, over ``count`` samples."""
    from detection.data.samplers import SampleKey, mix_seed

    diffs, maxes, box_err, mismatched = [], [], [], 0
    for index in range(count):
        seed = mix_seed(0, 0, index)
        image, target = orch_set[SampleKey(index, seed)]
        other_image, other = fetch_other(index, seed)
        if image.shape != other_image.shape or len(target["boxes"]) != len(other["boxes"]):
            mismatched += 1  # e.g. orch redrew a crop that lost every box
            continue
        delta = (image - other_image).abs()
        diffs.append(float(delta.mean()) * 255)
        maxes.append(float(delta.max()) * 255)
        if len(target["boxes"]):
            box_err.append(float((target["boxes"] - other["boxes"].float()).abs().max()))
    return {"samples": count - mismatched, "mismatched": mismatched, "mean_abs_255": float(np.mean(diffs)),
            "max_abs_255": float(np.max(maxes)), "box_max_abs": float(np.max(box_err)) if box_err else 0.0}


def seeded_reference(ref_set):
    """``fetch(index, seed)`` of the reference dataset with torch's generator seeded as orch seeds it."""
    from detection.data.pipelines import _seeded

    def fetch(index, seed):
        with _seeded(seed):
            return ref_set[index]

    return fetch


def variants(args, ann_file: str, img_dir: str) -> dict:
    """name -> (dataset, loader factory(workers), comparator name or None, fetch for the check)."""
    from detection.data import build_dataset
    from detection.data.samplers import SampleKey

    table = {}
    for preset in args.pipelines:
        if preset == "default":
            cfg = orch_config(ann_file, img_dir, None, 0, args.batch)
            main_set = orch_main_dataset(ann_file, img_dir)
            table["orch default, main"] = (main_set, lambda w, d=main_set: reference_loader(d, w, args.batch), None, None)
            new_set = build_dataset(cfg.train, cfg, train=True)
            table["orch default"] = (new_set, lambda w, d=new_set: orch_loader(d, ann_file, img_dir, None, w, args.batch),
                                     "orch default, main", lambda i, s, d=main_set: d[SampleKey(i, s)])
            continue
        ref_set = reference_dataset(ann_file, img_dir, preset)
        table[f"ref {preset}"] = (ref_set, lambda w, d=ref_set: reference_loader(d, w, args.batch), None, None)
        cfg = orch_config(ann_file, img_dir, preset, 0, args.batch)
        orch_set = build_dataset(cfg.train, cfg, train=True)
        table[f"orch {preset}"] = (orch_set, lambda w, d=orch_set, p=preset: orch_loader(d, ann_file, img_dir, p, w, args.batch),
                                   f"ref {preset}", seeded_reference(ref_set))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="JPEGs to generate")
    parser.add_argument("--measure", type=int, default=120, help="images timed per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--check", type=int, default=40, help="samples compared per preset")
    parser.add_argument("--pipelines", default="default,hflip,lsj", type=lambda s: s.split(","))
    parser.add_argument("--data", default=None, help="reuse/generate the data here (default: a temp folder)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each DataLoader worker gets too

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or tmp)
        ann_file = str(data / "instances.json")
        if not (data / "instances.json").is_file():
            ann_file, _ = make_data(data, args.images)
        img_dir = str(data / "images")
        table = variants(args, ann_file, img_dir)
        rates: dict = {name: {"worker": [], "worker_cpu": [], "main_ms": [], "inline": []} for name in table}
        for _ in range(args.repeats):
            for name, (_, factory, _, _) in table.items():  # interleaved: a busy moment hits all alike
                wall, per_cpu, main_ms = timed(factory(1), args.measure)
                rates[name]["worker"].append(wall)
                rates[name]["worker_cpu"].append(per_cpu)
                rates[name]["main_ms"].append(-main_ms)  # best = least
                rates[name]["inline"].append(timed(factory(0), args.measure)[0])
        checks = {name: compare(entry[0], entry[3], args.check) for name, entry in table.items() if entry[3]}
    report = render(args, table, rates, checks)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def render(args, table, rates, checks) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    lines = [
        "# Data pipeline: images/s per loader worker, orch vs torchvision's references",
        "",
        f"`{' '.join(['bench/bench_data_pipeline.py', *sys.argv[1:]])}` -- {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} at the end, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {args.images} JPEGs 640x480 q90, batch {args.batch}, best of "
        f"{args.repeats} repeats of {args.measure} images per variant and mode.",
        "",
        "img/s, 1 worker: wall clock through a DataLoader with one worker process; img / worker CPU-s:",
        "images per CPU-second that worker used (steadier on a busy machine); main CPU ms/img: what the",
        "training process spends per image receiving it (and, for orch, making it float); in-process:",
        "workers=0, wall clock.",
        "",
        "| variant | img/s, 1 worker | img / worker CPU-s | main CPU ms/img | img/s, in-process | vs | "
        f"speed-up (wall) | speed-up (CPU) | workers for {GPU_IMAGES_PER_S:.0f} img/s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, (_, _, against, _) in table.items():
        best = {key: max(values) for key, values in rates[name].items()}
        ratios = ["", ""]
        if against:
            ratios = [f"**{best[key] / max(rates[against][key]):.2f}x**" for key in ("worker", "worker_cpu")]
        lines.append(f"| {name} | {best['worker']:.1f} | {best['worker_cpu']:.1f} | {-best['main_ms']:.1f} | {best['inline']:.1f} | "
                     f"{against or ''} | {ratios[0]} | {ratios[1]} | "
                     f"{math.ceil(GPU_IMAGES_PER_S / min(best['worker'], best['worker_cpu']))} |")
    lines += ["", "Same seed, same sample: orch against its comparator (pixels in 0..255 units).", "",
              "| variant | vs | samples | mean abs diff | max abs diff | max box diff (px) | not comparable |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, result in checks.items():
        lines.append(f"| {name} | {table[name][2]} | {result['samples']} | {result['mean_abs_255']:.3f} | "
                     f"{result['max_abs_255']:.1f} | {result['box_max_abs']:.4f} | {result['mismatched']} |")
    if "orch ssd" in checks:
        lines += ["", "ssd: the references' v2 path paints RandomZoomOut's canvas black: v2 turns their fill "
                  "`defaultdict(lambda: mean, {Mask: 0})` into a plain dict and loses the default, so images get 0. "
                  "orch paints the mean (123, 117, 104) as their v1 path and the SSD paper do; the colour "
                  "jitter differs by a few levels between PIL and tensors. The geometry (boxes) is identical."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
