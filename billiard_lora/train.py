"""DreamBooth + LoRA training of SDXL: ``train(config) -> output_dir``, readable top to bottom.

    python -m billiard_lora.train --pretrained_model_name_or_path=... --instance_prompt="a photo of sks dog" ...
    accelerate launch -m billiard_lora.train ...        # several GPUs (or CPU processes)

The flags are those of diffusers' ``train_dreambooth_lora_sdxl.py``. What differs, on purpose: images are audited
before any model loads; random flips and crops are re-drawn every epoch; every random number comes from a
generator seeded by (seed, epoch, batch, process), so a resumed run continues exactly as an uninterrupted one;
checkpoints hold only the LoRA (not a 10 GB UNet) and appear atomically.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io as _io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from .caches import LatentCache, LatentStore, PromptCache, TimeIdCache, count_views
from .conditioning import compute_time_ids, encode_prompt, tokenize
from .config import MIN_LR_SCHEDULERS, TrainConfig, parse_args, same_setting
from .errors import OUT_OF_MEMORY, UserError, cli_entry, out_of_memory_detail
from .graphs import MicroStepGraph
from .io import atomic_write_json, atomic_write_text, nearest_existing, publish_dir
from .lora import CHECKPOINT_PREFIX, lora_parameters, unet_lora_layers  # (the prefix: shared with generate/evaluate)
from .noising import draw_timesteps, multires_noise, timestep_weights
from .optim import make_optimizer
from .paths import cache_dir

Callback = Callable[[dict], None]
STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks it complete
ADAPTER_STATE_FILE = "adapter_state.safetensors"
NO_EMA_DIR = "no_ema"  # --use_ema: the LoRA of the last weights themselves, beside the average's


# ============================================================================ the loop
def explain_out_of_memory(train_fn):
    """``train`` that reports running out of memory as a ``TrainingOutOfMemory``: one line, not a traceback."""

    @wraps(train_fn)
    def wrapper(config: TrainConfig, *args, **kwargs):
        try:
            return train_fn(config, *args, **kwargs)
        except OUT_OF_MEMORY as exc:  # (raised from None: the traceback's frames, and their tensors, are freed)
            raise TrainingOutOfMemory(config, exc) from None

    return wrapper


@explain_out_of_memory
def train(config: TrainConfig, *, components=None, callback: Callback | None = None) -> Path:
    """Train a DreamBooth LoRA for SDXL as ``config`` says; returns the output folder with the LoRA in it.

    ``components`` (a ``models.Components``) skips loading, for notebooks and tests that already hold a model; what
    training changes in how its models run (peft's input cast, the norms' precision) is put back however training
    ends, an error included.
    ``callback`` receives a dict per event: step (loss, lr), validation (images, path), done.
    """
    undo: list[Callable[[], None]] = []
    try:
        return _train(config, components, callback, undo)
    finally:
        for put_back in reversed(undo):
            put_back()


def _train(config: TrainConfig, components, callback: Callback | None, undo: list[Callable[[], None]]) -> Path:
    from accelerate.utils import set_seed

    # ---- 1. settings and data, checked before anything heavy happens or anything is written
    config = config.with_absolute_paths()  # what config.json and the model card record works from any folder
    out = Path(config.output_dir)
    # no --seed: a resumed run goes on with its checkpoint's (drawn at random when it started), else a new random one
    seed = config.seed if config.seed is not None else checkpoint_seed(out, config)
    config = config.replace(seed=seed if seed is not None else random.SystemRandom().randint(0, 2**31 - 1))
    check_output_dir(config, out)
    check_latent_cache_dir(config)
    if config.max_train_steps and (early := find_checkpoint(out, config.resume_from_checkpoint)):  # before loading
        check_steps_left(early, json.loads((early / STATE_FILE).read_text())["global_step"], config.max_train_steps,
                         config)
    init_notes, init_lora = [], None
    if config.init_lora:  # an existing LoRA to go on training: its rank and alpha, checked before anything loads
        from .lora_tools import init_lora_settings

        config, init_notes, init_lora = init_lora_settings(config)
    instance_images = load_training_images(config)
    config = resolve_hardware(config)

    accelerator = make_accelerator(config, out)
    set_seed(config.seed)
    say = _printer(accelerator)
    hub_repo = None
    if config.push_to_hub and accelerator.is_main_process:  # made now: a missing login stops the run before training
        from .hub import create_upload_repo

        hub_repo = create_upload_repo(config.hub_model_id or out.name, private=config.hub_private_repo)
        config = config.replace(hub_model_id=hub_repo)  # the full id (owner/name), for config.json and the card
        say(f"--push_to_hub: the finished run goes to https://huggingface.co/{hub_repo}")
    for note in config.fallbacks:
        say(f"warning: {note}")
    for note in init_notes:
        say(note)

    # ---- 2. models: frozen base in the compute dtype, LoRA adapters in fp32
    # (loaded as the files store them and cast on the way to the GPU: float32 safetensors stay memory-mapped until
    # then, 0.4 GiB of private host memory for SDXL against 6.7 GiB loaded as fp16; benchmarks/bench_load.py)
    if components is None:
        from .models import load_components

        components = load_components(config.pretrained_model_name_or_path,
                                     pretrained_vae_model_name_or_path=config.pretrained_vae_model_name_or_path,
                                     revision=config.revision, variant=config.variant, cache_dir=config.cache_dir,
                                     single_file_config=config.single_file_config)
    c = components
    if config.prediction_type or config.zero_terminal_snr:  # the model's noise schedule, overridden by the flags
        from .models import with_noise_schedule

        c = dataclasses.replace(c, noise_scheduler=with_noise_schedule(
            c.noise_scheduler, prediction_type=config.prediction_type, zero_terminal_snr=config.zero_terminal_snr))
    if c.noise_scheduler.config.get("rescale_betas_zero_snr") and \
            c.noise_scheduler.config.prediction_type != "v_prediction":
        raise UserError("zero terminal SNR (--zero_terminal_snr, or the checkpoint's ztsnr marker) trains the last "
                        "timestep on pure noise, where an epsilon model has nothing to predict: add --prediction_type "
                        "v_prediction if the model is a v-prediction one")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's own VAE overflows in fp16 (black images); the fp16-fix VAE does not, so only that one is cast. Where bf16
    # fell back to fp16 on this GPU, the VAE given was chosen for bf16: cast only if its config says fp16 is safe.
    bf16_fell_back = any(note.startswith(BF16_FALLBACK) for note in config.fallbacks)
    fp16_safe = not getattr(c.vae.config, "force_upcast", True)
    vae_dtype = (weight_dtype if config.pretrained_vae_model_name_or_path and (fp16_safe or not bf16_fell_back)
                 else torch.float32)
    device = accelerator.device
    for m in (c.unet, c.vae, c.text_encoder_one, c.text_encoder_two):
        m.requires_grad_(False)
    with quiet_diffusers():  # diffusers 0.42 warns on every .to(dtype), even with no float32-only modules
        for m, dtype in ((c.unet, weight_dtype), (c.vae, vae_dtype), (c.text_encoder_one, weight_dtype),
                         (c.text_encoder_two, weight_dtype)):
            # one call: each tensor is converted on its way, so the GPU never holds a float32 copy of the UNet
            # (--fp8_base: the UNet reaches the GPU only once stored in float8, below)
            m.to(device=None if config.fp8_base and m is c.unet else device, dtype=dtype)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    class_images = ensure_class_images(config, c, accelerator, weight_dtype) if config.with_prior_preservation else []

    from .lora import MaxNorm, add_lora, peft_state_dict, run_adapters_fused, set_input_casting, unmatched_targets
    from .models import run_norms_in_half
    from .lora_tools import is_mutating_init, validate_init_lora_weights

    init = validate_init_lora_weights(config.init_lora_weights, use_dora=config.use_dora)
    lora_kw = dict(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, use_dora=config.use_dora,
                   init_lora_weights=init, lora_type=config.lora_type, lokr_factor=config.lokr_factor)
    conv_kw = dict(conv_rank=config.conv_rank, conv_alpha=config.conv_alpha_value)  # the UNet's convolutions only
    torch.manual_seed(config.seed)  # the init draws random numbers: a resumed run must rebuild the same adapter
    targets = unet_lora_layers(config.lora_layers)
    if config.unet_blocks:  # --lora_unet_blocks, --use_blora: those layers in those blocks only, by their full names
        from .lora import modules_in_blocks

        targets = modules_in_blocks(c.unet, targets, config.unet_blocks,
                                    "--use_blora" if config.use_blora else "--lora_unet_blocks")
    try:
        add_lora(c.unet, target_modules=targets, **lora_kw, **conv_kw)
    except ValueError as exc:  # peft: no module matches at all, or an initialisation its layers do not have
        first = str(exc).strip().splitlines()[0][:160]
        if "target modules" not in first.lower():
            raise UserError(f"--lora_layers={config.lora_layers} with --init_lora_weights={config.init_lora_weights}: "
                            f"{first} (peft; SVD-based inits are for the Linear layers: attn, ff, proj)") from None
        raise UserError(f"--lora_layers={config.lora_layers}: no layer of this UNet has those names ({first}); "
                        f"use attn, ff, proj, conv or the names of its layers") from None
    if unmatched := unmatched_targets(c.unet, targets):
        raise UserError(f"--lora_layers={config.lora_layers}: {', '.join(unmatched)} names no layer of this UNet; "
                        f"use attn, ff, proj, conv or the names of its layers")
    if config.conv_rank is not None and not any(isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d)
                                                for m in c.unet.modules()):
        raise UserError(f"--conv_rank={config.conv_rank} sets the rank of adapted convolutions, and "
                        f"--lora_layers={config.lora_layers} adapts none: add conv to --lora_layers, or drop "
                        f"--conv_rank")
    text_encoders = [c.text_encoder_one, c.text_encoder_two] if config.train_text_encoder else []
    for te in text_encoders:
        add_lora(te, **lora_kw)
    trainable = [c.unet, *text_encoders]
    for m in trainable:
        for p in lora_parameters(m):
            p.data = p.data.float()  # fp32 master weights for the adapter; autocast does the fp16/bf16 math
    if init_lora is not None:  # --init_lora: the adapters start from that LoRA's weights
        from .lora_tools import load_init_lora

        load_init_lora(init_lora, c.unet, text_encoders)
        say(f"starting from the LoRA in {init_lora.path}")
    pivotal = None
    if config.train_text_encoder_ti:  # new tokens: the tokenizers' copies know them, the encoders learn their rows
        from .pivotal import PivotalTuning, token_map

        pivotal = PivotalTuning(token_map(config.token_abstraction, config.num_new_tokens_per_abstraction),
                                c.tokenizers, c.text_encoders, config.seed)
        undo.append(pivotal.undo)
        c = dataclasses.replace(c, tokenizer_one=pivotal.tokenizers[0], tokenizer_two=pivotal.tokenizers[1])
        instance_images = [dataclasses.replace(im, caption=pivotal.insert(im.caption)) for im in instance_images]
        say("--train_text_encoder_ti: " + ", ".join(f"{k} -> {''.join(v)}" for k, v in pivotal.mapping.items())
            + f" in prompts and captions; their embeddings train at --ti_learning_rate={config.ti_learning_rate}")
    if config.fp8_base:  # the frozen UNet's Linear/Conv weights in float8, cast up as each layer runs
        from .models import store_weights_in_fp8

        store_weights_in_fp8(c.unet, weight_dtype)
    skip_upcast = weight_dtype != torch.float32 and not config.use_dora  # training's forwards all run in autocast
    set_input_casting(trainable, enabled=not skip_upcast)  # same numbers, fewer operations (see set_input_casting)
    undo.append(lambda: set_input_casting(trainable, enabled=True))  # a caller's model works outside autocast again
    if config.half_precision_norms and weight_dtype != torch.float32:
        undo.append(run_norms_in_half(c.unet))
    fused_ops = None
    if config.fused_lora_ops:  # base layer + LoRA as one autograd operation: the same math, fewer kernels
        # (and the adapters cast to the compute dtype once per optimizer step, not in every forward and recompute:
        # left to inductor when compiling)
        fused_ops = run_adapters_fused(trainable, half_copies=weight_dtype != torch.float32
                                       and config.torch_compile == "none")
        undo.append(fused_ops)
    # --scale_weight_norms: each layer's weight change capped after every optimizer step (kohya's max-norm)
    max_norm = MaxNorm(trainable, config.scale_weight_norms) if config.scale_weight_norms is not None else None
    # PiSSA/OLoRA moved part of each base weight into the adapter: what we save is the change training makes
    # relative to this starting point, a LoRA that fits the unmodified base model.
    pissa_initial = None
    if is_mutating_init(init):
        pissa_initial = {name: {k: v.detach().clone() for k, v in peft_state_dict(m).items()}
                         for name, m in zip(("unet", "text_encoder", "text_encoder_2"), trainable)}

    if config.sample_prompts:  # what of kohya's per-prompt options the validation grid leaves out
        from .sample_prompts import read_sample_prompts

        for note in read_sample_prompts(config.sample_prompts)[1]:
            say(note)

    # ---- 3. prompt embeddings, computed once per distinct caption when the text encoders are frozen
    prompt_cache = None
    # (--shuffle_caption: a caption's tags come in a new order each epoch; the frozen encoders encode them in the step)
    if not (config.train_text_encoder or config.train_text_encoder_ti or config.shuffle_caption):
        captions = {im.caption for im in instance_images} | {im.caption for im in class_images}
        prompt_cache = PromptCache.build(sorted(captions), c, device)
        if device.type == "cuda":
            # frozen and no longer needed until validation: 1.6 GB of fp16 weights off the GPU
            c.text_encoder_one.to("cpu")
            c.text_encoder_two.to("cpu")
    if config.fp8_base:
        c.unet.to(device)  # now 2.6 instead of 5.2 GB (SDXL), and after the text encoders left

    # ---- 4. how the UNet runs: gradient checkpointing (decided by trial steps if asked), compilation
    # (without LoRA dropout the UNet draws no random numbers: no RNG state to save, which a CUDA graph records only
    # from PyTorch 2.10 on)
    # reentrant where it applies (see checkpoint_unet), except where DDP must look for parameters without
    # gradients (text-encoder training on several processes): its search cannot follow reentrant checkpoints
    # (with CUDA graphs, which bypass DDP, the same form keeps the numbers equal to DDP's)
    ddp_unused = config.train_text_encoder and accelerator.num_processes > 1
    # with --lora_dropout the recompute must draw the forward's masks again: RNG state saved (recorded, in a graph)
    keep_rng = not config.cuda_graphs or config.lora_dropout > 0
    unet_checkpointing = partial(checkpoint_unet, c.unet, reentrant=config.torch_compile == "none" and not ddp_unused,
                                 preserve_rng_state=keep_rng, selective=config.selective_checkpointing)
    if config.auto_gradient_checkpointing:
        def trial(interval: int, selective: str) -> bool:
            unet_checkpointing(interval=interval, selective=selective)
            return fits_in_memory(config, c, text_encoders, prompt_cache, accelerator, weight_dtype,
                                  size=largest_view(instance_images, config))

        interval, selective, tried = choose_checkpointing(config, trial)
        # what runs, as config.json will record it
        config = config.replace(gradient_checkpointing=interval > 0,
                                gradient_checkpointing_interval=interval or config.gradient_checkpointing_interval,
                                selective_checkpointing=selective if interval else "off")
        say(f"--auto_gradient_checkpointing: trial step{'s' if len(tried) > 1 else ''} {', '.join(tried)}; "
            f"training {describe_checkpointing(interval, selective)}")
    unet_checkpointing(interval=config.gradient_checkpointing_interval if config.gradient_checkpointing else 0,
                       selective=config.selective_checkpointing)
    if config.gradient_checkpointing:
        for te in text_encoders:
            checkpoint_text_encoder(te, preserve_rng_state=keep_rng, interval=config.gradient_checkpointing_interval)
    compile_unet(c.unet, config.torch_compile, mode=config.torch_compile_mode)

    # ---- 5. latents: each view VAE-encoded once; the dataloader
    def vae_off_gpu() -> None:  # every view is cached: the VAE is needed again only for validation images
        if device.type == "cuda":
            c.vae.to("cpu")
            torch.cuda.empty_cache()  # and the blocks its 1024 px encodes held
            say("all training views are cached: the VAE leaves the GPU until validation")

    store = None
    if config.cache_latents and config.cache_latents_to_disk:
        store = LatentStore(latent_cache_root(config), c.vae, say=say)
        say(f"latent cache on disk: {store.folder}")
    # Workers hold copies of the dataset that never see the cache fill up: only the main process skips pixels.
    in_main_process = config.dataloader_num_workers == 0
    dataset = DreamBoothDataset(instance_images, class_images, config,
                                cached=(lambda key: key in latent_cache) if in_main_process else None)
    views = dataset.views()
    shapes = len(set(dataset.instance_targets))
    if shapes > 1:
        say(f"aspect-ratio buckets: {shapes} shapes in use ("
            + ", ".join(f"{h}x{w}" for h, w in sorted(set(dataset.instance_targets))) + ", height x width)"
            + ("; --torch_compile compiles again for each new shape, on its first batch" if config.torch_compile !=
               "none" else ""))
    elif config.buckets and len(config.buckets) == 1:
        (h, w), = config.buckets
        say(f"warning: the aspect-ratio buckets at --resolution {config.resolution} hold only {h}x{w}: every image "
            f"is cropped to it, as without buckets")
    latent_cache = LatentCache(c.vae, device, enabled=config.cache_latents, say=say, store=store,
                               views=count_views([im for im, _ in views], config, targets=[t for _, t in views]),
                               on_complete=vae_off_gpu)
    time_id_cache = TimeIdCache(config.resolution, weight_dtype, device)
    sampler = EpochShuffleSampler(len(dataset), config.seed)
    # Its own generator: creating a DataLoader iterator then draws from it, not from the global RNG that
    # LoRA dropout uses (otherwise a resumed run would draw different dropout masks).
    loader_kw = dict(collate_fn=collate, num_workers=config.dataloader_num_workers,
                     generator=torch.Generator().manual_seed(config.seed),
                     # a Ctrl-C reaches the workers too: they keep loading while the step under way finishes
                     worker_init_fn=ignore_stop_signals if config.dataloader_num_workers else None)
    if shapes > 1:  # a batch holds one bucket's views (with one shape in use, the order is the plain one's)
        dataloader = DataLoader(dataset, batch_sampler=BucketBatchSampler(sampler, dataset.target,
                                                                          config.micro_batch_size), **loader_kw)
    else:
        dataloader = DataLoader(dataset, batch_size=config.micro_batch_size, sampler=sampler, **loader_kw)

    # ---- 6. optimizer and schedule
    steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / config.micro_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    optimizer = make_optimizer(config, c.unet, text_encoders, accelerator.num_processes,
                               embeddings=pivotal.params() if pivotal else ())
    lr_scheduler = make_lr_scheduler(config, optimizer, max_train_steps, accelerator.num_processes)
    if config.fp8_base and accelerator.num_processes > 1:
        # DDP would broadcast every weight from process 0 at start; the float8 ones are frozen and loaded alike by
        # every process, and gloo cannot send float8 at all
        from torch.nn.parallel import DistributedDataParallel

        from .models import FP8

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            c.unet, [n for n, p in c.unet.named_parameters() if p.dtype == FP8])
    unet, optimizer, dataloader, lr_scheduler, *text_encoders = accelerator.prepare(
        c.unet, optimizer, dataloader, lr_scheduler, *text_encoders)
    te_one, te_two = (text_encoders if text_encoders else (c.text_encoder_one, c.text_encoder_two))
    steps_per_epoch = math.ceil(len(dataloader) / config.micro_steps)  # now per process
    register_checkpoint_hooks(accelerator, {"unet": unet, "text_encoder": text_encoders[0] if text_encoders else None,
                                            "text_encoder_2": text_encoders[1] if text_encoders else None},
                              pivotal)
    # what trains: the LoRA and any new token embeddings (the latter outside DDP's modules)
    embeddings = pivotal.params() if pivotal else []
    adapters = [p for m in (unet, *text_encoders) for p in lora_parameters(m)] + embeddings
    ema = None
    if config.use_ema:  # the average of the adapters' weights, saved in each checkpoint (custom_checkpoint_0.pkl)
        from .optim import AdapterEMA

        ema = AdapterEMA(adapters, config.ema_decay, on_change=fused_ops.refresh if fused_ops else None)
        accelerator.register_for_checkpointing(ema)
    averaged = ema.applied if ema is not None else contextlib.nullcontext  # what is saved and validated
    if config.schedule_free:  # its averaged weights, as the optimizer's eval() mode computes them
        from .optim import ScheduleFreeAverage

        optimizer.train()
        averaged = ScheduleFreeAverage(optimizer, adapters, on_change=fused_ops.refresh if fused_ops else None).applied

    # ---- 7. resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = find_checkpoint(out, config.resume_from_checkpoint)
    if checkpoint is not None:
        check_checkpoint_compatible(checkpoint, config)
        accelerator.load_state(str(checkpoint))
        global_step = json.loads((checkpoint / STATE_FILE).read_text())["global_step"]
        first_epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        skip_batches = step_in_epoch * config.micro_steps
        check_steps_left(checkpoint, global_step, max_train_steps, config)
        say(f"resuming from {checkpoint} at step {global_step} (epoch {first_epoch}, skipping {skip_batches} batches)")
        config = reconcile_resumed(config, checkpoint, accelerator.num_processes, say)
    elif config.resume_from_checkpoint:
        say(f"no checkpoint found in {out}; starting a new run")

    # --train_text_encoder_ti_frac: from this step on the token embeddings stay as they are (their learning rate 0,
    # in the scheduler's base rates too, which a checkpoint restores: an update of lr x anything is then exactly 0)
    ti_stop = math.ceil(config.train_text_encoder_ti_frac * max_train_steps) if pivotal else None

    def freeze_embeddings() -> None:
        group = next(i for i, g in enumerate(optimizer.param_groups) if g["params"][0] is embeddings[0])
        optimizer.param_groups[group]["lr"] = 0.0
        lr_scheduler.scheduler.base_lrs[group] = 0.0

    if ti_stop is not None and global_step >= ti_stop:
        freeze_embeddings()
    if accelerator.is_main_process:
        if checkpoint is None and config.overwrite_output_dir:
            clear_earlier_run(out, say)
        out.mkdir(parents=True, exist_ok=True)
        try:  # first: a logging folder that cannot be made stops the run before config.json is written
            init_trackers(accelerator, config)
        except OSError as exc:
            raise UserError(f"--logging_dir={config.logging_dir}: cannot write there ({exc.strerror or exc}); "
                            f"choose another folder, or --report_to none") from None
        config.save(out / "config.json")
    history = load_history(out) if checkpoint is not None else []
    history = [h for h in history if h["step"] <= global_step]

    def validate(step: int):
        with averaged():
            return run_validation(config, c, unet, te_one, te_two, accelerator, weight_dtype, step, callback,
                                  prompt_map=pivotal.insert if pivotal else None)
    validating = bool(config.validation_prompts)  # (the prompt file is read here, not at every step)
    if global_step == 0 and validating:
        validate(0)  # a baseline: what the base model makes before any training

    # ---- 8. the loop: noise -> timesteps -> predict -> loss -> step
    pays, gain = (COMPILE_PAYS_STEPS_WITH_GRAPHS, "1.2x") if config.cuda_graphs else (COMPILE_PAYS_STEPS, "1.7x")
    if device.type == "cuda" and config.torch_compile == "none" and max_train_steps - global_step >= pays:
        say(f"tip: a run this long trains faster with --torch_compile regional (a few minutes of compiling first; "
            f"{gain} the steps/s on an H100 at the seed's settings, benchmarks/RESULTS.md)")
    if config.gradient_checkpointing and config.selective_checkpointing != "off" and not config.cuda_graphs and \
            config.torch_compile == "none":
        say(f"tip: --selective_checkpointing={config.selective_checkpointing} runs its policy in Python for each "
            f"operation of every checkpointed block, which made training slower here on the CPU (0.87 instead of "
            f"1.20 steps/s, benchmarks/RESULTS.md): it is meant for a micro-step that is recorded (--cuda_graphs, "
            f"on a CUDA GPU) or compiled (--torch_compile)")
    if not config.instance_data_dir and (config.dataset_name or "default").strip() == "default":
        given = "--dataset_name default" if config.dataset_name else "no --instance_data_dir or --dataset_name"
        say(f"{given}: training on the {len(instance_images)} synthetic billiard scenes embedded in data/default "
            f"(a demo set); pass your photos' folder to train on them")
    distinct = len({id(im) for im in instance_images})
    shown = (f", {len(instance_images)} views an epoch with the folders' repeats"
             if distinct < len(instance_images) else "")
    say(f"training on {_count(distinct, 'image')}{shown} ({_count(len(class_images), 'class image')}), "
        f"{_count(max_train_steps, 'step')}, "
        f"batch {config.train_batch_size} x accumulation {config.gradient_accumulation_steps} x "
        f"{accelerator.num_processes} process(es)"
        + (f" (folded: one batch of {config.micro_batch_size} per step)"
           if config.micro_steps < config.gradient_accumulation_steps else "")
        + f", {_precision_words(accelerator.mixed_precision)}, device {device}")
    from tqdm.auto import tqdm

    progress = tqdm(total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    timer, start_step = Timer(device), global_step
    noise_scheduler = c.noise_scheduler
    compiled_graphs = config.torch_compile != "none" and config.torch_compile_mode in CUDA_GRAPH_MODES

    # Several processes with CUDA graphs: the recorded micro-step runs the bare UNet (DDP's reducer cannot be
    # recorded), and the processes average the adapters' gradients once per optimizer step instead, as DDP would.
    average_by_hand = config.cuda_graphs and accelerator.num_processes > 1
    model = accelerator.unwrap_model(unet) if average_by_hand else unet
    encoders = [accelerator.unwrap_model(te) if average_by_hand else te for te in (te_one, te_two)]

    def forward_backward(noisy_latents, timesteps, text_a, text_b, time_ids, target, *extra) -> torch.Tensor:
        """The micro-step's GPU work: predict, score, backpropagate into the adapters (a CUDA graph with --cuda_graphs).

        ``text_a, text_b``: the cached prompt embeddings and pooled embeddings, or, when the text encoders learn
        too, each encoder's token ids, which they encode here (inside the recorded step). ``extra``, in this order
        where on: ``keep`` (B,), --caption_dropout_rate's 1 or 0 per image, by which its text conditioning is
        multiplied; ``mask`` (B, 1, h, w), --masked_loss's weight of each latent pixel's loss."""
        extra = list(extra)
        keep = extra.pop(0) if config.caption_dropout_rate else None
        mask = extra.pop(0) if config.masked_loss else None
        if prompt_cache is None:
            text_a, text_b = encode_prompt(encoders, None, input_ids=[text_a, text_b])
        if keep is not None:
            text_a, text_b = text_a * keep.view(-1, 1, 1), text_b * keep.view(-1, 1)
        model_pred = model(noisy_latents, timesteps, text_a.to(weight_dtype),
                           added_cond_kwargs={"time_ids": time_ids, "text_embeds": text_b.to(weight_dtype)},
                           return_dict=False)[0]
        loss = diffusion_loss(model_pred, target, timesteps, noise_scheduler, config, mask)
        accelerator.backward(loss)
        return loss.detach()

    max_timestep = config.max_timestep or noise_scheduler.config.num_train_timesteps
    if max_timestep > noise_scheduler.config.num_train_timesteps:
        raise UserError(f"--max_timestep={config.max_timestep} is past this model's "
                        f"{noise_scheduler.config.num_train_timesteps} timesteps: give at most that")

    if config.timestep_bias_strategy == "range" and \
            config.timestep_bias_end > noise_scheduler.config.num_train_timesteps:
        raise UserError(f"--timestep_bias_end={config.timestep_bias_end} is past this model's "
                        f"{noise_scheduler.config.num_train_timesteps} timesteps: give at most that")
    bias = timestep_weights(config, noise_scheduler.config.num_train_timesteps)  # None: uniform
    if bias is not None:
        bias = bias.to(device)

    def draw(batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Latents, the noise to predict, the timesteps, and the noise the latents are noised with (the same
        tensor, except with --input_perturbation). Draws added by later options come after the older ones."""
        latents = latent_cache.sample(batch["pixel_values"], batch["keys"], gen, weight_dtype, twins=batch["twins"])
        noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
        if config.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise: learn overall brightness too
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=device,
                                 dtype=latents.dtype)
            if config.noise_offset_random_strength:  # (a draw only such runs make: other runs' draws unchanged)
                offset *= torch.rand((), generator=gen, device=device, dtype=latents.dtype)
            noise += config.noise_offset * offset
        timesteps = draw_timesteps(latents.shape[0], config.min_timestep, max_timestep, bias, gen, device)
        if config.multires_noise_iterations:
            noise = multires_noise(noise, gen, config.multires_noise_iterations, config.multires_noise_discount)
        noised_with = noise
        if config.input_perturbation:
            extra = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
            if config.input_perturbation_random_strength:
                extra *= torch.rand((), generator=gen, device=device, dtype=latents.dtype)
            noised_with = noise + config.input_perturbation * extra
        return latents, noise, timesteps, noised_with

    fold = config.gradient_accumulation_steps // config.micro_steps
    processes, process = accelerator.num_processes, accelerator.process_index
    kept = [torch.zeros((), device=device), torch.ones((), device=device)]  # --caption_dropout_rate: 0 dropped, 1 kept

    def draw_batch(batch: dict, epoch: int, batch_index: int) -> tuple[torch.Tensor, ...]:
        """The batch's latents, noise, timesteps and input noise (``draw``). One generator per micro-batch of
        --train_batch_size, seeded by where training is (nothing to restore on resume); a folded batch draws for
        each micro-batch it holds with the generator that micro-batch has without folding (global batch g: index
        g // processes, process g % processes), so that folding changes how the step runs, not what it computes."""
        parts = micro_batch_rows(len(batch["keys"]), config.train_batch_size, config.with_prior_preservation)
        drawn = []
        for j, rows in enumerate(parts):
            g = (batch_index * processes + process) * fold + j
            gen = seeded_generator(config.seed, epoch, g // processes, g % processes, device)
            drawn.append(draw(batch if len(parts) == 1 else {k: [batch[k][i] for i in rows] for k in DRAWN_KEYS},
                              gen))
        if len(parts) == 1:
            return drawn[0]
        back = torch.tensor([i for rows in parts for i in rows]).argsort().to(device)  # drawn order -> batch order
        return tuple(torch.cat(column)[back] for column in zip(*drawn))

    micro_step = MicroStepGraph(forward_backward, lambda: [*adapters, *(p.grad for p in adapters)],
                                enabled=config.cuda_graphs, say=say)
    accum_loss, accum_n = 0.0, 0
    # Ctrl-C or SIGTERM from here on: the step under way finishes, a checkpoint is saved, then the run stops
    stop = StopRequest()
    undo.append(stop.install())
    for epoch in range(first_epoch, num_epochs):
        batches: Any = dataloader
        start = 0
        if epoch == first_epoch and skip_batches:
            from accelerate import skip_first_batches

            batches, start = skip_first_batches(dataloader, skip_batches), skip_batches
        batches.set_epoch(epoch)  # reaches EpochShuffleSampler: this epoch's order, crops and flips
        for batch_index, batch in enumerate(batches, start=start):
            with accelerator.accumulate(*[unet, *text_encoders]):
                # latents drawn from the cache, noise, timesteps, input noise: (B, 4, H/8, W/8), same, (B,), same
                latents, noise, timesteps, noised_with = draw_batch(batch, epoch, batch_index)
                bsz = latents.shape[0]
                # the forward diffusion process: noise the latents to the sampled timestep
                noisy_latents = noise_scheduler.add_noise(latents, noised_with, timesteps)

                time_ids = time_id_cache.lookup(batch["original_sizes"], batch["crop_top_lefts"],  # (B, 6)
                                                batch["target_sizes"])
                if prompt_cache is not None:
                    text = prompt_cache.lookup(batch["captions"])  # (B, 77, 2048), (B, 1280)
                else:  # the text encoders learn: they encode the token ids (B, 77) inside the micro-step
                    text = [tokenize(tok, batch["captions"]).to(device) for tok in c.tokenizers]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                if compiled_graphs:  # a new iteration: CUDA graphs may reuse the memory of the last one's outputs
                    torch.compiler.cudagraph_mark_step_begin()
                # --caption_dropout_rate: 1 or 0 per image (stacked from tensors on the device: no copy from the host)
                extra = [torch.stack([kept[not d] for d in batch["dropped"]])] if config.caption_dropout_rate else []
                if config.masked_loss:  # (B, 1, h/8, w/8), in batch order as the latents
                    extra.append(batch["masks"].to(device, non_blocking=True))
                loss = micro_step(noisy_latents, timesteps, *text, time_ids, target, *extra)
                # summed on the device: reading a value would make the CPU wait for the GPU every micro-step
                accum_loss, accum_n = accum_loss + loss, accum_n + 1
                if accelerator.sync_gradients:
                    if average_by_hand:
                        average_gradients(adapters, accelerator.num_processes)
                    elif embeddings and accelerator.num_processes > 1:  # DDP averages only its modules' gradients
                        average_gradients(embeddings, accelerator.num_processes)
                    if accelerator.num_processes > 1:
                        # the step's loss over every process's images (not the main process's share), and a NaN
                        # on one process seen by all, so that all stop together
                        accum_loss = accelerator.reduce(accum_loss.detach(), reduction="mean")
                    if not torch.isfinite(accum_loss):  # checked before the step: a NaN never reaches the adapter
                        raise TrainingDiverged(global_step, out, config)
                    accelerator.clip_grad_norm_(adapters, config.max_grad_norm)
                optimizer.step()
                if max_norm is not None and accelerator.sync_gradients:
                    norm_stats = dict(zip(NORM_COLUMNS, max_norm.step()))
                if fused_ops is not None and accelerator.sync_gradients:
                    fused_ops.refresh()  # the adapters' half-precision copies (a replayed graph reads them)
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=not config.cuda_graphs)  # a recorded graph adds into these tensors
                if ema is not None and accelerator.sync_gradients:
                    ema.step()

            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done: log, checkpoint, validate
            global_step += 1
            timer.step(bsz * accum_n * accelerator.num_processes)
            row = {"step": global_step, "epoch": epoch, "loss": float(accum_loss) / accum_n,
                   "lr": lr_scheduler.get_last_lr()[0], **(norm_stats if max_norm is not None else {})}
            accum_loss, accum_n = 0.0, 0
            history.append(row)
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", **(
                {"keys scaled": row["keys_scaled"], "avg key norm": f"{row['mean_key_norm']:.3g}"} if max_norm else {}))
            accelerator.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=global_step)
            if callback and accelerator.is_main_process:
                callback({"event": "step", **row})
            if global_step == ti_stop and global_step < max_train_steps:
                freeze_embeddings()
                say(f"--train_text_encoder_ti_frac={config.train_text_encoder_ti_frac}: the token embeddings stay as "
                    f"they are from step {global_step} on")
            if should_checkpoint(config, global_step, steps_per_epoch):
                save_checkpoint(accelerator, out, global_step, config, unet, text_encoders, history, pissa_initial,
                                averaged, pivotal)
            if validating and should_validate(config, global_step, steps_per_epoch):
                validate(global_step)
            if global_step >= max_train_steps:
                break
            if stop.agreed(accelerator):
                if not should_checkpoint(config, global_step, steps_per_epoch):  # (else saved just above)
                    save_checkpoint(accelerator, out, global_step, config, unet, text_encoders, history,
                                    pissa_initial, averaged, pivotal)
                progress.close()
                accelerator.end_training()
                raise KeyboardInterrupt(f"stopped at step {global_step} {stop.name}: " + interrupted_hint(config))
        if global_step >= max_train_steps:
            break
    stop.uninstall()  # from here a signal stops at once, as before the loop
    progress.close()

    # ---- 9. save: the LoRA (diffusers + kohya), the config, loss history and plot, model card, summary
    accelerator.wait_for_everyone()
    final_images = None
    if validating and not (history and should_validate(config, global_step, steps_per_epoch)):
        final_images = validate(global_step)
    if accelerator.is_main_process:
        save_final(out, config, unet, text_encoders, history, accelerator, pissa_initial, ema, pivotal,
                   averaged=averaged)
        summary = {**timer.summary(global_step), "steps_this_run": global_step - start_step}
        if config.cuda_graphs:
            summary.update(cuda_graph_replays=micro_step.replays, micro_steps=micro_step.calls,
                           cuda_graphs_recorded=len(micro_step.graphs), cuda_graph_failure=micro_step.failure)
        atomic_write_json(out / "summary.json", summary)
        ran = _count(global_step, "step") if not start_step else \
            f"step {global_step} ({global_step - start_step} this run)"
        say(f"done: {ran} in {summary['seconds']:.1f} s, "
            f"{summary['images_per_second']:.2f} images/s, "
            f"peak memory {summary['peak_memory_gb']:.2f} GB ({summary['memory_kind']}); LoRA in {out}")
        if store is not None:
            say(f"latent cache on disk: {store.reads} views read, {store.writes} written ({store.folder})")
        if config.cuda_graphs:
            say(f"--cuda_graphs: {micro_step.replays} of {micro_step.calls} micro-steps replayed a recorded graph"
                + (f" (recording failed: {micro_step.failure})" if micro_step.failure else ""))
        if callback:
            callback({"event": "done", "output_dir": str(out), "summary": summary, "images": final_images})
    accelerator.end_training()
    if hub_repo is not None:  # (a failed upload is one line that says how to upload later; the run is on disk)
        from .hub import upload_run

        say(f"uploaded to {upload_run(out, hub_repo)}")
    return out


