#!/usr/bin/env bash
# Long rows on one GPU: SmolLM2-135M (YaRN s=2, LoRA r=8 + embedding and norms, bf16) trained one optimizer step per
# length at 32k, 64k and 128k with flash attention, sequence-parallel size 1, tiled MLP off (`ours`) and on
# (`ours-tiled`), and the layers' checkpoints offloaded to CPU memory (`ours-offload`); prints the CUDA allocator's
# peak and tokens/s per step (bench/train_throughput.py) and writes JSON.
#
#   pip install -r requirements-gpu.txt      # flash-attn, once, into the project's .venv
#   bash bench/gpu_check.sh [OUT_DIR]        # default runs/bench/gpu; put the figures in docs/benchmarks.md
#
# Not yet run: no GPU was available when it was written (docs/launch.md's GPU figures are plans until it is).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/gpu}
py=${PYTHON:-.venv/bin/python}
"$py" - <<'PY'
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("error: bench/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
if importlib.util.find_spec("flash_attn") is None:
    sys.exit("error: flash-attn is not installed; pip install -r requirements-gpu.txt")
print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
mkdir -p "$out"
"$py" bench/train_throughput.py --model smollm2-135m --lengths 32768,65536,131072 --paths ours,ours-tiled,ours-offload \
    --out "$out/train_long.json" | tee "$out/train_long.txt"
