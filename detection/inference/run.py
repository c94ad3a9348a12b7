"""``orch predict``: a checkpoint's detections on images and videos, drawn and as COCO results.

Into ``out_dir`` go each image with its detections drawn (same relative name; JPEG stays JPEG,
anything else becomes PNG), each video as an annotated MP4 (``<name>.mp4``, same size and frame
rate), ``results.json`` (COCO results: ``image_id``, ``category_id`` (the training file's
category ids), ``bbox`` xywh, ``score``[, ``segmentation`` RLE]) and ``images.json`` (a COCO
image-info file: ``images`` with ``id``, ``file_name``, ``width``, ``height``, and
``categories``), which ``results.json``'s ids refer to. Image ids run 1..N in input order;
frame ``k`` of ``clip.mp4`` is the image ``clip.mp4#frame=00000k``.

``score_thr`` decides what is drawn; the results keep every detection scoring at least
:data:`~detection.inference.outputs.RESULTS_SCORE_FLOOR` (0.001), like a COCO test submission,
so mAP can be computed on them later. Everything is checked (sources, output folder, model)
before the first image; results are written atomically at the end, images as they are done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cluster.errors import ConfigError
from detection.inference.draw import draw_detections, encode_image
from detection.inference.model import Predictor
from detection.inference.outputs import JsonArrayWriter, OutputDir, detections_to_results
from detection.inference.progress import Progress
from detection.inference.sources import Source, check_image_header, image_batches, to_model_input
from detection.inference.video import VideoReader, VideoWriter

RESERVED = ("results.json", "images.json")


@dataclass(frozen=True)
class PredictSummary:
    """What a run did: counts, time, and where its files are."""

    images: int
    videos: int
    frames: int
    detections: int  # in results.json
    seconds: float
    out_dir: str
    results: str
    image_info: str

    @property
    def per_second(self) -> float:
        """Images and video frames per second (model loading excluded)."""
        return (self.images + self.frames) / self.seconds if self.seconds > 0 else 0.0


def output_name(source: Source) -> str:
    """The relative name of ``source``'s drawn copy (see the module docstring)."""
    stem, ext = os.path.splitext(source.name)
    if source.kind == "video":
        return f"{stem}.mp4"
    return source.name if ext.lower() in (".jpg", ".jpeg", ".png") else f"{stem}.png"


def predict_sources(predictor: Predictor, data_cfg: Any, sources: Sequence[Source], out_dir: str,
                    score_thr: float = 0.3, batch_size: int = 2, workers: int = 0) -> PredictSummary:
    """Predict every source into ``out_dir`` (see the module docstring); ``batch_size`` images
    or frames per model call, images decoded by ``workers`` DataLoader processes."""
    from detection.data.transforms import build_transforms

    if not 0.0 <= score_thr <= 1.0:
        raise ConfigError(f"--score-thr {score_thr}: a score threshold is in [0, 1]")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give 1 or more")
    out = OutputDir(out_dir)
    _check_names(sources, out)
    images = [s for s in sources if s.kind == "image"]
    exif = data_cfg.exif == "apply"
    for source in images:
        check_image_header(source.path, exif)
    frames_total = 0
    for source in sources:
        if source.kind == "video":
            with VideoReader(source.path) as reader:  # opens, reads the header, closes
                frames_total += reader.frames
    transforms = build_transforms(data_cfg, train=False)
    classes = predictor.classes
    run = _Run(predictor, out, score_thr, classes.names)
    progress = Progress(len(images) + frames_total or None)
    results_path, info_path = out.path("results.json"), out.path("images.json")
    try:
        with JsonArrayWriter(results_path) as results, \
                JsonArrayWriter(info_path, wrap=("images", {"categories": classes.categories})) as infos:
            run.results, run.infos = results, infos
            for batch in image_batches([s.path for s in images], transforms, batch_size, workers, exif):
                outputs = predictor([image for image, _ in batch])
                for (image, index), output in zip(batch, outputs):
                    drawn = run.record(output, images[index].name, image.mul(255).round_().to(torch.uint8))
                    out.write(output_name(images[index]), encode_image(drawn, output_name(images[index])))
                progress.update(len(batch))
            for source in sources:
                if source.kind == "video":
                    run.video(source, transforms, batch_size, progress)
    finally:
        progress.close()
    return PredictSummary(len(images), sum(s.kind == "video" for s in sources), run.frames, run.results.count,
                          progress.seconds, out_dir, results_path, info_path)


def _check_names(sources: Sequence[Source], out: OutputDir) -> None:
    """No output may overwrite an input or another output, or take the name of a results file."""
    inputs = {os.path.realpath(s.path) for s in sources}
    taken: dict[str, str] = {}
    for source in sources:
        name = output_name(source)
        if taken.setdefault(name, source.path) != source.path:
            raise ConfigError(f"{taken[name]} and {source.path} would both be drawn into {out.path(name)}; "
                              "predict them in separate runs (another --out each)")
        if name in RESERVED:
            raise ConfigError(f"{source.path}: its output {name} would replace the run's {name}; rename the file")
        if os.path.realpath(out.path(name)) in inputs:
            raise ConfigError(f"--out {out.root} would overwrite the input {out.path(name)}; give another --out folder")


class _Run:
    """The state of one run: the next image id and the two results files."""

    def __init__(self, predictor: Predictor, out: OutputDir, score_thr: float, names: Sequence[str]) -> None:
        self.predictor, self.out, self.score_thr, self.names = predictor, out, score_thr, names
        self.next_id = 1
        self.frames = 0
        self.results: Any = None
        self.infos: Any = None

    def record(self, output: dict[str, torch.Tensor], file_name: str, image: torch.Tensor) -> torch.Tensor:
        """Add one image's info and results; return the image with its detections drawn."""
        image_id, self.next_id = self.next_id, self.next_id + 1
        height, width = image.shape[-2:]
        self.infos.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        predictor = self.predictor
        for result in detections_to_results(output, image_id, predictor.classes.label_to_cat_id, predictor.masks):
            self.results.append(result)
        return draw_detections(image, output, self.names, self.score_thr)

    def video(self, source: Source, transforms: Any, batch_size: int, progress: Progress) -> None:
        """Predict the frames of one video in batches, writing the annotated video as they come."""
        with VideoReader(source.path) as reader, \
                VideoWriter(self.out.path(output_name(source)), reader.fps, reader.width, reader.height) as writer:
            batch: list[tuple[int, torch.Tensor]] = []
            for index, frame in enumerate(reader):
                batch.append((index, torch.from_numpy(frame).permute(2, 0, 1)))
                if len(batch) == batch_size:
                    self._frames(batch, source, transforms, writer, progress)
                    batch = []
            if batch:
                self._frames(batch, source, transforms, writer, progress)

    def _frames(self, batch: list[tuple[int, torch.Tensor]], source: Source, transforms: Any, writer: VideoWriter,
                progress: Progress) -> None:
        outputs = self.predictor([to_model_input(frame, transforms) for _, frame in batch])
        for (index, frame), output in zip(batch, outputs):
            drawn = self.record(output, f"{source.name}#frame={index:06d}", frame)
            writer.write(drawn.permute(1, 2, 0).numpy())
        self.frames += len(batch)
        progress.update(len(batch))
