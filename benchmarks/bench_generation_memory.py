"""Memory of generating an SDXL image, with and without ``generate``'s memory savers.

    python benchmarks/bench_generation_memory.py --shape full --resolution 1024 --steps 10   # on a GPU: pipelines
    python benchmarks/bench_generation_memory.py --shape full --resolution 1024 --what vae   # the decoder alone

``--what pipeline`` (the default on a GPU): for each setting -- everything on the GPU (``resident``), ``vae_tiling``,
``cpu_offload``, both, and both with ``fp8_base`` -- one pipeline of random weights is prepared as ``generate``
prepares it (``prepare_pipeline``: the code behind ``--cpu_offload`` / ``--vae_tiling`` / ``--fp8_base``), warmed
up with a 2-step image, then one image is timed: peak GPU memory allocated and reserved during it, what stays
allocated between images, and seconds per image.

``--what vae`` (the default on the CPU, where a full-size image takes minutes): the VAE's decode of one latent,
whole and in tiles, each in a process of its own so that one cannot lend the other its freed memory: on a GPU the
peak allocated above what was allocated before; on the CPU the rise of the process's peak RSS during the decode
(Linux /proc). Numbers to read and record in RESULTS.md; nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from billiard_lora.tiny import SHAPES, build_components, build_vae  # noqa: E402
from common import device_name, emit, peak_memory_since_reset, proc_status_gib, reset_peak_memory  # noqa: E402

SETTINGS = {  # name -> prepare_pipeline keywords
    "resident": {},
    "vae_tiling": {"vae_tiling": True},
    "cpu_offload": {"cpu_offload": True},
    "cpu_offload+vae_tiling": {"cpu_offload": True, "vae_tiling": True},
    "cpu_offload+vae_tiling+fp8_base": {"cpu_offload": True, "vae_tiling": True, "fp8_base": True},
}
GiB = 2**30


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_pipelines(args) -> list[dict]:
    """One image per setting, each with its memory savers: peak and held GPU memory, seconds.

    One pipeline of random weights is built (on the GPU: seconds) and prepared for each setting in turn, its hooks
    and tiling undone in between; ``fp8_base`` changes the UNet for good, so settings with it come last."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import _is_fp8, _is_offloaded, generate, prepare_pipeline

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionXLPipeline(**build_components(SHAPES[args.shape], device=args.device, seed=0, dtype=dtype))
    gen = dict(height=args.resolution, width=args.resolution, progress=False)
    rows = []
    for setting in sorted(args.settings, key=lambda name: SETTINGS[name].get("fp8_base", False)):
        kw = SETTINGS[setting]
        pipe.remove_all_hooks()
        pipe.vae.disable_tiling()
        pipe = prepare_pipeline(pipe, device=args.device, vae_tiling=kw.get("vae_tiling", False) and args.tile,
                                cpu_offload=kw.get("cpu_offload", False), fp8_base=kw.get("fp8_base", False))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        generate(pipe, "a photo of messi playing billiard", [0], num_inference_steps=2, **gen)  # warm-up
        _sync(args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        image = generate(pipe, "a photo of messi playing billiard", [1], num_inference_steps=args.steps, **gen)[0]
        _sync(args.device)
        row = {"what": "generation_memory", "setting": setting, "shape": args.shape, "resolution": args.resolution,
               "steps": args.steps, "device": device_name(args.device), "s_per_image": time.perf_counter() - t,
               "vae_tile_px": image.vae_tiling, "offloaded": _is_offloaded(pipe), "fp8_base": _is_fp8(pipe)}
        if cuda:
            row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                       held_between_images_gib=torch.cuda.memory_allocated() / GiB)
        emit([row], args.json)  # each as it comes: a time-boxed run keeps what it measured
        rows.append(row)
    return rows


def bench_vae(args, tiled: bool) -> dict:
    """One decode of a (1, 4, H/8, W/8) latent by the shape's VAE, whole or in ``args.tile``-px tiles."""
    from billiard_lora.generate import enable_vae_tiling

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    vae = build_vae(SHAPES[args.shape], device=args.device, dtype=dtype)
    if tiled:
        enable_vae_tiling(vae, args.tile)
    lat = args.resolution // 8
    z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    with torch.no_grad():
        vae.decode(z[..., :8, :8])  # warm-up (a small decode: kernels chosen, buffers made)
    _sync(args.device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() / GiB if cuda else proc_status_gib("VmRSS")["VmRSS"]
    reset_peak_memory(args.device)  # CUDA's peak counters, or the process's peak RSS (VmHWM)
    t = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z).sample
    _sync(args.device)
    seconds = time.perf_counter() - t
    peak = next(iter(peak_memory_since_reset(args.device).values()))  # max allocated, or peak RSS
    return {"what": "vae_decode_memory", "tiled": tiled, "tile_px": args.tile if tiled else 0, "shape": args.shape,
            "resolution": args.resolution, "dtype": str(dtype).removeprefix("torch."), "image": list(image.shape),
            "device": device_name(args.device), "seconds": seconds,
            "memory": "cuda allocated" if cuda else "process RSS",
            "peak_rise_gib": peak - before, "vae_weights_gib": sum(p.numel() * p.element_size()
                                                                    for p in vae.parameters()) / GiB}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the timed image")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels for the tiled settings")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--what", choices=["pipeline", "vae"], default=None,
                   help="whole pipelines per setting (default on a GPU) or the VAE's decode alone, whole and tiled "
                        "(default on the CPU)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one VAE case in this process
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    if args.one is not None:  # a child process: one decode, one JSON line
        print(json.dumps(bench_vae(args, tiled=args.one == "tiled")), flush=True)
        return
    what = args.what or ("pipeline" if args.device.startswith("cuda") else "vae")
    if what == "pipeline":
        bench_pipelines(args)
        return
    rows = []
    for case in ("whole", "tiled"):
        cmd = [sys.executable, __file__, "--one", case, "--shape", args.shape, "--resolution", str(args.resolution),
               "--device", args.device, "--tile", str(args.tile)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
