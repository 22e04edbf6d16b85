"""SDXL-architecture pipelines built in code: a tiny one for tests and CPU demos, a full-size one at random weights.

Nothing here downloads anything. The tokenizers are byte-level BPE tokenizers whose vocabulary and merges our code
writes (learned from a small built-in corpus), so stock diffusers' ``StableDiffusionXLPipeline`` loads a folder
written by ``save_tiny_pipeline`` with ``HF_HUB_OFFLINE=1``.

    python -m billiard_lora.tiny OUT_DIR            # tiny SDXL pipeline folder, a few MB, seeded
"""

from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ArgumentParser, cli_entry

TINY_MARKER = "BILLIARD_LORA_TINY.json"  # in every folder save_tiny_pipeline writes: random weights, not a model

# The words the tiny tokenizer learns merges from: enough for our prompts to become a handful of tokens each.
_CORPUS = """
a photo of messi playing billiard billiards pool snooker table cue ball balls green felt cushion pocket player
man woman person famous football star actor singer in the style of room light dark wooden rail eight nine
ronaldo einstein obama taylor swift beyonce queen elizabeth barack mona lisa astronaut chess tennis golf bowling
high quality detailed realistic portrait close up wide shot standing leaning over shooting aiming at the with and
sks ohwx dog cat painting drawing cartoon watercolor night day bar club tournament championship trophy crowd
"""
TINY_VOCAB_SIZE = 1000
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_vocab(vocab_size: int = TINY_VOCAB_SIZE) -> tuple[dict[str, int], list[str]]:
    """Learn a CLIP-style BPE (``</w>`` word ends) on the built-in corpus; returns (vocab, merges), deterministic."""
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]  # 512 base tokens, as in CLIP
    words = collections.Counter(_CORPUS.split())
    # each word as a tuple of symbols, the last one carrying the end-of-word marker
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[str] = []
    budget = vocab_size - len(vocab_tokens) - 2  # two special tokens at the end
    while len(merges) < budget:
        pairs: collections.Counter = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        # most frequent pair; ties broken by the pair itself so the result never depends on dict order
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab_tokens.append(a + b)
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = tuple(out)
    vocab_tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


