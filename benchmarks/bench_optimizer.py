"""One optimizer step over SDXL's LoRA parameters: how long it takes and how often it makes the host wait.

    python benchmarks/bench_optimizer.py                       # CPU; the full-size UNet's rank-4 LoRA shapes
    python benchmarks/bench_optimizer.py --device cuda --rank 4 --text_encoders

The LoRA's tensor shapes come from SDXL base 1.0's architecture built on the meta device (no weights, seconds);
the parameters and gradients are random. For each optimizer (bitsandbytes' AdamW8bit tensor by tensor, as
diffusers' script uses it; ours over flat buffers; torch's fused AdamW; Prodigy per tensor and ours over flat
buffers; bitsandbytes' Lion8bit per tensor and ours over flat buffers) it prints one JSON line: ms per step
(median of ``--steps``), host synchronisations per step (on CUDA: calls of ``torch.cuda.synchronize``) and, on
CUDA, the GPU's kernel time and kernels per step from torch's profiler, and whether the flat form's parameters
equal the per-tensor form's after the timed steps. No assertions: numbers to read and record.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.lora import add_lora  # noqa: E402
from billiard_lora.optim import FlatAdamW8bit, FlatLion, FlatProdigy  # noqa: E402
from billiard_lora.tiny import FULL, SHAPES, build_components  # noqa: E402
from common import device_name, emit  # noqa: E402


def lora_groups(shape, rank: int, text_encoders: bool) -> list[list[torch.Size]]:
    """The LoRA's parameter shapes, per optimizer group (UNet; text encoders), as ``train()`` would create them."""
    c = build_components(shape, device="meta")
    add_lora(c["unet"], rank=rank)
    groups = [[p.shape for p in c["unet"].parameters() if p.requires_grad]]
    if text_encoders:
        for te in (c["text_encoder"], c["text_encoder_2"]):
            add_lora(te, rank=rank)
        groups.append([p.shape for te in (c["text_encoder"], c["text_encoder_2"])
                       for p in te.parameters() if p.requires_grad])
    return groups


def make_params(groups, device: str, seed: int = 0) -> list[list[torch.nn.Parameter]]:
    g = torch.Generator(device).manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=g, device=device) * 0.01) for s in shapes]
            for shapes in groups]


def set_grads(params, step: int, device: str) -> None:
    g = torch.Generator(device).manual_seed(1000 + step)
    for p in (p for group in params for p in group):
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3


def build(name: str, params):
    import bitsandbytes as bnb

    groups = [{"params": ps, "lr": 1e-4, "weight_decay": 1e-2 if i == 0 else 1e-3} for i, ps in enumerate(params)]
    if name == "bnb_per_tensor":
        return bnb.optim.AdamW8bit(groups, lr=1e-4)
    if name == "ours_flat_8bit":
        return FlatAdamW8bit(groups, lr=1e-4)
    if name == "lion8bit_per_tensor":
        return bnb.optim.Lion8bit(groups, lr=1e-4)
    if name == "ours_flat_lion8bit":
        return FlatLion(groups, lr=1e-4, bits=8)
    if name in ("prodigy_per_tensor", "ours_flat_prodigy"):  # one learning rate for all groups, as Prodigy wants
        for g in groups:
            g["lr"] = 1.0
        if name == "ours_flat_prodigy":
            return FlatProdigy(groups, lr=1.0, weight_decay=1e-2)
        import prodigyopt

        return prodigyopt.Prodigy(groups, lr=1.0, weight_decay=1e-2)
    return torch.optim.AdamW(groups, lr=1e-4, fused=True)


def missing(name: str) -> str | None:
    """Why ``name`` cannot run here (a package it needs is absent), or None."""
    if "prodigy" in name and importlib.util.find_spec("prodigyopt") is None:
        return "prodigyopt is not installed (pip install prodigyopt)"
    return None


def run(name: str, groups, args) -> tuple[dict, list]:
    params = make_params(groups, args.device)
    opt = build(name, params)
    syncs = 0
    real_sync = torch.cuda.synchronize

    def counting_sync(*a, **k):
        nonlocal syncs
        syncs += 1
        return real_sync(*a, **k)

    times = []
    for step in range(args.warmup + args.steps):
        set_grads(params, step, args.device)
        if args.device.startswith("cuda"):
            real_sync()
        torch.cuda.synchronize = counting_sync  # bitsandbytes' sync_gpu looks it up on torch.cuda at each call
        syncs = 0
        t = time.perf_counter()
        opt.step()
        if args.device.startswith("cuda"):
            real_sync()
        times.append(time.perf_counter() - t)
        torch.cuda.synchronize = real_sync
    n = sum(p.numel() for group in params for p in group)
    row = {"what": "optimizer_step", "optimizer": name, "device": device_name(args.device),
           "tensors": sum(len(g) for g in groups), "numbers": n, "groups": len(groups),
           "ms_per_step": statistics.median(times[args.warmup:]) * 1e3,
           "ms_per_step_min": min(times[args.warmup:]) * 1e3,
           "host_syncs_per_step": syncs if args.device.startswith("cuda") else None}
    if args.device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        set_grads(params, 10**6, args.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            opt.step()
            real_sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        row.update(gpu_kernels_per_step=len(kernels),
                   gpu_kernel_ms_per_step=sum(e.device_time for e in kernels) / 1e3)
    return row, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--text_encoders", action="store_true", help="also the two text encoders' LoRAs (a second group)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--optimizers", nargs="+", default=["bnb_per_tensor", "ours_flat_8bit", "torch_fused_adamw",
                                                       "prodigy_per_tensor", "ours_flat_prodigy",
                                                       "lion8bit_per_tensor", "ours_flat_lion8bit"])
    p.add_argument("--json", help="also append the results to this file")
    args = p.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    groups = lora_groups(SHAPES[args.shape] if args.shape != "full" else FULL, args.rank, args.text_encoders)
    results, finals = [], {}
    for name in args.optimizers:
        why = missing(name)
        if why:  # the others still run (the GPU machine has no prodigyopt unless it is carried there)
            print(f"[bench_optimizer] skipping {name}: {why}", file=sys.stderr, flush=True)
            continue
        row, finals[name] = run(name, groups, args)
        results.append(row)
    for per_tensor, flat in (("bnb_per_tensor", "ours_flat_8bit"), ("prodigy_per_tensor", "ours_flat_prodigy"),
                             ("lion8bit_per_tensor", "ours_flat_lion8bit")):
        if per_tensor in finals and flat in finals:
            a = [p for g in finals[per_tensor] for p in g]
            b = [p for g in finals[flat] for p in g]
            diff = max((x - y).abs().max().item() for x, y in zip(a, b))
            for r in results:
                if r["optimizer"] == flat:
                    r["max_abs_diff_vs_per_tensor"] = diff
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
