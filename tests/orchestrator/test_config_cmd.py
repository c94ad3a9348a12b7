"""``orch config``: output, exit codes, derived values, and no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_experiment

REPO = Path(__file__).resolve().parents[2]
FASTER = REPO / "experiments" / "coco" / "faster_rcnn_r50_fpn_1x_coco.yaml"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["config", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def derived_of(out: str) -> dict:
    comment = "\n".join(line[2:] for line in out.splitlines() if line.startswith("# "))
    return yaml.safe_load(comment)["derived"]


def test_prints_a_reloadable_resolved_experiment(capsys, tmp_path):
    code, out, err = run(capsys, FASTER)
    assert code == 0 and err == ""
    assert "_base_" not in out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)  # the derived block is YAML comments: the output loads as is
    assert load_experiment(resolved) == load_experiment(FASTER)


def test_derived_block_for_the_recipe_and_other_gpu_counts(capsys):
    derived = derived_of(run(capsys, FASTER)[1])
    assert derived["world_size"] == 8 and derived["effective_batch"] == 16
    assert derived["lr"] == {"rule": "linear", "enabled": True, "base_lr": 0.02,
                             "base_batch_size": 16, "factor": 1.0, "lr": 0.02}
    assert derived["output_dir"] == "work_dirs/faster_rcnn_r50_fpn_1x_coco"

    derived = derived_of(run(capsys, FASTER, "--gpus", "4", "--batch-per-gpu", "1")[1])
    assert (derived["world_size"], derived["effective_batch"]) == (4, 4)
    assert derived["lr"]["lr"] == pytest.approx(0.005) and derived["lr"]["factor"] == 0.25

    derived = derived_of(run(capsys, FASTER, "--gpus", "16")[1])
    assert derived["lr"]["lr"] == pytest.approx(0.04)

    args = (FASTER, "--gpus", "4", "--set", "optim.accumulation_steps=2")
    assert derived_of(run(capsys, *args)[1])["lr"]["lr"] == pytest.approx(0.02)


def test_overrides_sqrt_rule_and_iteration_rescaling(capsys):
    code, out, _ = run(
        capsys, FASTER, "--gpus", "32", "--set", "optim.auto_scale_lr.rule=sqrt",
        "--set", "schedule.iterations=90000", "--set", "schedule.milestones=[60000,80000]",
    )
    assert code == 0
    derived = derived_of(out)
    assert derived["effective_batch"] == 64
    assert derived["lr"]["factor"] == 2.0 and derived["lr"]["lr"] == pytest.approx(0.04)
    assert derived["schedule"] == {"epochs": None, "iterations": 22500, "warmup_iters": 125,
                                   "milestones": [15000, 20000], "rescaled": True}
    assert "iterations: 90000" in out  # the experiment itself keeps the reference schedule


def test_json_output(capsys):
    code, out, _ = run(capsys, FASTER, "--json", "--gpus", "2")
    assert code == 0
    data = json.loads(out)
    assert data["experiment"]["resources"]["gpus"] == 2
    assert data["derived"]["effective_batch"] == 4
    assert data["experiment"]["model"]["type"] == "fasterrcnn_resnet50_fpn"


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.yaml"], "experiment file not found"),
        ([FASTER, "--set", "optim.auto_scale_lr.rulee=sqrt"], "did you mean 'optim.auto_scale_lr.rule'?"),
        ([FASTER, "--set", "optim.lr"], "expected KEY=VALUE"),
        ([FASTER, "--gpus", "0"], "resources.gpus: must be >= 1"),
        ([FASTER, "--set", "optim.type=adam"], "one of 'sgd', 'adamw'"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("orch: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_flag_value_is_a_usage_error(capsys):
    code, _, err = run(capsys, FASTER, "--gpus", "many")
    assert code == 2 and "many" in err


def test_help_has_examples(capsys):
    assert main(["config", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and "--gpus 4" in out and "--set" in out and "--json" in out


HEAVY = ("torch", "torchvision", "ray", "mlflow", "submitit")

PROBE = """
import sys, time, io, contextlib
start = time.perf_counter()
from orchestrator.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["config", sys.argv[1], "--gpus", "4"])
elapsed = time.perf_counter() - start
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(code, elapsed, ",".join(heavy))
""" % (HEAVY,)


def test_no_heavy_imports(tmp_path):
    # What keeps `orch config` fast; its start-up time is measured by bench/bench_cli_startup.py.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(FASTER)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    code, _, heavy = (result.stdout.split() + [""])[:3]
    assert code == "0"
    assert heavy == "", f"orch config imported {heavy}"
