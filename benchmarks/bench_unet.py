"""The SDXL UNet alone: what its kernels reach on this device, with no trainer and (on a GPU) no host time.

    python benchmarks/bench_unet.py --shape full --resolution 1024 --device cuda --mixed_precision fp16 \
        --gradient_checkpointing --batches 1 2 --peak_tflops 790
    python benchmarks/bench_unet.py --shape tiny --resolution 64           # CPU: a check of the script itself

Issue 5 asks for >= 45 % model-FLOP utilisation of an H100 by the trainer. This measures the ceiling under that
number: for each batch size, three computations on SDXL's architecture at random weights, each recorded once as a
CUDA graph and replayed (so the time is the GPU's own; ``--cuda_graphs off`` or a CPU: eager, host time included):

  forward   the UNet's forward without gradients (what each sampling step runs)
  frozen    forward, the trainer's loss (MSE) and backward into the input latents, with every weight frozen and no
            LoRA: the kernels any trainer of a frozen SDXL runs (with --gradient_checkpointing, the recompute too)
  lora      as frozen, with the trainer's rank-r LoRA learning instead (fp32 adapters under autocast, peft's
            input upcast off, as ``train()`` runs it)

Each gets ms per call, the FLOPs torch counts in it (``torch.utils.flop_counter``, forward + recompute + backward),
the TFLOP/s that makes, and MFU as ``bench_train.py`` counts it (the forward's FLOPs x 1 for forward, x 2 for a
training micro-step, x 3 with checkpointing) against ``--peak_tflops``. ``frozen`` against the peak is the most
any LoRA trainer can reach with these kernels at this batch; ``lora`` against ``frozen`` is what the adapter's own
kernels cost; a trainer's step against ``lora`` (``bench_train.py``) is what everything around the UNet costs.

``--variants`` also times ways of running the same UNet that the trainer does not use (yet), each against
``as_trained`` on the same inputs, with how far its outputs and gradients are from ``as_trained``'s:
  addmm_lora   the LoRA's up-projection, scale and add as one ``torch.addmm`` into the base layer's output
               (peft: a matmul, a multiply and an add, each a pass over the layer's output)
  fp16_norms   LayerNorm and GroupNorm in the weights' half precision: CUDA autocast runs them in float32 (a cast
               up before, a float32 output that the next layer casts back down); half-precision kernels
               accumulate in float32 all the same. (CPU autocast leaves them alone: there it changes nothing.)
  fp32_norms   LayerNorm and GroupNorm in float32, as CUDA autocast runs them (on a GPU: as_trained); on a CPU
               with --mixed_precision fp16 it stands for the GPU's default and as_trained for fp16_norms.
  fused_lora_ops  each adapted Linear (base + LoRA) as one autograd operation: the trainer's --fused_lora_ops
               (off by default until this and gpu_check.sh part 23 have timed it)
  channels_last  the UNet's weights, and so its activations from the first convolution on, in channels-last (NHWC)
               memory format: cuDNN's convolutions then need no layout conversions of their own (session 11's
               profile: nchwToNhwcKernel, 5.8 ms of the frozen UNet's 87.5) -- unless the norms and attention's
               reshapes add copies back, which is what this measures. The trainer has no flag for it (yet).
Variants combine with "+": ``fp16_norms+fused_lora_ops`` is the trainer with ``--fused_lora_ops`` (and its default
``--half_precision_norms``), ``fp16_norms+channels_last`` the trainer's default in channels-last.
In half precision each result is also compared with the same computation in float32 (``rel_err_vs_fp32``):
as_trained's own error is the yardstick for a variant's.
Numbers to read and record in RESULTS.md; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.graphs import _capture, _on_side_stream  # noqa: E402
from billiard_lora.lora import add_lora, lora_parameters, run_adapters_fused, set_input_casting  # noqa: E402
from billiard_lora.models import run_norms_in_half  # noqa: E402
from billiard_lora.tiny import SHAPES, build_components  # noqa: E402
from billiard_lora.train import checkpoint_unet, compile_unet  # noqa: E402
from common import device_name, emit, peak_memory, reset_peak_memory  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

KINDS = ("forward", "frozen", "lora")
MODEL_FLOP_MULTIPLE = {"forward": 1, "frozen": 2, "lora": 2}  # +1 each for training with checkpointing


def build_unet(args, dtype: torch.dtype, lora: bool):
    """SDXL's UNet of ``--shape`` at random weights (seed 0: the same weights each call), set up as train() does."""
    unet = build_components(SHAPES[args.shape], device=args.device, seed=0, dtype=dtype)["unet"].requires_grad_(False)
    if lora:
        torch.manual_seed(0)
        add_lora(unet, rank=args.rank)
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # as after some training (B starts at 0): the adapter changes the outputs
                torch.nn.init.normal_(p, std=0.01)
        for p in lora_parameters(unet):
            p.data = p.data.float()  # fp32 master weights, as train() keeps them
        set_input_casting([unet], enabled=dtype == torch.float32)
    if args.gradient_checkpointing:
        # graphs cannot record RNG state; the reentrant form eagerly, the non-reentrant one compiled (as train())
        checkpoint_unet(unet, reentrant=args.torch_compile == "none", preserve_rng_state=False)
    return unet


