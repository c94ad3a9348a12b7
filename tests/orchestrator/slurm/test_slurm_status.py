"""Slurm asked once for many jobs: id lists and compressed array ids (pure), and on the real
cluster one ``sacct`` (+ at most one ``squeue``) per ``orch status`` for all its jobs, none within
the poll interval (commands counted by wrapper scripts first on PATH); one ``scancel`` for an interrupted set. The array split at
MaxArraySize is in test_slurm_plan.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.launchers.slurm import state as slurm_state
from orchestrator.spec import JobState


def test_compressed_array_ids_expand():
    assert slurm_state.expand_ids("123_[1-3,7%2]") == ["123_1", "123_2", "123_3", "123_7"]
    assert slurm_state.expand_ids("123_[4]") == ["123_4"]
    assert slurm_state.expand_ids("123_4") == ["123_4"] and slurm_state.expand_ids("99") == ["99"]


def test_an_array_asked_about_by_several_tasks_is_asked_for_once():
    assert slurm_state._ask_ids(["5_0", "5_1", "5_2", "7", "8_3"]) == ["5", "7", "8_3"]


COUNTED = ("sacct", "squeue", "scontrol", "sinfo", "scancel")


def _wrappers(folder: Path, log: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name in COUNTED:
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name}" >> {log}\nexec {shutil.which(name)} "$@"\n')
        script.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_sacct_per_status_for_all_jobs(slurm_cluster, tmp_path, monkeypatch):
    from orchestrator import records
    from orchestrator.cli import main
    from orchestrator.launchers.slurm.capacity import max_array_size

    assert max_array_size(tmp_path / "cfg.json") == 1001  # the test cluster keeps Slurm's default
    assert json.loads((tmp_path / "cfg.json").read_text())["max_array_size"] == 1001
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_SLURM_POLL_S", "60")
    array = subprocess.run(["sbatch", "--parsable", "--array=0-5", "-p", "dev", "-o", "/dev/null", "--wrap", "sleep 120"],
                           capture_output=True, text=True, check=True).stdout.strip()
    single = subprocess.run(["sbatch", "--parsable", "-p", "dev", "-o", "/dev/null", "--wrap", "true"],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        ids = [f"{array}_{i}" for i in range(6)] + [single]
        made = [records.create_record(name=f"t{i}", backend="slurm", output_dir=str(tmp_path / f"o{i}"),
                                      config_path="/c.yaml", native_id=n) for i, n in enumerate(ids)]
        log = tmp_path / "calls.txt"
        monkeypatch.setenv("PATH", _wrappers(tmp_path / "bin", log))
        assert main(["status", "--json"]) == 0
        first = log.read_text().split()
        assert first.count("sacct") == 1 and first.count("squeue") <= 1 and "scontrol" not in first, first
        states = {r.native_id: r.state for r in records.list_records()}
        assert all(states[n] in (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED) for n in ids), states
        assert all(r.extra.get("state_source") in ("sacct", "squeue") for r in records.list_records()
                   if r.state is not JobState.PENDING or r.extra)
        log.write_text("")
        for _ in range(3):  # within the poll interval: answered from the cache, Slurm not asked
            assert main(["status"]) == 0
        assert log.read_text().split() == []
        # an interrupted set: one scancel for all its jobs, each recorded CANCELLED (or as ended)
        from orchestrator.jobs import cancel_jobs

        ended = cancel_jobs([r.job_id for r in made])
        assert log.read_text().split().count("scancel") == 1
        assert all(r.state in (JobState.CANCELLED, JobState.SUCCEEDED) for r in ended)
        assert [r.state for r in ended[:6]] == [JobState.CANCELLED] * 6
    finally:
        subprocess.run(["scancel", array, single], check=False)