def build_tokenizers():
    """The two SDXL tokenizers (CLIP-L style, and OpenCLIP-bigG style whose pad token is "!") from our vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab()
    tok1 = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)
    tok2 = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token="!", model_max_length=77)
    return tok1, tok2


@dataclass(frozen=True)
class SDXLShape:
    """The sizes that define an SDXL-architecture model; ``TINY`` for tests, ``FULL`` is SDXL base 1.0."""

    unet_channels: tuple[int, ...]
    unet_transformer_depth: tuple[int, ...]
    unet_head_dim: tuple[int, ...]
    unet_layers_per_block: int
    addition_time_embed_dim: int
    unet_norm_groups: int
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    te1: dict
    te2: dict
    sample_size: int  # latent size the UNet config advertises (image size / 8 for SDXL)


# CLIP text-encoder shapes: SDXL's are CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (penultimate layer used).
_TE_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
TINY = SDXLShape(
    unet_channels=(32, 64), unet_transformer_depth=(1, 2), unet_head_dim=(2, 4), unet_layers_per_block=2,
    addition_time_embed_dim=8, unet_norm_groups=32,
    vae_channels=(8, 16, 16, 16), vae_norm_groups=8,  # four levels: the real 8x pixel-to-latent ratio
    te1=dict(_TE_TINY, hidden_act="quick_gelu"), te2=dict(_TE_TINY, hidden_act="gelu"),
    sample_size=8,
)
# A mid-size SDXL-shaped config for CPU benchmarks (issue: blocks (64, 128, 256), transformer depth (1, 1, 2)).
SMALL = SDXLShape(
    unet_channels=(64, 128, 256), unet_transformer_depth=(1, 1, 2), unet_head_dim=(2, 4, 8), unet_layers_per_block=2,
    addition_time_embed_dim=32, unet_norm_groups=32,
    vae_channels=(32, 64, 64, 64), vae_norm_groups=32,
    te1=dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128,
             hidden_act="quick_gelu"),
    te2=dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128,
             hidden_act="gelu"),
    sample_size=32,
)
# stabilityai/stable-diffusion-xl-base-1.0: 2.57 B-parameter UNet, CLIP-L (123 M) and OpenCLIP-bigG (695 M).
FULL = SDXLShape(
    unet_channels=(320, 640, 1280), unet_transformer_depth=(1, 2, 10), unet_head_dim=(5, 10, 20),
    unet_layers_per_block=2, addition_time_embed_dim=256, unet_norm_groups=32,
    vae_channels=(128, 256, 512, 512), vae_norm_groups=32,
    te1=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
             projection_dim=768, hidden_act="quick_gelu"),
    te2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
             projection_dim=1280, hidden_act="gelu"),
    sample_size=128,
)
# TINY with a wider second text encoder, for single-file checkpoints: diffusers' single-file loader tells SDXL's two
# text encoders apart by their width (768 and 1280), and TINY's are both 32 wide.
TINY_SINGLE_FILE = dataclasses.replace(TINY, te2=dict(_TE_TINY, hidden_size=48, intermediate_size=53,
                                                      projection_dim=48, hidden_act="gelu"))
SHAPES = {"tiny": TINY, "small": SMALL, "full": FULL, "tiny-single-file": TINY_SINGLE_FILE}


def build_components(shape: SDXLShape = TINY, *, seed: int = 0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, vocab_size: int | None = None) -> dict:
    """Random-weight SDXL components of ``shape`` as the ``StableDiffusionXLPipeline(**components)`` keyword dict.

    Built directly on ``device`` (the full-size UNet alone is 10 GB in float32) and seeded, so two calls agree.
    """
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok1, tok2 = build_tokenizers()
    vocab_size = vocab_size or (49408 if shape is FULL else len(tok1))
    te_common = dict(vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5,
                     bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id)
    cross_dim = shape.te1["hidden_size"] + shape.te2["hidden_size"]
    with torch.device(device):
        torch.manual_seed(seed)
        # SDXL's micro-conditioning: 6 size/crop numbers embedded and concatenated with the pooled text embedding
        unet = _unet(shape, cross_dim, time_ids=6)
        vae = _vae(shape)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_common, **shape.te1))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_common, **shape.te2))
    # SDXL base's scheduler config; training builds a DDPMScheduler from the same config.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon", interpolation_type="linear")
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
        if dtype != torch.float32:
            m.to(dtype)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tok1, tokenizer_2=tok2, scheduler=scheduler)


def _unet(shape: SDXLShape, cross_dim: int, time_ids: int):
    """An SDXL-layout UNet of ``shape``: cross-attention to ``cross_dim``-wide text embeddings, ``time_ids``
    micro-conditioning numbers embedded beside the second encoder's pooled embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shape.sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(shape.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(shape.unet_channels) - 1) + ("UpBlock2D",),
        block_out_channels=shape.unet_channels, layers_per_block=shape.unet_layers_per_block,
        transformer_layers_per_block=shape.unet_transformer_depth, attention_head_dim=shape.unet_head_dim,
        cross_attention_dim=cross_dim, use_linear_projection=True, norm_num_groups=shape.unet_norm_groups,
        addition_embed_type="text_time", addition_time_embed_dim=shape.addition_time_embed_dim,
        projection_class_embeddings_input_dim=time_ids * shape.addition_time_embed_dim + shape.te2["projection_dim"],
    )


def _vae(shape: SDXLShape):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels), layers_per_block=2 if shape is FULL else 1,
        norm_num_groups=shape.vae_norm_groups, sample_size=shape.sample_size * 8,
        scaling_factor=0.13025, force_upcast=False,
    )


def build_vae(shape: SDXLShape = TINY, *, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32):
    """The VAE of ``shape`` alone, at random weights (not those ``build_components`` draws: its RNG starts here)."""
    with torch.device(device):
        torch.manual_seed(seed)
        vae = _vae(shape)
    return vae.eval().to(dtype)


