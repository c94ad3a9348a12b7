"""Weights by name: the table matches torchvision, names resolve per model, the cache is torch's,
downloads go through a real HTTP server on loopback (once, hash-checked, mirror honoured), and a
cached file loads into a model without any download."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import logging
import os
import socket
import threading
import typing
from pathlib import Path

import pytest
import torch

from cluster.errors import ConfigError, LaunchError
from detection.config import DataConfig, ModelConfig
from detection.models import build_model
from detection.weights import (
    BACKBONE_ENUMS, DETECTOR_ENUMS, ENUMS, RESNET_ENUMS, TORCHVISION_URL, WeightsFile, is_weights_name, lookup,
    name_problem,
)
from orchestrator.downloads import cache_dir, download_url, fetch

TINY = DataConfig(min_size=64, max_size=64)


# --- the table is torchvision's -------------------------------------------------------------

def test_table_matches_the_installed_torchvision():
    import torchvision.models as tvm
    from torchvision.models import detection as tvd

    for enum_name, row in ENUMS.items():
        enum = tvm.get_weight(f"{enum_name}.DEFAULT").__class__
        assert enum.DEFAULT.name == row.default, enum_name
        assert {m.name: m.url for m in enum} == {m: f"{TORCHVISION_URL}/{f}" for m, f in row.files.items()}
    for model_type, enum_name in DETECTOR_ENUMS.items():
        assert tvm.get_model_weights(model_type).__name__ == enum_name
        # The backbone enum is the one torchvision's builder takes as weights_backbone.
        annotation = inspect.signature(getattr(tvd, model_type)).parameters["weights_backbone"].annotation
        if model_type in BACKBONE_ENUMS:
            assert BACKBONE_ENUMS[model_type] in {a.__name__ for a in typing.get_args(annotation)}, model_type
    assert set(DETECTOR_ENUMS) - set(BACKBONE_ENUMS) == {"ssdlite320_mobilenet_v3_large"}  # see BACKBONE_ENUMS
    for backbone, enum_name in RESNET_ENUMS.items():
        assert tvm.get_model_weights(backbone).__name__ == enum_name
    # Every torchvision detector with weights has a row (a new one shows up here).
    assert set(tvm.list_models(module=tvd)) - set(DETECTOR_ENUMS) <= {"keypointrcnn_resnet50_fpn",
                                                                       "maskrcnn_resnet50_fpn_v2"}


def test_cache_is_torch_hub_checkpoints_unless_orch_weights_dir(monkeypatch, tmp_path):
    for name in ("ORCH_WEIGHTS_DIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" == tmp_path / "xdg/torch/hub/checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" == tmp_path / "th/hub/checkpoints"
    monkeypatch.setenv("ORCH_WEIGHTS_DIR", str(tmp_path / "shared"))
    assert cache_dir() == tmp_path / "shared"


# --- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, is_name", [
    ("DEFAULT", True), ("COCO_V1", True), ("IMAGENET1K_FEATURES", True),
    ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", True), ("ResNet50_Weights.DEFAULT", True),
    ("weights.pth", False), ("/data/r50.pth", False), ("https://x/y.pth", False), ("", False), (None, False),
])
def test_what_is_a_weights_name(value, is_name):
    assert is_weights_name(value) == is_name


def test_a_local_file_named_like_a_weights_name_stays_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DEFAULT").write_bytes(b"x")
    assert not is_weights_name("DEFAULT")


@pytest.mark.parametrize("model_type, backbone, key, name, full", [
    ("fasterrcnn_resnet50_fpn", None, "model.weights", "COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("fasterrcnn_resnet50_fpn", None, "model.weights", "DEFAULT", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("fasterrcnn_resnet50_fpn", None, "model.weights", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
     "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("fasterrcnn_resnet50_fpn", None, "model.backbone_weights", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"),
    ("retinanet_resnet50_fpn", None, "model.backbone_weights", "ResNet50_Weights.IMAGENET1K_V1",
     "ResNet50_Weights.IMAGENET1K_V1"),
    ("ssd300_vgg16", None, "model.backbone_weights", "IMAGENET1K_FEATURES", "VGG16_Weights.IMAGENET1K_FEATURES"),
    ("fasterrcnn", "resnet18", "model.backbone_weights", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"),
    ("fasterrcnn", "resnet50", "model.backbone_weights", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"),
])
def test_names_resolve_against_the_model_types_enum(model_type, backbone, key, name, full):
    import torchvision.models as tvm

    entry = lookup(model_type, backbone, key, name)
    assert entry.name == full
    assert entry.url == tvm.get_weight(full).url
    assert entry.file_name == entry.url.rsplit("/", 1)[1] and len(entry.hash_prefix) >= 6


@pytest.mark.parametrize("model_type, backbone, key, name, parts", [
    ("fasterrcnn_resnet50_fpn", None, "model.weights", "IMAGENET1K_V1",
     ["not a weights name of model.type fasterrcnn_resnet50_fpn", "valid: DEFAULT (= COCO_V1), COCO_V1"]),
    ("fasterrcnn_resnet50_fpn", None, "model.weights", "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
     ["(FasterRCNN_ResNet50_FPN_Weights)", "FasterRCNN_ResNet50_FPN_Weights.<name>"]),
    ("fasterrcnn", "resnet50", "model.weights", "COCO_V1",
     ["torchvision has no detector weights for model.type fasterrcnn", "names exist for: fasterrcnn_resnet50_fpn"]),
    ("fasterrcnn", "resnet18", "model.backbone_weights", "IMAGENET1K_V2",
     ["with backbone resnet18", "valid: DEFAULT (= IMAGENET1K_V1), IMAGENET1K_V1,"]),
    ("fasterrcnn", None, "model.backbone_weights", "DEFAULT", ["needs model.backbone"]),
    ("ssdlite320_mobilenet_v3_large", None, "model.backbone_weights", "DEFAULT",
     ["no backbone weights that fit model.type ssdlite320_mobilenet_v3_large", "names exist for: fasterrcnn_resnet50_fpn"]),
])
def test_unknown_names_list_the_valid_ones_in_one_line(model_type, backbone, key, name, parts):
    with pytest.raises(ConfigError) as err:
        lookup(model_type, backbone, key, name)
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    for part in parts:
        assert part in message


def test_fasterrcnn_without_backbone_accepts_a_name_of_any_resnet_at_config_time():
    # A grid or sweep may still set model.backbone; each run is checked again with it.
    assert name_problem("fasterrcnn", None, "model.backbone_weights", "IMAGENET1K_V2") is None
    assert "IMAGENET1K_V3" in name_problem("fasterrcnn", None, "model.backbone_weights", "IMAGENET1K_V3")
    assert "with backbone resnet34" in name_problem("fasterrcnn", "resnet34", "model.backbone_weights", "IMAGENET1K_V2")


# --- downloads from a real HTTP server on loopback ------------------------------------------

class _Server:
    """A threaded HTTP server on 127.0.0.1 (port chosen by the OS) serving ``files`` by path and
    recording every request path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.requests.append(self.path)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy in the developer's environment must not see the loopback requests.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