# what --auto_gradient_checkpointing tries after no checkpointing: recomputing every 4th, 3rd, then 2nd block
# (before recomputing every block, which needs no trial: the least memory there is)
AUTO_INTERVALS = (4, 3, 2)


def choose_checkpointing(config: TrainConfig, fits: Callable[[int, str], bool]) -> tuple[int, str, list[str]]:
    """The first checkpointing whose trial step ``fits``: (interval, --selective_checkpointing level) -- 0 (none),
    else the largest interval, else every block; with a selective level, the intervals keep its outputs, then every
    block keeping them and the intervals recomputing whole blocks are trials too; the last resort recomputes every
    block whole (the least memory there is). Which of those is faster on a GPU is not measured yet.

    Also returns what each trial found, for the log. A --gradient_checkpointing_interval N > 1 the user gave is
    the only interval tried between none and every block.
    """
    asked, level = config.gradient_checkpointing_interval, config.selective_checkpointing
    intervals = (asked,) if asked > 1 else AUTO_INTERVALS
    candidates = [(0, "off"), *((k, level) for k in intervals)]
    if level != "off":  # every block keeping the level's outputs, then the intervals recomputing whole blocks
        candidates += [(1, level), *((k, "off") for k in intervals)]
    tried = []
    for interval, selective in candidates:
        ok = fits(interval, selective)
        tried.append(f"{describe_checkpointing(interval, selective)} {'fits' if ok else 'does not fit'}")
        if ok:
            return interval, selective, tried
    return 1, "off", tried


