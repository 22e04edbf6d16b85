"""Images from SDXL + LoRA(s): prompts x seeds x LoRA scales, deterministic, saved with their settings inside.

    python -m billiard_lora.generate --lora outputs/messi_billiard_LoRA      # famous people playing billiards
    python -m billiard_lora.generate --lora RUN --sweep --compare --checkpoints RUN --seeds 0 1 2

Every image comes from its own ``torch.Generator`` seeded with its seed, so an image depends only on (prompt, seed,
settings, LoRA scale), never on what else was generated in the same call.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.nn.utils import parametrize

from .config import same_setting
from .errors import OUT_OF_MEMORY, ArgumentParser, UserError, check_device, cli_entry, out_of_memory_detail
from .hub import download_lora, fetch_embeddings, hub_lora
from .lora import CHECKPOINT_PREFIX, KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, read_metadata
from .models import SDXL_BASE, SDXL_REFINER, SDXL_VAE_FP16_FIX, load_pipeline, store_weights_in_fp8
from .pivotal import find_embeddings, insert_tokens, read_embeddings
from .prompts import refiner_embeddings, too_long, weighted_embeddings
from .viz import image_grid, save_image

DEFAULT_INSTANCE_PROMPT = "a photo of messi playing billiard"  # the seed project's instance prompt
# Who else plays billiards. "{subject}" is the subject of the instance prompt (messi), so the list starts with the
# trained prompt itself and mixes in variations of it.
DEFAULT_SUBJECTS = (
    "{subject}", "cristiano ronaldo", "albert einstein", "taylor swift", "barack obama", "serena williams",
    "{subject} in a tuxedo", "marilyn monroe", "lebron james", "queen elizabeth ii", "{subject} as a cartoon character",
    "an astronaut",
)
DEFAULT_SCALES = (0.0, 0.3, 0.6, 0.9, 1.2)
DEFAULT_STRENGTH = 0.6  # image-to-image: enough noise for the LoRA's subject to appear, the layout kept
DEFAULT_INPAINT_STRENGTH = 0.99  # inpainting: the masked area redrawn almost from noise (diffusers' SDXL default)
DEFAULT_REFINER_START = 0.8  # --refiner: the share of the denoising the base model (and LoRA) does (diffusers' docs)
DEFAULT_HIRES_STRENGTH = 0.5  # --hires_scale: how much of the upscaled image its second pass redraws
DEFAULT_CONTROLNET_SCALE = 0.5  # diffusers' SDXL ControlNet examples' controlnet_conditioning_scale
DEFAULT_IP_SCALE = 0.6  # diffusers' IP-Adapter docs' scale for SDXL: the prompt still has its say
# "a photo of | messi | playing billiard": the first "... of" is the framing, then the subject, then the action.
_SUBJECT_PATTERN = re.compile(r"^(?P<pre>.*?\bof\s+)?(?P<subject>.+?)\s+(?P<rest>playing\s+billiards?\b.*)$",
                              re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def famous_prompts(instance_prompt: str | None = None, n: int = 8) -> list[str]:
    """Up to ``n`` prompts of famous people playing billiards, phrased like the instance prompt (deterministic)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    instance = (instance_prompt or "").strip() or DEFAULT_INSTANCE_PROMPT
    m = _SUBJECT_PATTERN.match(instance)
    if m:
        pre, rest = m["pre"] or "", m["rest"]
        prompts = [f"{pre}{s.format(subject=m['subject'])} {rest}" for s in DEFAULT_SUBJECTS]
    else:  # no subject to swap ("a photo of sks billiard"): keep the trained prompt and add who is playing
        prompts = [instance] + [f"{instance}, {s} playing billiards" for s in DEFAULT_SUBJECTS if "{" not in s]
    return list(dict.fromkeys(prompts))[:n]


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--prompts_file {p} does not exist (expected a text file with one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts_file {p} holds no prompts (one per line; # starts a comment)")
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Loading the pipeline and LoRAs


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to load: a training output folder, a .safetensors file or a Hub repo id, its weight, an adapter name."""

    path: str
    scale: float = 1.0
    name: str | None = None  # adapter name; derived from the path when None
    blocks: tuple[str, ...] = ()  # only its layers in these UNet blocks (``@content``, ``@style``, ``@up_blocks.1``)
    block_weights: tuple[float, ...] = ()  # each block's own weight (``@up_blocks.0=0.5,mid_block``); (): all 1

    @property
    def blocks_text(self) -> str:
        """The @ part as given: ``up_blocks.0=0.5+mid_block`` (for file names and PNG settings)."""
        weights = self.block_weights or (1.0,) * len(self.blocks)
        return "+".join(b if w == 1.0 else f"{b}={w:g}" for b, w in zip(self.blocks, weights))


_BLOCK_NAME = re.compile(r"(unet\.)?(down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)"
                         r"(\.(attentions|resnets|\d+))*|unet|te")  # unet: all of it; te: the text encoders


def parse_lora_arg(text: str) -> LoraSpec:
    """``DIR_OR_FILE_OR_REPO[@BLOCKS][:SCALE]`` -> LoraSpec; the part after the last colon is a scale only if it is a
    number, the part after the last @ blocks only if it is content, style, blora or UNet block names."""
    from .lora import BLORA_PARTS, parse_unet_blocks

    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:  # "C:\\runs\\x" or "run:v2": the colon belongs to the path
            pass
    blocks, weights = [], []
    head, sep, tail = path.rpartition("@")
    items = [item.partition("=") for item in tail.split(",")] if sep else []
    names = [parse_unet_blocks(name) for name, _, _ in items]
    if items and all(len(n) == 1 and (n[0] in BLORA_PARTS or _BLOCK_NAME.fullmatch(n[0])) for n in names):
        for (name, eq, weight), (block,) in zip(items, names):
            try:
                value = float(weight) if eq else 1.0
            except ValueError:
                raise UserError(f"--lora '{text}': the weight of {block} is {weight!r}, not a number; write "
                                f"BLOCK=0.5 (A1111's LoRA block weight), e.g. {head}@up_blocks.0=0.5,mid_block") from None
            for part in BLORA_PARTS.get(block, (block,)):
                blocks.append(part)
                weights.append(value)
        path = head
    if len(set(blocks)) < len(blocks):
        raise UserError(f"--lora '{text}': a block is named twice in the @ part")
    return _nonempty(LoraSpec(path, scale, blocks=tuple(blocks),
                              block_weights=tuple(weights) if any(w != 1.0 for w in weights) else ()), text)


def _nonempty(spec: LoraSpec, text: str) -> LoraSpec:
    if not spec.path.strip():
        raise UserError(f"--lora '{text}': expected DIR_OR_FILE[:SCALE], e.g. outputs/messi_billiard_LoRA:0.8")
    return spec


def resolve_lora_file(path: str | Path) -> Path:
    """The LoRA weights file for a training output / checkpoint folder, a .safetensors file, or a LoRA on the
    Hugging Face Hub (``owner/name``, ``owner/name/FILE.safetensors``: downloaded once into the Hub's cache, read
    from there offline); UserError if none."""
    p = Path(path).expanduser()
    expected = (f"a training output folder holding {LORA_WEIGHT_NAME} (or a checkpoint-N folder), a .safetensors "
                f"file, or a Hugging Face Hub repo (owner/name)")
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            return p / LORA_WEIGHT_NAME
        hint = ""
        others = sorted(f.name for f in p.glob("*.safetensors"))
        steps = _checkpoint_dirs(p)
        if others:
            hint = f"; it holds {', '.join(others[:3])}: pass that file instead"
        elif steps:
            hint = f"; training may not have finished: try {steps[-1][1]}"
        raise UserError(f"LoRA folder {p} has no {LORA_WEIGHT_NAME}: expected {expected}{hint}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"LoRA file {p} is not a .safetensors file: expected {expected} (pickled .bin/.pt "
                            f"files can run code when loaded, so they are not read)")
        _check_is_lora(p)
        return p
    head, colon, tail = str(path).rpartition(":")
    if colon and head and (Path(head).expanduser().exists() or hub_lora(head)):  # "run:abc": not a scale
        raise UserError(f"--lora '{path}': the scale '{tail}' after the colon is not a number; "
                        f"write it as {head}:0.8 (or leave it out for 1.0)")
    hub = hub_lora(str(path))
    if hub is not None:
        file = download_lora(*hub, expected=expected)
        _check_is_lora(file)
        fetch_embeddings(hub[0], file)  # a pivotal-tuning run's token embeddings, beside it in the repo
        return file
    raise UserError(f"LoRA '{path}' does not exist: expected {expected}")


def _check_is_lora(path: Path) -> None:
    """A .safetensors file whose keys are a LoRA's (read from the header alone): a VAE or UNet file given by mistake
    is named as such, not as a LoRA that "does not fit the base model"."""
    from safetensors import safe_open

    from .lora_tools import _detect_format

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types for truncated or foreign files
        raise UserError(f"{path} could not be read as safetensors ({type(exc).__name__}: {str(exc)[:120]})") from None
    from .lycoris import is_lycoris_keys

    if is_lycoris_keys(keys):  # a LoHa/LoKr
        return
    try:
        _detect_format(keys)
    except UserError as exc:
        raise UserError(f"--lora {path} is {exc}") from None


def load_generation_pipeline(model: str = SDXL_BASE, *, vae: str | None = SDXL_VAE_FP16_FIX,
                             loras: Sequence[LoraSpec | str] = (), fuse: bool = False,
                             device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                             fp8_base: bool = False, cuda_graphs: bool = False, cpu_offload: bool = False,
                             vae_tiling: bool | int = False, scheduler: str = "default",
                             files: Sequence[Path] | None = None, refiner: str | None = None,
                             single_file_config: str | None = None,
                             controlnet: str | Sequence[str] | None = None, ip_adapter: str | None = None, ip_image_encoder: str | None = None):
    """SDXL, a separate VAE unless ``vae`` is None, and LoRAs loaded and weighted; cuda/fp16 if present, else cpu/fp32.
    ``model``: a Hub id, a diffusers folder or a single-file checkpoint (its layout from ``single_file_config``).
    ``scheduler``: the sampler, a key of ``SCHEDULERS`` (default: the model's own). ``files``: the LoRA files
    ``resolve_lora_file`` already found for ``loras``, not looked up again.

    ``fuse=True`` merges the weighted LoRAs into the base weights (faster sampling); their scales are then baked in,
    so ``lora_scale``, scale sweeps, base-vs-LoRA and checkpoint grids refuse a fused pipeline.
    ``fp8_base=True`` keeps the UNet's weights (fused LoRAs included) in float8, cast up layer by layer as it
    samples, as training's ``--fp8_base`` does: half the UNet's memory; the UNet reaches ``device`` only once stored
    so. LoRAs loaded later still work, unfused.
    ``cuda_graphs=True``: on a CUDA GPU, ``generate`` records the UNet's forward as a CUDA graph within each call and
    replays it at each denoising step (sampling is otherwise bound by the CPU launching kernels on a fast GPU).

    For GPUs too small to hold SDXL whole (diffusers' own memory savers):
    ``cpu_offload=True`` keeps the models in CPU memory and moves each whole model to ``device`` when it runs (the
    text encoders, then the UNet for all the steps, then the VAE), so the GPU holds the largest of them instead of
    all four (the same images; the moves cost time each image). ``vae_tiling=True`` decodes the latents in
    overlapping 512-px tiles (diffusers' tiled decoder; an int: that tile size in pixels) where the image is larger:
    the decoder's activations shrink to a tile's, the pixels differ slightly where tiles blend.

    ``refiner`` (e.g. ``models.SDXL_REFINER``): SDXL's refiner, sharing the second text encoder and the VAE, finishes
    every image ``generate`` makes, as diffusers' SDXL docs run base and refiner as an ensemble of experts: the base
    model with its LoRAs denoises the first ``refiner_start`` of the steps, the refiner the rest.

    ``controlnet`` (e.g. ``diffusers/controlnet-canny-sdxl-1.0``, or a folder): an SDXL ControlNet, which
    ``generate(control_image=...)`` then follows; several (a list): all of them, each its own control image.
    ``ip_adapter`` (``h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors``, or such a file): an IP-Adapter, whose
    image ``generate(ip_image=...)`` then takes as a second prompt (``attach_ip_adapter``).
    """
    specs = [parse_lora_arg(s) if isinstance(s, str) else s for s in loras]
    # fail on a typo before minutes of model loading
    files = list(files) if files is not None else [resolve_lora_file(s.path) for s in specs]
    check_memory_options(cpu_offload=cpu_offload, cuda_graphs=cuda_graphs, vae_tiling=vae_tiling)
    check_scheduler(scheduler)  # before minutes of model loading
    if refiner and cpu_offload:
        raise UserError("--refiner does not combine with --cpu_offload yet (the two pipelines share the text encoder "
                        "and VAE, which offloading moves for one of them): drop one; --fp8_base and --vae_tiling "
                        "also save memory")
    for flag, given in (("--controlnet", controlnet), ("--ip_adapter", ip_adapter)):
        if given and (cpu_offload or cuda_graphs):
            raise UserError(f"{flag} does not combine with {'--cpu_offload' if cpu_offload else '--cuda_graphs'} "
                            f"yet: drop one (--fp8_base and --vae_tiling also save memory)")
    if ip_adapter:
        ip_adapter_location(ip_adapter)  # a malformed name says so before minutes of loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch_dtype is None:
        torch_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = load_pipeline(model, pretrained_vae_model_name_or_path=vae, torch_dtype=torch_dtype,
                         device="cpu" if fp8_base or cpu_offload else device, single_file_config=single_file_config)
    pipe = prepare_pipeline(pipe, specs, files=files, fuse=fuse, device=device, fp8_base=fp8_base,
                            cuda_graphs=cuda_graphs, cpu_offload=cpu_offload, vae_tiling=vae_tiling,
                            scheduler=scheduler)
    if refiner:
        from .models import load_refiner

        finisher = load_refiner(refiner, pipe, torch_dtype=torch_dtype).to(device)
        set_scheduler(finisher, scheduler)
        finisher.set_progress_bar_config(disable=True)
        pipe.billiard_refiner, pipe.billiard_refiner_name = finisher, refiner
    if controlnet:
        attach_controlnet(pipe, controlnet, torch_dtype=torch_dtype, device=device)
    if ip_adapter:
        attach_ip_adapter(pipe, ip_adapter, image_encoder=ip_image_encoder)
    return pipe


def ip_adapter_location(spec: str) -> tuple[str, str, str]:
    """(folder or repo id, subfolder, file) of an IP-Adapter's weights: a local .safetensors file, or
    ``owner/name/SUBFOLDER/FILE.safetensors`` on the Hub (h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors)."""
    path = Path(spec).expanduser()
    if path.suffix == ".bin":
        raise UserError(f"--ip_adapter {spec}: a .bin file is a pickle, which can run code when loaded; take the "
                        f".safetensors file beside it (h94/IP-Adapter has both)")
    if path.is_file():
        return str(path.parent), "", path.name
    parts = spec.split("/")
    if path.suffix == ".safetensors" and len(parts) >= 3 and not spec.startswith(("/", ".", "~")):
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    raise UserError(f"--ip_adapter {spec}: give the IP-Adapter's .safetensors file, a local one or on the Hub as "
                    f"owner/name/SUBFOLDER/FILE, e.g. h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors")


def attach_ip_adapter(pipe, spec: str, *, image_encoder: str | None = None):
    """Load an IP-Adapter onto ``pipe`` through diffusers' ``load_ip_adapter``: its image projection and each
    cross-attention's image keys and values, and the CLIP image encoder (``image_encoder``: a folder or Hub id;
    default: ``image_encoder/`` beside the weights, as h94/IP-Adapter lays them out). ``generate(ip_image=...)``
    then prompts with a picture as well as words. LoRAs loaded before or after work alongside."""
    from .models import _friendly_errors

    if _is_offloaded(pipe) or getattr(pipe, "billiard_cuda_graphs", False):
        raise UserError("--ip_adapter does not combine with --cpu_offload or --cuda_graphs yet: drop one")
    folder, subfolder, weight_name = ip_adapter_location(spec)
    if image_encoder is not None and getattr(pipe, "image_encoder", None) is None:
        from .models import load_image_encoder

        encoder = load_image_encoder(image_encoder, torch_dtype=pipe.text_encoder_2.dtype)
        pipe.register_modules(image_encoder=encoder.to(pipe.unet.device))
    with _friendly_errors("IP-Adapter", folder), _quiet_loading():
        try:
            pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight_name)
        except (KeyError, RuntimeError) as exc:  # weights of another model's layout (an SD 1.5 IP-Adapter)
            raise UserError(f"--ip_adapter {spec} does not fit this model ({_first_line(exc)}): take one made for "
                            f"SDXL (h94/IP-Adapter/sdxl_models/...)") from None
    pipe.billiard_ip_adapter = spec
    return pipe


def attach_controlnet(pipe, controlnet: str | Sequence[str], *, torch_dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None):
    """Load an SDXL ControlNet (a Hub id or folder) for ``pipe``, which ``generate(control_image=...)`` then follows;
    in the UNet's dtype and on its device unless given. UserError for one made for another model (SD 1.5's).
    Several (a list, e.g. a canny and a depth ControlNet): diffusers' ``MultiControlNetModel``, whose residuals add
    up; ``generate`` then takes one control image for each, in the same order."""
    from .models import load_controlnet

    if _is_offloaded(pipe) or getattr(pipe, "billiard_cuda_graphs", False):
        raise UserError("--controlnet does not combine with --cpu_offload or --cuda_graphs yet: drop one (--fp8_base "
                        "and --vae_tiling also save memory)")
    names = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
    nets = []
    for name in names:
        # the pipeline's compute dtype: the text encoders' (the UNet's may be float8 storage, --fp8_base)
        net = load_controlnet(name, torch_dtype=torch_dtype or pipe.text_encoder_2.dtype)
        if net.config.get("addition_embed_type") != "text_time" or \
                net.config.get("cross_attention_dim") != pipe.unet.config.cross_attention_dim:
            raise UserError(f"--controlnet {name} is not an SDXL ControlNet (cross-attention width "
                            f"{net.config.get('cross_attention_dim')}, SDXL's is "
                            f"{pipe.unet.config.cross_attention_dim}): take one made for SDXL, e.g. "
                            f"diffusers/controlnet-canny-sdxl-1.0")
        nets.append(net.to(device or pipe.unet.device))
    if len(nets) == 1:
        pipe.billiard_controlnet = nets[0]
    else:
        from diffusers import MultiControlNetModel

        pipe.billiard_controlnet = MultiControlNetModel(nets)
    pipe.billiard_controlnet_name = ", ".join(map(str, names))
    pipe.billiard_controlnet_count = len(nets)
    return pipe


def prepare_pipeline(pipe, loras: Sequence[LoraSpec | str] = (), *, files: Sequence[Path] | None = None,
                     fuse: bool = False, device: str | torch.device = "cpu", fp8_base: bool = False,
                     cuda_graphs: bool = False, cpu_offload: bool = False, vae_tiling: bool | int = False,
                     scheduler: str = "default"):
    """What ``load_generation_pipeline`` does to a loaded SDXL pipeline (e.g. one built in code), in place.

    Models stored in float8 or offloaded should arrive in CPU memory (a GPU might not hold them meanwhile)."""
    specs = [parse_lora_arg(s) if isinstance(s, str) else s for s in loras]
    files = list(files) if files is not None else [resolve_lora_file(s.path) for s in specs]
    check_memory_options(cpu_offload=cpu_offload, cuda_graphs=cuda_graphs, vae_tiling=vae_tiling)
    set_scheduler(pipe, scheduler)
    for spec, file in zip(specs, files):
        load_lora(pipe, spec, file=file, activate=False)
    if specs:
        names = [s.name for s in pipe.billiard_loras.values()]
        pipe.set_adapters(names, adapter_weights=[s.scale for s in pipe.billiard_loras.values()])
        if fuse:
            fuse_loras(pipe)
    if fp8_base:
        store_weights_in_fp8(pipe.unet.requires_grad_(False), pipe.unet.dtype)  # (only frozen weights go to float8)
    if vae_tiling:
        enable_vae_tiling(pipe.vae, DEFAULT_VAE_TILE if vae_tiling is True else int(vae_tiling))
    if cpu_offload:
        # (diffusers' enable_sequential_cpu_offload, layer by layer, is not offered: with accelerate 1.15 and
        # transformers 5.23 it fails in the CLIP text encoders' embeddings, tried on the CPU)
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.billiard_cuda_graphs = cuda_graphs
    return pipe


DEFAULT_VAE_TILE = 512  # pixels; SDXL's own VAE config says 1024, i.e. no tiling at SDXL's usual size

# --scheduler: the samplers as A1111 / ComfyUI name them, as diffusers builds them (diffusers' scheduler docs);
# "default" is the model's own (SDXL base: Euler)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # few-step LoRAs stacked with yours: LCM-LoRA (latent-consistency/lcm-lora-sdxl: 4-8 steps, --guidance 1-2),
    # SDXL-Lightning / DMD2 (their model cards: Euler with trailing timesteps, --guidance 0), Hyper-SD and TCD (TCD)
    "lcm": ("LCMScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "tcd": ("TCDScheduler", {}),
}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        from .config import _closest

        raise UserError(f"unknown scheduler {name!r}{_closest(name, SCHEDULERS)}; choose one of "
                        f"{', '.join(SCHEDULERS)}")


def set_scheduler(pipe, name: str = "default") -> None:
    """Sample with the scheduler ``name`` (a key of ``SCHEDULERS``), built from the model's own scheduler config, so
    that its training schedule (betas, timestep spacing, prediction type) stays the model's; "default" puts the
    model's own back."""
    import diffusers

    check_scheduler(name)
    if not hasattr(pipe, "billiard_scheduler_config"):  # the model's own, kept before the first change
        pipe.billiard_scheduler_config = (type(pipe.scheduler), dict(pipe.scheduler.config))
    own_class, config = pipe.billiard_scheduler_config
    class_name, kw = SCHEDULERS[name]
    cls = getattr(diffusers, class_name) if class_name else own_class
    pipe.scheduler = cls.from_config(config, **kw)
    pipe.billiard_scheduler = name


def enable_vae_tiling(vae, tile: int = DEFAULT_VAE_TILE) -> None:
    """diffusers' tiled decoding with tiles of ``tile`` pixels (overlapping by diffusers' quarter, blended).

    diffusers takes the tile size from the VAE's config (``sample_size``): 1024 px for SDXL's VAE, so 1024-px images
    would not be tiled at all; the tile size is set here instead."""
    vae.enable_tiling()
    if hasattr(vae, "tile_sample_min_size") and hasattr(vae, "tile_latent_min_size"):
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def check_memory_options(*, cpu_offload: bool, cuda_graphs: bool, vae_tiling: bool | int = False) -> None:
    if cpu_offload and cuda_graphs:
        raise UserError("--cuda_graphs cannot be combined with --cpu_offload: a CUDA graph keeps the UNet's weights "
                        "where it recorded them, offloading moves them; drop one of the two")
    if vae_tiling and vae_tiling is not True and (int(vae_tiling) < 64 or int(vae_tiling) % 64):
        raise UserError(f"--vae_tiling takes a tile size in pixels, a multiple of 64 (e.g. 512), got {vae_tiling}")


def _is_offloaded(pipe) -> bool:
    return any(hasattr(m, "_hf_hook") for m in pipe.components.values() if isinstance(m, torch.nn.Module))


@contextlib.contextmanager
def _offload_lifted(pipe) -> Iterator[None]:
    """No offload hooks for the duration, then offloading again to the same device.

    diffusers lifts them itself while loading a LoRA, but puts them back for the default accelerator, which fails
    where there is none (a CPU run) and would pick the wrong one on a machine with several kinds."""
    device = getattr(pipe, "_offload_device", None) if _is_offloaded(pipe) else None
    if device is None:
        yield
        return
    pipe.remove_all_hooks()
    try:
        yield
    finally:
        pipe.enable_model_cpu_offload(device=device)


def fuse_loras(pipe) -> None:
    """Merge the active LoRAs, at their weights, into the base weights and drop the adapter modules.

    Sampling then runs exactly the base model's computation (peft's wrappers, even merged, add per-layer work);
    what was fused is remembered for the images' metadata, and scale changes are refused from then on.
    """
    if _is_fp8(pipe):
        raise UserError("the UNet is stored in float8 (fp8_base): fuse the LoRAs before that, e.g. "
                        "load_generation_pipeline(..., fuse=True, fp8_base=True)")
    loras = active_loras(pipe)
    # fuse_lora merges each adapter at its current scaling, i.e. with the set_adapters weights.
    pipe.fuse_lora(adapter_names=[s.name for s in loras], lora_scale=1.0)
    pipe.billiard_fused_loras = loras
    with _quiet_loading():
        pipe.unload_lora_weights()  # the merged weights stay
    pipe.billiard_loras = {}


def load_lora(pipe, spec: LoraSpec, *, file: Path | None = None, activate: bool = True) -> str:
    """Load one LoRA as a named adapter, the only active one if ``activate``; UserError if it does not fit the model."""
    file = file or resolve_lora_file(spec.path)
    from .lycoris import is_lycoris_keys

    keys = _lora_keys(file)
    expected, lycoris = _count_lora_layers(keys), is_lycoris_keys(keys)
    taken = {n for names in pipe.get_list_adapters().values() for n in names}
    name = _unique_name(spec.name or _default_name(file), taken)
    try:
        with _quiet_loading(), _offload_lifted(pipe):
            if lycoris:  # LoHa/LoKr: diffusers' SDXL loader reads none; ours makes it a peft adapter like a LoRA's
                from .lycoris import load_lycoris

                load_lycoris(pipe, file, name)
            else:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch / no module matches / not LoRA keys
        raise _does_not_fit(pipe, file, _first_line(exc)) from None
    loaded = _count_loaded_layers(pipe, name, lycoris=lycoris)
    if loaded == 0 or loaded < expected:  # diffusers only warns when part of a LoRA finds no module to attach to
        unload_lora(pipe, name)
        reason = (f"only {loaded} of its {expected} LoRA layers exist in this model" if loaded
                  else "none of its LoRA layers exist in this model")
        raise _does_not_fit(pipe, file, reason)
    if spec.blocks and not keep_blocks(pipe, name, spec.blocks, spec.block_weights):
        unload_lora(pipe, name)
        raise UserError(f"--lora {spec.path}@{spec.blocks_text}: none of its layers lies in "
                        f"{', '.join(spec.blocks)}{' at a weight above 0' if spec.block_weights else ''} ({loaded} "
                        f"layers elsewhere); leave out the @ part to use them")
    if not hasattr(pipe, "billiard_loras"):
        pipe.billiard_loras = {}  # adapter name -> LoraSpec: the weights set_adapters was given, for restoring
    pipe.billiard_loras[name] = LoraSpec(str(spec.path), spec.scale, name, spec.blocks, spec.block_weights)
    embeddings = find_embeddings(file)
    if embeddings is not None:  # trained with --train_text_encoder_ti: its tokens come with it while it is active
        # read once, here (a damaged file says so now, not at the first image); a few KB, kept for each activation
        pipe.billiard_embeddings = {**getattr(pipe, "billiard_embeddings", {}), name: (embeddings,
                                                                                      *read_embeddings(embeddings))}
    if activate:
        pipe.set_adapters([name], adapter_weights=[spec.scale])
    return name


def keep_blocks(pipe, name: str, blocks: Sequence[str], weights: Sequence[float] = ()) -> int:
    """Adapter ``name`` keeps only its layers inside these UNet blocks (diffusers' or the original UNet's names; a
    B-LoRA's content or style block): the others, its text-encoder layers too, are taken off their modules, as the
    B-LoRA loaders of diffusers' docs and ComfyUI filter the file; ``unet`` names all of the UNet, ``te`` the text
    encoders. ``weights``: each block's own (A1111's LoRA Block Weight), multiplied into its layers' ΔW (0: taken
    off too). Returns how many layers stay."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .lora import block_of
    from .lora_tools import _sgm_names

    sgm = _sgm_names([n for n, _ in pipe.unet.named_modules()])
    kept = 0
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for module_name, module in model.named_modules() if model is not None else ():
            if not isinstance(module, BaseTunerLayer) or not any(
                    name in getattr(module, attr, {}) for attr in module.adapter_layer_names):  # (LoKr: w1 or w1_a)
                continue
            if component != "unet":  # "te" names the text encoders (A1111's block weights' first, BASE)
                block = "te" if "te" in blocks else None
            else:
                # the block named for it, else "unet" where that is given (a block's own weight wins)
                block = block_of(module_name, list(blocks), sgm) or ("unet" if "unet" in blocks else None)
            weight = weights[list(blocks).index(block)] if block is not None and weights else 1.0
            if block is not None and weight != 0.0:
                if weight != 1.0:
                    _scale_adapter_layer(module, name, weight, module_name)
                kept += 1
                continue
            with warnings.catch_warnings():  # "Adapter X was active which is now deleted": set_adapters follows
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                module.delete_adapter(name)
    return kept


def _scale_adapter_layer(module, name: str, weight: float, module_name: str) -> None:
    """Multiply one adapted layer's ΔW by ``weight``, in the factor it is linear in: LoRA's B, LoHa's first
    Hadamard factor (w1_a), LoKr's first Kronecker factor (w1, or its w1_a)."""
    if name in getattr(module, "lora_magnitude_vector", {}):
        raise UserError(f"a block weight other than 0 or 1 scales a LoRA's ΔW, which a DoRA's normalised magnitude "
                        f"undoes ({module_name}): give its blocks 0 or 1")
    for attr in ("lora_B", "hada_w1_a", "lokr_w1", "lokr_w1_a"):
        holder = getattr(module, attr, {})
        if name in holder:
            target = holder[name]
            with torch.no_grad():
                (target.weight if hasattr(target, "weight") else target).mul_(weight)
            return
    raise UserError(f"internal: no factor to weight in {module_name} ({type(module).__name__})")


def sync_embeddings(pipe, *, lora_scale: float | None = None) -> None:
    """The text encoders hold the token embeddings (pivotal tuning) of exactly the LoRAs now active: another
    LoRA's come out, these go in; at ``lora_scale`` 0 (the base model's images) none. Two active LoRAs whose tokens
    share a name cannot both be (one line)."""
    known = getattr(pipe, "billiard_embeddings", {})  # adapter name -> (file, rows per encoder, tokens)
    loaded: dict[str, dict] = getattr(pipe, "billiard_tokens", {})
    active = active_loras(pipe) if lora_scale != 0 else []
    wanted = {s.name: known[s.name] for s in active if s.name in known}
    for name in [n for n in loaded if n not in wanted]:
        _unload_tokens(pipe, loaded.pop(name))
    for name, (path, state, mapping) in wanted.items():
        if name in loaded:
            continue
        tokens = [t for v in mapping.values() for t in v]
        clash = next(((other, t) for other, m in loaded.items() for v in m.values() for t in v if t in tokens), None)
        if clash:
            raise UserError(f"LoRAs {name} and {clash[0]} both bring the token {clash[1]} of their pivotal tuning: "
                            f"generate with one of them at a time")
        if any(t in pipe.tokenizer.get_vocab() for t in tokens):
            raise UserError(f"{path}: this pipeline's tokenizer already has a token of {''.join(tokens)} (loaded "
                            f"outside billiard-lora): load the LoRA into a fresh pipeline")
        with _quiet_loading():
            for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                pipe.load_textual_inversion(state[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer)
        loaded[name] = mapping
    pipe.billiard_tokens = loaded


def _unload_tokens(pipe, mapping: dict) -> None:
    tokens = [t for v in mapping.values() for t in v]
    with _quiet_loading():
        pipe.unload_textual_inversion(tokens, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion(tokens, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


def unload_lora(pipe, name: str) -> None:
    """Delete one adapter (and its record, and any token embeddings it brought) so the next LoRA loaded does not
    stack on it."""
    with _quiet_loading():  # peft warns which adapter it activates instead; callers set the active ones
        pipe.delete_adapters(name)
    getattr(pipe, "billiard_loras", {}).pop(name, None)
    getattr(pipe, "billiard_embeddings", {}).pop(name, None)
    mapping = getattr(pipe, "billiard_tokens", {}).pop(name, None)
    if mapping:
        _unload_tokens(pipe, mapping)


def with_tokens(pipe, text: str | None) -> str | None:
    """A prompt as the pipeline is given it: each --token_abstraction of an active LoRA's pivotal tuning (``TOK``)
    replaced by its tokens (``<s0><s1>``), once ``sync_embeddings`` has put them in."""
    for mapping in getattr(pipe, "billiard_tokens", {}).values():
        text = insert_tokens(text, mapping)
    return text


def active_loras(pipe) -> list[LoraSpec]:
    """The LoRAs shaping this pipeline's images now, with their own scales (1.0 for adapters loaded elsewhere)."""
    known = getattr(pipe, "billiard_loras", {})
    names = pipe.get_active_adapters()
    return list(getattr(pipe, "billiard_fused_loras", [])) + [known.get(n) or LoraSpec("", 1.0, n) for n in names]


def _lora_keys(file: Path) -> list[str]:
    """The tensor names of a LoRA file, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise UserError(f"LoRA file {file} cannot be read as safetensors ({_first_line(exc)})") from None


def _count_lora_layers(keys: list[str]) -> int:
    """How many adapted layers a LoRA file's keys describe (one down/A matrix each), in diffusers, peft or kohya
    naming, or LyCORIS' (LoHa, LoKr)."""
    from .lycoris import count_layers, is_lycoris_keys

    if is_lycoris_keys(keys):
        return count_layers(keys)
    return sum(k.endswith(("lora.down.weight", "lora_down.weight", "lora_A.weight")) for k in keys)


def _count_loaded_layers(pipe, name: str, *, lycoris: bool = False) -> int:
    if lycoris:
        from .lycoris import count_loaded

        return count_loaded(pipe, name)
    modules = (getattr(pipe, c, None) for c in ("unet", "text_encoder", "text_encoder_2"))
    return sum(1 for m in modules if m is not None for layer in m.modules()
               if isinstance(getattr(layer, "lora_A", None), torch.nn.ModuleDict) and name in layer.lora_A)


def _does_not_fit(pipe, file: Path, reason: str) -> UserError:
    base = getattr(pipe.config, "_name_or_path", None) or "this pipeline"
    return UserError(f"LoRA {file} does not fit the base model '{base}' ({reason}); {_trained_on(file)}")


def _trained_on(file: Path) -> str:
    """Which base model the LoRA's own metadata names (ours, then kohya's keys)."""
    from safetensors import safe_open

    try:
        name = read_metadata(file).get("pretrained_model_name_or_path")
        if not name:
            with safe_open(str(file), framework="pt") as f:
                header = f.metadata() or {}
            name = header.get("ss_sd_model_name") or header.get("ss_base_model_version")
    except Exception:  # unreadable metadata only loses the hint
        name = None
    return f"its metadata says it was trained on '{name}'" if name else "its metadata does not name a base model"


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers'/peft's loading chatter ("No LoRA keys ... text_encoder"): we check what loaded ourselves."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    level, t_level = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    transformers_logging.set_verbosity(logging.CRITICAL)  # (resizing the embeddings for textual inversion)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)
        transformers_logging.set_verbosity(t_level)


def _default_name(file: Path) -> str:
    # A training run's file is named pytorch_lora_weights*: the run's folder says more about it; one from the Hub's
    # cache (.../models--owner--name/snapshots/<commit>/...) is named after its repo.
    repo = next((d.name for d in file.parents if d.name.startswith("models--")), None)
    stem = (repo.split("--")[-1] if repo and file.name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)
            else file.parent.name if file.name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME) else file.stem)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"


def _unique_name(name: str, taken: set[str]) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not contain dots.
    name, candidate, i = name.replace(".", "_"), name.replace(".", "_"), 2
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch's load_state_dict error starts with "Error(s) in loading state_dict for X:"; the mismatch follows.
    line = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)
    return re.sub(r"torch\.Size\((\[.*?\])\)", r"\1", line)[:240]


# ----------------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GeneratedImage:
    """One image and everything needed to make it again."""

    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    lora_scale: float | None  # multiplier on every LoRA's own weight; None when no LoRA is active
    lora_names: tuple[str, ...]
    width: int
    height: int
    lora_weights: tuple[float, ...] = ()  # each LoRA's own weight, in lora_names order
    model: str = ""
    fused: bool = False  # LoRAs merged into the weights at load time
    fp8_base: bool = False  # the UNet's weights stored in float8 (load_generation_pipeline(fp8_base=True))
    vae_tiling: int = 0  # the tile size in pixels where the VAE decoded this image in tiles (vae_tiling=...), else 0
    scheduler: str = "default"  # the sampler (set_scheduler), a key of SCHEDULERS
    prompt_weighting: bool = False  # encoded by compel: weights read, long prompts whole (billiard_lora.prompts)
    init_image: str = ""  # image-to-image: the starting image (its file name, or "in-memory image"); "" for text only
    mask_image: str = ""  # inpainting: the mask (white: redrawn) with init_image; "" for none
    strength: float | None = None  # image-to-image: how much of the starting image is noised away (0-1)
    refiner: str = ""  # the SDXL refiner that finished the image, "" for none
    refiner_start: float | None = None  # where the refiner took over (a share of the denoising)
    hires_scale: float | None = None  # A1111's hires fix: upscaled by this, then redrawn by image-to-image
    hires_strength: float | None = None  # ... at this strength
    guidance_rescale: float = 0.0  # the guided prediction's spread rescaled toward the conditional one's (0: not)
    controlnet: str = ""  # the ControlNet(s) that steered the image (comma-separated), "" for none
    control_image: str = ""  # ... what each followed (its file name, or "in-memory image")
    controlnet_scale: float | str | None = None  # ... how strongly (controlnet_conditioning_scale; "a, b" for several)
    canny: bool = False  # ... the control image's Canny edges rather than the image itself
    control_end: float | None = None  # ... for this share of the steps
    ip_adapter: str = ""  # the IP-Adapter that took ip_image as a prompt, "" for none
    ip_image: str = ""  # ... the picture (its file name, or "in-memory image")
    ip_scale: float | None = None  # ... how strongly

    def metadata(self) -> dict[str, str]:
        """Settings as PNG text chunks (all strings; empty where not applicable)."""
        values: dict[str, Any] = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
            guidance_scale=self.guidance_scale, lora_scale=self.lora_scale, lora_names=",".join(self.lora_names),
            lora_weights=",".join(f"{w:g}" for w in self.lora_weights), width=self.width, height=self.height,
            model=self.model, fused=self.fused, fp8_base=self.fp8_base, vae_tiling=self.vae_tiling,
            scheduler=self.scheduler, prompt_weighting=self.prompt_weighting, init_image=self.init_image,
            mask_image=self.mask_image, strength=self.strength, refiner=self.refiner, refiner_start=self.refiner_start,
            hires_scale=self.hires_scale, hires_strength=self.hires_strength, guidance_rescale=self.guidance_rescale,
            controlnet=self.controlnet,
            control_image=self.control_image, controlnet_scale=self.controlnet_scale, canny=self.canny,
            control_end=self.control_end, ip_adapter=self.ip_adapter, ip_image=self.ip_image,
            ip_scale=self.ip_scale,
        )
        return {k: "" if v is None else str(v) for k, v in values.items()}


def generate(pipe, prompts: str | Sequence[str], seeds: int | Sequence[int], *, negative_prompt: str | None = None,
             num_inference_steps: int = 30, guidance_scale: float = 5.0, height: int | None = None,
             width: int | None = None, lora_scale: float | None = None, progress: bool = True,
             cuda_graphs: bool | None = None, prompt_weighting: bool = False,
             init_image: str | Path | Image.Image | None = None, strength: float | None = None,
             mask_image: str | Path | Image.Image | None = None,
             refiner_start: float = DEFAULT_REFINER_START, hires_scale: float | None = None,
             hires_strength: float = DEFAULT_HIRES_STRENGTH,
             control_image: str | Path | Image.Image | Sequence[str | Path | Image.Image] | None = None,
             controlnet_scale: float | Sequence[float] = DEFAULT_CONTROLNET_SCALE, canny: bool = False,
             control_end: float = 1.0, guidance_rescale: float = 0.0,
             ip_image: str | Path | Image.Image | None = None,
             ip_scale: float = DEFAULT_IP_SCALE) -> list[GeneratedImage]:
    """One image per (prompt, seed), prompts outer, seeds inner; ``lora_scale`` multiplies each active LoRA's weight.

    ``cuda_graphs`` (default: what ``load_generation_pipeline`` was given): on a CUDA GPU, the UNet's forward is
    recorded once as a CUDA graph in this call and replayed at every later denoising step (the same images).
    ``prompt_weighting``: the prompts are encoded by compel (``billiard_lora.prompts``): whole, however long, in
    75-token chunks, with weights such as ``(green felt:1.3)`` or ``billiard++``; without it a prompt is cut at 77
    tokens (a warning says which).
    ``init_image`` (a file or PIL image): image-to-image, as A1111's img2img: the image, fitted to ``height`` x
    ``width`` (by default the SDXL bucket nearest its shape at the model's resolution), is encoded, noised by
    ``strength`` (1: all of it, the image only sets the size) and denoised with the prompt, through diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` on the same models, LoRAs included (``strength`` x ``num_inference_steps``
    denoising steps; ``strength`` defaults to 0.6).
    ``mask_image`` with ``init_image``: inpainting, through diffusers' ``StableDiffusionXLInpaintPipeline`` on the
    same models: where the mask is white the picture is redrawn with the prompt and the LoRA (``strength`` defaults
    to 0.99 there), elsewhere its pixels are kept as they were (pasted back, as A1111 keeps them).
    With a refiner loaded (``load_generation_pipeline(refiner=...)``), the base model denoises the first
    ``refiner_start`` of the steps and hands its latents to the refiner, which finishes them.
    ``hires_scale`` (A1111's "hires. fix"): each finished image is upscaled by that factor (Lanczos, to multiples of
    8 pixels) and redrawn at ``hires_strength`` by image-to-image with the LoRA, for detail at sizes beyond what
    the model composes well in one pass.
    ``control_image`` with a ControlNet loaded (``load_generation_pipeline(controlnet=...)``): the image follows it
    (its edges, a pose, depth: what the ControlNet was trained on) at ``controlnet_scale``, through diffusers'
    ``StableDiffusionXLControlNetPipeline`` on the same models, LoRAs included; ``canny``: the control is the
    picture's Canny edges (OpenCV, thresholds 100 and 200 as diffusers' docs), for a canny ControlNet given a photo.
    ``control_end`` (A1111's "ending control step"): the share of the steps the ControlNet steers; the rest are free
    to refine details (diffusers' ``control_guidance_end``).
    ``ip_image`` with an IP-Adapter loaded (``load_generation_pipeline(ip_adapter=...)``): a picture as a second
    prompt, at ``ip_scale`` (diffusers' ``set_ip_adapter_scale``; 0.6 by default, the words still count).
    ``guidance_rescale`` (A1111's CFG rescale; arXiv 2305.08891 section 3.4, 0.7 there): the guided noise prediction
    rescaled toward the conditional one's standard deviation, against the over-exposure strong guidance gives a
    zero-terminal-SNR / v-prediction model.
    """
    from tqdm.auto import tqdm

    from .graphs import sampling_graphs

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError("give at least one non-empty prompt")
    _check_settings(seeds, num_inference_steps, height, width)
    # SDXL zeroes the unconditional embedding only for None; "" would encode an empty prompt instead.
    negative_prompt = negative_prompt or None
    run, image_kw, init_name = pipe, {}, ""
    refiner = getattr(pipe, "billiard_refiner", None)
    if refiner is not None and not 0.0 < refiner_start < 1.0:
        raise UserError(f"--refiner_start={refiner_start} must be in (0, 1): the share of the steps the base model "
                        f"(with the LoRA) takes before the refiner (0.8 is diffusers' example)")
    if hires_scale is not None:
        check_hires(hires_scale, hires_strength, num_inference_steps)
        upscaler = image_to_image(pipe)
    if mask_image is not None and init_image is None:
        raise UserError("--mask_image marks what to redraw in --init_image: add --init_image FILE")
    if mask_image is not None and refiner is not None:
        raise UserError("--mask_image (inpainting) does not combine with --refiner yet: drop one")
    if strength is None:
        strength = DEFAULT_INPAINT_STRENGTH if mask_image is not None else DEFAULT_STRENGTH
    start = mask = control = None
    controlnet = getattr(pipe, "billiard_controlnet", None)
    if control_image is not None or controlnet is not None:
        given = [] if control_image is None else list(control_image) if isinstance(control_image, (list, tuple)) \
            else [control_image]
        scales = [float(s) for s in (controlnet_scale if isinstance(controlnet_scale, (list, tuple))
                                     else [controlnet_scale])]
        for one in scales:
            check_control(controlnet is not None, bool(given), one)
        count = getattr(pipe, "billiard_controlnet_count", 1)
        check_control_counts(count, len(given), len(scales))
        controls = []
        for picture in given:  # the first fixes the size the others are fitted to
            fitted = fit_init_image(pipe, picture, height, width)
            height, width = fitted.height, fitted.width
            controls.append(canny_edges(fitted) if canny else fitted)
        control = controls[0] if count == 1 else controls
        control_scale = scales[0] if count == 1 else scales * count if len(scales) == 1 else scales
        run = controlnet_pipeline(pipe)
        if not 0.0 < control_end <= 1.0:
            raise UserError(f"--control_end={control_end} must be in (0, 1]: the share of the steps the ControlNet "
                            f"steers (1: all of them)")
        image_kw = dict(image=control, controlnet_conditioning_scale=control_scale, height=height,
                        width=width, control_guidance_end=float(control_end))
    elif canny:
        raise UserError("--canny turns --control_image into edges for a ControlNet: add --controlnet and "
                        "--control_image, or drop --canny")
    if init_image is not None:
        check_strength(strength, num_inference_steps)
        start = fit_init_image(pipe, init_image, height, width)
        if control is not None:  # ControlNet image-to-image: the picture noised, the control image steering
            run = controlnet_pipeline(pipe, image_to_image=True)
            image_kw = dict(image_kw, image=start, control_image=control, strength=strength)
        else:
            run, image_kw = image_to_image(pipe), dict(image=start, strength=strength)
        if mask_image is not None:  # the mask fitted as the picture is, white where it is redrawn
            mask = fit_init_image(pipe, mask_image, start.height, start.width).convert("L")
            run = controlnet_pipeline(pipe, inpaint=True) if control is not None else image_to_image(pipe, inpaint=True)
            image_kw = dict(image_kw, mask_image=mask, height=start.height, width=start.width)
        height, width = start.height, start.width  # (the image-to-image pipeline takes its size from the image)
        init_name = Path(init_image).name if not isinstance(init_image, Image.Image) else "in-memory image"
    pipe.set_progress_bar_config(disable=True)  # one bar over images below, not one per image
    loras = active_loras(pipe)
    fused = _is_fused(pipe)
    fp8 = _is_fp8(pipe)
    recorded_scale = (1.0 if lora_scale is None else lora_scale) if loras else None
    results = []
    if cuda_graphs is None:
        cuda_graphs = getattr(pipe, "billiard_cuda_graphs", False)
    ip_kw, ip_picture = {}, None
    if ip_image is not None or getattr(pipe, "billiard_ip_adapter", None):
        check_ip(bool(getattr(pipe, "billiard_ip_adapter", None)), ip_image is not None, ip_scale)
        from .data import load_image

        ip_picture = ip_image if isinstance(ip_image, Image.Image) else load_image(ip_image)
        pipe.set_ip_adapter_scale(float(ip_scale))
        ip_kw = dict(ip_adapter_image=ip_picture)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise UserError(f"--guidance_rescale={guidance_rescale} must be in [0, 1] (0.7 is the paper's, 0 is off)")
    if guidance_rescale and control is not None:
        raise UserError("--guidance_rescale does not combine with --controlnet (diffusers' SDXL ControlNet pipeline "
                        "has no such setting): drop one")
    if cuda_graphs and control is not None:
        raise UserError("--cuda_graphs does not combine with --controlnet yet (the UNet then takes the ControlNet's "
                        "residuals): drop one")
    if not prompt_weighting:
        for text, n in too_long(pipe, dict.fromkeys([*prompts, negative_prompt])):
            warnings.warn(f"prompt {text[:40]!r}... is {n} tokens: SDXL's text encoders read "
                          f"{pipe.tokenizer.model_max_length}, the rest is cut off; --prompt_weighting "
                          f"(prompt_weighting=True) encodes all of it, in chunks", stacklevel=2)
    with _lora_scale(pipe, loras, lora_scale), sampling_graphs(pipe.unet, cuda_graphs):
        sync_embeddings(pipe, lora_scale=lora_scale)  # the active LoRAs' token embeddings (pivotal tuning) only
        jobs = [(p, s) for p in prompts for s in seeds]
        encoded: dict[tuple[str, bool], dict] = {}  # (prompt, for the refiner) -> the text inputs, made once

        def text_inputs(prompt: str, for_refiner: bool = False) -> dict:
            if (prompt, for_refiner) not in encoded:
                text, negative = with_tokens(pipe, prompt), with_tokens(pipe, negative_prompt)
                encode = refiner_embeddings if for_refiner else weighted_embeddings
                encoded[prompt, for_refiner] = encode(refiner if for_refiner else pipe, text, negative) \
                    if prompt_weighting else dict(prompt=text, negative_prompt=negative)
            return encoded[prompt, for_refiner]

        for prompt, seed in tqdm(jobs, desc="images", unit="image", disable=not progress):
            # A CPU generator per image: the same seed gives the same starting noise on any GPU or CPU, and an
            # image never depends on the ones generated before it.
            generator = torch.Generator("cpu").manual_seed(seed)
            try:
                common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=generator, **({"guidance_rescale": guidance_rescale} if guidance_rescale else {}))
                size = {} if image_kw else dict(height=height, width=width)
                if refiner is None:
                    image = run(**text_inputs(prompt), **image_kw, **common, **size, **ip_kw).images[0]
                    if mask is not None:  # the unmasked pixels exactly as they were
                        image = run.image_processor.apply_overlay(mask, start, image)
                else:  # base (and LoRA) for the noisy part, then the refiner on its latents
                    latents = run(**text_inputs(prompt), **image_kw, **common, **size, **ip_kw,
                                  denoising_end=refiner_start, output_type="latent").images
                    image = refiner(**text_inputs(prompt, for_refiner=True), image=latents,
                                    denoising_start=refiner_start, **common).images[0]
                if hires_scale is not None:  # the same generator goes on: the image stays a function of the seed
                    image = upscaler(**text_inputs(prompt), image=upscaled(image, hires_scale),
                                     strength=hires_strength, **common, **ip_kw).images[0]
                if (run is not pipe or hires_scale is not None) and _is_offloaded(pipe):  # (hooks: pipe's)
                    pipe.maybe_free_model_hooks()
            except OUT_OF_MEMORY as exc:
                if _is_offloaded(pipe):
                    pipe.maybe_free_model_hooks()  # the model that ran out goes back to CPU memory, for what follows
                raise GenerationOutOfMemory(pipe, exc, height, width, cuda_graphs, results, len(jobs)) from None
            except KeyboardInterrupt:  # Ctrl-C: the images already made go with it, for the caller to keep
                raise GenerationInterrupted(results, len(jobs)) from None
            results.append(GeneratedImage(
                image=image, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=num_inference_steps,
                guidance_scale=guidance_scale, lora_scale=recorded_scale,
                lora_names=tuple(s.name + (f"@{s.blocks_text}" if s.blocks else "") for s in loras),
                width=image.width, height=image.height,
                lora_weights=tuple(s.scale for s in loras), model=getattr(pipe.config, "_name_or_path", ""),
                fused=fused, fp8_base=fp8, vae_tiling=_decoded_in_tiles(pipe, image),
                scheduler=getattr(pipe, "billiard_scheduler", "default"), prompt_weighting=prompt_weighting,
                init_image=init_name, strength=strength if init_image is not None else None,
                mask_image=("in-memory image" if isinstance(mask_image, Image.Image) else Path(mask_image).name)
                if mask_image is not None else "",
                refiner=getattr(pipe, "billiard_refiner_name", "") if refiner is not None else "",
                refiner_start=refiner_start if refiner is not None else None,
                hires_scale=hires_scale, hires_strength=hires_strength if hires_scale is not None else None,
                guidance_rescale=guidance_rescale, controlnet=getattr(pipe, "billiard_controlnet_name", "") if control is not None else "",
                control_image=", ".join("in-memory image" if isinstance(c, Image.Image) else Path(c).name
                                        for c in given) if control is not None else "",
                controlnet_scale=(control_scale if isinstance(control_scale, float)
                                  else ", ".join(f"{s:g}" for s in control_scale))
                if control is not None else None, canny=canny,
                control_end=control_end if control is not None else None,
                ip_adapter=getattr(pipe, "billiard_ip_adapter", "") if ip_kw else "",
                ip_image=("in-memory image" if isinstance(ip_image, Image.Image) else Path(ip_image).name)
                if ip_kw else "", ip_scale=ip_scale if ip_kw else None,
            ))
    return results


def check_ip(loaded: bool, given: bool, scale: float) -> None:
    if given and not loaded:
        raise UserError("--ip_image is a picture prompt for an IP-Adapter: add --ip_adapter FILE (e.g. "
                        "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors)")
    if loaded and not given:
        raise UserError("--ip_adapter needs --ip_image FILE: the picture the images take after (its subject, style, "
                        "colours)")
    if not 0.0 <= scale <= 2.0:
        raise UserError(f"--ip_scale={scale} must be in [0, 2]: how strongly the images take after --ip_image "
                        f"(0.6 is diffusers' example for SDXL, 1.0 follows it closely)")


def check_control_counts(controlnets: int, images: int, scales: int) -> None:
    """One control image per ControlNet, and one --controlnet_scale for all of them or one for each."""
    if images != controlnets:
        raise UserError(f"--control_image given {images} time(s) for {controlnets} --controlnet: give one for each "
                        f"ControlNet, in the same order")
    if scales not in (1, controlnets):
        raise UserError(f"--controlnet_scale given {scales} times for {controlnets} --controlnet: give one for all of "
                        f"them, or one for each, in the same order")


def check_control(loaded: bool, given: bool, scale: float) -> None:
    if given and not loaded:
        raise UserError("--control_image steers a ControlNet: add --controlnet MODEL (e.g. "
                        "diffusers/controlnet-canny-sdxl-1.0)")
    if loaded and not given:
        raise UserError("--controlnet needs --control_image FILE: what the images follow (edges, a pose, depth; "
                        "--canny makes edges of a photo)")
    if not 0.0 <= scale <= 2.0:
        raise UserError(f"--controlnet_scale={scale} must be in [0, 2]: how strongly the images follow the control "
                        f"image (0.5 is diffusers' example, 1.0 follows it closely)")


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The picture's Canny edges as an RGB image (white on black): what canny ControlNets were trained on, made as
    diffusers' SDXL ControlNet docs make it (OpenCV's Canny, thresholds 100 and 200)."""
    import numpy as np

    try:
        import cv2
    except ImportError:
        raise UserError("--canny needs OpenCV: pip install opencv-python-headless (in requirements.txt), or pass an "
                        "edge image as --control_image without --canny") from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def controlnet_pipeline(pipe, *, image_to_image: bool = False, inpaint: bool = False):
    """diffusers' SDXL ControlNet pipeline (``image_to_image``, ``inpaint``: its image-to-image and inpainting ones) on
    ``pipe``'s own models (LoRAs, scheduler, float8 weights) and the ControlNet ``load_generation_pipeline`` loaded,
    built from its components as ``image_to_image`` builds its."""
    from diffusers import (StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline,
                           StableDiffusionXLControlNetPipeline)

    cls = (StableDiffusionXLControlNetInpaintPipeline if inpaint else
           StableDiffusionXLControlNetImg2ImgPipeline if image_to_image else StableDiffusionXLControlNetPipeline)
    made = cls(**pipe.components, controlnet=pipe.billiard_controlnet)
    made.set_progress_bar_config(disable=True)
    return made


def check_strength(strength: float, steps: int) -> None:
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength={strength} must be in (0, 1]: the share of the starting image noised away "
                        f"(0.3 keeps most of it, 1.0 keeps only its size)")
    if int(strength * steps) < 1:
        raise UserError(f"--strength={strength} x --steps={steps} is less than one denoising step: raise either")


def check_hires(scale: float, strength: float, steps: int) -> None:
    if not 1.0 < scale <= 4.0:
        raise UserError(f"--hires_scale={scale} must be above 1 and at most 4 (1.5 is usual: a 1024-px image "
                        f"redrawn at 1536)")
    if not 0.0 < strength <= 1.0 or int(strength * steps) < 1:
        raise UserError(f"--hires_strength={strength} must be in (0, 1] and leave at least one of the --steps={steps} "
                        f"denoising steps (0.3-0.5 keeps the composition)")


def upscaled(image: Image.Image, scale: float) -> Image.Image:
    """``image`` enlarged by ``scale`` (Lanczos), each side rounded to a multiple of 8 (the VAE's factor)."""
    size = tuple(max(8, round(side * scale / 8) * 8) for side in image.size)
    return image.resize(size, resample=Image.Resampling.LANCZOS)


def fit_init_image(pipe, image: str | Path | Image.Image, height: int | None, width: int | None) -> Image.Image:
    """The starting image (any file ``load_image`` reads: EXIF-rotated, CMYK, 16-bit...) resized to cover
    ``height`` x ``width`` and centre-cropped; without either, the SDXL bucket nearest its shape at the model's
    resolution (1024x1024, 896x1152, 1152x896, ...)."""
    from PIL import ImageOps

    from .data import auto_buckets, load_image, nearest_bucket

    picture = load_image(image)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    if height or width:
        h, w = height or size, width or size
    else:
        h, w = nearest_bucket(picture.width, picture.height, auto_buckets(size))
    return ImageOps.fit(picture, (w, h), method=Image.Resampling.LANCZOS)


def image_to_image(pipe, *, inpaint: bool = False):
    """diffusers' SDXL image-to-image pipeline (``inpaint``: its inpainting one, SDXL base's 4-channel UNet with the
    masked latents blended back at each step) on ``pipe``'s own models: LoRAs, scheduler, offload hooks and float8
    weights as they are (built from its components, not ``from_pipe``, which casts them to float32)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    made = (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline)(**pipe.components)
    made.set_progress_bar_config(disable=True)
    return made


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C while generating; ``results``: the images made before it (of ``total``)."""

    def __init__(self, results: list["GeneratedImage"], total: int):
        super().__init__(f"{len(results)} of {total} images were made")
        self.results, self.total = results, total


class GenerationOutOfMemory(UserError):
    """The device ran out of memory making an image: what would fit, and the images made before it (``results``)."""

    def __init__(self, pipe, exc: BaseException, height: int | None, width: int | None, cuda_graphs: bool,
                 results: list[GeneratedImage], total: int):
        self.results = results
        size = pipe.default_sample_size * pipe.vae_scale_factor
        hints = [hint for hint, applies in (
            ("--cpu_offload (the models wait in CPU memory and reach the GPU one at a time)", not _is_offloaded(pipe)),
            ("--vae_tiling", not getattr(pipe.vae, "use_tiling", False)),
            ("--fp8_base", not _is_fp8(pipe)),
            ("no --cuda_graphs", bool(cuda_graphs) and torch.cuda.is_available()),
            ("no --refiner (a second UNet on the GPU)", getattr(pipe, "billiard_refiner", None) is not None),
        ) if applies]
        hints.append("a smaller --height/--width")
        device = torch.device(getattr(pipe, "_execution_device", pipe.device)).type
        detail = out_of_memory_detail(exc)
        super().__init__(f"out of {'GPU' if device == 'cuda' else device} memory generating a {width or size}x{height or size} image"
                         f"{f' ({detail})' if detail else ''}, {len(results)} of {total} made before it: try "
                         f"{', '.join(hints)}")


def _decoded_in_tiles(pipe, image: Image.Image) -> int:
    """The tile size where the VAE decoded this image in tiles (tiling on, latents above one tile: diffusers' test),
    else 0."""
    vae = pipe.vae
    if not getattr(vae, "use_tiling", False):
        return 0
    f = pipe.vae_scale_factor
    tiled = image.width // f > vae.tile_latent_min_size or image.height // f > vae.tile_latent_min_size
    return int(vae.tile_sample_min_size) if tiled else 0


def _check_settings(seeds: list[int], steps: int, height: int | None, width: int | None) -> None:
    if not seeds:
        raise UserError("give at least one seed")
    if steps < 1:
        raise UserError(f"the number of inference steps must be at least 1, got {steps}")
    for flag, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"{flag} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}")


