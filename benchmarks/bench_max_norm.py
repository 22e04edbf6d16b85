"""--scale_weight_norms' cost per optimizer step on SDXL's LoRA: our form against kohya's.

    python benchmarks/bench_max_norm.py                                  # CPU; SDXL's UNet, rank 4, attention
    python benchmarks/bench_max_norm.py --device cuda --lora_layers attn,ff,proj,conv --rank 16

SDXL base 1.0's UNet is built on the meta device (no weights, seconds); only the LoRA's own tensors are made real,
random, on ``--device``. Two forms of the same max-norm step are timed (median of ``--steps``), each on its own copy:

- ours (``billiard_lora.lora.MaxNorm``): each layer's ||scale·B·A|| from the rank x rank products BᵀB and AAᵀ,
  one read of the device per step;
- kohya's (sd-scripts' ``apply_max_norm_regularization``, written out here): the full out x in product up @ down
  per layer, and a read of the device per layer.

Each prints one JSON line: ms per step, layers, layers scaled in the first step (the limit: the median norm), and
the largest relative error of its norms against the full ΔW's computed in float64. No assertions: numbers to read
and record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.lora import MaxNorm, add_lora, unet_lora_layers  # noqa: E402
from billiard_lora.tiny import FULL, build_components  # noqa: E402
from common import device_name, emit  # noqa: E402


def sdxl_lora(rank: int, lora_layers: str, device: str, seed: int = 0) -> torch.nn.Module:
    """SDXL's UNet on the meta device with a LoRA whose tensors alone are real (random, B non-zero)."""
    unet = build_components(FULL, device="meta")["unet"]
    add_lora(unet, rank=rank, target_modules=unet_lora_layers(lora_layers))
    g = torch.Generator().manual_seed(seed)
    for module in unet.modules():
        for name in ("lora_A", "lora_B"):
            if hasattr(module, name) and "default" in getattr(module, name):
                part = getattr(module, name)["default"].to_empty(device=device)
                with torch.no_grad():
                    part.weight.copy_(torch.randn(part.weight.shape, generator=g) * 0.02)
    return unet


def kohya_delta(layer) -> torch.Tensor:
    """A LoRA layer's scale·up·down as sd-scripts builds it (a 3x3 convolution's through conv2d)."""
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if up.ndim == 4 and down.shape[2:] == (3, 3):
        updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = up.flatten(1) @ down.flatten(1)
    return updown * layer.scaling["default"]


def kohya_step(layers, limit: float) -> tuple[int, list[float]]:
    """sd-scripts' max-norm step (networks/lora.py), on peft's layers: the full ΔW per layer, a read per layer."""
    scaled, norms = 0, []
    for layer, _, _ in layers:
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        updown = kohya_delta(layer)
        norm = updown.norm().clamp(min=limit / 2)
        ratio = float(norm.clamp(max=limit).cpu() / norm.cpu())
        if ratio != 1:
            scaled += 1
            up.mul_(ratio ** 0.5)
            down.mul_(ratio ** 0.5)
        norms.append(float(updown.norm()) * ratio)
    return scaled, norms


def timed(fn, steps: int, device: str) -> float:
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_layers", default="attn")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None, help="also append the results to this file")
    args = p.parse_args(argv)

    results = []
    with torch.no_grad():
        ours = MaxNorm([sdxl_lora(args.rank, args.lora_layers, args.device)], limit=1.0)
        theirs = MaxNorm([sdxl_lora(args.rank, args.lora_layers, args.device)], limit=1.0)
        reference = ours.norms()
        # each form's norms against the full ΔW's in float64
        exact = torch.stack([(layer.lora_B["default"].weight.double().flatten(1)
                              @ layer.lora_A["default"].weight.double().flatten(1)).norm()
                             * abs(layer.scaling["default"]) for layer, _, _ in theirs.layers]).cpu()
        kohya = torch.stack([kohya_delta(layer).norm() for layer, _, _ in theirs.layers]).cpu().double()
        error = {"ours": float(((reference.cpu().double() - exact).abs() / exact).max()),
                 "kohya": float(((kohya - exact).abs() / exact).max())}
        limit = float(reference.median())  # half the layers above it in the first step
        ours.limit = limit
        first = {"ours": ours.step()[0], "kohya": kohya_step(theirs.layers, limit)[0]}
        for name, fn in (("ours", ours.step), ("kohya", lambda: kohya_step(theirs.layers, limit))):
            results.append({"bench": "max_norm", "form": name, "device": device_name(args.device),
                            "rank": args.rank, "lora_layers": args.lora_layers, "layers": len(ours.layers),
                            "scaled_first_step": first[name], "ms_per_step": round(timed(fn, args.steps,
                                                                                          args.device), 2),
                            "norm_error_vs_float64": error[name]})
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