def build_pipeline(shape: SDXLShape = TINY, **kwargs):
    """A ``StableDiffusionXLPipeline`` of random weights (see ``build_components``)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**build_components(shape, **kwargs))


def save_tiny_pipeline(out_dir: str | Path, *, seed: int = 0, shape: str = "tiny", device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write an SDXL pipeline folder (safetensors) that stock diffusers loads offline; returns the folder.

    ``shape="full"`` writes SDXL base's architecture at random weights (5 GB in fp16): built fastest on a GPU.
    """
    out = Path(out_dir)
    pipe = build_pipeline(SHAPES[shape], seed=seed, device=device, dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    # Also the classic vocab.json + merges.txt pair, for tools that build a CLIP tokenizer from those two files.
    vocab, merges = build_clip_vocab()
    for sub in ("tokenizer", "tokenizer_2"):
        (out / sub / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (out / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # Mark what this is so nobody mistakes it for real weights.
    (out / TINY_MARKER).write_text(json.dumps({"shape": shape, "seed": seed, "random_weights": True}))
    return out


def save_tiny_single_file(folder: str | Path) -> Path:
    """The pipeline in ``folder`` (written by ``save_tiny_pipeline(shape="tiny-single-file")``) as one single-file
    checkpoint, ``folder/tiny-sdxl.safetensors``; ``folder`` then serves as its ``--single_file_config``."""
    from diffusers import StableDiffusionXLPipeline

    from .single_file import save_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    return save_single_file(pipe, Path(folder) / "tiny-sdxl.safetensors")


def build_refiner_components(shape: SDXLShape = TINY, *, seed: int = 0) -> dict:
    """Random-weight SDXL-refiner components of ``shape`` as ``StableDiffusionXLImg2ImgPipeline(**components)``
    takes them: SDXL refiner 1.0's layout (the second text encoder alone, cross-attention at its width, 5 micro-
    conditioning numbers with the aesthetic score instead of the target size), at ``shape``'s sizes."""
    from diffusers import EulerDiscreteScheduler

    base = build_components(shape, seed=seed)
    torch.manual_seed(seed + 1)
    unet = _unet(shape, shape.te2["hidden_size"], time_ids=5).eval()  # (the aesthetic score replaces the target size)
    scheduler = EulerDiscreteScheduler.from_config(base["scheduler"].config)
    return dict(unet=unet, vae=base["vae"], text_encoder=None, tokenizer=None, text_encoder_2=base["text_encoder_2"],
                tokenizer_2=base["tokenizer_2"], scheduler=scheduler, requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False)


def save_tiny_refiner(out_dir: str | Path, *, seed: int = 0, shape: str = "tiny") -> Path:
    """An SDXL-refiner pipeline folder at random weights that stock diffusers' ``StableDiffusionXLImg2ImgPipeline``
    loads offline (``python -m billiard_lora.tiny OUT --refiner``)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    out = Path(out_dir)
    StableDiffusionXLImg2ImgPipeline(**build_refiner_components(SHAPES[shape], seed=seed)).save_pretrained(
        out, safe_serialization=True)
    (out / TINY_MARKER).write_text(json.dumps({"shape": shape, "seed": seed, "random_weights": True,
                                               "kind": "refiner"}))
    return out


def save_tiny_controlnet(out_dir: str | Path, *, seed: int = 0, shape: str = "tiny") -> Path:
    """An SDXL ControlNet folder for the tiny pipeline of ``shape`` and ``seed`` (``python -m billiard_lora.tiny OUT
    --controlnet``): diffusers' ``ControlNetModel.from_unet`` of its UNet, as ControlNets start, with the zero
    convolutions (the control image's way in, the residuals' way out) drawn at random instead of zero, so that the
    control image changes the images (as a trained ControlNet's do)."""
    from diffusers import ControlNetModel

    out = Path(out_dir)
    controlnet = ControlNetModel.from_unet(build_components(SHAPES[shape], seed=seed)["unet"])
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        embedding = [m for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, *embedding]:
            # He's scale: the control image's signal neither fades nor grows through the embedding's eight convs
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / conv.weight[0].numel()) ** 0.5)
    controlnet.save_pretrained(out, safe_serialization=True)
    (out / TINY_MARKER).write_text(json.dumps({"shape": shape, "seed": seed, "random_weights": True,
                                               "kind": "controlnet"}))
    return out


IP_ADAPTER_FILE = "ip-adapter_sdxl.safetensors"  # (h94/IP-Adapter's name for SDXL's, in sdxl_models/)


def save_tiny_ip_adapter(out_dir: str | Path, *, seed: int = 0, shape: str = "tiny") -> Path:
    """An IP-Adapter for the tiny pipeline of ``shape`` (``python -m billiard_lora.tiny OUT --ip_adapter``), laid out
    as h94/IP-Adapter's ``sdxl_models/``: ``ip-adapter_sdxl.safetensors`` (the image projection to 4 tokens, and each
    cross-attention's ``to_k_ip``/``to_v_ip``, numbered as the original's) beside ``image_encoder/``, a tiny CLIP
    vision model. Random weights: for tests and demos of ``generate --ip_adapter``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out_dir)
    unet = build_components(SHAPES[shape], seed=seed)["unet"]
    generator = torch.Generator().manual_seed(seed + 3)
    random = lambda *size: torch.randn(*size, generator=generator) / size[-1] ** 0.5  # noqa: E731
    torch.manual_seed(seed + 3)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=32)).eval()
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": random(cross * 4, encoder.config.projection_dim),
               "image_proj.proj.bias": torch.zeros(cross * 4), "image_proj.norm.weight": torch.ones(cross),
               "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in unet.attn_processors:  # diffusers' order, the original's numbering: every other index, from 1
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name.removesuffix(".processor")).to_k
            for part in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{part}.weight"] = random(to_k.out_features, to_k.in_features) * 4
            key_id += 2
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / IP_ADAPTER_FILE))
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    (out / TINY_MARKER).write_text(json.dumps({"shape": shape, "seed": seed, "random_weights": True,
                                               "kind": "ip-adapter"}))
    return out


def check_tiny_out(out_dir: str | Path) -> Path:
    """The folder ``tiny`` writes into: new, empty, or an earlier tiny pipeline's; never a real model's (its weights
    would be replaced by random ones) or a training run's."""
    from .errors import UserError
    from .io import check_out_folder

    out = check_out_folder(out_dir, "OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not (out / TINY_MARKER).is_file():
        raise UserError(f"{out} is not empty and holds no tiny pipeline ({TINY_MARKER}): it could be a real "
                        f"model's folder, whose weights this would replace with random ones; choose a new folder")
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m billiard_lora.tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=["tiny", "small", "full"], default="tiny",
                   help="tiny: seconds on CPU; small: SDXL-shaped CPU benchmark size; full: SDXL base's size")
    p.add_argument("--device", default="cpu", help="where to build it (cuda is much faster for --shape full)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="precision of the saved weights")
    p.add_argument("--refiner", action="store_true", help="an SDXL refiner's architecture instead (generate --refiner)")
    p.add_argument("--controlnet", action="store_true",
                   help="an SDXL ControlNet for the tiny pipeline of the same --seed instead (generate --controlnet)")
    p.add_argument("--ip_adapter", action="store_true",
                   help="an IP-Adapter for the tiny pipeline of the same --seed instead (generate --ip_adapter "
                        "OUT_DIR/ip-adapter_sdxl.safetensors)")
    p.add_argument("--single_file", action="store_true",
                   help="also the same model as one single-file checkpoint, OUT_DIR/tiny-sdxl.safetensors (train "
                        "--pretrained_model_name_or_path OUT_DIR/tiny-sdxl.safetensors --single_file_config OUT_DIR)")
    args = p.parse_args(argv)
    check_tiny_out(args.out_dir)
    if args.single_file:
        if args.refiner or args.shape != "tiny" or args.dtype != "fp32" or args.device != "cpu":
            from .errors import UserError

            raise UserError("--single_file writes a tiny pipeline in fp32 on the CPU (for tests and demos)")
        out = save_tiny_pipeline(args.out_dir, seed=args.seed, shape="tiny-single-file")
        file = save_tiny_single_file(out)
        print(f"wrote a tiny SDXL pipeline (random weights, seed {args.seed}) to {out} and as one single-file "
              f"checkpoint to {file}: pass --single_file_config {out} with it")
        return 0
    if args.ip_adapter:
        if args.shape == "full" or args.refiner or args.controlnet or args.dtype != "fp32" or args.device != "cpu":
            from .errors import UserError

            raise UserError("--ip_adapter writes a tiny or small IP-Adapter in fp32 on the CPU (for tests and demos)")
        out = save_tiny_ip_adapter(args.out_dir, seed=args.seed, shape=args.shape)
        print(f"wrote {args.shape} SDXL IP-Adapter (random weights, seed {args.seed}) to {out / IP_ADAPTER_FILE}")
        return 0
    if args.controlnet:
        if args.shape == "full" or args.refiner or args.dtype != "fp32" or args.device != "cpu":
            from .errors import UserError

            raise UserError("--controlnet writes a tiny or small ControlNet in fp32 on the CPU (for tests and demos)")
        out = save_tiny_controlnet(args.out_dir, seed=args.seed, shape=args.shape)
        print(f"wrote {args.shape} SDXL ControlNet (random weights, seed {args.seed}) to {out}")
        return 0
    if args.refiner:
        if args.shape == "full" or args.dtype != "fp32" or args.device != "cpu":
            from .errors import UserError

            raise UserError("--refiner writes a tiny or small refiner in fp32 on the CPU (for tests and demos)")
        out = save_tiny_refiner(args.out_dir, seed=args.seed, shape=args.shape)
        print(f"wrote {args.shape} SDXL refiner pipeline (random weights, seed {args.seed}) to {out}")
        return 0
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = save_tiny_pipeline(args.out_dir, seed=args.seed, shape=args.shape, device=args.device, dtype=dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {args.shape} SDXL pipeline ({size / 1e6:.1f} MB, random weights, seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------------------------------
# Tiny evaluation models (CLIP and DINO stand-ins) for offline tests of billiard_lora.evaluate

TINY_EVAL_IMAGE_SIZE = 32  # pixels the tiny CLIP / DINO see (8x8 patches -> 16 patches + CLS)
_TINY_VIT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def save_tiny_clip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight ``CLIPModel`` folder (model, our tokenizer, a PIL image processor) that ``load_clip`` reads."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizers()[0]
    text = dict(_TINY_VIT, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(_TINY_VIT, image_size=TINY_EVAL_IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    size = TINY_EVAL_IMAGE_SIZE
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                    crop_size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    return _save_eval_model(out_dir, model, processor, "clip", seed)


def save_tiny_blip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight BLIP captioning model folder (``BlipForConditionalGeneration``, a BERT word-piece tokenizer
    over the built-in corpus's words, a PIL image processor) that ``load_captioner`` reads: its captions are random
    words of that corpus."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + sorted(set(_CORPUS.split()))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    text = dict(_TINY_VIT, vocab_size=len(words), max_position_embeddings=64, bos_token_id=words.index("[DEC]"),
                sep_token_id=words.index("[SEP]"), pad_token_id=words.index("[PAD]"))
    vision = dict(_TINY_VIT, image_size=TINY_EVAL_IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    size = TINY_EVAL_IMAGE_SIZE
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    return _save_eval_model(out_dir, model, processor, "blip", seed)


def save_tiny_dino(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight DINO-style ``ViTModel`` folder (no pooler, ImageNet normalisation) that ``load_dino`` reads."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**_TINY_VIT, image_size=TINY_EVAL_IMAGE_SIZE, patch_size=8), add_pooling_layer=False)
    size = TINY_EVAL_IMAGE_SIZE
    processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])
    return _save_eval_model(out_dir, model.eval(), processor, "dino", seed)


def _save_eval_model(out_dir: str | Path, model, processor, kind: str, seed: int) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / TINY_MARKER).write_text(json.dumps({"kind": kind, "seed": seed, "random_weights": True}))
    return out
