"""TrainConfig: one dataclass for the notebooks, the command line and the saved run config.

Field names, defaults and meanings follow diffusers' ``train_dreambooth_lora_sdxl.py``, so its command lines run
unchanged (``python -m billiard_lora.train --pretrained_model_name_or_path=... --instance_prompt=...``). Fields
that the script lacks are marked "(billiard-lora)" in their help. ``TrainConfig.seed_recipe()`` holds the values of
the run this project started from (messi playing billiard, 500 steps at 1024 px).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import UserError

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "cosine_with_min_lr", "warmup_stable_decay")
MIN_LR_SCHEDULERS = ("cosine_with_min_lr", "warmup_stable_decay")  # (transformers' schedules with a floor)
OPTIMIZERS = ("adamw", "prodigy", "adamw_schedulefree", "adamwschedulefree",  # (the last: kohya's spelling)
              "adafactor", "lion", "lion8bit")
SCHEDULE_FREE = ("adamw_schedulefree", "adamwschedulefree")
COMPILE_MODES = ("none", "regional", "full")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EMA_DECAY = 0.9999  # --ema_decay's default (diffusers' EMAModel's)
MIN_RESOLUTION = 32  # below, the VAE's deepest GroupNorms see a single value per channel
NOT_FLAGS = ("fallbacks",)  # fields that train() fills in; saved with the config, never read from the command line


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field whose help text is the CLI help and the docs (peft's LoraConfig style)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a DreamBooth-LoRA SDXL run needs; see each field's help (``python -m billiard_lora.train -h``)."""

    # ---- model
    pretrained_model_name_or_path: str = _f(
        "stabilityai/stable-diffusion-xl-base-1.0", "SDXL base model: a hub id, a local diffusers folder, or a "
                                                    "single-file checkpoint (.safetensors, as civitai's, A1111's).")
    single_file_config: Optional[str] = _f(
        None, "(billiard-lora) For a single-file --pretrained_model_name_or_path: a diffusers SDXL folder or hub id "
              "whose configs and tokenizers describe its layout (default: SDXL base 1.0's, a few MB fetched once; "
              "offline, any SDXL folder of the same architecture).")
    pretrained_vae_model_name_or_path: Optional[str] = _f(
        None, "A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in fp16).")
    revision: Optional[str] = _f(None, "Revision (branch, tag or commit) of the model on the hub.")
    variant: Optional[str] = _f(None, "Variant of the model weight files, e.g. fp16.")
    cache_dir: Optional[str] = _f(None, "Where downloaded models and datasets are cached.")

    # ---- data
    dataset_name: Optional[str] = _f(
        None, "Training images: a local folder (plain, captioned, or Kaggle layout train|valid|test/<class>/), "
              "'kaggle:gpiosenka/sports-classification', 'default' (the embedded billiard scenes), or a hub dataset id.")
    instance_data_dir: Optional[str] = _f(None, "A folder of instance images (alternative to --dataset_name).")
    image_column: str = _f("image", "Image column of a hub dataset.")
    caption_column: Optional[str] = _f(
        None, "Caption column of the dataset's metadata.jsonl/.csv (or hub dataset); without one every image "
              "uses --instance_prompt.")
    kaggle_class: str = _f("billiards", "(billiard-lora) Class folder to take from a Kaggle-layout dataset.")
    kaggle_splits: str = _f("train", "(billiard-lora) Comma-separated splits of a Kaggle-layout dataset.")
    repeats: int = _f(1, "How many times to repeat the training data.")
    instance_prompt: Optional[str] = _f(
        None, "The prompt with the identifier of the instance, e.g. 'a photo of sks dog' (required).")
    caption_dropout_rate: float = _f(
        0.0, "(billiard-lora) Share of instance images trained without their caption (kohya's --caption_dropout_rate, "
             "SimpleTuner's caption_dropout_probability): the text conditioning is zeroed, as SDXL was trained for "
             "the unconditioned prediction that classifier-free guidance uses (and the pipeline samples with); "
             "drawn per image and epoch from --seed. 0.05-0.1 is usual for styles; class images keep theirs.")
    shuffle_caption: bool = _f(
        False, "(kohya's) Shuffle each caption's comma-separated tags afresh every epoch (for tag-style captions: "
               "no tag learns to depend on its place), drawn from --seed; the text encoders then encode each step's "
               "captions in the step instead of once ahead (they stay on the GPU).")
    keep_tokens: int = _f(
        0, "(kohya's) With --shuffle_caption: the first N tags stay where they are (e.g. 1 keeps 'sks billiard' "
           "first).")
    resolution: int = _f(1024, "Training resolution in pixels (square); a multiple of 8.")
    center_crop: bool = _f(False, "Center-crop to the resolution instead of random crops.")
    random_flip: bool = _f(False, "Randomly flip images horizontally, re-drawn every epoch.")
    use_aspect_ratio_buckets: bool = _f(
        False, "(diffusers' newer scripts, kohya's --enable_bucket) Aspect-ratio bucketing: each image is resized to "
               "cover the bucket nearest its shape and cropped to it, instead of cropped to a square; each batch "
               "holds one bucket. Buckets: --aspect_ratio_buckets, else SDXL's own at --resolution's area.")
    aspect_ratio_buckets: Optional[str] = _f(
        None, "(diffusers' newer scripts) The buckets as 'h1,w1;h2,w2;...' in pixels (e.g. "
              "'1024,1024;896,1152;1152,896'), or 'auto': sides multiples of 64, area up to --resolution squared, "
              "aspect ratios up to 4:1. Giving them turns bucketing on.")
    crops_coords_top_left_h: int = _f(0, "Crop top (height) coordinate for SDXL's micro-conditioning at validation.")
    crops_coords_top_left_w: int = _f(0, "Crop left (width) coordinate for SDXL's micro-conditioning at validation.")
    image_interpolation_mode: str = _f("lanczos", "Resize filter: lanczos, bicubic, bilinear or nearest.")
    dataloader_num_workers: int = _f(0, "Data-loading worker processes (0: in the main process).")
    cache_latents: bool = _f(
        True, "(billiard-lora) Encode each distinct view (image, crop, flip) with the VAE once and reuse it; "
              "results are identical, only faster. --cache_latents=false re-encodes every step.")
    cache_latents_to_disk: bool = _f(
        False, "(billiard-lora; kohya's name) Also keep each view's latents in a file under --latent_cache_dir: "
               "later runs on the same images with the same VAE skip encoding, and sets beyond the 4 GB in-memory "
               "cache encode each view once.")
    latent_cache_dir: Optional[str] = _f(
        None, "(billiard-lora) Folder for --cache_latents_to_disk (default: $BILLIARD_LORA_CACHE/latents, else "
              "~/.cache/billiard_lora/latents); one subfolder per VAE, safe to delete.")
    skip_bad_images: bool = _f(
        False, "(billiard-lora) Train on the readable images when some files are broken, instead of stopping.")
    masked_loss: bool = _f(
        False, "(kohya's) Learn only where each image's mask is white: the loss of each latent pixel is multiplied "
               "by the mask there (grey: in part; black: not at all), so that backgrounds are not learned. The "
               "masks come from --mask_data_dir or, without it, from each image's alpha channel (kohya's "
               "--alpha_mask); class images are learned whole.")
    mask_data_dir: Optional[str] = _f(
        None, "(billiard-lora) The folder of --masked_loss's masks: one greyscale image per training image, with its "
              "file name (any image extension; beside the image's relative path in the dataset, or at the top), of "
              "the image's shape.")

    # ---- prior preservation
    with_prior_preservation: bool = _f(False, "Add the prior-preservation loss on class images.")
    class_data_dir: Optional[str] = _f(
        None, "Folder of class images; missing ones are generated by the base model. In kohya's layout (its "
              "--reg_data_dir: N_words/ subfolders) all its images are used, each N times an epoch, prompted by their "
              ".txt or the folder's words; none are generated.")
    class_prompt: Optional[str] = _f(None, "Prompt of the class, e.g. 'a photo of a man playing billiard'.")
    num_class_images: int = _f(100, "Minimum number of class images; the missing ones are generated once.")
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.")
    sample_batch_size: int = _f(4, "Batch size when generating class images.")
    prior_generation_precision: Optional[Literal["no", "fp32", "fp16", "bf16"]] = _f(
        None, "Precision for generating class images (default fp16 on GPU, fp32 on CPU).")

    # ---- training
    output_dir: str = _f("lora-dreambooth-model", "Where the LoRA, checkpoints, samples and logs are written.")
    overwrite_output_dir: bool = _f(
        False, "(billiard-lora) Allow writing into a non-empty output_dir without resuming.")
    push_to_hub: bool = _f(
        False, "(diffusers' script) At the end, upload the output folder (the LoRA files, model card, config, "
               "validation images; not checkpoints or logs) to a Hugging Face Hub model repo in one commit. The repo "
               "is created before training, so a missing login (hf auth login, or HF_TOKEN) stops the run at once.")
    hub_model_id: Optional[str] = _f(
        None, "(diffusers' script) The repo --push_to_hub uploads to: owner/name, or name in your own namespace "
              "(default: the output folder's name).")
    hub_private_repo: bool = _f(False, "(transformers' Trainer) --push_to_hub creates the repo private.")
    seed: Optional[int] = _f(None, "Seed for reproducible training (None: a random seed, recorded in the config).")
    train_batch_size: int = _f(4, "Batch size per device.")
    num_train_epochs: int = _f(1, "Epochs; ignored when --max_train_steps is set.")
    max_train_steps: Optional[int] = _f(None, "Total optimizer steps; overrides num_train_epochs.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    fold_accumulation: bool = _f(
        False, "(billiard-lora) Run an optimizer step's --gradient_accumulation_steps micro-batches as one batch of "
               "train_batch_size x gradient_accumulation_steps: the same images, noise and timesteps, so the same "
               "gradient (the mean over those images), in fewer and larger GPU launches; faster where the memory "
               "allows (an H100 runs SDXL's UNet with LoRA at batch 2 in 0.72x batch 1's time per image). With "
               "aspect-ratio buckets of several shapes, a step's images then all come from one bucket; with "
               "--lora_dropout the masks are drawn in another order.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory by recomputing activations.")
    gradient_checkpointing_interval: int = _f(
        1, "(SimpleTuner's name) With --gradient_checkpointing, recompute only every Nth of the UNet's ResNet and "
           "transformer blocks (and, with --train_text_encoder, of the text encoders' layers) and keep the others' "
           "activations: less recomputation (faster), more memory. 1: every block, as diffusers' script. Same "
           "results.")
    selective_checkpointing: Literal["off", "costly", "products"] = _f(
        "off", "(billiard-lora) With --gradient_checkpointing, keep some outputs of each recomputed block "
               "(PyTorch's selective activation checkpointing) so that backward recomputes less: 'costly' keeps those "
               "that cost the most arithmetic per value to recompute (self-attention, a ResNet block's first 3x3 "
               "convolution); 'products' keeps every matrix product, convolution and attention output of 256 or more "
               "inputs per value (not the LoRA's rank-r products nor cross-attention over the 77 text tokens), so "
               "backward recomputes little more than norms, activations and additions. (A block's last products "
               "are never kept: the recompute stops before them.) SDXL at "
               "1024 px, batch 1, counted (benchmarks/RESULTS.md): every block recomputed keeps 0.43 GiB for backward "
               "and recomputes 92%% of a forward's FLOPs; 'costly' 0.78 GiB and 49%%; 'products' 3.51 GiB and 0.5%% "
               "(every 4th block: 3.95 GiB and 24%%; none: 5.21 GiB). Same results. Its policy runs in Python for "
               "each operation: meant for a recorded (--cuda_graphs, on by default on a GPU) or compiled "
               "(--torch_compile) micro-step; eager on this project's CPU it was slower than whole blocks (0.87 "
               "against 1.20 steps/s). Off until a GPU has timed it; with --torch_compile regional the ResNet "
               "blocks are recomputed whole, and compiled, a block's last products are kept.")
    auto_gradient_checkpointing: bool = _f(
        False, "(billiard-lora) Decide --gradient_checkpointing by measuring: trial steps before training, first "
               "without it, then checkpointing every 4th, 3rd, 2nd block (or only the --gradient_checkpointing_interval "
               "you give), then, with a --selective_checkpointing level, every block keeping its outputs; the first "
               "that neither runs out of memory nor leaves under 15%% of the free GPU memory is used, else every "
               "block is checkpointed whole. Same results either way; without checkpointing is much faster (1.75x "
               "on an H100).")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _f(
        None, "Mixed precision; fp16 and bf16 need a GPU (on CPU fp16 falls back to fp32 with a warning).")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere or newer GPUs.")
    torch_compile: Literal["none", "regional", "full"] = _f(
        "none", "(billiard-lora) torch.compile the UNet: 'regional' compiles each stack of transformer blocks and "
                "each ResNet block (regions of the same shape share compiled code, so it compiles much faster than "
                "'full', the whole UNet). Same results; the first steps are slow while it compiles (the code is kept "
                "in the cache folder, so a later run starts in seconds). Needs a C++ compiler on CPU, "
                "triton on a GPU (else a warning and no compilation).")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "default", "(billiard-lora) torch.compile's mode with --torch_compile: 'reduce-overhead' replays CUDA graphs "
                   "(no per-kernel launch cost), 'max-autotune' also searches kernel configurations (slow to compile). "
                   "CUDA graphs fail on regionally compiled, checkpointed blocks: there the mode falls back to one "
                   "without them, with a warning.")
    cuda_graphs: Optional[bool] = _f(
        None, "(billiard-lora) Record the training micro-step (UNet forward, loss, backward) once as a CUDA graph and "
              "replay it: one launch instead of ~25,000 kernel launches per micro-step (H100, seed's settings: 180 "
              "instead of 995 ms per micro-step, the same losses). Unset (the default): on where it applies -- CUDA "
              "GPUs (with several processes each records its own and the gradients are averaged as DDP does), UNet "
              "LoRA (dropout drawn inside the graph; with checkpointing from PyTorch 2.10 on), --torch_compile none "
              "or regional -- else off; --cuda_graphs asks for it (a warning where it cannot be; with "
              "--train_text_encoder only when asked for), --cuda_graphs false turns it off. If recording fails, "
              "training goes on without it.")
    fp8_base: bool = _f(
        False, "(billiard-lora) Keep the frozen UNet's Linear and Conv weights in float8 (e4m3), each cast up to the "
               "compute dtype only while its layer runs (as kohya's --fp8_base): the UNet's weights take half the "
               "memory (SDXL: 2.6 instead of 5.2 GB), rounded to 3 mantissa bits; the LoRA still trains in fp32, on "
               "exactly the rounded model. Pays off with --gradient_checkpointing (without it, backward keeps the "
               "upcast weights, as it does in the blocks a --gradient_checkpointing_interval above 1 leaves out). "
               "Combines with --torch_compile, not with --use_dora. A UNet passed to train() in a "
               "notebook stays stored in fp8.")
    half_precision_norms: bool = _f(
        True, "(billiard-lora) Run the UNet's LayerNorms and GroupNorms in fp16/bf16 under --mixed_precision, as "
              "diffusers' fp16 pipelines run them when sampling, instead of CUDA autocast's float32 (their kernels "
              "still accumulate in float32; the output is rounded to half in the norm instead of at the next "
              "layer's input): H100, seed's settings, 139.9 instead of 158.4 ms per micro-step, same memory. Error "
              "against float32, SDXL's UNet in fp16: the same size either way (benchmarks/RESULTS.md). "
              "--half_precision_norms false gives autocast's float32 norms. No effect in fp32 or on a CPU, whose "
              "autocast leaves the norms in half precision already.")
    fused_lora_ops: bool = _f(
        False, "(billiard-lora) Run each adapted Linear layer (frozen weight plus LoRA) as one autograd operation "
               "instead of peft's separate ones: the LoRA's product added inside the base layer's GEMM, forward and "
               "backward, the scale applied on the rank-r tensors, and under --mixed_precision the adapters kept "
               "cast to fp16/bf16 between optimizer steps instead of cast in every forward and recompute. The same "
               "math summed in another order (tested: float32 LoRA equal to 1e-4, error against float64 under bf16 "
               "the size of peft's). SDXL's layout, checkpointed micro-step: 10,862 instead of 16,319 non-view "
               "operations, each a GPU kernel. Off until a GPU has timed it (benchmarks/gpu_check.sh parts 23-24). "
               "Layers where it does not apply (DoRA, several adapters) run peft's forward.")
    snr_gamma: Optional[float] = _f(None, "Min-SNR loss weighting gamma (5.0 recommended); None disables it.")
    prediction_type: Optional[str] = _f(
        None, "(diffusers' text-to-image script; kohya's --v_parameterization) What the UNet predicts: epsilon or "
              "v_prediction; None: the model's scheduler config, or a single-file checkpoint's v_pred marker (as "
              "ComfyUI reads it: v-prediction SDXL finetunes such as NoobAI-XL V-Pred).")
    zero_terminal_snr: bool = _f(
        False, "(kohya's; SimpleTuner's --rescale_betas_zero_snr) Rescale the noise schedule so that the last "
               "timestep is pure noise (arXiv 2305.08891), as zero-terminal-SNR finetunes were trained; needs "
               "v-prediction. A single-file checkpoint's ztsnr marker turns it on.")
    debiased_estimation_loss: bool = _f(
        False, "(kohya's) Weight each image's loss by 1/sqrt(SNR) of its timestep (arXiv 2310.08442), which evens "
               "out how much the noise levels teach; with --snr_gamma the two weights multiply.")
    min_timestep: int = _f(0, "(kohya's) Lowest noise timestep drawn in training (0: the cleanest).")
    max_timestep: Optional[int] = _f(
        None, "(kohya's) Timesteps are drawn below this one (None: the scheduler's num_train_timesteps, 1000 for "
              "SDXL); e.g. --min_timestep 200 --max_timestep 1000 leaves the finest detail to the base model.")
    loss_type: Literal["l2", "huber", "smooth_l1"] = _f(
        "l2", "(billiard-lora) l2: the squared error (diffusers' default); huber or smooth_l1: the pseudo-Huber loss "
              "2c(sqrt(e^2+c^2)-c) or 2(sqrt(e^2+c^2)-c), squared for errors under c and linear above, so that the "
              "few large errors weigh less (scheduled Pseudo-Huber loss, arXiv 2403.16728; kohya's --loss_type).")
    huber_schedule: Literal["snr", "exponential", "constant"] = _f(
        "snr", "(billiard-lora) How c follows each image's timestep with --loss_type huber/smooth_l1: snr (c near 1, "
               "i.e. squared error, at low noise, falling to --huber_c at high noise), exponential (from 1 at "
               "t=0 to --huber_c at the last timestep), or constant (--huber_c throughout).")
    huber_c: float = _f(0.1, "(billiard-lora) The pseudo-Huber c of --loss_type huber/smooth_l1 (see "
                             "--huber_schedule), in (0, 1].")
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark or bright images).")
    noise_offset_random_strength: bool = _f(
        False, "(kohya's) Each batch's --noise_offset drawn uniformly between 0 and the value given, from --seed, "
               "instead of always the value itself.")
    multires_noise_iterations: int = _f(
        0, "(kohya's) Multi-resolution ('pyramid') noise: add this many levels of noise drawn at ever coarser "
           "resolutions (random 2-4x steps), rescaled to unit variance, so that the LoRA also learns large areas' "
           "brightness and colour; 6-10 is usual, 0 turns it off.")
    multires_noise_discount: float = _f(
        0.3, "(kohya's) The strength of each coarser level of --multires_noise_iterations relative to the one "
             "before, in (0, 1).")
    input_perturbation: float = _f(
        0.0, "(diffusers' text-to-image scripts, SimpleTuner) Input perturbation (arXiv 2301.11706): the model sees "
             "latents noised with noise + this x fresh noise while learning to predict the noise alone, against "
             "the exposure bias of sampling; 0.1 is usual, 0 turns it off.")
    input_perturbation_random_strength: bool = _f(
        False, "(kohya's --ip_noise_gamma_random_strength) Each batch's --input_perturbation drawn uniformly between "
               "0 and the value given, from --seed.")
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = _f(
        "none", "(diffusers' train_text_to_image_sdxl.py) Draw some timesteps more often: later (the noisiest "
                "--timestep_bias_portion: composition and colour), earlier (the least noisy: fine detail), range "
                "(--timestep_bias_begin to --timestep_bias_end), by --timestep_bias_multiplier.")
    timestep_bias_multiplier: float = _f(
        1.0, "(diffusers') How much more often the biased timesteps are drawn (2.0: twice); positive.")
    timestep_bias_begin: int = _f(0, "(diffusers') First timestep of --timestep_bias_strategy range.")
    timestep_bias_end: int = _f(1000, "(diffusers') End of --timestep_bias_strategy range (not included, as in "
                                      "diffusers' code).")
    timestep_bias_portion: float = _f(
        0.25, "(diffusers') The share of the timesteps --timestep_bias_strategy later/earlier favours, in (0, 1].")
    learning_rate: float = _f(1e-4, "Learning rate of the UNet LoRA.")
    text_encoder_lr: float = _f(5e-6, "Learning rate of the text-encoder LoRA.")
    scale_lr: bool = _f(False, "Scale the learning rate by GPUs x accumulation x batch size.")
    lr_scheduler: str = _f("constant", "One of: " + ", ".join(LR_SCHEDULERS) + ".")
    lr_warmup_steps: int = _f(500, "Warm-up steps of the learning-rate scheduler.")
    lr_num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = _f(1.0, "Power of the polynomial scheduler.")
    lr_scheduler_min_lr_ratio: Optional[float] = _f(
        None, "(kohya's) The floor of --lr_scheduler cosine_with_min_lr (default 0.1: the learning rate ends at a "
              "tenth of --learning_rate instead of 0) and warmup_stable_decay (default 0), a share of the learning "
              "rate.")
    lr_decay_steps: Optional[int] = _f(
        None, "(kohya's) --lr_scheduler warmup_stable_decay (WSD, arXiv 2404.06395): the last steps, in which the "
              "learning rate decays (cosine) to the floor after warm-up and a constant stretch (default: a fifth of "
              "the steps).")
    optimizer: str = _f(
        "AdamW", "AdamW, Prodigy, AdamW_ScheduleFree (schedule-free AdamW, arXiv 2405.15682, the schedulefree "
                 "package: no learning-rate schedule, its own warm-up with --lr_scheduler constant_with_warmup "
                 "--lr_warmup_steps N; the LoRA files and validation images "
                 "hold its averaged weights; try a higher --learning_rate than AdamW's, e.g. 1e-3), Adafactor "
                 "(transformers', at the fixed --learning_rate as kohya's SDXL recipes run it: relative_step, "
                 "scale_parameter and warmup_init off; factored second moments, less memory), Lion or Lion8bit "
                 "(bitsandbytes', arXiv 2302.06675: the update's sign, one state; a learning rate 3-10x below "
                 "AdamW's and a weight decay as many times higher).")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes, stepped over a few flat buffers instead of "
                                    "tensor by tensor (the same update); falls back to AdamW where it has no backend.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    prodigy_beta3: Optional[float] = _f(None, "Prodigy beta3 (None: sqrt(beta2)).")
    prodigy_decouple: bool = _f(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy: safeguard warm-up.")
    adam_weight_decay: float = _f(1e-4, "Weight decay of the UNet LoRA.")
    adam_weight_decay_text_encoder: float = _f(1e-3, "Weight decay of the text-encoder LoRA.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    scale_weight_norms: Optional[float] = _f(
        None, "(kohya's) Max-norm regularization: after every optimizer step, each adapted layer whose weight change "
              "(the LoRA's scale x B x A; a LoHa's or LoKr's product) has a Frobenius norm above this is scaled back "
              "to it, which keeps a LoRA from overcooking and stays usable at higher strengths; 1.0 is usual. Each "
              "step logs the layers scaled (keys_scaled) and the mean and largest norm (mean_key_norm, "
              "max_key_norm; also in loss_history.csv): many layers scaled early says the learning rate or alpha "
              "is high.")
    use_ema: bool = _f(
        False, "(billiard-lora) Keep an exponential moving average of the LoRA weights (diffusers' EMAModel, as "
               "SimpleTuner's --use_ema) and save that: the LoRA files, each checkpoint's LoRA and the validation "
               "images use the average; the last weights themselves go to no_ema/ in the output folder.")
    ema_decay: float = _f(
        EMA_DECAY, "(billiard-lora) Largest decay of --use_ema. The decay ramps up as (1+n)/(10+n) after n steps "
                "(diffusers' EMAModel), which averages about the last ninth of the steps so far, until it reaches "
                "this cap: 0.9999 leaves the ramp alone in runs under 90,000 steps, 0.99 averages over about the "
                "last 100 steps at most.")

    # ---- LoRA
    rank: int = _f(4, "LoRA rank.")
    lora_type: str = _f(
        "lora", "(SimpleTuner's --lora_type lycoris, kohya's --network_args algo=...) The adapter: lora, loha (LyCORIS "
                "LoHa: a Hadamard product of two rank-r products, twice LoRA's parameters for a rank) or lokr "
                "(LyCORIS LoKr: a Kronecker product of a small full matrix and a rank-r one, far fewer parameters; "
                "--rank 100000 makes both factors full, as SimpleTuner's and kohya's LoKr presets do). LoHa/LoKr "
                "are saved in LyCORIS' format (ComfyUI, A1111, Forge) and loaded by this package's generate.")
    lokr_factor: int = _f(
        -1, "(LyCORIS' factor) --lora_type lokr: the size of the small Kronecker factor (-1: as near the square "
            "root of each layer's size as divides it; 8 or 16 are common).")
    lora_alpha: Optional[int] = _f(None, "(billiard-lora) LoRA alpha; None: equal to rank, as in diffusers.")
    lora_layers: str = _f(
        "attn", "(diffusers' newer scripts) The UNet's layers that get a LoRA, comma-separated: attn (the attention "
                "projections to_q, to_k, to_v, to_out.0: diffusers' default), ff (the feed-forward: ff.net.0.proj, "
                "ff.net.2), proj (proj_in, proj_out), conv (the ResNet blocks' and samplers' convolutions: kohya's "
                "LoCon), or module names; 'attn,ff,proj' is what kohya's LoRA adapts in each transformer block.")
    lora_unet_blocks: Optional[str] = _f(
        None, "(diffusers' advanced script) Only the --lora_layers inside these UNet blocks get a LoRA, "
              "comma-separated: diffusers' names (up_blocks.0.attentions.1, mid_block, down_blocks.2; a unet. prefix "
              "is dropped) or the original UNet's that kohya, LyCORIS presets and ComfyUI use (output_blocks.1.1, "
              "middle_block, input_blocks.8). A smaller file that changes only part of the model.")
    use_blora: bool = _f(
        False, "(diffusers' advanced script) B-LoRA (arXiv 2403.14572): the LoRA adapts only up_blocks.0.attentions.0 "
               "(which learns the content) and up_blocks.0.attentions.1 (the style), so that generate can take the "
               "content of one such LoRA and the style of another (--lora RUN@content --lora OTHER@style).")
    conv_rank: Optional[int] = _f(
        None, "(kohya's --network_args conv_dim) Rank of the convolution layers (--lora_layers conv: LoCon), which "
              "often train at a lower rank than the attention layers; None: --rank.")
    conv_alpha: Optional[int] = _f(
        None, "(kohya's --network_args conv_alpha) Alpha of the convolution layers; None: equal to --conv_rank (as "
              "--lora_alpha defaults to --rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.")
    loraplus_lr_ratio: Optional[float] = _f(
        None, "(kohya's) LoRA+ (arXiv 2402.12354): the LoRA's B matrices (and DoRA's magnitudes, as peft's "
              "create_loraplus_optimizer groups them) learn at this multiple of the learning rate, the A matrices "
              "at the learning rate itself; the paper suggests 16 (with a lower --learning_rate than plain LoRA).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    train_text_encoder: bool = _f(False, "Also train LoRA on both text encoders.")
    train_text_encoder_ti: bool = _f(
        False, "(diffusers' advanced script) Pivotal tuning: each --token_abstraction in the instance prompt, "
               "captions and validation prompts becomes new tokens (<s0><s1>) whose embeddings in both text encoders "
               "train beside the LoRA (the encoders stay frozen otherwise); saved as FOLDER_emb.safetensors (clip_l, "
               "clip_g: diffusers' load_textual_inversion, A1111, ComfyUI), loaded by generate with the LoRA.")
    train_text_encoder_ti_frac: float = _f(
        0.5, "(diffusers' advanced script) The share of the steps in which --train_text_encoder_ti's embeddings "
             "train; they stay as they are for the rest (the LoRA trains on), 1.0: all the run.")
    token_abstraction: str = _f(
        "TOK", "(diffusers' advanced script) The word(s) in --instance_prompt (and captions) that "
               "--train_text_encoder_ti replaces by new tokens, comma-separated for several: 'a photo of TOK playing "
               "billiard'.")
    num_new_tokens_per_abstraction: int = _f(
        2, "(diffusers' advanced script) New tokens per --token_abstraction (<s0><s1> for 2).")
    ti_learning_rate: float = _f(
        3e-4, "(billiard-lora) Learning rate of the new token embeddings (--train_text_encoder_ti; cog-sdxl's "
              "ti_lr); no weight decay.")
    init_lora_weights: str = _f(
        "gaussian", "(billiard-lora) LoRA initialisation: gaussian (diffusers' default), pissa or pissa_niter_<n> "
                    "(SVD-based: starts on the weights' principal directions; see lora_tools), olora, true, false.")
    init_lora: Optional[str] = _f(
        None, "(billiard-lora) Go on training an existing LoRA instead of starting from scratch: a training output "
              "folder, a .safetensors file (diffusers or kohya format) or a Hub repo (owner/name). Its rank and alpha "
              "are used (kohya's --network_weights with --dim_from_weights, SimpleTuner's --init_lora); the "
              "optimizer starts afresh (an interrupted run resumes with --resume_from_checkpoint instead).")

    # ---- outputs, checkpoints, validation, logging
    checkpointing_steps: int = _f(500, "Save a full training-state checkpoint every N optimizer steps.")
    checkpointing_epochs: Optional[int] = _f(
        None, "(kohya's --save_every_n_epochs) Also save a checkpoint at the end of every N epochs (each holds that "
              "epoch's LoRA, which generate --checkpoints and evaluate compare); for small sets, where an epoch is "
              "a few steps, with a large --checkpointing_steps.")
    checkpoints_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints (oldest removed).")
    resume_from_checkpoint: Optional[str] = _f(None, "A checkpoint folder, or 'latest'.")
    validation_prompt: Optional[str] = _f(None, "Prompt for validation images (also a baseline before training).")
    extra_validation_prompts: list[str] = field(default_factory=list, metadata={"help": (
        "(billiard-lora) More prompts validated beside --validation_prompt, each a row of the grid (kohya's "
        "--sample_prompts): --extra_validation_prompts 'a photo of obama playing billiard' 'a billiard table'.")})
    sample_prompts: Optional[str] = _f(
        None, "(kohya's --sample_prompts, SimpleTuner's --user_prompt_library) A file of validation prompts, each a "
              "row of the grid after --validation_prompt's: .txt, one per line, kohya's --n NEGATIVE, --l GUIDANCE, "
              "--s STEPS after a prompt apply to its row (--w, --h, --d are left out with a note); or .json, "
              "SimpleTuner's {name: prompt} library or a list.")
    validation_negative_prompt: Optional[str] = _f(
        None, "(billiard-lora) Negative prompt of the validation images (e.g. 'blurry, low quality').")
    validation_guidance_scale: float = _f(
        5.0, "(billiard-lora) Classifier-free guidance scale of the validation images (SDXL's pipeline default).")
    num_validation_images: int = _f(4, "Images per validation prompt (seeds seed, seed+1, ...).")
    validation_steps: Optional[int] = _f(None, "(billiard-lora) Validate every N optimizer steps.")
    validation_epochs: int = _f(50, "Validate every N epochs (used when --validation_steps is not set).")
    validation_inference_steps: int = _f(25, "(billiard-lora) Denoising steps of validation images.")
    report_to: str = _f(
        "tensorboard", "tensorboard, wandb (Weights & Biases: pip install wandb, then wandb login; WANDB_MODE=offline "
                       "keeps the run on disk), all (both), or none.")
    logging_dir: str = _f("logs", "TensorBoard folder, relative to output_dir.")
    output_kohya_format: bool = _f(False, "Also write the LoRA in kohya/webui format (ComfyUI, A1111).")
    save_precision: Literal["fp32", "fp16", "bf16", "float"] = _f(
        "fp32", "(kohya's) Precision of the saved LoRA files (the final ones, no_ema/'s and each checkpoint's): fp32 "
                "(or float), as the LoRA trains; fp16 or bf16 halve the files, which ComfyUI, A1111 and diffusers "
                "load alike. Values beyond fp16's range keep the file in fp32, values below its smallest are saved "
                "as 0, each with a warning. Checkpoints' training state stays fp32, so resuming is exact.")

    # Filled in by train(): what the hardware could not do, recorded in the saved config (not a CLI flag).
    fallbacks: list[str] = field(default_factory=list, metadata={"help": "not a flag"})

    def __post_init__(self) -> None:
        if self.aspect_ratio_buckets and not self.use_aspect_ratio_buckets:
            self.use_aspect_ratio_buckets = True  # giving the buckets turns bucketing on: config.json says so
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise one short ``UserError`` for the first thing wrong with the settings."""
        if not self.instance_prompt:
            raise UserError("missing --instance_prompt: the prompt that names your subject, "
                            "e.g. --instance_prompt='a photo of messi playing billiard'")
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution={self.resolution} must be a positive multiple of 8 "
                            f"(SDXL's VAE downsamples by 8); try {max(8, round(self.resolution / 8) * 8)}")
        if self.resolution < MIN_RESOLUTION:
            raise UserError(f"--resolution={self.resolution} is too small: SDXL's VAE and UNet need at least "
                            f"{MIN_RESOLUTION} px (the seed's run uses 1024)")
        self.buckets  # a malformed --aspect_ratio_buckets says so here
        self._check_ranges()
        from .single_file import check_single_file_config

        check_single_file_config(self.pretrained_model_name_or_path, self.single_file_config,
                                 "--pretrained_model_name_or_path")  # (and a pickled .ckpt is refused here)
        if self.mask_data_dir and not self.masked_loss:
            raise UserError("--mask_data_dir holds the masks of --masked_loss: add that flag, or drop --mask_data_dir")
        if self.with_prior_preservation and not self.class_prompt and not self.kohya_class_folder:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a man playing billiard'), "
                            "or a --class_data_dir in kohya's layout (N_words/ folders: their words are the prompts)")
        if not self.with_prior_preservation and (self.class_prompt or self.class_data_dir):
            flag = "--class_prompt" if self.class_prompt else "--class_data_dir"
            raise UserError(f"{flag} is only used with --with_prior_preservation: add that flag or drop {flag}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"unknown --lr_scheduler={self.lr_scheduler!r}{_closest(self.lr_scheduler, LR_SCHEDULERS)}; "
                            f"choose one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_scheduler_min_lr_ratio is not None:
            if self.lr_scheduler not in MIN_LR_SCHEDULERS:
                raise UserError(f"--lr_scheduler_min_lr_ratio sets the floor of --lr_scheduler cosine_with_min_lr or "
                                f"warmup_stable_decay, not {self.lr_scheduler}: choose one of those, or drop it")
            if not 0.0 <= self.lr_scheduler_min_lr_ratio < 1.0:
                raise UserError(f"--lr_scheduler_min_lr_ratio={self.lr_scheduler_min_lr_ratio} must be in [0, 1) (a "
                                f"share of --learning_rate; 0.1 is usual)")
        if self.lr_decay_steps is not None:
            if self.lr_scheduler != "warmup_stable_decay":
                raise UserError(f"--lr_decay_steps sets the decay of --lr_scheduler warmup_stable_decay, not "
                                f"{self.lr_scheduler}: choose that, or drop it")
            if self.lr_decay_steps < 1:
                raise UserError(f"--lr_decay_steps={self.lr_decay_steps} must be at least 1")
        for flag, base in (("noise_offset_random_strength", "noise_offset"),
                           ("input_perturbation_random_strength", "input_perturbation")):
            if getattr(self, flag) and not getattr(self, base):
                raise UserError(f"--{flag} draws each batch's --{base} below the value given: give --{base} (e.g. "
                                f"0.1), or drop --{flag}")
        if self.torch_compile_mode not in TORCH_COMPILE_MODES:
            raise UserError(f"unknown --torch_compile_mode={self.torch_compile_mode!r}; "
                            f"choose one of {', '.join(TORCH_COMPILE_MODES)}")
        if self.torch_compile not in COMPILE_MODES:
            raise UserError(f"unknown --torch_compile={self.torch_compile!r}; choose none, regional or full")
        if self.scale_weight_norms is not None:
            if self.use_dora:
                raise UserError("--scale_weight_norms caps a LoRA's weight change, which DoRA rescales by its "
                                "magnitudes: drop --use_dora or --scale_weight_norms")
            if self.init_lora_weights.lower().startswith(("pissa", "olora")):
                raise UserError(f"--scale_weight_norms caps each layer's B x A, which --init_lora_weights="
                                f"{self.init_lora_weights} starts at the weights' principal part: use the gaussian "
                                f"init, or drop --scale_weight_norms")
            if self.schedule_free:
                raise UserError(f"--scale_weight_norms rescales the weights between steps, behind the back of "
                                f"--optimizer={self.optimizer}'s averaged sequences: choose another optimizer")
        if self.fp8_base and self.use_dora:
            raise UserError("--fp8_base does not combine with --use_dora (DoRA sets its magnitudes from the weights "
                            "before rounding): drop one of the two")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer={self.optimizer!r}; choose AdamW, Prodigy, AdamW_ScheduleFree, "
                            f"Adafactor, Lion or Lion8bit")
        if self.schedule_free:
            if self.lr_scheduler not in ("constant", "constant_with_warmup"):
                raise UserError(f"--optimizer={self.optimizer} needs no learning-rate schedule (it averages the "
                                f"weights instead): use --lr_scheduler constant, or constant_with_warmup with "
                                f"--lr_warmup_steps for its own warm-up")
            if self.use_ema:
                raise UserError(f"--optimizer={self.optimizer} already averages the weights: drop --use_ema")
            if self.train_text_encoder_ti and self.train_text_encoder_ti_frac < 1:
                raise UserError(f"--optimizer={self.optimizer} keeps moving weights toward its average after their "
                                f"learning rate is 0, so --train_text_encoder_ti_frac={self.train_text_encoder_ti_frac} "
                                f"cannot stop the token embeddings: give --train_text_encoder_ti_frac 1, or use AdamW")
        if self.image_interpolation_mode.lower() not in ("lanczos", "bicubic", "bilinear", "nearest"):
            raise UserError(f"unknown --image_interpolation_mode={self.image_interpolation_mode!r}; "
                            "choose lanczos, bicubic, bilinear or nearest")
        positive = ("train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs", "repeats",
                    "num_new_tokens_per_abstraction",
                    "checkpointing_steps", "num_validation_images", "sample_batch_size", "validation_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)} must be at least 1")
        if self.checkpointing_epochs is not None and self.checkpointing_epochs < 1:
            raise UserError(f"--checkpointing_epochs={self.checkpointing_epochs} must be at least 1 (leave it out to "
                            f"checkpoint by --checkpointing_steps alone)")
        if self.gradient_checkpointing_interval < 1:
            raise UserError(f"--gradient_checkpointing_interval={self.gradient_checkpointing_interval} must be at "
                            f"least 1 (1: every block recomputed)")
        if self.gradient_checkpointing_interval > 1 and not (self.gradient_checkpointing or
                                                             self.auto_gradient_checkpointing):
            raise UserError(f"--gradient_checkpointing_interval={self.gradient_checkpointing_interval} only applies "
                            f"with --gradient_checkpointing: add that flag (or --auto_gradient_checkpointing), or drop "
                            f"the interval")
        if self.selective_checkpointing != "off" and not (self.gradient_checkpointing or
                                                          self.auto_gradient_checkpointing):
            raise UserError(f"--selective_checkpointing={self.selective_checkpointing} only applies with "
                            f"--gradient_checkpointing: add that flag (or --auto_gradient_checkpointing), or drop "
                            f"--selective_checkpointing")
        for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit", "conv_rank", "conv_alpha"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"--{name}={v} must be at least 1")
        if self.sample_prompts:
            self.sample_prompt_rows  # a missing or malformed file says so here, in one line
        for name in ("extra_validation_prompts", "validation_negative_prompt"):
            if getattr(self, name) and not (self.validation_prompt or self.sample_prompts):
                raise UserError(f"--{name} goes with --validation_prompt (the first row of the validation grid): "
                                f"add that flag, or drop --{name}")
        if any(not str(p).strip() for p in self.extra_validation_prompts):
            raise UserError("--extra_validation_prompts holds an empty prompt: give each prompt some text")
        if self.loss_type == "l2" and (self.huber_c != 0.1 or self.huber_schedule != "snr"):
            flag = "--huber_c" if self.huber_c != 0.1 else "--huber_schedule"
            raise UserError(f"{flag} only applies with --loss_type huber or smooth_l1: add that, or drop {flag}")
        if self.train_text_encoder_ti:
            from .pivotal import mentions, token_map

            if self.train_text_encoder:
                raise UserError("--train_text_encoder_ti trains new token embeddings with the text encoders frozen; "
                                "--train_text_encoder trains LoRA on them instead: choose one")
            names = list(token_map(self.token_abstraction, 1))
            if not names:
                raise UserError("--token_abstraction is empty: give the word that names your subject, e.g. TOK")
            missing = [n for n in names if not mentions(self.instance_prompt, n)]
            if missing:
                raise UserError(f"--train_text_encoder_ti: --instance_prompt {self.instance_prompt!r} does not "
                                f"contain --token_abstraction {missing[0]}; write it where the subject goes, e.g. "
                                f"'a photo of {missing[0]} playing billiard'")
        elif self.token_abstraction != "TOK" or self.num_new_tokens_per_abstraction != 2 or \
                self.ti_learning_rate != 3e-4 or self.train_text_encoder_ti_frac != 0.5:
            raise UserError("--token_abstraction, --num_new_tokens_per_abstraction, --ti_learning_rate and "
                            "--train_text_encoder_ti_frac apply with --train_text_encoder_ti: add that flag, or drop "
                            "them")
        from .lora import BLORA_BLOCKS, unet_lora_layers

        if not unet_lora_layers(self.lora_layers):
            raise UserError("--lora_layers is empty: give attn (the default), ff, proj or module names")
        if (self.hub_model_id is not None or self.hub_private_repo) and not self.push_to_hub:
            raise UserError("--hub_model_id and --hub_private_repo set the repo --push_to_hub uploads to: add "
                            "--push_to_hub, or drop them")
        if self.use_blora and self.lora_unet_blocks:
            raise UserError(f"--use_blora trains the blocks {', '.join(BLORA_BLOCKS)}; --lora_unet_blocks="
                            f"{self.lora_unet_blocks} names others: give one of the two")
        if self.lora_unet_blocks is not None and not self.unet_blocks:
            raise UserError("--lora_unet_blocks is empty: give UNet blocks, e.g. up_blocks.0.attentions.1, or leave "
                            "it out for all of them")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise UserError(f"--conv_alpha={self.conv_alpha} goes with --conv_rank (the convolutions' rank): add "
                            f"that, or drop --conv_alpha")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise UserError(f"--min_timestep={self.min_timestep} and --max_timestep={self.max_timestep}: timesteps "
                            f"are drawn from min (0 or more) up to max (above min), e.g. 200 and 1000")
        self._check_noise_recipe()
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise UserError(f"unknown --prediction_type={self.prediction_type!r}; choose epsilon or v_prediction")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise UserError("--zero_terminal_snr trains the last timestep on pure noise, where an epsilon model has "
                            "nothing to predict: add --prediction_type v_prediction (or leave it to the model's)")
        if self.keep_tokens and not self.shuffle_caption:
            raise UserError(f"--keep_tokens={self.keep_tokens} keeps the first tags in place when --shuffle_caption "
                            f"shuffles the rest: add --shuffle_caption, or drop --keep_tokens")
        if self.ema_decay != EMA_DECAY and not self.use_ema:
            raise UserError(f"--ema_decay={self.ema_decay} only applies with --use_ema: add that flag, or drop "
                            f"--ema_decay")
        if self.cache_latents_to_disk and not self.cache_latents:
            raise UserError("--cache_latents_to_disk keeps the latent cache on disk: drop --cache_latents=false, "
                            "or drop --cache_latents_to_disk")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate={self.learning_rate} must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout={self.lora_dropout} must be in [0, 1)")
        from .lora_tools import validate_init_lora_weights

        validate_init_lora_weights(self.init_lora_weights, use_dora=self.use_dora)
        if self.init_lora and self.init_lora_weights not in ("gaussian", "true", "True"):
            raise UserError(f"--init_lora starts from {self.init_lora}'s weights: drop "
                            f"--init_lora_weights={self.init_lora_weights}")
        self._check_lora_type()
        if self.report_to not in ("tensorboard", "wandb", "none", "all"):
            raise UserError(f"--report_to={self.report_to!r}: this trainer logs to tensorboard, wandb, all or none")

    @property
    def kohya_class_folder(self) -> bool:
        """--class_data_dir is a regularisation folder in kohya's layout (``1_person/``: prompts from the folder
        names or .txt files, repeats from the numbers; its images are used as they are, none generated)."""
        from .data import is_kohya_layout

        folder = Path(self.class_data_dir).expanduser() if self.class_data_dir else None
        return folder is not None and folder.is_dir() and is_kohya_layout(folder)

    @property
    def unet_blocks(self) -> list[str]:
        """The UNet blocks the LoRA is confined to (--use_blora, --lora_unet_blocks); empty: all."""
        from .lora import BLORA_BLOCKS, parse_unet_blocks

        return list(BLORA_BLOCKS) if self.use_blora else parse_unet_blocks(self.lora_unet_blocks or "")

    @property
    def conv_alpha_value(self) -> int | None:
        """The convolutions' alpha where --conv_rank sets their rank (None: the layers' common --rank/alpha)."""
        if self.conv_rank is None:
            return None
        return self.conv_alpha if self.conv_alpha is not None else self.conv_rank

    def _check_lora_type(self) -> None:
        """--lora_type loha/lokr (LyCORIS): the LoRA-only options refused, each in one line."""
        if self.lora_type not in ("lora", "loha", "lokr"):
            hint = " (SimpleTuner's lycoris preset is a LoKr)" if self.lora_type.lower() == "lycoris" else ""
            raise UserError(f"unknown --lora_type={self.lora_type!r}; choose lora, loha or lokr{hint}")
        if self.lokr_factor != -1 and self.lora_type != "lokr":
            raise UserError(f"--lokr_factor={self.lokr_factor} applies with --lora_type lokr: add that, or drop "
                            f"--lokr_factor")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"--lokr_factor={self.lokr_factor}: give a size of the small factor (e.g. 8, 16), or -1")
        if self.lora_type == "lora":
            return
        lora_only = [("use_dora", self.use_dora, "DoRA is a variant of LoRA"),
                     ("loraplus_lr_ratio", self.loraplus_lr_ratio, "LoRA+ speeds up LoRA's B matrices, which LoHa "
                      "and LoKr do not have"),
                     ("init_lora", self.init_lora, "it starts from a LoRA file's weights"),
                     ("lora_dropout", self.lora_dropout, "LoHa and LoKr train without dropout here"),
                     ("init_lora_weights", self.init_lora_weights not in ("gaussian", "true", "True"),
                      "the SVD-based initialisations are LoRA's"),
                     ("output_kohya_format", self.output_kohya_format, "the LoHa/LoKr file already is in the "
                      "kohya/LyCORIS format ComfyUI and A1111 read")]
        for flag, value, why in lora_only:
            if value:
                raise UserError(f"--{flag} does not apply to --lora_type {self.lora_type} ({why}): drop --{flag}")

    def _check_noise_recipe(self) -> None:
        """The multi-resolution noise and timestep-bias flags: each only where it applies."""
        if self.multires_noise_discount != 0.3 and not self.multires_noise_iterations:
            raise UserError(f"--multires_noise_discount={self.multires_noise_discount} only applies with "
                            f"--multires_noise_iterations (6-10 is usual): add that, or drop --multires_noise_discount")
        strategy = self.timestep_bias_strategy
        given = [f for f, default in (("timestep_bias_multiplier", 1.0), ("timestep_bias_portion", 0.25),
                                      ("timestep_bias_begin", 0), ("timestep_bias_end", 1000))
                 if getattr(self, f) != default]
        if strategy == "none" and given:
            raise UserError(f"--{given[0]} only applies with --timestep_bias_strategy later, earlier or range: add "
                            f"that, or drop --{given[0]}")
        wrong = [f for f in given if (f == "timestep_bias_portion") == (strategy == "range") and
                 f != "timestep_bias_multiplier"]
        if strategy != "none" and wrong:
            goes = "later or earlier" if wrong[0] == "timestep_bias_portion" else "range"
            raise UserError(f"--{wrong[0]} goes with --timestep_bias_strategy {goes}, not {strategy}: drop it, or "
                            f"change the strategy")
        if strategy == "range" and not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
            raise UserError(f"--timestep_bias_begin={self.timestep_bias_begin} and --timestep_bias_end="
                            f"{self.timestep_bias_end}: the range runs from begin (0 or more) up to end (above "
                            f"begin), e.g. 200 and 500")

    def _check_ranges(self) -> None:
        """Values no run can use (libraries would stop with a traceback, or train silently to no effect)."""
        for name, choices in _choices().items():  # a notebook's TrainConfig(mixed_precision="fp32") too
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UserError(f"--{name}={value!r} must be one of {', '.join(choices)}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UserError(f"--seed={self.seed} must be between 0 and {2**32 - 1}")
        for name in ("adam_beta1", "adam_beta2", "prodigy_beta3"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise UserError(f"--{name}={v} must be in [0, 1) (e.g. 0.9 or 0.999)")
        checks = [  # (name, value, ok, what it must be)
            ("adam_epsilon", self.adam_epsilon, self.adam_epsilon > 0, "positive (e.g. 1e-8)"),
            ("dataloader_num_workers", self.dataloader_num_workers, self.dataloader_num_workers >= 0,
             "0 or more"),
            ("lora_alpha", self.lora_alpha, self.lora_alpha is None or self.lora_alpha > 0,
             "positive (the LoRA is scaled by alpha / rank: 0 switches it off)"),
            ("lr_num_cycles", self.lr_num_cycles, self.lr_num_cycles >= 1, "at least 1"),
            ("snr_gamma", self.snr_gamma, self.snr_gamma is None or self.snr_gamma > 0, "positive (5.0 recommended)"),
            ("huber_c", self.huber_c, 0 < self.huber_c <= 1, "in (0, 1] (0.1 is usual)"),
            ("caption_dropout_rate", self.caption_dropout_rate, 0 <= self.caption_dropout_rate < 1,
             "in [0, 1) (0.05-0.1 is usual)"),
            ("text_encoder_lr", self.text_encoder_lr, self.text_encoder_lr > 0, "positive"),
            ("ti_learning_rate", self.ti_learning_rate, self.ti_learning_rate > 0, "positive (3e-4 is usual)"),
            ("loraplus_lr_ratio", self.loraplus_lr_ratio, self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
             "positive (16 is the LoRA+ paper's suggestion)"),
            ("train_text_encoder_ti_frac", self.train_text_encoder_ti_frac, 0 < self.train_text_encoder_ti_frac <= 1,
             "in (0, 1] (0.5: the first half of the steps)"),
            ("noise_offset", self.noise_offset, self.noise_offset >= 0, "0 or more (0.05-0.1 is usual)"),
            ("multires_noise_iterations", self.multires_noise_iterations, self.multires_noise_iterations >= 0,
             "0 or more (6-10 is usual)"),
            ("multires_noise_discount", self.multires_noise_discount, 0 < self.multires_noise_discount < 1,
             "in (0, 1) (0.3 is kohya's default)"),
            ("keep_tokens", self.keep_tokens, self.keep_tokens >= 0, "0 or more"),
            ("input_perturbation", self.input_perturbation, self.input_perturbation >= 0,
             "0 or more (0.1 is usual)"),
            ("timestep_bias_multiplier", self.timestep_bias_multiplier, self.timestep_bias_multiplier > 0,
             "positive (2.0 draws the biased timesteps twice as often; --timestep_bias_strategy none turns the bias "
             "off)"),
            ("timestep_bias_portion", self.timestep_bias_portion, 0 < self.timestep_bias_portion <= 1,
             "in (0, 1] (0.25: a quarter of the timesteps)"),
            ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "positive (1.0 is usual)"),
            ("scale_weight_norms", self.scale_weight_norms, self.scale_weight_norms is None or
             self.scale_weight_norms > 0, "positive (1.0 is usual; leave it out for no max-norm regularization)"),
            ("validation_guidance_scale", self.validation_guidance_scale, self.validation_guidance_scale >= 0,
             "0 or more (1 or less turns guidance off; 5 is SDXL's default)"),
            ("ema_decay", self.ema_decay, 0.0 <= self.ema_decay <= 1.0, "in [0, 1] (e.g. 0.9999, or 0.99 for a "
             "shorter average)"),
            ("prior_loss_weight", self.prior_loss_weight, self.prior_loss_weight >= 0, "0 or more"),
            ("lr_warmup_steps", self.lr_warmup_steps, self.lr_warmup_steps >= 0, "0 or more"),
            ("lr_power", self.lr_power, self.lr_power > 0, "positive"),
            ("adam_weight_decay", self.adam_weight_decay, self.adam_weight_decay >= 0, "0 or more"),
            ("adam_weight_decay_text_encoder", self.adam_weight_decay_text_encoder,
             self.adam_weight_decay_text_encoder >= 0, "0 or more"),
            ("crops_coords_top_left_h", self.crops_coords_top_left_h, self.crops_coords_top_left_h >= 0, "0 or more"),
            ("crops_coords_top_left_w", self.crops_coords_top_left_w, self.crops_coords_top_left_w >= 0, "0 or more"),
        ]
        for name, value, ok, what in checks:
            if not ok:
                raise UserError(f"--{name}={value} must be {what}")

    # ------------------------------------------------------------------ conveniences
    @property
    def validation_prompts(self) -> list[str]:
        """The validation grid's rows: --validation_prompt, then --extra_validation_prompts (none without the first),
        then the --sample_prompts file's."""
        return [row.prompt for row in self.validation_rows]

    @property
    def validation_rows(self) -> list:
        """The validation grid's rows as ``SamplePrompt``s (a file's rows with their own settings)."""
        from .sample_prompts import SamplePrompt

        given = [self.validation_prompt, *self.extra_validation_prompts] if self.validation_prompt else []
        return [SamplePrompt(p) for p in given] + self.sample_prompt_rows

    @property
    def sample_prompt_rows(self) -> list:
        if not self.sample_prompts:
            return []
        from .sample_prompts import read_sample_prompts

        return read_sample_prompts(self.sample_prompts)[0]

    @property
    def alpha(self) -> int:
        """LoRA alpha actually used (alpha/rank scales the update)."""
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """The aspect-ratio buckets as (h, w) pixels, or None: every image cropped to the square --resolution."""
        if not (self.use_aspect_ratio_buckets or self.aspect_ratio_buckets):
            return None
        from .data import parse_buckets

        return parse_buckets(self.aspect_ratio_buckets or "auto", self.resolution)

    @property
    def trackers(self) -> list[str]:
        """The loggers --report_to names: tensorboard, wandb, both (all) or none."""
        return {"none": [], "all": ["tensorboard", "wandb"]}.get(self.report_to, [self.report_to])

    @property
    def schedule_free(self) -> bool:
        """--optimizer AdamW_ScheduleFree (either spelling)."""
        return self.optimizer.lower() in SCHEDULE_FREE

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.kaggle_splits.split(",") if s.strip())

    def with_absolute_paths(self) -> "TrainConfig":
        """The config with each local path among ``LOCAL_PATH_FIELDS`` made absolute (Hub ids stay as they are), so
        that config.json, the model card and the LoRA's header still name the model and data from another folder:
        ``generate --lora RUN`` reads the base model from there."""
        changes = {}
        for name in LOCAL_PATH_FIELDS:
            value = getattr(self, name)
            if value and os.path.exists(os.path.expanduser(value)):
                absolute = os.path.abspath(os.path.expanduser(value))
                if absolute != value:
                    changes[name] = absolute
        return self.replace(**changes) if changes else self

    @property
    def micro_batch_size(self) -> int:
        """The batch one forward and backward runs: --train_batch_size, or with --fold_accumulation the batch of
        a whole optimizer step."""
        return self.train_batch_size * (self.gradient_accumulation_steps if self.fold_accumulation else 1)

    @property
    def micro_steps(self) -> int:
        """Forward-and-backward passes per optimizer step, as they run (1 with --fold_accumulation)."""
        return 1 if self.fold_accumulation else self.gradient_accumulation_steps

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON (atomically)."""
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}  # as flags: either
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            raise UserError(f"{source}: unknown setting {k!r}{_closest(k, names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, hints[k], v, source) for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML or JSON config file whose keys are the field names."""
        return cls.from_dict(_read_config_file(path), source=str(path))

    @classmethod
    def seed_recipe(cls, **overrides: Any) -> "TrainConfig":
        """The settings of the run this project reproduces (diffusers' script on Colab, messi playing billiard)."""
        values = dict(
            pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0",
            pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix",
            dataset_name="billiard", caption_column="prompt", output_dir="messi_billiard_LoRA",
            mixed_precision="fp16", instance_prompt="a photo of messi playing billiard", resolution=1024,
            train_batch_size=1, gradient_accumulation_steps=3, gradient_checkpointing=True, learning_rate=1e-4,
            snr_gamma=5.0, lr_scheduler="constant", lr_warmup_steps=0, use_8bit_adam=True, max_train_steps=500,
            checkpointing_steps=717, seed=0,
        )
        values.update(overrides)
        return cls(**values)


