"""LoRA toolbox: inspect, convert (diffusers <-> kohya/webui), SVD rank resize, merge into the base, SVD-based init.

    python -m billiard_lora.lora inspect FILE [--json]
    python -m billiard_lora.lora convert FILE --to kohya|diffusers --out PATH
    python -m billiard_lora.lora resize FILE (--rank N | --energy 0.9) --out PATH
    python -m billiard_lora.lora merge FILE --model MODEL [--vae VAE] --out DIR [--scale 1.0]
    python -m billiard_lora.lora extract --base MODEL --tuned MODEL (--rank N | --energy 0.9) --out PATH  (extract.py)

FILE is a LoRA ``.safetensors`` file or a training output folder (one holding ``pytorch_lora_weights.safetensors``).

A LoRA layer stores two matrices, ``down`` (A, rank x in) and ``up`` (B, out x rank), and a number ``alpha``; the
change it makes to the layer's weight is ``ΔW = B @ A * alpha / rank``. The formats differ only in names:

    diffusers  unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight  (+ config in header)
    peft       down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
    kohya      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (+ ``.alpha``)
"""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import ArgumentParser, UserError, cli_entry
from .lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, METADATA_KEY

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

# How each format names a layer's two matrices: (down suffix, up suffix). Order matters only for readability: no
# suffix is a suffix of another.
_STYLES = (
    (".lora_down.weight", ".lora_up.weight"),  # kohya / webui
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers, text encoders
    (".lora.down.weight", ".lora.up.weight"),  # diffusers, UNet
    ("_lora.down.weight", "_lora.up.weight"),  # diffusers before peft ("attn1.processor.to_q_lora")
    (".lora_A.weight", ".lora_B.weight"),  # peft
)
_DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")

# The parts of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json that decide its module names and shapes.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_ENCODER_LAYERS = (12, 32)  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14


# ============================================================================ reading
@dataclass
class Layer:
    """One adapted module: ``ΔW = up @ down * scale`` (conv kernels flattened to matrices)."""

    name: str  # the key prefix in the file, e.g. "unet.down_blocks.1...to_q" or "lora_unet_down_blocks_1_..._to_q"
    component: str  # "unet", "text_encoder", "text_encoder_2" (or "unknown")
    module: str  # the module's name inside its component, dots kept (kohya names: underscores, as stored)
    down_key: str
    up_key: str
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    rslora: bool = False  # peft's use_rslora: scale = alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW as an (out, in·kh·kw) matrix."""
        up = self.up.reshape(self.up.shape[0], -1).to(dtype)
        return up @ self.down.reshape(self.rank, -1).to(dtype) * self.scale


@dataclass
class LoraFile:
    """A LoRA file parsed into layers; ``tensors`` and ``header`` are the file as stored."""

    path: Path
    format: str  # "diffusers", "peft" or "kohya"
    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    layers: dict[str, Layer]
    adapter_configs: dict[str, dict]  # component -> peft LoraConfig dict (diffusers/peft files that carry one)
    alpha_source: str  # where the alphas came from
    other_keys: list[str] = field(default_factory=list)  # neither a LoRA matrix nor an alpha (DoRA magnitudes, biases)

    @property
    def dora(self) -> bool:
        return any(m in k for k in self.other_keys for m in _DORA_MARKERS)

    @property
    def training_config(self) -> dict | None:
        raw = self.header.get(METADATA_KEY)
        return json.loads(raw) if raw else None


def resolve_lora_path(path: str | Path) -> Path:
    """FILE itself, the LoRA inside a training output folder (diffusers file first, then kohya, then peft), or one
    on the Hugging Face Hub (owner/name[/FILE.safetensors], through the Hub's cache)."""
    from .hub import download_lora, hub_lora

    p = Path(path).expanduser()
    if p.is_dir():
        for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "adapter_model.safetensors"):
            if (p / name).is_file():
                return p / name
        found = sorted(x.name for x in p.glob("*.safetensors"))
        hint = f"; pass one of its files: {', '.join(found[:5])}" if found else " and no other .safetensors file"
        raise UserError(f"{p} is a folder without {LORA_WEIGHT_NAME}{hint}")
    hub = hub_lora(str(path)) if not p.exists() else None
    if hub is not None:
        return download_lora(*hub)
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a LoRA .safetensors file, a training output folder or a Hub repo "
                        f"(owner/name)")
    if p.suffix != ".safetensors":
        raise UserError(f"{p} is not a .safetensors file; only safetensors LoRAs are read (pickled files can run code)")
    return p


def init_lora_settings(config):
    """--init_lora: (the config with the LoRA's own rank and alpha, what changed as notes, the file read). Checked before
    any model loads: one rank and one alpha throughout, the modules training adapts, text-encoder layers only
    with --train_text_encoder, DoRA only with --use_dora."""
    from .lora import LORA_LAYER_GROUPS, TEXT_ENCODER_TARGET_MODULES, unet_lora_layers

    what = f"--init_lora {config.init_lora}"
    try:
        path = resolve_lora_path(config.init_lora)
        lora = load_lora_file(path)
    except UserError as exc:
        raise UserError(f"--init_lora: {exc}") from None
    layers = list(lora.layers.values())
    if not layers:
        raise UserError(f"{what}: {path} holds no LoRA layers")
    if lora.format == "peft":  # (a peft adapter_model file: its keys name no component)
        raise UserError(f"{what}: {path} is a peft adapter file; convert it first (python -m billiard_lora.lora "
                        f"convert {path} --to diffusers --out DIR) and pass DIR")
    if lora.dora and lora.format == "kohya":
        raise UserError(f"{what}: {path} is a kohya DoRA, whose magnitudes diffusers does not load; go on from the "
                        f"diffusers-format file of that run")
    convs = [x for x in layers if x.down.ndim == 4]  # may have a rank and alpha of their own (--conv_rank)
    main = [x for x in layers if x.down.ndim != 4] or convs
    groups = [("its layers", main)] + ([("its convolutions", convs)] if convs and main is not convs else [])
    for label, group in groups:
        ranks, alphas = sorted({x.rank for x in group}), sorted({x.alpha for x in group})
        if len(ranks) > 1 or len(alphas) > 1 or any(x.rslora for x in group):
            raise UserError(f"{what}: {label} have ranks {ranks} and alphas {alphas}; going on training needs one "
                            f"rank and one alpha (and one for the convolutions: --conv_rank; a LoRA resized with "
                            f"--energy has several: resize it with --rank)")
    ranks, alphas = [main[0].rank], [main[0].alpha]
    if lora.dora != config.use_dora:
        raise UserError(f"{what} is {'a DoRA' if lora.dora else 'a plain LoRA'}: "
                        f"{'add' if lora.dora else 'drop'} --use_dora to go on training it")
    components = {x.component for x in layers}
    if not config.train_text_encoder and components - {"unet"}:
        raise UserError(f"{what} has text-encoder LoRA layers: add --train_text_encoder to go on training them "
                        f"(without it they would be dropped)")
    leaf = lambda x: "to_out.0" if _leaf(x) == "to_out" else _leaf(x)  # (an old key style's name for it)
    known = [n for names in LORA_LAYER_GROUPS.values() for n in names]
    allowed = {"unet": set(known), "text_encoder": set(TEXT_ENCODER_TARGET_MODULES),
               "text_encoder_2": set(TEXT_ENCODER_TARGET_MODULES)}
    foreign = sorted({f"{x.component}:{leaf(x)}" for x in layers if leaf(x) not in allowed.get(x.component, ())})
    if foreign:
        raise UserError(f"{what} adapts modules this trainer does not train ({', '.join(foreign[:4])}"
                        f"{', ...' if len(foreign) > 4 else ''}): only the layers of --lora_layers' groups attn, "
                        f"ff, proj and conv, and the text encoders' attention projections")
    notes = []
    in_file = [n for n in known if n in {leaf(x) for x in layers if x.component == "unet"}]
    if in_file and set(in_file) != set(unet_lora_layers(config.lora_layers)):
        if config.lora_layers != "attn":  # asked for other layers than the file has
            raise UserError(f"{what} adapts the UNet's {','.join(in_file)}, --lora_layers={config.lora_layers} "
                            f"others: give --lora_layers={','.join(in_file)} or leave it out")
        notes.append(f"--init_lora: --lora_layers={','.join(in_file)} from {path.name}")
        config = config.replace(lora_layers=",".join(in_file))
    rank, alpha = ranks[0], alphas[0]
    if not float(alpha).is_integer():
        raise UserError(f"{what}: its alpha {alpha:g} is not a whole number, which --lora_alpha needs")
    alpha = int(alpha)
    if (rank, alpha) != (config.rank, config.alpha):
        notes.append(f"--init_lora: rank {rank} and alpha {alpha} from {path.name} (instead of --rank {config.rank}"
                     f", alpha {config.alpha})")
    conv_rank = conv_alpha = None
    if len(groups) > 1 and (convs[0].rank, convs[0].alpha) != (rank, alpha):
        conv_rank, conv_alpha = convs[0].rank, convs[0].alpha
        if not float(conv_alpha).is_integer():
            raise UserError(f"{what}: its convolutions' alpha {conv_alpha:g} is not a whole number, which "
                            f"--conv_alpha needs")
        conv_alpha = int(conv_alpha)
    if (conv_rank, conv_alpha) != (config.conv_rank, config.conv_alpha_value):
        notes.append(f"--init_lora: the convolutions' rank {conv_rank or rank} and alpha {conv_alpha or alpha} from "
                     f"{path.name}")
    return config.replace(rank=rank, lora_alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha), notes, lora


