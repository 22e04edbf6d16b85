"""What the benchmark scripts share: the device's name, peak memory, and printing results as JSON lines."""

from __future__ import annotations

import json
import platform
import resource

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory(device: str) -> dict:
    """CUDA max allocated / reserved since the last reset, or this process's peak RSS, in GiB."""
    if device.startswith("cuda"):
        return {"cuda_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                "cuda_max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def emit(results: list[dict], json_path: str | None) -> None:
    """Print each result as one JSON line; also append them to ``json_path`` if given."""
    for r in results:
        line = json.dumps(r)
        print(line, flush=True)
        if json_path:
            with open(json_path, "a") as fh:
                fh.write(line + "\n")
