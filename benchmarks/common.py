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


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's max-allocated counters, or (Linux) this process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_since_reset(device: str) -> dict:
    """Peak memory since ``reset_peak_memory``, in GiB (CPU: VmHWM from /proc; absent where there is none)."""
    if device.startswith("cuda"):
        return {"cuda_max_allocated_gb_timed": torch.cuda.max_memory_allocated() / 2**30,
                "cuda_max_reserved_gb_timed": torch.cuda.max_memory_reserved() / 2**30}
    try:
        return {"cpu_peak_rss_gb_timed": proc_status_gib("VmHWM")["VmHWM"]}
    except (OSError, KeyError):
        return {}


def proc_status_gib(*fields: str) -> dict[str, float]:
    """Memory fields of /proc/self/status (Linux: VmRSS, VmHWM, RssAnon, RssFile, ...) in GiB; absent ones left out."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) / 2**20
    return out


def emit(results: list[dict], json_path: str | None) -> None:
    """Print each result as one JSON line; also append them to ``json_path`` if given."""
    for r in results:
        line = json.dumps(r)
        print(line, flush=True)
        if json_path:
            with open(json_path, "a") as fh:
                fh.write(line + "\n")


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 5) -> tuple[float, list[dict]]:
    """Where the GPU sat idle: ``kernels`` are (start, end, name) in µs; returns the total idle time between the
    first kernel's start and the last one's end (overlapping kernels merged), and the ``top`` longest gaps with the
    kernels on either side -- e.g. the optimizer's kernels after a long gap say the host was busy stepping it."""
    spans = sorted(kernels)
    idle, gaps = 0.0, []
    busy_until, last_name = None, None
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            idle += start - busy_until
            gaps.append({"ms": round((start - busy_until) / 1000, 3), "after": last_name[:60], "before": name[:60]})
        if busy_until is None or end >= busy_until:
            busy_until, last_name = end, name
    return idle / 1000, sorted(gaps, key=lambda g: -g["ms"])[:top]
