"""Time diffusers' ``train_dreambooth_lora_sdxl.py`` on the same model and settings as ``bench_train.py``.

    python benchmarks/time_diffusers_script.py --script /elsewhere/train_dreambooth_lora_sdxl.py --warmup 2 \
        -- --pretrained_model_name_or_path=MODEL --instance_data_dir=IMAGES --resolution=1024 ...   # its own flags

The script is a copy you point at (diffusers' ``examples/dreambooth``; never committed here). It runs unmodified in
this process; the only thing added is a clock on its progress bar: each time the "Steps" bar advances (one
optimizer step) the device is synchronised and the time recorded. Steady-state time per step is taken over the
steps after ``--warmup``, so start-up, model loading and the first (slow) steps drop out, as in ``bench_train.py``.
Prints one JSON line with the same field names (and appends it to ``--json``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, peak_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", required=True, help="path to a copy of diffusers' train_dreambooth_lora_sdxl.py")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    p.add_argument("--json", default=None, help="also append the result to this JSON-lines file")
    p.add_argument("--run_to_the_end", dest="stop_after_training", action="store_false",
                   help="let the script save, reload the pipeline and sample after training (not timed either way)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: the script's own flags")
    args = p.parse_args()
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    known = argparse.ArgumentParser(add_help=False)
    for flag, default in (("--train_batch_size", 4), ("--gradient_accumulation_steps", 1)):
        known.add_argument(flag, type=int, default=default)
    for flag in ("--resolution", "--mixed_precision", "--pretrained_model_name_or_path"):
        known.add_argument(flag)
    known.add_argument("--gradient_checkpointing", action="store_true")
    known.add_argument("--use_8bit_adam", action="store_true")
    settings, _ = known.parse_known_args(script_args)

    from tqdm.auto import tqdm

    stamps: list[float] = []
    cuda = torch.cuda.is_available()
    original_update = tqdm.update

    class TrainingDone(Exception):
        pass

    def update(self, n=1):
        result = original_update(self, n)
        if getattr(self, "desc", "") == "Steps":  # the script's training bar; pipelines' bars have other names
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if args.stop_after_training and self.n >= self.total:
                raise TrainingDone  # skip its final save, reload and sampling: only training is timed
        return result

    tqdm.update = update
    sys.argv = [args.script, *script_args]
    t0 = time.perf_counter()
    try:
        runpy.run_path(args.script, run_name="__main__")
    except TrainingDone:
        pass
    total = time.perf_counter() - t0

    timed = stamps[args.warmup - 1:] if args.warmup > 0 else [t0] + stamps
    if len(timed) < 2:
        raise SystemExit(f"only {len(stamps)} steps were recorded: raise --max_train_steps above --warmup + 1")
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    micro = settings.gradient_accumulation_steps
    result = {
        "what": "training", "trainer": "diffusers train_dreambooth_lora_sdxl.py",
        "shape": settings.pretrained_model_name_or_path,
        "resolution": settings.resolution, "batch": settings.train_batch_size, "gradient_accumulation_steps": micro,
        "gradient_checkpointing": settings.gradient_checkpointing, "mixed_precision": settings.mixed_precision,
        "use_8bit_adam": settings.use_8bit_adam,
        "device": device_name("cuda" if cuda else "cpu"),
        "timed_steps": len(timed) - 1, "optimizer_steps_per_s": 1 / per_step,
        "images_per_s": settings.train_batch_size * micro / per_step, "ms_per_micro_step": 1000 * per_step / micro,
        "wall_s_including_setup": total, "s_to_first_step": stamps[0] - t0,
    }
    result.update(peak_memory("cuda" if cuda else "cpu"))
    emit([result], args.json)


if __name__ == "__main__":
    main()
