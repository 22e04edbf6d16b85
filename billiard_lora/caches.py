"""What training computes once and reuses: prompt embeddings, SDXL's size/crop conditioning, VAE latents.

All three are exact: a run with the caches gives the same numbers as one that recomputes everything each step.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .io import normal_mode

if TYPE_CHECKING:
    from .config import TrainConfig
    from .train import TrainImage


class PromptCache:
    """Prompt embeddings of each distinct caption, computed once (the text encoders are frozen)."""

    def __init__(self, table: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.table = table

    @classmethod
    @torch.no_grad()
    def build(cls, captions: Sequence[str], components, device) -> "PromptCache":
        from .conditioning import encode_prompt

        table = {}
        for cap in captions:
            embeds, pooled = encode_prompt(components.text_encoders, components.tokenizers, [cap])
            table[cap] = (embeds[0].to(device), pooled[0].to(device))
        return cls(table)

    def lookup(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([self.table[c][0] for c in captions]), torch.stack([self.table[c][1] for c in captions]))


def count_views(images: Sequence[TrainImage], config: TrainConfig,
                targets: Sequence[tuple[int, int]] | None = None) -> int:
    """How many distinct views (crop position x flip) training can draw from these images, each made at its
    ``targets`` (h, w) (an aspect-ratio bucket; by default the square resolution)."""
    from .data import cover_size

    total = 0
    for i, im in enumerate(images):
        th, tw = targets[i] if targets else (config.resolution, config.resolution)
        w, h = cover_size(im.image.width, im.image.height, (th, tw))
        crops = 1 if config.center_crop else (w - tw + 1) * (h - th + 1)
        total += crops * (2 if config.random_flip else 1)
    return total


class TimeIdCache:
    """SDXL's size/crop conditioning per distinct (original size, crop), made once on the device.

    Building it from Python numbers each step would copy host memory to the GPU, and such a copy makes the CPU wait
    for all queued GPU work: the next step's kernels could not be queued while this one runs.
    """

    def __init__(self, resolution: int, dtype: torch.dtype, device):
        self.resolution, self.dtype, self.device = resolution, dtype, device
        self.table: dict[tuple, torch.Tensor] = {}

    def lookup(self, original_sizes: Sequence[Sequence[int]], crops: Sequence[Sequence[int]],
               target_sizes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """(B, 6) time ids; ``target_sizes``: each view's (h, w), by default the square resolution."""
        from .conditioning import compute_time_ids

        rows = []
        square = (self.resolution, self.resolution)
        for i, (size, crop) in enumerate(zip(original_sizes, crops)):
            target = tuple(target_sizes[i]) if target_sizes else square
            key = (*size, *crop, *target)
            if key not in self.table:
                self.table[key] = compute_time_ids(size, crop, target, dtype=self.dtype, device=self.device)
            rows.append(self.table[key])
        return torch.stack(rows)


def vae_fingerprint(vae) -> str:
    """What decides a VAE's latents: its class, config, dtype and the exact weights of its encoder half."""
    h = hashlib.sha256(f"{type(vae).__name__}:{vae.dtype}:".encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):  # the decoder never touches an encode
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LatentStore:
    """``--cache_latents_to_disk``: each view's posterior in a small safetensors file, in one folder per VAE.

    A later run on the same images with the same VAE (another learning rate, a resumed run, more steps) reads them
    instead of encoding, and sets beyond the in-memory cache's budget still encode each view once. A file that
    cannot be read is encoded again; a write that fails (disk full, no permission) stops disk caching with one
    note, never the training.
    """

    def __init__(self, root: str | Path, vae, say: Callable[[str], None] | None = None):
        self.folder = Path(root).expanduser() / vae_fingerprint(vae)
        self.say = say or (lambda msg: None)
        self.reads = self.writes = 0
        self.writable = True

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("written for another view")
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
        except Exception as exc:  # truncated, foreign or corrupt: the view is encoded again and the file rewritten
            self.say(f"note: latent cache file {path} is unreadable ({exc}); encoding that view again")
            return None
        self.reads += 1
        return mean, std

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not self.writable:
            return
        path = self.path(key)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.folder)
            os.close(fd)
            save_file({"mean": mean.detach().to("cpu").contiguous(), "std": std.detach().to("cpu").contiguous()},
                      tmp, metadata={"key": key})
            normal_mode(tmp)  # a cache folder shared between users stays readable to them
            os.replace(tmp, path)  # whole or absent: another process writing the same view is harmless
            self.writes += 1
        except OSError as exc:
            self.writable = False
            self.say(f"note: cannot write the latent cache in {self.folder} ({exc.strerror or exc}); "
                     "training goes on with the in-memory cache only")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


