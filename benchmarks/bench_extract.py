"""How long ``lora extract`` spends on its SVDs for SDXL base's layout, on this machine.

    python benchmarks/bench_extract.py [--device cuda] [--conv] [--json out.jsonl]

The full-size SDXL architecture is built on the meta device (no memory, no weights) and the layers an extraction
considers are listed as ``extract.py`` lists them (``attn,ff,proj`` of the UNet, both text encoders' attention and
MLP projections; ``--conv`` adds the convolutions, which ``--conv_rank`` extracts). One random matrix of each distinct
shape is decomposed (after one warm-up), timed, and the time is multiplied by how many layers have that shape: the
SVD time of a whole extraction, without loading the models. Prints one JSON line; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    from common import device_name, emit

    from billiard_lora.extract import DEFAULT_LAYERS, _layer_weights
    from billiard_lora.tiny import FULL, build_components

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--conv", action="store_true", help="the convolutions too (extract --conv_rank)")
    p.add_argument("--json", default=None, help="also append the result to this file")
    args = p.parse_args()

    parts = build_components(FULL, device="meta")
    weights = _layer_weights(types.SimpleNamespace(**parts), DEFAULT_LAYERS, args.conv)
    shapes = collections.Counter((w.shape[0], w[0].numel()) for layers in weights.values() for w in layers.values())
    per_shape = {}
    for (rows, cols), count in sorted(shapes.items()):
        matrix = torch.randn(rows, cols, device=args.device)
        torch.linalg.svd(matrix, full_matrices=False)  # warm-up (and the device's libraries loaded)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.linalg.svd(matrix, full_matrices=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        per_shape[f"{rows}x{cols}"] = {"layers": count, "seconds_each": round(time.perf_counter() - start, 4)}
    total = sum(v["layers"] * v["seconds_each"] for v in per_shape.values())
    emit([{"bench": "extract_svd", "device": device_name(args.device), "threads": torch.get_num_threads(),
           "conv": args.conv, "layers": sum(shapes.values()),
           "layers_per_component": {c: len(v) for c, v in weights.items()},
           "svd_seconds_total": round(total, 1), "per_shape": per_shape}], args.json)


if __name__ == "__main__":
    main()