def load_init_lora(source: "str | Path | LoraFile", unet, text_encoders=()) -> None:
    """Copy a LoRA file's weights (diffusers or kohya format, converted by diffusers' own loader) into the peft
    adapters training added, as diffusers' training script restores its checkpoints; every adapter weight must
    come from the file."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    lora = source if isinstance(source, LoraFile) else load_lora_file(source)  # (train() passes the one it read)
    path, expected = lora.path, len(lora.layers)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(path))
    parts = [(unet, convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()
                                                      if k.startswith("unet.")}))]
    for prefix, encoder in zip(("text_encoder.", "text_encoder_2."), text_encoders):
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not hasattr(encoder, "text_model"):  # transformers 5's CLIP: no text_model wrapper (files keep it)
            own = {k.removeprefix("text_model."): v for k, v in own.items()}
        parts.append((encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(own)) if own else {}))
    loaded = 0
    for model, weights in parts:
        if not weights:  # (--train_text_encoder on a UNet-only LoRA: those adapters start as new)
            continue
        try:
            result = set_peft_model_state_dict(model, weights, adapter_name="default")
        except RuntimeError as exc:  # shapes that differ: another base model
            raise UserError(f"--init_lora {path} does not fit this model ({str(exc).strip().splitlines()[-1][:160]})"
                            f"; was it trained on another base model?") from None
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing and not result.unexpected_keys and model is unet:  # a part of the layers: other blocks
            raise UserError(f"--init_lora {path} adapts fewer of the UNet's layers than this run trains (none of, "
                            f"e.g., {missing[0].split('.lora_')[0]}): a LoRA confined to some blocks goes on with the "
                            f"same --use_blora or --lora_unet_blocks")
        if result.unexpected_keys or missing:
            raise UserError(f"--init_lora {path} does not fit this model: {len(missing)} of its adapter weights "
                            f"missing, {len(result.unexpected_keys)} unexpected (e.g. "
                            f"{(missing or result.unexpected_keys)[0]}); was it trained on another base model?")
        loaded += sum(1 for k in weights if ".lora_A." in k or k.endswith(".lora_A.weight"))
    if loaded != expected:  # every layer of the file went somewhere, none was lost on the way
        raise UserError(f"--init_lora {path}: {loaded} of its {expected} LoRA layers could be loaded into this "
                        f"model's adapters")


def _component_of(key: str) -> tuple[str, str]:
    """(component, module-with-rest) from a key; kohya prefixes and diffusers prefixes both understood."""
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder", "lora_te_"),
                         ("text_encoder_2", "lora_te2_")):
        if key.startswith(prefix):
            return comp, key[len(prefix):]
    head, _, rest = key.partition(".")
    if head in COMPONENTS:
        return head, rest
    if key.startswith("base_model.model."):  # peft's save_pretrained of a bare model
        key = key[len("base_model.model."):]
    if re.match(r"(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding|add_embedding)\b", key):
        return "unet", key
    if "encoder.layers." in key:
        return "text_encoder", key
    return "unknown", key


def _detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        # peft's names under diffusers' component prefixes: what diffusers saves for layers its older names do not
        # cover (its newer scripts' --lora_layers, ours), and loads as its own
        if all(k.split(".", 1)[0] in COMPONENTS for k in keys):
            return "diffusers"
        return "peft"
    if any(k.endswith(d) for k in keys for d, _ in _STYLES):
        return "diffusers"
    first = keys[0] if keys else "(no tensors)"
    raise UserError(f"not a LoRA file: it has no lora_down / lora.down / lora_A keys (first key: {first})")


def _adapter_configs(header: Mapping[str, str], path: Path, fmt: str) -> dict[str, dict]:
    """Per-component peft LoraConfig dicts: diffusers keeps them in the header, peft beside the file."""
    if ADAPTER_METADATA_KEY in header:
        flat = json.loads(header[ADAPTER_METADATA_KEY])
        out: dict[str, dict] = {}
        for key, value in flat.items():
            comp, _, name = key.partition(".")
            out.setdefault(comp, {})[name] = value
        return out
    side = path.parent / "adapter_config.json"
    if fmt == "peft" and side.is_file():
        cfg = json.loads(side.read_text())
        return {comp: cfg for comp in (*COMPONENTS, "unknown")}
    return {}


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key: regex matched at the name's end)."""
    if not patterns:
        return default
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def load_lora_file(path: str | Path) -> LoraFile:
    """Read a LoRA (file or training output folder) into layers with their ranks and alphas."""
    from safetensors import safe_open

    path = resolve_lora_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path} could not be read as safetensors ({type(exc).__name__}: {str(exc)[:120]})") from None
    from .lycoris import algo_of, is_lycoris_keys

    if is_lycoris_keys(tensors):
        kind = {"loha": "LoHa", "lokr": "LoKr"}[algo_of(tensors)]
        raise UserError(f"{path} is a LyCORIS {kind}, not a LoRA: convert, combine and --init_lora take LoRAs (a "
                        f"{kind} file already is in the format ComfyUI and A1111 read; `lora resize FILE --rank N "
                        f"--out DIR` makes a LoRA of it); inspect, merge and generate take it as it is")
    try:
        fmt = _detect_format(tensors)
    except UserError as exc:
        raise UserError(f"{path} is {exc}") from None
    configs = _adapter_configs(header, path, fmt)

    layers: dict[str, Layer] = {}
    other: list[str] = []
    for key in tensors:
        for down_suffix, up_suffix in _STYLES:
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                up_key = name + up_suffix
                if up_key not in tensors:
                    raise UserError(f"{path}: {key} has no matching {up_suffix} tensor; the file is incomplete")
                comp, module = _component_of(name)
                layers[name] = Layer(name, comp, module, key, up_key, tensors[key], tensors[up_key], alpha=float("nan"))
                break
        else:
            if not key.endswith(".alpha") and not any(key.endswith(u) for _, u in _STYLES):
                other.append(key)

    if fmt == "kohya":
        source = "stored per layer (.alpha)"
        for layer in layers.values():
            a = tensors.get(f"{layer.name}.alpha")
            layer.alpha = float(a.item()) if a is not None else float(layer.rank)
            if a is None:
                source = "stored per layer; missing ones taken as alpha = rank"
    elif configs:
        source = "peft adapter config (file header)" if ADAPTER_METADATA_KEY in header else "adapter_config.json"
        for layer in layers.values():
            cfg = configs.get(layer.component)
            if cfg is None:
                layer.alpha = float(layer.rank)
                continue
            alpha = _pattern_value(cfg.get("alpha_pattern"), layer.module, cfg.get("lora_alpha", layer.rank))
            layer.alpha = float(alpha)
            layer.rslora = bool(cfg.get("use_rslora", False))
    else:
        source = "not stored: alpha = rank, as diffusers assumes"
        for layer in layers.values():
            layer.alpha = float(layer.rank)
    if not layers:
        raise UserError(f"{path}: no LoRA layers found")
    return LoraFile(path, fmt, tensors, header, layers, configs, source, sorted(other))


# ============================================================================ inspect
_LEAVES = {"to_out_0": "to_out.0", "ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2", "proj_in": "proj_in",
           "proj_out": "proj_out", "time_emb_proj": "time_emb_proj", "conv_shortcut": "conv_shortcut",
           "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "text_projection": "text_projection",
           "downsamplers_0_conv": "downsamplers.0.conv", "upsamplers_0_conv": "upsamplers.0.conv"}


def _leaf(layer: Layer) -> str:
    """The adapted module's own name (to_q, to_out.0, q_proj, ff.net.0.proj, conv1 ...), whatever the key style."""
    m = layer.module.replace(".processor.", ".").removesuffix("_lora").replace(".", "_")
    for leaf, pretty in _LEAVES.items():
        if m == leaf or m.endswith("_" + leaf):
            return pretty
    if found := re.search(r"(to_[a-z]+|(?:q|k|v|out)_proj|linear_\d)$", m):
        return found[1]
    return m.rsplit("_", 1)[-1]


def detect_base_model(lora: LoraFile) -> tuple[str, list[str]]:
    """("SDXL" | "SD1.x" | "SD2.x" | "SD1.x/2.x" | "unknown", evidence) from key names and shapes."""
    names = [(layer.component, layer.module.replace("_", ".")) for layer in lora.layers.values()]
    evidence: list[str] = []
    if any(c == "text_encoder_2" for c, _ in names):
        evidence.append("LoRA on a second text encoder (OpenCLIP bigG)")
    if any("add.embedding" in m or "label.emb" in m for _, m in names):
        evidence.append("LoRA on add_embedding (SDXL's size/crop conditioning)")
    cross = {int(layer.down.shape[1]) for layer in lora.layers.values()
             if layer.component == "unet" and re.search(r"attn2[._](processor[._])?to_k", layer.module)}
    if 2048 in cross:
        evidence.append("cross-attention to_k reads 2048 features (CLIP-L 768 + bigG 1280)")
    if any(c == "unet" and re.search(r"(up\.blocks\.0\.attentions|output\.blocks\.[0-2]\.1\.)", m) for c, m in names):
        evidence.append("attention in the first up block (SD1/2 have none there)")
    if any(c == "unet" and re.search(r"transformer\.blocks\.[1-9]", m) for c, m in names):
        evidence.append("more than one transformer block per attention (SD1/2 have one)")
    if evidence:
        return "SDXL", evidence
    sd12 = []
    if any(c == "unet" and re.search(r"down\.blocks\.0\.attentions|input\.blocks\.[12]\.1\.", m) for c, m in names):
        sd12.append("attention in the first down block (SDXL has none there)")
    if 768 in cross:
        return "SD1.x", sd12 + ["cross-attention to_k reads 768 features (CLIP-L)"]
    if 1024 in cross:
        return "SD2.x", sd12 + ["cross-attention to_k reads 1024 features (OpenCLIP-H)"]
    return ("SD1.x/2.x", sd12) if sd12 else ("unknown", ["no SDXL- or SD1/2-specific layer or shape in the file"])


_STACK = re.compile(r"(?:^|[._])((?:down|up)_blocks[._]\d+[._](?:attentions|resnets)[._]\d+|mid_block[._](?:attentions|resnets)"
                    r"[._]\d+|(?:down|up)_blocks[._]\d+[._](?:down|up)samplers|(?:input|output)_blocks[._]\d+[._]\d+"
                    r"|middle_block[._]\d+)(?:[._]|$)")


def unet_stacks(module_names: Iterable[str]) -> dict[str, int]:
    """The UNet's blocks (transformer stacks, ResNets, samplers; in the name style the keys use) that these adapted
    modules lie in, with how many each, in order of first appearance: what ``lora inspect`` shows as blocks."""
    out: dict[str, int] = {}
    for name in module_names:
        if found := _STACK.search(name):
            stack = re.sub(r"_(?=\d)|(?<=\d)_", ".", found[1]).replace("_attentions", ".attentions") \
                .replace("_resnets", ".resnets").replace("_downsamplers", ".downsamplers") \
                .replace("_upsamplers", ".upsamplers")
            out[stack] = out.get(stack, 0) + 1
    return out


