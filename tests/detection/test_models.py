"""The model table: every detector builds offline with the data's class count, small detectors
run at tiny sizes, and weights come from local files or the weights cache, never a download."""

from __future__ import annotations

import pytest
import torch

from cluster.errors import ConfigError
from detection.config import DataConfig, ModelConfig
from detection.models import MODELS, build_model

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


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_offline_with_dataset_classes(name, monkeypatch):
    # Any attempt to download would go through torch.hub; make it fail loudly. torchvision binds
    # torch.hub's function when first imported: import it before the patch, or it keeps the fake.
    import torchvision.models  # noqa: F401

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
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
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
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
        if not key.endswith("num_batches_tracked"):  # the backbone's BatchNorm is frozen now
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


# -- fine-tuning from pretrained weights: torchvision's layout --------------------------------
def _write_cache_file(cache, name: str, arch) -> str:
    """The cache file of torchvision weights ``name`` holding ``arch``'s tensor shapes; every value
    0.5, stored as an expanded scalar (a few bytes a tensor: the layout is compared, not values)."""
    from torchvision.models import get_weight

    path = cache / get_weight(name).url.rsplit("/", 1)[1]
    if not path.exists():
        with torch.device("meta"):
            shapes = arch().state_dict()
        torch.save({k: torch.full((), 0.5, dtype=v.dtype).expand(v.shape) if v.dtype.is_floating_point
                    else torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, path)
    return name.split(".", 1)[1]


def _layout(model) -> tuple[dict, dict]:
    """The backbone's norm layers (type, eps) and which of its parameters train."""
    norms = {n: (type(m).__name__, m.eps) for n, m in model.backbone.named_modules() if "BatchNorm" in type(m).__name__}
    return norms, {n: p.requires_grad for n, p in model.backbone.named_parameters()}


def _arch(name):
    from torchvision.models import detection as tvd, mobilenet_v3_large, resnet18, resnet50, vgg16

    return {"resnet50": resnet50, "resnet18": resnet18, "mobilenet": mobilenet_v3_large, "vgg16": vgg16,
            "ssdlite": lambda: tvd.ssdlite320_mobilenet_v3_large(num_classes=91, weights_backbone=None)}[name]


R50 = "ResNet50_Weights.IMAGENET1K_V1"
MOBILENET = "MobileNet_V3_Large_Weights.IMAGENET1K_V1"
slow = pytest.mark.slow


@pytest.mark.parametrize("model_type, weights, arch, trainable", [
    ("fasterrcnn", "ResNet18_Weights.IMAGENET1K_V1", "resnet18", None),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", MOBILENET, "mobilenet", 1),
    pytest.param("fasterrcnn", "ResNet18_Weights.IMAGENET1K_V1", "resnet18", 5, marks=slow),
    pytest.param("fasterrcnn_resnet50_fpn", R50, "resnet50", None, marks=slow),
    pytest.param("fasterrcnn_resnet50_fpn", R50, "resnet50", 0, marks=slow),
    pytest.param("fasterrcnn_resnet50_fpn_v2", R50, "resnet50", None, marks=slow),
    pytest.param("retinanet_resnet50_fpn", R50, "resnet50", 1, marks=slow),
    pytest.param("retinanet_resnet50_fpn_v2", R50, "resnet50", 2, marks=slow),
    pytest.param("fcos_resnet50_fpn", R50, "resnet50", 4, marks=slow),
    pytest.param("maskrcnn_resnet50_fpn", R50, "resnet50", None, marks=slow),
    pytest.param("fasterrcnn_mobilenet_v3_large_fpn", MOBILENET, "mobilenet", None, marks=slow),
    pytest.param("fasterrcnn_mobilenet_v3_large_320_fpn", MOBILENET, "mobilenet", 6, marks=slow),
    pytest.param("ssd300_vgg16", "VGG16_Weights.IMAGENET1K_FEATURES", "vgg16", None, marks=slow),
    pytest.param("ssd300_vgg16", "VGG16_Weights.IMAGENET1K_FEATURES", "vgg16", 0, marks=slow),
    pytest.param("ssdlite320_mobilenet_v3_large", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", "ssdlite", 2,
                 marks=slow),
])
def test_finetuning_layout_is_torchvisions_with_weights(model_type, weights, arch, trainable, tmp_path, monkeypatch):
    """orch's model with a weights name equals torchvision's builder given the same weights: the
    same norm layers (FrozenBatchNorm2d or not, eps) and the same frozen parameters. Both read
    the same file from the weights cache ($TORCH_HOME for torchvision); nothing is downloaded."""
    from torchvision.models import detection as tvd, get_weight
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    member = _write_cache_file(cache, weights, _arch(arch))
    key = "weights" if arch == "ssdlite" else "backbone_weights"
    data = DataConfig(min_size=300, max_size=300)
    cfg = ModelConfig(type=model_type, backbone="resnet18" if model_type == "fasterrcnn" else None,
                      weights_dir=str(cache), trainable_backbone_layers=trainable, **{key: member})
    ours = build_model(cfg, 4, data)
    weights_enum = get_weight(weights)
    if model_type == "fasterrcnn":  # torchvision's own FPN backbone helper, pretrained
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=weights_enum,
                                       trainable_layers=3 if trainable is None else trainable)
        theirs = tvd.FasterRCNN(backbone, num_classes=4)
    elif key == "weights":
        theirs = getattr(tvd, model_type)(weights=weights_enum, trainable_backbone_layers=trainable)
    else:
        theirs = getattr(tvd, model_type)(weights_backbone=weights_enum, num_classes=4,
                                          trainable_backbone_layers=trainable)
    assert _layout(ours) == _layout(theirs)
    frozen = sum(not p.requires_grad for p in ours.backbone.parameters())
    assert frozen > 0 or trainable == MODELS[model_type].trainable_layers[0]


