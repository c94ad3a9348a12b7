"""The model table: every detector builds offline with the data's class count, small detectors
run at tiny sizes, and weights come from local files or the weights cache, never a download."""

from __future__ import annotations

import pytest
import torch

from cluster.errors import ConfigError
from detection.config import DataConfig, ModelConfig
from detection.models import MODELS, build_model, list_models

TINY = DataConfig(min_size=64, max_size=64)


def _cfg(name: str, **kw) -> ModelConfig:
    if name == "fasterrcnn":
        kw.setdefault("backbone", "resnet18")
    return ModelConfig(type=name, **kw)


def _head_classes(model) -> int:
    """The class count of a built detector, read from its classification head."""
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        return heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return getattr(head, "num_classes", None) or head.num_columns  # SSD heads call it num_columns


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_offline_with_dataset_classes(name, monkeypatch):
    # Any attempt to download would go through torch.hub; make it fail loudly.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    data = DataConfig(min_size=300, max_size=300) if name == "ssd300_vgg16" else TINY
    model = build_model(_cfg(name), num_classes=4, data_cfg=data)
    assert _head_classes(model) == 4
    if MODELS[name].fixed_size:
        assert model.transform.fixed_size == (data.min_size, data.min_size)
    else:
        assert model.transform.min_size == (data.min_size,) and model.transform.max_size == data.max_size


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn"])
def test_small_models_predict_on_tiny_images(name):
    torch.manual_seed(0)
    model = build_model(_cfg(name), num_classes=3, data_cfg=TINY).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    assert set(out) >= {"boxes", "scores", "labels"}
    if len(out["boxes"]):  # boxes are in input coordinates
        assert float(out["boxes"][:, 2].max()) <= 80.0 + 1e-3
    assert ("masks" in out) == MODELS[name].masks


def test_resnet_fpn_backbone_uses_trainable_batchnorm():
    # FrozenBatchNorm2d stays an identity from scratch; the table must build real BatchNorm.
    model = build_model(_cfg("fasterrcnn", backbone="resnet34"), 2, TINY)
    norms = [m for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, torch.nn.BatchNorm2d) for m in norms)


def test_options_reach_the_builder_and_bad_options_are_config_errors():
    model = build_model(_cfg("fasterrcnn_mobilenet_v3_large_320_fpn", options={"rpn_batch_size_per_image": 32,
                                                                                "box_batch_size_per_image": 16}), 3, TINY)
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 32
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    ssd = build_model(_cfg("ssdlite320_mobilenet_v3_large", options={"score_thresh": 0.2}), 3, TINY)
    assert ssd.score_thresh == 0.2
    with pytest.raises(ConfigError, match="model.options"):
        build_model(_cfg("fcos_resnet50_fpn", options={"no_such_knob": 1}), 3, TINY)
    with pytest.raises(ConfigError, match="model.options"):
        build_model(_cfg("ssdlite320_mobilenet_v3_large", options={"no_such_knob": 1}), 3, TINY)


@pytest.mark.parametrize("cfg, message", [
    (ModelConfig(type="yolo"), "valid: fasterrcnn_resnet50_fpn"),
    (ModelConfig(type="fasterrcnn"), "model.backbone None is not valid"),
    (ModelConfig(type="fasterrcnn", backbone="vgg11"), "valid: resnet18, resnet34, resnet50"),
    (ModelConfig(type="retinanet_resnet50_fpn", backbone="resnet18"), "only used by model.type fasterrcnn"),
])
def test_bad_model_config_is_one_clear_line(cfg, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_model(cfg, 3, TINY)
    assert "\n" not in str(err.value)


def test_ssd300_refuses_inputs_too_small_for_its_feature_maps():
    with pytest.raises(ConfigError, match="data.min_size >= 268"):
        build_model(ModelConfig(type="ssd300_vgg16"), 3, TINY)


@pytest.mark.parametrize("key", ["weights", "backbone_weights"])
def test_urls_are_refused(key):
    with pytest.raises(ConfigError, match="download") as err:
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large",
                                **{key: "https://download.pytorch.org/models/resnet18-f37072fd.pth"}), 3, TINY)
    assert f"model.{key}" in str(err.value) and "is a URL; orch does not download URLs" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type, key, value", [
    ("ssdlite320_mobilenet_v3_large", "weights", "DEFAULT"),
    ("ssdlite320_mobilenet_v3_large", "weights", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "backbone_weights", "IMAGENET1K_V1"),
])
def test_weights_names_come_from_the_cache_never_a_download(model_type, key, value, tmp_path, monkeypatch):
    # Names are accepted now; the worker only reads the cache (tests/detection/test_weights.py).
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(ConfigError, match=f"model.{key}: weights .* are not in the cache {tmp_path}") as err:
        build_model(ModelConfig(type=model_type, weights_dir=str(tmp_path), **{key: value}), 3, TINY)
    assert "\n" not in str(err.value)


def test_a_weights_name_of_another_model_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: DEFAULT \\(= COCO_V1\\), COCO_V1"):
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large", weights="IMAGENET1K_V1"), 3, TINY)


@pytest.mark.parametrize("key", ["weights", "backbone_weights"])
def test_a_directory_as_weights_is_named_a_directory(key, tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a file") as err:
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large", **{key: str(tmp_path)}), 3, TINY)
    assert f"model.{key}" in str(err.value)


@pytest.mark.parametrize("content", ["just some notes\n", '{"model": {"a": 1}}\n', ""])
def test_a_text_or_json_file_as_weights_is_one_line(content, tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large", weights=str(path)), 3, TINY)
    message = str(err.value)
    assert message.startswith(f"model.weights: {path} is not a PyTorch checkpoint (")
    assert "\n" not in message and "weights_only" not in message


def test_missing_weight_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large", weights=str(tmp_path / "nope.pth")), 3, TINY)


def test_local_weights_load_from_checkpoint_or_state_dict(tmp_path):
    torch.manual_seed(1)
    source = build_model(_cfg("fasterrcnn"), 3, TINY)
    orch_ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "iter": 5}, orch_ckpt)
    plain = tmp_path / "backbone.pth"
    torch.save(source.backbone.body.state_dict(), plain)  # like torchvision's resnet18 file

    torch.manual_seed(2)
    loaded = build_model(_cfg("fasterrcnn", weights=str(orch_ckpt)), 3, TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    torch.manual_seed(3)
    fresh = build_model(_cfg("fasterrcnn", backbone_weights=str(plain)), 3, TINY)
    assert torch.equal(fresh.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    assert not torch.equal(fresh.rpn.head.conv[0][0].weight, source.rpn.head.conv[0][0].weight)

    # A head for another class count is skipped (fine-tuning), the rest loads.
    other = build_model(_cfg("fasterrcnn", weights=str(orch_ckpt)), 6, TINY)
    assert torch.equal(other.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    assert other.roi_heads.box_predictor.cls_score.out_features == 6


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "ssd.pth"
    torch.save(build_model(ModelConfig(type="ssdlite320_mobilenet_v3_large"), 3, TINY).state_dict(), path)
    with pytest.raises(ConfigError, match="no tensor"):
        build_model(_cfg("fasterrcnn", weights=str(path)), 3, TINY)
