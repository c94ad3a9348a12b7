"""The CLI: exit codes, one-line errors, and no heavy imports on the fast paths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.cli import main

HEAVY = ("torch", "torchvision", "ray", "mlflow", "submitit")


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def exp_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "exp.yaml",
        """
        name: cli-test
        data:
          train: {ann_file: train.json, img_dir: train}
          batch_size_per_gpu: 2
        optim: {lr: 0.02, auto_scale_lr: {enable: true, base_batch_size: 16}}
        runtime: {output_dir: %s}
        """
        % (tmp_path / "out"),
    )


def _modules_after(args: list[str], cwd: Path) -> tuple[int, set[str], str, float]:
    code = textwrap.dedent(
        f"""
        import json, sys, time
        t0 = time.perf_counter()
        from orchestrator.cli import main
        rc = main({args!r})
        dt = time.perf_counter() - t0
        print("@@" + json.dumps({{"rc": rc, "mods": sorted(sys.modules), "dt": dt}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert line, proc.stdout + proc.stderr
    data = json.loads(line[-1][2:])
    return data["rc"], set(data["mods"]), proc.stdout + proc.stderr, data["dt"]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["submit", "--help"],
        ["config", "EXP"],
        ["submit", "EXP", "--dry-run", "--backend", "local"],
    ],
)
def test_fast_paths_do_not_import_heavy_modules(args, exp_file, tmp_path):
    args = [str(exp_file) if a == "EXP" else a for a in args]
    rc, mods, out, _ = _modules_after(args, tmp_path)
    assert rc == 0, out
    loaded = sorted(m for m in HEAVY if m in mods)
    # What keeps these commands fast; their start-up time is measured by bench/bench_cli_startup.py.
    assert loaded == [], f"{args} imported {loaded}"


def test_dry_run_writes_nothing(exp_file, tmp_path, capsys):
    assert main(["submit", str(exp_file), "--dry-run", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "orchestrator.worker" in out
    assert not (tmp_path / "out").exists()


def test_missing_file_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "nope.yaml" in err
    assert "Traceback" not in err


def test_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    rc = main(["config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.yaml" in err and "optim.lrr" in err and "lr" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_set_override_exit_2(exp_file, capsys):
    rc = main(["config", str(exp_file), "--set", "optim.lr"])
    assert rc == 2
    assert "optim.lr" in capsys.readouterr().err


def test_unknown_command_and_option_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["submit", "x.yaml", "--no-such-flag"]) == 2


def test_unknown_backend_exit_2(exp_file, capsys):
    assert main(["submit", str(exp_file), "--backend", "mesos"]) == 2


def test_console_script_exit_code(tmp_path):
    orch = Path(sys.executable).with_name("orch")
    proc = subprocess.run([str(orch), "config", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("orch: error:")