def test_frozen_batchnorm_holds_the_loaded_statistics_and_early_stages_stop(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    source = build_model(_cfg("fasterrcnn"), 3, TINY).backbone.body
    with torch.no_grad():  # statistics a real ImageNet file would hold, not BatchNorm's defaults
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(_cfg("fasterrcnn", backbone_weights=str(path)), 3, TINY)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer3[0].bn2, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for name in ("bn1", "layer1.0.bn1", "layer4.1.bn2"):
        frozen, loaded = body.get_submodule(name), source.get_submodule(name)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(frozen, buffer), getattr(loaded, buffer)), (name, buffer)
    trains = {name.split(".")[0]: p.requires_grad for name, p in body.named_parameters()}
    assert trains == {"conv1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())
    # Frozen statistics: the training forward leaves them as loaded (BatchNorm would update them).
    model.train()
    model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    assert torch.equal(body.bn1.running_mean, source.bn1.running_mean)


def test_from_scratch_keeps_batchnorm_and_every_stage_trains(caplog):
    model = build_model(_cfg("fasterrcnn_mobilenet_v3_large_320_fpn", trainable_backbone_layers=2), 3, TINY)
    norms = [m for m in model.backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m) is torch.nn.BatchNorm2d for m in norms)
    assert all(p.requires_grad for p in model.parameters())
    assert "trainable_backbone_layers=2 has no effect without model.weights" in caplog.text


def test_trainable_backbone_layers_out_of_range_is_one_line(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_model(_cfg("fasterrcnn"), 3, TINY).backbone.body.state_dict(), path)
    with pytest.raises(ConfigError, match=r"^model.trainable_backbone_layers must be in 0\.\.5 for fasterrcnn, got 6$"):
        build_model(_cfg("fasterrcnn", backbone_weights=str(path), trainable_backbone_layers=6), 3, TINY)


def test_checkpoint_of_a_finetuned_model_loads_for_evaluation(tmp_path):
    """orch eval / predict build the training layout without reading the weight files, so a
    checkpoint with FrozenBatchNorm2d loads exactly; one saved before (BatchNorm) loads too."""
    from types import SimpleNamespace

    from detection import build

    path = tmp_path / "resnet18.pth"
    torch.save(build_model(_cfg("fasterrcnn"), 3, TINY).backbone.body.state_dict(), path)
    model_cfg = _cfg("fasterrcnn", backbone_weights=str(path))
    trained = build_model(model_cfg, 3, TINY)
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"model": trained.state_dict()}, checkpoint)
    old = tmp_path / "old.pth"  # the same model trained in BatchNorm (before fine-tuning layouts)
    torch.save({"model": build_model(_cfg("fasterrcnn"), 3, TINY).state_dict()}, old)
    path.unlink()  # evaluation never reads the backbone file
    config = SimpleNamespace(model=model_cfg, data=TINY)  # what build_model_from_checkpoint reads
    for ckpt, reference in ((checkpoint, trained), (old, None)):
        model = build.build_model_from_checkpoint(config, str(ckpt), 3)
        assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
        if reference is not None:
            for key, value in reference.state_dict().items():
                assert torch.equal(model.state_dict()[key], value), key
