"""What training computes once and reuses: prompt embeddings, SDXL's size/crop conditioning, VAE latents.

All three are exact: a run with the caches gives the same numbers as one that recomputes everything each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

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


def count_views(images: Sequence[TrainImage], config: TrainConfig) -> int:
    """How many distinct views (crop position x flip) training can draw from these images."""
    from .data import resized_size

    total = 0
    for im in images:
        w, h = resized_size(im.image.width, im.image.height, config.resolution)
        crops = 1 if config.center_crop else (w - config.resolution + 1) * (h - config.resolution + 1)
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

    def lookup(self, original_sizes: Sequence[Sequence[int]], crops: Sequence[Sequence[int]]) -> torch.Tensor:
        from .conditioning import compute_time_ids

        rows = []
        for size, crop in zip(original_sizes, crops):
            key = (*size, *crop)
            if key not in self.table:
                self.table[key] = compute_time_ids(size, crop, (self.resolution, self.resolution), dtype=self.dtype,
                                                   device=self.device)
            rows.append(self.table[key])
        return torch.stack(rows)


class LatentCache:
    """The VAE posterior (mean, std) of each distinct training view, computed once.

    Keyed by content (file hash, resolution, crop, flip), never by dataloader index. Each view is encoded alone, so
    its latent never depends on which images shared its batch: cached or not, resumed or not, the numbers agree.
    Latents are then sampled from the cached posterior with our generator, exactly as the VAE itself would.

    Entries are kept in CPU memory (0.5 MB per 1024 px view), never on the GPU, and the cache stops growing at
    ``max_bytes``: random crops of large photos rarely repeat, and must not fill memory as training goes on.
    """

    def __init__(self, vae, device=None, *, enabled: bool = True, max_bytes: int = 4 * 2**30,
                 say: Callable[[str], None] | None = None, views: int | None = None,
                 on_complete: Callable[[], None] | None = None):
        self.vae, self.enabled, self.max_bytes, self.say = vae, enabled, max_bytes, say
        self.device = torch.device(device) if device is not None else vae.device  # where latents are used
        self.views, self.on_complete = views, on_complete  # how many distinct views exist; called once all are in
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = self.bytes = 0
        self.full = False

    def __contains__(self, key: str) -> bool:
        return self.enabled and key in self.table

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels[None].to(self.vae.device, dtype=self.vae.dtype)).latent_dist
        return dist.mean[0].to(self.device), dist.std[0].to(self.device)

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        size = mean.nbytes + std.nbytes
        if self.bytes + size > self.max_bytes:
            if not self.full and self.say:
                self.say(f"note: the latent cache reached {self.max_bytes / 2**30:.1f} GB ({len(self.table)} views); "
                         "new views are encoded each time they come up")
            self.full = True
            return
        # pinned host memory when training on a GPU: copies back to it then need not wait for queued GPU work
        pin = mean.device.type == "cuda"
        self.table[key] = tuple(t.to("cpu").pin_memory() if pin else t.to("cpu") for t in (mean, std))
        self.bytes += size
        if self.views is not None and len(self.table) == self.views and self.on_complete:
            self.on_complete()

    def posterior(self, pixel_values: Sequence[torch.Tensor | None], keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        device = self.device
        for pixels, key in zip(pixel_values, keys):
            if key in self.table:
                self.hits += 1
                mean, std = (t.to(device, non_blocking=True) for t in self.table[key])
            else:
                self.misses += 1
                mean, std = self._posterior(pixels)
                if self.enabled:
                    self._store(key, mean, std)
            means.append(mean)
            stds.append(std)
        return torch.stack(means), torch.stack(stds)

    def sample(self, pixel_values: Sequence[torch.Tensor | None], keys: Sequence[str], generator: torch.Generator,
               weight_dtype: torch.dtype) -> torch.Tensor:
        """Scaled latents (B, 4, H/8, W/8) drawn from each view's posterior."""
        mean, std = self.posterior(pixel_values, keys)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ((mean + std * eps) * self.vae.config.scaling_factor).to(weight_dtype)
