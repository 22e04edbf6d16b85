"""Single-file SDXL checkpoints: one .safetensors in the original (SGM) layout, as civitai, A1111, ComfyUI and
kohya use them (Juggernaut XL, RealVisXL, Pony, Illustrious ...).

Reading goes through diffusers' own ``StableDiffusionXLPipeline.from_single_file``, which needs the model's layout
(the configs and tokenizers of a diffusers SDXL folder): by default SDXL base 1.0's, a few small files fetched once
from the Hub and cached; ``config`` names another folder or repo (offline: any diffusers SDXL folder of the same
architecture). Writing (``pipeline_to_single_file``, what ``lora merge --single_file`` saves) is the reverse of
diffusers' converters, key for key: UNet under ``model.diffusion_model.`` in SGM names, VAE under
``first_stage_model.`` in LDM names (attention as 1x1 convolutions), CLIP-L under ``conditioner.embedders.0.
transformer.`` in transformers' names, OpenCLIP-bigG under ``conditioner.embedders.1.model.`` in open_clip's (q, k, v
as one in_proj, the projection transposed). Reading a written file back gives every weight bit for bit (tested).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."


def is_single_file(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` is a checkpoint file (not a diffusers folder or a Hub id); UserError for a pickled one."""
    if not name:
        return False
    p = Path(os.path.expanduser(str(name)))
    if not p.is_file():
        return False
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{p} is a pickled checkpoint, which can run code when loaded, so it is not read: use its "
                        f".safetensors version (civitai offers one) or convert it once where you trust it")
    return p.suffix.lower() == ".safetensors"


def check_single_file_config(model: str, config: str | None, flag: str = "the model") -> bool:
    """Whether ``model`` is a single-file checkpoint; UserError where ``config`` (its layout) is given for one that
    is not (a pickled checkpoint is refused by ``is_single_file``)."""
    single = is_single_file(model)
    if config and not single:
        raise UserError(f"--single_file_config describes a single-file checkpoint, and {flag} '{model}' is not one "
                        f"(a .safetensors file): drop --single_file_config")
    return single


def load_single_file_pipeline(path: str | os.PathLike, *, config: str | None = None,
                              torch_dtype: torch.dtype | None = None, cache_dir: str | None = None, vae=None):
    """``StableDiffusionXLPipeline`` from a single-file SDXL checkpoint, through diffusers' converters; ``config``: a
    diffusers SDXL folder or repo giving the layout (default: what diffusers infers, SDXL base 1.0's); ``vae``: a
    separate VAE, used instead of the file's (which is then not converted at all)."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(os.path.expanduser(str(path)))
    kw: dict[str, Any] = dict(cache_dir=cache_dir, **({"vae": vae} if vae is not None else {}))
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    if config is not None:
        kw["config"] = os.path.expanduser(config) if os.path.isdir(os.path.expanduser(config)) else config
    try:
        return StableDiffusionXLPipeline.from_single_file(str(path), **kw)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers, the Hub client and safetensors each raise their own
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if config is None and ("offline" in first.lower() or "connect" in first.lower() or "hub" in first.lower()
                               or "cache" in first.lower() or offline):
            raise UserError(f"{path} is a single-file checkpoint; reading it needs SDXL's layout (the configs and "
                            f"tokenizers of stabilityai/stable-diffusion-xl-base-1.0, a few MB, fetched once), which "
                            f"{'HF_HUB_OFFLINE forbids fetching' if offline else 'could not be fetched'}: run once "
                            f"online, or pass --single_file_config with a diffusers SDXL folder ({first})") from None
        raise UserError(f"could not read {path} as a single-file SDXL checkpoint ({type(exc).__name__}: "
                        f"{first})") from None


# ------------------------------------------------------------------------------------------------------- writing
def unet_to_single_file(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original UNet's names (``model.diffusion_model.input_blocks.4.1...``)."""
    from .lora_tools import _sgm_names

    state = unet.state_dict()
    modules = {k.rpartition(".")[0] for k in state}
    sgm = _sgm_names(modules)
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module not in sgm:
            raise UserError(f"internal: the UNet's {key} has no single-file name")
        out[f"{UNET_PREFIX}{sgm[module]}.{param}"] = tensor
    return out


def _vae_name(key: str, levels: int) -> str:
    rules = [(r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
             (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
             (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
             (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
             (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
             (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."
                                                                        f"{m[2]}."),
             (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
              lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.")]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".mid.attn_1." in key:
        key = (key.replace(".group_norm.", ".norm.").replace(".to_q.", ".q.").replace(".to_k.", ".k.")
               .replace(".to_v.", ".v.").replace(".to_out.0.", ".proj_out."))
    return key


def vae_to_single_file(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights in the LDM autoencoder's names, its mid-block attention as 1x1 convolutions."""
    levels = len(vae.config.down_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = _vae_name(key, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear -> 1x1 convolution, as the original stores it
        out[VAE_PREFIX + name] = tensor
    return out


def _text_model(key: str) -> str:
    """transformers >= 5.6 dropped CLIPTextModel's ``text_model.`` wrapper; single files keep it."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_l_to_single_file(text_encoder) -> dict[str, torch.Tensor]:
    return {CLIP_L_PREFIX + _text_model(k): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_g_to_single_file(text_encoder_2) -> dict[str, torch.Tensor]:
    """OpenCLIP-bigG's names: q, k and v concatenated into in_proj, the text projection transposed."""
    state = {_text_model(k): v for k, v in text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {CLIP_G_PREFIX + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for key, name in fixed.items():
        out[CLIP_G_PREFIX + name] = state.pop(key)
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{CLIP_G_PREFIX}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{kind}")
                                                          for p in ("q", "k", "v")])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = state.pop(f"{src}{a}.{kind}")
    if state:
        raise UserError(f"internal: the second text encoder's {next(iter(state))} has no single-file name")
    return out


def pipeline_to_single_file(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline as one single-file state dict (UNet, VAE, both text encoders)."""
    return {**unet_to_single_file(pipe.unet), **vae_to_single_file(pipe.vae),
            **clip_l_to_single_file(pipe.text_encoder), **clip_g_to_single_file(pipe.text_encoder_2)}


def save_single_file(pipe, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the pipeline as one single-file checkpoint (atomically), optionally cast (fp16: half the size)."""
    from .io import save_safetensors

    state = pipeline_to_single_file(pipe)
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, path,
                     metadata={"format": "pt", **(metadata or {})})
    return Path(path)
