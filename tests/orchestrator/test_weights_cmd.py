"""Weights names through the CLI: `orch config` accepts them without torch, `orch weights list /
fetch`, and `orch submit` resolving them before anything is queued (no network: nothing queued,
exit 2; dry run: no request; cached: the job loads the file)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detection.weights import lookup
from orchestrator.cli import main
from orchestrator.config import build_experiment
from orchestrator.weights import resolve_weights, weights_requests
from orch_testing import store_untouched

HEAVY = ("torch", "torchvision", "ray", "mlflow", "submitit")
SSDLITE_COCO = lookup("ssdlite320_mobilenet_v3_large", None, "model.weights", "COCO_V1")


@pytest.fixture(autouse=True)
def weights_env(tmp_path, monkeypatch) -> Path:
    """An empty weights cache in tmp; no proxy, no mirror from the developer's environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                 "ORCH_WEIGHTS_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCH_WEIGHTS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- orch config: names checked, torch not loaded --------------------------------------------

def test_orch_config_checks_names_without_loading_torch(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent("""
        data: {train: {ann_file: a.json, img_dir: imgs}}
        model: {type: fasterrcnn_resnet50_fpn, weights: COCO_V1, backbone_weights: ResNet50_Weights.IMAGENET1K_V1}
        """))
    code = textwrap.dedent(f"""
        import json, sys, time
        t0 = time.perf_counter()
        from orchestrator.cli import main
        rc = main(["config", {str(exp)!r}])
        print("@@" + json.dumps({{"rc": rc, "mods": sorted(sys.modules), "dt": time.perf_counter() - t0}}))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    data = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1][2:])
    assert data["rc"] == 0 and "weights: COCO_V1" in proc.stdout, proc.stderr
    assert not set(HEAVY) & set(data["mods"])


def test_orch_config_names_the_valid_weights_of_the_model(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text("data: {train: {ann_file: a.json, img_dir: imgs}}\nmodel: {type: fcos_resnet50_fpn}\n")
    rc, _, err = _run(capsys, "config", str(exp), "--set", "model.weights=COCO_V2")
    assert rc == 2 and err.count("\n") == 1
    assert "model.weights: 'COCO_V2' is not a weights name of model.type fcos_resnet50_fpn" in err
    assert "valid: DEFAULT (= COCO_V1), COCO_V1, or FCOS_ResNet50_FPN_Weights.<name>" in err


# --- orch weights list / fetch ----------------------------------------------------------------

def test_weights_list_shows_names_and_what_is_cached(weights_env, capsys):
    weights_env.mkdir()
    (weights_env / SSDLITE_COCO.file_name).write_bytes(b"x")
    rc, out, _ = _run(capsys, "weights", "list", "ssdlite320_mobilenet_v3_large")
    assert rc == 0
    assert f"cache: {weights_env}" in out
    assert "model.weights:" in out and "DEFAULT (= COCO_V1), COCO_V1*  [SSDLite320_MobileNet_V3_Large_Weights]" in out
    assert "model.backbone_weights:            none (a local file only)" in out  # no ImageNet file fits
    rc, out, _ = _run(capsys, "weights", "list", "fasterrcnn")
    assert "model.weights:                     none (a local file only)" in out
    assert "(resnet34): DEFAULT (= IMAGENET1K_V1), IMAGENET1K_V1  [ResNet34_Weights]" in out
    rc, out, _ = _run(capsys, "weights", "list", "fasterrcnn_mobilenet_v3_large_fpn")
    assert "DEFAULT (= IMAGENET1K_V2), IMAGENET1K_V1, IMAGENET1K_V2  [MobileNet_V3_Large_Weights]" in out
    rc, _, err = _run(capsys, "weights", "list", "yolo")
    assert rc == 2 and "'yolo' is not a known detector" in err


def test_weights_fetch_says_already_cached_with_path_and_size(make_experiment, weights_env, capsys):
    weights_env.mkdir()
    (weights_env / SSDLITE_COCO.file_name).write_bytes(b"x" * 2_500_000)
    rc, out, _ = _run(capsys, "weights", "fetch", str(make_experiment()), "--set", "model.weights=DEFAULT")
    assert rc == 0
    assert out.strip() == (f"weights: model.weights=DEFAULT ({SSDLITE_COCO.name}): already cached "
                           f"{weights_env / SSDLITE_COCO.file_name} (2.5 MB)")
    rc, out, _ = _run(capsys, "weights", "fetch", str(make_experiment()))
    assert rc == 0 and "no torchvision weights names" in out


def test_weights_fetch_without_network_is_one_line(make_experiment, weights_env, monkeypatch, capsys):
    monkeypatch.setenv("ORCH_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}/models")
    rc, out, err = _run(capsys, "weights", "fetch", str(make_experiment(**{"model.weights": "COCO_V1"})))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("orch: error: cannot download http://127.0.0.1:") and "(Connection refused)" in err
    assert not any(weights_env.iterdir())


# --- which files an experiment needs ----------------------------------------------------------

def test_grid_and_sweep_choices_each_get_their_file():
    grid = build_experiment({"model": {"type": "fasterrcnn", "backbone_weights": "DEFAULT"},
                             "grid": {"model.backbone": ["resnet18", "resnet34"]}})
    assert [e.name for _, _, e in weights_requests(grid)] == ["ResNet18_Weights.IMAGENET1K_V1",
                                                              "ResNet34_Weights.IMAGENET1K_V1"]
    sweep = build_experiment({"model": {"type": "retinanet_resnet50_fpn", "weights": "COCO_V1"},
                              "sweep": {"space": {"model.backbone_weights": {"choice": ["IMAGENET1K_V1", "DEFAULT"]},
                                                  "optim.lr": {"loguniform": [1e-4, 1e-2]}}}})
    assert sorted(e.name for _, _, e in weights_requests(sweep)) == [
        "ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"]
    assert weights_requests(build_experiment({"model": {"weights": "/data/mine.pth"}})) == []


def test_dry_run_resolution_only_reports(weights_env):
    exp = build_experiment({"model": {"weights": "COCO_V1"}})
    lines: list[str] = []
    (resolved,) = resolve_weights([exp, exp], download=False, echo=lines.append)  # one file, said once
    assert resolved.status == "missing" and resolved.path == weights_env / SSDLITE_COCO.file_name
    assert lines == [f"weights: model.weights=COCO_V1 ({SSDLITE_COCO.name}): not cached; a real submit downloads "
                     f"{SSDLITE_COCO.url} to {resolved.path}"]
    assert not weights_env.exists()


# --- orch submit -------------------------------------------------------------------------------

@pytest.mark.usefixtures("local_orch_env")
def test_submit_without_network_queues_nothing(make_experiment, tmp_path, weights_env, monkeypatch, capsys, empty_store):
    monkeypatch.setenv("ORCH_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}/models")
    exp = make_experiment(**{"model.weights": "COCO_V1"})
    rc, out, err = _run(capsys, "submit", str(exp), "--backend", "local")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert f"/models/{SSDLITE_COCO.file_name} (Connection refused)" in err
    assert f"copy {SSDLITE_COCO.file_name} into {weights_env} (the weights cache)" in err
    home = tmp_path / "home"
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())  # no job record
    assert store_untouched(tmp_path / "mlflow.db", empty_store)  # no MLflow run (the tiny experiment's store)
    assert not (tmp_path / "work").exists() and not any(weights_env.iterdir())


@pytest.fixture
def counting_mirror(monkeypatch):
    """ORCH_WEIGHTS_MIRROR pointing at an HTTP server on loopback that answers 404 and records
    every request path (the list is returned)."""
    import http.server
    import threading

    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("ORCH_WEIGHTS_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}/models")
    yield requests
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.usefixtures("local_orch_env")
def test_dry_runs_never_download(make_experiment, counting_mirror, capsys):
    exp = str(make_experiment(**{"model.weights": "COCO_V1"}))
    rc, out, err = _run(capsys, "submit", exp, "--dry-run")
    assert rc == 0 and "not cached; a real submit downloads" in err and "orchestrator.worker" in out
    rc, out, _ = _run(capsys, "kfold", exp, "--folds", "2", "--dry-run")
    assert rc == 0 and "not cached; a real submit downloads" in out
    rc, out, _ = _run(capsys, "sweep", exp, "--dry-run", "--set", "sweep={space: {optim.lr: {choice: [0.01]}}}")
    assert rc == 0 and "not cached; a real submit downloads" in out
    assert counting_mirror == []


@pytest.mark.usefixtures("local_orch_env")
def test_kfold_resolves_before_writing_anything(make_experiment, counting_mirror, tmp_path, capsys, empty_store):
    rc, out, err = _run(capsys, "kfold", str(make_experiment(**{"model.weights": "COCO_V1"})), "--folds", "2")
    assert rc == 2 and "HTTP 404" in err and err.count("\n") == 1
    assert counting_mirror == [f"/models/{SSDLITE_COCO.file_name}"]  # the mirror was asked, once
    assert not (tmp_path / "work").exists() and store_untouched(tmp_path / "mlflow.db", empty_store)


@pytest.mark.slow  # a real job: torch import, 4 iterations, MLflow (15-60 s on a 2-core machine)
@pytest.mark.usefixtures("local_orch_env")
def test_submitted_job_loads_the_cached_file(make_experiment, weights_env, capsys):
    import torch

    from detection.config import DataConfig, ModelConfig
    from detection.models import build_model
    from orchestrator.records import load_record

    weights_env.mkdir()
    coco = build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large"), 91, DataConfig(min_size=64, max_size=64))
    torch.save(coco.state_dict(), weights_env / SSDLITE_COCO.file_name)  # stands in for the 91-class COCO file
    rc, out, err = _run(capsys, "submit", str(make_experiment(**{"model.weights": "COCO_V1"})), "--wait")
    assert rc == 0, out + err
    assert f"already cached {weights_env / SSDLITE_COCO.file_name}" in err
    job_id = out.split()[1]
    log = Path(load_record(job_id).log_path).read_text()
    assert f"model.weights: {SSDLITE_COCO.name} is {weights_env / SSDLITE_COCO.file_name}" in log
    assert "tensors with other shapes not loaded" in log and "model.weights: loaded" in log