def _is_fp8(pipe) -> bool:
    return any(parametrize.is_parametrized(m) for m in pipe.unet.modules())


def _is_fused(pipe) -> bool:
    return bool(getattr(pipe, "billiard_fused_loras", None)) or getattr(pipe, "num_fused_loras", 0) > 0


def _require_unfused(pipe, what: str) -> None:
    if _is_fused(pipe):
        raise UserError(f"{what} needs LoRA weights it can change, but this pipeline's LoRAs are fused at their "
                        f"load-time scales; load it without fuse (--fuse)")


@contextlib.contextmanager
def _lora_scale(pipe, loras: list[LoraSpec], scale: float | None) -> Iterator[None]:
    """Multiply each active adapter's weight by ``scale`` for the duration, then restore the weights.

    Through ``set_adapters`` rather than ``cross_attention_kwargs={"scale": s}``: in diffusers 0.42 the latter,
    called with 0, resets every adapter to weight 1.0 afterwards (peft's unscale with 0 means "reset"), losing
    the per-LoRA weights set at load time.
    """
    if scale is None:
        yield
        return
    _require_unfused(pipe, "a LoRA scale")
    if not loras:
        raise UserError("a LoRA scale needs a LoRA: load one (--lora DIR) first")
    names = [s.name for s in loras]
    pipe.set_adapters(names, adapter_weights=[s.scale * scale for s in loras])
    try:
        yield
    finally:
        pipe.set_adapters(names, adapter_weights=[s.scale for s in loras])