PAYLOAD = b"orch test weights " * 5000  # ~90 kB: several reads, still instant


def _test_entry(base_url: str, payload: bytes = PAYLOAD, prefix: str | None = None) -> WeightsFile:
    """A test weights entry: a file name carrying the sha256 prefix of ``payload`` (the seam is
    :func:`fetch` taking the entry; torchvision's real files' hashes cannot be forged)."""
    prefix = prefix or hashlib.sha256(payload).hexdigest()[:8]
    return WeightsFile("Tiny_Weights.TEST_V1", f"{base_url}/models/tiny-{prefix}.pth")


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_once_into_the_cache(server, tmp_path):
    entry = _test_entry(server.url)
    server.files[f"/models/{entry.file_name}"] = PAYLOAD
    env = {"ORCH_WEIGHTS_DIR": str(tmp_path / "cache")}
    first = fetch(entry, environ=env, progress=False)
    assert not first.cached and first.path == tmp_path / "cache" / entry.file_name
    assert first.path.read_bytes() == PAYLOAD and first.size == len(PAYLOAD)
    umask = os.umask(0)
    os.umask(umask)
    assert first.path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others on a shared cache
    second = fetch(entry, environ=env, progress=False)
    assert second.cached and second.path == first.path
    assert server.requests == [f"/models/{entry.file_name}"]  # the second fetch asked nothing
    assert _cache_files(tmp_path / "cache") == [entry.file_name]


