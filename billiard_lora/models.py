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
        if _is_local(name) and "ControlNet" in what:
            hint = (f"the folder exists but is not a diffusers {what} (config.json and "
                    f"diffusion_pytorch_model.safetensors)")
        elif _is_local(name) and "IP-Adapter" in what:
            hint = f"the folder exists but does not hold an {what} as diffusers loads it"
        elif _is_local(name):
            hint = (f"the folder exists but is not a complete diffusers {what} "
                    f"(a pipeline folder has model_index.json and unet/, vae/, text_encoder/ ... subfolders)")
        elif os.path.exists(os.path.expanduser(name)):
            hint = "that path is a file; pass the folder that holds the model"
        elif name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name):
            raise UserError(f"could not load {what} '{name}': no such folder") from None
        else:
            reach = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached or has no such repo"
            hint = (f"it is not a local folder and {reach}; download it once where there is network "
                    f"(hf download {name} --local-dir DIR) and point at DIR, or set HF_HOME to a cache that has it")
        if not _is_local(name):  # the hint says it all; the hub client's own text only repeats it, cut short
            raise UserError(f"could not load {what} '{name}': {hint}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load {what} '{name}': {hint} ({type(exc).__name__}: {first[:200]})") from None


def load_components(pretrained_model_name_or_path: str, *, pretrained_vae_model_name_or_path: str | None = None,
                    revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
                    torch_dtype: torch.dtype | None = None, single_file_config: str | None = None) -> Components:
    """Load tokenizers, both text encoders, VAE (optionally a separate one), UNet and a DDPM noise scheduler, on CPU.

    By default in the files' float32, which stays memory-mapped until the weights move (SDXL: 0.4 GiB of private
    memory); ``torch_dtype`` loads the UNet and text encoders converted instead, into private memory (float16:
    6.7 GiB for SDXL; ``benchmarks/bench_load.py``). The VAE stays float32 either way. A single-file checkpoint
    (``.safetensors``: civitai's, A1111's) is read through diffusers' converters, its layout from
    ``single_file_config`` (``single_file.py``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from .single_file import check_single_file_config, load_single_file_pipeline

    name = pretrained_model_name_or_path
    if check_single_file_config(name, single_file_config):
        vae = (load_vae(pretrained_vae_model_name_or_path, cache_dir=cache_dir) if pretrained_vae_model_name_or_path
               else None)
        pipe = load_single_file_pipeline(name, config=single_file_config, torch_dtype=torch_dtype,
                                         cache_dir=cache_dir, vae=vae)
        vae = vae if vae is not None else pipe.vae.to(torch.float32)  # (the VAE stays float32, as below)
        _require_sdxl(pipe.unet, name)
        scheduler = with_noise_schedule(DDPMScheduler.from_config(pipe.scheduler.config),
                                        markers=single_file_markers(name))
        return Components(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, vae, pipe.unet,
                          scheduler)
    common = dict(revision=revision, cache_dir=cache_dir)
    weights = dict(common, variant=variant, use_safetensors=True)
    with _friendly_errors("SDXL pipeline", name):
        tok1 = AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        tok2 = AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common)
        te1 = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **weights, **_tf_dtype_kw(torch_dtype))
        te2 = CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **weights,
                                                          **_tf_dtype_kw(torch_dtype))
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **weights, **_dtype_kw(torch_dtype))
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        if pretrained_vae_model_name_or_path is None:
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
    if pretrained_vae_model_name_or_path is not None:
        vae = load_vae(pretrained_vae_model_name_or_path, cache_dir=cache_dir)
    _require_sdxl(unet, name)
    return Components(tok1, tok2, te1, te2, vae, unet, scheduler)


def single_file_markers(path: str) -> dict[str, Any]:
    """The noise-schedule settings a single-file checkpoint carries, as ComfyUI reads them: a ``v_pred`` key
    (v-prediction), a ``ztsnr`` key (zero terminal SNR), or modelspec's ``prediction_type`` in the header."""
    from safetensors import safe_open

    with safe_open(str(Path(path).expanduser()), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata() or {}
    v_pred = "v_pred" in keys or header.get("modelspec.prediction_type", "").lower() in ("v", "v_prediction",
                                                                                         "velocity")
    return {**({"prediction_type": "v_prediction"} if v_pred else {}),
            **({"rescale_betas_zero_snr": True} if "ztsnr" in keys else {})}


def noise_schedule_settings(*, prediction_type: str | None = None, zero_terminal_snr: bool = False,
                            markers: dict | None = None) -> dict[str, Any]:
    """The scheduler settings for the prediction type and zero terminal SNR asked for (flags, over a single file's
    markers). Zero terminal SNR samples with "trailing" timesteps, so that sampling starts at the pure-noise
    timestep (arXiv 2305.08891)."""
    kw = dict(markers or {})
    if prediction_type:
        kw["prediction_type"] = prediction_type
    if zero_terminal_snr:
        kw["rescale_betas_zero_snr"] = True
    if kw.get("rescale_betas_zero_snr"):
        kw["timestep_spacing"] = "trailing"
    return kw


def with_noise_schedule(scheduler, **asked):
    """``scheduler`` (training's DDPM or a pipeline's sampler) rebuilt with ``noise_schedule_settings(**asked)``; the
    same object where nothing changes."""
    kw = noise_schedule_settings(**asked)
    if all(scheduler.config.get(k) == v for k, v in kw.items()):
        return scheduler
    return type(scheduler).from_config(scheduler.config, **kw)


def _require_sdxl(unet, name: str) -> None:
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(f"'{name}' is not an SDXL model (its UNet has no text_time conditioning); "
                        f"pass an SDXL base model such as {SDXL_BASE}")


def _dtype_kw(dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); pass whichever this version takes."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (exists where `dtype` is the name)

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


def _tf_dtype_kw(dtype: torch.dtype | None) -> dict[str, Any]:
    """transformers renamed ``torch_dtype`` to ``dtype`` (4.56); pass whichever this version takes."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


FP8 = torch.float8_e4m3fn
FP8_KEEP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "lora_")  # small, and first/last in line


class _Upcast(torch.nn.Module):
    """A parametrization: the weight as stored (float8) -> the weight a layer computes with."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def store_weights_in_fp8(unet: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep the frozen Linear/Conv weights of ``unet`` in float8 (e4m3), each cast to ``compute_dtype`` as its layer
    runs (kohya's --fp8_base): half the memory of fp16/bf16 weights. Returns how many weights it stores so.

    A torch parametrization, not diffusers' ``enable_layerwise_casting``: that one swaps each layer's weights between
    dtypes in place around its forward, which autograd and non-reentrant checkpointing do not follow (the weights a
    backward reads have turned to float8 by then; measured: a metadata error, or a layer left in the compute dtype).
    Here the cast is an ordinary operation: backward and checkpoint recomputation see the upcast tensor, and the
    gradients are exactly those of the float8-rounded model. Biases, norms, the LoRA layers and the first and last
    layers keep their dtype.
    """
    from torch.nn.utils import parametrize

    count = 0
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or any(k in name for k in FP8_KEEP):
            continue
        if module.weight.requires_grad or parametrize.is_parametrized(module, "weight"):
            continue
        parametrize.register_parametrization(module, "weight", _Upcast(compute_dtype), unsafe=True)
        stored = module.parametrizations.weight.original
        stored.data = stored.data.to(FP8)
        count += 1
    return count


def run_norms_in_half(model: torch.nn.Module):
    """LayerNorm and GroupNorm of ``model`` run in their weights' half precision even under autocast, which runs
    them in float32 on CUDA (a cast up before each, a float32 output the next layer casts back down). Returns the
    undo.

    PyTorch's half-precision norm kernels accumulate the mean and variance in float32 all the same; what changes is
    where the output is rounded to half: in the norm, instead of in the next matmul's input cast (one more rounding
    where a SiLU comes between). Measured on an H100 (benchmarks/RESULTS.md, session 11): 158.4 -> 139.9 ms per
    micro-step at the seed's settings, the 256 norms of SDXL's UNet no longer cast. A norm whose weights are float32,
    or that meets a float32 input, runs as before; outside autocast nothing changes.
    """

    def forward(self, x):
        half = x.dtype in (torch.float16, torch.bfloat16) and (self.weight is None or self.weight.dtype == x.dtype)
        if half and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return type(self).forward(self, x)
        return type(self).forward(self, x)

    import types

    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    for m in norms:
        m.forward = types.MethodType(forward, m)

    def undo() -> None:
        for m in norms:
            m.__dict__.pop("forward", None)

    return undo


def load_vae(name: str, *, cache_dir: str | None = None, torch_dtype: torch.dtype | None = None):
    """A standalone VAE folder or hub id (the seed uses madebyollin/sdxl-vae-fp16-fix); a pipeline's vae/ also works."""
    from diffusers import AutoencoderKL

    with _friendly_errors("VAE", name):
        kw = dict(cache_dir=cache_dir, use_safetensors=True, **_dtype_kw(torch_dtype))
        if _is_local(name) and (Path(name).expanduser() / "vae" / "config.json").exists():
            return AutoencoderKL.from_pretrained(name, subfolder="vae", **kw)
        return AutoencoderKL.from_pretrained(name, **kw)


def load_pipeline(pretrained_model_name_or_path: str = SDXL_BASE, *, pretrained_vae_model_name_or_path: str | None = None,
                  torch_dtype: torch.dtype | None = None, variant: str | None = None, revision: str | None = None,
                  device: str | torch.device | None = None, cache_dir: str | None = None,
                  single_file_config: str | None = None):
    """Load ``StableDiffusionXLPipeline`` (base + optional separate VAE), cast to ``torch_dtype``, moved to ``device``;
    from a diffusers folder or Hub id, or a single-file checkpoint (``single_file.py``)."""
    from diffusers import StableDiffusionXLPipeline

    from .single_file import check_single_file_config, load_single_file_pipeline

    vae = None
    if pretrained_vae_model_name_or_path is not None:
        vae = load_vae(pretrained_vae_model_name_or_path, cache_dir=cache_dir, torch_dtype=torch_dtype)
    if check_single_file_config(pretrained_model_name_or_path, single_file_config):
        pipe = load_single_file_pipeline(pretrained_model_name_or_path, config=single_file_config,
                                         torch_dtype=torch_dtype, cache_dir=cache_dir, vae=vae)
        pipe.scheduler = with_noise_schedule(pipe.scheduler, markers=single_file_markers(pretrained_model_name_or_path))
    else:
        kw: dict[str, Any] = dict(revision=revision, variant=variant, cache_dir=cache_dir, use_safetensors=True,
                                  **_dtype_kw(torch_dtype))
        if vae is not None:
            kw["vae"] = vae
        with _friendly_errors("SDXL pipeline", pretrained_model_name_or_path):
            pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model_name_or_path, **kw)
    if device is not None:
        pipe.to(device)
    return pipe


SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"


def load_refiner(name: str, base, *, torch_dtype: torch.dtype | None = None, cache_dir: str | None = None):
    """SDXL's refiner as diffusers' ``StableDiffusionXLImg2ImgPipeline``, sharing ``base``'s second text encoder,
    its tokenizer (new tokens included) and its VAE, as diffusers' SDXL docs load it: only the refiner's UNet is new
    (SDXL refiner 1.0: 2.3 B parameters)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    kw: dict[str, Any] = dict(cache_dir=cache_dir, use_safetensors=True, **_dtype_kw(torch_dtype))
    with _friendly_errors("SDXL refiner", name):
        return StableDiffusionXLImg2ImgPipeline.from_pretrained(
            name, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=base.vae, **kw)


def load_controlnet(name: str, *, torch_dtype: torch.dtype | None = None, cache_dir: str | None = None):
    """An SDXL ControlNet (``diffusers/controlnet-canny-sdxl-1.0``, ``xinsir/controlnet-openpose-sdxl-1.0``, a
    folder) as diffusers' ``ControlNetModel``."""
    from diffusers import ControlNetModel

    kw: dict[str, Any] = dict(cache_dir=cache_dir, use_safetensors=True, **_dtype_kw(torch_dtype))
    if torch_dtype == torch.float16:  # the half-size files where the repo has them (2.5 GB, not 5: diffusers' own)
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # ("An error occurred ...": a missing variant)
        try:
            return ControlNetModel.from_pretrained(name, variant="fp16", **kw)
        except (OSError, ValueError):
            pass  # no fp16 variant (or no such model: said below)
        finally:
            diffusers_logging.set_verbosity(level)
    with _friendly_errors("SDXL ControlNet", name):
        return ControlNetModel.from_pretrained(name, **kw)