def describe_checkpointing(interval: int, selective: str = "off") -> str:
    if interval == 0:
        return "without checkpointing"
    nth = {1: "", 2: "2nd ", 3: "3rd "}.get(interval, f"{interval}th ")
    return f"with checkpointing of every {nth}block" + ("" if selective == "off" else f" ({selective} kept)")


def largest_view(images: Sequence[TrainImage], config: TrainConfig) -> tuple[int, int]:
    """The (h, w) of the largest view training will make: the square resolution, or the largest bucket in use."""
    from .data import nearest_bucket

    buckets = config.buckets
    if not buckets:
        return config.resolution, config.resolution
    return max((nearest_bucket(im.image.width, im.image.height, buckets) for im in images), key=lambda b: b[0] * b[1])


def fits_in_memory(config: TrainConfig, c, text_encoders, prompt_cache, accelerator, weight_dtype,
                   size: tuple[int, int] | None = None) -> bool:
    """One forward and backward of a full-size batch, checkpointed as the UNet is now set: does training fit?
    ``size``: the (h, w) of the largest view (by default the square resolution).

    On a GPU the trial must also leave 15 % of the memory that was free before it (optimizer state, fragmentation
    and validation come later); anywhere, running out of memory means no. Every process must fit. Gradients and
    random-number states are put back, so training goes on exactly as if the trial had not run.
    """
    device = accelerator.device
    cuda = device.type == "cuda"
    batch = config.micro_batch_size * (2 if config.with_prior_preservation else 1)
    height, width = size or (config.resolution, config.resolution)
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)
    if cuda:
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    fits = True
    try:
        with accelerator.autocast():
            if prompt_cache is not None:
                embeds, pooled = prompt_cache.lookup([next(iter(prompt_cache.table))] * batch)
            else:  # the text encoders run in each step: trained (LoRA), or frozen with new token embeddings
                embeds, pooled = encode_prompt(text_encoders or c.text_encoders, c.tokenizers,
                                               [config.instance_prompt] * batch)
            ids = compute_time_ids((height, width), (0, 0), (height, width), dtype=weight_dtype,
                                   device=device).expand(batch, 6)
            noisy = torch.randn(batch, 4, height // 8, width // 8, device=device, dtype=weight_dtype)
            timesteps = torch.full((batch,), 500, device=device)
            pred = c.unet(noisy, timesteps, embeds.to(weight_dtype),
                          added_cond_kwargs={"time_ids": ids, "text_embeds": pooled.to(weight_dtype)},
                          return_dict=False)[0]
        pred.float().square().mean().backward()
        del pred
        if cuda:
            fits = torch.cuda.max_memory_allocated(device) - before <= 0.85 * free
    except OUT_OF_MEMORY:
        fits = False
    finally:
        for m in (c.unet, *c.text_encoders):  # LoRA, and any new token embeddings
            for p in m.parameters():
                if p.requires_grad:
                    p.grad = None
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state_all(rng[1])
            torch.cuda.empty_cache()
    misfits = accelerator.reduce(torch.tensor([0 if fits else 1], device=device), reduction="sum")
    return int(misfits.item()) == 0


# the UNet's blocks that diffusers hands to the gradient-checkpointing function
CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


# --selective_checkpointing: inside a recomputed block, the outputs kept are those of the operations whose
# recomputation costs at least this many FLOPs per output element (torch's FLOP formulas: matrix products,
# convolutions, attention). SDXL: self-attention 4x its tokens (4,096-16,384), a 3x3 convolution 18x its input
# channels (5,760-23,040), the feed-forward's output projection 8x the width (5,120-10,240; a block's last product,
# never kept: see _mark_block_tails), the other linear layers 2x their input width (1,280-2,560), cross-attention over
# the 77 text tokens 308, the LoRA's up-projection 2x its rank.
SELECTIVE_FLOPS_PER_ELEMENT = {"costly": 4096, "products": 512}


def selective_threshold(level: str, unet) -> float | None:
    """FLOPs per output element an operation must cost for --selective_checkpointing=``level`` to keep its output
    (None: off). Never the LoRA's up-projections, whatever their rank: their 2 x rank FLOPs per element make them
    the cheapest products there are, and their outputs are as large as their layer's."""
    if level == "off":
        return None
    ranks = [b.in_features for m in unet.modules() for b in getattr(m, "lora_B", {}).values()
             if hasattr(b, "in_features")]
    return max(SELECTIVE_FLOPS_PER_ELEMENT[level], 2 * max(ranks, default=0) + 1)


def extra_flop_formulas() -> dict:
    """FLOP formulas torch's counter lacks, as ``FlopCounterMode(custom_mapping=...)`` takes them: the CPU's flash
    attention (the GPU's formula: same arguments, same arithmetic)."""
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    gpu = flop_registry.get(torch.ops.aten._scaled_dot_product_flash_attention)
    if op is None or gpu is None:
        return {}

    def cpu_flash(*args, out_val=None, **kwargs):
        return gpu(*args, out_val=out_val, **kwargs)

    cpu_flash._get_raw = True  # (takes tensors, as the registry's own formulas do)
    return {op: cpu_flash}


def _hint(n):
    """An integer of a shape as a number: under torch.compile, the traced size's example value (no symbolic value
    kept; a size without one is specialised, which adds a guard), else the integer itself."""
    if isinstance(n, torch.SymInt):
        node = n.node
        hint = getattr(node, "_hint", None)
        if hint is None:
            hint = getattr(node, "hint", None)
        return int(hint) if hint is not None else int(n)
    return n


def keep_costly_outputs(min_flops_per_element: float, record: dict | None = None, tail: list | None = None):
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: PyTorch's selective activation checkpointing that
    keeps, of the operations a checkpointed block runs, the outputs that cost at least ``min_flops_per_element``
    to recompute, and recomputes the others (norms, activations, additions, casts, the LoRA's rank-r products) in
    backward. ``tail`` (``[depth]``, set by ``_mark_block_tails``' hooks): non-zero while a block's last product
    runs, whose output the non-reentrant checkpoint's recompute never produces (it stops inside it once backward's
    tensors are back), so it is not kept and not counted as recomputed. ``record`` (for benchmarks and tests) adds
    up, over the forwards it sees (under torch.compile: once, while tracing), the bytes kept per operation
    (``kept:<op>``), ``recomputed_flops`` and ``recomputed_bytes`` (what the recomputed operations read and write,
    views left out: the memory traffic that bounds norms and activations on a GPU)."""
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    from torch.utils.flop_counter import flop_registry

    formulas = {**flop_registry, **extra_flop_formulas()}
    tail = tail if tail is not None else [0]

    def policy(ctx, op, *args, **kwargs):
        out = ctx.op_output
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        count = formulas.get(op.overloadpacket)
        flops = 0
        if tail[0]:  # a block's last products: the recompute stops before them (keeping them would waste memory)
            return CheckpointPolicy.PREFER_RECOMPUTE
        if count is not None:
            # per value of the main output (attention's also returns a row statistic, which would dilute it)
            elements = _hint(outs[0].numel()) if outs else 0
            flops = _hint(count(*args, **kwargs, out_val=out))
            if elements and flops >= min_flops_per_element * elements:
                if record is not None:
                    key = f"kept:{op.overloadpacket.__name__}"
                    record[key] = record.get(key, 0) + sum(_hint(t.numel()) * t.element_size() for t in outs)
                return CheckpointPolicy.MUST_SAVE
        if record is not None:
            record["recomputed_flops"] = record.get("recomputed_flops", 0) + flops
            if not getattr(op, "is_view", False):  # what recomputing reads and writes (views move nothing)
                moved = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                record["recomputed_bytes"] = record.get("recomputed_bytes", 0) + \
                    sum(_hint(t.numel()) * t.element_size() for t in moved + outs)
        return CheckpointPolicy.PREFER_RECOMPUTE

    def contexts():  # one pair per checkpointed call
        tail[0] = 0  # (a recompute that stopped early inside a block's last product leaves nothing to carry over)
        return create_selective_checkpoint_contexts(policy)

    return contexts


def selective_checkpointing_works() -> bool:
    """PyTorch's selective checkpointing with each operation's output shown to the policy (what it decides by)."""
    import inspect

    try:
        from torch.utils.checkpoint import SelectiveCheckpointContext
    except ImportError:
        return False
    return "op_output" in inspect.signature(SelectiveCheckpointContext).parameters


def checkpoint_unet(unet, *, reentrant: bool = True, preserve_rng_state: bool = True, interval: int = 1,
                    selective: str = "off", record: dict | None = None) -> None:
    """Gradient checkpointing of the UNet's blocks, with PyTorch's reentrant checkpoint where it applies.

    ``interval`` N recomputes only every Nth block (in the model's order; SDXL has 86 that diffusers checkpoints)
    and keeps the others' activations for backward, as SimpleTuner's --gradient_checkpointing_interval; 0 turns
    checkpointing off.

    diffusers' script uses the non-reentrant checkpoint, which runs a Python hook for every tensor a block saves;
    the reentrant one keeps only the block's inputs and reruns it in backward: 11 % fewer operations and 20 % less
    CPU time per checkpointed micro-step on SDXL's layout (``benchmarks/count_ops.py --skeleton``) -- the time that
    bounds an eager step on a fast GPU. It gives no gradient to a block whose inputs need none (the first block
    with adapters sits after frozen ones), so such blocks keep the non-reentrant form (see ``_checkpoint_block``).
    Same math; sums may round in another order. It recomputes whole blocks, 5.6 % more arithmetic per step at
    1024 px (20.3 vs 19.2 TFLOP): free while eager steps wait on the CPU, so a compiled UNet -- fewer operations,
    and ``torch.compile`` of the whole UNet traces only the non-reentrant form -- uses ``reentrant=False``.
    (Checkpointing each compiled region inside its graph instead was tried and dropped: within noise on SDXL's
    layout, 50 % longer to compile, and CUDA graphs failed with it too; benchmarks/RESULTS.md.)

    ``selective`` (--selective_checkpointing, see ``selective_threshold``): within each recomputed block keep the
    outputs that cost most to recompute (``keep_costly_outputs``) and recompute only the rest, with the
    non-reentrant checkpoint (the only form that takes a policy). Same math.
    """
    if interval == 0:
        _mark_block_tails(unet, [])
        if unet.is_gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        return
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_BLOCKS]
    for i, block in enumerate(blocks):
        block._billiard_recompute = i % interval == 0  # read by _checkpoint_block
        # a block with nothing to train whose input needs no gradient (SDXL: the first three ResNet blocks)
        block._billiard_trains = any(p.requires_grad for p in block.parameters())
    threshold = selective_threshold(selective, unet)
    tail = _mark_block_tails(unet, blocks if threshold is not None else [])
    extra = {} if threshold is None else {"context_fn": keep_costly_outputs(threshold, record, tail)}
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=partial(
        _checkpoint_block, reentrant=reentrant, preserve_rng_state=preserve_rng_state, **extra))


def _mark_block_tails(unet, blocks) -> list:
    """Forward hooks that count, in the returned ``[depth]``, when a block's last product runs: a transformer
    block's feed-forward output projection, a ResNet block's shortcut convolution (else its second convolution).
    Its output only feeds the block's residual addition, so backward needs nothing from it, and the non-reentrant
    checkpoint's recompute stops inside it (raising, once backward's tensors are back). Earlier hooks of this kind
    are removed (none are left for ``blocks`` = []). (``torch.compiler.is_compiling`` is in PyTorch 2.3 and later;
    the policy needs a later one anyway.)"""
    for handle in unet.__dict__.pop("_billiard_tail_hooks", []):
        handle.remove()
    tail, handles = [0], []

    # (not while torch.compile traces: a checkpoint's traced body may not change outer state; there the policy is
    # applied while tracing, and a block's last products are kept)
    def enter(module, args):
        if not torch.compiler.is_compiling():
            tail[0] += 1

    def leave(module, args, output):
        if not torch.compiler.is_compiling():
            tail[0] -= 1

    for block in blocks:
        ff = getattr(block, "ff", None)
        linears = [m for m in getattr(ff, "net", []) if isinstance(m, torch.nn.Linear)]
        tails = linears[-1:]
        # a ResNet block's last product: its shortcut convolution, which runs after conv2, else conv2
        last_conv = getattr(block, "conv_shortcut", None) or getattr(block, "conv2", None)
        tails += [last_conv] if last_conv is not None else []
        for module in tails:
            # (always_call: the recompute stops by raising inside this module's forward, which must still count out)
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    unet.__dict__["_billiard_tail_hooks"] = handles
    return tail


def checkpoint_text_encoder(text_encoder, *, preserve_rng_state: bool = True, interval: int = 1) -> None:
    """Gradient checkpointing of a CLIP text encoder's layers (non-reentrant: its LoRA gets gradients whether or not
    the embeddings need any), of every ``interval``-th layer where transformers can (``every_n_layers``), else of
    every layer. Without saving RNG state under CUDA graphs unless LoRA dropout needs it (CLIP itself draws none)."""
    import inspect

    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.23; the older name warns there
        enable = text_encoder.activation_checkpointing_enable
        every = {"every_n_layers": interval} if "every_n_layers" in inspect.signature(enable).parameters else {}
        enable(activation_checkpointing_kwargs=kwargs, **every)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _checkpoint_block(block, *args, reentrant: bool, **kw):
    if not getattr(block, "_billiard_recompute", True):  # outside the --gradient_checkpointing_interval
        return block(*args)
    if not getattr(block, "_billiard_trains", True) and \
            not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return block(*args)  # backward never reaches it: nothing to keep or recompute
    if "context_fn" in kw and getattr(block, "_compiled_call_impl", None) is not None:
        # a region --torch_compile regional compiled by itself (a ResNet block), checkpointed from eager code: the
        # selective policy would watch its compiled kernels, which write into buffers it has kept ("Tensor cached
        # during selective activation checkpoint has been mutated", inductor on the CPU); recomputed whole instead.
        # (Blocks checkpointed inside a compiled region -- the transformer blocks -- get the policy at compile time.)
        kw = {k: v for k, v in kw.items() if k != "context_fn"}
    elif "context_fn" in kw:
        reentrant = False  # (the only form that takes a policy)
    reentrant = reentrant and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=reentrant, **kw)


# the UNet's repeated regions: what --torch_compile regional compiles one by one
REGIONS = ("Transformer2DModel", "ResnetBlock2D")
# torch.compile modes that record CUDA graphs -> the same mode without them
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


# steps after which --torch_compile regional has paid for its compilation on an H100 at the seed's settings
# (144 s to compile, then 0.975 vs 1.68 s per optimizer step eager: about 200 steps; 300 leaves room for a slower
# machine)
COMPILE_PAYS_STEPS = 300
# with CUDA graphs (session 6, H100): 220 instead of 12 s to the first step, then 148 instead of 180 ms per
# micro-step, i.e. 96 ms per optimizer step at accumulation 3: about 2,200 steps to pay off
COMPILE_PAYS_STEPS_WITH_GRAPHS = 2500
COMPILE_VARIANTS = 64  # compiled graphs allowed per block type (torch's default is 8)


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off for a moment (errors still show)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def compile_unet(unet, scope: str, **compile_kwargs) -> None:
    """torch.compile the UNet in place (its state-dict keys, hence the saved LoRA, stay the same).

    ``scope`` is --torch_compile; ``compile_kwargs`` go to torch.compile (mode, backend). 'regional' compiles the
    UNet's repeated regions one by one -- each stack of transformer blocks (``Transformer2DModel``, 1 to 10 blocks
    deep in SDXL) and each ResNet block -- and regions of the same shape share one compiled graph, so it compiles
    in a fraction of the time 'full' (the whole UNet) takes. Stacks rather than single transformer blocks: each
    compiled region is entered through guards and autograd wrappers (three times per checkpointed micro-step), and
    SDXL has 70 transformer blocks in 11 stacks; on SDXL's layout that took host time per micro-step from 408 to
    306 ms (``benchmarks/count_ops.py --skeleton``, CPU; 274 ms for 'full', 460 eager).
    """
    if scope == "none":
        return
    keep_compiled_code()
    import logging

    import torch._dynamo

    # torch says, once per run, that a selective policy under compile needs checkpointed regions without in-place
    # operations: the UNet's blocks run none, with peft's layers or --fused_lora_ops (tested)
    wrap_log = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _DropMessage) for f in wrap_log.filters):
        wrap_log.addFilter(_DropMessage("context_fn is passed to torch.utils.checkpoint under torch.compile"))

    # Each block variant (width, skip connection, resolution, training or validation) is a graph of its own, and
    # SDXL's UNet has dozens: past torch's default of 8 per function, the rest would silently run uncompiled.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), COMPILE_VARIANTS))
    if scope == "full":
        unet.compile(**compile_kwargs)
        return
    for module in unet.modules():
        if type(module).__name__ in REGIONS:
            module.compile(**compile_kwargs)


class _DropMessage:
    """A logging filter that drops the records containing ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def keep_compiled_code() -> None:
    """Keep torch.compile's generated code in billiard-lora's cache (``$BILLIARD_LORA_CACHE/torch_compile``, else
    ``~/.cache/billiard_lora/torch_compile``) rather than torch's default under /tmp, which a reboot empties (on
    Colab, a $BILLIARD_LORA_CACHE on Drive keeps it across sessions): a later run of the same model and settings then reuses it instead of compiling again (small
    model, CPU: 107.9 s to the first step, then 9.3 s; benchmarks/RESULTS.md). A $TORCHINDUCTOR_CACHE_DIR of the user's
    wins (importing diffusers already sets it to torch's default, which is not taken for the user's choice); an
    unwritable cache leaves torch's default."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch (the module moved in 2.3): its own default stays
        return
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) != default_cache_dir():
        return
    folder = cache_dir() / "torch_compile"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


# ============================================================================ settings and environment
def check_output_dir(config: TrainConfig, out: Path) -> None:
    """Refuse to mix a new run into a folder that already holds something, unless resuming or told to."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir={out} is a file; pass a folder")
    if (out.is_dir() and any(out.iterdir()) and not (config.resume_from_checkpoint or config.overwrite_output_dir)
            and not stopped_before_saving(out, config)):
        raise UserError(f"--output_dir={out} is not empty: pass --resume_from_checkpoint=latest to continue that run, "
                        f"--overwrite_output_dir to write over it, or choose another folder")
    probe = nearest_existing(out)
    if not os.access(probe, os.W_OK):
        raise UserError(f"--output_dir={out}: {probe} is not writable; choose a folder you can write to")
    if config.report_to not in (None, "none") and config.logging_dir:
        from .io import check_out_folder

        check_out_folder(out / config.logging_dir, "--logging_dir")  # (an absolute one stands for itself)


