"""``orch predict``: a checkpoint's detections on images, folders, globs and videos."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


@click.command("predict")
@experiment_argument
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to predict with (an orch checkpoint or a state dict).")
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Folder for the drawn images and videos, results.json and images.json.")
@click.option("--score-thr", type=float, default=0.3, show_default=True,
              help="Draw detections scoring at least this (results.json keeps all >= 0.001).")
@click.option("--batch-size", type=int, default=None,
              help="Images or frames per model call (default: data.batch_size_per_gpu).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where the model runs (default: runtime.device).")
@set_option
def predict_cmd(experiment: str, sources: tuple[str, ...], checkpoint: str, out_dir: str, score_thr: float,
                batch_size: int | None, device: str | None, overrides: tuple[str, ...]) -> None:
    """Draw CHECKPOINT's detections on each SOURCE and write them as COCO results.

    SOURCE is an image, a video (mp4, avi, mov, mkv, webm, ...), a folder (its images, searched
    recursively) or a quoted glob ('shots/**/*.jpg'). OUT gets each image drawn under its relative
    name, each video as an annotated <name>.mp4 (same size and frame rate), results.json (COCO
    results with the training file's category ids) and images.json (the image ids they refer to;
    video frames are named <video>#frame=NNNNNN).

    \b
    Examples:
      orch predict exp.yaml --checkpoint work_dirs/exp/checkpoints/best_bbox_mAP.pth photos/ --out preds
      orch predict exp.yaml --checkpoint best.pth 'shots/**/*.jpg' clip.mp4 --out preds --score-thr 0.5
    """
    from cluster.errors import ConfigError
    from orchestrator.config import load_experiment

    if not 0.0 <= score_thr <= 1.0:
        raise ConfigError(f"--score-thr {score_thr}: a score threshold is in [0, 1]")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give 1 or more")
    exp = load_experiment(experiment, overrides)
    from cluster.logs import setup_logging
    from detection.inference import load_predictor, predict_sources, resolve_sources  # torch loads only now
    from detection.inference.outputs import check_out_dir

    setup_logging()
    check_out_dir(out_dir)
    inputs = resolve_sources(sources)
    predictor = load_predictor(exp, checkpoint, device)
    summary = predict_sources(predictor, exp.data, inputs, out_dir, score_thr=score_thr,
                              batch_size=batch_size or exp.data.batch_size_per_gpu, workers=exp.data.workers_per_gpu)
    what = f"{summary.images} images" + (f", {summary.frames} frames of {summary.videos} videos" if summary.videos else "")
    click.echo(f"predicted {what} in {summary.seconds:.1f} s: {summary.per_second:.1f} images/s on {predictor.device}")
    click.echo(f"results: {summary.results} ({summary.detections} detections >= 0.001)")
    click.echo(f"images:  {summary.image_info}")
    click.echo(f"drawn:   {summary.out_dir}")
