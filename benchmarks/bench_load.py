"""Host memory of loading an SDXL model folder for training, as the trainer loads it and two other ways.

    python -m billiard_lora.tiny /tmp/sdxl --shape full --dtype fp32      # SDXL base's files are float32
    python benchmarks/bench_load.py /tmp/sdxl

Cases, each in a process of its own, through ``models.load_components`` (the trainer's loader):
  fp32       the files' own precision, as the trainer (and diffusers' script) load them; the trainer then casts
             each model on its way to the GPU
  fp16       loaded straight into float16 (``torch_dtype``)
  fp32+cast  loaded as fp32, then cast to float16 in CPU memory (what a cast before the move would hold)
A thread samples /proc/self/status every 5 ms: peak private memory (RssAnon: what the RAM must really hold) and
peak file-backed memory (RssFile: pages of the memory-mapped safetensors files, which the kernel can drop and
read again), the same after, the loaded weights' bytes, and the seconds. Linux only. Numbers to read and record in
RESULTS.md; nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CASES = ("fp32", "fp16", "fp32+cast")
GiB = 2**30


def _status() -> dict[str, float]:
    """RssAnon and RssFile of this process, in GiB."""
    from common import proc_status_gib

    return proc_status_gib("RssAnon", "RssFile")


def load_once(folder: str, case: str) -> dict:
    import torch

    from billiard_lora.models import load_components

    peak = _status()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    c = load_components(folder, torch_dtype=torch.float16 if case == "fp16" else None)
    if case == "fp32+cast":
        for m in (c.unet, c.text_encoder_one, c.text_encoder_two):
            m.to(dtype=torch.float16)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    after = _status()
    modules = {"unet": c.unet, "text_encoder": c.text_encoder_one, "text_encoder_2": c.text_encoder_two, "vae": c.vae}
    weights = {k: sum(p.numel() * p.element_size() for p in m.parameters()) / GiB for k, m in modules.items()}
    return {"what": "load_memory", "folder": folder, "case": case, "seconds": seconds,
            "peak_private_gib": peak["RssAnon"], "peak_file_backed_gib": peak["RssFile"],
            "private_after_gib": after["RssAnon"], "file_backed_after_gib": after["RssFile"],
            "weights_gib": weights, "weights_total_gib": sum(weights.values()),
            "loaded_dtypes": {k: str(next(m.parameters()).dtype).removeprefix("torch.") for k, m in modules.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a diffusers SDXL folder (python -m billiard_lora.tiny DIR --shape full)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # internal: one load in this process
    p.add_argument("--json", default=None, help="also append the results to this JSON-lines file")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(load_once(args.folder, args.one)), flush=True)
        return
    from common import emit

    rows = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, args.folder, "--one", case], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
