"""What gradient checkpointing leaves in memory: the bytes autograd keeps for backward after a training forward.

    python benchmarks/bench_memory.py --shape full --resolution 1024 --intervals 0 4 3 2 1

For each checkpointing setting (0: none; N: every Nth of the UNet's checkpointed blocks recomputed, as
``--gradient_checkpointing_interval``; 1: every block) it runs the trainer's UNet forward with its rank-4 LoRA in
half precision and counts the tensors saved for backward, each storage once, weights left out: the activation
memory a training micro-step holds at the turn from forward to backward, where its peak is. Counted on the meta
device: SDXL's full size at 1024 px in seconds, with no memory and no GPU. A GPU's peak adds the weights (SDXL's
UNet: 5.1 GB in fp16), what backward allocates on top (a recomputed block's activations, gradients in flight), the
optimizer and the allocator's slack; ``bench_train.py`` on a GPU measures that peak itself.

Attention is counted as the GPU runs it (flash / memory-efficient kernels keep the output and one row statistic,
not the attention matrix): the meta device would otherwise take PyTorch's reference path, which keeps the matrix.
Numbers to read and record in RESULTS.md; nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.lora import add_lora  # noqa: E402
from billiard_lora.tiny import SHAPES, build_components  # noqa: E402
from billiard_lora.train import checkpoint_unet  # noqa: E402
from common import emit  # noqa: E402


@contextlib.contextmanager
def flash_attention_accounting():
    """``F.scaled_dot_product_attention`` through an attention op that saves what the GPU's fused kernels save
    (queries, keys, values, output, log-sum-exp): PyTorch's CPU flash attention, whose meta kernels give shapes."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p:
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def saved_bytes(unet, inputs: dict) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward, weights excluded."""
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s._cdata not in weights:
            storages[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flash_attention_accounting():
        out = unet(**inputs).sample
    del out
    return sum(storages.values())


def measure(shape: str, resolution: int, batch: int, dtype: torch.dtype, rank: int, intervals, device="meta") -> dict:
    """Bytes saved for backward per checkpointing interval (0: none), and the UNet's weight bytes; on ``device``."""
    unet = build_components(SHAPES[shape], device=device)["unet"].to(dtype).requires_grad_(False)
    torch.manual_seed(0)
    add_lora(unet, rank=rank)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)  # (the trainer's fp32 adapters run in autocast's half precision: same sizes)
    unet.train()
    lat, cfg = resolution // 8, unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    gen = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device, dtype) if device != "meta" else \
            torch.empty(*size, device=device, dtype=dtype)

    inputs = dict(sample=randn(batch, 4, lat, lat), timestep=torch.full((batch,), 500, device=device),
                  encoder_hidden_states=randn(batch, 77, cfg.cross_attention_dim),
                  added_cond_kwargs={"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)})
    saved = {}
    for interval in intervals:
        checkpoint_unet(unet, interval=interval, preserve_rng_state=False)
        saved[interval] = saved_bytes(unet, inputs)
    return {"saved": saved, "weights": sum(p.numel() * p.element_size() for p in unet.parameters())}


def run(args) -> list[dict]:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[args.mixed_precision]
    m = measure(args.shape, args.resolution, args.batch, dtype, args.rank, args.intervals)
    results = []
    for interval, saved in m["saved"].items():
        results.append({"what": "activation_memory", "shape": args.shape, "resolution": args.resolution,
                        "batch": args.batch, "dtype": args.mixed_precision, "rank": args.rank,
                        "gradient_checkpointing_interval": interval or None, "saved_for_backward_gb": saved / 2**30,
                        "unet_weights_gb": m["weights"] / 2**30})
        print(f"[bench_memory] interval {interval}: {saved / 2**30:.3f} GiB saved for backward", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="full")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--intervals", type=int, nargs="+", default=[0, 4, 3, 2, 1],
                   help="0: no checkpointing; N: every Nth block recomputed (1: every block)")
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
