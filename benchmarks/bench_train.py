"""Training (and generation) speed and memory of billiard-lora, printed as JSON.

    python benchmarks/bench_train.py --shape small --resolution 256            # CPU, SDXL-shaped small model
    python benchmarks/bench_train.py --shape full --resolution 1024 --device cuda --mixed_precision fp16 \
        --use_8bit_adam --gradient_checkpointing                               # the seed's settings, real SDXL size

Models are SDXL architectures at random weights built by ``billiard_lora.tiny`` (tiny / small / full = SDXL base
1.0's 2.57 B-parameter UNet), so nothing is downloaded; speed and memory do not depend on the weights' values.
It runs warm-up steps, then timed steps, of the real ``train()`` (data, caches, optimizer, accumulation), and
reports optimizer steps/s, images/s, ms per micro-step, peak memory, and model-FLOP utilisation from a FLOP count
of the UNet measured with ``torch.utils.flop_counter`` (forward x 2 for frozen-weight training, x 3 with gradient
checkpointing, which recomputes the forward; with ``--gradient_checkpointing_interval`` N the blocks it recomputes,
as counted). With ``--generation`` it also times SDXL sampling: base, LoRA
unfused, LoRA fused, and LoRA fused with the UNet in float8 (``generate --fuse --fp8_base``). No timed assertions
anywhere: these are numbers to read and record in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora import paths  # noqa: E402
from billiard_lora.config import TrainConfig  # noqa: E402
from billiard_lora.lora import UNET_TARGET_MODULES  # noqa: E402
from billiard_lora.models import Components  # noqa: E402
from billiard_lora.optim import make_optimizer  # noqa: E402
from billiard_lora.tiny import SHAPES, build_components  # noqa: E402
from billiard_lora.train import (CHECKPOINTED_BLOCKS, _mark_block_tails, checkpoint_unet,  # noqa: E402
                                 extra_flop_formulas, keep_costly_outputs, selective_threshold, train)
from bench_memory import flash_attention_accounting  # noqa: E402
from common import (device_name, emit, idle_gaps, peak_memory, peak_memory_since_reset,  # noqa: E402
                    reset_peak_memory)


def components(shape: str, device: str, dtype: torch.dtype = torch.float32) -> Components:
    from diffusers import DDPMScheduler

    # built in the training dtype, so the peak-memory figure never sees a float32 copy of the UNet
    c = build_components(SHAPES[shape], device=device, seed=0, dtype=dtype)
    return Components(c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"], c["vae"], c["unet"],
                      DDPMScheduler.from_config(c["scheduler"].config))


def unet_forward_flops(c: Components, resolution: int, batch: int, checkpoint_interval: int = 0,
                       selective: str = "off") -> tuple[float, float]:
    """FLOPs of one UNet forward at this resolution and batch, counted by torch (matmuls, convolutions, attention),
    and those of it that gradient checkpointing every ``checkpoint_interval``-th block recomputes (0: none); with
    ``selective`` (--selective_checkpointing) only the operations whose outputs it does not keep. Attention is counted
    as the GPU's fused kernels run it.

    Counted on a copy of the architecture on the meta device: no memory, no time, and wherever the model is.
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    recomputed = 0.0

    def count_recomputed(block, *args):  # stands in for the checkpoint: the blocks it would run again
        nonlocal recomputed
        # (a block before the first adapter gets no gradient: backward never reaches it, nothing is recomputed)
        needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or \
            any(p.requires_grad for p in block.parameters())
        recompute = getattr(block, "_billiard_recompute", True) and needs_grad
        if recompute and threshold is not None:  # under the selective policy: what it would not keep
            record: dict = {}
            out = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                                    context_fn=keep_costly_outputs(threshold, record, tail))
            recomputed += record.get("recomputed_flops", 0)
            return out
        before = counter.get_total_flops()
        out = block(*args)
        if recompute:
            recomputed += counter.get_total_flops() - before
        return out

    lat = resolution // 8
    te2_dim = c.text_encoder_two.config.projection_dim
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(c.unet.config)
        threshold = selective_threshold(selective, unet)  # (no adapters here: 'products' keeps every product)
        cross = unet.config.cross_attention_dim
        x = torch.randn(batch, 4, lat, lat)
        t = torch.full((batch,), 500)
        emb = torch.randn(batch, 77, cross)
        cond = {"text_embeds": torch.randn(batch, te2_dim),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).float()}
    if checkpoint_interval:
        unet.requires_grad_(False)  # gradients flow where the trainer's adapters sit (no adapter FLOPs added)
        for name, module in unet.named_modules():
            if any(name.endswith(t) for t in UNET_TARGET_MODULES):
                module.weight.requires_grad_(True)
        checkpoint_unet(unet, interval=checkpoint_interval)  # which blocks
        # (the blocks' last products, which the selective recompute never reaches: see train._mark_block_tails)
        tail = _mark_block_tails(unet, [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_BLOCKS]) \
            if threshold is not None else None
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=count_recomputed)
        unet.train()
    # (grad mode on, so that diffusers calls the checkpoint function; nothing needs a gradient, nothing is kept)
    with torch.enable_grad(), flash_attention_accounting(), \
            FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        unet(x, t, emb, added_cond_kwargs=cond)
    return float(counter.get_total_flops()), float(recomputed)


