"""The DreamBooth paper's evaluation per checkpoint: DINO, CLIP-I, CLIP-T, PRES, DIV, near-copies of training images.

    python -m billiard_lora.evaluate outputs/messi_billiard_LoRA   # 25 prompts x 4 seeds: base, checkpoints, final
    python -m billiard_lora.evaluate RUN --num_prompts 5 --images_per_prompt 2 --steps 20   # a quicker look

The protocol of Ruiz et al. 2022 (arXiv 2208.12242, section 4.1), adapted to one subject that plays billiards:

* Prompts: 25 templates (new backgrounds, outfits and accessories, art renditions; the paper's live-subject list with
  billiard scenes added) with ``{}`` replaced by the *subject phrase*: the instance prompt without its framing words
  ("a photo of messi playing billiard" -> "messi playing billiard"; see ``subject_phrase``).
* Images: seeds 0..N-1 per prompt for the base model, every ``checkpoint-N`` LoRA and the final LoRA, cached under
  ``OUT/images/<label>/`` by (prompt, seed, settings, LoRA file hash): a rerun generates nothing it already has.
* DINO / CLIP-I: mean pairwise cosine similarity between generated and real training images (DINO ViT-S/16 CLS
  token; CLIP image embedding). CLIP-T: mean cosine between each image and its prompt's CLIP text embedding.
* PRES (language drift): DINO similarity of the *class prompt's* images to the subject's real images; lower means
  the class still looks like the class, not like the subject. DIV: diversity among one prompt's images, LPIPS as in
  the paper where it loads, else 1 - mean pairwise DINO cosine (``DIV_FALLBACK``).
* Memorisation: each generated image's nearest training image by DINO cosine; above ``COPY_THRESHOLD`` it is listed
  as a near-copy.

Writes ``eval.json``, ``eval.md`` (tables beside the paper's numbers, plots, best and worst images) and the grids.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ArgumentParser, UserError, check_device, cli_entry
from .generate import (DEFAULT_VAE_TILE, LoraSpec, active_loras, add_memory_arguments, check_memory_options,
                       generate, load_generation_pipeline, load_lora, lora_checkpoints, read_prompts_file, slugify,
                       unload_lora)
from .io import atomic_path, atomic_write_json, atomic_write_text, check_out_folder
from .models import CLIP_VIT_B32, CLIP_VIT_L14, DINO_VIT_S16
from .viz import image_grid, save_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Ruiz et al. 2022, Table 1 (30 subjects x 25 prompts x 4 images; DINO ViT-S/16, CLIP ViT-B/32).
PAPER_TABLE1 = {
    "DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Real images": {"dino": 0.774, "clip_i": 0.885},
}
METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
METRIC_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
DIV_LPIPS = "DIV (LPIPS)"
DIV_FALLBACK = "DIV (1−DINO, LPIPS unavailable)"
# DINO's CLS embedding barely moves when a photo is resized, re-encoded or slightly cropped, while two different
# photos of similar scenes stay well below 1; 0.95 therefore flags only near-duplicates. A heuristic: tune it with
# --copy_threshold after looking at the near-copy grid.
COPY_THRESHOLD = 0.95
BASE, FINAL = "base", "final"
THUMB = 256  # pixels per grid cell: a 4x4 grid of 1024-px images would be a 50 MB PNG
MAX_LISTED = 10  # near-copies listed per label in eval.md (eval.json has them all)

# The paper's live-subject prompts (section 4.1), in three kinds, plus billiard scenes; interleaved below so that the
# first few prompts (--num_prompts 3) already cover every kind.
_BACKGROUNDS = (
    "a photo of {} in the jungle", "a photo of {} in the snow", "a photo of {} on the beach",
    "a photo of {} on a cobblestone street", "a photo of {} with a city in the background",
    "a photo of {} with a mountain in the background", "a photo of {} in a smoky pool hall at night",
    "a photo of {} at a snooker championship with a crowd watching", "a photo of {} on the deck of a cruise ship",
)
_OUTFITS = (
    "a photo of {} wearing a red hat", "a photo of {} wearing a santa hat", "a photo of {} wearing a rainbow scarf",
    "a photo of {} wearing a black top hat and a monocle", "a photo of {} in a chef outfit",
    "a photo of {} in a firefighter outfit", "a photo of {} wearing pink glasses",
    "a photo of {} in a purple wizard outfit",
)
_RENDITIONS = (
    "a cubist painting of {}", "a watercolor painting of {}", "a pencil sketch of {}",
    "a vintage black and white photo of {}", "a 3d render of {} in the style of pixar",
    "an oil painting of {} in the style of van gogh", "a comic book illustration of {}",
    "a stained glass window showing {}",
)


def _interleave(*groups: Sequence[str]) -> tuple[str, ...]:
    return tuple(g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g))


PROMPT_TEMPLATES = _interleave(_BACKGROUNDS, _OUTFITS, _RENDITIONS)  # 25

# "a photo of", "a close-up photo of", "an image of" ...: framing words, not part of the subject.
_FRAMING = re.compile(r"^\s*(?:(?:a|an|the)\s+)?(?:[\w-]+\s+){0,2}?"
                      r"(?:photo|photograph|picture|image|portrait|shot|render|painting|drawing)\s+of\s+", re.I)
# "<framing> <subject> playing billiard ...": the subject is swapped for a class word in the class prompt.
_PLAYING = re.compile(r"^(?P<pre>.*?\bof\s+)?(?P<subject>.+?)\s+(?P<rest>playing\s+(?:billiards?|pool|snooker)\b.*)$",
                      re.I)
_IDENTIFIERS = {"sks", "ohwx", "zwx", "xyz", "tok", "[v]", "<v>"}  # rare-token identifiers common in DreamBooth
CLASS_WORD = "a person"


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def subject_phrase(instance_prompt: str) -> str:
    """The instance prompt less framing and tags: "a photo of messi playing pool, 4k" -> "messi playing pool"."""
    text = instance_prompt.split(",")[0].strip().rstrip(".").strip()
    phrase = _FRAMING.sub("", text).strip()
    return phrase or text or instance_prompt.strip()


def evaluation_prompts(instance_prompt: str, n: int = len(PROMPT_TEMPLATES)) -> list[str]:
    """The first ``n`` of the 25 evaluation prompts with the subject phrase filled in (deterministic)."""
    if not 1 <= n <= len(PROMPT_TEMPLATES):
        raise UserError(f"--num_prompts must be between 1 and {len(PROMPT_TEMPLATES)}, got {n} "
                        f"(more prompts: --prompts_file, one per line, {{}} standing for the subject)")
    subject = subject_phrase(instance_prompt)
    return [t.format(subject) for t in PROMPT_TEMPLATES[:n]]


def fill_prompts(prompts: Sequence[str], instance_prompt: str) -> list[str]:
    """User prompts: ``{}`` becomes the subject phrase; a prompt without ``{}`` is used as it is."""
    subject = subject_phrase(instance_prompt)
    return [p.replace("{}", subject) for p in prompts]


def class_prompt_for(instance_prompt: str, class_prompt: str | None = None) -> str:
    """The run's class prompt, else the instance prompt with its subject replaced by a class word (see module doc)."""
    if class_prompt and class_prompt.strip():
        return class_prompt.strip()
    text = instance_prompt.strip()
    m = _PLAYING.match(text)
    if m:  # "a photo of messi playing billiard" -> "a photo of a person playing billiard"
        return f"{m['pre'] or ''}{CLASS_WORD} {m['rest']}"
    words = text.split()
    kept = [w for w in words if w.lower() not in _IDENTIFIERS]
    if kept and len(kept) < len(words):  # the paper's recipe: "a sks dog" -> "a dog"
        return " ".join(kept)
    return f"a photo of {CLASS_WORD} playing billiards"


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of embedding tensors (rows are images or texts; normalised here, so raw rows work too)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO, CLIP-I and PRES: mean cosine over every (generated, real) pair."""
    if not len(generated) or not len(real):
        raise ValueError("subject_similarity needs at least one generated and one real embedding")
    return cosine_matrix(generated, real).mean().item()


def prompt_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: mean cosine between each image (row i) and its own prompt (row i)."""
    if images.shape != texts.shape or not len(images):
        raise ValueError(f"prompt_similarity pairs rows: got {tuple(images.shape)} images, {tuple(texts.shape)} texts")
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(-1).mean().item()


