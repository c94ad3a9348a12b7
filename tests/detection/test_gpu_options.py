"""GPU training options on the CPU: runtime.amp (false | bf16 | fp16), channels_last, compile and
cudnn_benchmark are checked at config time, recorded as params, and every code path they take in
training runs here (CPU autocast stands in for CUDA's; the CUDA-only checks are reached with the
device they test for)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.env import DistEnv
from cluster.errors import ConfigError
from detection import build
from detection.hooks import Hook
from detection.train import main
from orchestrator.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]
QUICK = {"tracking.enable": False, "data.val": None, "checkpoint.save_best": None, "schedule.iterations": 2}


class Recorder(Hook):
    """Keeps every step's loss; records the dtype and memory format of what the backbone sees
    and returns on the first step."""

    def __init__(self, amp_dtype=None):
        self.amp_dtype, self.losses, self.seen = amp_dtype, [], {}

    def before_train(self, trainer):
        if self.amp_dtype is not None:  # CPU autocast: the engine's AMP path without a GPU
            trainer.amp_dtype = self.amp_dtype

        def look(module, args, output):
            if not self.seen:
                first = next(iter(output.values())) if isinstance(output, dict) else output
                self.seen = {"input_channels_last": args[0].is_contiguous(memory_format=torch.channels_last),
                             "output_dtype": first.dtype}

        trainer.model.backbone.register_forward_hook(look)

    def after_iter(self, trainer, log):
        self.losses.append(log["loss"])


def _run(make_experiment, hook=None, **overrides):
    exp = load_experiment(make_experiment(**{**QUICK, **overrides}))
    recorder = hook or Recorder()
    main(exp, DistEnv.single(), hooks=[recorder])
    return recorder


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, mode", [(False, None), (True, "fp16"), ("fp16", "fp16"), ("bf16", "bf16")])
def test_amp_values_and_their_meaning(make_experiment, value, mode):
    exp = load_experiment(make_experiment(**{"runtime.amp": value}))
    assert exp.runtime.amp == value and build.amp_mode(exp.runtime) == mode
    # Mixed precision is CUDA's: float32 and no scaler on the CPU.
    assert build.amp_dtype(exp.runtime, torch.device("cpu")) is None
    assert build.build_scaler(exp.runtime, torch.device("cpu")) is None
    expected = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    if mode != "bf16":  # bf16 asks the GPU whether it has bfloat16 (below)
        assert build.amp_dtype(exp.runtime, torch.device("cuda", 0)) is expected


@pytest.mark.parametrize("overrides, message", [
    ({"runtime.amp": "yes"}, "runtime.amp: expected true or false or one of 'bf16', 'fp16', got string 'yes'"),
    ({"runtime.amp": "bf61"}, "runtime.amp: expected true or false or one of 'bf16', 'fp16', got string 'bf61'"),
    ({"runtime.compile": True}, "runtime.compile: true is ambiguous; use backbone"),
    ({"runtime.compile": "head"}, "runtime.compile: expected true or false or one of 'backbone', 'model'"),
    ({"runtime.channels_last": "yes"}, "runtime.channels_last: expected true or false"),
    ({"runtime.deterministic": True, "runtime.cudnn_benchmark": True},
     "runtime.cudnn_benchmark: true picks cuDNN kernels by timing them, which breaks runtime.deterministic"),
    ({"model.trainable_backbone_layers": 7},
     "model.trainable_backbone_layers: must be in 0..6 for ssdlite320_mobilenet_v3_large (6 = every backbone "
     "stage trains, null = 6), got 7"),
    ({"model.type": "fasterrcnn_resnet50_fpn", "model.trainable_backbone_layers": -1},
     "must be in 0..5 for fasterrcnn_resnet50_fpn (5 = every backbone stage trains, null = 3), got -1"),
])
def test_bad_gpu_options_are_one_line_naming_file_and_key(make_experiment, overrides, message):
    path = make_experiment(**overrides)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    text = str(err.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


def test_gpu_options_are_recorded_as_params(make_experiment):
    from detection.journal_hook import flatten_params

    exp = load_experiment(make_experiment(**{"runtime.amp": "bf16", "runtime.compile": "backbone",
                                             "runtime.channels_last": True}))
    params = flatten_params(exp)
    assert params["runtime.amp"] == "bf16" and params["runtime.compile"] == "backbone"
    assert params["runtime.channels_last"] == "True" and params["runtime.cudnn_benchmark"] == "None"


@pytest.mark.parametrize("setting, deterministic, cpu, cuda", [
    (None, False, False, True), (None, True, False, False), (False, False, False, False), (True, False, True, True),
])
def test_cudnn_benchmark_is_on_with_cuda_unless_deterministic(make_experiment, setting, deterministic, cpu, cuda):
    exp = load_experiment(make_experiment(**{"runtime.cudnn_benchmark": setting,
                                             "runtime.deterministic": deterministic}))
    assert build.cudnn_benchmark(exp.runtime, torch.device("cpu")) is cpu
    assert build.cudnn_benchmark(exp.runtime, torch.device("cuda", 0)) is cuda
    before = torch.backends.cudnn.benchmark
    try:
        build.setup_process(exp.runtime, DistEnv.single())  # the process-wide flag follows
        assert torch.backends.cudnn.benchmark is cpu
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_deterministic_flag_follows_each_config_and_costs_nothing_when_off():
    # A fresh interpreter: torch.use_deterministic_algorithms imports torch._inductor (1.4-2
    # CPU-s), which a rank that never asked for determinism must not pay.
    code = """
