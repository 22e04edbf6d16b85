"""How a training step noises its latents: which timesteps it draws and what noise it adds.

Beyond diffusers' uniform timesteps and Gaussian noise (with ``--noise_offset``), the recipes users of kohya's
sd-scripts, SimpleTuner and diffusers' text-to-image scripts ask for:

- ``timestep_weights``: diffusers' ``--timestep_bias_strategy`` (train_text_to_image_sdxl.py's
  ``generate_timestep_weights``), restricted to ``--min_timestep``/``--max_timestep``;
- ``multires_noise``: kohya's ``--multires_noise_iterations``/``--multires_noise_discount`` (J. Whitaker's
  multi-resolution "pyramid" noise);
- the input perturbation of ``--input_perturbation`` (arXiv 2301.11706) is drawn in the trainer: it noises the
  model's input with ``noise + gamma * randn`` while the target stays ``noise``.

Every random number comes from the micro-batch's own generator, so a resumed run draws what an uninterrupted
one drew.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .config import TrainConfig


def timestep_weights(config: TrainConfig, num_train_timesteps: int) -> torch.Tensor | None:
    """The probability of drawing each timestep (float64, sums to 1), or None for uniform draws.

    As diffusers' ``generate_timestep_weights``: ``later``/``earlier`` multiply the weight of the last/first
    ``--timestep_bias_portion`` of the timesteps by ``--timestep_bias_multiplier``; ``range`` multiplies those in
    [``--timestep_bias_begin``, ``--timestep_bias_end``) (diffusers' slice: the end is not included). Timesteps
    outside [``--min_timestep``, ``--max_timestep``) get weight 0."""
    low, high = config.min_timestep, config.max_timestep or num_train_timesteps
    if config.timestep_bias_strategy == "none":
        return None
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    n = int(config.timestep_bias_portion * num_train_timesteps)
    biased = {"later": slice(num_train_timesteps - n, None), "earlier": slice(0, n),
              "range": slice(config.timestep_bias_begin, config.timestep_bias_end)}[config.timestep_bias_strategy]
    weights[biased] *= config.timestep_bias_multiplier
    weights[:low] = 0.0
    weights[high:] = 0.0
    return weights / weights.sum()


def draw_timesteps(n: int, low: int, high: int, weights: torch.Tensor | None, gen: torch.Generator,
                   device) -> torch.Tensor:
    """``n`` timesteps: uniform in [low, high) (diffusers' ``torch.randint``), or by ``weights``."""
    if weights is None:
        return torch.randint(low, high, (n,), generator=gen, device=device).long()
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def multires_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like``: adds Gaussian noise drawn at ever coarser resolutions, each level's scale
    factor a random 2-4x and its strength ``discount ** i``, upsampled bilinearly, then rescales to unit standard
    deviation. The random scale factors come from ``gen``'s seed (host-side: no wait for the GPU); the rescaling is
    per image (kohya's is per batch; the same at batch 1), so an image's noise does not depend on its batch."""
    b, c, h, w = noise.shape
    scales = random.Random(gen.initial_seed())
    out = noise.clone()
    for i in range(iterations):
        r = scales.random() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = torch.randn((b, c, hn, wn), generator=gen, device=noise.device, dtype=noise.dtype)
        out += F.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std(dim=(1, 2, 3), keepdim=True)