def inspect_lora(path: str | Path, *, unet_config_or_module_names: Any = None,
                 text_encoder_layers: tuple[int, int] = SDXL_TEXT_ENCODER_LAYERS) -> dict[str, Any]:
    """Everything worth knowing about a LoRA file, as a JSON-ready dict (see ``format_inspect`` for the text)."""
    if _is_lycoris_file(path):
        return inspect_lycoris(path, unet_config_or_module_names=unet_config_or_module_names,
                               text_encoder_layers=text_encoder_layers)
    lora = load_lora_file(path)
    family, evidence = detect_base_model(lora)
    layers = list(lora.layers.values())
    per_comp = collections.Counter(layer.component for layer in layers)
    targets: dict[str, list[str]] = {}
    for layer in layers:
        targets.setdefault(layer.component, [])
        if _leaf(layer) not in targets[layer.component]:
            targets[layer.component].append(_leaf(layer))
    fmt_num = lambda x: int(x) if float(x).is_integer() else round(float(x), 6)  # noqa: E731
    report: dict[str, Any] = {
        "file": str(lora.path),
        "format": lora.format,
        "base_model": family,
        "base_model_evidence": evidence,
        "layers": dict(per_comp),
        "target_modules": {c: sorted(v) for c, v in targets.items()},
        "ranks": {str(k): v for k, v in sorted(collections.Counter(layer.rank for layer in layers).items())},
        "alphas": {str(fmt_num(k)): v for k, v in sorted(collections.Counter(layer.alpha for layer in layers).items())},
        "scales": {str(fmt_num(k)): v
                   for k, v in sorted(collections.Counter(round(layer.scale, 6) for layer in layers).items())},
        "alpha_source": lora.alpha_source,
        "parameters": sum(t.numel() for k, t in lora.tensors.items() if not k.endswith(".alpha")),
        "dtype": str(next(iter(lora.tensors.values())).dtype).replace("torch.", ""),
        "text_encoder_lora": any(c.startswith("text_encoder") for c in per_comp),
        "conv_layers": sum(layer.down.ndim == 4 for layer in layers),
        "unet_blocks": unet_stacks(layer.module for layer in layers if layer.component == "unet"),
        "dora": lora.dora,
        "other_keys": lora.other_keys[:20],
        "training_config": lora.training_config,
        "kohya_metadata": {k: v for k, v in lora.header.items() if k.startswith("ss_")},
        "per_layer": [{"name": layer.name, "rank": layer.rank, "alpha": fmt_num(layer.alpha),
                       "shape": [int(layer.up.shape[0]), int(layer.down[0].numel())]} for layer in layers],
    }
    warnings = []
    zero = [layer.name for layer in layers if not layer.up.any() or not layer.down.any()]
    if zero:
        warnings.append(f"{len(zero)} layer(s) are all zero (never trained, e.g. a text-encoder layer whose output "
                        f"SDXL does not use): {zero[0]}" + (" ..." if len(zero) > 1 else ""))
    inits = {c: cfg.get("init_lora_weights") for c, cfg in lora.adapter_configs.items()}
    for comp, init in inits.items():
        if is_mutating_init(init):
            warnings.append(f"{comp}: the adapter config says init_lora_weights={init}; diffusers re-runs that "
                            "initialisation on the base model when loading (changing its weights, or failing). If "
                            "this is a PiSSA/OLoRA adapter saved without the delta conversion, it is only valid on "
                            "the residual model; save with lora_tools.save_pissa_lora instead")
    if lora.dora:
        warnings.append("DoRA: convert --to kohya and resize refuse it (magnitude conventions differ / need full rank)")
    report["warnings"] = warnings
    from .pivotal import ENCODER_KEYS, find_embeddings, read_embeddings

    emb = find_embeddings(lora.path)  # pivotal tuning's token embeddings, beside the LoRA
    if emb is not None:
        try:
            state, mapping = read_embeddings(emb)
            report["token_embeddings"] = {"file": str(emb), "tokens": mapping,
                                          "shapes": {k: list(state[k].shape) for k in ENCODER_KEYS}}
        except UserError as exc:
            warnings.append(str(exc))
    if family == "SDXL" or unet_config_or_module_names is not None:
        report["loads_in"] = _loads_in(lora.tensors, unet_config_or_module_names, text_encoder_layers)
    return report


def _loads_in(tensors: Mapping[str, Any], unet_config_or_module_names: Any,
              text_encoder_layers: tuple[int, int]) -> dict[str, Any]:
    """inspect's verdict on whether ComfyUI's and A1111's loaders find every key (``kohya_key_report``)."""
    keys = kohya_key_report(tensors, unet_config_or_module_names or SDXL_UNET_CONFIG,
                            text_encoder_layers=text_encoder_layers)
    return {"checked_against": "the given model" if unet_config_or_module_names is not None
            else "SDXL base 1.0 layout", "keys": keys.total,
            "comfyui_not_loaded": len(keys.comfyui), "a1111_not_loaded": len(keys.a1111),
            "comfyui_examples": keys.comfyui[:5], "a1111_examples": keys.a1111[:5]}


def _is_lycoris_file(path: str | Path) -> bool:
    from safetensors import safe_open

    from .lycoris import is_lycoris_keys

    try:
        with safe_open(str(resolve_lora_path(path)), framework="pt") as f:
            return is_lycoris_keys(f.keys())
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - not safetensors: load_lora_file says so in its own words
        return False


