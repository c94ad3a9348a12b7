"""``orch data browse``: PNG grids of samples as training draws them."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from orchestrator.cli import main


def browse(capsys, experiment, out, *args):
    code = main(["data", "browse", str(experiment), "--out", str(out), *map(str, args)])
    stdout, stderr = capsys.readouterr()
    return code, stdout.splitlines(), stderr


def test_grids_of_the_first_samples_of_epoch_0(capsys, make_experiment, tmp_path):
    from detection.data import build_dataset, build_loader
    from orchestrator.config import load_experiment

    path = make_experiment(**{"data.train_pipeline": "ssd", "runtime.seed": 3})
    code, lines, err = browse(capsys, path, tmp_path / "grids", "--n", 20)  # the set has 16 images
    assert code == 0, err
    assert lines[0] == ("data.train_pipeline: RandomPhotometricDistort() > RandomZoomOut(fill=[123.0, 117.0, 104.0]) > "
                        "RandomIoUCrop() > RandomHorizontalFlip(p=0.5) > SanitizeBoundingBoxes()")
    lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'grids' / 'browse_train_00.png'}: 16 samples")
    with Image.open(tmp_path / "grids" / "browse_train_00.png") as grid:
        assert grid.size == (4 * 324 + 4, 4 * 340 + 4) and grid.mode == "RGB"  # 4 x 4 cells of 320 + caption
    # The first sample is the first image training gets, with the same augmentation.
    exp = load_experiment(path)
    dataset = build_dataset(exp.data.train, exp.data, train=True)
    _, targets = next(iter(build_loader(dataset, exp.data, 0, 1, train=True, seed=3)))
    first = lines[0].split("(image id:boxes) ")[1].split()[0]
    assert first == f"{int(targets[0]['image_id'])}:{len(targets[0]['boxes'])}"


def test_same_seed_same_pictures_another_seed_other_draws(capsys, make_experiment, tmp_path):
    path = make_experiment(**{"data.train_pipeline": "ssd"})
    pictures = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, _, err = browse(capsys, path, tmp_path / name, "--n", 4, "--seed", seed)
        assert code == 0, err
        pictures[name] = (tmp_path / name / "browse_train_00.png").read_bytes()
    assert pictures["a"] == pictures["b"] and pictures["a"] != pictures["c"]
    code, lines, err = browse(capsys, path, tmp_path / "val", "--split", "val", "--n", 3)
    assert code == 0 and lines[0].startswith("evaluation: as decoded") and "3 samples" in lines[1]
    Image.open(io.BytesIO((tmp_path / "val" / "browse_val_00.png").read_bytes())).verify()


@pytest.mark.parametrize("args, message", [
    (["--split", "test"], "data.test is not set in the experiment; pick another --split or add data.test"),
    (["--n", "0"], "--n 0: show at least one sample"),
    (["--set", "data.train_pipeline=[{type: RandomZoomOut, fil: 1}]"], "RandomZoomOut has no argument 'fil'"),
])
def test_bad_input_is_one_line_exit_2(capsys, make_experiment, tmp_path, args, message):
    code, lines, err = browse(capsys, make_experiment(), tmp_path / "out", *args)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("orch: error: ") and message in err