def load_image_encoder(name: str, *, torch_dtype: torch.dtype | None = None):
    """An IP-Adapter's CLIP image encoder (a folder or Hub id, e.g. h94/IP-Adapter's ``models/image_encoder``
    downloaded as a folder) as transformers' ``CLIPVisionModelWithProjection``."""
    from transformers import CLIPVisionModelWithProjection

    with _friendly_errors("IP-Adapter image encoder", name):
        return CLIPVisionModelWithProjection.from_pretrained(name, **({"dtype": torch_dtype} if torch_dtype else {}))


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


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation models: CLIP (CLIP-I, CLIP-T) and DINO (DINO, PRES, memorisation), as in the DreamBooth paper

CLIP_VIT_B32 = "openai/clip-vit-base-patch32"  # the paper's CLIP for CLIP-I and CLIP-T
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"  # a stronger option (SDXL's first text encoder is its text half)
DINO_VIT_S16 = "facebook/dino-vits16"  # the paper's DINO ViT-S/16
# facebook/dino-vits16 keeps its safetensors weights only in the Hub's conversion pull request, not on main; naming
# that revision lets use_safetensors=True load it, and load it offline from a cache filled once.
_SAFETENSORS_REVISIONS = {DINO_VIT_S16: "refs/pr/1"}
_DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")  # ViTs whose first token is a trained CLS token