def test_hash_mismatch_is_one_line_and_leaves_nothing(server, tmp_path):
    entry = _test_entry(server.url, prefix="0badc0de")
    server.files[f"/models/{entry.file_name}"] = PAYLOAD
    with pytest.raises(LaunchError) as err:
        fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "cache")}, progress=False)
    message = str(err.value)
    assert "does not match the 0badc0de in its name" in message and "\n" not in message
    assert _cache_files(tmp_path / "cache") == []  # no partial or temporary file either


def test_unreachable_server_is_one_line_and_leaves_nothing(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = _test_entry(f"http://127.0.0.1:{port}")
    with pytest.raises(LaunchError) as err:
        fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "cache")}, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot download {entry.url} (Connection refused); ") and "\n" not in message
    assert "ORCH_WEIGHTS_MIRROR" in message and f"copy {entry.file_name} into {tmp_path / 'cache'}" in message
    assert _cache_files(tmp_path / "cache") == []


def test_a_transfer_cut_short_is_one_line_and_leaves_nothing(tmp_path):
    # A server that promises more bytes than it sends, then closes the connection.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + PAYLOAD[:1000])

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(LaunchError) as err:
            fetch(_test_entry(f"http://127.0.0.1:{port}"), environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "c")},
                  progress=False)
    finally:
        thread.join(5)
        listener.close()
    message = str(err.value)
    assert message.startswith("cannot download http://127.0.0.1:") and "\n" not in message
    assert "(the connection closed after 1000 of 1000000 bytes)" in message
    assert _cache_files(tmp_path / "c") == []


def test_http_error_is_one_line(server, tmp_path):
    entry = _test_entry(server.url)  # not served: 404
    with pytest.raises(LaunchError, match="HTTP 404") as err:
        fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "cache")}, progress=False)
    assert "\n" not in str(err.value) and _cache_files(tmp_path / "cache") == []


def test_mirror_replaces_the_torchvision_prefix(server, tmp_path):
    sha8 = hashlib.sha256(PAYLOAD).hexdigest()[:8]
    entry = WeightsFile("Tiny_Weights.TEST_V1", f"{TORCHVISION_URL}/tiny-{sha8}.pth")
    env = {"ORCH_WEIGHTS_DIR": str(tmp_path / "cache"), "ORCH_WEIGHTS_MIRROR": f"{server.url}/mirror/"}
    assert download_url(entry, env) == f"{server.url}/mirror/tiny-{sha8}.pth"
    assert download_url(entry, {}) == entry.url
    server.files[f"/mirror/tiny-{sha8}.pth"] = PAYLOAD
    got = fetch(entry, environ=env, progress=False)
    assert got.path.read_bytes() == PAYLOAD and server.requests == [f"/mirror/tiny-{sha8}.pth"]


def test_progress_bar_only_when_asked(server, tmp_path, capsys):
    entry = _test_entry(server.url)
    server.files[f"/models/{entry.file_name}"] = PAYLOAD
    fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "a")}, progress=False)
    assert capsys.readouterr().err == ""
    fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "b")}, progress=True)
    assert entry.file_name in capsys.readouterr().err  # tqdm's bar on stderr
    fetch(entry, environ={"ORCH_WEIGHTS_DIR": str(tmp_path / "c")})  # default: stderr is no terminal here
    assert capsys.readouterr().err == ""


# --- training loads from the cache, never downloads -----------------------------------------

@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in tmp (what training reads when no ``model.weights_dir`` is given), and
    any torch.hub download made a test failure."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    return cache


