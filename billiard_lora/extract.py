"""``python -m billiard_lora.lora extract``: a LoRA from the difference between a fine-tuned SDXL model and its base.

What kohya's ``networks/extract_lora_from_models.py --sdxl`` does (diffusers has no such tool: diffusers issue #7997):
for each adapted layer, ΔW = W_tuned - W_base, truncated by SVD to ``rank`` (or to the fewest directions holding
``energy`` of ||ΔW||²), written as LoRA factors ``up = U_k·sqrt(S_k)``, ``down = sqrt(S_k)·V_kᵀ``. A full DreamBooth
fine-tune, a merged checkpoint (``lora merge``) or a civitai finetune thus becomes a file of a few hundred MB or less
that any SDXL model can load, at whatever rank. At a rank as high as the change's own the LoRA reproduces the tuned
model (tested: a LoRA merged into a model and extracted again gives the same images).

Layers: the UNet's ``--lora_layers`` (default ``attn,ff,proj``: every Linear of the transformer blocks, kohya's
choice), its convolutions with ``--conv_rank``; each text encoder's attention and MLP projections when it changed by
more than ``min_diff`` anywhere (kohya's ``--min_diff``; a fine-tune that froze the text encoders changes none).
Layers that did not change at all are left out. The file is written in kohya's format (ComfyUI, A1111, and diffusers'
``load_lora_weights`` read it) or diffusers'.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

TEXT_ENCODER_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya: CLIPAttention, CLIPMLP
DEFAULT_LAYERS = "attn,ff,proj"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class Extraction:
    out: Path
    infos: list  # lora_tools.ResizedLayer, one per extracted layer
    unchanged: int = 0  # adapted layers whose weights are the same in both models (left out)
    text_encoders: dict[str, float] = field(default_factory=dict)  # component -> largest weight change
    skipped: list[str] = field(default_factory=list)  # text encoders left out (changed by min_diff or less)


def _targets(component: str, lora_layers: str, conv: bool) -> list[str]:
    from .lora import LORA_LAYER_GROUPS, unet_lora_layers

    if component != "unet":
        return list(TEXT_ENCODER_LAYERS)
    names = unet_lora_layers(lora_layers)
    return names + [n for n in LORA_LAYER_GROUPS["conv"] if conv and n not in names]


def _layer_weights(pipe, lora_layers: str, conv: bool) -> dict[str, dict[str, torch.Tensor]]:
    """component -> {module name (as diffusers saves it): weight} of the layers an extraction considers."""
    from .lora import _clip_canonical

    out: dict[str, dict[str, torch.Tensor]] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        targets = _targets(component, lora_layers, conv)
        out[component] = {
            (name if component == "unet" else _clip_canonical(name)): module.weight.detach()
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)}
    return out


def _load(model: str, what: str, torch_dtype, single_file_config, lora_layers: str, conv: bool):
    from .models import load_pipeline
    from .single_file import is_single_file

    print(f"loading the {what} model {model}", flush=True)
    pipe = load_pipeline(model, torch_dtype=torch_dtype,  # (the layout only for a single file: the other may not be)
                         single_file_config=single_file_config if is_single_file(model) else None)
    return _layer_weights(pipe, lora_layers, conv)


def _factors(delta: torch.Tensor, k_rank: int | None, energy: float | None, clamp_quantile: float | None,
             device: str | None):
    """(down, up, info-fields) of one layer's ΔW, SVD-truncated."""
    from .lora_tools import choose_rank

    shape = delta.shape
    matrix = delta.reshape(shape[0], -1).to(device or "cpu", torch.float32)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = choose_rank(s, rank=k_rank, energy=energy)
    root = torch.sqrt(s[:k])
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    if clamp_quantile is not None and clamp_quantile < 1.0:  # kohya's --clamp_quantile: outliers cut off
        values = torch.cat([up.flatten(), down.flatten()])
        limit = torch.quantile(values.abs().float()[:2 ** 24], clamp_quantile)  # (quantile's input size limit)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if delta.ndim == 4:
        up, down = up[:, :, None, None], down.reshape(k, *shape[1:])
    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    return down.cpu(), up.cpu(), k, kept, s.cpu().double()