def stopped_before_saving(out: Path, config: TrainConfig) -> bool:
    """Whether ``out`` holds only what one of our runs writes before its first save (its config.json, logs, the
    class images it generated, a half-written hidden checkpoint): a run that crashed or was stopped there. A new
    run may start in it without --overwrite_output_dir, and keeps the class images."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    early = {"config.json", Path(config.logging_dir).parts[0] if config.logging_dir else "logs", "class_images"}
    if not names or not names <= early:
        return False
    if "config.json" not in names:  # stopped while generating class images: ours if they carry our record
        return (out / "class_images" / CLASS_PROMPT_RECORD).is_file()
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"instance_prompt", "pretrained_model_name_or_path"} <= saved.keys()


def latent_cache_root(config: TrainConfig) -> Path:
    return Path(config.latent_cache_dir).expanduser() if config.latent_cache_dir else cache_dir() / "latents"


def check_latent_cache_dir(config: TrainConfig) -> None:
    if not (config.cache_latents and config.cache_latents_to_disk):
        return
    root = latent_cache_root(config)
    if root.exists() and not root.is_dir():
        raise UserError(f"--latent_cache_dir={root} is a file; pass a folder")
    probe = nearest_existing(root)
    if not os.access(probe, os.W_OK):
        raise UserError(f"--latent_cache_dir={root}: {probe} is not writable; choose a folder you can write to")


BF16_FALLBACK = "--mixed_precision=bf16:"  # how the note of bf16's fallback to fp16 begins


def resolve_hardware(config: TrainConfig) -> TrainConfig:
    """Turn requests this machine cannot honour into warned, recorded fallbacks (never a crash)."""
    notes = list(config.fallbacks)
    changes: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    if config.mixed_precision == "fp16" and not cuda:
        notes.append("--mixed_precision=fp16 needs a CUDA GPU; training in fp32 on this machine instead")
        changes["mixed_precision"] = "no"
    if config.mixed_precision == "bf16" and cuda and _bf16_emulated():
        # e.g. Colab's free T4: PyTorch accepts bf16 there and emulates it without the tensor cores
        major, minor = torch.cuda.get_device_capability()
        notes.append(f"{BF16_FALLBACK} {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no "
                     "bfloat16 tensor cores (they start at 8.0: A100, RTX 30xx, L4, H100), so bf16 would run emulated; "
                     "training in fp16 with loss scaling instead, which its tensor cores run")
        changes["mixed_precision"] = "fp16"
    if config.allow_tf32 and not cuda:
        notes.append("--allow_tf32 has no effect without a CUDA GPU; ignored")
        changes["allow_tf32"] = False
    if config.use_8bit_adam and config.optimizer.lower() == "adamw" and not _bnb_works("cuda" if cuda else "cpu"):
        notes.append("--use_8bit_adam: bitsandbytes has no working 8-bit optimizer here; using torch AdamW instead")
        changes["use_8bit_adam"] = False
    if config.torch_compile != "none" and not _can_compile(cuda):
        notes.append(f"--torch_compile={config.torch_compile} needs "
                     f"{'triton' if cuda else 'a C++ compiler (g++ or clang++)'} here; training without compiling")
        changes["torch_compile"] = "none"
    checkpointing = config.gradient_checkpointing or config.auto_gradient_checkpointing
    if changes.get("torch_compile", config.torch_compile) == "regional" and checkpointing and \
            config.torch_compile_mode in CUDA_GRAPH_MODES:
        # "accessing tensor output of CUDAGraphs that has been overwritten" in the first backward: reported for
        # compiled regions nested in an eager checkpoint (pytorch#154306), and measured here on an H100 (torch 2.11)
        # with each region checkpointed inside its own graph instead (benchmarks/RESULTS.md)
        mode = CUDA_GRAPH_MODES[config.torch_compile_mode]
        flag = "--gradient_checkpointing" if config.gradient_checkpointing else "--auto_gradient_checkpointing"
        notes.append(f"--torch_compile_mode={config.torch_compile_mode}: CUDA graphs fail on regionally compiled, "
                     f"checkpointed blocks; using --torch_compile_mode={mode} (drop {flag} or use "
                     f"--torch_compile=full to try CUDA graphs)")
        changes["torch_compile_mode"] = mode
    if config.cuda_graphs is not False:  # asked for (True), or to be decided (None: on where it applies)
        asked = config.cuda_graphs is True
        why = ("needs a CUDA GPU" if not _cuda_graphs_possible() else
               "with --lora_dropout and gradient checkpointing needs PyTorch 2.10 or later (the recompute must draw "
               "the forward's dropout masks again: older versions cannot record the random-number state in a graph)"
               if config.lora_dropout > 0 and (checkpointing or config.fp8_base) and not _rng_state_recordable()
               else None)
        compile_mode = changes.get("torch_compile_mode", config.torch_compile_mode)
        if not asked and why is None and config.torch_compile != "none" and (
                config.torch_compile == "full" or compile_mode in CUDA_GRAPH_MODES):
            # undecided: not where the user chose torch.compile's own CUDA graphs, nor with full compilation, which
            # has not been run with them on a GPU (regional has: benchmarks/RESULTS.md)
            why = "not chosen by default with this --torch_compile setting"
        # with --lora_dropout the masks are drawn inside the recorded step: on by default since an H100 (torch
        # 2.11, checkpointing) gave the eager LoRA bit for bit (gpu_check.sh part 21, benchmarks/RESULTS.md)
        if not asked and why is None and (config.train_text_encoder or config.train_text_encoder_ti or
                                          config.shuffle_caption):
            # the text encoders in the recorded step: recorded on an H100, but its LoRA differed from eager's by up to
            # 2.7e-5 after 6 steps (part 17; UNet-only runs agree bit for bit), so only when asked for (pivotal
            # tuning and --shuffle_caption run them there too, frozen: gpu_check.sh parts 31 and 32 have yet to run)
            flag = next(f"--{k}" for k in ("train_text_encoder", "train_text_encoder_ti", "shuffle_caption")
                        if getattr(config, k))
            why = f"not chosen by default with {flag}"
        if why:
            if asked:
                notes.append(f"--cuda_graphs {why}; training without CUDA graphs")
            changes["cuda_graphs"] = False
        else:
            changes["cuda_graphs"] = True
            if config.torch_compile != "none" and compile_mode in CUDA_GRAPH_MODES:
                mode = CUDA_GRAPH_MODES[config.torch_compile_mode]
                notes.append(f"--cuda_graphs records the whole micro-step already: --torch_compile_mode={mode} "
                             f"instead of {config.torch_compile_mode} (which would record graphs of its own inside it)")
                changes["torch_compile_mode"] = mode
    if config.selective_checkpointing != "off" and not selective_checkpointing_works():
        notes.append(f"--selective_checkpointing={config.selective_checkpointing} needs a newer PyTorch than "
                     f"{torch.__version__} (one whose selective checkpointing shows the policy each operation's "
                     f"output); recomputing whole blocks instead")
        changes["selective_checkpointing"] = "off"
    if config.fp8_base and not cuda and _mps_available():
        notes.append("--fp8_base: Apple's MPS has no float8 tensors; training with the UNet in its usual dtype")
        changes["fp8_base"] = False
    if changes.get("fp8_base", config.fp8_base) and not checkpointing:
        # measured (benchmarks/RESULTS.md): backward then keeps each layer's upcast weights, more than fp8 saves
        notes.append("--fp8_base without --gradient_checkpointing would keep every layer's upcast weights for "
                     "backward (more memory than without fp8); training with checkpointing (or pass "
                     "--auto_gradient_checkpointing to let a trial step decide)")
        changes["gradient_checkpointing"] = True
    if config.use_8bit_adam and config.optimizer.lower() in ("adamw_schedulefree", "adamwschedulefree", "adafactor",
                                                             "lion", "lion8bit"):
        notes.append(f"--use_8bit_adam is for AdamW: --optimizer={config.optimizer} keeps its own states (Lion8bit is "
                     f"Lion's 8-bit form; a LoRA's states are small: SDXL's rank-4 UNet LoRA, 46 MB for AdamW)")
        changes["use_8bit_adam"] = False
    if config.optimizer.lower() == "prodigy":  # what runs, as config.json records it
        if config.use_8bit_adam:
            notes.append("--use_8bit_adam is for AdamW and Prodigy has no 8-bit form: training Prodigy with its "
                         "32-bit states")
            changes["use_8bit_adam"] = False
        if config.train_text_encoder and config.text_encoder_lr != config.learning_rate:
            notes.append(f"--optimizer=prodigy adapts one learning rate: the text encoders train at --learning_rate="
                         f"{config.learning_rate:g}, not --text_encoder_lr={config.text_encoder_lr:g} (as in "
                         f"diffusers' script)")
            changes["text_encoder_lr"] = config.learning_rate
    if config.fold_accumulation and config.gradient_accumulation_steps == 1:
        notes.append("--fold_accumulation has nothing to fold with --gradient_accumulation_steps 1; ignored")
        changes["fold_accumulation"] = False
    installed = [t for t in config.trackers if importlib.util.find_spec(t) is not None]
    for t in config.trackers:
        if t not in installed:
            notes.append(f"--report_to={config.report_to}: the {t} package is not installed (pip install {t}); not "
                         f"logging to it")
    if installed != config.trackers:
        changes["report_to"] = installed[0] if len(installed) == 1 else "none"
    return config.replace(**changes, fallbacks=notes) if changes else config


def average_gradients(params: Sequence[torch.nn.Parameter], num_processes: int) -> None:
    """Average the gradients over the processes, in place, as DDP does (each divided by the process count, then
    summed across processes): one collective on one flat buffer."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads).div_(num_processes)
    torch.distributed.all_reduce(flat)
    for g, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(averaged)  # in place: a recorded graph keeps adding into these tensors


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _bf16_emulated() -> bool:
    """Whether this CUDA GPU only emulates bfloat16: NVIDIA's before compute capability 8.0 (T4, V100)."""
    return not torch.version.hip and torch.cuda.get_device_capability() < (8, 0)