def self_similarity(embeddings: torch.Tensor) -> float | None:
    """Mean cosine over pairs of different rows (the paper's real-image reference); None for fewer than two rows."""
    n = len(embeddings)
    if n < 2:
        return None
    sims = cosine_matrix(embeddings, embeddings)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def groups_of(keys: Sequence[Any]) -> list[list[int]]:
    """Row indices grouped by key, in first-seen order: ``[p0, p0, p1]`` -> ``[[0, 1], [2]]``."""
    found: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        found.setdefault(k, []).append(i)
    return list(found.values())


def diversity(embeddings: torch.Tensor, groups: Sequence[Sequence[int]]) -> float | None:
    """DIV fallback: 1 - mean pairwise cosine within each group (one prompt's images), averaged over groups."""
    per_group = [self_similarity(embeddings[list(g)]) for g in groups]
    sims = [s for s in per_group if s is not None]
    return 1.0 - sum(sims) / len(sims) if sims else None


def lpips_diversity(images: Sequence[Image.Image], groups: Sequence[Sequence[int]], metric) -> float | None:
    """DIV as in the paper: mean LPIPS distance over pairs of one group's images, averaged over groups."""
    per_group = []
    for g in groups:
        if len(g) < 2:
            continue
        x = torch.stack([_to_tensor(images[i]) for i in g]) * 2 - 1  # (n, 3, H, W) in [-1, 1], LPIPS' input range
        param = next(iter(metric.parameters()), None) if hasattr(metric, "parameters") else None
        x = x.to(param.device) if param is not None else x
        with torch.no_grad():
            d = [float(metric(x[i:i + 1], x[j:j + 1]).mean()) for i in range(len(g)) for j in range(i + 1, len(g))]
        per_group.append(sum(d) / len(d))
    return sum(per_group) / len(per_group) if per_group else None


