#!/usr/bin/env bash
# The GPU check, for anyone with one CUDA GPU (meant to take under 10 minutes; skipped where there is none):
#   1. every stage at a tiny size on the GPU, bf16 autocast and torch.compile, each stopped halfway and resumed
#      against a run without a stop (tests/test_gpu.py);
#   2. bench.py on GPT-2's size (124M, nanoGPT's batch of 8 x 1024): training tokens/s and MFU against the GPU's
#      datasheet peak (common.GPU_PEAK_TFLOPS), then sampling with and without the KV cache.
#     bash tests/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU on this machine: skipped"
    exit 0
fi
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, \
{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"

log=$(mktemp)
start=$SECONDS
if ! python -m pytest -q -s tests/test_gpu.py > "$log" 2>&1; then
    tail -n 60 "$log"
    echo "gpu_check: FAILED (the whole log: $log)"
    exit 1
fi
grep "^gpu_check:" "$log"
tail -n 1 "$log"
echo "gpu_check: stages done in $((SECONDS - start)) s"

python bench.py --what=train --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8 \
    --vocab_size=50304 --bias=False --dtype=auto --compile=True --warmup_steps=5 --train_iters=20
python bench.py --what=sample --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50257 \
    --dtype=auto --sample_batch=16 --prompt_len=32 --new_tokens=128
echo "gpu_check: done in $((SECONDS - start)) s"