def _rng_state_recordable() -> bool:
    """Can a CUDA graph record checkpointing's save and restore of the random-number state? (pytorch#162505, 2.10)"""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 10)


def _cuda_graphs_possible() -> bool:
    return torch.cuda.is_available()


def _can_compile(cuda: bool) -> bool:
    """Whether torch.compile's default backend (inductor) has its code generator here: triton, or a C++ compiler."""
    if cuda:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


def _bnb_works(device: str) -> bool:
    """Whether bitsandbytes' 8-bit AdamW can take a step on ``device`` (tried on a 4096-element tensor)."""
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        return True
    except Exception:  # no backend, no GPU library, an old CPU: any failure means "not here"
        return False


def make_accelerator(config: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging_dir))
    log_with = config.trackers or None
    # Several processes without a GPU (accelerate launch --multi_gpu on a CPU machine): accelerate only sets up
    # its gloo process group when told the run is on CPU.
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A notebook may train again in the same process with another precision: accelerate keeps the first one's
    # settings process-wide and refuses a change, so they are cleared (the process group, if any, is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    # --cuda_graphs: autocast's cache of cast weights would outlive the recording (PyTorch: record with it off)
    from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs

    handlers = [AutocastKwargs(cache_enabled=False)] if config.cuda_graphs else []
    if config.train_text_encoder:
        # SDXL reads the first text encoder's penultimate layer: its last layer, LoRA included, gets no gradient,
        # and DDP must be told to expect that (as diffusers' script does), or the second step stops with an error
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(gradient_accumulation_steps=config.micro_steps, cpu=cpu_distributed,
                       mixed_precision=config.mixed_precision, log_with=log_with, project_config=project,
                       kwargs_handlers=handlers)


def init_trackers(accelerator, config: TrainConfig) -> None:
    if not config.trackers:
        return
    # TensorBoard's hparams take only scalars and strings.
    flat = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    # wandb keeps its run files (and, with WANDB_MODE=offline, the whole run) beside TensorBoard's
    kwargs = {"wandb": {"dir": str(Path(config.output_dir) / config.logging_dir),
                        "name": Path(config.output_dir).name}} if "wandb" in config.trackers else {}
    try:
        accelerator.init_trackers("dreambooth-lora-sdxl", config=flat, init_kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - wandb's own errors (no API key, no network), several lines long
        if not type(exc).__module__.startswith("wandb"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"--report_to={config.report_to}: wandb could not start a run ({first}); run `wandb login`, "
                        f"or set WANDB_MODE=offline to keep the run on disk, or --report_to tensorboard") from None


def _printer(accelerator) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if accelerator.is_main_process:
            print(msg, file=sys.stderr if msg.startswith("warning") else sys.stdout, flush=True)

    return say


# ============================================================================ data
@dataclass
class TrainImage:
    """One decoded training image with its caption; ``key`` identifies its content (file bytes), not its index."""

    image: Any  # PIL.Image.Image, RGB
    caption: str
    key: str
    mask: Any = None  # --masked_loss: PIL "L" of the image's size, white where the loss counts; None: everywhere


def load_training_images(config: TrainConfig) -> list[TrainImage]:
    """Resolve the dataset, audit every file (the gate: broken files stop the run here), decode the good ones."""
    from .audit import audit
    from .data import load_example, resolve_source

    source = resolve_source(config.dataset_name, config.instance_data_dir, image_column=config.image_column,
                            caption_column=config.caption_column, kaggle_class=config.kaggle_class,
                            splits=config.splits, cache_dir=config.cache_dir)
    defaults = TrainConfig.__dataclass_fields__
    if source.kind != "kaggle" and (config.kaggle_class != defaults["kaggle_class"].default
                                    or config.kaggle_splits != defaults["kaggle_splits"].default):
        warnings.warn(f"--kaggle_class/--kaggle_splits select from a Kaggle-layout folder (train|valid|test/<class>/); "
                      f"{source.description} is not one, so every image in it is used")
    report = audit(source, config.resolution)
    images, examples = [], report.raise_for_bad(skip_bad=config.skip_bad_images)
    for ex in examples:
        img = load_example(ex)  # decoded once, held in memory: a file that changes mid-run cannot break the run
        raw = Path(ex.path).read_bytes() if ex.path is not None else img.tobytes()
        images.append(TrainImage(img, ex.caption or config.instance_prompt, hashlib.sha256(raw).hexdigest()[:16]))
    if not images:
        raise UserError(f"no usable training images in {source.description}")
    if config.masked_loss:
        attach_masks(images, examples, source.root, config)
    # kohya's "N_words" folders: each image N times an epoch (one decoded image, one latent cache entry)
    return [im for im, ex in zip(images, examples) for _ in range(ex.repeats)]


def attach_masks(images: list[TrainImage], examples: list, root: Path | None, config: TrainConfig) -> None:
    """--masked_loss: each image's mask, from --mask_data_dir or its alpha channel; every image must have one."""
    from .data import alpha_mask, find_mask_file, load_mask

    folder = Path(config.mask_data_dir).expanduser() if config.mask_data_dir else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"--mask_data_dir={config.mask_data_dir}: no such folder; give the folder of the masks")
    missing = []
    for i, (im, ex) in enumerate(zip(images, examples)):
        name = str(ex.path) if ex.path is not None else f"image {i}"
        if folder is None:
            im.mask = alpha_mask(ex.image if ex.image is not None else ex.path)
        elif ex.path is not None and (found := find_mask_file(Path(ex.path), root, folder)) is not None:
            im.mask = load_mask(found, im.image.size)
        if im.mask is None:
            missing.append(Path(name).name)
    if missing:
        where = f"a file of the same name in {folder}" if folder else "an alpha channel (or use --mask_data_dir)"
        raise UserError(f"--masked_loss: {_count(len(missing), 'image')} of {len(images)} without a mask ("
                        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): give each {where}, or drop "
                        f"--masked_loss")


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation), cropped and flipped afresh each epoch.

    Indices come from ``EpochShuffleSampler`` as (epoch, index) pairs, so the random crop and flip of an image
    depend only on (seed, epoch, index): a resumed run sees exactly the crops an uninterrupted one would.
    """

    def __init__(self, instance: Sequence[TrainImage], class_images: Sequence[TrainImage], config: TrainConfig,
                 cached: Callable[[str], bool] | None = None):
        from .data import nearest_bucket

        self.instance = list(instance) * config.repeats
        self.class_images = list(class_images)
        self.config = config
        # ``cached(key)`` says the latent cache already holds a view: its pixels (a resize of a full photo on the
        # CPU, tens of ms at 1024 px) are then not made at all.
        self.cached = cached or (lambda key: False)
        self.mask_views: dict[tuple, torch.Tensor] = {}  # --masked_loss: each view's mask, made once (small tensors)
        # each instance image's view size (h, w): its aspect-ratio bucket, or the square resolution; a class image
        # takes the size of the instance image it is paired with (both go through the UNet in one batch)
        buckets = config.buckets
        square = (config.resolution, config.resolution)
        self.instance_targets = [nearest_bucket(im.image.width, im.image.height, buckets) if buckets else square
                                 for im in self.instance]

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_images))

    def target(self, index: int) -> tuple[int, int]:
        """The (h, w) of every view at dataset index ``index`` (a batch must hold one size)."""
        return self.instance_targets[index % len(self.instance)]

    def views(self) -> list[tuple[TrainImage, tuple[int, int]]]:
        """Each (image, view size) pair training can draw, once: what the latent cache can hold at most."""
        pairs = {(id(im), t): (im, t) for im, t in zip(self.instance, self.instance_targets)}
        for i in range(len(self) if self.class_images else 0):
            im = self.class_images[i % len(self.class_images)]
            pairs.setdefault((id(im), self.target(i)), (im, self.target(i)))
        return list(pairs.values())

    def _prepare(self, item: TrainImage, rng: random.Random, target: tuple[int, int]) -> dict:
        from .data import plan_crop, render_view

        cfg = self.config
        flip = cfg.random_flip and rng.random() < 0.5
        image = item.image
        th, tw = target
        size, crop = plan_crop(image.width, image.height, cfg.resolution, center_crop=cfg.center_crop, crop_rng=rng,
                               target=target)
        # the view's identity for the latent cache: the file's content, never its index in the dataloader (a
        # square view keeps the key it had before buckets existed: caches on disk stay valid)
        scale = cfg.resolution if target == (cfg.resolution, cfg.resolution) else f"{th}x{tw}"
        view_key = lambda crop, flip: f"{item.key}:{scale}:{crop[0]},{crop[1]}:{int(flip)}:{cfg.image_interpolation_mode}"
        key = view_key(crop, flip)
        # With one crop position per image, --random_flip gives each image two views, and when the crop sits in the
        # middle (flipping comes before cropping) each is the other's mirror image: the cache takes both at once.
        # With random crops most mirrored crops would never be drawn, so they are not encoded ahead.
        one_crop = cfg.center_crop or size == (tw, th)
        centred = size[0] - tw - crop[1] == crop[1]
        twin = view_key(crop, not flip) if cfg.random_flip and one_crop and centred else None
        pixels = None if self.cached(key) else render_view(image, cfg.resolution, size, crop, flip=flip,
                                                           interpolation=cfg.image_interpolation_mode, target=target)
        view = {"pixel_values": pixels, "original_size": (image.height, image.width), "crop_top_left": crop,
                "target_size": target, "caption": item.caption, "flipped": flip, "key": key, "twin": twin}
        if cfg.masked_loss:  # the mask's view, cut as the image's, at the latents' size (class images: all ones)
            from .data import render_mask

            mask_key = (id(item), key)  # (an instance and a class image may share their content, not their mask)
            if mask_key not in self.mask_views:
                self.mask_views[mask_key] = render_mask(item.mask, size, crop, flip=flip, target=target) \
                    if item.mask is not None else torch.ones((1, th // 8, tw // 8))
            view["mask"] = self.mask_views[mask_key]
        return view

    def __getitem__(self, epoch_and_index: tuple[int, int]) -> dict:
        epoch, index = epoch_and_index
        rng = random.Random(f"{self.config.seed}:{epoch}:{index}")
        target = self.target(index)
        example = {"instance": self._prepare(self.instance[index % len(self.instance)], rng, target)}
        if self.config.shuffle_caption:  # its own draw, as caption dropout's: crops and flips stay as they were
            shuffle = random.Random(f"{self.config.seed}:{epoch}:{index}:shuffle")
            example["instance"]["caption"] = shuffle_tags(example["instance"]["caption"], self.config.keep_tokens,
                                                          shuffle)
        if self.config.caption_dropout_rate:  # its own draw: the crops and flips stay those of a run without
            draw = random.Random(f"{self.config.seed}:{epoch}:{index}:caption").random()
            example["instance"]["dropped"] = draw < self.config.caption_dropout_rate
        if self.class_images:
            example["class"] = self._prepare(self.class_images[index % len(self.class_images)], rng, target)
        return example


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """kohya's --shuffle_caption: the comma-separated tags of ``caption`` in a random order, the first ``keep`` in
    place; spaces around the commas are normalised to ", "."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