def nearest(generated: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each generated row's most similar real row: (similarities (N,), indices (N,))."""
    return cosine_matrix(generated, real).max(dim=1)


def near_copies(similarities: torch.Tensor, threshold: float = COPY_THRESHOLD) -> list[int]:
    """Indices whose nearest-training-image similarity is at least ``threshold``."""
    return [i for i, s in enumerate(similarities.tolist()) if s >= threshold]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_lpips(device: str | torch.device = "cpu"):
    """``(LPIPS-AlexNet metric, None)``, or ``(None, why not)``: the package needs torchvision and downloads AlexNet."""
    try:
        import lpips  # noqa: F401  (optional: pip install lpips; it imports torchvision)
    except Exception as exc:  # ImportError, or torchvision's own import errors
        if isinstance(exc, ModuleNotFoundError) and exc.name == "lpips":
            return None, "the lpips package is not installed (pip install lpips)"
        return None, f"the lpips package cannot be imported ({type(exc).__name__}: {_first_line(exc)})"
    try:
        metric = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
    except Exception as exc:  # AlexNet weights come from download.pytorch.org unless already in TORCH_HOME
        return None, f"LPIPS' AlexNet weights could not be loaded ({type(exc).__name__}: {_first_line(exc)})"
    return metric, None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


# ----------------------------------------------------------------------------------------------------------------------
# Embedders


class Embedder:
    """Images -> L2-normalised embeddings (N, D), float32 on the CPU; subclasses say which features."""

    kind = ""

    def __init__(self, model, image_processor, name: str, *, device: str | torch.device | None = None,
                 batch_size: int = 16):
        self.model = model.eval()
        self.image_processor = image_processor
        self.name = name
        self.batch_size = batch_size
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device: str | torch.device) -> "Embedder":
        """Move the model (e.g. onto the GPU once SDXL has left it)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit vectors, one per image."""
        chunks = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            chunks.append(self._image_features(pixels.to(self.device, self.model.dtype)).float().cpu())
        if not chunks:
            raise ValueError(f"{self.kind} embedder: no images given")
        return F.normalize(torch.cat(chunks), dim=-1)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors, one per text (CLIP only)."""
        raise NotImplementedError(f"the {self.kind} embedder embeds images only")

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClipEmbedder(Embedder):
    """CLIP image and text embeddings (projected into the shared space) for CLIP-I and CLIP-T."""

    kind = "CLIP"

    def __init__(self, model, processor, name: str, **kw):
        super().__init__(model, processor.image_processor, name, **kw)
        self.tokenizer = processor.tokenizer

    @classmethod
    def load(cls, name: str = CLIP_VIT_B32, **kw) -> "ClipEmbedder":
        """Load through ``models.load_clip`` (hub id or save_pretrained folder)."""
        from .models import load_clip

        return cls(*load_clip(name), name, **kw)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # vision tower -> pooled CLS -> projection: what CLIPModel.get_image_features computes in every version
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors; prompts longer than CLIP's 77 tokens are truncated, as CLIP was trained."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float().cpu(), dim=-1)


class DinoEmbedder(Embedder):
    """DINO's CLS token after the final layer norm (the paper's DINO ViT-S/16 embedding)."""

    kind = "DINO"

    @classmethod
    def load(cls, name: str = DINO_VIT_S16, **kw) -> "DinoEmbedder":
        """Load through ``models.load_dino`` (hub id or save_pretrained folder)."""
        from .models import load_dino

        return cls(*load_dino(name), name, **kw)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # (B, D): the CLS token


# ----------------------------------------------------------------------------------------------------------------------
# What to evaluate, and generating it (cached)


@dataclass(frozen=True)
class Variant:
    """One row of the evaluation: the base model or a LoRA of the run."""

    label: str  # "base", "checkpoint-N" or "final"
    step: int | None  # training step (0 for the base model)
    lora: Path | None = None
    sha256: str | None = None  # of the LoRA file: the cache key, so a retrained run never reuses stale images


@dataclass(frozen=True)
class Settings:
    """Generation settings that shape the pixels, all part of the cache key."""

    model: str
    vae: str | None
    steps: int
    guidance_scale: float
    height: int
    width: int
    dtype: str
    vae_tiling: int = 0  # tile size in pixels where the VAE decodes in tiles (images larger than a tile), else 0


@dataclass(frozen=True)
class Job:
    """One image to have: prompt x seed, and whether it is for PRES (class prompt) or the prompt set."""

    prompt: str
    seed: int
    prompt_index: int  # -1 for the class prompt
    role: str  # "prompt" or "class"


def run_variants(output_dir: str | Path, *, include_base: bool = True) -> list[Variant]:
    """Base model (step 0), each ``checkpoint-N`` in step order, then the final LoRA, with their files' hashes."""
    out = Path(output_dir)
    variants = [Variant(BASE, 0)] if include_base else []
    final_step = _final_step(out)
    for label, file in lora_checkpoints(out):
        name = FINAL if label == FINAL else file.parent.name
        step = final_step if name == FINAL else int(name.rsplit("-", 1)[1])
        variants.append(Variant(name, step, file, _sha256(file)))
    return variants


