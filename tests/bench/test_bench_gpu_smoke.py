"""bench/bench_gpu.py is known to run before anyone spends GPU time on it: a CPU smoke run goes
through the whole benchmark (synthetic data, the weights stand-in in a temporary cache, the
reference loop, orch's loop with GPU options, the report), and without a GPU it says so in one
line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def _bench(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    proc = _bench(timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "no CUDA device: run this on a GPU machine (or --device cpu for a smoke run)"
    assert proc.stdout == ""


@pytest.mark.slow  # Faster R-CNN R50 on the CPU, small images: about a minute
@pytest.mark.timeout(900)
def test_cpu_smoke_run_goes_through_the_whole_benchmark(tmp_path):
    variants = ["ref", "orch", "orch_bf16_cl"]  # orch_best adds only runtime.compile (tests/detection)
    out, raw = tmp_path / "gpu.md", tmp_path / "gpu.json"
    proc = _bench("--device", "cpu", "--size", "128", "--iters", "3", "--repeats", "1", "--variants", *variants,
                  "--out", str(out), "--json", str(raw), timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(raw.read_text())
    # torchvision's builder read the stand-in backbone from the temporary cache, as orch did.
    assert result["same_init"] is True
    assert list(result["variants"]) == variants
    for key, run in result["variants"].items():
        assert len(run["losses"]) == 3 and all(map(math.isfinite, run["losses"])), key
        assert run["best_img_s"] > 0 and run["peak_mib"] is None, key  # no GPU memory on the CPU
    # orch's loop does the reference loop's arithmetic step by step (float32 on the CPU).
    assert result["variants"]["orch"]["max_rel_loss_diff_vs_first"] < 1e-5
    table = out.read_text()
    assert "| variant | best img/s | vs ref |" in table and table.count("\n| ") == 1 + len(variants)
    assert "Same initial weights in every variant: yes" in table and "finetune layout" in table
