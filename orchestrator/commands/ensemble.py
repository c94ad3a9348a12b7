"""``orch ensemble``: fuse the fold models of a k-fold set into one, tuned on out-of-fold data."""

from __future__ import annotations

import click


@click.command("ensemble")
@click.argument("set_ref", metavar="SET")
@click.option("--test", "test_ann", type=click.Path(dir_okay=False), default=None,
              help="Held-out COCO file to score on (default: the set's kfold.test); needs --img-dir.")
@click.option("--img-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the test images (default: the folder the set recorded for kfold.test).")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True,
              help="hflip: each model also predicts the mirrored image; both are fused.")
@click.option("--method", type=click.Choice(["wbf", "nms", "soft-nms"]), default="wbf", show_default=True,
              help="Box fusion: weighted boxes fusion, NMS or (gaussian) soft-NMS (ensemble-boxes).")
@click.option("--point", default="best", show_default=True,
              help="Grid point to ensemble: its name (as in orch report), best, or all (one ensemble per point).")
@click.option("--weights", type=click.Choice(["equal", "oof"]), default="equal", show_default=True,
              help="Per-fold weights: all 1, or each fold's score on its own validation fold over their mean.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where the models predict (default: runtime.device).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per model call.")
def ensemble_cmd(set_ref, test_ann, img_dir, tta, method, point, weights, device, batch_size) -> int:
    """Fuse the fold models of a finished k-fold SET (its id or folder) into one ensemble.

    Each fold's best checkpoint predicts its own validation fold and the test file; the fusion
    settings (IoU and skip thresholds, WBF confidence type, soft-NMS sigma) are tuned on the
    out-of-fold predictions only, and the test file is read after tuning. Prints the test score
    of each fold, their mean and the ensemble, without and with TTA; writes the ensemble's COCO
    results and records an MLflow run under the set's parent run.

    \b
    Examples:
      orch ensemble 3f2a9c01bd                                   # WBF, test file kfold.test
      orch ensemble 3f2a9c01bd --tta hflip --method soft-nms
      orch ensemble work_dirs/exp/kfold-3f2a9c01bd --point 'lr=0.001' --test test.json --img-dir test/
      orch ensemble 3f2a9c01bd --point all                       # a grid set: one ensemble per point
    """
    from orchestrator.kfold.ensemble import run_ensembles

    run_ensembles(set_ref, point=point, test=test_ann, img_dir=img_dir, tta=tta, method=method, weights=weights,
                  device=device, batch_size=batch_size, echo=click.echo)
    return 0