def extract_lora(base: str, tuned: str, out: str | Path, *, rank: int | None = None, energy: float | None = None,
                 conv_rank: int | None = None, lora_layers: str = DEFAULT_LAYERS, min_diff: float = 0.01,
                 clamp_quantile: float | None = None, torch_dtype: torch.dtype | None = None,
                 single_file_config: str | None = None, to: str = "kohya", device: str | None = None,
                 overwrite: bool = False, precision: str | None = None) -> Extraction:
    """Extract a LoRA of ``tuned`` - ``base`` and write it to ``out`` (a .safetensors path or a folder), its weights
    in ``precision`` (fp32, fp16, bf16; default fp32); see the module's docstring. Every argument is checked before
    a model loads."""
    from .io import save_safetensors
    from .lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, unet_lora_layers
    from .lora_tools import (ResizedLayer, _most_common, _output_file, check_rank_or_energy, load_lora_file,
                             lora_config_dict, to_kohya, write_lora)

    check_rank_or_energy(rank, energy)
    if conv_rank is not None and conv_rank < 1:
        raise UserError(f"--conv_rank must be at least 1, got {conv_rank}")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile is a quantile in (0, 1], e.g. 0.99 (kohya's); got {clamp_quantile}")
    if min_diff < 0:
        raise UserError(f"--min_diff is a weight difference, 0 or more; got {min_diff}")
    if to not in ("kohya", "diffusers"):
        raise UserError(f"--format must be kohya or diffusers, not {to!r}")
    if not unet_lora_layers(lora_layers):
        raise UserError("--lora_layers is empty: give attn, ff, proj (the default: all three) or module names")
    for name, model in (("--base", base), ("--tuned", tuned)):  # before minutes of loading the other one
        if Path(model).expanduser().resolve() == Path(out).expanduser().resolve():
            raise UserError(f"--out {out} is the {name} model; write the LoRA somewhere else")
        if not Path(model).expanduser().exists() and (str(model).startswith(("/", "./", "../", "~", ".\\"))
                                                      or str(model).endswith((".safetensors", ".ckpt"))):
            raise UserError(f"{name} {model}: no such file or folder")
    if str(base) == str(tuned) or (Path(base).exists() and Path(base).resolve() == Path(tuned).resolve()):
        raise UserError(f"--base and --tuned are the same model ({base}): give the fine-tuned one as --tuned")
    out_file = _output_file(out, KOHYA_WEIGHT_NAME if to == "kohya" else LORA_WEIGHT_NAME, Path(tuned), "extracted",
                            overwrite)

    conv = conv_rank is not None
    before = _load(base, "base", torch_dtype, single_file_config, lora_layers, conv)
    after = _load(tuned, "tuned", torch_dtype, single_file_config, lora_layers, conv)
    result = Extraction(out_file, [])
    factors: dict[str, dict[str, tuple]] = collections.defaultdict(dict)
    for component in COMPONENTS:
        old, new = before.get(component, {}), after.get(component, {})
        if set(old) != set(new) or any(old[n].shape != new[n].shape for n in old):
            odd = sorted(set(old) ^ set(new)) or [n for n in old if old[n].shape != new[n].shape]
            raise UserError(f"--tuned {tuned} is not laid out as --base {base} ({component}: {odd[0]} "
                            f"{'differs' if odd[0] in old and odd[0] in new else 'is in one only'}): extract needs a "
                            f"fine-tune of the same architecture (an SDXL finetune and SDXL base)")
        deltas = {n: new[n].float() - old[n].float() for n in old}
        if component != "unet":
            largest = max((float(d.abs().max()) for d in deltas.values()), default=0.0)
            result.text_encoders[component] = largest
            if largest <= min_diff:
                result.skipped.append(component)
                continue
        for name, delta in deltas.items():
            if not bool(delta.any()):
                result.unchanged += 1
                continue
            k_rank = conv_rank if delta.ndim == 4 and conv_rank is not None else rank
            down, up, k, kept, s = _factors(delta, k_rank, None if delta.ndim == 4 and conv else energy,
                                            clamp_quantile, device)
            factors[component][name] = (down, up, k)
            result.infos.append(ResizedLayer(f"{component}.{name}", int(min(delta.shape[0], delta[0].numel())), k,
                                             kept, s))
    if not result.infos:
        raise UserError(f"--tuned {tuned} and --base {base} have the same weights in every layer considered "
                        f"({lora_layers}{', conv' if conv else ''}; text encoders when they changed by more than "
                        f"--min_diff {min_diff}): there is nothing to extract")
    # one alpha for the file, the most common rank (diffusers' kohya loader keeps only one); layers of another rank
    # absorb sqrt(k / alpha) in each factor, so that alpha / k · up @ down is still their truncated ΔW
    alpha = _most_common(info.new_rank for info in result.infos)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component, per_module in factors.items():
        state, ranks = {}, {}
        for name, (down, up, k) in per_module.items():
            fix = (k / alpha) ** 0.5
            state[f"{name}.lora_A.weight"] = (down * fix).contiguous()
            state[f"{name}.lora_B.weight"] = (up * fix).contiguous()
            ranks[name] = k
        layers[component] = state
        configs[component] = lora_config_dict(ranks, {m: float(alpha) for m in ranks})
    record = {"base": str(base), "tuned": str(tuned), "rank": rank, "energy": energy, "conv_rank": conv_rank,
              "lora_layers": lora_layers, "min_diff": min_diff, "clamp_quantile": clamp_quantile,
              "text_encoders_skipped": result.skipped}
    header = {"billiard_lora.extracted": json.dumps(record)}
    if to == "diffusers":
        write_lora(out_file, layers, configs, header=header, precision=precision)
        return result
    import tempfile

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".extract-") as tmp:
        written = write_lora(Path(tmp) / LORA_WEIGHT_NAME, layers, configs, header=header)
        tensors, kohya_header = to_kohya(load_lora_file(written))
    save_safetensors(tensors, out_file, metadata={**kohya_header, **header}, precision=precision)
    return result


def format_extraction(result: Extraction, *, per_layer: bool = True) -> str:
    """One line per layer (rank, energy kept), then the summary and what was left out."""
    from .lora_tools import format_resize

    lines = [format_resize(result.infos, result.out, per_layer=per_layer)]
    for component, largest in result.text_encoders.items():
        verdict = "left out" if component in result.skipped else "extracted"
        lines.append(f"{component}: largest weight change {largest:.3g} ({verdict}; --min_diff sets the threshold)")
    if result.unchanged:
        lines.append(f"{result.unchanged} layers are the same in both models and were left out")
    return "\n".join(lines)
