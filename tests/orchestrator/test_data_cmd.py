"""``orch data convert`` and ``orch data check`` through the CLI: summaries, tables, exit codes
(0 fine, 1 errors found, 2 bad input with one line and nothing written), no torch."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from orchestrator.cli import main


def coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def voc_folder(root: Path) -> Path:
    """A VOC root with two images, one difficult object, and a train split of one image."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in (("000001", [("dog", 1, 1, 20, 10, 0), ("cat", 5, 5, 9, 9, 1)]), ("000002", [("cat", 3, 3, 30, 30, 0)])):
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                       f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>" for n, a, b, c, e, d in objects)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>40</width><height>32</height></size>{body}</annotation>")
        Image.new("RGB", (40, 32)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text("000002\n")
    return root


def test_convert_voc_prints_summary_and_check_passes(tmp_path, capsys):
    root = voc_folder(tmp_path / "VOC")
    out = tmp_path / "ann.json"
    assert main(["data", "convert", "--from", "voc", str(root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: 2 images, 3 annotations (1 ignore regions, iscrowd=1), 2 categories" in text
    assert f"file_name is relative to {root / 'JPEGImages'}" in text
    assert [a["bbox"] for a in coco(out).dataset["annotations"]] == [[0, 0, 20, 10], [4, 4, 5, 5], [2, 2, 28, 28]]
    assert main(["data", "check", str(out), "--img-dir", str(root / "JPEGImages")]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["data", "convert", "--from", "voc", str(root), "--split", "train", "--out", str(out)]) == 0
    assert len(coco(out).dataset["images"]) == 1


def test_convert_yolo_and_labelme(tmp_path, capsys):
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(yolo / "images" / "a.png")
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1\n")
    (yolo / "labels" / "classes.txt").write_text("car\nbike\n")
    assert main(["data", "convert", "--from", "yolo", str(yolo), "--out", str(tmp_path / "y.json")]) == 0
    assert [a["bbox"] for a in coco(tmp_path / "y.json").dataset["annotations"]] == [[40, 15, 20, 20], [20, 10, 10, 5]]

    labelme = tmp_path / "lm"
    labelme.mkdir()
    (labelme / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "imageWidth": 30, "imageHeight": 20, "shapes": [
        {"label": "car", "points": [[1, 2], [11, 12]], "shape_type": "rectangle", "group_id": None},
        {"label": "car", "points": [[1, 1], [5, 5]], "shape_type": "line", "group_id": None}]}))
    (tmp_path / "classes.txt").write_text("bike\ncar\n")
    capsys.readouterr()
    assert main(["data", "convert", "--from", "labelme", str(labelme), "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path / "l.json")]) == 0
    assert "skipped: 1 LabelMe line shapes" in capsys.readouterr().out
    data = coco(tmp_path / "l.json").dataset
    assert data["annotations"][0]["bbox"] == [1, 2, 10, 10] and data["annotations"][0]["category_id"] == 2


@pytest.mark.parametrize("args, make, message", [
    (["--from", "voc", "SRC/nope"], None, "is not a folder"),
    (["--from", "voc", "SRC"], lambda s: (s / "a.xml").write_text("<annotation>"), "broken XML"),
    (["--from", "labelme", "SRC"], lambda s: (s / "a.json").write_text("{,"), "broken JSON"),
    (["--from", "yolo", "SRC", "--classes", "SRC/c.txt"],
     lambda s: ((s / "c.txt").write_text("x\n"), Image.new("RGB", (4, 4)).save(s / "a.png"),
                (s / "a.txt").write_text("0 0.5 0.5 0.5\n")), "a.txt line 1: 4 numbers"),
    (["--from", "coco", "SRC"], None, "Invalid value for '--from'"),
])
def test_convert_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, args, make, message):
    src = tmp_path / "src"
    src.mkdir()
    if make:
        make(src)
    out = tmp_path / "out.json"
    args = [a.replace("SRC", str(src)) for a in args]
    if "yolo" in args:
        args += ["--img-dir", str(src)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["data", "convert", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orch: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file


def planted(tmp_path: Path) -> Path:
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
                       {"id": 2, "file_name": "gone.png", "width": 5, "height": 5}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 5], "area": 150, "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, -2, 3], "area": 6, "iscrowd": 0},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_check_errors_exit_1_and_fix_exit_0(tmp_path, capsys):
    path = planted(tmp_path)
    assert main(["data", "check", str(path), "--img-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for code in ("box_outside_image", "degenerate_box", "missing_image_file"):
        assert code in out
    assert "severity" in out and "3 errors" in out

    clean = tmp_path / "clean.json"
    assert main(["data", "check", str(path), "--img-dir", str(tmp_path), "--fix", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 images: image file missing (their annotations too) (ids 2)" in out
    assert "dropped 1 annotations: degenerate box (w or h <= 0, or NaN) (ids 2)" in out
    assert "changed 1 annotations: box clipped to its image (ids 1)" in out
    assert f"{clean}: no errors left" in out
    assert coco(clean).dataset["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 20.0, 5.0], "area": 100.0, "iscrowd": 0}]
    assert (tmp_path / "clean.changes.json").is_file()
    assert main(["data", "check", str(clean), "--img-dir", str(tmp_path)]) == 0


def test_check_bad_input_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "bad.json").write_text("{\"images\": 3}")
    assert main(["data", "check", str(tmp_path / "bad.json"), "--fix", str(tmp_path / "out.json")]) == 2
    assert "'images' is missing or not a list" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    assert main(["data", "check", str(tmp_path / "bad.json"), "--img-dir", str(tmp_path / "nope")]) == 2


def test_shapes_still_works(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--train", "2", "--val", "1", "--size", "32"]) == 0
    ann = tmp_path / "s" / "annotations" / "instances_train.json"
    assert main(["data", "check", str(ann), "--img-dir", str(tmp_path / "s" / "train")]) == 0


def test_convert_and_check_do_not_import_torch(tmp_path):
    root = voc_folder(tmp_path / "VOC")
    code = textwrap.dedent(f"""
        import sys
        from orchestrator.cli import main
        assert main(["data", "convert", "--from", "voc", {str(root)!r}, "--out", {str(tmp_path / 'a.json')!r}]) == 0
        assert main(["data", "check", {str(tmp_path / 'a.json')!r}, "--img-dir", {str(root / 'JPEGImages')!r},
                     "--fix", {str(tmp_path / 'b.json')!r}]) == 0
        print("@@", sorted(m for m in ("torch", "torchvision", "ray", "mlflow") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert "@@ []" in proc.stdout, proc.stdout + proc.stderr


def test_convert_help_states_the_image_rules(capsys):
    assert main(["data", "convert", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the image named by the XML file's stem (JPEGImages/<stem>.jpg or any image suffix)" in text
    assert "<filename> only when no image has that stem" in text
    assert "--exif [apply|ignore]" in text


def test_check_exif_flag_sizes_upright_or_stored(tmp_path, capsys):
    """A sideways-stored photo (EXIF orientation 6) recorded at its stored size: an exif_rotated
    error by default, nothing with --exif ignore; --fix sets it upright."""
    stored = Image.new("RGB", (30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "p.jpg", exif=exif.tobytes())
    data = {"images": [{"id": 1, "file_name": "p.jpg", "width": 30, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    assert main(["data", "check", str(tmp_path / "ann.json"), "--img-dir", str(tmp_path)]) == 1
    assert "exif_rotated" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "ann.json"), "--img-dir", str(tmp_path), "--exif", "ignore"]) == 0
    capsys.readouterr()
    fixed = tmp_path / "fixed.json"
    assert main(["data", "check", str(tmp_path / "ann.json"), "--img-dir", str(tmp_path), "--fix", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert "changed 1 annotations: box (and mask) turned upright with its image (EXIF orientation) (ids 1)" in out
    # Turned 90° clockwise: stored (x, y) -> upright (H - y, x), H = 20.
    assert coco(fixed).dataset["annotations"][0]["bbox"] == [12.0, 2.0, 5.0, 10.0]
    assert coco(fixed).dataset["images"][0]["width"] == 20
