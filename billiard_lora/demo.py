"""The whole pipeline on the embedded default data, on any machine, in a few minutes: ``make demo``.

audit -> image grid -> DreamBooth-LoRA training (the seed's settings, scaled down) -> generation grids -> model card.
Without network access there are no real SDXL weights, so by default the demo trains a tiny SDXL-architecture model
of random weights that our code builds: every stage runs for real, but the pictures it generates are noise-like.
Point ``--model`` at real SDXL weights (a hub id or a local folder) on a GPU for real pictures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from . import paths
from .errors import UserError, cli_entry


def run_demo(out: Path = paths.OUTPUTS_DIR / "demo", *, model: str | None = None, vae: str | None = None,
             steps: int = 30, resolution: int = 64) -> dict[str, Path]:
    """Run every stage and return the paths of what it wrote."""
    from .audit import audit
    from .config import TrainConfig
    from .data import load_example, resolve_source
    from .generate import (base_vs_lora, checkpoint_grid, famous_prompts, load_generation_pipeline,
                           prompt_seed_grid, scale_sweep)
    from .train import train
    from .viz import image_grid, save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    t0 = time.perf_counter()

    # 1. the model: real weights if given, else a tiny random SDXL built (once) by our code
    if model is None:
        from .tiny import save_tiny_pipeline

        tiny = out / "tiny-sdxl"
        if not (tiny / "model_index.json").exists():
            print(f"[1/5] building a tiny random-weight SDXL pipeline in {tiny}")
            save_tiny_pipeline(tiny)
        model, vae = str(tiny), str(tiny / "vae")
    else:
        print(f"[1/5] using the model {model}")

    # 2. audit the embedded default data, and show it
    source = resolve_source("default", caption_column="prompt")
    report = audit(source, resolution=resolution)
    head, *rest = report.summary().splitlines()  # "Audit of ...", then its lines
    print(f"[2/5] {head}\n" + _indent("\n".join(rest)))
    written["audit"] = out / "audit.json"
    written["audit"].write_text(json.dumps(report.to_dict(), indent=2, default=str))
    images = [load_example(e) for e in source.examples]
    cols = 4
    rows = (len(images) + cols - 1) // cols
    written["dataset_grid"] = save_image(image_grid(images, rows, cols,
                                                    labels=[e.path.name for e in source.examples]),
                                         out / "dataset_grid.png")

    # 3. train with the seed's recipe, scaled to this machine
    run_dir = out / "lora"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output from an earlier run
    config = TrainConfig.seed_recipe(
        pretrained_model_name_or_path=model, pretrained_vae_model_name_or_path=vae, dataset_name="default",
        caption_column=None,  # DreamBooth: every image is "messi playing billiard", binding the name to the look
        output_dir=str(run_dir), instance_prompt="a photo of messi playing billiard", resolution=resolution,
        max_train_steps=steps, checkpointing_steps=max(1, steps // 3), learning_rate=1e-3,
        validation_prompt="a photo of messi playing billiard", validation_steps=max(1, steps // 3),
        num_validation_images=2, validation_inference_steps=4, report_to="none", output_kohya_format=True,
        # the seed's 8-bit AdamW on a GPU; on a CPU bitsandbytes works but steps far slower than torch's AdamW
        use_8bit_adam=torch.cuda.is_available())
    print(f"[3/5] training {steps} step{'s' * (steps != 1)} at {resolution} px (the seed's settings otherwise) "
          f"into {run_dir}")
    train(config)
    written["lora"] = run_dir / "pytorch_lora_weights.safetensors"
    written["model_card"] = run_dir / "README.md"

    # 4. generate: famous people playing billiards, a LoRA-scale sweep, base vs LoRA, checkpoints
    print("[4/5] generating grids")
    pipe = load_generation_pipeline(model, vae=vae, loras=[str(run_dir)])
    gen = dict(num_inference_steps=4, height=resolution, width=resolution, progress=False)
    prompts = famous_prompts(config.instance_prompt, n=4)
    written["famous_grid"] = save_image(prompt_seed_grid(pipe, prompts, [0, 1], **gen), out / "famous_people.png")
    written["scale_sweep"] = save_image(scale_sweep(pipe, prompts[0], [0], **gen), out / "scale_sweep.png")
    written["base_vs_lora"] = save_image(base_vs_lora(pipe, prompts[:2], 0, **gen), out / "base_vs_lora.png")
    written["checkpoints"] = save_image(checkpoint_grid(pipe, run_dir, prompts[:2], 0, **gen), out / "checkpoints.png")

    print(f"[5/5] done in {time.perf_counter() - t0:.0f} s. Everything is under {out}:")
    for name, p in written.items():
        print(f"  {name:<13} {p}")
    if model == str(out / "tiny-sdxl"):
        print("  (a tiny random-weight model: the images show the pipeline works, not what SDXL would draw)")
    return written


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m billiard_lora.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(paths.OUTPUTS_DIR / "demo"), help="where everything is written")
    p.add_argument("--model", default=None, help="SDXL weights (hub id or folder); default: a tiny random model")
    p.add_argument("--vae", default=None, help="a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--resolution", type=int, default=64, help="training and generation resolution")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.vae and not args.model:
        raise UserError("--vae goes with --model: the tiny demo model brings its own VAE")
    from .config import MIN_RESOLUTION
    from .io import check_out_folder

    if args.resolution < MIN_RESOLUTION or args.resolution % 8:  # said now, not after the model and grids are made
        raise UserError(f"--resolution {args.resolution} must be a multiple of 8, at least {MIN_RESOLUTION}")
    check_out_folder(args.out, "--out")
    run_demo(Path(args.out), model=args.model, vae=args.vae, steps=args.steps, resolution=args.resolution)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
