#!/usr/bin/env bash
# The prepared GPU measurement for issue 5, one script, under 10 minutes on an H100/H200:
#   0. a tiny-model smoke run of our trainer on CUDA (fp16, 8-bit Adam, checkpointing) - fails fast if a CUDA path breaks
#   1. writes SDXL base's architecture at random weights (fp16) to a folder, the model both trainers load
#   2. ours at the seed's settings, 1024 px (as the trainer runs them: with CUDA graphs, on by default on one GPU)
#   3. diffusers' train_dreambooth_lora_sdxl.py, same model, same settings, same images (needs a copy: DIFFUSERS_SCRIPT)
#   4. ours at the seed's settings + --torch_compile regional (with CUDA graphs, the default)
#   5. ours at the seed's settings + --torch_compile full (the whole UNet: longer to compile)
#   6. ours with --auto_gradient_checkpointing (a trial step decides; on an H100: without checkpointing)
#   7. generation: base / LoRA unfused / fused / fused + float8 / base and fused with CUDA graphs, interleaved rounds
#   8. ours at the seed's settings + --torch_compile full --torch_compile_mode reduce-overhead (CUDA graphs)
#   9. ours at the seed's settings without checkpointing + --torch_compile regional --torch_compile_mode reduce-overhead
#      (CUDA graphs; with checkpointing they failed on an H100, and train() falls back to compiling without them)
#  10. ours at the seed's settings + --fp8_base (the UNet's frozen weights in float8: memory, and the casts' cost)
#  11. CUDA graphs, correctness: the tiny model on CUDA, 6 steps, --cuda_graphs false (twice: the noise floor) vs
#      --cuda_graphs: the LoRAs agree
#  12. ours at the seed's settings, eager: --cuda_graphs off (each kernel launched by the host)
#  13. ours at the seed's settings + --torch_compile regional, without CUDA graphs (--cuda_graphs off)
#  14. one optimizer step over SDXL's LoRA shapes (UNet + text encoders): bitsandbytes per tensor vs ours over flat
#      buffers vs torch's fused AdamW - ms, host synchronisations and kernels per step, flat == per tensor? (seconds)
#  15. ours at the seed's settings with bitsandbytes stepping per tensor (--bnb_per_tensor, as diffusers' script
#      does): against part 2, what the flat 8-bit optimizer saves per optimizer step
#  16. ours at the seed's settings with the UNet in channels-last memory format (bench_train.py --channels_last; the
#      trainer does not do this yet): against part 2, whether cuDNN's layout conversions and the copies go
#  17. as 11 with --train_text_encoder: the text encoders inside the recorded micro-step (opt-in until this passes)
#  18. the UNet alone at batch 1 and 2 (bench_unet.py), replayed as CUDA graphs: forward, frozen forward+backward
#      without LoRA, and with the LoRA -- the MFU its kernels reach with no trainer and no host time around them;
#      and two ways the trainer could run it (the LoRA's add as one addmm; norms in fp16), timed and diffed
#  19. ours at the seed's settings with the norms in float32 as autocast runs them (--half_precision_norms false, the
#      default before session 11): against part 2; VARIANT19=addmm_lora adds that way of running the LoRA
#  20. ours at the seed's settings, recomputing only every 2nd, then every 4th block (--gradient_checkpointing_interval,
#      INTERVALS20="2 4"): time and memory between part 2 (every block) and no checkpointing (part 6 on an H100)
#  21. as 11 with --lora_dropout=0.1: the masks drawn inside the recorded micro-step, the checkpoint's recompute
#      drawing them again (needs PyTorch 2.10+; opt-in until this passes): the same LoRA as eager?
#  22. generation's memory savers (bench_generation_memory.py): one 1024-px image with everything on the GPU, with
#      --vae_tiling, --cpu_offload, both, and both with --fp8_base: peak GPU memory and seconds per image
#  23. --fused_lora_ops (each adapted layer as one autograd operation; off by default until this has run): the UNet
#      alone (CUDA graphs, batch 1, kernels counted, error against float32) as autocast runs it, as the trainer
#      does by default (norms in fp16), and that with the fused operation, in channels-last, and both; then the
#      trainer at the seed's settings with --fused_lora_ops, against part 2
#  24. as 11 with --fused_lora_ops: recorded, and the same LoRA as eager with it?
#  25. as 11 on photos of three shapes with --aspect_ratio_buckets: one graph per bucket in a shared memory pool, and
#      the same LoRA as eager?
#  26. ours at the seed's settings on the embedded images cropped to three shapes, --aspect_ratio_buckets auto (832x1216,
#      1024x1024, 1216x832 at 1024 px): time and peak memory with three recorded graphs sharing a pool, against part 2
#  27. ours at the seed's settings with --fold_accumulation: the 3 micro-batches of 1 as one batch of 3 (the same
#      gradient), time and peak memory against part 2
#  28. ours at the seed's settings with --selective_checkpointing costly, then products (SELECTIVE28="costly products"):
#      each recomputed block keeps its costliest outputs; time and peak memory against part 2 (every block recomputed,
#      0.43 GiB kept, 92 % of a forward recomputed) and part 20 (every 4th block: 3.95 GiB, 24 %)
#  29. as 11 with --selective_checkpointing products, on the small model at 256 px (the tiny model's widths are too
#      small for anything to be kept): the policy inside the recorded micro-step, the same LoRA as eager?
#  30. the speed options together, for the MFU target (45 %: 60 ms per 1024-px image with checkpointing): the seed's
#      settings with --fold_accumulation --fused_lora_ops (CUDA graphs, the default), checkpointed, then with
#      --auto_gradient_checkpointing (an H100: none); COMBO30="ckpt auto" picks them, EXTRA30 adds flags to both
#  31. as 11 with session 17's training options together: --use_ema --train_text_encoder_ti (the text encoders in the
#      recorded step, frozen, with new token rows) --caption_dropout_rate 0.3 --loss_type huber: recorded, and the same
#      LoRA as eager?
#  32. as 11 with session 18's training options together: --masked_loss (half-white masks for the embedded scenes)
#      --multires_noise_iterations 6 --input_perturbation 0.1 --timestep_bias_strategy later --loraplus_lr_ratio 16:
#      recorded, and the same LoRA as eager?
#  33. (session 19) --lora_type lokr and loha on the tiny model with --cuda_graphs: the same adapter as eager? Then, time
#      left, ours at the seed's settings with a LoKr (--rank 100000 --lokr_factor 16: full factors, SimpleTuner's
#      preset) and a LoHa (rank 4), against part 2's LoRA
# Parts 4-9 are time-boxed to what is left of BUDGET_S (seconds since the start), each also to a cap of its own so
# one slow compile cannot starve the next part (CAP5=480 sets part 5's, and so on for parts 4-7 and 9).
# PARTS="1 3 4 2" runs those parts in that order (part 3 needs part 1's model folder, parts 2 and 10 use it if it is
# there; a second call can pick up what a first one left). The first 4 optimizer steps (one pass
# over the 12 embedded images: latent cache filled, compilation done) are warm-up, not timed; then STEPS (default 8)
# timed steps; on a GPU one more step runs under torch's profiler: GPU kernel time against wall time per micro-step.
# DEVICE=cpu SHAPE=tiny RES=64 runs the same parts on a CPU with the tiny model (a dry run of the script itself).
# Each prints one JSON line (also appended to $OUT/bench.jsonl; whole logs in $OUT/pN.log); a failing part does not
# stop the others.
#
# Usage on the GPU machine (no internet needed):  bash benchmarks/gpu_check.sh
#   WHEELS=.whl       folder of wheels to install first where the machine lacks them (on the lent H100: diffusers,
#                     peft, bitsandbytes, ImageHash, PyWavelets, prodigyopt; see RESULTS.md for the download command)
#   DIFFUSERS_SCRIPT  path to diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (never committed here)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/gpu_check_work}"; mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
part() { echo "=== $1 ($(date +%T))"; }
left() { echo $(( ${BUDGET_S:-560} - SECONDS )); }
upto() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # seconds for a part: at most $1, at most what is left
# run N SECONDS CMD...: CMD's whole output to $OUT/pN.log, its last lines here
# (the device tool brings back at most 8 files: bench.jsonl, the caller's own log and the logs of the parts named in
# LOGS_BACK (default 2 to 7); the others stay behind in $WORK, their numbers come back in bench.jsonl)
run() { local n=$1 t=$2; shift 2; local log="$OUT/p$n.log"
        [[ " ${LOGS_BACK:-2 3 4 5 6 7} " == *" $n "* ]] || log="$WORK/p$n.log"
        timeout "$t" "$@" > "$log" 2>&1; local rc=$?
        tr '\r' '\n' < "$log" | grep -v "it/s\]\|s/it\]\|^\s*$" | tail -4; [ $rc = 0 ] || echo "part $n: exit $rc"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"

DEV="${DEVICE:-cuda}"; SHAPE="${SHAPE:-full}"; RES="${RES:-1024}"  # DEVICE=cpu SHAPE=tiny RES=64: a dry run on a CPU
common=(--resolution "$RES" --device "$DEV" --mixed_precision fp16 --train_batch_size 1 --gradient_accumulation_steps 3
        --use_8bit_adam --warmup 4 --steps "${STEPS:-8}" --peak_tflops "${PEAK_TFLOPS:-790}" --json "$OUT/bench.jsonl")
built=(--shape "$SHAPE")  # ours-only variants: the same architecture built on the GPU (seconds, not a disk load)
model=(--model "$WORK/sdxl" --vae "$WORK/sdxl/vae")  # the seed passes the fp16-fix VAE separately: VAE in fp16
# parts 2 and 10 without part 1's folder (a call that skips diffusers' script): the same architecture, built
mdl() { if [ -d "$WORK/sdxl" ]; then echo "${model[@]}"; else echo "${built[@]}"; fi; }

p0() { part "0. smoke: tiny model on CUDA"
  "$PY" -m billiard_lora.tiny "$WORK/tiny" | tail -1
  run 0 120 "$PY" -m billiard_lora.train --pretrained_model_name_or_path="$WORK/tiny" --dataset_name=default \
    --instance_prompt="a photo of messi playing billiard" --output_dir="$WORK/smoke" --resolution=64 --train_batch_size=1 \
    --gradient_accumulation_steps=3 --gradient_checkpointing --mixed_precision=fp16 --use_8bit_adam --max_train_steps=3 \
    --checkpointing_steps=2 --seed=0 --report_to=none --overwrite_output_dir; }

p1() { part "1. the model both trainers load: SDXL base's architecture at random weights, fp16, with its VAE as the separate VAE"
  timeout 90 "$PY" -m billiard_lora.tiny "$WORK/sdxl" --shape "$SHAPE" --device "$DEV" --dtype fp16 | tail -1
  mkdir -p "$WORK/images" && cp data/default/*.png "$WORK/images/"; }

p2() { part "2. ours, seed settings (checkpointing, fp16, 8-bit Adam, rank 4), 1024 px ($(left) s left)"
  run 2 200 "$PY" benchmarks/bench_train.py $(mdl) "${common[@]}" --gradient_checkpointing; }

p3() { if [ -z "${DIFFUSERS_SCRIPT:-}" ] || [ ! -f "$DIFFUSERS_SCRIPT" ]; then part "3. skipped: DIFFUSERS_SCRIPT not set"; return; fi
  part "3. diffusers' script, same model, images and settings ($(left) s left)"
  run 3 200 "$PY" benchmarks/time_diffusers_script.py --script "$DIFFUSERS_SCRIPT" --warmup 4 --json "$OUT/bench.jsonl" -- \
    --pretrained_model_name_or_path="$WORK/sdxl" --pretrained_vae_model_name_or_path="$WORK/sdxl/vae" \
    --instance_data_dir="$WORK/images" --output_dir="$WORK/theirs" --mixed_precision=fp16 \
    --instance_prompt="a photo of messi playing billiard" --resolution="$RES" --train_batch_size=1 \
    --gradient_accumulation_steps=3 --gradient_checkpointing --learning_rate=1e-4 --snr_gamma=5.0 \
    --lr_scheduler=constant --lr_warmup_steps=0 --use_8bit_adam --max_train_steps=$((4 + ${STEPS:-8})) \
    --checkpointing_steps=717 --seed=0; }

p4() { part "4. ours, seed settings + --torch_compile regional ($(left) s left)"
  [ "$(left)" -gt 90 ] && run 4 "$(upto ${CAP4:-240})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --torch_compile regional; }

p5() { part "5. ours, seed settings + --torch_compile full ($(left) s left)"
  [ "$(left)" -gt 120 ] && run 5 "$(upto ${CAP5:-360})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --torch_compile full; }

p6() { part "6. ours, seed settings + --auto_gradient_checkpointing (an H100 has the memory: no checkpointing) ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 6 "$(upto ${CAP6:-150})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --auto_gradient_checkpointing; }

p7() { part "7. generation: base / LoRA unfused / LoRA fused ($(left) s left)"
  [ "$(left)" -gt 40 ] && run 7 "$(upto ${CAP7:-180})" "$PY" benchmarks/bench_train.py --shape "$SHAPE" --resolution "$RES" --device "$DEV" \
    --no_training --gen_steps 30 --gen_images 1 --gen_rounds 3 --json "$OUT/bench.jsonl"; }

p8() { part "8. ours, seed settings + --torch_compile full --torch_compile_mode reduce-overhead (CUDA graphs) ($(left) s left)"
  [ "$(left)" -gt 120 ] && run 8 "$(left)" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --torch_compile full --torch_compile_mode reduce-overhead; }

p9() { part "9. ours, seed settings without checkpointing + --torch_compile regional --torch_compile_mode reduce-overhead (CUDA graphs) ($(left) s left)"
  [ "$(left)" -gt 90 ] && run 9 "$(upto ${CAP9:-240})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --torch_compile regional --torch_compile_mode reduce-overhead; }

p10() { part "10. ours, seed settings + --fp8_base ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 10 "$(upto ${CAP10:-200})" "$PY" benchmarks/bench_train.py $(mdl) "${common[@]}" \
    --gradient_checkpointing --fp8_base; }

# graphs_vs_eager N LABEL [EXTRA FLAGS]: the tiny model (GV_SHAPE, at GV_RES px) trained 6 steps on CUDA both ways;
# do the LoRAs agree?
graphs_vs_eager() { local n=$1 label=$2 shape=${GV_SHAPE:-tiny}; shift 2
  [ -d "$WORK/$shape" ] || "$PY" -m billiard_lora.tiny "$WORK/$shape" --shape "$shape" | tail -1
  # eager twice (the noise floor: does eager training even repeat itself bit for bit here?), then with graphs
  for run_as in eager:--cuda_graphs=false eager2:--cuda_graphs=false graphs:--cuda_graphs; do
    run "$n" 120 "$PY" -m billiard_lora.train --pretrained_model_name_or_path="$WORK/$shape" --dataset_name=default \
      --instance_prompt="a photo of messi playing billiard" --output_dir="$WORK/graphs$n-${run_as%%:*}" \
      --resolution="${GV_RES:-64}" \
      --train_batch_size=1 --gradient_accumulation_steps=3 --gradient_checkpointing --mixed_precision=fp16 \
      --use_8bit_adam --max_train_steps=6 --seed=0 --report_to=none --overwrite_output_dir "${run_as#*:}" "$@"; done
  "$PY" - "$WORK/graphs$n-eager" "$WORK/graphs$n-graphs" "$label" "$WORK/graphs$n-eager2" <<'PYEOF'
import json, sys
from safetensors.torch import load_file
a, b, c = (load_file(f"{d}/pytorch_lora_weights.safetensors") for d in sys.argv[1:3] + sys.argv[4:5])
diff = lambda x, y: max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
summary = json.load(open(f"{sys.argv[2]}/summary.json"))
print(json.dumps({"what": "cuda_graphs_check", "variant": sys.argv[3], "lora_max_abs_diff": diff(a, b),
                  "eager_repeat_max_abs_diff": diff(a, c), "same_keys": a.keys() == b.keys(),
                  "graphs": summary.get("cuda_graph_replays"), "recorded": summary.get("cuda_graphs_recorded"),
                  "failure": summary.get("cuda_graph_failure")}))
PYEOF
}

p11() { part "11. --cuda_graphs on the tiny model: the same LoRA as eager? ($(left) s left)"
  graphs_vs_eager 11 unet; }

p17() { part "17. --cuda_graphs --train_text_encoder on the tiny model: recorded, and the same LoRA as eager? ($(left) s left)"
  graphs_vs_eager 17 text_encoders --train_text_encoder; }

p21() { part "21. --cuda_graphs --lora_dropout on the tiny model: recorded, and the same LoRA as eager? ($(left) s left)"
  graphs_vs_eager 21 lora_dropout --lora_dropout=0.1; }

p25() { part "25. --cuda_graphs with aspect-ratio buckets on the tiny model: a graph per shape, the same LoRA as eager? ($(left) s left)"
  "$PY" - "$WORK/mixed" <<'PYEOF'
import sys, pathlib, numpy as np
from PIL import Image
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i, (h, w) in enumerate([(64, 96), (96, 64), (64, 64), (70, 110), (110, 70), (64, 100)]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
PYEOF
  graphs_vs_eager 25 buckets --dataset_name="$WORK/mixed" --aspect_ratio_buckets="64,64;48,96;96,48" --max_train_steps=10; }

p26() { part "26. ours, seed settings, on photos of three shapes with --aspect_ratio_buckets auto ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 26 "$(upto ${CAP26:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --aspect_ratio_buckets auto; }

p27() { part "27. ours, seed settings, --fold_accumulation: one batch of 3 per optimizer step ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 27 "$(upto ${CAP27:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --fold_accumulation; }

p28() { for k in ${SELECTIVE28:-costly products}; do
  part "28. ours, seed settings, --selective_checkpointing $k ($(left) s left)"
  [ "$(left)" -gt 60 ] && run "28-$k" "$(upto ${CAP28:-150})" "$PY" benchmarks/bench_train.py "${built[@]}" \
    "${common[@]}" \
    --gradient_checkpointing --selective_checkpointing "$k"; done; }

p29() { part "29. --cuda_graphs --selective_checkpointing products, small model: the same LoRA as eager? ($(left) s left)"
  [ "$(left)" -gt 100 ] && GV_SHAPE=small GV_RES=256 graphs_vs_eager 29 selective_products \
    --selective_checkpointing=products; }

p30() { for k in ${COMBO30:-ckpt auto}; do
  part "30. ours, seed settings, --fold_accumulation --fused_lora_ops ${EXTRA30:-}, $k ($(left) s left)"
  [ "$(left)" -gt 60 ] && run "30-$k" "$(upto ${CAP30:-150})" "$PY" benchmarks/bench_train.py "${built[@]}" \
    "${common[@]}" --gradient_checkpointing $([ "$k" = auto ] && echo --auto_gradient_checkpointing) \
    --fold_accumulation --fused_lora_ops ${EXTRA30:-}; done; }

p12() { part "12. ours, seed settings, eager (--cuda_graphs off) ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 12 "$(upto ${CAP12:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --cuda_graphs off; }

p13() { part "13. ours, seed settings + --torch_compile regional, no CUDA graphs ($(left) s left)"
  [ "$(left)" -gt 90 ] && run 13 "$(upto ${CAP13:-300})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --cuda_graphs off --torch_compile regional; }

p14() { part "14. the 8-bit optimizer step alone: per tensor vs flat buffers ($(left) s left)"
  [ "$(left)" -gt 30 ] && run 14 "$(upto ${CAP14:-90})" "$PY" benchmarks/bench_optimizer.py --device "$DEV" --text_encoders \
    --shape "$SHAPE" --json "$OUT/bench.jsonl"; }

p15() { part "15. ours, seed settings, bitsandbytes per tensor (--bnb_per_tensor) ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 15 "$(upto ${CAP15:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --bnb_per_tensor; }

p16() { part "16. ours, seed settings, UNet channels-last ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 16 "$(upto ${CAP16:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --channels_last; }

p18() { part "18. the UNet alone: forward / frozen / LoRA, batch 1 and 2, CUDA graphs ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 18 "$(upto ${CAP18:-240})" "$PY" benchmarks/bench_unet.py --shape "$SHAPE" --resolution "$RES" \
    --device "$DEV" --mixed_precision fp16 --gradient_checkpointing --batches 1 2 --peak_tflops "${PEAK_TFLOPS:-790}" \
    --variants as_trained addmm_lora fp16_norms --profile --json "$OUT/bench.jsonl" ${CEIL_FLAGS:-}; }

p19() { part "19. ours, seed settings, norms in float32 as autocast runs them (--half_precision_norms false)${VARIANT19:+, UNet run as $VARIANT19} ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 19 "$(upto ${CAP19:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --half_precision_norms false ${VARIANT19:+--unet_variant "$VARIANT19"}; }

p20() { for k in ${INTERVALS20:-2 4}; do
  part "20. ours, seed settings, checkpointing every ${k}$(case $k in 2) echo nd;; 3) echo rd;; *) echo th;; esac) block ($(left) s left)"
  [ "$(left)" -gt 60 ] && run "20-$k" "$(upto ${CAP20:-150})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --gradient_checkpointing_interval "$k"; done; }

p22() { part "22. generation's memory: resident / VAE tiling / CPU offload / both / + float8 ($(left) s left)"
  [ "$(left)" -gt 40 ] && run 22 "$(upto ${CAP22:-120})" "$PY" benchmarks/bench_generation_memory.py --shape "$SHAPE" \
    --resolution "$RES" --device "$DEV" --steps 10 --json "$OUT/bench.jsonl"; }

p23() { part "23. --fused_lora_ops: the UNet alone, then the trainer at the seed's settings ($(left) s left)"
  [ "$(left)" -gt 60 ] && run 23u "$(upto ${CAP23U:-150})" "$PY" benchmarks/bench_unet.py --shape "$SHAPE" --resolution "$RES" \
    --device "$DEV" --mixed_precision fp16 --gradient_checkpointing --batches 1 --peak_tflops "${PEAK_TFLOPS:-790}" \
    --variants as_trained fp16_norms fp16_norms+fused_lora_ops fp16_norms+channels_last \
    fp16_norms+fused_lora_ops+channels_last --profile --json "$OUT/bench.jsonl" ${CEIL_FLAGS:-}
  [ "$(left)" -gt 60 ] && run 23 "$(upto ${CAP23:-200})" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --fused_lora_ops; }

p24() { part "24. --cuda_graphs --fused_lora_ops on the tiny model: the same LoRA as eager? ($(left) s left)"
  graphs_vs_eager 24 fused_lora_ops --fused_lora_ops; }

p31() { part "31. --cuda_graphs with EMA, pivotal tuning, caption dropout, Huber loss on the tiny model: the same LoRA as eager? ($(left) s left)"
  graphs_vs_eager 31 ema_ti_dropout_huber --use_ema --train_text_encoder_ti --caption_dropout_rate=0.3 \
    --loss_type=huber --instance_prompt="a photo of TOK playing billiard"; }

p32() { part "32. --cuda_graphs with masked loss, multi-resolution noise, input perturbation, timestep bias, LoRA+ on the tiny model: the same LoRA as eager? ($(left) s left)"
  "$PY" - "$WORK/masks32" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for p in sorted(Path("data/default").glob("*.png")):
    w, h = Image.open(p).size
    mask = Image.new("L", (w, h), 0); mask.paste(255, (0, 0, w // 2, h)); mask.save(out / p.name)
PYEOF
  graphs_vs_eager 32 masked_multires_perturbed_biased_loraplus --masked_loss --mask_data_dir="$WORK/masks32" \
    --multires_noise_iterations=6 --input_perturbation=0.1 --timestep_bias_strategy=later --loraplus_lr_ratio=16; }

p33() { part "33. LoKr and LoHa: --cuda_graphs the same adapter as eager, and their speed at the seed's settings ($(left) s left)"
  graphs_vs_eager 33 lokr --lora_type=lokr
  graphs_vs_eager 33 loha --lora_type=loha
  [ "$(left)" -gt 150 ] && run 33 "$(upto 150)" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --set lora_type=lokr --set rank=100000 --set lokr_factor=16
  [ "$(left)" -gt 150 ] && run 33 "$(upto 150)" "$PY" benchmarks/bench_train.py "${built[@]}" "${common[@]}" \
    --gradient_checkpointing --set lora_type=loha; }

# parts run in the order PARTS names them (part 3 needs part 1's model folder; parts 2 and 10 use it if it is there)
for n in ${PARTS:-0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33}; do "p$n"; done

part "done"
[ -f "$OUT/bench.jsonl" ] || exit 0  # parts that print their checks only (11, 17, 21, 24, 25) write no rows
"$PY" - "$OUT/bench.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["what"] == "training":
        print(f"{r.get('trainer', 'billiard-lora'):40s} ckpt={r['gradient_checkpointing']!s:5s} "
              f"every={r.get('gradient_checkpointing_interval') or '-'!s:3s} "
              f"sel={r.get('selective_checkpointing', 'off'):8s} "
              f"compile={r.get('torch_compile', '-'):8s} fp8={r.get('fp8_base', False)!s:5s} "
              f"graphs={r.get('cuda_graph_replays', '-')!s:4s} opt={r.get('optimizer_form', '-'):14s} "
              f"nhwc={r.get('channels_last', False)!s:5s} buckets={r.get('aspect_ratio_buckets') or '-'} unet={r.get('unet_variant', 'as_trained')} half_norms={r.get('half_precision_norms', '-')} "
              f"fused_ops={r.get('fused_lora_ops', False)!s:5s} fold={r.get('fold_accumulation', False)!s:5s} "
              f"{r['optimizer_steps_per_s']:.3f} steps/s "
              f"{r['images_per_s']:.2f} img/s {r['ms_per_micro_step']:.1f} ms/micro "
              f"peak {r.get('cuda_max_allocated_gb', 0):.2f} GB alloc / {r.get('cuda_max_reserved_gb', 0):.2f} reserved "
              f"(timed steps {r.get('cuda_max_allocated_gb_timed', float('nan')):.2f}) "
              f"mfu={r.get('mfu', float('nan')):.3f} gpu_kernels={r.get('gpu_kernel_ms_per_micro_step', float('nan')):.1f} ms/micro "
              f"gpu_idle={r.get('gpu_idle_ms_per_micro_step', float('nan')):.1f} ms/micro "
              f"syncs/step={r.get('cuda_synchronize_calls_per_optimizer_step', '-')}"
              + (f" set={' '.join(r['set'])}" if r.get("set") else ""))
        for g in r.get("longest_gpu_gaps", [])[:3]:
            print(f"    gap {g['ms']:.1f} ms after {g['after']} before {g['before']}")
    elif r["what"] == "unet_ceiling":
        print(f"unet alone {r['kind']:8s} {r.get('variant', ''):11s} batch {r['batch']} graphs={r['cuda_graphs']!s:5s} "
              f"{r['ms']:.1f} ms x{r.get('speedup_vs_as_trained', 1):.3f} diff={r.get('rel_diff_vs_as_trained', 0):.1e} "
              f"err_vs_fp32={r.get('rel_err_vs_fp32') or float('nan'):.1e} "
              f"{r['counted_tflops_per_s']:.0f} TFLOP/s counted, mfu={r.get('mfu', float('nan')):.3f} "
              f"lora_over_frozen={r.get('lora_over_frozen_pct', float('nan')):.1f}% "
              f"kernels={r.get('gpu_kernel_ms', float('nan')):.1f} ms ({r.get('gpu_kernel_launches', '-')}) "
              f"peak {r.get('cuda_max_allocated_gb', 0):.2f} GB")
    else:
        print(json.dumps(r))
EOF
