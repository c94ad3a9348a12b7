"""``orch data``: dataset tools."""

from __future__ import annotations

import click


@click.group("data")
def data_group() -> None:
    """Dataset tools."""


@data_group.command("shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--train", "n_train", type=int, default=200, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=int, default=50, show_default=True, help="Validation images.")
@click.option("--test", "n_test", type=int, default=0, show_default=True,
              help="Held-out test images (annotations/instances_test.json, test/), e.g. kfold.test.")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def shapes_cmd(out: str, n_train: int, n_val: int, n_test: int, size: int, seed: int) -> None:
    """Write the synthetic shapes dataset (COCO format: images + instances JSON).

    \b
    Examples:
      orch data shapes --out data/shapes --train 400 --val 100 --seed 0
      orch data shapes --out data/shapes --train 600 --val 0 --test 200   # k-fold + held-out test
    """
    from cluster.errors import ConfigError
    from detection.shapes import make_shapes

    if n_train < 1:
        raise ConfigError("--train 0 would write a dataset nothing can train on; use 1 or more")

    paths = make_shapes(out, n_train=n_train, n_val=n_val, size=size, seed=seed, n_test=n_test)
    for split, (ann_file, img_dir) in paths.items():
        click.echo(f"{split}: {ann_file} ({img_dir})")


@data_group.command("convert")
@click.argument("src", type=click.Path())
@click.option("--from", "fmt", required=True, type=click.Choice(["voc", "yolo", "labelme"]),
              help="Format of SRC: a VOC root or folder of .xml, a YOLO folder (images/ + labels/), "
                   "a folder of LabelMe .json.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="COCO instances .json to write.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
              help="Class names, one a line: fixes the categories and their ids (1..N). "
                   "Default: YOLO's data.yaml/classes.txt, else the sorted names found.")
@click.option("--img-dir", type=click.Path(file_okay=False), default=None,
              help="Image folder; file_name is written relative to it (default: JPEGImages/, images/, SRC). "
                   "LabelMe: imagePath is looked for here (as given, then its file name) before beside the .json.")
@click.option("--split", default=None, help="VOC: convert only ImageSets/Main/<SPLIT>.txt (train, val, ...).")
@click.option("--skip-unknown", is_flag=True, help="Leave out objects whose label is not in --classes (counted).")
@click.option("--exif", type=click.Choice(["apply", "ignore"]), default="apply", show_default=True,
              help="apply: sizes and boxes of the upright picture (EXIF orientation), as annotation tools "
                   "show it and orch reads it; ignore: the stored frame (then set data.exif=ignore too).")
def convert_cmd(src: str, fmt: str, out: str, classes_file: str | None, img_dir: str | None, split: str | None,
                skip_unknown: bool, exif: str) -> None:
    """Convert Pascal VOC, YOLO or LabelMe annotations in SRC into one COCO instances file.

    \b
    Images:
      VOC      the image named by the XML file's stem (JPEGImages/<stem>.jpg or any image
               suffix), as torchvision, MMDetection and detectron2 read VOC; <filename> only
               when no image has that stem; a <filename> without suffix gets the one on disk.
      LabelMe  --img-dir/<imagePath>, --img-dir/<its name>, then imagePath beside the .json;
               a file with only imageData gets it written out as an image. __ignore__
               shapes become ignore regions (iscrowd=1) of every class; _background_ is skipped.
      YOLO     images/**/<name>.<ext> for labels/**/<name>.txt.
    Text files may start with a UTF-8 BOM.

    \b
    Examples:
      orch data convert --from voc data/VOC2007 --split trainval --out voc07_trainval.json
      orch data convert --from yolo data/my_yolo --out train.json          # classes from data.yaml
      orch data convert --from labelme data/labelme --classes classes.txt --out ann.json
    """
    from detection.data.convert import convert

    summary = convert(fmt, src, out, classes_file=classes_file, img_dir=img_dir, split=split,
                      skip_unknown=skip_unknown, exif=exif == "apply")
    click.echo(summary.text())


@data_group.command("check")
@click.argument("ann_file", type=click.Path(dir_okay=False))
@click.option("--img-dir", type=click.Path(file_okay=False), default=None,
              help="Folder the images' file_name are relative to; without it image files are not checked.")
@click.option("--fix", "fix_out", type=click.Path(dir_okay=False), default=None,
              help="Write a cleaned copy here (and the list of changes beside it, *.changes.json).")
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="Pixels a box may reach outside its image before it is an error.")
@click.option("--examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Examples shown per problem.")
@click.option("--exif", type=click.Choice(["apply", "ignore"]), default="apply", show_default=True,
              help="apply: image sizes upright by their EXIF orientation, as orch reads them (data.exif=apply); "
                   "ignore: the stored frame (data.exif=ignore).")
def check_cmd(ann_file: str, img_dir: str | None, fix_out: str | None, tolerance: float, examples: int,
              exif: str) -> int:
    """Find problems in a COCO instances file and its images; exit 1 when there are errors.

    Checks boxes (degenerate, outside the image), ids (duplicate images, annotations,
    categories; annotations of missing images or categories), image files (missing,
    unreadable, other size than the JSON says), unused or gapped categories, area (warning)
    and empty images (information). With --fix the exit status is that of the cleaned copy.

    Images are measured upright, as orch reads them (EXIF orientation applied): a JSON size
    that is the stored frame of a sideways-turned photo is named (exif_rotated), and --fix
    sets it upright and turns the image's boxes with it, unless they fit only the upright
    frame (then they were drawn upright and stay).

    \b
    Examples:
      orch data check annotations/instances_train.json --img-dir train/
      orch data check ann.json --img-dir images/ --fix ann_clean.json
    """
    from detection.data.check import check_coco

    report, found = check_coco(ann_file, img_dir, tolerance=tolerance, examples=examples, exif=exif == "apply")
    click.echo(report.table())
    if fix_out is None:
        return 1 if report.has_errors else 0

    from detection.data.fix import changes_path, write_fixed

    changes, after = write_fixed(found, fix_out, examples)
    click.echo("")
    click.echo(f"wrote {fix_out} (every change with all its ids: {changes_path(fix_out)})")
    for change in changes or ():
        click.echo(f"  {change.line()}")
    if not changes:
        click.echo("  nothing to change: the copy equals the input")
    if after.has_errors:
        click.echo(f"errors left in {fix_out} (--fix cannot decide these):")
        click.echo(after.table())
        return 1
    click.echo(f"{fix_out}: no errors left")
    return 0


from orchestrator.commands.browse import browse_cmd  # noqa: E402  (orch data browse; own module)
data_group.add_command(browse_cmd)
