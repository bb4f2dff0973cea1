#!/usr/bin/env bash
# The device checks in one run, for a lent CUDA machine (docs/measured/bnfuse-bench-cuda.md).
#
#   OUT=/some/folder scripts/gpu_check.sh
#
# Uses the python3 that is there (its torch, torchvision, timm, onnx); bnfuse runs from this
# checkout through PYTHONPATH, so nothing is installed.  Each step has its own time limit so the
# whole stays inside one device call; every log and table lands in $OUT.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'tf32', torch.backends.cudnn.allow_tf32)"
  $PY -c "import timm; print('timm', timm.__version__)" 2>&1 | tail -1
  $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the CI line: the default models, float32 with TF32 as PyTorch sets it (timed first, machine quiet)
timeout 150 $PY -m bnfuse_cli bench --device cuda --json "$OUT/bench_fp32.json" --markdown "$OUT/bench_fp32.md" \
  >"$OUT/bench_fp32.txt" 2>&1; echo "bench fp32 rc=$?" | tee -a "$OUT/env.txt"
# 2. half precision in channels_last, as deployed
timeout 120 $PY -m bnfuse_cli bench --device cuda --dtype float16 --channels-last \
  --json "$OUT/bench_fp16.json" --markdown "$OUT/bench_fp16.md" \
  >"$OUT/bench_fp16.txt" 2>&1; echo "bench fp16 rc=$?" | tee -a "$OUT/env.txt"
# 3. the gpu-marked tests, in parallel processes
timeout 420 $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -n 12 -rs \
  >"$OUT/gpu_tests.txt" 2>&1; echo "gpu tests rc=$?" | tee -a "$OUT/env.txt"
tail -5 "$OUT/gpu_tests.txt"
cat "$OUT/bench_fp32.md" "$OUT/bench_fp16.md" 2>/dev/null
