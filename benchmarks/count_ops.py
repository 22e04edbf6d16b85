"""How many PyTorch operations one training micro-step dispatches: the CPU work eager mode does per step.

    python benchmarks/count_ops.py --shape full --resolution 1024        # SDXL base's UNet + rank-4 LoRA, fp16

Runs the UNet (with the LoRA adapters training adds) forward and backward on the meta device, so it needs no
memory and no GPU, counting every aten operation (views included: each costs CPU time even when it launches no
GPU kernel), with and without gradient checkpointing. When the GPU work per step is small next to this count
times the per-operation CPU cost, the step is bound by the CPU, and fewer, fused operations (torch.compile) or
CUDA graphs are what speed it up. See RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billiard_lora.lora import add_lora  # noqa: E402
from billiard_lora.tiny import SHAPES, build_components  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def count(shape: str, resolution: int, rank: int, checkpointing: bool) -> dict:
    c = build_components(SHAPES[shape], device="meta", dtype=torch.float16)
    unet = c["unet"].requires_grad_(False)
    add_lora(unet, rank=rank)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights, as train() keeps them
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    lat = resolution // 8
    te2 = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    with torch.device("meta"):
        x = torch.randn(1, 4, lat, lat, dtype=torch.float16)
        emb = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.float16)
        cond = {"text_embeds": torch.randn(1, te2, dtype=torch.float16),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float16)}
        t = torch.tensor([500])
    with CountOps() as fwd:
        loss = unet(x, t, emb, added_cond_kwargs=cond).sample.float().square().mean()
    with CountOps() as bwd:
        loss.backward()
    views = ("view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "split", "unsqueeze", "squeeze",
             "select", "reshape", "as_strided", "detach", "alias")
    every = fwd.counts + bwd.counts
    return {"shape": shape, "resolution": resolution, "gradient_checkpointing": checkpointing,
            "forward_ops": sum(fwd.counts.values()), "backward_ops": sum(bwd.counts.values()),
            "total_ops": sum(every.values()),
            "view_ops": sum(n for k, n in every.items() if k.split(".")[0] in views),
            "most_common": every.most_common(10)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="full")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args()
    for ckpt in (True, False):
        print(json.dumps(count(args.shape, args.resolution, args.rank, ckpt)), flush=True)


if __name__ == "__main__":
    main()