# ----------------------------------------------------------------------------------------------------------------------
# Grids


def _grid(results: list[GeneratedImage], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    return image_grid([r.image for r in results], len(row_labels), len(col_labels),
                      row_labels=row_labels, col_labels=col_labels)


def prompt_seed_grid(pipe, prompts: Sequence[str], seeds: Sequence[int], **kw) -> Image.Image:
    """Rows = prompts, columns = seeds."""
    results = generate(pipe, list(prompts), list(seeds), **kw)
    return _grid(results, list(prompts), [f"seed {s}" for s in seeds])


def scale_sweep(pipe, prompt: str, seeds: Sequence[int], scales: Sequence[float] = DEFAULT_SCALES, **kw) -> Image.Image:
    """Rows = seeds, columns = LoRA scales (0 = base model) for one prompt."""
    kw.pop("lora_scale", None)  # the sweep sets it
    by_scale = [generate(pipe, [prompt], list(seeds), lora_scale=s, **kw) for s in scales]
    cells = [by_scale[c][r] for r in range(len(seeds)) for c in range(len(scales))]
    return _grid(cells, [f"seed {s}" for s in seeds], [f"LoRA x{s:g}" for s in scales])


def base_vs_lora(pipe, prompts: Sequence[str], seed: int, **kw) -> Image.Image:
    """Rows = prompts, columns = base model (LoRA scale 0) and LoRA, same seed."""
    loras = active_loras(pipe)
    if not loras:
        raise UserError("base vs LoRA needs a LoRA: load one (--lora DIR) first")
    base = _base_results(pipe, list(prompts), [seed], **kw)
    tuned = generate(pipe, list(prompts), [seed], **kw)
    cells = [r for pair in zip(base, tuned) for r in pair]
    return _grid(cells, list(prompts), ["base", "LoRA " + ", ".join(s.name for s in loras)])


def _base_results(pipe, prompts: list[str], seeds: list[int], **kw) -> list[GeneratedImage]:
    """The base model's images: active LoRAs at scale 0 (same weights as without them), or as is if none."""
    kw["lora_scale"] = 0.0 if active_loras(pipe) else None
    return generate(pipe, prompts, seeds, **kw)


def lora_checkpoints(output_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, LoRA file) for each ``checkpoint-N`` of a training run in step order, then the final LoRA."""
    out = Path(output_dir).expanduser()
    if not out.is_dir():
        raise UserError(f"training output folder {out} does not exist")
    found = [(f"step {step}", d / LORA_WEIGHT_NAME) for step, d in _checkpoint_dirs(out)
             if (d / LORA_WEIGHT_NAME).is_file()]
    if (out / LORA_WEIGHT_NAME).is_file():
        found.append(("final", out / LORA_WEIGHT_NAME))
    if not found:
        raise UserError(f"{out} has no {CHECKPOINT_PREFIX}N/{LORA_WEIGHT_NAME} and no final {LORA_WEIGHT_NAME}: "
                        f"expected a training output folder (train with --checkpointing_steps to get checkpoints)")
    return found


def _checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    dirs = [(int(d.name[len(CHECKPOINT_PREFIX):]), d) for d in out.glob(f"{CHECKPOINT_PREFIX}*")
            if d.is_dir() and d.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(dirs)  # by step number: checkpoint-10 after checkpoint-9


def checkpoint_grid(pipe, output_dir: str | Path, prompts: Sequence[str], seed: int, *, include_base: bool = True,
                    **kw) -> Image.Image:
    """Rows = base, each checkpoint ("step N") and the final LoRA, columns = prompts; same seed throughout."""
    _require_unfused(pipe, "a checkpoint grid")
    entries = lora_checkpoints(output_dir)
    prompts = list(prompts)
    previous = active_loras(pipe)
    kw.pop("lora_scale", None)  # each checkpoint at its own full weight
    rows, labels = [], []
    if include_base:
        rows += _base_results(pipe, prompts, [seed], **kw)
        labels.append("base")
    try:
        for label, file in entries:
            # Only this checkpoint is active (load_lora deactivates the others) and it is deleted before the next
            # one loads, so checkpoints never stack on each other or on LoRAs the caller loaded.
            name = load_lora(pipe, LoraSpec(str(file), 1.0, f"ckpt_{label.replace(' ', '_')}"), file=file)
            try:
                rows += generate(pipe, prompts, [seed], **kw)
            finally:
                unload_lora(pipe, name)
            labels.append(label)
    finally:
        if previous:
            pipe.set_adapters([s.name for s in previous], adapter_weights=[s.scale for s in previous])
    return _grid(rows, labels, prompts)


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe lowercase slug of ``text``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "image"


def _free_path(path: Path, taken: Sequence[Path] = ()) -> Path:
    """``path``, or ``stem-2``, ``stem-3`` ... if it exists: earlier results are never overwritten."""
    candidate, i = path, 2
    while candidate.exists() or candidate in taken:
        candidate, i = path.with_name(f"{path.stem}-{i}{path.suffix}"), i + 1
    return candidate


def save_results(results: Sequence[GeneratedImage], out_dir: str | Path) -> list[Path]:
    """One PNG per image, named ``<prompt slug>_seed<N>[_scale<S>].png``, its settings in the PNG's text chunks."""
    out = Path(out_dir).expanduser()
    paths: list[Path] = []
    for r in results:
        scale = f"_scale{r.lora_scale:g}" if r.lora_scale is not None else ""
        path = _free_path(out / f"{slugify(r.prompt)}_seed{r.seed}{scale}.png", paths)
        paths.append(save_image(r.image, path, r.metadata()))
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """--cpu_offload and --vae_tiling, for every command that generates."""
    p.add_argument("--cpu_offload", action="store_true",
                   help="for smaller GPUs: keep the models in CPU memory and move each whole model to the GPU when it "
                        "runs (diffusers' enable_model_cpu_offload); the same images, plus the moves' time per image")
    p.add_argument("--vae_tiling", type=int, nargs="?", const=DEFAULT_VAE_TILE, default=0, metavar="PIXELS",
                   help="for smaller GPUs: decode the image in overlapping tiles of 512 px (or PIXELS, a multiple of "
                        "64), blended (diffusers' tiled decoder); the pixels differ slightly where tiles blend")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m billiard_lora.generate`` flags."""
    p = ArgumentParser(prog="python -m billiard_lora.generate", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default=None,
                   help="SDXL base model: hub id, local diffusers folder or single-file checkpoint (.safetensors) "
                        f"(default: the one the first --lora was trained on, else {SDXL_BASE})")
    p.add_argument("--single_file_config", default=None, metavar="FOLDER_OR_ID",
                   help="for a single-file --model: a diffusers SDXL folder or hub id giving its layout (default: "
                        "what the LoRA was trained with, else SDXL base 1.0's configs, fetched once)")
    p.add_argument("--vae", default="config",
                   help="separate VAE (hub id or folder); 'none': the model's own (default: the one the first --lora "
                        f"was trained with, where it runs on that run's model; else {SDXL_VAE_FP16_FIX})")
    p.add_argument("--lora", action="append", default=[], metavar="DIR[@BLOCKS][:SCALE]",
                   help="training output folder, .safetensors (diffusers or kohya), or a LoRA on the Hugging Face Hub "
                        "(owner/name or owner/name/FILE.safetensors, kept in the Hub's cache), optional weight; "
                        "repeatable. @content or @style: only a B-LoRA's content or style block (--use_blora), e.g. "
                        "--lora dog_run@content --lora painting_run@style; @BLOCK,BLOCK: only its layers in those "
                        "UNet blocks (up_blocks.0, output_blocks.1.1, ...; unet: all of it, te: the text encoders); "
                        "@BLOCK=0.5,...: each block at its own weight (A1111's LoRA Block Weight)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    p.add_argument("--prompts_file", help="text file, one prompt per line")
    p.add_argument("--instance_prompt",
                   help="without --prompt: famous people put in this prompt's place, e.g. 'a photo of messi playing "
                        "billiard' gives '... of cristiano ronaldo playing billiard' (default: the prompt the LoRA "
                        "was trained with)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one image per prompt and seed; the same seed gives the same image (default: 0)")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default: 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5.0)")
    p.add_argument("--guidance_rescale", type=float, default=0.0, metavar="PHI",
                   help="A1111's CFG rescale (arXiv 2305.08891: 0.7): against over-exposed images from a v-prediction / "
                        "zero-terminal-SNR model at strong --guidance (default 0: off)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's, 1024 "
                                              "for SDXL)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--negative_prompt", help="what the images should not show, e.g. 'blurry, lowres'")
    p.add_argument("--prompt_weighting", action="store_true",
                   help="encode the prompts with compel: prompts longer than CLIP's 77 tokens whole (in chunks, as "
                        "A1111 and ComfyUI), and weights: (green felt:1.3) or (green felt)1.3, billiard++, smoke-")
    p.add_argument("--init_image", metavar="FILE",
                   help="image-to-image (A1111's img2img): start from this picture instead of pure noise, fitted to "
                        "--height/--width (default: the SDXL size nearest its shape)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"with --init_image: how much of it is noised away, in (0, 1] (default {DEFAULT_STRENGTH}, "
                        f"{DEFAULT_INPAINT_STRENGTH} with --mask_image; 0.3 keeps most of the picture, 1.0 only its "
                        f"size)")
    p.add_argument("--mask_image", metavar="FILE",
                   help="with --init_image: inpainting, the picture redrawn only where this mask is white (e.g. put "
                        "your subject at a real billiard table), its other pixels kept")
    p.add_argument("--hires_scale", type=float, default=None, metavar="FACTOR",
                   help="A1111's hires fix: upscale each image by FACTOR (e.g. 1.5) and redraw it with the LoRA by "
                        "image-to-image, for detail beyond one pass (with --vae_tiling on smaller GPUs)")
    p.add_argument("--hires_strength", type=float, default=DEFAULT_HIRES_STRENGTH,
                   help=f"with --hires_scale: how much of the upscaled image is redrawn (default "
                        f"{DEFAULT_HIRES_STRENGTH})")
    p.add_argument("--refiner", nargs="?", const=SDXL_REFINER, default=None, metavar="MODEL",
                   help=f"finish each image with SDXL's refiner (default {SDXL_REFINER}; a hub id or a local "
                        f"folder), as diffusers' SDXL docs: base + LoRA for the first --refiner_start of the steps")
    p.add_argument("--refiner_start", type=float, default=DEFAULT_REFINER_START,
                   help=f"with --refiner: the share of the denoising the base model does (default "
                        f"{DEFAULT_REFINER_START})")
    p.add_argument("--controlnet", action="append", default=None, metavar="MODEL",
                   help="an SDXL ControlNet (hub id or folder, e.g. diffusers/controlnet-canny-sdxl-1.0) that the "
                        "images follow: their composition from --control_image, the LoRA's subject in it; repeatable "
                        "(Multi-ControlNet, e.g. canny and depth: one --control_image each, in the same order)")
    p.add_argument("--control_image", action="append", default=None, metavar="FILE",
                   help="what the --controlnet follows (edges, a pose, depth), fitted to the size as --init_image is "
                        "(the later ones to the first one's size); one per --controlnet")
    p.add_argument("--canny", action="store_true",
                   help="use --control_image's Canny edges (OpenCV, as diffusers' docs): a photo for a canny "
                        "ControlNet")
    p.add_argument("--ip_adapter", default=None, metavar="FILE",
                   help="an SDXL IP-Adapter's .safetensors, local or owner/name/SUBFOLDER/FILE on the Hub (e.g. "
                        "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors): --ip_image becomes a picture prompt")
    p.add_argument("--ip_image", metavar="FILE", help="the picture the images take after (with --ip_adapter)")
    p.add_argument("--ip_scale", type=float, default=DEFAULT_IP_SCALE,
                   help=f"how strongly the images take after --ip_image, 0-2 (default {DEFAULT_IP_SCALE})")
    p.add_argument("--ip_image_encoder", default=None, metavar="FOLDER_OR_ID",
                   help="the IP-Adapter's CLIP image encoder where it is not image_encoder/ beside the weights (the "
                        "plus / ViT-H adapters: h94/IP-Adapter's models/image_encoder, downloaded as a folder)")
    p.add_argument("--control_end", type=float, default=1.0, metavar="SHARE",
                   help="the share of the steps the ControlNet steers, A1111's 'ending control step' (default 1: all; "
                        "0.6 leaves the last steps free to refine details)")
    p.add_argument("--controlnet_scale", type=float, action="append", default=None,
                   help=f"how strongly the images follow --control_image, 0-2 (default {DEFAULT_CONTROLNET_SCALE}); "
                        f"with several ControlNets, one for all or one each, in their order")
    p.add_argument("--scheduler", default="default", choices=list(SCHEDULERS),
                   help="the sampler, as A1111 and ComfyUI name them, built from the model's own scheduler settings "
                        "(default: the model's own, Euler for SDXL base)")
    p.add_argument("--fuse", action="store_true",
                   help="merge the LoRAs into the model weights: base-model speed (unfused costs ~12%% more per step "
                        "on CPU); scales fixed")
    p.add_argument("--fp8_base", action="store_true",
                   help="keep the UNet's weights (fused LoRAs included) in float8, cast up layer by layer: half its "
                        "memory (SDXL: 2.6 instead of 5.2 GB), for smaller GPUs; images differ slightly")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="on a CUDA GPU, record the UNet's forward once as a CUDA graph and replay it at each denoising "
                        "step (the same images; a fast GPU otherwise waits on the CPU launching kernels)")
    add_memory_arguments(p)
    p.add_argument("--grid", action="store_true", help="also a prompts x seeds grid of the images")
    p.add_argument("--sweep", action="store_true", help="a LoRA-scale sweep grid per prompt (see --scales)")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help=f"scales for --sweep (default: {' '.join(map(str, DEFAULT_SCALES))})")
    p.add_argument("--compare", action="store_true", help="base model vs LoRA grid per seed")
    p.add_argument("--checkpoints", metavar="DIR", help="grid of a training run's checkpoints per seed")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", default="outputs/generate",
                   help="folder for the PNGs; an existing file is never overwritten (default: outputs/generate)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from .io import check_out_folder

    if args.hires_strength != DEFAULT_HIRES_STRENGTH and args.hires_scale is None:
        raise UserError("--hires_strength sets how much of the upscaled image is redrawn: add --hires_scale (e.g. "
                        "1.5), or drop --hires_strength")
    if args.hires_scale is not None:
        check_hires(args.hires_scale, args.hires_strength, args.steps)
    if args.refiner_start != DEFAULT_REFINER_START and not args.refiner:
        raise UserError("--refiner_start sets where the refiner takes over: add --refiner, or drop --refiner_start")
    if args.strength is not None and not args.init_image:
        raise UserError("--strength sets how much of --init_image is noised away: add --init_image FILE, or drop "
                        "--strength")
    if args.mask_image and not args.init_image:
        raise UserError("--mask_image marks what to redraw in --init_image: add --init_image FILE")
    if args.init_image:
        from .data import load_image

        for picture in (args.init_image, args.mask_image):  # an unreadable one says so now, before the models load
            if picture:
                load_image(picture)
        default = DEFAULT_INPAINT_STRENGTH if args.mask_image else DEFAULT_STRENGTH
        check_strength(args.strength if args.strength is not None else default, args.steps)
    if args.controlnet or args.control_image or args.canny or args.controlnet_scale is not None \
            or args.control_end != 1.0:
        if args.canny and not args.control_image:
            raise UserError("--canny turns --control_image into edges: add --control_image FILE, or drop --canny")
        if not args.controlnet and not args.control_image:
            raise UserError("--controlnet_scale and --control_end set how the images follow a ControlNet: add "
                            "--controlnet and --control_image, or drop them")
        args.controlnet_scale = args.controlnet_scale or [DEFAULT_CONTROLNET_SCALE]
        for scale in args.controlnet_scale:
            check_control(bool(args.controlnet), bool(args.control_image), scale)
        check_control_counts(len(args.controlnet), len(args.control_image), len(args.controlnet_scale))
        from .data import load_image

        for picture in args.control_image:  # an unreadable one says so now, before the models load
            load_image(picture)
    if args.ip_adapter or args.ip_image or args.ip_scale != DEFAULT_IP_SCALE or args.ip_image_encoder:
        if args.ip_image_encoder and not args.ip_adapter:
            raise UserError("--ip_image_encoder goes with --ip_adapter: add it, or drop --ip_image_encoder")
        if not args.ip_adapter and not args.ip_image:
            raise UserError("--ip_scale sets how strongly the images take after --ip_image: add --ip_adapter and "
                            "--ip_image, or drop --ip_scale")
        check_ip(bool(args.ip_adapter), bool(args.ip_image), args.ip_scale)
        ip_adapter_location(args.ip_adapter)
        from .data import load_image

        load_image(args.ip_image)  # an unreadable one says so now, before the models load
    if args.scales is not None and not args.sweep:
        raise UserError("--scales sets the LoRA scales of --sweep: add --sweep (or give one scale as --lora DIR:SCALE)")
    args.scales = args.scales or list(DEFAULT_SCALES)
    check_device(args.device)
    check_out_folder(args.out, "--out")  # before minutes of sampling, not after
    if (args.sweep or args.compare) and not args.lora:
        raise UserError("--sweep and --compare need a LoRA: add --lora DIR")
    if args.fuse and (args.sweep or args.compare or args.checkpoints):
        raise UserError("--fuse bakes the LoRA scale in: --sweep, --compare and --checkpoints need it unfused")
    _check_settings(args.seeds, args.steps, args.height, args.width)


def _default_instance_prompt(args: argparse.Namespace, lora_files: list[Path]) -> str | None:
    """--instance_prompt, else the one the (first) LoRA or checkpoint run was trained with."""
    if args.instance_prompt:
        return args.instance_prompt
    candidates = list(lora_files)
    if args.checkpoints:
        candidates += [f for _, f in lora_checkpoints(args.checkpoints)]
    for f in candidates:
        with contextlib.suppress(Exception):  # no or foreign metadata: try the next, then the default
            if prompt := read_metadata(f).get("instance_prompt"):
                return prompt
    return None


def _default_model_and_vae(args: argparse.Namespace, lora_files: list[Path]) -> tuple[str, str | None]:
    """--model and --vae, else what the first LoRA (or checkpoint run) that records them was trained with: a LoRA
    trained on a local model generates with that model, as its model card's command says (a single-file model with
    the --single_file_config it was read with, set on ``args`` unless given)."""
    trained: dict = {}
    candidates = list(lora_files) + ([f for _, f in lora_checkpoints(args.checkpoints)] if args.checkpoints else [])
    for f in candidates:
        with contextlib.suppress(Exception):  # no or foreign metadata: try the next, then the defaults
            if (meta := read_metadata(f)).get("pretrained_model_name_or_path"):
                trained = meta
                break
    model = args.model or trained.get("pretrained_model_name_or_path") or SDXL_BASE
    if trained and same_setting("pretrained_model_name_or_path", model, trained.get("pretrained_model_name_or_path")):
        if getattr(args, "single_file_config", None) is None:
            args.single_file_config = trained.get("single_file_config")  # (main passes it on)
        # a run that overrode the model's noise schedule (v-prediction, zero terminal SNR) samples with it too
        args.noise_schedule = {"prediction_type": trained.get("prediction_type"),
                               "zero_terminal_snr": bool(trained.get("zero_terminal_snr"))}
    if str(args.vae).lower() == "none":
        return model, None
    if args.vae != "config":
        return model, args.vae
    if trained and same_setting("pretrained_model_name_or_path", model, trained.get("pretrained_model_name_or_path")):
        return model, trained.get("pretrained_vae_model_name_or_path")  # None: the run used the model's own
    return model, SDXL_VAE_FP16_FIX


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Generate images (and grids) from the command line; prints each file written."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    specs = [parse_lora_arg(a) for a in args.lora]
    lora_files = [resolve_lora_file(s.path) for s in specs]
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    prompts = prompts or famous_prompts(_default_instance_prompt(args, lora_files))

    args.model, vae = _default_model_and_vae(args, lora_files)
    pipe = load_generation_pipeline(args.model, vae=vae, loras=specs, fuse=args.fuse, device=args.device,
                                    fp8_base=args.fp8_base, cuda_graphs=args.cuda_graphs,
                                    cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                                    scheduler=args.scheduler, files=lora_files, refiner=args.refiner,
                                    single_file_config=args.single_file_config, controlnet=args.controlnet,
                                    ip_adapter=args.ip_adapter, ip_image_encoder=args.ip_image_encoder)
    if getattr(args, "noise_schedule", None):
        from .models import with_noise_schedule

        pipe.scheduler = with_noise_schedule(pipe.scheduler, **args.noise_schedule)
    kw = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
              guidance_rescale=args.guidance_rescale,
              height=args.height, width=args.width, prompt_weighting=args.prompt_weighting,
              **({"refiner_start": args.refiner_start} if args.refiner else {}),
              **({"hires_scale": args.hires_scale, "hires_strength": args.hires_strength}
                 if args.hires_scale is not None else {}),
              **({"init_image": args.init_image, "strength": args.strength, "mask_image": args.mask_image}
                 if args.init_image else {}),
              **({"control_image": args.control_image, "controlnet_scale": args.controlnet_scale,
                  "canny": args.canny, "control_end": args.control_end} if args.controlnet else {}),
              **({"ip_image": args.ip_image, "ip_scale": args.ip_scale} if args.ip_adapter else {}))
    out = Path(args.out)
    # Grids carry the settings that made them; single images carry their own (GeneratedImage.metadata).
    settings = {**{k: v for k, v in kw.items() if v is not None and v is not False}, "model": args.model,
                "loras": args.lora,
                "prompts": prompts, **({"fp8_base": True} if args.fp8_base else {}),
                **({"vae_tiling": args.vae_tiling} if args.vae_tiling else {}),
                **({"scheduler": args.scheduler} if args.scheduler != "default" else {}),
                **({"controlnet": args.controlnet} if args.controlnet else {}),
                **({"ip_adapter": args.ip_adapter} if args.ip_adapter else {})}

    def save_grid(grid: Image.Image, name: str, **extra) -> Path:
        return save_image(grid, _free_path(out / name), {**settings, **extra})

    written: list[Path] = []

    if args.grid or not (args.sweep or args.compare or args.checkpoints):
        try:
            results = generate(pipe, prompts, args.seeds, **kw)
        except GenerationOutOfMemory as exc:  # the images made before it are kept
            for path in save_results(exc.results, out):
                print(path)
            raise
        except GenerationInterrupted as exc:
            for path in save_results(exc.results, out):
                print(path)
            raise KeyboardInterrupt(f"the {len(exc.results)} of {exc.total} images made are saved in {out}") from None
        written += save_results(results, out)
        if args.grid:
            grid = _grid(results, prompts, [f"seed {s}" for s in args.seeds])
            written.append(save_grid(grid, "grid.png", seeds=args.seeds))
    for prompt in prompts if args.sweep else []:
        grid = scale_sweep(pipe, prompt, args.seeds, args.scales, **kw)
        written.append(save_grid(grid, f"sweep_{slugify(prompt)}.png", prompt=prompt, seeds=args.seeds,
                                 scales=args.scales))
    for seed in args.seeds if args.compare else []:
        written.append(save_grid(base_vs_lora(pipe, prompts, seed, **kw), f"compare_seed{seed}.png", seed=seed))
    for seed in args.seeds if args.checkpoints else []:
        grid = checkpoint_grid(pipe, args.checkpoints, prompts, seed, **kw)
        written.append(save_grid(grid, f"checkpoints_seed{seed}.png", seed=seed, checkpoints=args.checkpoints))

    for path in written:
        print(path)
    print(f"wrote {len(written)} file(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