def inspect_lycoris(path: str | Path, *, unet_config_or_module_names: Any = None,
                    text_encoder_layers: tuple[int, int] = SDXL_TEXT_ENCODER_LAYERS) -> dict[str, Any]:
    """``inspect_lora``'s report for a LyCORIS LoHa/LoKr file: layers, ranks, alphas and scales as ComfyUI and A1111
    apply them, parameters, and whether their loaders find every layer."""
    from safetensors import safe_open

    from .lycoris import PARTS, algo_of, component_of, lycoris_scale, split_modules

    path = resolve_lora_path(path)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    algo = algo_of(tensors)
    modules = split_modules(tensors)
    fmt_num = lambda x: int(x) if float(x).is_integer() else round(float(x), 6)  # noqa: E731
    per_comp, targets, ranks, alphas, scales, full = (collections.Counter(), {}, collections.Counter(),
                                                      collections.Counter(), collections.Counter(), 0)
    for name, parts in modules.items():
        comp = component_of(name) or "unknown"
        per_comp[comp] += 1
        leaf = next((t for t in ("downsamplers_0_conv", "upsamplers_0_conv", "conv_shortcut", "to_q", "to_k", "to_v",
                                 "to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in",
                                 "proj_out", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2") if
                     name.endswith("_" + t)), name.rsplit("_", 1)[-1])
        targets.setdefault(comp, set()).add(leaf)
        low = [parts[p] for p in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b") if p in parts]
        if low:
            ranks[int(low[0].shape[0])] += 1
        else:
            full += 1
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        alphas["none" if alpha is None else fmt_num(alpha)] += 1
        scales[fmt_num(round(lycoris_scale(parts, alpha), 6))] += 1
    config = header.get(METADATA_KEY)
    evidence = [f"kohya metadata: {header['ss_base_model_version']}"] if "ss_base_model_version" in header else []
    evidence += ["second text encoder (lora_te2_)"] if "text_encoder_2" in per_comp else []
    sdxl = any("sdxl" in e for e in evidence) or bool(evidence and "lora_te2_" in evidence[-1])
    report: dict[str, Any] = {
        "file": str(path), "format": f"LyCORIS {'LoKr' if algo == 'lokr' else 'LoHa'} (kohya names)",
        "base_model": "SDXL" if sdxl else "unknown", "base_model_evidence": evidence, "dora": False,
        "alpha_source": "stored per layer (.alpha)" if "none" not in alphas else "none stored: scale 1",
        "other_keys": [k for k in tensors if not any(k.endswith("." + p) for p in (*PARTS["loha"], *PARTS["lokr"],
                                                                                    "alpha"))],
        "layers": dict(per_comp), "target_modules": {c: sorted(v) for c, v in targets.items()},
        "ranks": {**{str(k): v for k, v in sorted(ranks.items())}, **({"full": full} if full else {})},
        "alphas": {str(k): v for k, v in alphas.items()}, "scales": {str(k): v for k, v in sorted(scales.items())},
        "parameters": sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha")),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "text_encoder_lora": any(c.startswith("text_encoder") for c in per_comp),
        "conv_layers": sum(bool(re.search(r"(conv\d?|conv_shortcut|in_layers_2|out_layers_3|skip_connection|_op)$", n))
                           for n in modules),
        "unet_blocks": unet_stacks(n for n in modules if component_of(n) == "unet"),
        "training_config": json.loads(config) if config else None,
        "kohya_metadata": {k: v for k, v in header.items() if k.startswith("ss_")},
        "warnings": [],
    }
    if report["base_model"] == "SDXL" or unet_config_or_module_names is not None:
        report["loads_in"] = _loads_in(tensors, unet_config_or_module_names, text_encoder_layers)
    return report


def format_inspect(r: dict[str, Any]) -> str:
    """The inspect report as a few aligned lines."""
    counts = lambda d: ", ".join(f"{k} (x{v})" for k, v in d.items())  # noqa: E731
    lines = [
        ("file", r["file"]),
        ("format", r["format"] + (" (DoRA)" if r["dora"] else "")),
        ("base model", f"{r['base_model']}: " + "; ".join(r["base_model_evidence"])),
        ("layers", f"{sum(r['layers'].values())}: " + ", ".join(f"{c} {n}" for c, n in r["layers"].items())),
        ("targets", "; ".join(f"{c}: {', '.join(v)}" for c, v in r["target_modules"].items())),
        ("rank", counts(r["ranks"])),
        ("alpha", f"{counts(r['alphas'])}  [{r['alpha_source']}]"),
        ("scale", counts(r["scales"]) + ("  (as ComfyUI and A1111 apply it)" if r["format"].startswith("LyCORIS")
                                         else "  (alpha / rank; multiplies B @ A)")),
        ("parameters", f"{r['parameters']:,} ({r['dtype']})"),
        ("text encoder", "yes" if r["text_encoder_lora"] else "no (UNet only)"),
    ]
    if r["conv_layers"]:
        lines.append(("conv layers", str(r["conv_layers"])))
    blocks = r.get("unet_blocks") or {}
    if 0 < len(blocks) <= 6:  # a LoRA confined to a few blocks (--lora_unet_blocks, B-LoRA); else just the count
        blora = sorted(blocks) in (["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"],
                                   ["output_blocks.0.1", "output_blocks.1.1"])
        lines.append(("unet blocks", ", ".join(blocks) + ("  (a B-LoRA: content, style)" if blora else "")))
    elif blocks:
        lines.append(("unet blocks", f"{len(blocks)}"))
    if "token_embeddings" in r:
        te = r["token_embeddings"]
        lines.append(("tokens", ", ".join(f"{k} -> {''.join(v)}" for k, v in te["tokens"].items())
                      + f"  ({Path(te['file']).name}: " + ", ".join(f"{k} {'x'.join(map(str, s))}"
                                                             for k, s in te["shapes"].items()) + ")"))
    if r["other_keys"]:
        lines.append(("other keys", ", ".join(r["other_keys"][:3]) + (" ..." if len(r["other_keys"]) > 3 else "")))
    if "loads_in" in r:
        li = r["loads_in"]
        verdict = lambda n: "all keys load" if n == 0 else f"{n} of {li['keys']} keys would NOT load"  # noqa: E731
        hint = "  (python -m billiard_lora.lora convert FILE --to kohya)" if r["format"] != "kohya" and (
            li["comfyui_not_loaded"] or li["a1111_not_loaded"]) else ""
        lines.append(("ComfyUI", verdict(li["comfyui_not_loaded"]) + f" [{li['checked_against']}]" + hint))
        lines.append(("A1111", verdict(li["a1111_not_loaded"]) + f" [{li['checked_against']}]"))
    lines += [("warning", w) for w in r.get("warnings", [])]
    cfg = r["training_config"]
    if cfg:
        shown = ("pretrained_model_name_or_path", "instance_prompt", "resolution", "rank", "lora_alpha",
                 "learning_rate", "max_train_steps", "train_text_encoder", "init_lora_weights", "seed", "global_step")
        lines.append(("training", ", ".join(f"{k}={cfg[k]}" for k in shown if k in cfg) + "  (all of it: --json)"))
    else:
        lines.append(("training", "no billiard-lora training config in the header"))
    if r["kohya_metadata"]:
        lines.append(("kohya meta", ", ".join(f"{k}={v}" for k, v in list(r["kohya_metadata"].items())[:6])))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


# ============================================================================ ComfyUI / A1111 key rules
# comfy/lora.py LORA_CLIP_MAP: the CLIP text-encoder modules ComfyUI builds kohya names for.
_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
_RESNET_TO_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # comfy/utils.py UNET_MAP_RESNET
_BASIC_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                 "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                 "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
_ATTN_INNER = re.compile(r"(proj_in|proj_out|norm|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_(q|k|v|out\.0)"
                         r"|ff\.net\.0\.proj|ff\.net\.2))")  # comfy/utils.py UNET_MAP_ATTENTIONS + TRANSFORMER_BLOCKS
# A1111 extensions-builtin/Lora/networks.py: the module parts its network_lora accepts for a matched layer.
_KOHYA_PARTS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale")
# LyCORIS' LoHa and LoKr parts (comfy/weight_adapter/loha.py, lokr.py; A1111's network_hada.py, network_lokr.py)
_LYCORIS_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                  "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _a1111_layer_complete(base: str, keys: set[str]) -> bool:
    """A1111 builds a module for a layer from a complete set of parts: LoRA's up and down, LoHa's four hada
    matrices, or LoKr's two factors (each whole or as _a and _b)."""
    has = lambda part: f"{base}.{part}" in keys  # noqa: E731
    if has("lora_up.weight") and has("lora_down.weight"):
        return True
    if all(has(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return True
    return all(has(f"lokr_w{i}") or (has(f"lokr_w{i}_a") and has(f"lokr_w{i}_b")) for i in (1, 2))


def unet_module_names(unet_config_or_model: Any) -> list[str]:
    """Diffusers names of the UNet's modules that hold a weight, from a config (built on the meta device) or a UNet."""
    model = getattr(unet_config_or_model, "unet", unet_config_or_model)  # a pipeline
    if not hasattr(model, "named_modules"):
        from diffusers import UNet2DConditionModel

        config = dict(getattr(model, "config", model))
        with torch.device("meta"):  # no memory, no weights: only the module tree
            model = UNet2DConditionModel.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]


def _sgm_names(unet_names: Iterable[str]) -> dict[str, str]:
    """diffusers module name -> the original (SGM/LDM) UNet's name, as ComfyUI's comfy/utils.py unet_to_diffusers
    lays it out; modules it has no mapping for are left out (ComfyUI builds no key for them either)."""
    names = [n.removeprefix("unet.") for n in unet_names]
    resnets = [int(m[1]) for n in names if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", n))]
    per_level = (max(resnets) + 1 if resnets else 2) + 1  # layers_per_block resnets + one downsampler/upsampler slot
    up_attn = {int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))}
    out: dict[str, str] = {}
    for n in names:
        if n in _BASIC_TO_SGM:
            out[n] = _BASIC_TO_SGM[n]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", n):
            side, x, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            idx = (1 if side == "down" else 0) + per_level * x + i
            blocks = "input_blocks" if side == "down" else "output_blocks"
            if part == "resnets" and rest in _RESNET_TO_SGM:
                out[n] = f"{blocks}.{idx}.0.{_RESNET_TO_SGM[rest]}"
            elif part == "attentions" and _ATTN_INNER.fullmatch(rest):
                out[n] = f"{blocks}.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", n):
            out[n] = f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", n):
            x = int(m[1])
            out[n] = f"output_blocks.{per_level * x + per_level - 1}.{2 if x in up_attn else 1}.conv"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", n):
            if _ATTN_INNER.fullmatch(m[1]):
                out[n] = f"middle_block.1.{m[1]}"
        elif (m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", n)) and m[2] in _RESNET_TO_SGM:
            out[n] = f"middle_block.{2 * int(m[1])}.{_RESNET_TO_SGM[m[2]]}"
    return out


def _comfyui_key_map(sgm: Mapping[str, str], te_layers: tuple[int, int]) -> set[str]:
    """The LoRA layer names comfy/lora.py model_lora_keys_unet + model_lora_keys_clip accept for an SDXL model."""
    keys = set()
    for d, s in sgm.items():
        keys.add("lora_unet_" + s.replace(".", "_"))  # names of the model's own (SGM) modules
        keys.add("lora_unet_" + d.replace(".", "_"))  # diffusers names, kohya-style
        old = d.replace(".to_", ".processor.to_")  # the pre-peft diffusers naming, with and without "unet."
        old = old[:-2] if old.endswith(".to_out.0") else old
        keys |= {old, "unet." + old}
    for i, n in enumerate(te_layers):  # clip_l (te1) and clip_g (te2), layer indices below 32 only
        for b in range(min(n, 32)):
            for dotted, kohya in _LORA_CLIP_MAP.items():
                if i == 0:
                    keys |= {f"lora_te_text_model_encoder_layers_{b}_{kohya}",
                             f"lora_te1_text_model_encoder_layers_{b}_{kohya}",
                             f"text_encoder.text_model.encoder.layers.{b}.{dotted}"}
                else:
                    keys |= {f"lora_te2_text_model_encoder_layers_{b}_{kohya}",
                             f"text_encoder_2.text_model.encoder.layers.{b}.{dotted}"}
    keys |= {"lora_te1_text_projection", "lora_te2_text_projection"}
    return keys


def _comfyui_loads(key: str, key_map: set[str], keys: set[str]) -> bool:
    """comfy/lora.py load_lora: a key loads when its layer name is in the key map under a suffix it knows."""
    pairs = (("lora_up.weight", "lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
             ("lora_B.weight", "lora_A.weight"), ("lora.up.weight", "lora.down.weight"),
             ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"))
    for up, down in pairs:
        for mine, other in ((up, down), (down, up)):
            sep = "" if mine.startswith("_") else "."
            if key.endswith(sep + mine):
                base = key[: -len(sep + mine)]
                return base in key_map and f"{base}{sep}{other}" in keys
    for part in ("alpha", "dora_scale", "lora_mid.weight", *_LYCORIS_PARTS):  # (comfy/weight_adapter: LoHa, LoKr)
        if key.endswith("." + part):
            return key[: -len(part) - 1] in key_map
    return False


def _a1111_compvis(key: str) -> str:
    """extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (is_sd2=False), rule for rule."""
    res = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    suffix = lambda kind, rest: res.get(rest, rest) if kind == "resnets" else rest  # noqa: E731
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_input_blocks_"
         f"{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_middle_block_"
         f"{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_output_blocks_"
         f"{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"1_model_transformer_resblocks_{m[1]}_"
         + m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
    )
    for pattern, build in rules:
        if m := re.match(pattern, key):
            return build(m)
    return key


def _a1111_layer_names(sgm: Mapping[str, str], te_layers: tuple[int, int]) -> set[str]:
    """SDXL's network_layer_mapping: the LDM UNet's modules, CLIP-L (embedder 0) and OpenCLIP bigG (embedder 1)."""
    names = {"diffusion_model_" + s.replace(".", "_") for s in sgm.values()}
    for b in range(te_layers[0]):
        names |= {f"0_transformer_text_model_encoder_layers_{b}_{k}" for k in _LORA_CLIP_MAP.values()}
    for b in range(te_layers[1]):  # open_clip: q/k/v live inside one MultiheadAttention ("attn")
        names |= {f"1_model_transformer_resblocks_{b}_{k}" for k in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}
    return names


def _a1111_finds(base: str, layer_names: set[str]) -> bool:
    """load_network's lookup: converted name, then its [qkv]_proj parent, then the lora_unet/lora_te1 fallbacks."""
    key = _a1111_compvis(base)
    if key in layer_names:
        return True
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in layer_names:
        return True
    if "lora_unet" in base:
        return base.replace("lora_unet", "diffusion_model") in layer_names
    if "lora_te1_text_model" in base:
        return (base.replace("lora_te1_text_model", "0_transformer_text_model") in layer_names
                or base.replace("lora_te1_text_model", "transformer_text_model") in layer_names)
    return False


@dataclass
class KeyReport:
    """Which keys of a LoRA file ComfyUI's and A1111's SDXL LoRA loaders would not load."""

    total: int
    comfyui: list[str]  # keys ComfyUI would report as "lora key not loaded"
    a1111: list[str]  # keys A1111 would put in keys_failed_to_match (or drop with their layer)

    @property
    def ok(self) -> bool:
        return not self.comfyui and not self.a1111

    def summary(self) -> str:
        def part(who: str, bad: list[str]) -> str:
            return f"{who}: " + ("all load" if not bad else f"{len(bad)} not loaded, e.g. {bad[0]}")

        return f"{self.total} keys; {part('ComfyUI', self.comfyui)}; {part('A1111', self.a1111)}"


def kohya_key_report(state_dict: Mapping[str, Any] | Iterable[str], unet_config_or_module_names: Any = None, *,
                     text_encoder_layers: tuple[int, int] = SDXL_TEXT_ENCODER_LAYERS) -> KeyReport:
    """Check every key against the names ComfyUI's and A1111's SDXL LoRA loaders build for a model.

    ``unet_config_or_module_names``: a diffusers UNet config (dict), a UNet or pipeline, or the UNet's diffusers
    module names; default SDXL base 1.0. ``text_encoder_layers``: layer counts of CLIP-L and bigG (a pipeline passed
    as the second argument supplies its own). Rules reproduced from comfy/lora.py (model_lora_keys_unet,
    model_lora_keys_clip, load_lora), comfy/utils.py (unet_to_diffusers) and A1111's
    extensions-builtin/Lora/networks.py (convert_diffusers_name_to_compvis, load_network).
    """
    target = SDXL_UNET_CONFIG if unet_config_or_module_names is None else unet_config_or_module_names
    if hasattr(target, "text_encoder") and hasattr(target, "text_encoder_2"):  # a pipeline knows its own depths
        text_encoder_layers = (target.text_encoder.config.num_hidden_layers,
                               target.text_encoder_2.config.num_hidden_layers)
    if isinstance(target, Mapping) or hasattr(target, "named_modules") or hasattr(target, "config"):
        names = unet_module_names(target)
    else:
        names = list(target)
    sgm = _sgm_names(names)
    comfy = _comfyui_key_map(sgm, text_encoder_layers)
    a1111 = _a1111_layer_names(sgm, text_encoder_layers)
    keys = set(state_dict.keys() if isinstance(state_dict, Mapping) else state_dict)

    bad_comfy = sorted(k for k in keys if not _comfyui_loads(k, comfy, keys))
    bad_a1111 = []
    for k in sorted(keys):
        base, _, part = k.partition(".")
        if part not in (*_KOHYA_PARTS, *_LYCORIS_PARTS) or not _a1111_layer_complete(base, keys) \
                or not _a1111_finds(base, a1111):
            bad_a1111.append(k)
    return KeyReport(len(keys), bad_comfy, bad_a1111)


# ============================================================================ convert
def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def lora_config_dict(ranks: Mapping[str, int], alphas: Mapping[str, float], *, base: Mapping[str, Any] | None = None,
                     use_dora: bool = False) -> dict[str, Any]:
    """A peft LoraConfig dict (what diffusers stores in the header) for per-module ranks and alphas.

    The most common rank/alpha become ``r``/``lora_alpha``; the others go into ``rank_pattern``/``alpha_pattern``
    keyed by full module name. Text-encoder names lose "text_model." so that peft's end-of-name matching finds the
    module whether or not the installed transformers wraps CLIPTextModel in ``.text_model``.
    """
    from peft import LoraConfig

    strip = lambda m: m.removeprefix("text_model.")  # noqa: E731
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    kw = dict(base or {})
    for k in ("peft_type", "auto_mapping", "revision", "task_type", "runtime_config"):
        kw.pop(k, None)
    kw.update(r=r, lora_alpha=alpha, target_modules=sorted({strip(m) for m in ranks}), use_dora=use_dora,
              rank_pattern={strip(m): v for m, v in ranks.items() if v != r},
              alpha_pattern={strip(m): (int(a) if float(a).is_integer() else a)
                             for m, a in alphas.items() if a != alpha},
              use_rslora=False, init_lora_weights=True)
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in kw.items() if k in known}).to_dict()


def write_lora(out_file: str | Path, layers: Mapping[str, Mapping[str, torch.Tensor]],
               configs: Mapping[str, Mapping[str, Any]], *, header: Mapping[str, str] | None = None,
               precision: str | None = None) -> Path:
    """Write a diffusers-format LoRA through diffusers' ``save_lora_weights``.

    ``layers``: component -> peft state dict (``module.lora_A.weight`` / ``lora_B``), ``configs``: component ->
    LoraConfig dict; ``header`` entries are added to the safetensors header (e.g. the training config);
    ``precision``: fp32, fp16 or bf16 (default: the tensors' own).
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from .io import save_safetensors
    from .lora import diffusers_names

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {}
    for comp, sd in layers.items():
        if sd:
            kw[f"{comp}_lora_layers"] = diffusers_names(sd)
            kw[f"{comp}_lora_adapter_metadata"] = dict(configs[comp])
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".lora-") as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, **kw, weight_name=out_file.name)
        with safe_open(str(Path(tmp) / out_file.name), framework="pt") as f:
            written = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_safetensors(tensors, out_file, metadata={**(header or {}), **written}, precision=precision)
    return out_file


def _to_peft(component: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own converters to peft naming, picked per component rather than guessed from the keys.

    (``convert_all_state_dict_to_peft`` guesses one style for the whole dict: given UNet and text-encoder keys
    together it converts only the text encoders, and a text-encoder dict without an ``out_proj`` layer is not
    recognised at all. That guess is why ``lora.save_lora(kohya=True)`` writes unloadable UNet keys when the text
    encoders are trained too.)
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    if component == "unet":
        return convert_unet_state_dict_to_peft(dict(state_dict))
    # DIFFUSERS_OLD's table covers both text-encoder spellings: "to_q_lora.down" and "lora_linear_layer.down"
    return convert_state_dict_to_peft(dict(state_dict), original_type=StateDictType.DIFFUSERS_OLD)


def _clip_canonical(module: str) -> str:
    """CLIP text-encoder module names as every webui loader spells them: ``text_model.encoder.layers.N...``.
    (transformers 5's CLIPTextModel has no ``.text_model`` wrapper, so its own names lack the prefix.)"""
    return "text_model." + module if module.startswith(("encoder.", "embeddings.", "final_layer_norm")) else module


def _peft_pairs(lora: LoraFile) -> list[tuple[Layer, str, dict[str, torch.Tensor]]]:
    """Each layer as (layer, module, {module.lora_A.weight, module.lora_B.weight}) in peft naming, converted one
    layer at a time by diffusers' converters (so every key style maps the same way and names stay paired)."""
    if lora.dora or lora.other_keys:
        raise UserError(f"{lora.path} has keys that are not LoRA matrices ({lora.other_keys[0]} ...); not converted")
    out = []
    for layer in lora.layers.values():
        if layer.component not in COMPONENTS:
            raise UserError(f"{lora.path}: cannot tell which model {layer.down_key} belongs to (no unet. / "
                            "text_encoder. / text_encoder_2. prefix)")
        down_suffix, up_suffix = layer.down_key[len(layer.name):], layer.up_key[len(layer.name):]
        pair = _to_peft(layer.component, {layer.module + down_suffix: layer.down, layer.module + up_suffix: layer.up})
        if layer.component.startswith("text_encoder"):
            pair = {_clip_canonical(k): v for k, v in pair.items()}
        module = next(k for k in pair if k.endswith(".lora_A.weight"))[: -len(".lora_A.weight")]
        out.append((layer, module, pair))
    return out


def to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) in kohya/webui naming, via diffusers' peft converters + ``convert_state_dict_to_kohya``.

    Alphas are the file's true ones (diffusers' converter writes alpha = rank); text-encoder names get CLIP's
    canonical ``text_model.`` (transformers 5 dropped that wrapper, but every webui loader expects it).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    if lora.format == "kohya":
        return dict(lora.tensors), dict(lora.header)
    if lora.dora:
        raise UserError("DoRA LoRAs are not converted to kohya: kohya/LyCORIS normalise the DoRA magnitude per input "
                        "column, peft per output row, so the file would load with a different effect")
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for layer, module, pair in _peft_pairs(lora):
        peft_sd.update({f"{layer.component}.{k}": v for k, v in pair.items()})
        # kohya's scale is alpha / rank; scale · rank also carries an rsLoRA scale over
        alphas[f"{KOHYA_PREFIX[layer.component]}_{module.replace('.', '_')}"] = layer.scale * layer.rank
    kohya = convert_state_dict_to_kohya(peft_sd)
    for name, alpha in alphas.items():
        if f"{name}.alpha" not in kohya:
            raise UserError(f"internal: diffusers' kohya converter did not produce {name}; cannot set its alpha")
        kohya[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    family, _ = detect_base_model(lora)
    layers = list(lora.layers.values())
    header = {"format": "pt", "ss_network_module": "networks.lora",
              "ss_network_dim": str(_most_common(layer.rank for layer in layers)),
              "ss_network_alpha": f"{_most_common(layer.scale * layer.rank for layer in layers):g}"}
    if family == "SDXL":
        header["ss_base_model_version"] = "sdxl_base_v1-0"
    if METADATA_KEY in lora.header:
        header[METADATA_KEY] = lora.header[METADATA_KEY]
    return kohya, header


def kohya_to_diffusers(lora: LoraFile, unet_config: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """(component -> peft state dict, component -> LoraConfig dict) from a kohya file, through diffusers' own
    ``lora_state_dict`` conversion; alphas come from ``network_alphas`` and land in the adapter config (not baked
    into the weights). ``unet_config`` maps SGM block names (real kohya SDXL files); default SDXL base."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    if lora.dora:
        raise UserError("DoRA kohya LoRAs are not converted: diffusers drops their dora_scale when loading")
    tensors = {k: v for k, v in lora.tensors.items()}
    try:
        state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
            tensors, unet_config=SimpleNamespace(**dict(unet_config or SDXL_UNET_CONFIG)))
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"diffusers cannot read {lora.path} as kohya: {first}") from None
    network_alphas = network_alphas or {}

    layers: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, dict[str, int]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key in state_dict:
        down_suffix = next((d for d, _ in _STYLES if key.endswith(d)), None)
        if down_suffix is None:
            continue
        up_key = key[: -len(down_suffix)] + dict(_STYLES)[down_suffix]
        comp, rest = key.split(".", 1)
        pair = {rest: state_dict[key], up_key.split(".", 1)[1]: state_dict[up_key]}
        pair = _to_peft(comp, pair)
        a_key = next(k for k in pair if k.endswith(".lora_A.weight"))
        module = a_key[: -len(".lora_A.weight")]
        alpha = network_alphas.get(f"{key}.alpha", network_alphas.get(key.split(".lora.")[0] + ".alpha"))
        if alpha is None:
            raise UserError(f"internal: no alpha found for {key} in diffusers' network_alphas")
        layers.setdefault(comp, {}).update(pair)
        ranks.setdefault(comp, {})[module] = int(pair[a_key].shape[0])
        alphas.setdefault(comp, {})[module] = float(alpha)
    if sum(len(v) for v in ranks.values()) != len(lora.layers):
        raise UserError(f"internal: diffusers converted {sum(len(v) for v in ranks.values())} of "
                        f"{len(lora.layers)} layers of {lora.path}")
    configs = {comp: lora_config_dict(ranks[comp], alphas[comp]) for comp in layers}
    return layers, configs


def _output_file(out: str | Path, default_name: str, source: Path, what: str, overwrite: bool = False) -> Path:
    """--out as a file: a .safetensors path, or ``default_name`` in the folder it names; never the input ``source``,
    nor an existing file (a run's own LoRA, say) unless ``overwrite``."""
    from .io import check_new_file, check_out_folder

    out = Path(out).expanduser()
    file = out if out.suffix == ".safetensors" else out / default_name
    if file.resolve() == source.resolve():
        raise UserError(f"--out {file} is the input file; write the {what} LoRA somewhere else")
    if out.suffix != ".safetensors":
        check_out_folder(out, "--out")
    return check_new_file(file, "--out", overwrite=overwrite)


def convert_lora(path: str | Path, to: str, out: str | Path, *, unet_config: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Convert FILE to ``to`` ("kohya" or "diffusers") and write it to ``out`` (a .safetensors path or a folder)."""
    from .io import save_safetensors

    if to not in ("kohya", "diffusers"):
        raise UserError(f"--to must be kohya or diffusers, not {to!r}")
    lora = load_lora_file(path)
    out_file = _output_file(out, KOHYA_WEIGHT_NAME if to == "kohya" else LORA_WEIGHT_NAME, lora.path, "converted",
                            overwrite)
    if to == "kohya":
        tensors, header = to_kohya(lora)
        save_safetensors(tensors, out_file, metadata=header)
        return out_file
    if lora.format == "kohya":
        layers, configs = kohya_to_diffusers(lora, unet_config)
    else:  # diffusers / peft -> diffusers: normalised through peft naming, ranks and alphas kept per layer
        layers, ranks, alphas = {}, {}, {}
        for layer, module, pair in _peft_pairs(lora):
            layers.setdefault(layer.component, {}).update(pair)
            ranks.setdefault(layer.component, {})[module] = layer.rank
            alphas.setdefault(layer.component, {})[module] = layer.scale * layer.rank  # rsLoRA baked into alpha
        configs = {c: lora_config_dict(ranks[c], alphas[c], base=lora.adapter_configs.get(c)) for c in layers}
    keep = {k: v for k, v in lora.header.items() if k == METADATA_KEY or k.startswith("ss_")}
    return write_lora(out_file, layers, configs, header=keep)


# ============================================================================ resize
@dataclass
class ResizedLayer:
    name: str
    rank: int
    new_rank: int
    energy: float  # fraction of ||ΔW||_F² kept
    singular_values: torch.Tensor  # all of them, descending (float64)


def svd_factors(layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ΔW = scale · B @ A, exact, in float64, without forming the (out x in) matrix:
    B = Qb·Rb and Aᵀ = Qa·Ra, so ΔW = Qb (scale·Rb·Raᵀ) Qaᵀ and only an r x r SVD is needed."""
    b = layer.up.reshape(layer.up.shape[0], -1).to(torch.float64)  # (out, r)
    a = layer.down.reshape(layer.rank, -1).to(torch.float64)  # (r, in)
    qb, rb = torch.linalg.qr(b)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(layer.scale * rb @ ra.T)
    return qb @ u, s, vh @ qa.T  # (out, r), (r,), (r, in)


def choose_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """How many singular values to keep: ``rank`` (capped at what there is) or the fewest reaching ``energy``."""
    if rank is not None:
        return max(1, min(rank, len(s)))
    total = float((s**2).sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(s**2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def resize_layer(layer: Layer, *, rank: int | None = None, energy: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, ResizedLayer]:
    """(down', up', info): ``up' = U_k·sqrt(S_k)``, ``down' = sqrt(S_k)·V_kᵀ``, meant for alpha' = k (scale 1)."""
    u, s, vh = svd_factors(layer)
    k = choose_rank(s, rank=rank, energy=energy)
    root = torch.sqrt(s[:k])
    up = (u[:, :k] * root).reshape(layer.up.shape[0], k, *layer.up.shape[2:]).to(layer.up.dtype)
    down = (root[:, None] * vh[:k]).reshape(k, *layer.down.shape[1:]).to(layer.down.dtype)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return down.contiguous(), up.contiguous(), ResizedLayer(layer.name, layer.rank, k, kept, s)


def check_rank_or_energy(rank: int | None, energy: float | None, *, required: bool = True) -> None:
    """--rank N (at least 1) or --energy F (in (0, 1]): exactly one where ``required``, else at most one."""
    if required and (rank is None) == (energy is None):
        raise UserError("give exactly one of --rank N or --energy F")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"--energy is the fraction of each layer's ||ΔW||² to keep, in (0, 1]; got {energy}")


def resize_lora(path: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None,
                overwrite: bool = False) -> tuple[Path, list[ResizedLayer]]:
    """SVD-resize every layer and write the result in the input's own format (so it loads where the input did)."""
    from tqdm.auto import tqdm

    from .io import save_safetensors

    check_rank_or_energy(rank, energy)
    if _is_lycoris_file(path):  # a LoHa/LoKr: its layers' ΔW, SVD-truncated, become a LoRA every loader reads
        from .lycoris import lycoris_to_lora

        source = resolve_lora_path(path)
        return lycoris_to_lora(source, _output_file(out, LORA_WEIGHT_NAME, source, "resized", overwrite),
                               rank=rank, energy=energy)
    lora = load_lora_file(path)
    if lora.dora:
        raise UserError("DoRA LoRAs cannot be SVD-resized: the magnitude vector belongs to the full-rank direction")
    if lora.other_keys:
        raise UserError(f"{lora.path} has keys that are not LoRA matrices ({lora.other_keys[0]} ...); not resized")
    top = max((layer.rank for layer in lora.layers.values()), default=0)
    if rank is not None and rank > top:
        raise UserError(f"--rank {rank} is above this LoRA's rank ({top}): resizing keeps the strongest directions of "
                        f"each layer, so it can only lower a rank; train again with --rank {rank} for a larger one")
    default = {"kohya": KOHYA_WEIGHT_NAME, "peft": "adapter_model.safetensors"}.get(lora.format, LORA_WEIGHT_NAME)
    name = lora.path.name if lora.path.name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME) else default
    out_file = _output_file(out, name, lora.path, "resized", overwrite)

    tensors = dict(lora.tensors)
    infos: list[ResizedLayer] = []
    for layer in tqdm(list(lora.layers.values()), desc="SVD", unit="layer", disable=len(lora.layers) < 50):
        down, up, info = resize_layer(layer, rank=rank, energy=energy)
        tensors[layer.down_key], tensors[layer.up_key] = down, up
        infos.append(info)
    if lora.format == "kohya":
        # One alpha for the whole file, the most common new rank. Where a layer's rank differs, its factors absorb
        # sqrt(k / alpha) each, so alpha / k · B'A' is still ΔW'. (Per-layer alphas would be the natural choice and
        # ComfyUI/A1111 apply them, but diffusers' kohya loader keeps only the most common alpha: its alpha_pattern
        # keys never match a module, so a per-layer-alpha file loads into diffusers at the wrong strength.)
        alpha = _most_common(i.new_rank for i in infos)
        for layer, info in zip(lora.layers.values(), infos):
            if info.new_rank != alpha:
                fix = math.sqrt(info.new_rank / alpha)
                tensors[layer.down_key] = (tensors[layer.down_key].double() * fix).to(layer.down.dtype)
                tensors[layer.up_key] = (tensors[layer.up_key].double() * fix).to(layer.up.dtype)
            tensors[f"{layer.name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)

    header = dict(lora.header)
    if lora.adapter_configs and ADAPTER_METADATA_KEY in header:
        flat = {}
        for comp, cfg in lora.adapter_configs.items():
            mine = {layer.module: info.new_rank for layer, info in zip(lora.layers.values(), infos)
                    if layer.component == comp}
            if mine:
                cfg = lora_config_dict(mine, {m: float(k) for m, k in mine.items()}, base=cfg)
            flat.update({f"{comp}.{k}": v for k, v in cfg.items()})
        header[ADAPTER_METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True, default=list)
    elif lora.adapter_configs:  # peft folder with adapter_config.json: write the new one beside the output
        cfg = next(iter(lora.adapter_configs.values()))
        ranks = {layer.module: info.new_rank for layer, info in zip(lora.layers.values(), infos)}
        new = lora_config_dict(ranks, {m: float(k) for m, k in ranks.items()}, base=cfg)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        (out_file.parent / "adapter_config.json").write_text(json.dumps({**cfg, **new}, indent=2, default=list) + "\n")
    header["billiard_lora.resized"] = json.dumps({"from": str(lora.path), "rank": rank, "energy": energy})
    save_safetensors(tensors, out_file, metadata=header)
    return out_file, infos


def format_resize(infos: list[ResizedLayer], out_file: Path, *, per_layer: bool = True) -> str:
    lines = []
    if per_layer:
        width = max(len(i.name) for i in infos)
        lines += [f"{i.name:<{width}}  rank {i.rank:>3} -> {i.new_rank:<3}  energy {i.energy:.4f}" for i in infos]
    before = sum(i.rank for i in infos)
    after = sum(i.new_rank for i in infos)
    energies = [i.energy for i in infos]
    lines.append(f"{len(infos)} layers, total rank {before} -> {after}; retained energy min {min(energies):.4f}, "
                 f"mean {sum(energies) / len(energies):.4f}; each layer now holds the top-k SVD part of its ΔW; "
                 f"wrote {out_file}")
    return "\n".join(lines)


# ============================================================================ combine
def _in_peft_naming(lora: LoraFile) -> list[tuple[Layer, str, dict[str, torch.Tensor]]]:
    """``_peft_pairs`` of any LoRA file: a kohya one is converted by diffusers' loader first (its alphas kept)."""
    if lora.format != "kohya":
        return _peft_pairs(lora)
    layers, configs = kohya_to_diffusers(lora)
    with tempfile.TemporaryDirectory(prefix=".lora-") as tmp:
        converted = load_lora_file(write_lora(Path(tmp) / LORA_WEIGHT_NAME, layers, configs))
    return _peft_pairs(converted)


def combine_loras(sources: Sequence[tuple[str | Path, float]], out: str | Path, *, rank: int | None = None,
                  energy: float | None = None, overwrite: bool = False) -> tuple[Path, int, int]:
    """One LoRA file that acts as ``sources`` loaded together at their weights (kohya's ``merge_lora.py
    --concat``): for each layer, the sources' factors side by side, ``B = [w1·s1·B1, w2·s2·B2, ...]``,
    ``A = [A1; A2; ...]`` (s: each file's alpha / rank), so ``B·A = Σ w·s·Bi·Ai`` exactly, at the sum of the ranks;
    ``rank`` or ``energy`` then SVD-resizes each layer. Written in diffusers' format (``lora convert`` makes the
    kohya file). Returns (file, layers, largest rank)."""
    if len(sources) < 2:
        raise UserError("combine needs at least two LoRAs: FILE[:WEIGHT] FILE[:WEIGHT] ...")
    check_rank_or_energy(rank, energy, required=False)
    files = [(load_lora_file(path), float(weight)) for path, weight in sources]
    families = {detect_base_model(lora)[0] for lora, _ in files}
    if len(families) > 1:
        raise UserError(f"these LoRAs were trained for different base models ({', '.join(sorted(families))}); "
                        f"combine LoRAs of one model")
    out_file = _output_file(out, LORA_WEIGHT_NAME, files[0][0].path, "combined", overwrite)
    parts: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, weight in files:
        if lora.dora:
            raise UserError(f"{lora.path} is a DoRA LoRA: its magnitudes rescale the whole weight, so it cannot be "
                            f"combined by adding its factors")
        for layer, module, pair in _in_peft_naming(lora):
            down, up = pair[module + ".lora_A.weight"], pair[module + ".lora_B.weight"]
            parts.setdefault((layer.component, module), []).append(
                (down.double(), up.double() * (weight * layer.scale)))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, dict[str, int]] = {}
    for (component, module), factors in parts.items():
        down, up = torch.cat([d for d, _ in factors], dim=0), torch.cat([u for _, u in factors], dim=1)
        if rank is not None or energy is not None:
            joined = Layer(module, component, module, "", "", down, up, alpha=float(down.shape[0]))
            down, up, _ = resize_layer(joined, rank=rank, energy=energy)
        layers.setdefault(component, {}).update({f"{module}.lora_A.weight": down.float().contiguous(),
                                                  f"{module}.lora_B.weight": up.float().contiguous()})
        ranks.setdefault(component, {})[module] = int(down.shape[0])
    configs = {c: lora_config_dict(r, {m: float(k) for m, k in r.items()}) for c, r in ranks.items()}
    header = {"billiard_lora.combined": json.dumps({"sources": [[str(lora.path), w] for lora, w in files],
                                                    "rank": rank, "energy": energy})}
    write_lora(out_file, layers, configs, header=header)
    return out_file, len(parts), max(k for r in ranks.values() for k in r.values())


# ============================================================================ merge
def count_lora_layers(pipe) -> dict[str, int]:
    """How many modules of each pipeline component carry a LoRA (to catch files that silently did not load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None:
            counts[comp] = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    return counts


def _merged_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a single-file checkpoint ``merge_lora`` wrote (its header says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "billiard_lora.merged_lora" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not safetensors at all
        return False


def check_merge_out(out: Path, model: str, overwrite: bool = False) -> None:
    """``--out`` of a merge must be a new or empty folder: never the base model's, never a run or anything else a
    user keeps there. ``overwrite`` replaces only an earlier merge's output (its ``merged_lora.json`` says so)."""
    if Path(model).expanduser().exists() and Path(model).expanduser().resolve() == out.resolve():
        raise UserError(f"--out {out} is the base model's own folder: give the merged pipeline a new folder")
    if out.suffix.lower() == ".safetensors":  # a single-file checkpoint
        if Path(model).expanduser().exists() and Path(model).expanduser().resolve() == out.resolve():
            raise UserError(f"--out {out} is the base model's own file: give the merged checkpoint a new name")
        if out.is_dir():
            raise UserError(f"--out {out} is a folder: give a .safetensors file name for a single-file checkpoint")
        if out.exists():
            if not _merged_checkpoint(out):
                raise UserError(f"--out {out} is a file that no earlier merge wrote: give a new file name")
            if not overwrite:
                raise UserError(f"--out {out} is a file an earlier merge wrote: --overwrite replaces it, or give a "
                                f"new file name")
        return
    if out.is_file():
        raise UserError(f"--out {out} is a file: give a folder for the merged pipeline (or a .safetensors name for a "
                        f"single-file checkpoint)")
    if out.is_dir() and any(out.iterdir()):
        if overwrite and (out / "merged_lora.json").is_file():
            return
        extra = ("" if overwrite else "; --overwrite replaces an earlier merge's output (a folder with merged_lora.json)")
        raise UserError(f"--out {out} is not empty and not an earlier merge's output: give a new folder{extra}"
                        if overwrite else f"--out {out} is not empty: give a new folder{extra}")


def merge_lora(path: str | Path, model: str, out: str | Path, *, vae: str | None = None, scale: float = 1.0,
               torch_dtype: torch.dtype | None = None, overwrite: bool = False,
               single_file_config: str | None = None) -> Path:
    """Fuse the LoRA into the base UNet (and text encoders) and save a standalone pipeline folder (safetensors), or,
    where ``out`` ends in .safetensors, one single-file checkpoint (what A1111, ComfyUI and civitai use).

    The arithmetic is done in float32 (``torch_dtype`` only sets what is saved): W' = W + scale · ΔW. ``out`` must
    be a new or empty folder (``overwrite``: or an earlier merge's output) or a new file (``overwrite``: any), checked
    before anything is loaded. ``model`` may itself be a single-file checkpoint (layout: ``single_file_config``).
    """
    from .generate import LoraSpec, _quiet_loading, load_lora, parse_lora_arg
    from .io import publish_dir
    from .lora import read_metadata
    from .models import load_pipeline

    out = Path(out).expanduser()
    check_merge_out(out, model, overwrite)
    spec = LoraSpec(str(path)) if isinstance(path, Path) else parse_lora_arg(path)  # FILE[@BLOCKS][:SCALE]
    file = resolve_lora_path(spec.path)
    pipe = load_pipeline(model, pretrained_vae_model_name_or_path=vae, single_file_config=single_file_config)
    # generate's loader: a LoRA or a LyCORIS LoHa/LoKr, every layer placed or one line; only some blocks, weighted
    load_lora(pipe, LoraSpec(str(file), 1.0, "merge", spec.blocks, spec.block_weights), file=file)
    with _quiet_loading():
        pipe.fuse_lora(lora_scale=scale * spec.scale, adapter_names=["merge"])
        pipe.unload_lora_weights()  # drops the adapter modules; the fused weights stay
    record = {"base_model": model, "vae": vae, "lora": str(file) + (f"@{spec.blocks_text}" if spec.blocks else ""),
              "scale": scale * spec.scale, "training_config": read_metadata(file) or None}
    if out.suffix.lower() == ".safetensors":
        from .single_file import save_single_file

        out.parent.mkdir(parents=True, exist_ok=True)
        return save_single_file(pipe, out, torch_dtype=torch_dtype,
                                metadata={"billiard_lora.merged_lora": json.dumps(record, default=str)})
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:  # written beside the target, then moved into place with one rename: never a half-written pipeline
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "merged_lora.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ============================================================================ SVD-based initialisation
# The allowed --init_lora_weights values (peft's LoraConfig.init_lora_weights) and what each does; config.py can
# build the flag's help text from this.
INIT_LORA_WEIGHTS: dict[str, str] = {
    "gaussian": "A ~ N(0, 1/r), B = 0: the adapter starts as a no-op (diffusers' training scripts; our default).",
    "true": "peft's default: A Kaiming-uniform, B = 0 (Microsoft's reference LoRA); also a no-op at the start.",
    "false": "A and B both random: the model changes before training. For debugging only.",
    "pissa": "PiSSA: A, B = the top-r singular components of W (full SVD); the base keeps the residual.",
    "pissa_niter_<n>": "PiSSA with a randomised SVD of n subspace iterations (n=4..16: seconds, about as good).",
    "olora": "OLoRA: A, B from a QR decomposition of W; the base keeps the residual, as with PiSSA.",
}

_MUTATING_INITS = ("pissa", "olora")  # initialisations that rewrite the base weights (need the delta conversion)


def validate_init_lora_weights(value: Any, *, use_dora: bool = False) -> str | bool:
    """The peft ``init_lora_weights`` value for a CLI/config string; UserError for anything not in INIT_LORA_WEIGHTS.

    When PiSSA helps: PiSSA (arXiv 2404.02948) starts the adapter on the layer's principal singular directions,
    ``scale·B·A = U_r·S_r·V_rᵀ``, and freezes the residual ``W_res = W - scale·B·A`` as the base: the model
    computes the same function at step 0, but training moves the directions that carry most of the weight instead
    of a random subspace. The paper and peft's docs report faster convergence and better final results than LoRA
    at the same rank (measured on language models; not measured here on SDXL DreamBooth), and less quantisation
    error than QLoRA.
    It needs the base weights in float32/float16/bfloat16 when the adapter is added (peft refuses 8-bit/4-bit
    weights; quantise the residual afterwards). ``pissa_niter_<n>`` (randomised SVD, n = 4..16) is the fast variant
    for SDXL's hundreds of attention projections. OLoRA (QR instead of SVD) has the same structure. Gaussian stays the
    default: diffusers' recipes (learning rate, steps) assume it, and PiSSA changes how far each step moves W, so
    re-tune the learning rate when switching.

    The catch: PiSSA and OLoRA change the base weights. The trained adapter (A, B) only makes sense on top of
    ``W_res``, never on the stock SDXL that every other tool loads. The file to save is the *difference* the training
    made, ``ΔW = scale·(B·A - B0·A0)``, which is a plain LoRA of rank 2r: ``A' = [A; A0]``, ``B' = [B, -B0]``,
    ``alpha' = 2·alpha`` (same scale). peft does this in ``PeftModel.save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` through ``LoraModel.subtract_mutated_init``; diffusers models use
    ``add_adapter`` (no PeftModel), so ``pissa_to_lora`` below does the same concatenation. ``resize --rank r`` can
    shrink the result back to rank r afterwards (losing only what Eckart-Young says).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    ok = text in ("gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", text) is not None
    if not ok:
        raise UserError(f"--init_lora_weights {value!r} is not one of: gaussian (default), pissa, pissa_niter_<n> "
                        "(e.g. pissa_niter_16), olora, true, false")
    if use_dora and is_mutating_init(text):
        raise UserError(f"--init_lora_weights {text} with --use_dora is not supported: the trained DoRA magnitude "
                        "cannot be converted back into a LoRA for the unmodified base model")
    return text


def is_mutating_init(value: Any) -> bool:
    """Whether this initialisation rewrites the base weights (PiSSA, OLoRA): the saved LoRA must be a delta."""
    return isinstance(value, str) and value.startswith(_MUTATING_INITS)


def pissa_to_lora(initial: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = B·A - B0·A0 as a plain LoRA on the *unmodified* base: ``A' = [A; A0]``, ``B' = [B, -B0]`` (rank 2r).

    Both arguments are peft state dicts of the same adapter (``...lora_A.weight`` / ``...lora_B.weight``): the one
    taken right after ``add_adapter`` with a PiSSA/OLoRA init and the trained one. Save the result with
    ``mutated_init_config`` (r and lora_alpha doubled, so alpha/r is unchanged). Same as peft's
    ``LoraModel.subtract_mutated_init``.
    """
    if set(initial) != set(trained):
        raise ValueError("the initial and trained adapter state dicts have different keys")
    out = {}
    for key, value in trained.items():
        if "lora_A" in key:
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif "lora_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            raise ValueError(f"{key}: only plain LoRA matrices can be converted (no DoRA magnitudes, no biases)")
    return out


def mutated_init_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The LoraConfig dict for ``pissa_to_lora``'s output: ranks and alphas doubled, ordinary init."""
    cfg = dict(config)
    cfg["r"] = 2 * cfg["r"]
    cfg["lora_alpha"] = 2 * cfg["lora_alpha"] if not cfg.get("use_rslora") else cfg["lora_alpha"] * 2**0.5
    cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: 2 * v for k, v in (cfg.get("alpha_pattern") or {}).items()}
    cfg["init_lora_weights"] = True
    return cfg


def save_pissa_lora(output_dir: str | Path, initial: Mapping[str, Mapping[str, torch.Tensor]], *,
                    metadata: Mapping[str, Any] | None = None, weight_name: str = LORA_WEIGHT_NAME,
                    precision: str | None = None, **models: Any) -> Path:
    """Save PiSSA/OLoRA-trained adapters as an ordinary diffusers LoRA for the unmodified base model (its weights in
    ``precision`` where given).

    ``initial``: component -> peft state dict taken right after ``add_lora`` (before the first optimiser step);
    ``models``: ``unet=``, ``text_encoder=``, ``text_encoder_2=`` with their trained adapters.
    """
    from .lora import _unwrap, peft_state_dict

    layers, configs = {}, {}
    for comp, model in models.items():
        if model is None:
            continue
        if comp not in COMPONENTS:
            raise TypeError(f"unknown component {comp!r}; use unet=, text_encoder=, text_encoder_2=")
        model = _unwrap(model)
        layers[comp] = pissa_to_lora(initial[comp], peft_state_dict(model))
        configs[comp] = mutated_init_config(model.peft_config["default"].to_dict())
    header = {METADATA_KEY: json.dumps(dict(metadata), default=str)} if metadata else {}
    return write_lora(Path(output_dir) / weight_name, layers, configs, header=header, precision=precision)


# ============================================================================ command line
def add_precision(parser, default: str) -> None:
    """--save_precision (kohya's name): the written file's precision."""
    from .io import PRECISIONS

    parser.add_argument("--save_precision", choices=PRECISIONS, default=None,
                        help=f"precision of the written weights: fp32 (or float), fp16 or bf16, which halve the file "
                             f"(default: {default})")


def recast(out: Path, precision: str | None) -> Path:
    """The written file ``out`` in ``precision`` (None: as written)."""
    if precision is not None:
        from .io import recast_safetensors

        recast_safetensors(out, precision)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m billiard_lora.lora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    lora_file = "a LoRA .safetensors file, a training output folder, or a LoRA on the Hugging Face Hub (owner/name)"
    sp = sub.add_parser("inspect", help="format, base model, targets, ranks/alphas, parameters, training config")
    sp.add_argument("file", metavar="FILE", help=lora_file)
    sp.add_argument("--json", action="store_true", help="print the full report (per-layer ranks, config) as JSON")
    sp = sub.add_parser("convert", help="diffusers <-> kohya/webui (ComfyUI, A1111)")
    sp.add_argument("file", metavar="FILE", help=lora_file)
    sp.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    sp.add_argument("--out", required=True, metavar="PATH", help="a .safetensors file, or a folder to write into")
    add_precision(sp, "the input's")
    sp.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    sp = sub.add_parser("resize", help="SVD to a lower rank (or the rank that keeps a fraction of the energy); a "
                                       "LyCORIS LoHa/LoKr becomes a LoRA (kohya format) that diffusers loads too")
    sp.add_argument("file", metavar="FILE", help=lora_file)
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="keep this many singular values per layer")
    group.add_argument("--energy", type=float,
                       help="per layer, keep the fewest singular values holding this share of ||ΔW||² (e.g. 0.9)")
    sp.add_argument("--out", required=True, metavar="PATH", help="a .safetensors file, or a folder to write into")
    sp.add_argument("--quiet", action="store_true", help="only the summary line, not one line per layer")
    add_precision(sp, "the input's")
    sp.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    sp = sub.add_parser("combine", help="several LoRAs (with weights) as one file, exactly, or SVD-resized")
    sp.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]", help=lora_file + "; WEIGHT (default 1) multiplies it")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="SVD-resize each combined layer to this rank (default: the sum)")
    group.add_argument("--energy", type=float, help="or keep the fewest directions holding this share of ||ΔW||²")
    sp.add_argument("--out", required=True, metavar="PATH", help="a .safetensors file, or a folder to write into")
    add_precision(sp, "fp32")
    sp.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    sp = sub.add_parser("merge", help="fuse into the base model and save a standalone pipeline (safetensors)")
    sp.add_argument("file", metavar="FILE[@BLOCKS][:SCALE]",
                    help=lora_file + "; @BLOCKS as generate's --lora takes them (@content, @up_blocks.0=0.5,...)")
    sp.add_argument("--model", required=True,
                    help="base model: hub id, local diffusers folder or single-file checkpoint (.safetensors)")
    sp.add_argument("--vae", default=None, help="a separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    sp.add_argument("--out", required=True, metavar="DIR_OR_FILE",
                    help="a folder (a diffusers pipeline), or a .safetensors file name: one single-file checkpoint "
                         "for A1111, ComfyUI, Forge (--dtype fp16 halves it)")
    sp.add_argument("--single_file_config", default=None, metavar="FOLDER_OR_ID",
                    help="for a single-file --model: a diffusers SDXL folder or hub id giving its layout")
    sp.add_argument("--scale", type=float, default=1.0, help="LoRA strength fused in (W + scale * ΔW)")
    sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="precision of the saved weights")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds an earlier merge's output (never any other folder)")
    sp = sub.add_parser("extract", help="a LoRA from a fine-tuned model's difference to its base (kohya's "
                                        "extract_lora_from_models.py): DreamBooth fine-tunes, merged or civitai models")
    sp.add_argument("--base", required=True, metavar="MODEL",
                    help="the base model: hub id, diffusers folder or single-file checkpoint (.safetensors)")
    sp.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model, in any of the same forms")
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="keep this many directions of each layer's change (kohya's --dim)")
    group.add_argument("--energy", type=float,
                       help="per layer, the fewest directions holding this share of ||ΔW||² (e.g. 0.9)")
    sp.add_argument("--conv_rank", type=int, default=None,
                    help="also the UNet's convolutions, at this rank (kohya's --conv_dim; default: none)")
    sp.add_argument("--lora_layers", default="attn,ff,proj",
                    help="the UNet's layers, as training's --lora_layers (default attn,ff,proj: every Linear of the "
                         "transformer blocks, as kohya's)")
    sp.add_argument("--min_diff", type=float, default=0.01,
                    help="a text encoder is extracted only if some weight changed by more (kohya's; default 0.01)")
    sp.add_argument("--clamp_quantile", type=float, default=None,
                    help="clip the factors' values at this quantile of their magnitudes (kohya's, who use 0.99; "
                         "default: none)")
    sp.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                    help="kohya (default: ComfyUI, A1111 and diffusers' load_lora_weights read it) or diffusers")
    sp.add_argument("--load_dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="precision the models load in (fp16: half the memory, exact for fp16 checkpoints)")
    sp.add_argument("--single_file_config", default=None, metavar="FOLDER_OR_ID",
                    help="for single-file models: a diffusers SDXL folder or hub id giving their layout")
    sp.add_argument("--device", default=None, help="where the SVDs run (cuda is much faster; default cpu)")
    sp.add_argument("--out", required=True, metavar="PATH", help="a .safetensors file, or a folder to write into")
    sp.add_argument("--quiet", action="store_true", help="only the summary, not one line per layer")
    add_precision(sp, "fp32")
    sp.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    args = p.parse_args(argv)

    if args.command is None:
        p.print_help()
        return 2
    if args.command == "inspect":
        report = inspect_lora(args.file)
        print(json.dumps(report, indent=2, default=str) if args.json else format_inspect(report))
    elif args.command == "convert":
        out = recast(convert_lora(args.file, args.to, args.out, overwrite=args.overwrite), args.save_precision)
        print(f"wrote {out}")
        converted = load_lora_file(out)
        if args.to == "kohya" and detect_base_model(converted)[0] == "SDXL":
            print(f"{kohya_key_report(converted.tensors).summary()} (checked against the SDXL base 1.0 layout)")
    elif args.command == "resize":
        out, infos = resize_lora(args.file, args.out, rank=args.rank, energy=args.energy, overwrite=args.overwrite)
        recast(out, args.save_precision)
        print(format_resize(infos, out, per_layer=not args.quiet))
    elif args.command == "combine":
        from .generate import parse_lora_arg

        specs = [parse_lora_arg(f) for f in args.files]
        if parted := [s for s in specs if s.blocks]:
            raise UserError(f"{parted[0].path}@{','.join(parted[0].blocks)}: combine takes whole LoRAs; the @blocks "
                            f"part is for generate")
        out, n, top = combine_loras([(s.path, s.scale) for s in specs], args.out, rank=args.rank,
                                    energy=args.energy, overwrite=args.overwrite)
        recast(out, args.save_precision)
        print(f"wrote {out}: {len(specs)} LoRAs at weights {', '.join(f'{s.scale:g}' for s in specs)} as one, "
              f"{n} layers, rank up to {top}" + ("" if args.rank or args.energy else " (exact)"))
    elif args.command == "merge":
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        out = merge_lora(args.file, args.model, args.out, vae=args.vae, scale=args.scale, torch_dtype=dtype,
                         overwrite=args.overwrite, single_file_config=args.single_file_config)
        kind = "single-file checkpoint" if out.suffix == ".safetensors" else "standalone pipeline"
        print(f"wrote a {kind} with the LoRA fused in at scale {args.scale:g} to {out}")
    elif args.command == "extract":
        from .extract import extract_lora, format_extraction

        result = extract_lora(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                              conv_rank=args.conv_rank, lora_layers=args.lora_layers, min_diff=args.min_diff,
                              clamp_quantile=args.clamp_quantile, to=args.format, device=args.device,
                              torch_dtype={"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.load_dtype],
                              single_file_config=args.single_file_config, overwrite=args.overwrite,
                              precision=args.save_precision)
        print(format_extraction(result, per_layer=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