def make_inputs(unet, args, batch: int, dtype: torch.dtype) -> dict:
    """Random inputs of SDXL's shapes for ``batch`` images at ``--resolution``: latents, timesteps, both prompt
    embeddings (77 tokens), the size/crop conditioning, and the target the loss compares with."""
    lat = args.resolution // 8
    gen = torch.Generator().manual_seed(batch)
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    r = args.resolution

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(args.device, dtype)

    return {"latents": randn(batch, 4, lat, lat), "target": randn(batch, 4, lat, lat),
            "timesteps": torch.randint(0, 1000, (batch,), generator=gen).to(args.device),
            "text": randn(batch, 77, cfg.cross_attention_dim), "pooled": randn(batch, pooled_dim),
            "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=dtype, device=args.device)}


def make_call(unet, kind: str, x: dict, autocast):
    """The computation ``kind`` as a function of no arguments (its inputs fixed, as a CUDA graph needs them)."""
    latents = x["latents"].clone().requires_grad_(kind == "frozen")  # frozen: the gradient goes to the input

    def predict():
        with autocast():
            return unet(latents, x["timesteps"], x["text"], return_dict=False,
                        added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]})[0]

    def forward():
        with torch.no_grad():
            return predict()

    def train_step():
        loss = F.mse_loss(predict().float(), x["target"].float())
        loss.backward()  # into latents.grad (frozen) or the adapters' .grad (lora), accumulated
        return loss.detach()

    call = forward if kind == "forward" else train_step
    call.latents = latents
    return call