class EpochShuffleSampler(Sampler):
    """A new permutation each epoch, from (seed, epoch) alone; yields (epoch, index) pairs."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter([(self.epoch, int(i)) for i in torch.randperm(self.n, generator=g)])

    def __len__(self) -> int:
        return self.n


class BucketBatchSampler(Sampler):
    """Batches of one aspect-ratio bucket each: ``sampler``'s order (an ``EpochShuffleSampler``) grouped by
    ``target(index)``, each group cut into batches of ``batch_size`` (its last one smaller), the batches then
    shuffled by (seed, epoch). Yields lists of (epoch, index) pairs, like a ``BatchSampler`` over ``sampler``
    (accelerate finds ``sampler.set_epoch`` through it, and shards its batches across processes whole)."""

    def __init__(self, sampler: "EpochShuffleSampler", target: Callable[[int], tuple[int, int]], batch_size: int):
        self.sampler, self.target, self.size = sampler, target, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for pair in self.sampler:
            groups.setdefault(self.target(pair[1]), []).append(pair)
        batches = [g[i:i + self.size] for g in groups.values() for i in range(0, len(g), self.size)]
        g = torch.Generator().manual_seed(self.sampler.seed * 100_003 + self.sampler.epoch + 1)
        return iter([batches[i] for i in torch.randperm(len(batches), generator=g)])

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = {}
        for i in range(self.sampler.n):
            counts[self.target(i)] = counts.get(self.target(i), 0) + 1
        return sum(math.ceil(n / self.size) for n in counts.values())


def collate(examples: list[dict]) -> dict:
    """Stack a batch; with prior preservation, class examples follow instance ones (one forward pass for both)."""
    parts = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {
        # a list: views the latent cache already holds come without pixels (None)
        "pixel_values": [p["pixel_values"] for p in parts],
        "original_sizes": [p["original_size"] for p in parts],
        "crop_top_lefts": [p["crop_top_left"] for p in parts],
        "target_sizes": [p["target_size"] for p in parts],
        "captions": [p["caption"] for p in parts],
        "dropped": [p.get("dropped", False) for p in parts],  # --caption_dropout_rate: trained without its caption
        "keys": [p["key"] for p in parts],
        "twins": [p["twin"] for p in parts],  # each view's mirror image's key, where the cache should take it too
        **({"masks": torch.stack([p["mask"] for p in parts])} if "mask" in parts[0] else {}),  # (B, 1, h/8, w/8)
    }


DRAWN_KEYS = ("pixel_values", "keys", "twins")  # what draw() reads of a batch


def micro_batch_rows(n: int, batch_size: int, prior: bool) -> list[list[int]]:
    """A (folded) batch's rows as the micro-batches of ``batch_size`` that hold them without --fold_accumulation;
    with prior preservation, each micro-batch's instance rows and then its class rows ([instance..., class...])."""
    half = n // 2 if prior else n
    chunks = [list(range(start, min(start + batch_size, half))) for start in range(0, half, batch_size)] or [[]]
    return [c + [half + i for i in c] for c in chunks] if prior else chunks


def seeded_generator(seed: int, epoch: int, batch_index: int, process: int, device) -> torch.Generator:
    """A generator whose seed is a hash of where training is; the same place always draws the same numbers."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{batch_index}:{process}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:7], "little"))


# ============================================================================ loss and optimizer
def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   config: TrainConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The error to the target (squared, or pseudo-Huber with --loss_type), optionally Min-SNR weighted
    (arXiv 2303.09556), plus the prior-preservation term. ``mask`` (B, 1, h, w), --masked_loss: each element's
    error is multiplied by it before the mean (kohya's: a half-masked image counts half)."""
    from diffusers.training_utils import compute_snr

    error = partial(elementwise_loss, config=config, c=huber_c(timesteps, noise_scheduler, config))

    def masked_error(pred, target, rows: slice) -> torch.Tensor:
        e = error(pred, target, rows=rows)
        return e if mask is None else e * mask[rows]

    def mean_error(pred, target, rows: slice) -> torch.Tensor:
        if config.loss_type == "l2" and mask is None:
            return F.mse_loss(pred, target, reduction="mean")
        return masked_error(pred, target, rows=rows).mean()

    prior_loss = 0.0
    if config.with_prior_preservation:
        # the batch is [instance..., class...]: split it and score the class half separately
        model_pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        timesteps, _ = torch.chunk(timesteps, 2, dim=0)
        prior_loss = mean_error(pred_prior.float(), target_prior.float(), rows=slice(len(pred_prior), None))
    if config.snr_gamma is None and not config.debiased_estimation_loss:
        loss = mean_error(model_pred.float(), target.float(), rows=slice(0, len(model_pred)))
    else:
        snr = compute_snr(noise_scheduler, timesteps)
        v_pred = noise_scheduler.config.prediction_type == "v_prediction"
        weights = torch.ones_like(snr)
        if config.snr_gamma is not None:
            weights = torch.clamp(snr, max=config.snr_gamma)
            weights = weights / (snr + 1) if v_pred else weights / snr
        if config.debiased_estimation_loss:  # as kohya's: 1/sqrt(SNR), the SNR capped at 1000 (t near 0)
            capped = torch.clamp(snr, max=1000)
            weights = weights / torch.sqrt(capped + 1 if v_pred else capped)
        per_sample = masked_error(model_pred.float(), target.float(), rows=slice(0, len(model_pred))).mean(
            dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
    return loss + config.prior_loss_weight * prior_loss


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, *, config: TrainConfig, c: torch.Tensor | None,
                     rows: slice) -> torch.Tensor:
    """Each element's error: squared (--loss_type l2, as F.mse_loss), or pseudo-Huber with each image's c."""
    if config.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    c = c[rows].view(-1, *[1] * (pred.dim() - 1))
    smooth = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * smooth if config.loss_type == "huber" else 2 * smooth


def huber_c(timesteps: torch.Tensor, noise_scheduler, config: TrainConfig) -> torch.Tensor | None:
    """Each image's pseudo-Huber c for its timestep (--huber_schedule), as kohya and diffusers' scheduled-Huber
    scripts compute it; None for --loss_type l2."""
    if config.loss_type == "l2":
        return None
    t = timesteps.float()
    if config.huber_schedule == "constant":
        return torch.full_like(t, config.huber_c)
    if config.huber_schedule == "exponential":  # 1 at t = 0, huber_c at t = num_train_timesteps
        return torch.exp(math.log(config.huber_c) * t / noise_scheduler.config.num_train_timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1 - config.huber_c) / (1 + sigmas) ** 2 + config.huber_c


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: stop, keeping every earlier checkpoint and file."""

    def __init__(self, step: int, out: Path, config: TrainConfig):
        ckpt = find_checkpoint(out, "latest")
        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was saved yet"
        vae_hint = ("" if config.pretrained_vae_model_name_or_path else
                    "; in fp16 use --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix")
        super().__init__(f"the loss became NaN/inf at step {step + 1}: likely fp16 overflow (try --mixed_precision=bf16"
                         f"{vae_hint}) or a learning rate too high (--learning_rate={config.learning_rate}); {kept}")


# Where training was when memory ran out, by the innermost of these functions on the stack.
_OOM_PHASES = (("run_validation", "making validation images"), ("ensure_class_images", "generating class images"),
               ("PromptCache.build", "encoding the prompts"), ("LatentCache", "encoding the images into latents"),
               ("save_checkpoint", "saving a checkpoint"), ("_train.<locals>.forward_backward", "in a training step"),
               ("MicroStepGraph", "in a training step"),
               ("make_optimizer", "setting up the optimizer"), ("load_components", "loading the models"))


class TrainingOutOfMemory(UserError):
    """The device ran out of memory: where, which flags (not yet used) would save memory, and what is kept."""

    def __init__(self, config: TrainConfig, exc: BaseException):
        frames = [tb.tb_frame.f_code.co_qualname for tb in _traceback_frames(exc)]
        phase = next((what for name in reversed(frames) for key, what in _OOM_PHASES if name.startswith(key)),
                     "training")
        effective_batch = config.train_batch_size * config.gradient_accumulation_steps
        hints = [hint for hint, applies in (
            ("no --fold_accumulation", config.fold_accumulation and config.gradient_accumulation_steps > 1),
            ("--gradient_checkpointing", not config.gradient_checkpointing),
            ("--gradient_checkpointing_interval 1",
             config.gradient_checkpointing and config.gradient_checkpointing_interval > 1),
            ("--selective_checkpointing off",
             config.gradient_checkpointing and config.selective_checkpointing != "off"),
            ("--use_8bit_adam", config.optimizer.lower() == "adamw" and not config.use_8bit_adam),
            ("--fp8_base", not config.fp8_base),
            ("no --train_text_encoder", config.train_text_encoder),
            ("no --train_text_encoder_ti (the text encoders then leave the GPU once the prompts are encoded)",
             config.train_text_encoder_ti),
            ("no --shuffle_caption (the text encoders then leave the GPU once the prompts are encoded)",
             config.shuffle_caption),
            (f"--train_batch_size 1 --gradient_accumulation_steps {effective_batch} (the same batch per step)",
             config.train_batch_size > 1),
            ("--cache_latents", not config.cache_latents),
            ("a smaller --resolution", config.resolution > 512),
        ) if applies]
        ckpt = find_checkpoint(Path(config.output_dir), "latest")
        kept = (f"the last checkpoint, {ckpt}, and every file written are kept (add --resume_from_checkpoint latest)"
                if ckpt else "no checkpoint was saved yet")
        detail = out_of_memory_detail(exc)
        where = "GPU " if "CUDA" in str(exc) else ""
        super().__init__(f"out of {where}memory {phase}{f' ({detail})' if detail else ''}: "
                         f"{'try ' + ', '.join(hints) if hints else 'every memory saver is already on'}; {kept}")


def _traceback_frames(exc: BaseException) -> Iterator:
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


# ============================================================================ checkpoints
def register_checkpoint_hooks(accelerator, models: dict[str, Any], pivotal=None) -> None:
    """Make ``accelerator.save_state`` store only the LoRA adapters (a few MB) instead of whole models, and the new
    token embeddings of ``pivotal`` (--train_text_encoder_ti)."""
    from .lora import load_adapter_state, save_adapter_state

    def save_hook(model_list, weights, output_dir):
        if accelerator.is_main_process:
            save_adapter_state(Path(output_dir) / ADAPTER_STATE_FILE, models,
                               extra=pivotal.state() if pivotal else None)
        while weights:
            weights.pop()  # accelerate would otherwise write every model's full state dict

    def load_hook(model_list, input_dir):
        path = Path(input_dir) / ADAPTER_STATE_FILE
        try:
            extra = load_adapter_state(path, models)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if pivotal is not None:
            pivotal.load_state(extra, str(path))
        while model_list:
            model_list.pop()  # already loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def lora_signature(config: TrainConfig) -> dict:
    """What must match for a checkpoint to resume this run."""
    adam8 = config.use_8bit_adam and config.optimizer.lower() == "adamw"  # what ran, after any hardware fallback
    return {"pretrained_model_name_or_path": config.pretrained_model_name_or_path, "rank": config.rank,
            "lora_alpha": config.alpha, "use_dora": config.use_dora, "train_text_encoder": config.train_text_encoder,
            "lora_type": config.lora_type, "lokr_factor": config.lokr_factor, "conv_rank": config.conv_rank,
            "conv_alpha": config.conv_alpha_value,
            "init_lora_weights": config.init_lora_weights, "use_ema": config.use_ema,
            "lora_layers": unet_lora_layers(config.lora_layers), "lora_unet_blocks": config.unet_blocks or None,
            "train_text_encoder_ti": config.train_text_encoder_ti, "token_abstraction": config.token_abstraction,
            "num_new_tokens_per_abstraction": config.num_new_tokens_per_abstraction,
            "loraplus": config.loraplus_lr_ratio is not None,  # the optimizer's groups: one or two per model
            # the optimizer's saved state only fits the same optimizer
            "optimizer": "AdamW8bit" if adam8 else "AdamWScheduleFree" if config.schedule_free else
            {"adamw": "AdamW", "adafactor": "Adafactor", "lion": "Lion", "lion8bit": "Lion8bit"}.get(
                config.optimizer.lower(), "Prodigy")}


@contextlib.contextmanager
def writing(what: Path) -> Iterator[None]:
    """A failed write (disk full, permissions) becomes one clear line; files written earlier stay as they were."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"could not write {what}: {exc.strerror or exc}; earlier checkpoints and files are intact "
                        f"(free some space or fix permissions, then --resume_from_checkpoint=latest)") from None


def save_checkpoint(accelerator, out: Path, step: int, config: TrainConfig, unet, text_encoders, history,
                    pissa_initial=None, averaged=contextlib.nullcontext, pivotal=None) -> None:
    """Write ``checkpoint-N`` atomically: built under a hidden name, renamed when complete. ``averaged``: the
    context in which the adapters hold the weights its LoRA file gets (--use_ema: the average); ``pivotal``: new
    token embeddings, saved beside it."""
    with writing(out / f"{CHECKPOINT_PREFIX}{step}"):
        _save_checkpoint(accelerator, out, step, config, unet, text_encoders, history, pissa_initial, averaged,
                         pivotal)


