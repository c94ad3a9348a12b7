"""Prediction outside training (detection.inference): the same detections as ``orch eval``,
class names from checkpoints, sources, video I/O, drawing and atomic results files."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.errors import ConfigError, DataError
from detection.checkpoint import atomic_save, read_classes
from detection.data import build_dataset
from detection.inference import load_predictor, predict_sources, resolve_sources
from detection.inference.classes import class_map_from_ann, resolve_class_map
from detection.inference.draw import class_color, draw_detections
from detection.inference.outputs import JsonArrayWriter
from detection.inference.video import VideoReader, VideoWriter
from detection.train import evaluate_checkpoint
from orchestrator.config import load_experiment


def _by_image(preds, id_of=lambda i: i):
    """image id -> detections sorted by (category, score): orderings of equal lists may differ."""
    grouped: dict[int, list] = {}
    for p in preds:
        grouped.setdefault(id_of(p["image_id"]), []).append(p)
    return {k: sorted(v, key=lambda p: (p["category_id"], -p["score"], p["bbox"])) for k, v in grouped.items()}


def test_predicting_a_coco_split_folder_gives_orch_evals_predictions(random_detector, tmp_path):
    path, ckpt = random_detector  # detections that change with every pixel of the input
    config = load_experiment(path)
    evaluate_checkpoint(config, str(ckpt), split="val", out=str(tmp_path / "eval.json"))
    expected = json.loads((tmp_path / "eval.json").read_text())

    predictor = load_predictor(config, str(ckpt), "cpu")
    summary = predict_sources(predictor, config.data, resolve_sources([config.data.val.img_dir]), str(tmp_path / "out"),
                              batch_size=config.data.batch_size_per_gpu)
    assert summary.images == 8 and summary.frames == 0
    got = json.loads(Path(summary.results).read_text())
    info = json.loads(Path(summary.image_info).read_text())
    coco_ids = {img["file_name"]: img["id"] for img in json.loads(Path(config.data.val.ann_file).read_text())["images"]}
    ours = {img["id"]: coco_ids[img["file_name"]] for img in info["images"]}
    assert info["categories"] == [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]
    assert len(expected) == 800 and len(got) == len(expected)  # 100 per image
    want, have = _by_image(expected), _by_image(got, ours.get)
    assert want.keys() == have.keys()
    for image_id in want:
        for a, b in zip(want[image_id], have[image_id], strict=True):
            assert a["category_id"] == b["category_id"]
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    drawn = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert drawn == sorted(coco_ids)
    with Image.open(tmp_path / "out" / drawn[0]) as image:
        assert image.size == (64, 64)


def test_checkpoints_carry_their_classes_and_older_ones_still_load(tiny_checkpoint, tmp_path):
    path, ckpt = tiny_checkpoint
    assert read_classes(str(ckpt)) == (("rectangle", "ellipse", "triangle"), (1, 2, 3))
    old = tmp_path / "old.pth"  # as saved before checkpoints named their classes
    state = torch.load(ckpt, weights_only=True)
    del state["classes"]
    atomic_save(state, str(old))
    assert read_classes(str(old)) is None
    config = load_experiment(path)
    assert resolve_class_map(config, str(old)).names == ("rectangle", "ellipse", "triangle")

    elsewhere = load_experiment(path, [f"data.train.ann_file={tmp_path / 'not_here.json'}"])
    classes = resolve_class_map(elsewhere, str(ckpt))  # the annotation file is not on this machine
    assert (classes.names, classes.cat_ids, classes.source) == (("rectangle", "ellipse", "triangle"), (1, 2, 3), str(ckpt))
    with pytest.raises(DataError, match="does not name its classes"):
        resolve_class_map(elsewhere, str(old))
    fewer = load_experiment(path, ["data.train.classes=[rectangle, triangle]"])
    with pytest.raises(ConfigError, match="trained on 3 classes .* gives 2"):
        resolve_class_map(fewer, str(ckpt))


def test_the_class_map_is_the_training_datasets(shapes_data):
    from detection.config import DataConfig, DataSplit

    ann = str(shapes_data / "annotations" / "instances_train.json")
    for classes in (None, ("triangle", "rectangle")):
        split = DataSplit(ann, str(shapes_data / "train"), classes)
        dataset = build_dataset(split, DataConfig(train=split), train=True)
        mapped = class_map_from_ann(ann, classes)
        assert mapped.label_to_cat_id == dataset.label_to_cat_id and mapped.names == dataset.class_names
    with pytest.raises(DataError, match="'circle'"):
        class_map_from_ann(ann, ("circle",))


def _png(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_sources_folders_globs_files_and_their_names(tmp_path):
    _png(tmp_path / "a" / "x.png"), _png(tmp_path / "a" / "sub" / "y.jpg"), _png(tmp_path / "a" / ".hidden" / "z.png")
    _png(tmp_path / "a" / "._mac.png")
    (tmp_path / "a" / "notes.txt").write_text("no image")
    (tmp_path / "a" / "clip.mp4").write_bytes(b"")
    folder = resolve_sources([str(tmp_path / "a")])
    assert [(s.name, s.kind) for s in folder] == [("sub/y.jpg", "image"), ("x.png", "image")]  # recursive, no hidden, no video
    globbed = resolve_sources([str(tmp_path / "a" / "**" / "*.*")])
    assert [s.name for s in globbed] == ["clip.mp4", "sub/y.jpg", "x.png"]
    assert globbed[0].kind == "video"
    assert [s.name for s in resolve_sources([str(tmp_path / "a" / "sub" / "y.jpg")])] == ["y.jpg"]
    _png(tmp_path / "b" / "x.png")
    with pytest.raises(DataError, match="would both be written as x.png"):
        resolve_sources([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    for bad, message in [([str(tmp_path / "empty")], "no image file"), ([str(tmp_path / "nope.png")], "no such file"),
                         ([str(tmp_path / "a" / "*.gif")], "no image or video file matches"),
                         ([str(tmp_path / "a" / "notes.txt")], "not an image")]:
        with pytest.raises(DataError, match=message):
            resolve_sources(bad)


def _frames(n, height=48, width=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def test_video_written_and_read_frame_by_frame(tmp_path):
    with VideoWriter(str(tmp_path / "v" / "clip.mp4"), Fraction(30000, 1001), 64, 48) as writer:
        for frame in _frames(10):
            writer.write(frame)
    assert writer.codec == "libx264"
    with VideoReader(str(tmp_path / "v" / "clip.mp4")) as reader:
        assert (reader.fps, reader.width, reader.height, reader.frames) == (Fraction(30000, 1001), 64, 48, 10)
        assert sum(1 for frame in reader if frame.shape == (48, 64, 3)) == 10
    with VideoWriter(str(tmp_path / "odd.mp4"), Fraction(25), 63, 47) as odd:  # 4:2:0 H.264 needs even sizes
        for frame in _frames(3, 47, 63):
            odd.write(frame)
    with VideoReader(str(tmp_path / "odd.mp4")) as reader:
        assert odd.codec == "mpeg4" and (reader.width, reader.height, reader.frames) == (63, 47, 3)

    data = (tmp_path / "v" / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.mp4: cannot open the video"):
        VideoReader(str(tmp_path / "cut.mp4"))
    # Header first (as streaming sites write it), data cut: it opens, and fails at the first lost frame.
    import av

    with av.open(str(tmp_path / "fast.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in _frames(30):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = (tmp_path / "fast.mp4").read_bytes()
    (tmp_path / "fast_cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    with VideoReader(str(tmp_path / "fast_cut.mp4")) as reader, pytest.raises(DataError, match="fast_cut.mp4: .*frame"):
        assert reader.frames == 30
        for _ in reader:
            pass
    with pytest.raises(RuntimeError):  # a failed run leaves no file, not even a temporary one
        with VideoWriter(str(tmp_path / "w" / "fail.mp4"), Fraction(25), 64, 48) as writer:
            writer.write(_frames(1)[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "w") == []


def test_results_file_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with JsonArrayWriter(str(tmp_path / "r" / "results.json")) as results:
            results.append({"a": 1})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "r") == []
    with JsonArrayWriter(str(tmp_path / "never" / "results.json")):
        pass  # nothing appended: an empty list, folder made at the end
    assert json.loads((tmp_path / "never" / "results.json").read_text()) == []


def test_drawing_follows_the_score_threshold_and_draws_masks():
    image = torch.zeros((3, 40, 40), dtype=torch.uint8)
    masks = torch.zeros((2, 1, 40, 40))
    masks[0, 0, 5:15, 5:15] = 0.9
    masks[1, 0, 25:35, 25:35] = 0.9
    output = {"boxes": torch.tensor([[4.0, 4.0, 16.0, 16.0], [24.0, 24.0, 36.0, 36.0]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2]), "masks": masks}
    drawn = draw_detections(image, output, ("a", "b"), score_thr=0.5)
    assert drawn[:, 10, 10].sum() > 0 and drawn[:, 30, 30].sum() == 0  # the mask of the kept one only
    assert tuple(drawn[:, 4, 10].tolist()) == class_color(1)  # its box, in its class colour
    assert torch.equal(draw_detections(image, output, ("a", "b"), score_thr=0.95), image)


def test_a_mask_model_writes_segmentations(shapes_data, make_experiment, tmp_path):
    from detection import models

    path = make_experiment(**{"model.type": "maskrcnn_resnet50_fpn", "data.min_size": 64, "data.max_size": 64,
                              "model.options": {"box_score_thresh": 0.0}, "tracking.enable": False})
    config = load_experiment(path)
    torch.manual_seed(0)
    ckpt = tmp_path / "mask.pth"  # random weights are enough to exercise the mask path
    torch.save(models.build_model(config.model, 4, config.data).state_dict(), ckpt)
    predictor = load_predictor(config, str(ckpt), "cpu")
    images = resolve_sources([str(shapes_data / "val" / "000001.png")])
    summary = predict_sources(predictor, config.data, images, str(tmp_path / "out"), score_thr=0.0)
    results = json.loads(Path(summary.results).read_text())
    assert results and all(set(r["segmentation"]) == {"size", "counts"} for r in results)
    assert (tmp_path / "out" / "000001.png").is_file()


def test_progress_is_a_bar_on_a_terminal_and_quiet_lines_otherwise(caplog):
    import io
    import logging

    from detection.inference.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = Progress(4, stream=screen)
    bar.update(3), bar.update(1), bar.close()
    assert "4/4" in screen.getvalue() and bar.done == 4
    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="detection.inference"):
        lines = Progress(None, stream=plain)
        lines._last -= 60  # as if the last line was a minute ago
        lines.update(2)
    assert plain.getvalue() == "" and "predict: 2 images" in caplog.text
