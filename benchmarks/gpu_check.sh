#!/usr/bin/env bash
# The prepared GPU measurement for issue 5: full-size SDXL architecture (random weights), 1024 px, the seed's
# settings, then without gradient checkpointing, then generation (base / LoRA unfused / fused). One script, well
# under 10 minutes on an H100/H200; prints one JSON line per measurement and appends them to $OUT/bench.jsonl.
# Usage on the device machine:  bash benchmarks/gpu_check.sh   (needs the runtime requirements installed)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
common=(--shape full --resolution 1024 --device cuda --mixed_precision fp16 --train_batch_size 1
        --gradient_accumulation_steps 3 --peak_tflops "${PEAK_TFLOPS:-790}" --json "$OUT/bench.jsonl")
# the seed's settings: checkpointing, fp16, 8-bit Adam, rank 4
python benchmarks/bench_train.py "${common[@]}" --gradient_checkpointing --use_8bit_adam --warmup 2 --steps 5
# faster where memory allows: no checkpointing
python benchmarks/bench_train.py "${common[@]}" --use_8bit_adam --warmup 2 --steps 5 --generation --gen_steps 30 --gen_images 2