def _save_checkpoint(accelerator, out: Path, step: int, config: TrainConfig, unet, text_encoders, history,
                     pissa_initial, averaged, pivotal) -> None:
    from .lora import save_lora

    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        if config.checkpoints_total_limit:
            prune_checkpoints(out, config.checkpoints_total_limit - 1)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        te = [accelerator.unwrap_model(t) for t in text_encoders] or [None, None]
        # a ready-to-use LoRA file in each checkpoint, so generation can compare how training evolved
        with averaged():
            save_lora(tmp, unet=accelerator.unwrap_model(unet), text_encoder_one=te[0], text_encoder_two=te[1],
                      metadata={**config.to_dict(), "global_step": step}, pissa_initial=pissa_initial,
                      precision=config.save_precision)
            if pivotal is not None:
                from .pivotal import embeddings_file

                pivotal.save(tmp / embeddings_file(final).name, {**config.to_dict(), "global_step": step})
        _write_history(tmp, history)
        atomic_write_json(tmp / STATE_FILE, {"global_step": step, "signature": lora_signature(config),
                                             "num_processes": accelerator.num_processes})
        publish_dir(tmp, final)
    accelerator.wait_for_everyone()


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without its state file was interrupted and is ignored)."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def clear_earlier_run(out: Path, say) -> None:
    """--overwrite_output_dir on a new run: the earlier run's checkpoints, validation images and no_ema/ LoRA go, so
    that a later --resume_from_checkpoint=latest, generate --checkpoints and evaluate see this run's alone (class
    images and TensorBoard logs stay: the first is reused, the second keeps runs apart by itself)."""
    gone = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)] if out.is_dir() else []
    gone += [p for p in (out / "validation", out / NO_EMA_DIR) if p.is_dir()]
    for p in gone:
        shutil.rmtree(p)
    if gone:
        say(f"--overwrite_output_dir: removed the earlier run's {', '.join(sorted(p.name for p in gone))} from {out}")


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in list_checkpoints(out)[: max(0, len(list_checkpoints(out)) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a path, a folder name inside output_dir, or 'latest'."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(out)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not p.is_absolute() and not p.exists():
        p = out / resume
    if not (p / STATE_FILE).is_file():
        found = ", ".join(x.name for x in list_checkpoints(out))
        what = "does not exist" if not p.exists() else f"is not a complete checkpoint (no {STATE_FILE})"
        raise UserError(f"--resume_from_checkpoint={resume}: {p} {what}; "
                        + (f"use 'latest' or one of: {found}" if found else
                           f"{out} holds no complete checkpoint, so leave the flag out to start the run"))
    return p


def check_steps_left(checkpoint: Path, step: int, max_train_steps: int, config: TrainConfig) -> None:
    """Resuming a run that already reached its last step: say so, rather than train a step past it and write over
    the final LoRA."""
    if step >= max_train_steps:
        what = (f"--max_train_steps={config.max_train_steps}" if config.max_train_steps else
                f"--num_train_epochs={config.num_train_epochs} ({max_train_steps} step{'s' * (max_train_steps != 1)})")
        raise UserError(f"{checkpoint} is at step {step}, already at {what}: nothing to train; raise it to train on "
                        f"(the LoRA of that step is in {checkpoint})")


# what a resumed run takes from the checkpoint whatever the command line says (accelerate restores the optimizer's
# and the scheduler's state), and what it takes from the command line but then differs from an uninterrupted run
RESTORED_ON_RESUME = ("learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
                      "lr_power", "scale_lr",
                      # the optimizer's param_groups come back whole: its betas, decay, epsilon, Prodigy's settings
                      "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_weight_decay_text_encoder",
                      "adam_epsilon", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
                      "prodigy_safeguard_warmup",
                      "loraplus_lr_ratio",  # in the groups' learning rates
                      "ema_decay")  # --use_ema's average comes back with its decay
CHANGES_THE_RUN = ("dataset_name", "instance_data_dir", "kaggle_class", "kaggle_splits", "caption_column",
                   "instance_prompt", "repeats", "resolution", "center_crop", "random_flip", "use_aspect_ratio_buckets",
                   "aspect_ratio_buckets", "train_batch_size", "gradient_accumulation_steps", "seed", "snr_gamma",
                   "noise_offset", "with_prior_preservation", "class_prompt", "prior_loss_weight", "max_grad_norm",
                   "lora_dropout", "image_interpolation_mode", "num_class_images", "class_data_dir",
                   "fold_accumulation", "caption_dropout_rate", "loss_type", "huber_schedule", "huber_c",
                   "min_timestep", "max_timestep", "debiased_estimation_loss", "multires_noise_iterations",
                   "multires_noise_discount", "input_perturbation", "timestep_bias_strategy",
                   "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end", "timestep_bias_portion",
                   "masked_loss", "mask_data_dir", "shuffle_caption", "keep_tokens")


def checkpoint_seed(out: Path, config: TrainConfig) -> int | None:
    """The seed the checkpoint that ``--resume_from_checkpoint`` names was trained with, where there is one."""
    from .lora import LORA_WEIGHT_NAME, read_metadata

    if not config.resume_from_checkpoint or not out.is_dir():
        return None
    try:
        checkpoint = find_checkpoint(out, config.resume_from_checkpoint)
        return read_metadata(checkpoint / LORA_WEIGHT_NAME).get("seed") if checkpoint else None
    except Exception:  # noqa: BLE001 - a checkpoint that cannot be read is reported where it is loaded
        return None


def reconcile_resumed(config: TrainConfig, checkpoint: Path, num_processes: int, say) -> TrainConfig:
    """Settings that differ from the checkpoint's: the restored ones are put back in the config (so config.json
    says what runs), with a warning; for the others a warning that the run no longer equals an uninterrupted one."""
    from .lora import LORA_WEIGHT_NAME, read_metadata

    try:
        saved = read_metadata(checkpoint / LORA_WEIGHT_NAME)
    except Exception:  # noqa: BLE001 - an older checkpoint without the header: nothing to compare
        saved = {}
    restored = {k: saved[k] for k in RESTORED_ON_RESUME if k in saved and saved[k] != getattr(config, k)}
    if restored:
        say("warning: resuming keeps the checkpoint's " + ", ".join(
            f"{k}={v!r} (not {getattr(config, k)!r})" for k, v in restored.items())
            + ": the optimizer and scheduler state are restored; start a new --output_dir to change them")
        config = config.replace(**restored)
    changed = [k for k in CHANGES_THE_RUN if k in saved and not same_setting(k, saved[k], getattr(config, k))]
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state.get("num_processes", num_processes) != num_processes:
        changed.append(f"processes {state['num_processes']} -> {num_processes}")
    if changed:
        say(f"warning: {checkpoint.name} was made with other settings ("
            + ", ".join(c if " " in c else f"{c}={saved[c]!r} -> {getattr(config, c)!r}" for c in changed)
            + "): training goes on, but no longer as an uninterrupted run would")
    return config


def check_checkpoint_compatible(checkpoint: Path, config: TrainConfig) -> None:
    from .lora import UNET_TARGET_MODULES

    saved = {"use_ema": False, "train_text_encoder_ti": False, "lora_layers": UNET_TARGET_MODULES,  # from before
             "token_abstraction": "TOK", "num_new_tokens_per_abstraction": 2, "loraplus": False,
             "lora_type": "lora", "lokr_factor": -1, "conv_rank": None, "conv_alpha": None, "lora_unet_blocks": None,
             **json.loads((checkpoint / STATE_FILE).read_text()).get("signature", {})}
    now = lora_signature(config)
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{checkpoint} was made with {k}={saved[k]!r} but this run has {k}={now[k]!r}; "
                        f"resume with the same settings or start a new --output_dir")


# ============================================================================ validation and outputs
def make_lr_scheduler(config: TrainConfig, optimizer, max_train_steps: int, processes: int):
    """--lr_scheduler: diffusers' schedules, and transformers' cosine_with_min_lr and warmup_stable_decay (with a
    floor, --lr_scheduler_min_lr_ratio). accelerate steps a prepared scheduler once per process, hence the factor (as
    in diffusers' script); schedule-free AdamW has no schedule: a constant one, its warm-up inside the optimizer."""
    name = "constant" if config.schedule_free else config.lr_scheduler
    warmup = 0 if config.schedule_free else config.lr_warmup_steps
    if name in MIN_LR_SCHEDULERS:
        from transformers import get_scheduler as transformers_scheduler

        floor = config.lr_scheduler_min_lr_ratio
        if name == "cosine_with_min_lr":
            kwargs = {"min_lr_rate": 0.1 if floor is None else floor}
        else:
            decay = config.lr_decay_steps or max(1, max_train_steps // 5)
            if warmup + decay > max_train_steps:
                raise UserError(f"--lr_scheduler warmup_stable_decay: --lr_warmup_steps {warmup} and "
                                f"--lr_decay_steps {decay} are more than the run's {max_train_steps} steps: shorten "
                                f"them")
            kwargs = {"num_decay_steps": decay * processes, "min_lr_ratio": floor or 0.0}
        return transformers_scheduler(name, optimizer, num_warmup_steps=warmup * processes,
                                      num_training_steps=max_train_steps * processes,
                                      scheduler_specific_kwargs=kwargs)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup * processes,
                         num_training_steps=max_train_steps * processes, num_cycles=config.lr_num_cycles,
                         power=config.lr_power)


def should_checkpoint(config: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    """Every --checkpointing_steps steps, and at the end of every --checkpointing_epochs epochs."""
    return step % config.checkpointing_steps == 0 or bool(
        config.checkpointing_epochs and step % (config.checkpointing_epochs * steps_per_epoch) == 0)


def should_validate(config: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    if config.validation_steps:
        return step % config.validation_steps == 0
    return step % (config.validation_epochs * steps_per_epoch) == 0


def run_validation(config: TrainConfig, c, unet, te_one, te_two, accelerator, weight_dtype, step: int,
                   callback: Callback | None, prompt_map: Callable[[str], str] | None = None):
    """Generate ``num_validation_images`` per validation prompt (seeds seed+i) and save them as a grid: a row per
    prompt, a column per seed. Returns the images, prompt by prompt. ``prompt_map``: what the pipeline is given for
    a prompt (--train_text_encoder_ti: its new tokens in the abstraction's place)."""
    if not accelerator.is_main_process:
        return None
    from .models import pipeline_from_components
    from .viz import image_grid, save_image

    pipe = pipeline_from_components(c, unet=accelerator.unwrap_model(unet), text_encoder_one=accelerator.unwrap_model(te_one),
                                    text_encoder_two=accelerator.unwrap_model(te_two))
    pipe.set_progress_bar_config(disable=True)
    device = accelerator.device
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    images = []
    rows, seeds = config.validation_rows, [config.seed + i for i in range(config.num_validation_images)]
    prompts = [row.prompt for row in rows]
    settings = [{"negative_prompt": row.negative_prompt if row.negative_prompt is not None else
                 config.validation_negative_prompt,
                 "guidance_scale": row.guidance_scale if row.guidance_scale is not None else
                 config.validation_guidance_scale,
                 "num_inference_steps": row.steps or config.validation_inference_steps} for row in rows]
    with torch.no_grad(), autocast, on_device([pipe.text_encoder, pipe.text_encoder_2, pipe.vae], device):
        for prompt, setting in zip(prompts, settings):
            for seed in seeds:
                g = torch.Generator(device=device).manual_seed(seed)
                images.append(pipe(prompt_map(prompt) if prompt_map else prompt, **setting,
                                   height=config.resolution, width=config.resolution, generator=g,
                                   crops_coords_top_left=(config.crops_coords_top_left_h,
                                                          config.crops_coords_top_left_w)).images[0])
    out = Path(config.output_dir) / "validation"
    seed_labels = [f"seed {s}" for s in seeds]
    if len(prompts) == 1:
        grid = image_grid(images, 1, len(seeds), labels=seed_labels)
    else:
        grid = image_grid(images, len(prompts), len(seeds), row_labels=prompts, col_labels=seed_labels)
    path = out / f"step-{step:06d}.png"
    for tracker in accelerator.trackers:  # TensorBoard's IMAGES tab, wandb's media: a row of seeds per prompt
        for row, prompt in enumerate(prompts):
            shown = images[row * len(seeds):(row + 1) * len(seeds)]
            key = f"validation/{row}: {prompt}"[:100]
            if tracker.name == "tensorboard":
                tracker.writer.add_images(key, np.stack([np.asarray(im.convert("RGB")) for im in shown]), step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({key: [wandb.Image(im, caption=label) for im, label in zip(shown, seed_labels)]},
                            step=step)
    save_image(grid, path, metadata={"prompt": prompts[0], "prompts": json.dumps(prompts), "step": str(step),
                                     "seed": str(config.seed), "steps": str(config.validation_inference_steps),
                                     "negative_prompt": config.validation_negative_prompt or "",
                                     "guidance_scale": str(config.validation_guidance_scale),
                                     "rows": json.dumps([{"prompt": p, **st} for p, st in zip(prompts, settings)])})
    if callback:
        callback({"event": "validation", "step": step, "images": images, "path": str(path)})
    return images


@contextlib.contextmanager
def on_device(modules: Sequence[torch.nn.Module], device) -> Iterator[None]:
    """Bring modules to ``device`` for a while (e.g. offloaded text encoders for validation), then put them back."""
    before = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, d in zip(modules, before):
            m.to(d)


# --scale_weight_norms' numbers per step, as kohya logs them (after the step's scaling)
NORM_COLUMNS = ("keys_scaled", "mean_key_norm", "max_key_norm")


def _write_history(folder: Path, history: list[dict]) -> None:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "lr"] + [
        c for c in NORM_COLUMNS if any(c in row for row in history)], restval="")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(folder / "loss_history.csv", buf.getvalue())


def load_history(out: Path) -> list[dict]:
    p = out / "loss_history.csv"
    ckpt = find_checkpoint(out, "latest")
    if ckpt is not None and (ckpt / "loss_history.csv").exists():
        p = ckpt / "loss_history.csv"
    if not p.exists():
        return []
    with open(p) as fh:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 **{c: (int if c == "keys_scaled" else float)(r[c]) for c in NORM_COLUMNS if r.get(c)}}
                for r in csv.DictReader(fh)]


def _count(n: int, noun: str) -> str:
    """'1 image', '3 images'."""
    return f"{n} {noun}{'s' * (n != 1)}"


def _precision_words(mixed_precision: str) -> str:
    """accelerate's ``mixed_precision`` as the banner says it: 'fp16 mixed precision', or 'fp32' for 'no'."""
    return "fp32 (no mixed precision)" if mixed_precision == "no" else f"{mixed_precision} mixed precision"


def save_final(out: Path, config: TrainConfig, unet, text_encoders, history, accelerator, pissa_initial=None,
               ema=None, pivotal=None, averaged=contextlib.nullcontext) -> None:
    """The LoRA (diffusers format, kohya too where asked), config.json, loss history and plot, model card. With
    ``ema`` (--use_ema) the LoRA files hold the average, and no_ema/ the last weights themselves; with ``pivotal``
    (--train_text_encoder_ti) the token embeddings are saved beside each LoRA. ``averaged``: the context in which
    the adapters hold what the LoRA files get (--use_ema's average, schedule-free AdamW's averaged weights)."""
    from .pivotal import embeddings_file

    from .lora import KOHYA_WEIGHT_NAME, save_lora
    from .viz import plot_loss

    te = [accelerator.unwrap_model(t) for t in text_encoders] or [None, None]
    # a kohya file an earlier run left here (resumed now without --output_kohya_format) would hold older weights
    # beside the new LoRA: written again, so both files always hold the same LoRA
    kohya = config.output_kohya_format or (out / KOHYA_WEIGHT_NAME).is_file()
    lora = dict(unet=accelerator.unwrap_model(unet), text_encoder_one=te[0], text_encoder_two=te[1],
                pissa_initial=pissa_initial, precision=config.save_precision)
    with writing(out):
        if ema is not None:
            save_lora(out / NO_EMA_DIR, metadata={**config.to_dict(), "ema": "no: the last weights"}, **lora)
            if pivotal is not None:
                pivotal.save(embeddings_file(out / NO_EMA_DIR), config.to_dict())
        with averaged():
            save_lora(out, metadata=config.to_dict(), kohya=kohya, **lora)
            if pivotal is not None:
                pivotal.save(embeddings_file(out), config.to_dict())
            else:  # an earlier run's token embeddings would be loaded with this LoRA
                embeddings_file(out).unlink(missing_ok=True)
        config.save(out / "config.json")
        _write_history(out, history)
        if history:
            plot_loss(history, out / "loss.png")
        write_model_card(out, config)