import sys, torch
from types import SimpleNamespace
from cluster.env import DistEnv
from detection import build
run = lambda d: SimpleNamespace(device="cpu", threads=1, seed=0, deterministic=d, cudnn_benchmark=None, amp=False)
seen = []
for d in (False, True, False):
    build.setup_process(run(d), DistEnv.single())
    seen.append((torch.are_deterministic_algorithms_enabled(), "torch._inductor" in sys.modules))
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[(False, False), (True, True), (False, True)]"


def test_bf16_on_a_gpu_without_bfloat16_is_a_config_error(make_experiment, monkeypatch):
    # No GPU here: the answer of a pre-Ampere GPU is given, to reach the check.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    runtime = load_experiment(make_experiment(**{"runtime.amp": "bf16"})).runtime
    with pytest.raises(ConfigError, match=r"^runtime.amp=bf16: Tesla V100-SXM2-16GB has no bfloat16 support "
                                          r"\(Ampere or newer GPUs do\); use runtime.amp=fp16$"):
        build.amp_dtype(runtime, torch.device("cuda", 0))


# -- training ----------------------------------------------------------------------------------
def test_amp_on_the_cpu_warns_and_trains_in_float32(make_experiment, caplog):
    with caplog.at_level(logging.WARNING):
        rec = _run(make_experiment, **{"runtime.amp": "bf16"})
    assert "runtime.amp=bf16 is for CUDA only; training in float32 on cpu" in caplog.text
    assert rec.seen["output_dtype"] == torch.float32 and all(map(math.isfinite, rec.losses))


def test_bf16_autocast_step_trains_with_finite_losses(make_experiment):
    """The engine's autocast path (CPU autocast for CUDA's): bfloat16 activations, no scaler,
    finite losses close to float32's."""
    fp32 = _run(make_experiment).losses
    rec = _run(make_experiment, Recorder(amp_dtype=torch.bfloat16))
    assert rec.seen["output_dtype"] == torch.bfloat16
    assert len(rec.losses) == 2 and all(map(math.isfinite, rec.losses))
    assert rec.losses == pytest.approx(fp32, rel=0.05)  # bfloat16 keeps ~3 significant digits


def test_channels_last_converts_model_and_input_without_a_warning(make_experiment, recwarn, caplog):
    eager = _run(make_experiment).losses
    recwarn.clear()
    with caplog.at_level(logging.WARNING):
        rec = _run(make_experiment, **{"runtime.channels_last": True})
    assert rec.seen["input_channels_last"] is True
    assert not [w for w in recwarn if "memory_format" in str(w.message) or "channels" in str(w.message)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "channels" in r.getMessage()]
    assert rec.losses == pytest.approx(eager, rel=1e-4)


def test_channels_last_weights(make_experiment):
    from detection.data import build_dataset

    exp = load_experiment(make_experiment(**{"runtime.channels_last": True}))
    classes = build_dataset(exp.data.train, exp.data, train=True).num_classes
    model = build.build_model(exp, classes, torch.device("cpu"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # Parameter names and values are those of the contiguous model: checkpoints do not change.
    assert set(model.state_dict()) == set(build.build_model(load_experiment(make_experiment()), classes,
                                                            torch.device("cpu")).state_dict())


@pytest.mark.heavy  # inductor compiles C++ for the CPU: minutes on 2 cores; `make test-heavy` runs it
@pytest.mark.timeout(1800)
def test_compile_backbone_gives_the_eager_losses(make_experiment):
    eager = _run(make_experiment).losses
    rec = _run(make_experiment, **{"runtime.compile": "backbone"})
    assert len(rec.losses) == 2 and rec.losses == pytest.approx(eager, rel=1e-4)


def test_compile_keeps_parameter_names_and_needs_a_compiler(make_experiment, monkeypatch):
    from detection.data import build_dataset

    exp = load_experiment(make_experiment(**{"runtime.compile": "backbone"}))
    classes = build_dataset(exp.data.train, exp.data, train=True).num_classes
    model = build.build_model(exp, classes, torch.device("cpu"))  # compiles lazily: no work yet
    assert not any("_orig_mod" in key for key in model.state_dict())
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"^runtime.compile on the CPU needs a C\+\+ compiler"):
        build.compile_model(model, "backbone", torch.device("cpu"))