def _final_step(out: Path) -> int | None:
    """How many steps the final LoRA had: summary.json, else the config's max_train_steps."""
    for name, key in (("summary.json", "steps"), ("config.json", "max_train_steps")):
        try:
            value = json.loads((out / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return value
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_key(job: Job, settings: Settings, lora_sha256: str | None) -> str:
    """16 hex digits naming an image by everything that determines its pixels."""
    fields = dataclasses.asdict(settings)
    if not fields["vae_tiling"]:  # (not in the key when off: caches written before the field existed stay valid)
        del fields["vae_tiling"]
    payload = dict(prompt=job.prompt, seed=job.seed, lora=lora_sha256, **fields)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cache_index(images_dir: Path) -> dict[str, Path]:
    """key -> an existing PNG under images/<label>/ named ``<slug>_seed<N>_<key>.png`` (written atomically)."""
    return {p.stem.rsplit("_", 1)[-1]: p for p in sorted(images_dir.glob("*/*.png"))}


def generate_all(variants: Sequence[Variant], jobs: Sequence[Job], settings: Settings, images_dir: Path, *,
                 pipe=None, device: str | None = None, progress: bool = True,
                 cpu_offload: bool = False, single_file_config: str | None = None,
                 noise_schedule: dict | None = None) -> tuple[dict[str, list[Path]], dict]:
    """Every (variant, job) image as a PNG path, generating only what the cache lacks; also per-label counts.

    The pipeline is loaded only when something is missing, so a rerun over a finished evaluation loads no SDXL.
    """
    from tqdm.auto import tqdm

    index = _cache_index(images_dir)
    paths: dict[str, list[Path]] = {}
    todo: dict[str, list[tuple[Job, Path]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for v in variants:
        folder = images_dir / v.label
        paths[v.label], todo[v.label] = [], []
        for job in jobs:
            key = image_key(job, settings, v.sha256)
            path = folder / f"{slugify(job.prompt, 40)}_seed{job.seed}_{key}.png"
            if key in index and index[key] != path:  # the same image made for another label (identical LoRA file)
                with atomic_path(path) as tmp:
                    shutil.copyfile(index[key], tmp)
            elif key not in index:
                todo[v.label].append((job, path))
            paths[v.label].append(path)
        counts[v.label] = {"generated": len(todo[v.label]), "cached": len(jobs) - len(todo[v.label])}

    missing = sum(len(t) for t in todo.values())
    if missing:
        if pipe is None:
            pipe = load_generation_pipeline(settings.model, vae=settings.vae, device=device,
                                            torch_dtype=getattr(torch, settings.dtype), cpu_offload=cpu_offload,
                                            vae_tiling=settings.vae_tiling or False,
                                            single_file_config=single_file_config)
            if noise_schedule:  # the run's --prediction_type / --zero_terminal_snr
                from .models import with_noise_schedule

                pipe.scheduler = with_noise_schedule(pipe.scheduler, **noise_schedule)
        bar = tqdm(total=missing, desc="generating", unit="image", disable=not progress)
        try:
            for v in variants:
                if todo[v.label]:
                    bar.set_postfix_str(v.label)
                    _generate_variant(pipe, v, todo[v.label], settings, bar)
        finally:
            bar.close()
    return paths, counts


def _generate_variant(pipe, variant: Variant, todo: list[tuple[Job, Path]], settings: Settings, bar) -> None:
    previous = active_loras(pipe)
    name = None
    if variant.lora is not None:
        # Only this LoRA is active, and it is deleted afterwards: checkpoints never stack on each other.
        name = load_lora(pipe, LoraSpec(str(variant.lora), 1.0, f"eval_{variant.label}"), file=variant.lora)
    try:
        # The base model is the pipeline without LoRAs; one the caller loaded is switched off (scale 0) for it.
        scale = 0.0 if name is None and previous else None
        by_prompt: dict[str, list[tuple[Job, Path]]] = {}
        for job, path in todo:
            by_prompt.setdefault(job.prompt, []).append((job, path))
        for prompt, items in by_prompt.items():
            results = generate(pipe, [prompt], [j.seed for j, _ in items], num_inference_steps=settings.steps,
                               guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                               lora_scale=scale, progress=False)
            for (job, path), r in zip(items, results):
                meta = {**r.metadata(), "label": variant.label, "role": job.role, "lora_sha256": variant.sha256 or ""}
                save_image(r.image, path, meta)
                bar.update(1)
    finally:
        if name is not None:
            unload_lora(pipe, name)
            if previous:
                pipe.set_adapters([s.name for s in previous], adapter_weights=[s.scale for s in previous])


# ----------------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate_run(output_dir: str | Path, *, prompts: Sequence[str] | None = None, num_prompts: int = 25,
                 images_per_prompt: int = 4, num_class_images: int = 8, steps: int = 30, guidance_scale: float = 5.0,
                 height: int | None = None, width: int | None = None, model: str | None = None,
                 vae: str | None = "config", clip_model: str = CLIP_VIT_B32, dino_model: str = DINO_VIT_S16,
                 out: str | Path | None = None, include_base: bool = True, copy_threshold: float = COPY_THRESHOLD,
                 device: str | None = None, pipe=None, clip: Embedder | None = None, dino: Embedder | None = None,
                 real_images: Sequence[Image.Image] | None = None, progress: bool = True, cpu_offload: bool = False,
                 vae_tiling: bool | int = False) -> dict:
    """Generate (cached), embed and score a run; write eval.json, eval.md and pictures; return eval.json's dict.

    ``model``/``vae`` default to the run's (``vae="config"``; None or "none": the model's own). ``height``/``width``
    default to the training resolution. ``prompts`` may contain ``{}`` for the subject phrase. ``pipe`` (the run's
    base model; its LoRAs are switched off for the base row), ``clip``, ``dino`` and ``real_images`` may be passed
    in to skip loading them. ``cpu_offload`` and ``vae_tiling`` as in ``load_generation_pipeline`` (for smaller
    GPUs); offloading gives the same images, so cached ones are reused; tiled images are cached apart.
    """
    run = Path(output_dir).expanduser()
    config = _read_run_config(run)
    _check_counts(images_per_prompt, num_class_images, steps, height, width, copy_threshold)
    check_memory_options(cpu_offload=cpu_offload, cuda_graphs=False, vae_tiling=vae_tiling)
    variants = run_variants(run, include_base=include_base)
    out_dir = check_out_folder(out, "--out") if out is not None else run / "eval"
    check_device(device)

    prompt_list = fill_prompts(prompts, config.instance_prompt) if prompts else \
        evaluation_prompts(config.instance_prompt, num_prompts)
    class_prompt = class_prompt_for(config.instance_prompt, config.class_prompt)
    seeds, class_seeds = list(range(images_per_prompt)), list(range(num_class_images))
    jobs = [Job(p, s, i, "prompt") for i, p in enumerate(prompt_list) for s in seeds]
    jobs += [Job(class_prompt, s, -1, "class") for s in class_seeds]

    # The real images first: a moved dataset should fail before minutes of generation, not after.
    if real_images is None:
        from .train import load_training_images

        train_images = load_training_images(config)
        real, real_keys = [t.image for t in train_images], [t.key for t in train_images]
    else:
        real = list(real_images)
        real_keys = [hashlib.sha256(im.tobytes()).hexdigest()[:16] for im in real]
    if not real:
        raise UserError("no real images to compare with")

    model = model or config.pretrained_model_name_or_path
    if vae == "config":
        vae = config.pretrained_vae_model_name_or_path
    vae = None if vae is None or str(vae).lower() == "none" else vae
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    if pipe is not None:
        dtype = str(pipe.unet.dtype).replace("torch.", "")
    height, width = height or config.resolution, width or config.resolution
    tile = DEFAULT_VAE_TILE if vae_tiling is True else int(vae_tiling or 0)
    # the tile size is part of the images' key only where it changes their pixels (an image larger than a tile)
    settings = Settings(model, vae, steps, guidance_scale, height, width, dtype,
                        vae_tiling=tile if max(height, width) > tile > 0 else 0)

    # CLIP and DINO load first, on the CPU: a wrong model name should fail before minutes of generation, and the
    # GPU stays SDXL's until generation is done.
    clip = clip or ClipEmbedder.load(clip_model, device="cpu")
    dino = dino or DinoEmbedder.load(dino_model, device="cpu")

    t0 = time.perf_counter()
    same = model == config.pretrained_model_name_or_path
    paths, counts = generate_all(variants, jobs, settings, out_dir / "images", pipe=pipe, device=device,
                                 single_file_config=config.single_file_config if same else None,
                                 noise_schedule=dict(prediction_type=config.prediction_type,
                                                     zero_terminal_snr=config.zero_terminal_snr) if same else None,
                                 progress=progress, cpu_offload=cpu_offload)
    t_generate = time.perf_counter() - t0
    gc.collect()  # a pipeline generate_all loaded is unreferenced now: its GPU memory goes before CLIP and DINO move in
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    clip.to(device)
    dino.to(device)
    lpips_metric, lpips_reason = load_lpips(device)
    real_dino, real_clip = dino.images(real), clip.images(real)
    text_clip = clip.texts(prompt_list)  # (P, D)

    rows = []
    for v in variants:
        rows.append(_score_variant(v, jobs, paths[v.label], real_dino, real_clip, text_clip, real_keys, dino, clip,
                                   lpips_metric, copy_threshold, out_dir))
        rows[-1].update(counts[v.label])
    t_metrics = time.perf_counter() - t0

    result = {
        "run": str(run), "out": str(out_dir),
        "evaluated_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "models": {"sdxl": model, "vae": vae, "clip": clip.name, "dino": dino.name,
                   "div": DIV_LPIPS if lpips_metric is not None else DIV_FALLBACK},
        "lpips": {"available": lpips_metric is not None, "reason": lpips_reason},
        "protocol": {"instance_prompt": config.instance_prompt, "subject": subject_phrase(config.instance_prompt),
                     "prompts": prompt_list, "seeds": seeds, "class_prompt": class_prompt, "class_seeds": class_seeds,
                     "steps": steps, "guidance_scale": guidance_scale, "height": settings.height,
                     "width": settings.width, "dtype": dtype, "vae_tiling": settings.vae_tiling,
                     "copy_threshold": copy_threshold},
        "real_images": {"count": len(real), "keys": real_keys, "dino": self_similarity(real_dino),
                        "clip_i": self_similarity(real_clip)},
        "paper": PAPER_TABLE1,
        "labels": rows,
        "seconds": {"generation": round(t_generate, 2), "metrics": round(t_metrics, 2)},
    }
    _write_outputs(result, out_dir, real)
    return result


def _read_run_config(run: Path):
    from .config import TrainConfig

    if run.exists() and not run.is_dir():
        raise UserError(f"{run} is a file: pass a training run's folder (its --output_dir)")
    if not run.is_dir():
        raise UserError(f"training output folder {run} does not exist")
    if not (run / "config.json").is_file():
        raise UserError(f"{run} has no config.json: expected a training output folder (what "
                        f"python -m billiard_lora.train writes to --output_dir)")
    return TrainConfig.from_file(run / "config.json")


def _check_counts(images_per_prompt: int, num_class_images: int, steps: int, height: int | None, width: int | None,
                  copy_threshold: float) -> None:
    for flag, v in (("images_per_prompt", images_per_prompt), ("num_class_images", num_class_images),
                    ("steps", steps)):
        if v < 1:
            raise UserError(f"--{flag} must be at least 1, got {v}")
    for flag, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"--{flag} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}")
    if not -1.0 <= copy_threshold <= 1.0:
        raise UserError(f"--copy_threshold is a cosine similarity in [-1, 1], got {copy_threshold}")


def _score_variant(v: Variant, jobs: Sequence[Job], paths: Sequence[Path], real_dino: torch.Tensor,
                   real_clip: torch.Tensor, text_clip: torch.Tensor, real_keys: Sequence[str], dino: Embedder,
                   clip: Embedder, lpips_metric, copy_threshold: float, out_dir: Path) -> dict:
    """One label's metrics, per-prompt breakdown, per-image scores and near-copies."""
    idx = [i for i, j in enumerate(jobs) if j.role == "prompt"]
    cls = [i for i, j in enumerate(jobs) if j.role == "class"]
    images = [_load(paths[i]) for i in idx]
    prompt_of = [jobs[i].prompt_index for i in idx]
    gen_dino, gen_clip = dino.images(images), clip.images(images)
    texts = text_clip[prompt_of]  # (N, D): each image's own prompt
    class_dino = dino.images([_load(paths[i]) for i in cls])
    groups = groups_of(prompt_of)

    # DIV per prompt (LPIPS runs once per pair); the overall DIV is their mean, as diversity() defines it
    group_div = [lpips_diversity(images, [g], lpips_metric) if lpips_metric is not None
                 else diversity(gen_dino, [g]) for g in groups]
    divs = [d for d in group_div if d is not None]
    metrics = {"dino": subject_similarity(gen_dino, real_dino), "clip_i": subject_similarity(gen_clip, real_clip),
               "clip_t": prompt_similarity(gen_clip, texts), "pres": subject_similarity(class_dino, real_dino),
               "div": sum(divs) / len(divs) if divs else None}

    per_image_dino = cosine_matrix(gen_dino, real_dino).mean(1)
    per_image_clip_i = cosine_matrix(gen_clip, real_clip).mean(1)
    per_image_clip_t = (gen_clip * texts).sum(-1)
    near_sim, near_idx = nearest(gen_dino, real_dino)
    copies = set(near_copies(near_sim, copy_threshold))
    records = []
    for n, i in enumerate(idx):
        records.append({"path": _rel(paths[i], out_dir), "prompt": jobs[i].prompt, "seed": jobs[i].seed,
                        "dino": per_image_dino[n].item(), "clip_i": per_image_clip_i[n].item(),
                        "clip_t": per_image_clip_t[n].item(), "nearest_real": int(near_idx[n]),
                        "nearest_real_key": real_keys[int(near_idx[n])], "nearest_similarity": near_sim[n].item(),
                        "near_copy": n in copies})
    per_prompt = []
    for g, div in zip(groups, group_div):
        rows = [records[n] for n in g]
        per_prompt.append({"prompt": rows[0]["prompt"],
                           **{k: sum(r[k] for r in rows) / len(rows) for k in ("dino", "clip_i", "clip_t")},
                           "div": div})
    return {
        "label": v.label, "step": v.step, "lora": str(v.lora) if v.lora else None, "lora_sha256": v.sha256,
        "metrics": metrics,
        "memorisation": {"nearest_mean": near_sim.mean().item(), "nearest_max": near_sim.max().item(),
                         "near_copies": [records[n] for n in sorted(copies)]},
        "per_prompt": per_prompt,
        "images": records,
        "class_images": [{"path": _rel(paths[i], out_dir), "prompt": jobs[i].prompt, "seed": jobs[i].seed}
                         for i in cls],
    }


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# Report: JSON, markdown, plot, grids


def plot_metrics(result: dict) -> "Figure":
    """One panel per metric over training steps (base at step 0), with the paper's and the real images' levels."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = sorted(result["labels"], key=lambda r: (r["step"] is None, r["step"] or 0))
    fig = Figure(figsize=(3.2 * len(METRICS), 3.2), dpi=100, layout="constrained")
    paper = result.get("paper", PAPER_TABLE1)
    for k, metric in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), k + 1)
        pts = [(r["step"], r["metrics"][metric]) for r in rows
               if r["step"] is not None and r["metrics"].get(metric) is not None]
        if pts:
            ax.plot([s for s, _ in pts], [m for _, m in pts], marker="o", color="tab:blue", label="this run")
        for r in rows:
            if r["step"] is not None and r["metrics"].get(metric) is not None and r["label"] in (BASE, FINAL):
                ax.annotate(r["label"], (r["step"], r["metrics"][metric]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ref = paper["DreamBooth (Stable Diffusion)"].get(metric)
        if ref is not None:
            ax.axhline(ref, color="tab:gray", linestyle="--", linewidth=1, label="paper: DreamBooth SD")
        real = result.get("real_images", {}).get(metric)
        if real is not None:
            ax.axhline(real, color="tab:green", linestyle=":", linewidth=1.5, label="real images (ours)")
        name = result["models"]["div"] if metric == "div" else METRIC_NAMES[metric]
        ax.set_title(f"{name} {'↓' if metric == 'pres' else '↑'}", fontsize=9)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize="x-small", loc="best")
    return fig


def _thumb(img: Image.Image, size: int = THUMB) -> Image.Image:
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def best_worst_grid(row: dict, out_dir: Path, k: int = 4) -> Image.Image:
    """Rows: best and worst images by DINO (subject fidelity) and by CLIP-T (prompt fidelity); scores in captions."""
    records = row["images"]
    k = min(k, max(1, len(records) // 2))  # best and worst never show the same image twice (with two or more)
    cells, labels, row_labels = [], [], []
    for metric in ("dino", "clip_t"):
        ranked = sorted(records, key=lambda r: r[metric], reverse=True)
        for which, chosen in (("best", ranked[:k]), ("worst", ranked[::-1][:k])):
            row_labels.append(f"{which} {METRIC_NAMES[metric]}")
            for r in chosen:
                cells.append(_thumb(_load(out_dir / r["path"])))
                labels.append(f"{r[metric]:.3f} · seed {r['seed']}\n{r['prompt']}")
    return image_grid(cells, len(row_labels), k, labels, row_labels=row_labels)


def near_copy_grid(row: dict, out_dir: Path, real: Sequence[Image.Image], limit: int = 8) -> Image.Image:
    """Each flagged image beside its nearest training image (most similar first)."""
    copies = sorted(row["memorisation"]["near_copies"], key=lambda r: -r["nearest_similarity"])[:limit]
    cells, labels = [], []
    for r in copies:
        cells += [_thumb(_load(out_dir / r["path"])), _thumb(real[r["nearest_real"]])]
        labels += [f"{r['prompt']} (seed {r['seed']})", f"training image {r['nearest_real_key']}: "
                                                        f"{r['nearest_similarity']:.3f}"]
    return image_grid(cells, len(copies), 2, labels, col_labels=["generated", "nearest training image"])


def overview_grid(result: dict, out_dir: Path, max_prompts: int = 6) -> Image.Image:
    """Rows = labels (base ... final), columns = the first prompts at seed 0: how training changed the same image."""
    prompts = result["protocol"]["prompts"][:max_prompts]
    seed = result["protocol"]["seeds"][0]
    cells = []
    for row in result["labels"]:
        by_prompt = {r["prompt"]: r for r in row["images"] if r["seed"] == seed}
        cells += [_thumb(_load(out_dir / by_prompt[p]["path"])) for p in prompts]
    return image_grid(cells, len(result["labels"]), len(prompts), row_labels=[r["label"] for r in result["labels"]],
                      col_labels=prompts)


def _fmt(v: float | None, missing: str = "–") -> str:
    return missing if v is None else f"{v:.3f}"


def markdown_report(result: dict) -> str:
    """eval.md: what was measured how, the table beside the paper's numbers, plot, memorisation, per-label detail."""
    p, m, real = result["protocol"], result["models"], result["real_images"]
    div_name = m["div"]
    lines = [
        f"# DreamBooth evaluation of `{Path(result['run']).name}`", "",
        f"Run `{result['run']}`, evaluated {result['evaluated_at']}.", "",
        f"- **Subject phrase** \"{p['subject']}\" (the instance prompt \"{p['instance_prompt']}\" without its "
        f"framing words), filled into {len(p['prompts'])} prompts × {len(p['seeds'])} images "
        f"(seeds {p['seeds'][0]}–{p['seeds'][-1]}).",
        f"- **Class prompt** for PRES: \"{p['class_prompt']}\" × {len(p['class_seeds'])} images.",
        f"- **Generation**: `{m['sdxl']}`" + (f" with VAE `{m['vae']}`" if m["vae"] else "") +
        f", {p['steps']} steps, guidance {p['guidance_scale']:g}, {p['width']}×{p['height']}, {p['dtype']}.",
        f"- **Real images**: {real['count']} training images of the run.",
        f"- **Models**: DINO `{m['dino']}` (CLS token), CLIP `{m['clip']}`; DIV: {div_name}.",
    ]
    if not result["lpips"]["available"]:
        lines.append(f"- **LPIPS unavailable** ({result['lpips']['reason']}): DIV is 1 − the mean pairwise DINO "
                     f"cosine among one prompt's images, averaged over prompts — higher is more diverse, like LPIPS, "
                     f"but on another scale: do not compare it with the paper's LPIPS DIV.")
    lines += ["", "## Scores", "",
              f"| label | step | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ | {div_name} ↑ | near-copies |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["labels"]:
        x = r["metrics"]
        lines.append(f"| {r['label']} | {'' if r['step'] is None else r['step']} | {_fmt(x['dino'])} | "
                     f"{_fmt(x['clip_i'])} | {_fmt(x['clip_t'])} | {_fmt(x['pres'])} | {_fmt(x['div'])} | "
                     f"{len(r['memorisation']['near_copies'])} / {len(r['images'])} |")
    lines.append(f"| *real training images, pairwise (ours)* | | {_fmt(real['dino'])} | {_fmt(real['clip_i'])} "
                 f"| | | | |")
    for name, x in result["paper"].items():
        lines.append(f"| *paper: {name}* | | {_fmt(x.get('dino'), '')} | {_fmt(x.get('clip_i'), '')} | "
                     f"{_fmt(x.get('clip_t'), '')} | | | |")
    lines += [
        "",
        "The paper's numbers (Ruiz et al. 2022, arXiv 2208.12242, Table 1) come from 30 subjects (dogs, cats, objects) "
        "× 25 prompts × 4 images with Stable Diffusion v1.4 fully fine-tuned, DINO ViT-S/16 and CLIP ViT-B/32. Ours: "
        "one subject, SDXL with a LoRA, our own prompt list" +
        ("" if m["clip"].endswith("clip-vit-base-patch32") else f" and a different CLIP (`{m['clip']}`)") +
        ". The models and protocols differ: read the trend over checkpoints and the distance to the real-image row, "
        "not the absolute gap to the paper.", "",
        "DINO and CLIP-I: how much the generated images look like the subject's real images (DINO tells subjects "
        "apart better). CLIP-T: how well they follow their prompt. PRES: how much the *class* prompt's images look "
        "like the subject — it rising above the base model's value is language drift. DIV: how different one "
        "prompt's images are from each other — it falling means the LoRA collapses onto a few looks.", "",
        "![metrics over training steps](metrics.png)", "",
        "![base, checkpoints and final at seed 0](overview.png)", "",
        "## Memorisation", "",
        f"Each generated image's nearest training image by DINO cosine; at or above {p['copy_threshold']:g} it counts "
        f"as a near-copy (`--copy_threshold`).", "",
        "| label | mean nearest | max nearest | near-copies |", "|---|---:|---:|---:|",
    ]
    for r in result["labels"]:
        mem = r["memorisation"]
        lines.append(f"| {r['label']} | {_fmt(mem['nearest_mean'])} | {_fmt(mem['nearest_max'])} | "
                     f"{len(mem['near_copies'])} |")
    for r in result["labels"]:
        copies = r["memorisation"]["near_copies"]
        if copies:
            lines += ["", f"**{r['label']}** near-copies ([grid](near_copies_{r['label']}.png)):", ""]
            top = sorted(copies, key=lambda c: -c["nearest_similarity"])[:MAX_LISTED]
            lines += [f"- `{c['path']}` ({c['prompt']}, seed {c['seed']}) ≈ training image {c['nearest_real']} "
                      f"(`{c['nearest_real_key']}`): {c['nearest_similarity']:.3f}" for c in top]
            if len(copies) > len(top):
                lines.append(f"- … and {len(copies) - len(top)} more (all in `eval.json`)")
    lines += ["", "## Per label", ""]
    for r in result["labels"]:
        x = r["metrics"]
        lines += [f"### {r['label']}" + (f" (step {r['step']})" if r["step"] is not None else ""), "",
                  f"DINO {_fmt(x['dino'])} · CLIP-I {_fmt(x['clip_i'])} · CLIP-T {_fmt(x['clip_t'])} · "
                  f"PRES {_fmt(x['pres'])} · DIV {_fmt(x['div'])}; {r['generated']} images generated, "
                  f"{r['cached']} from the cache" + (f"; LoRA `{r['lora']}`" if r["lora"] else "") + ".", "",
                  f"![best and worst images of {r['label']}](best_worst_{r['label']}.png)", "",
                  "<details><summary>per prompt</summary>", "",
                  "| prompt | DINO | CLIP-I | CLIP-T | DIV |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {q['prompt']} | {_fmt(q['dino'])} | {_fmt(q['clip_i'])} | {_fmt(q['clip_t'])} | "
                  f"{_fmt(q['div'])} |" for q in r["per_prompt"]]
        lines += ["", "</details>", ""]
    lines.append(f"Generation {result['seconds']['generation']:.1f} s, embedding and scoring "
                 f"{result['seconds']['metrics']:.1f} s. All numbers and per-image scores: `eval.json`.")
    return "\n".join(lines) + "\n"


def _write_outputs(result: dict, out_dir: Path, real: Sequence[Image.Image]) -> None:
    files = {"json": "eval.json", "markdown": "eval.md", "plot": "metrics.png", "overview": "overview.png"}
    for row in result["labels"]:
        save_image(best_worst_grid(row, out_dir), out_dir / f"best_worst_{row['label']}.png")
        row["grids"] = {"best_worst": f"best_worst_{row['label']}.png"}
        if row["memorisation"]["near_copies"]:
            save_image(near_copy_grid(row, out_dir, real), out_dir / f"near_copies_{row['label']}.png")
            row["grids"]["near_copies"] = f"near_copies_{row['label']}.png"
    save_image(overview_grid(result, out_dir), out_dir / files["overview"])
    with atomic_path(out_dir / files["plot"]) as tmp:
        plot_metrics(result).savefig(tmp, format="png")
    result["files"] = files
    atomic_write_json(out_dir / files["json"], result)
    atomic_write_text(out_dir / files["markdown"], markdown_report(result))  # last: its presence means complete


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m billiard_lora.evaluate`` flags."""
    p = ArgumentParser(prog="python -m billiard_lora.evaluate", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("output_dir", help="a training run's --output_dir (config.json, the LoRA, checkpoint-N/)")
    p.add_argument("--prompts_file", help="prompts instead of the 25 built-in ones, one per line; {} = the subject")
    p.add_argument("--num_prompts", type=int, default=len(PROMPT_TEMPLATES), help="how many built-in prompts")
    p.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--num_class_images", type=int, default=8, help="class-prompt images for PRES")
    p.add_argument("--steps", type=int, default=30, help="inference steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, help="default: the training resolution")
    p.add_argument("--width", type=int, help="default: the training resolution")
    p.add_argument("--clip_model", default=CLIP_VIT_B32,
                   help=f"hub id or save_pretrained folder (default: the paper's ViT-B/32; ViT-L/14: {CLIP_VIT_L14})")
    p.add_argument("--dino_model", default=DINO_VIT_S16, help="hub id or save_pretrained folder (DINO ViT-S/16)")
    p.add_argument("--model", help="SDXL base model (default: the run's)")
    p.add_argument("--vae", default="config", help="separate VAE (default: the run's); 'none': the model's own")
    p.add_argument("--out", help="report folder (default: OUTPUT_DIR/eval); images are cached in OUT/images")
    p.add_argument("--no_base", action="store_true", help="skip the base model baseline")
    p.add_argument("--copy_threshold", type=float, default=COPY_THRESHOLD,
                   help="DINO cosine at or above which a generated image counts as a near-copy of a training image")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    add_memory_arguments(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Evaluate a training run from the command line; prints the score table and where the report is."""
    args = build_parser().parse_args(argv)
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else None
    result = evaluate_run(args.output_dir, prompts=prompts, num_prompts=args.num_prompts,
                          images_per_prompt=args.images_per_prompt, num_class_images=args.num_class_images,
                          steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
                          model=args.model, vae=args.vae, clip_model=args.clip_model, dino_model=args.dino_model,
                          out=args.out, include_base=not args.no_base, copy_threshold=args.copy_threshold,
                          device=args.device, cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling)
    print(f"{'label':<16}{'step':>6}" + "".join(f"{METRIC_NAMES[k]:>9}" for k in METRICS) + "  near-copies")
    for r in result["labels"]:
        step = "" if r["step"] is None else r["step"]
        print(f"{r['label']:<16}{step:>6}" + "".join(f"{_fmt(r['metrics'][k]):>9}" for k in METRICS) +
              f"  {len(r['memorisation']['near_copies'])}")
    if not result["lpips"]["available"]:
        print(f"DIV is 1 - DINO similarity here, not LPIPS: {result['lpips']['reason']}")
    print(f"report: {Path(result['out']) / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