# ---------------------------------------------------------------------- command line
# Flags that name a local file or folder when one exists by that name (else a Hub id, or unset)
LOCAL_PATH_FIELDS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "instance_data_dir",
                     "class_data_dir", "init_lora", "sample_prompts", "single_file_config")


def same_setting(name: str, a: Any, b: Any) -> bool:
    """Whether two values of setting ``name`` mean the same; a path typed relative and the same path made absolute
    do (config.json records absolute paths since they were made so; older runs kept them as typed)."""
    if a == b:
        return True
    if name in LOCAL_PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return False


@functools.lru_cache(maxsize=1)
def _choices() -> dict[str, tuple]:
    """The settings with a fixed set of values (Literal[...] fields) and those values."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union \
            else [hint]
        if args and typing.get_origin(args[0]) is Literal:
            out[name] = typing.get_args(args[0])
    return out


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(name: str, hint: Any, value: Any, source: str) -> Any:
    """A config file's value as the setting's type, as its command-line flag would parse it; one ``UserError``
    naming the file and the setting for a value that is not one. (YAML reads ``1e-4`` as a string and ``"false"``
    is a string: a bare ``cls(**data)`` trained with those silently wrong, or failed with a TypeError.)"""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise UserError(f"{source}: {name} cannot be empty (null)")
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    where = f"{source}: {name}: "
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value is False and "off" in choices:  # YAML reads a bare off as false
            value = "off"
        if value not in choices:
            raise UserError(f"{where}{value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise UserError(f"{where}expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"{where}expected a whole number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number.is_integer():
            raise UserError(f"{where}expected a whole number, got {value!r}")
        return int(number)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}expected text, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is list:  # extra_validation_prompts: a list of text, or one text
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in items):
            raise UserError(f"{where}expected a list of text, got {value!r}")
        return [str(v) for v in items]
    return value


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # a syntax error in the user's file: say where
        raise UserError(f"--config {p}: cannot parse it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {p}: expected a mapping of setting names to values")
    return {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}  # as flags: - or _


class _Parser(argparse.ArgumentParser):
    """argparse that names the closest valid flag for a typo, and never prints a traceback."""

    def error(self, message: str):  # noqa: D401 - argparse API
        if "unrecognized arguments:" in message:
            bad = message.split(":", 1)[1].split()
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            hints = []
            for b in bad:
                if b.startswith("--"):
                    hints.append(b.split("=")[0] + _closest(b.split("=")[0], flags))
            if hints:
                message = "unrecognized arguments: " + ", ".join(hints)
        # One line through cli_entry ("error: ..."), not the 80-line usage: the full list is in --help.
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = "python -m billiard_lora.train") -> argparse.ArgumentParser:
    """The CLI for ``TrainConfig``: one ``--flag`` per field, built with transformers' HfArgumentParser rules."""
    from transformers import HfArgumentParser

    class Parser(_Parser, HfArgumentParser):
        pass

    parser = Parser(TrainConfig, prog=prog, allow_abbrev=False, description="DreamBooth + LoRA fine-tuning of SDXL "
                    "(flags as in diffusers' train_dreambooth_lora_sdxl.py).")
    # an Optional[bool] field left unset means "decide" (--cuda_graphs): a bare flag asks for it, "false" refuses it
    for f in dataclasses.fields(TrainConfig):
        if f.type in (Optional[bool], "Optional[bool]"):
            action = parser._option_string_actions[f"--{f.name}"]
            action.nargs, action.const = "?", True
    # HfArgumentParser adds every field; NOT_FLAGS are outputs, not inputs.
    for action in [a for a in parser._actions if a.dest in NOT_FLAGS]:
        parser._remove_action(action)
        for group in parser._action_groups:  # --help lists the groups' actions, not the parser's
            if action in group._group_actions:
                group._group_actions.remove(action)
        for opt in action.option_strings:
            parser._option_string_actions.pop(opt, None)
    for action in parser._actions:  # HfArgumentParser gives --no_X the help of --X, which then reads backwards
        negative = next((o for o in action.option_strings if o.startswith("--no_")), None)
        if negative:
            # (%(default).0s prints nothing: it keeps the formatter from adding its own "(default: False)")
            action.help = f"turn off --{negative[len('--no_'):]} (on by default)%(default).0s"
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings; flags given here override it.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch
    # diffusers' flags this trainer does not take: recognised, so a copied command gets a reason, not "unrecognized"
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help=argparse.SUPPRESS)
    for flag in UNSUPPORTED_FLAGS:
        parser.add_argument(f"--{flag}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return parser


# diffusers' train_dreambooth_lora_sdxl.py flags that are refused, and what to do instead
UNSUPPORTED_FLAGS = {
    "hub_token": "a token on the command line ends up in shell history and logs; run `hf auth login` once",
    "dataset_config_name": "hub dataset configurations are not supported; give the dataset's folder or id instead",
    "do_edm_style_training": "EDM-style training (Playground v2.5) is not supported; train an SDXL base model",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse a command line (the same flags as diffusers' script, plus ``--config FILE``) into a ``TrainConfig``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    for flag, why in UNSUPPORTED_FLAGS.items():
        if getattr(ns, flag) is not None:
            raise UserError(f"--{flag}: {why}")
    notes = []
    if ns.enable_xformers_memory_efficient_attention:
        notes.append("--enable_xformers_memory_efficient_attention: not needed, PyTorch's scaled-dot-product attention "
                     "(flash / memory-efficient kernels) is used")
    skip = ("config", "local_rank", "enable_xformers_memory_efficient_attention", *UNSUPPORTED_FLAGS, *NOT_FLAGS)
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    if notes:
        values["fallbacks"] = notes
    if ns.config:
        # File values fill in whatever the command line did not set explicitly.
        file_values = _read_config_file(ns.config)
        defaults = {k: v for k, v in vars(parser.parse_args([])).items()}
        explicit = {k for k, v in values.items() if v != defaults.get(k)}
        merged = dict(file_values)
        merged.update({k: values[k] for k in explicit})
        for k, v in values.items():
            merged.setdefault(k, v)
        return TrainConfig.from_dict(merged, source=ns.config)
    return TrainConfig(**values)
