#!/usr/bin/env bash
# The GPU benchmark as run on a lent GPU machine (one H100/H200, python3 with torch + torchvision
# and no internet): pycocotools travels as a wheel in .whl/. Writes the tables and raw results
# under $OUT (default: bench/results). Two runs: the variants without torch.compile (3 repeats),
# then compile against the reference (2 repeats: each repeat compiles afresh).
set -uo pipefail
OUT=${OUT:-bench/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
timeout ${T1:-330} python3 bench/bench_gpu.py --iters 60 --warmup 20 --repeats 3 \
  --variants ref orch orch_cudnn orch_bf16 orch_bf16_cl --out $OUT/gpu.md --json $OUT/gpu.json 2>&1 \
  | grep -v "^INFO:detection\.\(models\|finetune\|checkpoint\)" > $OUT/gpu_log.txt
echo "first run rc=$?"; grep -v "^INFO\|^WARNING" $OUT/gpu_log.txt | tail -25
timeout ${T2:-200} python3 bench/bench_gpu.py --iters 60 --warmup 30 --repeats 2 \
  --variants ref orch_best --out $OUT/gpu_compile.md 2>&1 \
  | grep -v "^INFO:detection\.\(models\|finetune\|checkpoint\)" > $OUT/gpu_compile_log.txt
echo "second run rc=$?"; grep -v "^INFO\|^WARNING" $OUT/gpu_compile_log.txt | tail -15
