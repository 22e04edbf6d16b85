#!/usr/bin/env bash
# Issue 5's CPU target in one script: diffusers' train_dreambooth_lora_sdxl.py against our trainer (defaults, and
# --fold_accumulation), interleaved, ROUNDS times, on the SDXL-shaped small model (UNet blocks (64, 128, 256),
# transformer depth (1, 1, 2)) at 256 px: batch 1, accumulation 3, checkpointing, fp32, rank 4, Min-SNR 5, the
# embedded scenes; 4 warm-up and 8 timed optimizer steps each. Prints one JSON line per run, then a summary.
#
#   DIFFUSERS_SCRIPT=/elsewhere/train_dreambooth_lora_sdxl.py PYTHON=/venv/bin/python bash benchmarks/cpu_vs_diffusers.sh
#
# diffusers' script is a copy you point at (examples/dreambooth in diffusers' repository; never committed here); it
# imports torchvision, which PyPI builds only for some torch versions (RESULTS.md says which venv ran it). WORK
# (default: a new temporary folder) holds the model, a copy of the images and diffusers' output.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-2}
: "${DIFFUSERS_SCRIPT:?set DIFFUSERS_SCRIPT to a copy of examples/dreambooth/train_dreambooth_lora_sdxl.py from diffusers}"
WORK=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1
JSON="$WORK/cpu_vs_diffusers.jsonl"
mkdir -p "$WORK/images" && rm -f "$JSON"
cp data/default/*.png "$WORK/images/"   # (diffusers' --instance_data_dir opens every file in the folder as an image)
[ -f "$WORK/small/model_index.json" ] || "$PYTHON" -m billiard_lora.tiny "$WORK/small" --shape small
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK/theirs"
  "$PYTHON" benchmarks/time_diffusers_script.py --script "$DIFFUSERS_SCRIPT" --warmup 4 --json "$JSON" -- \
    --pretrained_model_name_or_path="$WORK/small" --instance_data_dir="$WORK/images" --instance_prompt="a photo of sks" \
    --output_dir="$WORK/theirs" --resolution=256 --train_batch_size=1 --gradient_accumulation_steps=3 \
    --gradient_checkpointing --max_train_steps=12 --seed=0 --rank=4 --learning_rate=1e-4 --lr_scheduler=constant \
    --lr_warmup_steps=0 --mixed_precision=no --snr_gamma=5.0 --checkpointing_steps=10000 2>&1 | grep '^{' \
    || echo "round $round: diffusers' script failed (run it alone to see why)"
  for extra in "" "--fold_accumulation"; do
    "$PYTHON" benchmarks/bench_train.py --model "$WORK/small" --resolution 256 --gradient_checkpointing --warmup 4 \
      --steps 8 --json "$JSON" $extra 2>&1 | grep '^{' || echo "round $round: ours $extra failed"
  done
done
"$PYTHON" - "$JSON" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    name = "diffusers' script" if d.get("trainer", "").startswith("diffusers") else \
        "ours, --fold_accumulation" if d.get("fold_accumulation") else "ours, defaults"
    runs.setdefault(name, []).append(d["optimizer_steps_per_s"])
base = statistics.mean(runs.get("diffusers' script", [float("nan")]))
for name, values in runs.items():
    mean = statistics.mean(values)
    print(f"{name:<28} steps/s {', '.join(f'{v:.3f}' for v in values)}  mean {mean:.3f}  {mean / base:.2f}x")
PY
