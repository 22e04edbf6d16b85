"""What gradient checkpointing leaves in memory: the bytes autograd keeps for backward after a training forward.

    python benchmarks/bench_memory.py --shape full --resolution 1024 --intervals 0 4 3 2 1 \
        --selective off costly products

For each checkpointing setting (0: none; N: every Nth of the UNet's checkpointed blocks recomputed, as
``--gradient_checkpointing_interval``; 1: every block; each with every ``--selective_checkpointing`` level asked
for, whose kept outputs are added) it runs the trainer's UNet forward with its rank-4 LoRA in
half precision and counts the tensors saved for backward, each storage once, weights left out: the activation
memory a training micro-step holds at the turn from forward to backward, where its peak is. Counted on the meta
device: SDXL's full size at 1024 px in seconds, with no memory and no GPU. A GPU's peak adds the weights (SDXL's
UNet: 5.1 GB in fp16), what backward allocates on top (a recomputed block's activations, gradients in flight), the
optimizer and the allocator's slack; ``bench_train.py`` on a GPU measures that peak itself.

Attention is counted as the GPU runs it (flash / memory-efficient kernels keep the output and one row statistic,
not the attention matrix): the meta device would otherwise take PyTorch's reference path, which keeps the matrix.
For each setting it also counts what backward recomputes: the FLOPs, and the bytes the recomputed operations read
and write (views left out), which bound the norms and activations on a GPU. Numbers to read and record in
RESULTS.md; nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.lora import add_lora  # noqa: E402
from billiard_lora.tiny import SHAPES, build_components  # noqa: E402
from billiard_lora.train import _checkpoint_block, checkpoint_unet, keep_costly_outputs  # noqa: E402
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
    """Bytes of the distinct storages autograd saves for backward during one forward, weights excluded (what
    selective checkpointing keeps besides is counted by its policy: ``keep_costly_outputs``' record)."""
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


def measure(shape: str, resolution: int, batch: int, dtype: torch.dtype, rank: int, intervals, device="meta",
            selective=("off",)) -> dict:
    """Bytes kept for backward per (checkpointing interval (0: none), selective level), with the FLOPs selective
    checkpointing still recomputes, and the UNet's weight bytes; on ``device``."""
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
    saved, recomputed = {}, {}
    for interval in intervals:
        for level in (selective if interval else ("off",)):
            record: dict = {}
            checkpoint_unet(unet, interval=interval, preserve_rng_state=False, selective=level, record=record)
            if interval and level == "off":  # whole blocks, as the trainer's reentrant checkpoint recomputes them,
                # counted by a policy that keeps nothing (the same memory)
                unet.enable_gradient_checkpointing(gradient_checkpointing_func=partial(
                    _checkpoint_block, reentrant=False, preserve_rng_state=False,
                    context_fn=keep_costly_outputs(float("inf"), record)))
            autograd_kept = saved_bytes(unet, inputs)
            saved[interval, level] = autograd_kept + sum(v for k, v in record.items() if k.startswith("kept:"))
            recomputed[interval, level] = (record.get("recomputed_flops", 0), record.get("recomputed_bytes", 0))
    return {"saved": saved, "recomputed": recomputed,
            "weights": sum(p.numel() * p.element_size() for p in unet.parameters())}


def run(args) -> list[dict]:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[args.mixed_precision]
    m = measure(args.shape, args.resolution, args.batch, dtype, args.rank, args.intervals, selective=args.selective)
    results = []
    for (interval, level), saved in m["saved"].items():
        flops, moved = m["recomputed"][interval, level]
        results.append({"what": "activation_memory", "shape": args.shape, "resolution": args.resolution,
                        "batch": args.batch, "dtype": args.mixed_precision, "rank": args.rank,
                        "gradient_checkpointing_interval": interval or None, "selective_checkpointing": level,
                        "saved_for_backward_gb": saved / 2**30, "unet_weights_gb": m["weights"] / 2**30,
                        "recomputed_tflop": flops / 1e12, "recomputed_gb_moved": moved / 1e9})
        print(f"[bench_memory] interval {interval}, selective {level}: {saved / 2**30:.3f} GiB saved for backward, "
              f"{flops / 1e12:.3f} TFLOP recomputed, {moved / 1e9:.2f} GB read and written by the recomputed "
              f"operations", file=sys.stderr)
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
    p.add_argument("--selective", nargs="+", default=["off"], choices=["off", "costly", "products"],
                   help="--selective_checkpointing levels, each counted with every interval above 0")
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
