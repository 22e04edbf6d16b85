"""Loading SDXL: the only module that calls ``from_pretrained``.

A model is a hub id (``stabilityai/stable-diffusion-xl-base-1.0``) or a local folder in diffusers layout (what
``python -m billiard_lora.tiny`` writes). Weights are read from safetensors only, and no remote code runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"


@dataclass
class Components:
    """The pieces of SDXL that training needs, loaded separately so each can be placed and cast on its own."""

    tokenizer_one: Any
    tokenizer_two: Any
    text_encoder_one: Any  # CLIPTextModel (CLIP ViT-L/14)
    text_encoder_two: Any  # CLIPTextModelWithProjection (OpenCLIP ViT-bigG/14)
    vae: Any  # AutoencoderKL
    unet: Any  # UNet2DConditionModel with addition_embed_type="text_time"
    noise_scheduler: Any  # DDPMScheduler built from the model's scheduler config

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer_one, self.tokenizer_two)

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder_one, self.text_encoder_two)


def _is_local(name: str) -> bool:
    return os.path.isdir(os.path.expanduser(name))


@contextlib.contextmanager
def _friendly_errors(what: str, name: str) -> Iterator[None]:
    """Turn the hub's and diffusers' loading exceptions into one line that says how to fix it."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if _is_local(name):
            hint = (f"the folder exists but is not a complete diffusers {what} "
                    f"(a pipeline folder has model_index.json and unet/, vae/, text_encoder/ ... subfolders)")
        elif os.path.exists(os.path.expanduser(name)):
            hint = "that path is a file; pass the folder that holds the model"
        else:
            reach = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached or has no such repo"
            hint = (f"it is not a local folder and {reach}; download it once where there is network "
                    f"(huggingface-cli download {name}) and point at that folder, or set HF_HOME to a cache that has it")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load {what} '{name}': {hint} ({type(exc).__name__}: {first[:200]})") from None


def load_components(pretrained_model_name_or_path: str, *, pretrained_vae_model_name_or_path: str | None = None,
                    revision: str | None = None, variant: str | None = None,
                    cache_dir: str | None = None) -> Components:
    """Load tokenizers, both text encoders, VAE (optionally a separate one), UNet and a DDPM noise scheduler, in float32 on CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    name = pretrained_model_name_or_path
    common = dict(revision=revision, cache_dir=cache_dir)
    weights = dict(common, variant=variant, use_safetensors=True)
    with _friendly_errors("SDXL pipeline", name):
        tok1 = AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        tok2 = AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common)
        te1 = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **weights)
        te2 = CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **weights)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        if pretrained_vae_model_name_or_path is None:
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
    if pretrained_vae_model_name_or_path is not None:
        vae = load_vae(pretrained_vae_model_name_or_path, cache_dir=cache_dir)
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(f"'{name}' is not an SDXL model (its UNet has no text_time conditioning); "
                        f"pass an SDXL base model such as {SDXL_BASE}")
    return Components(tok1, tok2, te1, te2, vae, unet, scheduler)


def load_vae(name: str, *, cache_dir: str | None = None, torch_dtype: torch.dtype | None = None):
    """A standalone VAE folder or hub id (the seed uses madebyollin/sdxl-vae-fp16-fix); a pipeline's vae/ also works."""
    from diffusers import AutoencoderKL

    with _friendly_errors("VAE", name):
        kw = dict(cache_dir=cache_dir, use_safetensors=True)
        if torch_dtype is not None:
            kw["torch_dtype"] = torch_dtype
        if _is_local(name) and (Path(name).expanduser() / "vae" / "config.json").exists():
            return AutoencoderKL.from_pretrained(name, subfolder="vae", **kw)
        return AutoencoderKL.from_pretrained(name, **kw)


def load_pipeline(pretrained_model_name_or_path: str = SDXL_BASE, *, pretrained_vae_model_name_or_path: str | None = None,
                  torch_dtype: torch.dtype | None = None, variant: str | None = None, revision: str | None = None,
                  device: str | torch.device | None = None, cache_dir: str | None = None):
    """Load ``StableDiffusionXLPipeline`` (base + optional separate VAE), cast to ``torch_dtype``, moved to ``device``."""
    from diffusers import StableDiffusionXLPipeline

    kw: dict[str, Any] = dict(revision=revision, variant=variant, cache_dir=cache_dir, use_safetensors=True)
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    if pretrained_vae_model_name_or_path is not None:
        kw["vae"] = load_vae(pretrained_vae_model_name_or_path, cache_dir=cache_dir, torch_dtype=torch_dtype)
    with _friendly_errors("SDXL pipeline", pretrained_model_name_or_path):
        pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model_name_or_path, **kw)
    if device is not None:
        pipe.to(device)
    return pipe


def pipeline_from_components(components: Components, *, unet=None, text_encoder_one=None, text_encoder_two=None,
                             scheduler_config: dict | None = None):
    """A ``StableDiffusionXLPipeline`` sharing already-loaded modules (validation during training loads nothing)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    c = components
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config or c.noise_scheduler.config)
    return StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=text_encoder_one or c.text_encoder_one,
        text_encoder_2=text_encoder_two or c.text_encoder_two, tokenizer=c.tokenizer_one, tokenizer_2=c.tokenizer_two,
        unet=unet or c.unet, scheduler=scheduler,
    )