def load_model(args) -> Components:
    """The model under test: a diffusers folder (``--model``), or a random-weight architecture (``--shape``)."""
    if args.model:
        from billiard_lora.models import load_components

        return load_components(args.model, pretrained_vae_model_name_or_path=args.vae)
    on_gpu = args.device.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if on_gpu else None
    return components(args.shape, args.device, dtype or torch.float32)


def mixed_shapes(folder: Path) -> str:
    """The embedded images cropped to three shapes, a third each: square, landscape 3:2, portrait 2:3."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i, path in enumerate(sorted(paths.DEFAULT_DATA_DIR.glob("*.png"))):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        box = [(0, 0, w, h), (0, 0, w, h * 2 // 3), (0, 0, w * 2 // 3, h)][i % 3]
        image.crop(box).save(folder / path.name)
    return str(folder)


@contextlib.contextmanager
def unet_variant(name: str, unet):
    """The trainer with one of bench_unet.py's variants of running the UNet (a measurement; fp16_norms is train()'s
    --half_precision_norms)."""
    import bench_unet

    if name in ("fp16_norms", "fp32_norms"):
        undo = bench_unet.VARIANTS[name](unet)
    elif name == "addmm_lora":  # train() adds the adapters itself: every peft Linear made in here takes it
        bench_unet.PeftLinear.forward = bench_unet.addmm_lora_forward

        def undo():
            bench_unet.PeftLinear.forward = bench_unet.PEFT_LINEAR_FORWARD
    else:
        undo = None
    try:
        yield
    finally:
        if undo:
            undo()


def bench_training(args) -> dict:
    c = load_model(args)
    if args.channels_last:  # the convolutions' weights NHWC: activations follow from the first convolution on
        c.unet.to(memory_format=torch.channels_last)
    # (with --auto_gradient_checkpointing the interval is known only once training ran: counted again then)
    fwd, recomputed = unet_forward_flops(c, args.resolution, args.train_batch_size,
                                         args.gradient_checkpointing_interval if args.gradient_checkpointing else 0,
                                         args.selective_checkpointing)
    step_times: list[float] = []
    on_gpu = args.device.startswith("cuda")
    profiled = args.warmup + args.steps  # on a GPU one more optimizer step runs under the profiler, after the timed ones
    profiler = GpuTime() if on_gpu else None
    setup_peak: dict = {}  # the peak up to the end of the warm-up steps

    def on_event(e: dict) -> None:
        if e["event"] == "step":
            step_times.append(time.perf_counter())
            n = len(step_times)
            dt = step_times[-1] - (step_times[-2] if n > 1 else t0)
            print(f"[bench] optimizer step {n}: {dt:.2f} s", file=sys.stderr, flush=True)  # a cut-off run still says
            if n == args.warmup:  # the peak of the timed steps alone, without loading and first-step setup
                setup_peak.update(peak_memory(args.device))
                reset_peak_memory(args.device)
            try:  # the profile is extra: a profiler that fails must not cost the timings
                if profiler and n == profiled:
                    profiler.start()
                elif profiler and n == profiled + 1:
                    profiler.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"[bench] profiler failed: {exc!r}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            pretrained_model_name_or_path=args.model or f"random-{args.shape}",
            pretrained_vae_model_name_or_path=args.vae, instance_prompt="a photo of messi playing billiard",
            dataset_name=mixed_shapes(Path(tmp) / "mixed") if args.aspect_ratio_buckets else str(paths.DEFAULT_DATA_DIR),
            aspect_ratio_buckets=args.aspect_ratio_buckets, output_dir=str(Path(tmp) / "run"), resolution=args.resolution,
            train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_interval=args.gradient_checkpointing_interval,
            selective_checkpointing=args.selective_checkpointing,
            auto_gradient_checkpointing=args.auto_gradient_checkpointing, mixed_precision=args.mixed_precision,
            use_8bit_adam=args.use_8bit_adam, rank=args.rank, max_train_steps=profiled + (1 if on_gpu else 0),
            checkpointing_steps=10**9, learning_rate=1e-4, lr_warmup_steps=0, snr_gamma=5.0, seed=0,
            report_to="none", cache_latents=not args.no_cache_latents, torch_compile=args.torch_compile,
            torch_compile_mode=args.torch_compile_mode, fp8_base=args.fp8_base,
            half_precision_norms=args.half_precision_norms == "true", fused_lora_ops=args.fused_lora_ops,
            fold_accumulation=args.fold_accumulation,
            cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs])
        if args.set:  # (--set FIELD=VALUE: read as a config file's value would be)
            extra = dict(item.split("=", 1) for item in args.set)
            config = TrainConfig.from_dict({**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                                            **extra}, source="--set")
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if args.bnb_per_tensor:  # what diffusers' script runs: bitsandbytes stepping (and syncing) per tensor
            import bitsandbytes as bnb

            import billiard_lora.train as train_module

            def per_tensor(config, unet, text_encoders, num_processes, **kw):
                flat = make_optimizer(config, unet, text_encoders, num_processes, **kw)
                return bnb.optim.AdamW8bit([dict(g) for g in flat.param_groups], lr=config.learning_rate)

            train_module.make_optimizer = per_tensor
        t0 = time.perf_counter()
        with unet_variant(args.unet_variant, c.unet):
            run = train(config, components=c, callback=on_event)
        total = time.perf_counter() - t0
        timed_peak = peak_memory_since_reset(args.device) if setup_peak else {}
        whole_run = {k: max(v, setup_peak.get(k, 0.0)) for k, v in peak_memory(args.device).items()}
        used = json.loads((run / "config.json").read_text())  # what actually ran, after any hardware fallback
        done = json.loads((run / "summary.json").read_text())
    timed = (step_times[args.warmup - 1:] if args.warmup > 0 else [t0] + step_times)[:args.steps + 1]
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    micro = args.gradient_accumulation_steps
    images_per_step = args.train_batch_size * micro
    # per micro-batch: forward + backward (about 2 forwards: frozen weights need no weight gradients), plus the
    # forward that checkpointing recomputes: all of it (the count) with every block checkpointed, else the
    # blocks it recomputes as counted
    checkpointing = used["gradient_checkpointing"]  # what ran (--auto_gradient_checkpointing decides it)
    interval = used.get("gradient_checkpointing_interval", 1) if checkpointing else 0
    selective = used.get("selective_checkpointing", "off") if checkpointing else "off"
    if (interval, selective) != ((args.gradient_checkpointing_interval, args.selective_checkpointing)
                                 if args.gradient_checkpointing else (0, "off")):
        recomputed = unet_forward_flops(c, args.resolution, args.train_batch_size, interval, selective)[1]
    whole = interval == 1 and selective == "off"
    train_flops = fwd * (3 if whole else 2) + (recomputed if not whole else 0)
    result = {
        "what": "training", "shape": args.model or args.shape, "torch_compile": args.torch_compile,
        "torch_compile_mode": args.torch_compile_mode, "resolution": args.resolution, "device": device_name(args.device),
        "batch": args.train_batch_size, "gradient_accumulation_steps": micro,
        "gradient_checkpointing": checkpointing, "gradient_checkpointing_interval": interval or None,
        "selective_checkpointing": selective,
        "recomputed_fraction_of_forward": recomputed / fwd,  # as counted (train_flops: the x 3 for 1)
        "auto_gradient_checkpointing": args.auto_gradient_checkpointing,
        "mixed_precision": used["mixed_precision"],
        "use_8bit_adam": used["use_8bit_adam"], "fallbacks": used["fallbacks"], "cache_latents": not args.no_cache_latents,
        "timed_steps": len(timed) - 1, "optimizer_steps_per_s": 1 / per_step, "images_per_s": images_per_step / per_step,
        "ms_per_micro_step": 1000 * per_step / micro, "unet_forward_tflop": fwd / 1e12,
        "train_tflop_per_micro_step": train_flops / 1e12, "wall_s_including_setup": total,
        "s_to_first_step": step_times[0] - t0 if step_times else None, **whole_run, **timed_peak,
        "fp8_base": used["fp8_base"], "cuda_graphs": used["cuda_graphs"],
        "channels_last": args.channels_last, "unet_variant": args.unet_variant,
        "aspect_ratio_buckets": args.aspect_ratio_buckets,
        "half_precision_norms": used["half_precision_norms"], "fused_lora_ops": used.get("fused_lora_ops", False),
        "fold_accumulation": used.get("fold_accumulation", False),  # ms_per_micro_step: still per train_batch_size
        "optimizer_form": ("bnb_per_tensor" if args.bnb_per_tensor else "flat") if used["use_8bit_adam"] else "torch",
        "set": args.set,
    }
    if used["cuda_graphs"]:
        result.update({k: done.get(k) for k in ("cuda_graph_replays", "micro_steps", "cuda_graphs_recorded",
                                                "cuda_graph_failure")})
    if args.peak_tflops:
        result["mfu"] = (train_flops / (per_step / micro)) / (args.peak_tflops * 1e12)
    if profiler and profiler.kernels:
        result.update(profiler.report(micro))
    return result


class GpuTime:
    """How long the GPU itself computes during one optimizer step: the sum of its kernels' durations (CUPTI).

    Set against the step's wall time it says whether the step is bound by the GPU (the two close) or by the CPU
    issuing work (kernel time far below wall time), and which kernels take the time.
    """

    def __init__(self):
        self.kernels: dict[str, tuple[float, int]] = {}
        self._prof = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self._prof = profile(activities=[ProfilerActivity.CUDA])
        self._prof.start()
        self._wall = time.perf_counter()
        # torch.cuda.synchronize() calls within the step (bitsandbytes per tensor makes one per LoRA tensor)
        self.synchronize_calls, self._real_sync = 0, torch.cuda.synchronize

        def counting(*args, **kwargs):
            self.synchronize_calls += 1
            return self._real_sync(*args, **kwargs)

        torch.cuda.synchronize = counting

    def stop(self) -> None:
        torch.cuda.synchronize = self._real_sync
        torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._wall
        self._prof.stop()
        for e in self._prof.key_averages():
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if us:
                self.kernels[e.key] = (us / 1000, e.count)
        # the kernels' timeline: where the GPU waited, and between which kernels
        from torch.autograd import DeviceType

        spans = [(e.time_range.start, e.time_range.end, e.name) for e in self._prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
        self.idle_ms, self.gaps = idle_gaps(spans)

    def report(self, micro: int) -> dict:
        total = sum(ms for ms, _ in self.kernels.values())
        top = sorted(self.kernels.items(), key=lambda kv: -kv[1][0])[:8]
        return {"gpu_kernel_ms_per_micro_step": total / micro,
                "profiled_wall_ms_per_micro_step": 1000 * self.wall / micro,
                "gpu_busy_fraction": total / (1000 * self.wall),
                "gpu_kernel_launches_per_micro_step": sum(n for _, n in self.kernels.values()) / micro,
                "top_kernels_ms_per_micro_step": {k[:90]: round(ms / micro, 2) for k, (ms, _) in top},
                "gpu_idle_ms_per_micro_step": self.idle_ms / micro, "longest_gpu_gaps": self.gaps,
                "cuda_synchronize_calls_per_optimizer_step": self.synchronize_calls}


def bench_generation(args) -> dict:
    """Seconds per image: base, LoRA unfused, LoRA fused, fused + float8 UNet -- four pipelines sharing the text
    encoders and VAE, each with a UNet of its own -- and, on a GPU, base and fused with ``cuda_graphs``; timed in
    interleaved rounds (base, unfused, fused, fp8, ..., base, ...) so that a slow moment of the machine hits every
    variant alike; medians over the rounds. On a GPU, one more image of each under the profiler: its kernels' time
    and count, which the host's pace does not move."""
    import statistics

    from billiard_lora.generate import LoraSpec, fuse_loras, generate, load_lora
    from billiard_lora.lora import add_lora, save_lora
    from billiard_lora.models import store_weights_in_fp8

    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    c = build_components(SHAPES[args.shape], device=args.device, seed=0, dtype=dtype)

    def unet():  # the same weights each time (seed 0)
        return build_components(SHAPES[args.shape], device=args.device, seed=0, dtype=dtype)["unet"]

    pipes = {"base": StableDiffusionXLPipeline(**c)}
    with tempfile.TemporaryDirectory() as tmp:
        lora_unet = unet()
        add_lora(lora_unet, rank=args.rank)  # B = 0 at initialisation: fused, the weights equal the base's
        save_lora(tmp, unet=lora_unet)
        del lora_unet
        for name in ("unfused", "fused", "fused_fp8"):
            pipes[name] = StableDiffusionXLPipeline(**{**c, "unet": unet()})
            load_lora(pipes[name], LoraSpec(tmp))
        fuse_loras(pipes["fused"])  # what `generate --fuse` does
        fuse_loras(pipes["fused_fp8"])
        if args.channels_last:
            for pipe in pipes.values():
                pipe.unet.to(memory_format=torch.channels_last)
        unet_gb = sum(p.numel() * p.element_size() for p in pipes["fused"].unet.parameters()) / 1e9
        store_weights_in_fp8(pipes["fused_fp8"].unet.requires_grad_(False), dtype)  # `generate --fuse --fp8_base`
        unet_fp8_gb = sum(p.numel() * p.element_size() for p in pipes["fused_fp8"].unet.parameters()) / 1e9
    kw = dict(num_inference_steps=args.gen_steps, height=args.resolution, width=args.resolution, progress=False)

    def timed(pipe, seeds, graphs: bool) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        generate(pipe, "a photo of messi playing billiard", seeds, cuda_graphs=graphs, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(seeds)

    # (pipeline, CUDA graphs) per variant; with graphs, each call records the UNet once (its cost is in the time)
    variants = {name: (pipe, False) for name, pipe in pipes.items()}
    if args.device.startswith("cuda"):
        variants.update(base_graphs=(pipes["base"], True), fused_graphs=(pipes["fused"], True))
    for pipe, graphs in variants.values():
        timed(pipe, [0], graphs)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.gen_rounds):
        for name, (pipe, graphs) in variants.items():
            rounds[name].append(timed(pipe, [1 + r * args.gen_images + i for i in range(args.gen_images)], graphs))
    med = {name: statistics.median(v) for name, v in rounds.items()}
    kernels = {}
    if args.device.startswith("cuda"):
        # the GPU's own time per image, kernel by kernel: free of the host's pace, which sets the wall time of
        # eager sampling (and part of it with graphs: text encoders, VAE, scheduler); fused = base's kernels?
        try:
            for name, (pipe, graphs) in variants.items():
                profiler = GpuTime()
                profiler.start()
                generate(pipe, "a photo of messi playing billiard", [10**6], cuda_graphs=graphs, **kw)
                profiler.stop()
                report = profiler.report(1)
                kernels[name] = (report["gpu_kernel_ms_per_micro_step"], report["gpu_kernel_launches_per_micro_step"])
        except Exception as exc:  # noqa: BLE001 -- a profiler that fails must not cost the timings
            print(f"[bench] generation profile failed: {exc!r}", file=sys.stderr, flush=True)
            kernels = {}
    if kernels:
        kernels = {"gpu_kernel_ms_per_image": {k: round(ms, 1) for k, (ms, _) in kernels.items()},
                   "gpu_kernels_per_image": {k: n for k, (_, n) in kernels.items()},
                   "fused_overhead_pct_gpu_kernels": 100 * (kernels["fused"][0] / kernels["base"][0] - 1)}
    with_graphs = {}
    if "base_graphs" in med:
        with_graphs = {"s_per_image_base_cuda_graphs": med["base_graphs"],
                       "s_per_image_lora_fused_cuda_graphs": med["fused_graphs"],
                       "fused_overhead_pct_cuda_graphs": 100 * (med["fused_graphs"] / med["base_graphs"] - 1),
                       "cuda_graphs_speedup_base": med["base"] / med["base_graphs"]}
    return {"what": "generation", "shape": args.shape, "resolution": args.resolution, "steps": args.gen_steps,
            "device": device_name(args.device), "rounds": args.gen_rounds, "channels_last": args.channels_last,
            "images_per_round": args.gen_images,
            "s_per_image_base": med["base"], "s_per_image_lora_unfused": med["unfused"],
            "s_per_image_lora_fused": med["fused"], "s_per_image_lora_fused_fp8": med["fused_fp8"],
            "fused_overhead_pct": 100 * (med["fused"] / med["base"] - 1),
            "unfused_overhead_pct": 100 * (med["unfused"] / med["base"] - 1),
            "fp8_overhead_pct": 100 * (med["fused_fp8"] / med["fused"] - 1),
            **with_graphs, **kernels, "s_per_image_each_round": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
            "unet_weights_gb": unet_gb, "unet_weights_gb_fp8": unet_fp8_gb}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--model", default=None, help="a diffusers SDXL folder to load instead of building --shape")
    p.add_argument("--vae", default=None, help="a separate VAE folder (as --pretrained_vae_model_name_or_path)")
    p.add_argument("--torch_compile", default="none", choices=["none", "regional", "full"])
    p.add_argument("--torch_compile_mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--gradient_checkpointing_interval", type=int, default=1,
                   help="with --gradient_checkpointing: recompute only every Nth block (the trainer's flag)")
    p.add_argument("--selective_checkpointing", default="off", choices=["off", "costly", "products"],
                   help="with --gradient_checkpointing: the trainer's flag (outputs kept in each recomputed block)")
    p.add_argument("--auto_gradient_checkpointing", action="store_true", help="let trial steps decide it")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--bnb_per_tensor", action="store_true",
                   help="with --use_8bit_adam: bitsandbytes' AdamW8bit tensor by tensor (as diffusers' script runs "
                        "it) instead of ours over flat buffers, to measure what the flat form saves")
    p.add_argument("--fp8_base", action="store_true", help="the UNet's frozen weights stored in float8")
    p.add_argument("--half_precision_norms", choices=["true", "false"], default="true",
                   help="the trainer's flag (default true, as train()): false runs the norms as CUDA autocast does")
    p.add_argument("--fold_accumulation", action="store_true",
                   help="the trainer's --fold_accumulation: an optimizer step's micro-batches as one batch")
    p.add_argument("--fused_lora_ops", action="store_true",
                   help="the trainer's --fused_lora_ops: each adapted layer as one autograd operation")
    p.add_argument("--aspect_ratio_buckets", default=None, metavar="BUCKETS",
                   help="the trainer's flag ('auto' or 'h,w;...'), on the embedded images cropped to three shapes (a "
                        "third each square, 3:2 and 2:3): time and memory with a CUDA graph recorded per shape (MFU still counts "
                        "the square resolution's FLOPs: 'auto' buckets hold 96-100 %% of its area)")
    p.add_argument("--channels_last", action="store_true",
                   help="the UNet in channels-last memory format (NHWC), for training and generation: a measurement "
                        "first; the trainer does not do this")
    # (bench_unet.py's other variants are flags here: --fused_lora_ops, the trainer's own, applied by train() to
    # the adapters it adds; --channels_last)
    p.add_argument("--unet_variant", choices=["as_trained", "addmm_lora", "fp16_norms", "fp32_norms"],
                   default="as_trained",
                   help="train with one of bench_unet.py's variants of running the UNet (a measurement first; the "
                        "trainer does neither); for fused_lora_ops and channels_last use those flags")
    p.add_argument("--cuda_graphs", choices=["auto", "on", "off"], default="auto",
                   help="the micro-step recorded as a CUDA graph and replayed: as the trainer decides by default (on "
                        "one CUDA GPU), asked for, or off (eager)")
    p.add_argument("--no_cache_latents", action="store_true")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other trainer setting, as a config file gives it (repeatable), e.g. --set use_ema=true "
                        "--set train_text_encoder_ti=true --set 'instance_prompt=a photo of TOK playing billiard'")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps timed")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (H100 bf16 dense: ~790)")
    p.add_argument("--generation", action="store_true", help="also time sampling: base, LoRA unfused, fused")
    p.add_argument("--no_training", action="store_true", help="time generation only")
    p.add_argument("--gen_steps", type=int, default=10)
    p.add_argument("--gen_images", type=int, default=1, help="images per variant per round")
    p.add_argument("--gen_rounds", type=int, default=3, help="interleaved rounds (base, unfused, fused, fp8)")
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    results = [] if args.no_training else [bench_training(args)]
    if args.generation or args.no_training:
        results.append(bench_generation(args))
    emit(results, args.json)


if __name__ == "__main__":
    main()
