"""The benchmarks' own arithmetic (the numbers they print are only as good as it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import idle_gaps  # noqa: E402


def test_idle_gaps_merge_overlapping_kernels_and_name_the_longest_waits():
    # µs: a and b overlap (busy 0-10), c 12-20, then a 20 µs wait before the optimizer's kernel, d right after it
    kernels = [(12, 20, "c"), (0, 10, "a"), (5, 8, "b"), (40, 45, "optimizer"), (45, 50, "d")]
    idle_ms, gaps = idle_gaps(kernels, top=1)
    assert idle_ms == (2 + 20) / 1000
    assert gaps == [{"ms": 0.02, "after": "c", "before": "optimizer"}]
    assert idle_gaps([]) == (0.0, [])


def test_optimizer_benchmark_reports_each_form_and_whether_flat_equals_per_tensor(tmp_path, capsys):
    import json

    import pytest

    pytest.importorskip("bitsandbytes")
    import bench_optimizer

    bench_optimizer.main(["--shape", "tiny", "--text_encoders", "--warmup", "1", "--steps", "2",
                          "--json", str(tmp_path / "r.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["optimizer"] for r in rows] == ["bnb_per_tensor", "ours_flat_8bit", "torch_fused_adamw",
                                             "prodigy_per_tensor", "ours_flat_prodigy", "lion8bit_per_tensor",
                                             "ours_flat_lion8bit"]
    assert rows[0]["tensors"] == rows[1]["tensors"] > 0 and rows[0]["groups"] == 2
    assert rows[1]["max_abs_diff_vs_per_tensor"] == 0.0 and all(r["ms_per_step"] > 0 for r in rows)
    assert rows[6]["max_abs_diff_vs_per_tensor"] == 0.0


def test_optimizer_benchmark_skips_with_a_reason_what_it_cannot_import(tmp_path, capsys, monkeypatch):
    """A machine without prodigyopt (the lent GPU's) still gets the 8-bit optimizers' rows."""
    import importlib.util
    import json

    import pytest

    pytest.importorskip("bitsandbytes")
    import bench_optimizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    assert bench_optimizer.main(["--shape", "tiny", "--warmup", "1", "--steps", "1", "--json",
                                 str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["optimizer"] for r in rows] == ["bnb_per_tensor", "ours_flat_8bit", "torch_fused_adamw",
                                             "lion8bit_per_tensor", "ours_flat_lion8bit"]
    assert "skipping prodigy_per_tensor: prodigyopt is not installed" in capsys.readouterr().err


def test_unet_ceiling_counts_what_each_computation_runs(tmp_path):
    """bench_unet.py: the FLOPs it divides by are the ones each computation ran (recompute included), and the
    training computations put gradients where a frozen or a LoRA trainer would, nowhere else."""
    import json

    import bench_unet
    import pytest
    import torch

    def rows(*extra):
        path = tmp_path / f"r{len(extra)}.jsonl"
        bench_unet.main(["--shape", "tiny", "--resolution", "64", "--iters", "1", "--peak_tflops", "1",
                         "--json", str(path), *extra])
        return {(r["kind"], r["batch"]): r for r in map(json.loads, path.read_text().splitlines())}

    ckpt = rows("--gradient_checkpointing", "--batches", "1", "2")
    plain = rows("--kinds", "forward", "frozen")
    assert set(ckpt) == {(k, b) for k in ("forward", "frozen", "lora") for b in (1, 2)}
    fwd = ckpt["forward", 1]["model_tflop"]
    assert ckpt["forward", 1]["counted_tflop"] == fwd and plain["frozen", 1]["model_tflop"] == 2 * fwd
    assert ckpt["frozen", 1]["model_tflop"] == 3 * fwd
    # checkpointing recomputes the forward's blocks (not conv_in, conv_out, the embeddings): counted once more
    extra = ckpt["frozen", 1]["counted_tflop"] - plain["frozen", 1]["counted_tflop"]
    assert 0.8 * fwd < extra <= fwd
    assert abs(ckpt["frozen", 2]["counted_tflop"] / ckpt["frozen", 1]["counted_tflop"] - 2) < 0.05
    assert "lora_over_frozen_pct" in ckpt["lora", 1] and all(r["ms"] > 0 and r["mfu"] > 0 for r in ckpt.values())

    # the variants run what they claim and, in float32 on the CPU, compute as_trained's numbers: exactly, or (the
    # fused operation, which adds inside its GEMMs; convolutions in another layout) to float32 rounding
    path = tmp_path / "v.jsonl"
    variants = ["as_trained", "addmm_lora", "fp16_norms", "fused_lora_ops", "fp16_norms+fused_lora_ops",
                "channels_last", "fp16_norms+fused_lora_ops+channels_last"]
    bench_unet.main(["--shape", "tiny", "--resolution", "64", "--iters", "1", "--kinds", "lora", "--variants",
                     *variants, "--json", str(path)])
    by_variant = {r["variant"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert set(by_variant) == set(variants)
    assert all(r["rel_diff_vs_as_trained"] == 0.0 for v, r in by_variant.items() if "fused" not in v and "channels" not in v)
    assert all(r["rel_diff_vs_as_trained"] < 1e-5 for r in by_variant.values())
    assert "speedup_vs_as_trained" in by_variant["addmm_lora"]

    args = bench_unet.main.__globals__["argparse"].Namespace(shape="tiny", device="cpu", rank=4, resolution=64,
                                                            gradient_checkpointing=True, torch_compile="none")
    for kind in ("frozen", "lora"):
        unet = bench_unet.build_unet(args, torch.float32, lora=kind == "lora")
        x = bench_unet.make_inputs(unet, args, 1, torch.float32)
        bench_unet.make_call(unet, kind, x, lambda: torch.autocast("cpu", enabled=False))()
        with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
        assert with_grad == ({n for n, p in unet.named_parameters() if "lora_" in n} if kind == "lora" else set())
    # addmm_lora really goes through torch.addmm, once per adapted layer per forward; undone, peft's layer again
    calls, real = [], torch.addmm
    undo = bench_unet.addmm_lora(unet)
    try:
        torch.addmm = lambda *a, **k: calls.append(1) or real(*a, **k)
        bench_unet.make_call(unet, "forward", x, lambda: torch.autocast("cpu", enabled=False))()
        undo()
        patched = len(calls)
        bench_unet.make_call(unet, "forward", x, lambda: torch.autocast("cpu", enabled=False))()
    finally:
        torch.addmm = real
    adapted = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    assert patched == adapted > 0 and len(calls) == patched

    # channels_last: the convolutions' weights and so the activations NHWC, combined in order and undone in reverse
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    undo = bench_unet.apply_variant(unet, "fp16_norms+channels_last")
    seen = []
    hook = convs[1].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    try:
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        bench_unet.make_call(unet, "forward", x, lambda: torch.autocast("cpu", enabled=False))()
        assert seen == [True]
    finally:
        hook.remove()
        undo()
    assert all(c.weight.is_contiguous() for c in convs) and not any("forward" in vars(m) for m in unet.modules())
    assert bench_unet.variant_kinds("fp16_norms+fused_lora_ops") == set(bench_unet.KINDS)
    assert bench_unet.variant_kinds("fused_lora_ops") == {"lora"} and bench_unet.apply_variant(unet, "as_trained") is None
    for bad in ("nope", "as_trained+fp16_norms", "fp16_norms+fp16_norms"):
        with pytest.raises(SystemExit):
            bench_unet.main(["--variants", bad])


def test_bench_train_runs_the_trainer_with_a_unet_variant_and_puts_peft_back(tmp_path, monkeypatch):
    import json

    import bench_train
    import bench_unet
    import torch

    calls, real = [], torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "r.jsonl"
    bench_train.main(["--shape", "tiny", "--resolution", "32", "--warmup", "1", "--steps", "1",
                      "--unet_variant", "addmm_lora", "--json", str(path)])
    row = json.loads(path.read_text().splitlines()[0])
    assert row["unet_variant"] == "addmm_lora" and row["ms_per_micro_step"] > 0
    assert calls, "the trainer's adapted layers ran through addmm"
    assert bench_unet.PeftLinear.forward is bench_unet.PEFT_LINEAR_FORWARD


def test_bench_train_set_passes_any_trainer_setting(tmp_path, monkeypatch):
    import json

    import bench_train
    import pytest

    import billiard_lora.train as train_mod
    from billiard_lora.errors import UserError

    seen, real = [], train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda config, *a: seen.append(config) or real(config, *a))
    path = tmp_path / "r.jsonl"
    bench_train.main(["--shape", "tiny", "--resolution", "32", "--warmup", "1", "--steps", "1", "--json", str(path),
                      "--set", "use_ema=true", "--set", "caption_dropout_rate=0.2",
                      "--set", "instance_prompt=a photo of TOK", "--set", "train_text_encoder_ti=yes"])
    assert (seen[0].use_ema, seen[0].caption_dropout_rate, seen[0].train_text_encoder_ti) == (True, 0.2, True)
    assert json.loads(path.read_text().splitlines()[0])["set"][0] == "use_ema=true"
    with pytest.raises(UserError, match="--set: unknown setting 'use_emma'"):
        bench_train.main(["--shape", "tiny", "--resolution", "32", "--set", "use_emma=true"])


def test_unet_ceiling_profile_goes_into_the_row_and_a_failing_profiler_costs_nothing(monkeypatch):
    import bench_train
    import bench_unet

    class Stub:
        def start(self):
            pass

        def stop(self):
            pass

        def report(self, micro):
            return {"gpu_kernel_ms_per_micro_step": 7.0, "gpu_kernel_launches_per_micro_step": 3,
                    "top_kernels_ms_per_micro_step": {"gemm": 5.0}}

    calls = []
    monkeypatch.setattr(bench_train, "GpuTime", Stub)
    profile: dict = {}
    assert bench_unet.seconds_per_call(lambda: calls.append(1), 2, False, lambda: None, profile) >= 0
    assert profile == {"gpu_kernel_ms": 7.0, "gpu_kernel_launches": 3, "top_kernels_ms": {"gemm": 5.0}}
    assert len(calls) == 2 + 2 + 1  # warm-up and the untimed call, the timed ones, the profiled one

    class Broken(Stub):
        def start(self):
            raise RuntimeError("no CUPTI")

    monkeypatch.setattr(bench_train, "GpuTime", Broken)
    profile = {}
    assert bench_unet.seconds_per_call(lambda: None, 1, False, lambda: None, profile) >= 0 and profile == {}


def test_train_benchmark_counts_what_a_checkpointing_interval_recomputes():
    """bench_train.py's FLOP count: every Nth block recomputed is about 1/N of what checkpointing every block
    recomputes (which is most of a forward: not conv_in, conv_out, the embeddings or the resamplers)."""
    from bench_train import components, unet_forward_flops

    c = components("tiny", "meta")
    fwd, none = unet_forward_flops(c, 64, 1)
    counts = {k: unet_forward_flops(c, 64, 1, k) for k in (1, 2, 4)}
    assert none == 0 and all(f == fwd for f, _ in counts.values())
    every = counts[1][1]
    assert 0.7 * fwd < every < fwd
    assert counts[4][1] < counts[2][1] < every
    assert 0.3 * every < counts[2][1] < 0.7 * every


def test_activation_memory_counted_on_meta_is_what_a_real_forward_saves(monkeypatch):
    """bench_memory.py counts on the meta device what a real forward keeps for backward (the same storages, each
    once, weights left out); checkpointing more blocks keeps less; selective checkpointing keeps what its level
    says (thresholds scaled down to the tiny model's widths)."""
    import torch
    from bench_memory import measure

    import billiard_lora.train as train_mod

    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", {"costly": 160, "products": 64})

    kw = dict(shape="tiny", resolution=64, batch=1, dtype=torch.float32, rank=4, intervals=[0, 4, 2, 1],
              selective=("off", "costly", "products"))
    meta, cpu = measure(**kw), measure(**kw, device="cpu")
    # (every 2nd block: the CPU keeps one small tensor, 8 KB of 1.3 MB here, in a storage of its own that the meta
    # device shares with another one)
    assert meta["saved"].keys() == cpu["saved"].keys()
    assert all(abs(meta["saved"][k] - cpu["saved"][k]) <= 0.01 * cpu["saved"][k] for k in cpu["saved"])
    assert meta["recomputed"] == cpu["recomputed"]
    saved, flops = meta["saved"], {k: v[0] for k, v in meta["recomputed"].items()}
    assert flops[0, "off"] == 0 and flops[1, "off"] > flops[2, "off"] > flops[4, "off"] > 0
    assert saved[0, "off"] > saved[4, "off"] > saved[2, "off"] > saved[1, "off"] > 0
    # selective checkpointing keeps more than recomputing whole blocks and recomputes less the more it keeps
    assert saved[0, "off"] > saved[1, "products"] > saved[1, "costly"] > saved[1, "off"]
    assert flops[1, "off"] > flops[1, "costly"] > flops[1, "products"] > 0
    moved = {k: v[1] for k, v in meta["recomputed"].items()}
    assert moved[1, "off"] > moved[1, "costly"] > moved[1, "products"] > 0 == moved[0, "off"]
    assert flops[1, "costly"] > flops[2, "costly"] and saved[2, "costly"] > saved[1, "costly"]


def test_generation_memory_benchmark_applies_each_setting_to_the_pipeline_it_times(tmp_path):
    """Each row's pipeline was prepared as its setting says (tiles, offload hooks, float8), float8 last and only
    there; the VAE-only case runs in child processes and reports a decode of the full image."""
    import json

    import bench_generation_memory as bgm

    out = tmp_path / "rows.jsonl"
    bgm.main(["--shape", "tiny", "--resolution", "128", "--tile", "64", "--what", "pipeline", "--steps", "1",
              "--device", "cpu", "--json", str(out), "--settings", "cpu_offload+vae_tiling+fp8_base", "resident",
              "vae_tiling", "cpu_offload"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["setting"], r["vae_tile_px"], r["offloaded"], r["fp8_base"]) for r in rows]
    assert got == [("resident", 0, False, False), ("vae_tiling", 64, False, False), ("cpu_offload", 0, True, False),
                   ("cpu_offload+vae_tiling+fp8_base", 64, True, True)]

    bgm.main(["--shape", "tiny", "--resolution", "128", "--tile", "64", "--what", "vae", "--device", "cpu",
              "--json", str(out)])
    whole, tiled = [json.loads(line) for line in out.read_text().splitlines()][-2:]
    assert (whole["tiled"], tiled["tiled"], tiled["tile_px"]) == (False, True, 64)
    assert whole["image"] == tiled["image"] == [1, 3, 128, 128] and whole["peak_rise_gib"] >= 0


def test_unet_ceiling_float32_reference_is_exact_and_leaves_the_half_precision_model_as_it_was():
    """bench_unet.fp32_result: the yardstick a half-precision variant's error is read against (rel_err_vs_fp32)."""
    import argparse

    import bench_unet
    import torch

    args = argparse.Namespace(shape="tiny", device="cpu", rank=4, resolution=64, gradient_checkpointing=True,
                              torch_compile="none")
    half = bench_unet.build_unet(args, torch.bfloat16, lora=True)
    before = {n: t.clone() for n, t in half.state_dict().items()}
    x = bench_unet.make_inputs(half, args, 1, torch.bfloat16)
    exact = bench_unet.fp32_result(half, "lora", x)
    after = half.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    assert all(p.grad is None for p in half.parameters())
    # the same as a float32 model given the same (half-rounded) weights and inputs, bit for bit
    full = bench_unet.build_unet(args, torch.bfloat16, lora=True).float()
    full.load_state_dict({n: t.float() for n, t in before.items()})
    want = bench_unet.eager_result(full, "lora", {k: v.float() if v.is_floating_point() else v for k, v in x.items()},
                                   lambda: torch.autocast("cpu", enabled=False))
    assert all(torch.equal(a, b) for a, b in zip(exact, want))
    # and bf16 autocast is measurably off it, by a bf16-sized amount
    err = bench_unet.relative_diff(exact, bench_unet.eager_result(half, "lora", x,
                                                                  lambda: torch.autocast("cpu", torch.bfloat16)))
    assert 0 < err < 0.5


def test_unet_ceiling_in_half_precision_on_a_cpu_holds_both_norm_policies_against_float32(tmp_path):
    """--mixed_precision fp16 on a CPU: as_trained keeps the norms in fp16 (CPU autocast, = --half_precision_norms),
    fp32_norms computes them as CUDA autocast does; each result gets its error against float32."""
    import json

    import bench_unet
    import torch

    path = tmp_path / "n.jsonl"
    bench_unet.main(["--shape", "tiny", "--resolution", "64", "--iters", "1", "--mixed_precision", "fp16",
                     "--kinds", "forward", "lora", "--variants", "as_trained", "fp32_norms", "--json", str(path)])
    rows = {(r["kind"], r["variant"]): r for r in map(json.loads, path.read_text().splitlines())}
    assert len(rows) == 4 and all(0 < r["rel_err_vs_fp32"] < 0.1 for r in rows.values())
    assert rows["forward", "fp32_norms"]["rel_diff_vs_as_trained"] > 0  # it changes what runs on a CPU
    ln = torch.nn.LayerNorm(8).half()
    undo = bench_unet.fp32_norms(torch.nn.ModuleList([ln]))
    x = torch.randn(2, 8).half()
    with torch.autocast("cpu", torch.float16):
        out = ln(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.layer_norm(x.float(), (8,), ln.weight.float(), ln.bias.float()))
    undo()


def test_bench_train_with_buckets_trains_on_three_shapes(tmp_path, monkeypatch):
    import json

    import bench_train
    from PIL import Image

    import billiard_lora.train as train_mod

    folder = Path(bench_train.mixed_shapes(tmp_path / "mixed"))
    shapes = {Image.open(p).size for p in folder.iterdir()}
    assert shapes == {(256, 256), (256, 170), (170, 256)}
    seen, real = set(), train_mod.diffusion_loss
    monkeypatch.setattr(train_mod, "diffusion_loss", lambda pred, *a, **k: seen.add(tuple(pred.shape[2:]))
                        or real(pred, *a, **k))
    path = tmp_path / "r.jsonl"
    bench_train.main(["--shape", "tiny", "--resolution", "64", "--warmup", "1", "--steps", "1",
                      "--aspect_ratio_buckets", "64,64;48,96;96,48", "--json", str(path)])
    row = json.loads(path.read_text().splitlines()[0])
    assert row["aspect_ratio_buckets"] == "64,64;48,96;96,48" and seen == {(8, 8), (6, 12), (12, 6)}


def test_gpu_check_parses_and_every_part_it_names_is_defined():
    """A GPU session has minutes of device time: the prepared script must not fail on a typo. It parses; each part in
    its default order, in its header and in the plan RESULTS.md gives the next GPU session has a function."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = (root / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "benchmarks" / "gpu_check.sh")]).returncode == 0
    defined = set(re.findall(r"^p(\d+)\(\) \{", script, flags=re.M))
    default = re.search(r'for n in \$\{PARTS:-([\d ]+)\}', script).group(1).split()
    documented = re.findall(r"^#\s+(\d+)\. ", script, flags=re.M)
    plan = (root / "benchmarks" / "RESULTS.md").read_text().split("## The next GPU session's call")[1].split("\n## ")[0]
    planned = [n for parts in re.findall(r'PARTS="([\d ]+)"', plan) for n in parts.split()]
    assert planned and set(default) == set(documented) == defined, (set(default) ^ defined, set(documented) ^ defined)
    assert set(planned) <= defined, set(planned) - defined