def test_cached_coco_weights_load_into_a_model_of_other_classes(offline_cache, caplog):
    model_type = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    coco = build_model(ModelConfig(type=model_type), 91, TINY)  # stands in for torchvision's 91-class file
    entry = lookup(model_type, None, "model.weights", "COCO_V1")
    torch.save(coco.state_dict(), offline_cache / entry.file_name)

    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="detection.models"):
        model = build_model(ModelConfig(type=model_type, weights="COCO_V1"), 3, TINY)
    for key, value in coco.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):  # fine-tuning froze the backbone's BatchNorm
            assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    text = caplog.text
    assert f"model.weights: {entry.name} is {offline_cache / entry.file_name}" in text
    own = len(coco.state_dict())  # the model as loaded, before its backbone's BatchNorm froze
    assert "model.weights: 4 tensors with other shapes not loaded" in text  # the class head: fine-tuning
    assert f"model.weights: loaded {own - 4}/{own} tensors" in text


def test_cached_backbone_weights_load_into_the_backbone(offline_cache):
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)  # the layout of torchvision's resnet18 file
    torch.save(resnet.state_dict(), offline_cache / lookup("fasterrcnn", "resnet18", "model.backbone_weights",
                                                           "DEFAULT").file_name)
    model = build_model(ModelConfig(type="fasterrcnn", backbone="resnet18", backbone_weights="DEFAULT"), 3, TINY)
    assert torch.equal(model.backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.backbone.body.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)


def test_mobilenet_backbone_weights_land_where_torchvision_puts_them(offline_cache):
    # torchvision's FPN body renames MobileNet's layers, so the file is placed by order. Oracle:
    # torchvision's builder makes the backbone first, so a detector built with seed 0 holds the
    # values of a standalone MobileNet built with seed 0, in the places torchvision chose.
    import torchvision

    model_type = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(mobilenet.state_dict(), offline_cache / lookup(model_type, None, "model.backbone_weights",
                                                              "IMAGENET1K_V1").file_name)
    torch.manual_seed(0)
    truth = build_model(ModelConfig(type=model_type), 3, TINY).backbone.body.state_dict()
    torch.manual_seed(1)
    fresh = build_model(ModelConfig(type=model_type), 3, TINY).backbone.body.state_dict()
    torch.manual_seed(1)
    loaded = build_model(ModelConfig(type=model_type, backbone_weights="IMAGENET1K_V1"), 3, TINY).backbone.body
    differ = [k for k in truth if not torch.equal(truth[k], fresh[k])]
    assert len(differ) > 50  # every conv of the MobileNet
    for key, value in truth.items():
        if not key.endswith("num_batches_tracked"):  # fine-tuning froze the backbone's BatchNorm
            assert torch.equal(loaded.state_dict()[key], value), key


def test_a_name_not_in_the_cache_is_one_line_and_never_downloads(offline_cache):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large", weights="DEFAULT"), 3, TINY)
    message = str(err.value)
    assert message.startswith("model.weights: weights SSDLite320_MobileNet_V3_Large_Weights.COCO_V1 are not in "
                              f"the cache {offline_cache} (ssdlite320_mobilenet_v3_large_coco-a79551df.pth); ")
    assert "run `orch weights fetch exp.yaml` on a machine with network or copy the file there" in message
    assert "\n" not in message


def test_the_cache_folder_comes_from_the_config_not_the_environment(offline_cache, tmp_path, monkeypatch):
    """Training reads no ORCH_* variable: orch submit hands the cache it filled to the job as
    model.weights_dir; $ORCH_WEIGHTS_DIR on a compute node changes nothing."""
    model_type = "fasterrcnn_mobilenet_v3_large_320_fpn"
    entry = lookup(model_type, None, "model.weights", "COCO_V1")
    shared = tmp_path / "shared"
    shared.mkdir()
    torch.save(build_model(ModelConfig(type=model_type), 91, TINY).state_dict(), shared / entry.file_name)
    monkeypatch.setenv("ORCH_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    build_model(ModelConfig(type=model_type, weights="COCO_V1", weights_dir=str(shared)), 3, TINY)
    with pytest.raises(ConfigError, match="are not in the cache"):
        build_model(ModelConfig(type=model_type, weights="COCO_V1"), 3, TINY)  # torch's cache is empty