def counted_flops(call) -> float:
    """The FLOPs torch dispatches in one eager ``call()``: forward, recompute and backward alike."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


PEFT_LINEAR_FORWARD = PeftLinear.forward  # peft's own, kept: bench_train.py may put addmm_lora_forward in its place


def addmm_lora_forward(self, x, *args, **kwargs):
    """An adapted Linear as ``addmm(base(x), lora_A(x), B^T, alpha=scale)``: one GEMM whose epilogue adds into the
    base output, instead of peft's ``base(x) + lora_B(lora_A(x)) * scale``; peft's forward for anything else."""
    names = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.lora_A:
        return PEFT_LINEAR_FORWARD(self, x, *args, **kwargs)
    name = names[0]
    result = self.base_layer(x)
    h = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                      self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def addmm_lora(unet):
    """Variant: every adapted Linear of ``unet`` runs ``addmm_lora_forward``. Returns the undo."""
    return _patch_forward([m for m in unet.modules() if isinstance(m, PeftLinear)], addmm_lora_forward)


def fp16_norms(unet):
    """Variant: LayerNorm and GroupNorm run in their weights' half precision, outside autocast (the trainer's
    ``--half_precision_norms``). Returns the undo."""
    return run_norms_in_half(unet)


def fp32_norms(unet):
    """Variant: LayerNorm and GroupNorm computed in float32 from an upcast input, with a float32 output -- what CUDA
    autocast does with them, and so as_trained on a GPU. On a CPU, whose autocast leaves norms in half precision,
    this stands for the GPU's default, and as_trained for ``--half_precision_norms``: with ``--mixed_precision
    fp16`` both can then be held against float32 (``rel_err_vs_fp32``) without a GPU. Returns the undo."""

    def forward(self, x):
        if x.dtype not in (torch.float16, torch.bfloat16) or not torch.is_autocast_enabled(x.device.type):
            return type(self).forward(self, x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(self, torch.nn.GroupNorm):
                return F.group_norm(x.float(), self.num_groups, w, b, self.eps)
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)

    return _patch_forward([m for m in unet.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))],
                          forward)


def _patch_forward(modules, forward):
    for m in modules:
        m.forward = types.MethodType(forward, m)
    return lambda: [m.__dict__.pop("forward") for m in modules]


def fused_lora_ops(unet):
    """Variant: every adapted Linear of ``unet`` as one autograd operation, the adapters' half-precision copies kept
    (the trainer's ``--fused_lora_ops``, ``lora.run_adapters_fused``). Returns the undo."""
    return run_adapters_fused([unet], half_copies=True)


def channels_last(unet):
    """Variant: the UNet's 4-D weights in channels-last memory format; a convolution with such a weight gives a
    channels-last output, so the activations follow from ``conv_in`` on. Returns the undo."""
    unet.to(memory_format=torch.channels_last)
    return lambda: unet.to(memory_format=torch.contiguous_format)


VARIANTS = {"as_trained": None, "addmm_lora": addmm_lora, "fp16_norms": fp16_norms, "fp32_norms": fp32_norms,
            "fused_lora_ops": fused_lora_ops, "channels_last": channels_last}
VARIANT_KINDS = {"addmm_lora": {"lora"}, "fused_lora_ops": {"lora"}}  # kinds a variant changes (the rest: all)


def variant_spec(text: str) -> str:
    """``--variants``' type: one of VARIANTS, or several joined by "+" (as_trained only alone), each once."""
    parts = text.split("+")
    unknown = [v for v in parts if v not in VARIANTS]
    if unknown or len(set(parts)) != len(parts) or (len(parts) > 1 and "as_trained" in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use one of {', '.join(VARIANTS)}, or several of them (not as_trained) joined by '+'")
    return text


def variant_kinds(spec: str) -> set[str]:
    """The kinds of computation the variant ``spec`` changes: the union of its parts' (as_trained: all)."""
    return set().union(*(VARIANT_KINDS.get(v, set(KINDS)) for v in spec.split("+")))


def apply_variant(unet, spec: str):
    """Put the variant ``spec`` in place on ``unet``, its parts in order. Returns the undo (None for as_trained)."""
    undo = [VARIANTS[v](unet) for v in spec.split("+") if VARIANTS[v]]
    return (lambda: [u() for u in reversed(undo)]) if undo else None


def eager_result(unet, kind: str, x: dict, autocast) -> list[torch.Tensor]:
    """What one eager call gives: the prediction (forward), or the loss and the gradients (training kinds)."""
    unet.zero_grad(set_to_none=True)
    call = make_call(unet, kind, x, autocast)
    out = call().detach().float()
    if kind == "forward":
        return [out]
    grads = [call.latents.grad] if kind == "frozen" else [p.grad for p in lora_parameters(unet)]
    return [out, torch.cat([g.float().reshape(-1) for g in grads])]


def fp32_result(unet, kind: str, x: dict) -> list[torch.Tensor]:
    """``eager_result`` computed in float32 throughout: the frozen weights and the inputs upcast, no autocast. The
    exact answer every half-precision run approximates, so a variant's error can be told from as_trained's own
    (half-precision gradients of a random-weight UNet differ a lot between two correct orders of summation). The
    weights go back to their dtypes afterwards, the same values (half -> float32 -> half is exact)."""
    tensors = [*unet.parameters(), *unet.buffers()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float() if t.is_floating_point() else t.data
    try:  # all float32: peft's input cast (off, as in training) has nothing to cast
        return eager_result(unet, kind, {k: v.float() if v.is_floating_point() else v for k, v in x.items()},
                            contextlib.nullcontext)
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)
        unet.zero_grad(set_to_none=True)


def relative_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest difference between two results, relative to the largest magnitude in ``a``."""
    return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def seconds_per_call(call, iters: int, graphs: bool, sync, profile: dict | None = None) -> float:
    """Mean seconds over ``iters`` calls after warm-up: replays of a CUDA graph of ``call``, or eager calls.

    ``profile`` (a dict, on a GPU): one more call runs under torch's profiler, and its kernel time, launches and top
    kernels go in there (where the time goes: the adapter's skinny GEMMs, casts, layout conversions)."""
    if graphs:
        for _ in range(3):
            _on_side_stream(call)
        replay, _ = _capture(call, [])
    else:
        call()
        replay = call
    replay()  # one untimed call: the first replay uploads the graph
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        replay()
    sync()
    seconds = (time.perf_counter() - start) / iters
    if profile is not None:
        try:  # extra: a profiler that fails must not cost the timing
            from bench_train import GpuTime

            profiler = GpuTime()
            profiler.start()
            replay()
            profiler.stop()
            report = profiler.report(1)
            profile.update({"gpu_kernel_ms": report["gpu_kernel_ms_per_micro_step"],
                            "gpu_kernel_launches": report["gpu_kernel_launches_per_micro_step"],
                            "top_kernels_ms": report["top_kernels_ms_per_micro_step"]})
        except Exception as exc:  # noqa: BLE001
            print(f"[bench_unet] profiler failed: {exc!r}", file=sys.stderr, flush=True)
    return seconds


def run(args) -> list[dict]:
    on_gpu = args.device.startswith("cuda")
    # as asked, on a CPU too (the trainer falls back to float32 there; half precision here emulates a GPU's numbers,
    # with --variants fp32_norms standing for CUDA autocast's float32 norms)
    precision = args.mixed_precision
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    graphs = on_gpu and args.cuda_graphs == "on"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(args.device.split(":")[0], dtype=dtype)

    results = []
    for with_lora in (False, True):
        kinds = [k for k in args.kinds if (k == "lora") == with_lora]
        if not kinds:
            continue
        unet = build_unet(args, dtype, lora=with_lora)
        counts = {}  # FLOPs per (kind, batch), counted eagerly before any compilation
        for batch in args.batches:
            x = make_inputs(unet, args, batch, dtype)
            counts["model", batch] = counted_flops(make_call(unet, "forward", x, autocast))  # MFU's unit
            for kind in kinds:
                counts[kind, batch] = counted_flops(make_call(unet, kind, x, autocast))
        exact = {}  # float32 results per (kind, batch), before compiling: how far each half-precision run is off
        if dtype != torch.float32 and not args.no_fp32_reference:
            for batch in args.batches:
                x = make_inputs(unet, args, batch, dtype)
                for kind in kinds:
                    exact[kind, batch] = fp32_result(unet, kind, x)
        compile_unet(unet, args.torch_compile)
        reference = {}  # as_trained's eager results per (kind, batch), what the variants are compared with
        for variant in args.variants:
            changed = [k for k in kinds if k in variant_kinds(variant)]
            undo = apply_variant(unet, variant) if changed else None
            for batch in args.batches:
                x = make_inputs(unet, args, batch, dtype)
                for kind in changed:
                    outputs = eager_result(unet, kind, x, autocast)
                    reference.setdefault((kind, batch), outputs)
                    unet.zero_grad(set_to_none=True)
                    reset_peak_memory(args.device)
                    profile: dict | None = {} if args.profile and on_gpu else None
                    s = seconds_per_call(make_call(unet, kind, x, autocast), args.iters, graphs, sync, profile)
                    multiple = MODEL_FLOP_MULTIPLE[kind] + (kind != "forward" and args.gradient_checkpointing)
                    model_flops = counts["model", batch] * multiple
                    row = {"what": "unet_ceiling", "kind": kind, "variant": variant, "batch": batch,
                           "shape": args.shape, "resolution": args.resolution, "device": device_name(args.device),
                           "mixed_precision": precision, "gradient_checkpointing": args.gradient_checkpointing,
                           "torch_compile": args.torch_compile, "cuda_graphs": graphs, "rank": args.rank,
                           "ms": 1000 * s, "ms_per_image": 1000 * s / batch,
                           "counted_tflop": counts[kind, batch] / 1e12,
                           "counted_tflops_per_s": counts[kind, batch] / s / 1e12, "model_tflop": model_flops / 1e12,
                           "rel_diff_vs_as_trained": relative_diff(reference[kind, batch], outputs),
                           "rel_err_vs_fp32": (relative_diff(exact[kind, batch], outputs)
                                               if (kind, batch) in exact else None),
                           **peak_memory(args.device), **(profile or {})}
                    if args.peak_tflops:
                        row["mfu"] = model_flops / s / (args.peak_tflops * 1e12)
                    results.append(row)
                    print(f"[bench_unet] batch {batch} {kind} {variant}: {1000 * s:.2f} ms", file=sys.stderr,
                          flush=True)
                    torch.cuda.empty_cache() if on_gpu else None
            if undo:
                undo()
        del unet
    ms = {(r["kind"], r["variant"], r["batch"]): r["ms"] for r in results}
    for r in results:  # what the adapter's kernels add to the frozen model's (run the same way where it was timed)
        frozen = ms.get(("frozen", r["variant"], r["batch"])) or ms.get(("frozen", "as_trained", r["batch"]))
        if r["kind"] == "lora" and frozen:
            r["lora_over_frozen_pct"] = 100 * (r["ms"] / frozen - 1)
        as_trained = ms.get((r["kind"], "as_trained", r["batch"]))
        if r["variant"] != "as_trained" and as_trained:
            r["speedup_vs_as_trained"] = as_trained / r["ms"]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="weights and inputs in this dtype, the forward under its autocast (as the trainer)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--torch_compile", default="none", choices=["none", "regional", "full"])
    p.add_argument("--cuda_graphs", choices=["on", "off"], default="on",
                   help="on a GPU: time CUDA-graph replays (the kernels alone) or eager calls (host time included)")
    p.add_argument("--variants", nargs="+", type=variant_spec, default=["as_trained"], metavar="VARIANT",
                   help=f"ways of running the same UNet, each timed and compared with as_trained: {', '.join(VARIANTS)}"
                        ", or several joined by '+' (see the top)")
    p.add_argument("--profile", action="store_true",
                   help="on a GPU: one more call under torch's profiler (kernel time, launches, top kernels)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--iters", type=int, default=10, help="timed calls per computation")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (H100 bf16 dense: ~790)")
    p.add_argument("--no_fp32_reference", action="store_true",
                   help="skip the float32 run each half-precision result is compared with (rel_err_vs_fp32)")
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
