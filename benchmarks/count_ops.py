"""How much CPU work one training micro-step of SDXL's UNet + LoRA is: PyTorch operations, and host time.

    python benchmarks/count_ops.py --shape full --resolution 1024    # operations, on the meta device (seconds)
    python benchmarks/count_ops.py --skeleton                         # operations and host ms per variant

Eager mode issues every operation from Python; on a fast GPU a micro-step is bound by that, not by arithmetic
(RESULTS.md: 22 µs per operation on an H100 machine). Two ways to look at it without a GPU:

- default: the full-size UNet (with the LoRA adapters training adds) forward and backward on the meta device, no
  autocast, every aten operation counted (views included: each costs CPU time even when it launches no kernel),
  with and without gradient checkpointing.
- ``--skeleton``: SDXL base's exact block layout (the same modules, the same operations, in the same order) with
  narrow channels, on the CPU at an 8x8 latent under bf16 autocast as training runs it, so the arithmetic is
  negligible and the measured time per micro-step is the host's work: Python module code, dispatch, autograd,
  checkpoint hooks. Variants: diffusers' script's way (non-reentrant checkpointing, peft's float32 upcast of
  adapter inputs) against ours (``train.checkpoint_unet``, ``lora.set_input_casting``), and, if asked, ours
  compiled as ``--torch_compile regional|full`` compiles it (inductor's C++ code on a CPU, Triton on a GPU: the
  host's side differs, so read those rows as a rough guide), interleaved, the median of ``--repeats`` steps each.
  Single-threaded, so other load on the machine disturbs it less.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billiard_lora.lora import add_lora, run_adapters_fused, set_input_casting  # noqa: E402
from billiard_lora.tiny import FULL, SHAPES, build_components  # noqa: E402
from billiard_lora.train import checkpoint_unet, compile_unet  # noqa: E402

VIEWS = ("view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "split", "unsqueeze", "squeeze",
         "select", "reshape", "as_strided", "detach", "alias")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def _inputs(unet, resolution: int, dtype, device):
    lat = resolution // 8
    te2 = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    with torch.device(device):
        g = torch.Generator(device).manual_seed(0) if device != "meta" else None
        x = torch.randn(1, 4, lat, lat, generator=g).to(dtype)
        emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
        cond = {"text_embeds": torch.randn(1, te2, generator=g).to(dtype),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).to(dtype)}
        t = torch.tensor([500])
    return x, t, emb, cond


def _with_lora(unet, rank: int):
    unet.requires_grad_(False)
    add_lora(unet, rank=rank)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights, as train() keeps them
    return unet


def count(shape: str, resolution: int, rank: int, checkpointing: bool) -> dict:
    c = build_components(SHAPES[shape], device="meta", dtype=torch.float16)
    unet = _with_lora(c["unet"], rank)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    x, t, emb, cond = _inputs(unet, resolution, torch.float16, "meta")
    with CountOps() as fwd:
        loss = unet(x, t, emb, added_cond_kwargs=cond).sample.float().square().mean()
    with CountOps() as bwd:
        loss.backward()
    every = fwd.counts + bwd.counts
    views = sum(n for k, n in every.items() if k.split(".")[0] in VIEWS)
    return {"shape": shape, "resolution": resolution, "gradient_checkpointing": checkpointing,
            "forward_ops": sum(fwd.counts.values()), "backward_ops": sum(bwd.counts.values()),
            "total_ops": sum(every.values()), "view_ops": views, "non_view_ops": sum(every.values()) - views,
            "most_common": every.most_common(10)}


# SDXL base's layout -- blocks, layers, transformer depths, adapters -- with channels narrow enough that the CPU's
# arithmetic is a small part of the step.
SKELETON = dataclasses.replace(
    FULL, unet_channels=(32, 64, 128), unet_head_dim=(1, 2, 4), addition_time_embed_dim=8,
    vae_channels=(8, 16, 16, 16), vae_norm_groups=8,
    te1=dict(FULL.te1, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
             projection_dim=32),
    te2=dict(FULL.te2, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
             projection_dim=32))

# name -> (LoRA, gradient checkpointing, reentrant checkpointing, peft's upcast of adapter inputs, --torch_compile)
VARIANTS = {
    "diffusers_way": (True, True, False, True, "none"),
    "ours": (True, True, True, False, "none"),
    "diffusers_way_no_checkpointing": (True, False, False, True, "none"),
    "ours_no_checkpointing": (True, False, False, False, "none"),
    "unet_alone_checkpointed": (False, True, False, True, "none"),
    # as train() runs --torch_compile: non-reentrant checkpointing, inductor; minutes to compile on a small CPU
    "ours_compiled_regional": (True, True, False, False, "regional"),
    "ours_compiled_full": (True, True, False, False, "full"),
    "ours_fp8_base": (True, True, True, False, "none"),  # + --fp8_base: frozen weights in float8, cast per layer
    # + --fused_lora_ops (lora.run_adapters_fused, the adapters' bf16 copies kept: counted between optimizer steps)
    "ours_fused_lora_ops": (True, True, True, False, "none"),
    # + --selective_checkpointing products (its policy, a Python dispatch mode, sees every operation of a block)
    "ours_selective_products": (True, True, False, False, "none"),
}
DEFAULT_VARIANTS = [v for v, spec in VARIANTS.items()
                    if spec[4] == "none" and v not in ("ours_fp8_base", "ours_selective_products")]


def skeleton(rank: int, repeats: int, variants: list[str]) -> list[dict]:
    torch.set_num_threads(1)
    dtype = torch.bfloat16

    def build(with_lora: bool):
        unet = build_components(SKELETON, device="cpu", dtype=dtype, vocab_size=1000)["unet"].requires_grad_(False)
        return _with_lora(unet, rank) if with_lora else unet

    bare, lora = build(False), build(True)
    fp8 = None
    if "ours_fp8_base" in variants:  # a model of its own: storing in float8 is for good
        from billiard_lora.models import store_weights_in_fp8

        fp8 = build(True)
        store_weights_in_fp8(fp8, dtype)
    fused = None
    if "ours_fused_lora_ops" in variants:
        fused = build(True)
        run_adapters_fused([fused], half_copies=True)  # as train() runs it under autocast
    bare.conv_in.weight.requires_grad_(True)  # something to train, so backward runs through the blocks
    compiled = {}
    for name in variants:  # a model of their own: compiling works in place
        if VARIANTS[name][4] != "none":
            compiled[name] = build(True)
            checkpoint_unet(compiled[name], reentrant=False)
            set_input_casting([compiled[name]], enabled=False)
            compile_unet(compiled[name], VARIANTS[name][4])
    x, t, emb, cond = _inputs(bare, 64, dtype, "cpu")

    def setup(name):
        with_lora, ckpt, reentrant, upcast, scope = VARIANTS[name]
        if scope != "none":
            return compiled[name].train()
        unet = {"ours_fp8_base": fp8, "ours_fused_lora_ops": fused}.get(name) or (lora if with_lora else bare)
        unet.disable_gradient_checkpointing()
        if ckpt:
            selective = "products" if name == "ours_selective_products" else "off"
            checkpoint_unet(unet, reentrant=reentrant, selective=selective)
        if with_lora:
            set_input_casting([unet], enabled=upcast)
        return unet.train()

    models = (bare, lora, *compiled.values(), *[m for m in (fp8, fused) if m is not None])
    trainable = {id(u): [p for p in u.parameters() if p.requires_grad] for u in models}

    def step(unet):
        with torch.autocast("cpu", dtype=dtype):
            pred = unet(x, t, emb, added_cond_kwargs=cond).sample
        pred.float().square().mean().backward()
        for p in trainable[id(unet)]:  # as the optimizer does in train(): no walk over all ~2,800 parameters
            p.grad = None

    times: dict[str, list[float]] = {v: [] for v in variants}
    ops: dict[str, int | None] = {}
    non_view_ops: dict[str, int | None] = {}
    compile_s = {}
    for name in variants:
        unet = setup(name)
        if VARIANTS[name][4] == "none":
            if name == "ours_fused_lora_ops":
                step(unet)  # its adapters' half-precision copies are made at the first step, then kept
            with CountOps() as co:
                step(unet)
            ops[name] = sum(co.counts.values())
            non_view_ops[name] = ops[name] - sum(n for k, n in co.counts.items() if k.split(".")[0] in VIEWS)
        else:  # operations inside compiled graphs are not dispatched one by one: not counted
            t0 = time.perf_counter()
            step(unet)
            compile_s[name], ops[name], non_view_ops[name] = round(time.perf_counter() - t0, 1), None, None
        step(unet)  # warm
    for _ in range(repeats):
        for name in variants:  # interleaved: a slow moment of the machine hits every variant alike
            unet = setup(name)
            t0 = time.perf_counter()
            step(unet)
            times[name].append(time.perf_counter() - t0)
    return [{"skeleton": "SDXL base layout, channels (32, 64, 128), 8x8 latent, bf16 autocast, CPU 1 thread",
             "variant": name, "lora": VARIANTS[name][0], "gradient_checkpointing": VARIANTS[name][1],
             "reentrant": VARIANTS[name][2], "peft_input_upcast": VARIANTS[name][3],
             "torch_compile": VARIANTS[name][4], "first_step_s": compile_s.get(name), "ops": ops[name],
             "non_view_ops": non_view_ops[name],
             "host_ms_per_micro_step": round(statistics.median(times[name]) * 1000, 1),
             "host_ms_min": round(min(times[name]) * 1000, 1), "repeats": repeats} for name in variants]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="full")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--skeleton", action="store_true", help="host time and operations per variant (see above)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                   help="default: the eager ones; add ours_compiled_regional / ours_compiled_full to time compiled code")
    args = p.parse_args()
    if args.skeleton:
        for row in skeleton(args.rank, args.repeats, args.variants):
            print(json.dumps(row), flush=True)
        return
    for ckpt in (True, False):
        print(json.dumps(count(args.shape, args.resolution, args.rank, ckpt)), flush=True)


if __name__ == "__main__":
    main()