# settings the model card lists only where a run changed them
SHOWN_IF_SET = ("lora_type", "lokr_factor", "conv_rank", "conv_alpha", "lora_unet_blocks", "use_blora",
                "loraplus_lr_ratio", "masked_loss", "timestep_bias_strategy", "timestep_bias_multiplier",
                "multires_noise_iterations", "input_perturbation", "noise_offset", "min_timestep", "max_timestep",
                "debiased_estimation_loss", "shuffle_caption", "keep_tokens", "save_precision", "scale_weight_norms",
                "noise_offset_random_strength", "input_perturbation_random_strength")


def write_model_card(out: Path, config: TrainConfig) -> None:
    """README.md beside the LoRA: what it is, how it was trained, how to use it in diffusers, ComfyUI and A1111."""
    from string import Template

    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    vae = config.pretrained_vae_model_name_or_path
    shown = ("instance_prompt", "resolution", "rank", "lora_alpha", "lora_layers", "learning_rate", "max_train_steps",
             "train_batch_size", "gradient_accumulation_steps", "snr_gamma", "loss_type", "mixed_precision",
             "lr_scheduler", "seed",
             "caption_dropout_rate", "train_text_encoder", "train_text_encoder_ti", "token_abstraction",
             "with_prior_preservation", "init_lora_weights", "init_lora",
             "use_aspect_ratio_buckets", "aspect_ratio_buckets", "use_ema", "ema_decay", "fallbacks")
    template = Template((Path(__file__).parent / "templates" / "model_card.md").read_text())
    from .single_file import is_single_file

    single = is_single_file(config.pretrained_model_name_or_path)  # a civitai-style checkpoint file
    text = template.substitute(
        base_model=config.pretrained_model_name_or_path, instance_prompt=config.instance_prompt,
        folder=config.hub_model_id if config.push_to_hub else out.name,
        loader="from_single_file" if single else "from_pretrained", scheduler_line=_scheduler_line(config, single),
        loader_args=f"config=\"{config.single_file_config}\", " if single and config.single_file_config else "",
        vae_note=f" (trained with the VAE `{vae}`)" if vae else "",
        ema_note=(f"\nThe weights are the moving average of training's (`--use_ema`); the last weights themselves "
                  f"are in `{NO_EMA_DIR}/`." if config.use_ema else "") + _pivotal_note(out, config)
                 + _blocks_note(out, config),
        sample=f"![validation samples](validation/{grids[-1].name})\n" if grids else "(no validation prompt was set)\n",
        settings="\n".join(f"| `{k}` | `{v}` |" for k, v in config.to_dict().items()
                           if (k in shown and (config.use_ema or k != "ema_decay")
                               and (config.train_text_encoder_ti or k != "token_abstraction"))
                           or (k in SHOWN_IF_SET and v != TrainConfig.__dataclass_fields__[k].default)),
        vae=vae or "madebyollin/sdxl-vae-fp16-fix", vae_arg="vae=vae, " if vae else "",
        vae_comment="" if vae else "# optional, SDXL's own VAE can overflow in fp16: ",
        **_loading_notes(out, config))
    atomic_write_text(out / "README.md", text)


def _scheduler_line(config: TrainConfig, single: bool) -> str:
    """The model card's line that samples as the run trained: v-prediction / zero terminal SNR set by flags or by a
    single file's markers, which diffusers' loaders do not apply by themselves ("" where nothing differs)."""
    from .models import noise_schedule_settings, single_file_markers

    kw = noise_schedule_settings(prediction_type=config.prediction_type, zero_terminal_snr=config.zero_terminal_snr,
                                 markers=single_file_markers(config.pretrained_model_name_or_path) if single else None)
    if not kw or kw == {"prediction_type": "epsilon"}:
        return ""
    args = ", ".join(f"{k}={v!r}".replace("'", '"') for k, v in kw.items())
    return f"pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, {args})  # as trained\n"


def _loading_notes(out: Path, config: TrainConfig) -> dict[str, str]:
    """The model card's lines on loading the file: diffusers' loader for a LoRA, ours for a LoHa/LoKr."""
    if config.lora_type != "lora":
        kind = {"loha": "LoHa", "lokr": "LoKr"}[config.lora_type]
        return {"adapter_kind": f"LyCORIS {kind}", "extra_tags": f", lycoris, {config.lora_type}",
                "load_code": f"# diffusers' SDXL load_lora_weights reads no LyCORIS {kind} file; billiard-lora's "
                             f"loader puts it on the\n# pipeline as a peft adapter (pipe.set_adapters, fuse_lora "
                             f"work as for a LoRA)\nfrom billiard_lora.lycoris import load_lycoris\n"
                             f"load_lycoris(pipe, \"{out.name}/pytorch_lora_weights.safetensors\", \"subject\")",
                "webui_note": f"`pytorch_lora_weights.safetensors` is in LyCORIS' own format (`lora_unet_..."
                              f"{'.lokr_w1' if config.lora_type == 'lokr' else '.hada_w1_a'}`, kohya's names), "
                              f"which ComfyUI's LoRA loader node and A1111's built-in Lora extension read: copy it "
                              f"into `ComfyUI/models/loras/` or `stable-diffusion-webui/models/Lora/` and use "
                              f"`<lora:pytorch_lora_weights:1>` in the prompt (A1111)."}
    kohya = ("`pytorch_lora_weights_kohya.safetensors` (kohya/webui format)" if config.output_kohya_format else
             "the kohya file (train with `--output_kohya_format`, or `python -m billiard_lora.lora convert "
             "pytorch_lora_weights.safetensors --to kohya --out .`)")
    return {"adapter_kind": "LoRA", "extra_tags": "",
            "load_code": (f"pipe.load_lora_weights(\"{config.hub_model_id}\")  # from the Hub" if config.push_to_hub
                          else f"pipe.load_lora_weights(\"{out.name}\")  # this folder"),
            "webui_note": f"Copy {kohya} into `ComfyUI/models/loras/` or `stable-diffusion-webui/models/Lora/`, then "
                          f"load it with a LoRA\nloader node (ComfyUI) or `<lora:pytorch_lora_weights_kohya:1>` in the "
                          f"prompt (A1111). The diffusers-format file\n(`pytorch_lora_weights.safetensors`) is for "
                          f"diffusers; ComfyUI and A1111 read the kohya one."}


def _blocks_note(out: Path, config: TrainConfig) -> str:
    """The model card's word on a LoRA confined to some UNet blocks (--use_blora, --lora_unet_blocks)."""
    if config.use_blora:
        return (f"\nIt is a B-LoRA (arXiv 2403.14572): its layers lie in two UNet blocks only, `up_blocks.0.attentions.0`"
                f" (the content) and `up_blocks.0.attentions.1` (the style). Take one of them with another B-LoRA's "
                f"other: `python -m billiard_lora.generate --lora {out.name}@content --lora OTHER@style`.")
    if config.unet_blocks:
        return f"\nIts UNet layers lie in {', '.join(f'`{b}`' for b in config.unet_blocks)} only."
    return ""


def _pivotal_note(out: Path, config: TrainConfig) -> str:
    """The model card's word on --train_text_encoder_ti's token embeddings: which tokens, how to load them."""
    if not config.train_text_encoder_ti:
        return ""
    from .pivotal import embeddings_file, token_map

    mapping = token_map(config.token_abstraction, config.num_new_tokens_per_abstraction)
    tokens = [t for v in mapping.values() for t in v]
    name = embeddings_file(out).name
    words = ", ".join(f"`{k}` is `{''.join(v)}`" for k, v in mapping.items())
    return (f"\n\nPivotal tuning: new tokens trained with the LoRA ({words} in prompts), their embeddings in "
            f"`{name}` (`clip_l`, `clip_g`: A1111 and ComfyUI read it as an SDXL embedding). In diffusers, after "
            f"loading the {'LoRA' if config.lora_type == 'lora' else 'adapter'} as below:\n```python\n"
            f"from safetensors.torch import load_file\nstate = load_file(\"{name}\")\n"
            f"pipe.load_textual_inversion(state[\"clip_l\"], token={tokens}, text_encoder=pipe.text_encoder, "
            f"tokenizer=pipe.tokenizer)\npipe.load_textual_inversion(state[\"clip_g\"], token={tokens}, "
            f"text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)\n```\n`python -m billiard_lora.generate` "
            f"loads them by itself and writes `{config.token_abstraction.split(',')[0].strip()}` as its tokens.")


class Timer:
    """Wall time, images/s and peak memory of the run (CUDA allocator peak, or the process's peak RSS)."""

    def __init__(self, device):
        self.device, self.t0, self.images = device, time.perf_counter(), 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def step(self, images: int) -> None:
        self.images += images

    def summary(self, steps: int) -> dict:
        seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device) / 2**30, "CUDA max allocated"
        else:
            import resource

            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU peak RSS"
        return {"steps": steps, "seconds": seconds, "images": self.images,
                "images_per_second": self.images / seconds if seconds else 0.0, "peak_memory_gb": peak,
                "memory_kind": kind}


# ============================================================================ prior preservation
CLASS_PROMPT_RECORD = ".class_prompt.json"  # written beside the class images the trainer generates


def ensure_class_images(config: TrainConfig, c, accelerator, weight_dtype) -> list[TrainImage]:
    """Class images for prior preservation: use what ``class_data_dir`` holds, generate the missing ones once."""
    from .data import load_image
    from .models import pipeline_from_components

    class_dir = Path(config.class_data_dir or Path(config.output_dir) / "class_images")
    if config.class_data_dir and class_dir.is_dir():
        from .data import _kohya_layout_source, is_kohya_layout

        if is_kohya_layout(class_dir):  # kohya's --reg_data_dir: N_words/ folders, all of their images, N times each
            examples = _kohya_layout_source(class_dir).examples
            return [TrainImage(load_image(e.path), config.class_prompt if e.caption is None else e.caption,
                               hashlib.sha256(e.path.read_bytes()).hexdigest()[:16])
                    for e in examples for _ in range(e.repeats)]
    exts = {".jpg", ".jpeg", ".png", ".webp"}
    existing = lambda: sorted(p for p in class_dir.glob("*") if p.suffix.lower() in exts and not p.name.startswith("."))
    missing = config.num_class_images - len(existing()) if class_dir.is_dir() else config.num_class_images
    record = class_dir / CLASS_PROMPT_RECORD  # which prompt made the generated ones
    if accelerator.is_main_process and record.is_file() and existing():
        with contextlib.suppress(OSError, ValueError):
            made_for = json.loads(record.read_text()).get("class_prompt")
            if made_for != config.class_prompt:
                warnings.warn(f"the class images in {class_dir} were generated for the class prompt {made_for!r}, "
                              f"not {config.class_prompt!r}: the prior loss keeps that class; delete them (or give "
                              f"another --class_data_dir) to generate new ones")
    if missing > 0 and accelerator.is_main_process:
        from tqdm.auto import tqdm

        class_dir.mkdir(parents=True, exist_ok=True)
        if not existing():
            atomic_write_json(record, {"class_prompt": config.class_prompt})
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
            config.prior_generation_precision or "", weight_dtype)
        pipe = pipeline_from_components(c)
        pipe.set_progress_bar_config(disable=True)
        start = len(existing())
        autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)
        # (--fp8_base keeps the UNet off the GPU until it is stored in float8: here it visits in the compute dtype)
        with torch.no_grad(), autocast, on_device([c.unet], accelerator.device):
            for first in tqdm(range(0, missing, config.sample_batch_size), desc="generating class images"):
                n = min(config.sample_batch_size, missing - first)
                gens = [torch.Generator(accelerator.device).manual_seed(config.seed + start + first + i) for i in range(n)]
                images = pipe([config.class_prompt] * n, num_inference_steps=config.validation_inference_steps,
                              height=config.resolution, width=config.resolution, generator=gens).images
                for i, img in enumerate(images):
                    buf = _io.BytesIO()
                    img.save(buf, format="JPEG", quality=95)
                    digest = hashlib.sha1(buf.getvalue()).hexdigest()[:12]
                    from .io import atomic_write_bytes

                    atomic_write_bytes(class_dir / f"{start + first + i:05d}-{digest}.jpg", buf.getvalue())
        del pipe
    accelerator.wait_for_everyone()
    paths = existing()[: config.num_class_images]
    return [TrainImage(load_image(p), config.class_prompt, hashlib.sha256(p.read_bytes()).hexdigest()[:16])
            for p in paths]


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: Ctrl-C and SIGTERM are the main process's to act on (``StopRequest``); a worker
    that died of them would fail the step the main process is finishing. (Forked workers inherit the main process's
    handler anyway; spawned ones, macOS's and Windows' default, would not. Workers end with the main process.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's or a container's stop) while the training loop runs: noted, not
    raised, so that the optimizer step under way completes and a checkpoint holds exactly the run so far, from which
    ``--resume_from_checkpoint`` goes on as if it had never stopped. A second Ctrl-C stops at once. Under
    ``accelerate launch`` the processes agree (one reduction per optimizer step), so that all save the same step.
    Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def name(self) -> str:
        return {signal.SIGINT: "by Ctrl-C", signal.SIGTERM: "by SIGTERM"}.get(self.signum, "as another process was")

    def install(self) -> Callable[[], None]:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._note)
        return self.uninstall

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        self.signum = self.signum or signum

    def agreed(self, accelerator) -> bool:
        """Does any process want to stop? (The same answer on every process.)"""
        wanted = self.signum is not None
        if accelerator.num_processes > 1:
            votes = accelerator.reduce(torch.tensor([int(wanted)], device=accelerator.device), reduction="sum")
            wanted = int(votes.item()) > 0
        return wanted


# ============================================================================ command line
@cli_entry
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except KeyboardInterrupt as exc:  # Ctrl-C (or a notebook's stop): say what is kept and how to go on
        raise KeyboardInterrupt(str(exc) or interrupted_hint(config)) from None
    return 0


def interrupted_hint(config: TrainConfig) -> str:
    """What a stopped run keeps and how to go on, for the line ``interrupted`` is printed with."""
    out = Path(config.output_dir)
    try:
        ckpt = find_checkpoint(out, "latest") if out.is_dir() else None
    except Exception:  # noqa: BLE001 - a folder that cannot be read: no hint beats a traceback after Ctrl-C
        return ""
    if ckpt is None:
        return f"no checkpoint was saved in {out} yet: run the same command again to start over"
    how = ("run the same command again" if config.resume_from_checkpoint == "latest" else
           "add --resume_from_checkpoint=latest to the same command")
    return f"{ckpt} is kept: {how} to go on from it"


if __name__ == "__main__":
    raise SystemExit(main())
