"""``orch predict`` and ``orch eval --format-only`` from the command line: images, folders, globs
and a video in; drawn files and COCO results out; bad input is one line, exit 2, no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from detection.checkpoint import atomic_save
from orchestrator.cli import main as orch
from orchestrator.config import build_experiment

VAL_FILES = [f"{i:06d}.png" for i in range(1, 9)]


@pytest.fixture(scope="module")
def clip(shapes_data, tmp_path_factory) -> Path:
    """A 10-frame H.264 MP4 (5 fps) of the shapes val images."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=5)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    for i in range(10):
        frame = np.asarray(Image.open(shapes_data / "val" / VAL_FILES[i % 8]).convert("RGB"))
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def test_predict_images_a_glob_and_a_video(random_detector, shapes_data, clip, tmp_path, capsys):
    exp, ckpt = random_detector  # detections that change with every pixel
    frames = tmp_path / "frames"  # the video's frames as decoded, as PNG images
    frames.mkdir()
    with av.open(str(clip)) as video:
        for k, frame in enumerate(video.decode(video=0)):
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(frames / f"f{k:02d}.png")
    out = tmp_path / "out"
    code = orch(["predict", str(exp), "--checkpoint", str(ckpt), str(shapes_data / "val"),
                 str(frames / "f*.png"), str(clip), "--out", str(out), "--score-thr", "0.3", "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "predicted 18 images, 10 frames of 1 videos" in printed and "images/s on cpu" in printed
    frame_files = [f"f{k:02d}.png" for k in range(10)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*VAL_FILES, *frame_files, "clip.mp4",
                                                           "images.json", "results.json"])
    info = json.loads((out / "images.json").read_text())
    names = [img["file_name"] for img in info["images"]]
    assert names == [*VAL_FILES, *frame_files, *[f"clip.mp4#frame={k:06d}" for k in range(10)]]
    assert [img["id"] for img in info["images"]] == list(range(1, 29))
    assert {c["name"] for c in info["categories"]} == {"rectangle", "ellipse", "triangle"}
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == set(range(1, 29)) and {r["category_id"] for r in results} <= {1, 2, 3}
    assert min(r["score"] for r in results) >= 0.001
    # Frame k of the video has the detections of its decoded PNG f<k>.png, to the last digits.
    for k in range(10):
        from_video = sorted((r["category_id"], r["score"], r["bbox"]) for r in results if r["image_id"] == 19 + k)
        from_png = sorted((r["category_id"], r["score"], r["bbox"]) for r in results if r["image_id"] == 9 + k)
        assert len(from_video) == len(from_png) == 100
        for (cat_a, score_a, box_a), (cat_b, score_b, box_b) in zip(from_video, from_png):
            assert cat_a == cat_b and score_a == pytest.approx(score_b, abs=1e-6) and box_a == pytest.approx(box_b, abs=1e-4)
    with av.open(str(out / "clip.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.average_rate, stream.width, stream.height, stream.codec_context.name) == (5, 64, 64, "h264")
        assert sum(1 for _ in video.decode(stream)) == 10
    with Image.open(out / VAL_FILES[0]) as drawn, Image.open(shapes_data / "val" / VAL_FILES[0]) as original:
        assert drawn.size == original.size and drawn.tobytes() != original.tobytes()  # boxes drawn


def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("orch: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


def test_bad_input_is_one_line_exit_2_and_leaves_no_output(tiny_checkpoint, shapes_data, clip, tmp_path, capsys):
    exp, ckpt = tiny_checkpoint
    out = tmp_path / "out"
    base = ["predict", str(exp), "--checkpoint", str(ckpt), "--out", str(out)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.png").write_bytes(b"this is not a png")
    png = (shapes_data / "val" / VAL_FILES[0]).read_bytes()
    (bad / "cut.png").write_bytes(png[: len(png) // 2])
    data = clip.read_bytes()
    (bad / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").mkdir()
    twins = tmp_path / "twins"  # x.png and x.bmp: both would be drawn as x.png
    twins.mkdir()
    shutil.copy(shapes_data / "val" / VAL_FILES[0], twins / "x.png")
    Image.open(twins / "x.png").save(twins / "x.bmp")
    old = tmp_path / "old.pth"  # an older checkpoint (no class names), for a 2-class experiment
    state = torch.load(ckpt, weights_only=True)
    del state["classes"]
    atomic_save(state, str(old))
    cases = [
        ([str(tmp_path / "missing.png")], ["missing.png: no such file"]),
        ([str(bad / "garbage.png")], ["garbage.png: cannot read the image"]),
        ([str(bad / "cut.png")], ["cut.png: cannot decode the image"]),
        ([str(bad / "cut.png"), "--set", "data.workers_per_gpu=1"], ["cut.png: cannot decode the image"]),  # in a worker
        ([str(bad / "cut.mp4")], ["cut.mp4: cannot open the video"]),
        ([str(tmp_path / "empty")], ["no image file"]),
        ([str(twins)], ["both be drawn into"]),
        ([str(shapes_data / "val"), "--set", "model.type=fasterrcnn_mobilenet_v3_large_320_fpn"],
         ["does not fit model.type fasterrcnn_mobilenet_v3_large_320_fpn"]),
        ([str(shapes_data / "val"), "--set", "data.train.classes=[rectangle, ellipse]"], ["trained on 3 classes"]),
        ([str(shapes_data / "val"), "--set", "data.train.classes=[rectangle, ellipse]", "--checkpoint", str(old)],
         ["does not fit model.type ssdlite320_mobilenet_v3_large with 2 classes", "size mismatch"]),
        ([str(shapes_data / "val"), "--score-thr", "1.5"], ["--score-thr 1.5"]),
        ([str(shapes_data / "val"), "--checkpoint", str(tmp_path / "none.pth")], ["does not exist"]),
        ([str(shapes_data / "val"), "--batch-size", "0"], ["--batch-size 0"]),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(shapes_data / "val"), "--device", "cuda"], ["--device cuda: no CUDA GPU"]))
    cases += [
    ]
    for extra, parts in cases:
        assert orch([*base, *extra]) == 2, extra
        _one_line_error(capsys, *parts)
        assert not out.exists(), extra
    out.write_text("a file")
    assert orch([*base, str(shapes_data / "val")]) == 2
    _one_line_error(capsys, "is a file, not a folder")
    # Into the folder it reads from: refused instead of overwriting the inputs.
    inputs = tmp_path / "inputs"
    shutil.copytree(shapes_data / "val", inputs)
    assert orch([*base[:-1], str(inputs), str(inputs)]) == 2
    _one_line_error(capsys, "would overwrite the input")


def test_format_only_writes_results_without_metrics(random_detector, shapes_data, tmp_path, capsys):
    exp, ckpt = random_detector  # each image its own detections: a wrong image id shows
    scored = tmp_path / "scored.json"
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), "--out", str(scored)]) == 0
    capsys.readouterr()
    # An annotated split: the same predictions as a scored evaluation, no metrics.
    annotated = tmp_path / "annotated.json"
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), "--format-only", "--out", str(annotated)]) == 0
    printed = capsys.readouterr().out
    assert "bbox_mAP" not in printed and "no metrics" in printed
    assert _rounded(annotated) == _rounded(scored)
    assert not (tmp_path / "images.json").exists()

    # The test split as an image folder: ids 1..N in file-name order, written to images.json.
    folder = ["--split", "test", "--set", f"data.test={{img_dir: {shapes_data / 'val'}, ann_file: null}}"]
    out = tmp_path / "server" / "results.json"
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), "--format-only", "--out", str(out), *folder]) == 0
    info = json.loads((tmp_path / "server" / "images.json").read_text())
    assert [(i["id"], i["file_name"], i["width"]) for i in info["images"]] == [
        (k, name, 64) for k, name in enumerate(VAL_FILES, start=1)]
    assert {r["image_id"] for r in json.loads(out.read_text())} == set(range(1, 9))
    # With the server's image-info file: its ids (here the val file's), the predictions of eval.
    val_ann = shapes_data / "annotations" / "instances_val.json"
    out2 = tmp_path / "server2" / "results.json"
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), "--format-only", "--out", str(out2),
                 "--image-info", str(val_ann), *folder]) == 0
    assert _rounded(out2) == _rounded(scored)
    assert not (tmp_path / "server2" / "images.json").exists()
    capsys.readouterr()

    # Without --format-only there is nothing to score the folder against.
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), *folder]) == 2
    _one_line_error(capsys, "data.test has no ann_file", "--format-only")
    info_file = tmp_path / "other_info.json"
    info_file.write_text(json.dumps({"images": [{"id": 7, "file_name": "x.png"}], "categories": [{"id": 9, "name": "x"}]}))
    assert orch(["eval", str(exp), "--checkpoint", str(ckpt), "--format-only", "--image-info", str(info_file),
                 "--out", str(tmp_path / "o" / "r.json"), *folder]) == 2
    _one_line_error(capsys, "category ids [1, 2, 3]")
    assert not (tmp_path / "o").exists()


def _rounded(path: Path) -> list:
    preds = json.loads(path.read_text())
    return sorted((p["image_id"], p["category_id"], round(p["score"], 5), *[round(v, 3) for v in p["bbox"]]) for p in preds)


def test_only_the_test_split_may_lack_an_annotation_file():
    from cluster.errors import ConfigError

    exp = build_experiment({"data": {"test": {"img_dir": "images", "ann_file": None}}})
    assert exp.data.test.ann_file is None and exp.data.test.img_dir == "images"
    for mapping, key in [({"data": {"val": {"img_dir": "images"}}}, "data.val.ann_file"),
                         ({"data": {"train": {"img_dir": "images", "ann_file": ""}}}, "data.train.ann_file"),
                         ({"data": {"test": {"ann_file": "a.json"}}}, "data.test.img_dir")]:
        with pytest.raises(ConfigError, match=key):
            build_experiment(mapping, source="exp.yaml")