def load_clip(name_or_path: str = CLIP_VIT_B32, *, cache_dir: str | None = None, revision: str | None = None):
    """``(CLIPModel, CLIPProcessor)`` in float32 on CPU, eval mode; the processor's image half is the PIL one."""
    from transformers import CLIPModel, CLIPProcessor

    common = _eval_model_kwargs(name_or_path, cache_dir, revision)
    with _eval_model_errors("CLIP model", name_or_path, common.get("revision")):
        _require_model_type(name_or_path, "CLIP model", ("clip",), "--clip_model", common)
        model = _load_all_weights(CLIPModel, name_or_path, "CLIP model", common)
        tokenizer, image_processor = _tokenizer(name_or_path, common), _image_processor(name_or_path, common)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_dino(name_or_path: str = DINO_VIT_S16, *, cache_dir: str | None = None, revision: str | None = None):
    """``(model, image processor)`` of a DINO ViT (``ViTModel`` without pooler, or DINOv2), float32 on CPU, eval."""
    from transformers import AutoModel, ViTModel

    common = _eval_model_kwargs(name_or_path, cache_dir, revision)
    with _eval_model_errors("DINO model", name_or_path, common.get("revision")):
        model_type = _require_model_type(name_or_path, "DINO model", _DINO_MODEL_TYPES, "--dino_model", common)
        if model_type == "vit":
            # DINO's embedding is the CLS token after the final layer norm; the checkpoints carry no pooler head.
            model = _load_all_weights(ViTModel, name_or_path, "DINO model", common, add_pooling_layer=False)
        else:
            model = _load_all_weights(AutoModel, name_or_path, "DINO model", common)
        image_processor = _image_processor(name_or_path, common)
    return model, image_processor


