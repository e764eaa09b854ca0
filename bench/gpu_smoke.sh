#!/usr/bin/env bash
# GPU smoke test of stage 3 (< 8 minutes on one H100/H200):
#  1. the stage-3 tests, slow ones included, with CUDA visible (trainer: bf16 autocast, relabel: bf16);
#  2. bench/train.py for the Florence-2-base architecture (random init, 232M params, 768 px) on
#     CUDA next to the tiny config on CPU and CUDA: training samples/s and relabel images/s.
# Usage: bash bench/gpu_smoke.sh            (from the repository root; no network needed)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible")
p = torch.cuda.get_device_properties(0)
print(f"CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16={torch.cuda.is_bf16_supported()}")
PY

echo "== stage-3 tests on CUDA"
timeout 300 python -m pytest -q -x tests/test_loc_tokens.py tests/test_task_codec.py tests/test_trainer.py \
    tests/test_refine_loop.py -p no:cacheprovider

echo "== throughput: tiny on CPU and CUDA"
timeout 60 python bench/train.py --preset tiny --devices cpu,cuda --steps 10 --batch-size 8 --max-new-tokens 32

echo "== throughput: Florence-2-base architecture (random init) on CUDA"
timeout 120 python bench/train.py --preset base --devices cuda --steps 20 --warmup 3 --batch-size 8 \
    --images 8 --relabel-batch 16 --max-new-tokens 64 --relabel-rounds 2