class LatentCache:
    """The VAE posterior (mean, std) of each distinct training view, computed once.

    Keyed by content (file hash, resolution, crop, flip), never by dataloader index. Each view is encoded alone, so
    its latent never depends on which images shared its batch: cached or not, resumed or not, the numbers agree.
    Latents are then sampled from the cached posterior with our generator, exactly as the VAE itself would.

    Entries are kept in CPU memory (0.5 MB per 1024 px view), never on the GPU, and the cache stops growing at
    ``max_bytes``: random crops of large photos rarely repeat, and must not fill memory as training goes on.
    With a ``store`` (``LatentStore``) every view is also kept on disk, and views found there are not encoded.
    """

    def __init__(self, vae, device=None, *, enabled: bool = True, max_bytes: int = 4 * 2**30,
                 say: Callable[[str], None] | None = None, views: int | None = None,
                 on_complete: Callable[[], None] | None = None, store: LatentStore | None = None):
        self.vae, self.enabled, self.max_bytes, self.say = vae, enabled, max_bytes, say
        self.device = torch.device(device) if device is not None else vae.device  # where latents are used
        self.views, self.on_complete = views, on_complete  # how many distinct views exist; called once all are in
        self.store = store if enabled else None
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # read from disk, no room in memory
        self.hits = self.misses = self.bytes = 0
        self.full = False

    def __contains__(self, key: str) -> bool:
        """Whether the view's latents are at hand (its pixels need not be made). A view on disk is read now, so
        that a file found unreadable still leaves time to render and encode the view."""
        if not self.enabled:
            return False
        if key in self.table or key in self.staged:
            return True
        return self._from_store(key) is not None

    def _from_store(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        loaded = self.store.load(key) if self.store is not None else None
        if loaded is not None and not self._store(key, *loaded):
            self.staged[key] = loaded
        return loaded

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels[None].to(self.vae.device, dtype=self.vae.dtype)).latent_dist
        return dist.mean[0].to(self.device), dist.std[0].to(self.device)

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> bool:
        size = mean.nbytes + std.nbytes
        if self.bytes + size > self.max_bytes:
            if not self.full and self.say:
                again = "read from disk" if self.store is not None else "encoded"
                self.say(f"note: the latent cache reached {self.max_bytes / 2**30:.1f} GB ({len(self.table)} views); "
                         f"new views are {again} each time they come up")
            self.full = True
            return False
        # pinned host memory when training on a GPU: copies back to it then need not wait for queued GPU work
        pin = self.device.type == "cuda"
        self.table[key] = tuple(t.to("cpu").pin_memory() if pin else t.to("cpu") for t in (mean, std))
        self.bytes += size
        if self.views is not None and len(self.table) == self.views and self.on_complete:
            self.on_complete()
        return True

    def posterior(self, pixel_values: Sequence[torch.Tensor | None], keys: Sequence[str],
                  twins: Sequence[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each view's (mean, std); ``twins`` names, per view, the key of its mirror image, which is encoded too
        (from the flipped pixels, exactly what rendering it would give) when this view is encoded."""
        means, stds = [], []
        device = self.device
        for pixels, key, twin in zip(pixel_values, keys, twins or [None] * len(keys)):
            found = (self.table.get(key) or self.staged.pop(key, None)) if self.enabled else None
            if found is None and self.store is not None:  # workers render every view: the disk is asked here
                found = self.store.load(key)
                if found is not None:
                    self._store(key, *found)
            if found is not None:
                self.hits += 1
                mean, std = (t.to(device, non_blocking=True) for t in found)
            else:
                self.misses += 1
                mean, std = self._posterior(pixels)
                if self.enabled:
                    self._keep(key, mean, std)
                    if twin is not None and twin not in self:
                        self._keep(twin, *self._posterior(torch.flip(pixels, dims=[-1])))
            means.append(mean)
            stds.append(std)
        return torch.stack(means), torch.stack(stds)

    def _keep(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self._store(key, mean, std)
        if self.store is not None:
            self.store.save(key, mean, std)

    def sample(self, pixel_values: Sequence[torch.Tensor | None], keys: Sequence[str], generator: torch.Generator,
               weight_dtype: torch.dtype, twins: Sequence[str | None] | None = None) -> torch.Tensor:
        """Scaled latents (B, 4, H/8, W/8) drawn from each view's posterior."""
        mean, std = self.posterior(pixel_values, keys, twins)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ((mean + std * eps) * self.vae.config.scaling_factor).to(weight_dtype)