BLIP_CAPTIONER = "Salesforce/blip-image-captioning-large"  # the captioner diffusers' advanced DreamBooth docs use


def load_captioner(name_or_path: str = BLIP_CAPTIONER, *, cache_dir: str | None = None,
                   device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """``(BlipForConditionalGeneration, BlipProcessor)`` for ``python -m billiard_lora.caption``, eval mode."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    common = _eval_model_kwargs(name_or_path, cache_dir, None)
    with _eval_model_errors("BLIP captioning model", name_or_path, common.get("revision")):
        _require_model_type(name_or_path, "BLIP captioning model", ("blip",), "--model", common)
        model = _load_all_weights(BlipForConditionalGeneration, name_or_path, "BLIP captioning model", common,
                                  **_tf_dtype_kw(torch_dtype))
        processor = BlipProcessor(image_processor=_image_processor(name_or_path, common),
                                  tokenizer=_tokenizer(name_or_path, common))
    return model.to(device).eval(), processor


def _eval_model_kwargs(name: str, cache_dir: str | None, revision: str | None) -> dict[str, Any]:
    if _is_local(name):
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"model folder {folder} has no config.json: expected a folder written by save_pretrained")
        if not any(folder.glob("*.safetensors")):
            raise UserError(f"model folder {folder} has no .safetensors weights (pickled .bin files are not read: "
                            f"they can run code when loaded); re-save it with save_pretrained(safe_serialization=True)")
        return dict(cache_dir=cache_dir)
    return dict(cache_dir=cache_dir, revision=revision or _SAFETENSORS_REVISIONS.get(name))


@contextlib.contextmanager
def _eval_model_errors(what: str, name: str, revision: str | None) -> Iterator[None]:
    """``_friendly_errors`` plus where a pinned revision's files are (its hint names only the main branch)."""
    try:
        with _friendly_errors(what, name):
            yield
    except UserError as exc:
        if revision and not _is_local(name):
            raise UserError(f"{exc}; its safetensors weights are at revision {revision}: "
                            f"hf download {name} --revision {revision}") from None
        raise


def _require_model_type(name: str, what: str, allowed: tuple[str, ...], flag: str, common: dict[str, Any]) -> str:
    """The config's model_type, refused unless allowed: from_pretrained would load a foreign model as random weights."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name, **common).model_type
    if model_type not in allowed:
        raise UserError(f"{flag} '{name}' is a '{model_type}' model, not a {what} ({' or '.join(allowed)})")
    return model_type


def _load_all_weights(cls, name: str, what: str, common: dict[str, Any], **kw):
    """``cls.from_pretrained`` (safetensors only) that refuses a checkpoint leaving weights at their random init."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the per-key load report is noise; missing keys are checked below
    hf_logging.disable_progress_bar()  # a bar for a second's loading; evaluation shows its own progress
    try:
        model, info = cls.from_pretrained(name, use_safetensors=True, output_loading_info=True, **common, **kw)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{what} '{name}' lacks {len(missing)} weights its architecture needs (e.g. {missing[0]}); "
                        f"pass a complete {what} checkpoint")
    return model.eval()


def _tokenizer(name: str, common: dict[str, Any]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **common)


def _image_processor(name: str, common: dict[str, Any]):
    """The PIL image processor: torchvision is optional, and one backend gives the same numbers on every machine."""
    import transformers
    from transformers import AutoImageProcessor

    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(name, **common, **backend)
