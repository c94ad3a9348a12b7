"""orch submit: flag folding, backend choice, dry runs that write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import ConfigError, LaunchError
from orchestrator.config import load_experiment
from orchestrator.launch import ResourceFlags, choose_backend
from orchestrator.launch import job_spec as build_job_spec
from orchestrator.submit import resolve_experiments, submit


@pytest.fixture
def exp_file(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: sub\n"
        "data: {train: {ann_file: a.json, img_dir: imgs}}\n"
        f"runtime: {{output_dir: '{tmp_path}/work/{{name}}'}}\n"
        "tracking: {enable: false}\n"
    )
    return path


def test_flags_fold_into_resources(exp_file):
    flags = ResourceFlags(gpus=16, gpus_per_node=8, partition="dev", time="2-00:00:00", max_parallel=3,
                        no_wait=True, hosts="h1,h2", account="proj")
    (exp,) = resolve_experiments([str(exp_file)], (), flags)
    r = exp.resources
    assert (r.gpus, r.gpus_per_node, r.partition, r.time) == (16, 8, "dev", "2-00:00:00")
    assert r.local.max_parallel == 3 and r.local.queue is False
    assert r.torchrun.hosts == ("h1", "h2") and r.slurm.account == "proj"


def test_unset_flags_keep_experiment_values(exp_file):
    (exp,) = resolve_experiments([str(exp_file)], ("resources.gpus=2",), ResourceFlags())
    assert exp.resources.gpus == 2


def test_auto_backend_is_local_without_partition(exp_file):
    exp = load_experiment(exp_file)
    assert choose_backend(exp, None) == "local"
    assert choose_backend(exp, "ray") == "ray"


def test_partition_without_slurm_is_a_clear_error(exp_file, monkeypatch):
    # An empty PATH hides sinfo: the controller cannot be reached.
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    exp = load_experiment(exp_file, ("resources.partition=dev",))
    with pytest.raises(LaunchError, match="--partition dev"):
        choose_backend(exp, None)


def test_job_spec_resolves_output_dir_and_writes_config(exp_file, tmp_path):
    exp = load_experiment(exp_file)
    spec = build_job_spec(exp, "local", write=False)
    assert spec.output_dir == (tmp_path / "work" / "sub").resolve()
    assert not spec.output_dir.exists()
    spec = build_job_spec(exp, "local", write=True)
    assert spec.config_path.exists()
    assert load_experiment(spec.config_path).runtime.output_dir == str(spec.output_dir)


def test_dry_run_plan_mentions_worker_and_writes_nothing(exp_file, tmp_path):
    plan, handles = submit([str(exp_file)], (), ResourceFlags(backend="local"), dry_run=True)
    assert handles == []
    assert "orchestrator.worker" in str(plan)
    assert not (tmp_path / "work").exists()


def test_mixed_backends_refused(exp_file, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(exp_file.read_text() + "resources: {backend: ray}\n")
    with pytest.raises(ConfigError, match="different backends"):
        submit([str(exp_file), str(other)], (), ResourceFlags(), dry_run=True)


def test_impossible_local_request_writes_nothing(exp_file, tmp_path, monkeypatch):
    from cluster.errors import ClusterError

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_CPU_SLOTS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ClusterError, match="asks for 64"):
        submit([str(exp_file)], (), ResourceFlags(backend="local", gpus=64))
    assert not (tmp_path / "work").exists()
    assert not (tmp_path / "home" / "jobs").exists() or not any((tmp_path / "home" / "jobs").iterdir())
