"""LyCORIS adapters: LoHa and LoKr, trained through peft and saved in LyCORIS' own file format.

LoHa (``ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r``, a Hadamard product of two low-rank products) and LoKr
(``ΔW = w1 ⊗ w2 · scale``, a Kronecker product: w1 small and full, w2 full or low-rank) are what kohya users train
with ``--network_module lycoris.kohya --network_args algo=loha|lokr`` and SimpleTuner users with
``--lora_type lycoris``. peft has both (``LoHaConfig``, ``LoKrConfig``); we never write their layers.

The file is the format every tool that reads LyCORIS reads (ComfyUI, A1111/Forge, kohya, SimpleTuner):
``lora_unet_<module>.hada_w1_a`` ... / ``.lokr_w1`` ..., one ``.alpha`` per module, text encoders under
``lora_te1_``/``lora_te2_``. diffusers' SDXL ``load_lora_weights`` reads no LoHa file and no LoKr file in these
names ("Invalid LoRA checkpoint"), so ``load_lycoris`` puts one on a pipeline as a named peft adapter: diffusers'
own ``set_adapters`` (scales), ``fuse_lora``, ``delete_adapters`` and ``unload_lora_weights`` then treat it as any
LoRA. It reads the files others write too: UNet modules in diffusers' names (ours, kohya's diffusers-style), in the
original SGM names (most SDXL LyCORIS files on civitai: ``lora_unet_input_blocks_4_1_...``) or SimpleTuner's
``lycoris_`` prefix.

Scales, as ComfyUI and A1111 apply them: LoHa ``alpha / rank``; LoKr ``alpha / rank`` where a factor is low-rank, 1
where both factors are full matrices. peft always divides by its ``r``: ``match_lycoris_scale`` gives peft's full
LoKr layers LyCORIS' 1 at training time, and saving folds any remaining difference into the first factor.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import UserError

ALGOS = ("loha", "lokr")
PARTS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
TUCKER_PARTS = ("hada_t1", "hada_t2", "lokr_t2")  # CP/Tucker-decomposed 3x3 convolutions (LyCORIS' use_tucker)
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_OTHER_PREFIXES = {"lycoris_": "unet", "lora_te_": "text_encoder"}  # SimpleTuner's UNet files; SD1-style te
_PART = re.compile(r"\.(hada_\w+|lokr_\w+|alpha|dora_scale)$")


def is_lycoris_keys(keys) -> bool:
    """Whether a state dict's keys are a LoHa or LoKr (LyCORIS or peft naming)."""
    return any(".hada_" in k or ".lokr_" in k for k in keys)


def algo_of(keys) -> str:
    return "lokr" if any(".lokr_" in k for k in keys) else "loha"


def lycoris_config(algo: str, *, rank: int, alpha: float, target_modules: list[str], factor: int = -1,
                   **patterns):
    """peft's config for a trainable LoHa/LoKr adapter (zero change at the start, as LyCORIS initialises);
    ``patterns``: peft's rank_pattern/alpha_pattern."""
    from peft import LoHaConfig, LoKrConfig

    if algo == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_modules, **patterns)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=target_modules, decompose_factor=factor, **patterns)


def match_lycoris_scale(model: torch.nn.Module, adapter: str = "default") -> None:
    """LyCORIS' rule for LoKr: a layer whose two factors are both full matrices is not scaled by alpha/rank
    (``--rank 100000`` in SimpleTuner's and kohya's LoKr presets means "full", not a 1e-5 scale). peft divides by r
    anyway; here such layers get alpha = r, so that training, the saved file and every loader agree."""
    from peft.tuners.lokr.layer import LoKrLayer

    for m in model.modules():
        if isinstance(m, LoKrLayer) and adapter in m.lokr_w1 and adapter in m.lokr_w2:
            m.alpha[adapter] = m.r[adapter]
            m.scaling[adapter] = 1.0


def lycoris_scale(parts: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """The scale ComfyUI (comfy/weight_adapter) and A1111 apply to a module's product: alpha over the rank of its
    low-rank factor; 1 without alpha, or for a LoKr of two full matrices."""
    if "hada_w1_b" in parts:
        dim = parts["hada_w1_b"].shape[0]
    elif "lokr_w2_b" in parts:
        dim = parts["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in parts:
        dim = parts["lokr_w1_b"].shape[0]
    else:
        dim = None
    return float(alpha) / dim if alpha is not None and dim else 1.0


def _first_factor(parts: Mapping[str, torch.Tensor]) -> str:
    return next(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in parts)


def _clip_canonical(module: str) -> str:
    return "text_model." + module if module.startswith(("encoder.", "embeddings.", "final_layer_norm")) else module


def _unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def adapter_type(model) -> str:
    """"lora", "loha" or "lokr": the kind of the model's "default" peft adapter."""
    config = getattr(_unwrap(model), "peft_config", {}).get("default")
    return {"LOHA": "loha", "LOKR": "lokr"}.get(str(getattr(getattr(config, "peft_type", None), "value", "")), "lora")


def lycoris_state_dict(models: Mapping[str, torch.nn.Module], adapter: str = "default"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors in LyCORIS naming, summary) of the peft LoHa/LoKr adapters of ``models`` (component -> model)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    out: dict[str, torch.Tensor] = {}
    ranks, alphas, algos = Counter(), Counter(), set()
    for component, model in models.items():
        if model is None:
            continue
        model = _unwrap(model)
        for name, layer in model.named_modules():
            if not isinstance(layer, LycorisLayer) or adapter not in layer._available_adapters:
                continue
            parts = {p: getattr(layer, p)[adapter].detach().float().cpu()
                     for p in (*PARTS["loha"], *PARTS["lokr"], *TUCKER_PARTS)
                     if adapter in getattr(layer, p, {})}
            if any(p in parts for p in TUCKER_PARTS):
                raise UserError("internal: Tucker-decomposed LyCORIS layers are not saved here")
            algos.add("loha" if "hada_w1_a" in parts else "lokr")
            alpha = float(layer.alpha[adapter])
            fold = float(layer.scaling[adapter]) / lycoris_scale(parts, alpha)
            if fold != 1.0:  # the loaders would scale differently from training: carry the difference in the weights
                first = _first_factor(parts)
                parts[first] = parts[first] * fold
            key = PREFIXES[component] + (_clip_canonical(name) if component != "unet" else name).replace(".", "_")
            for p, t in parts.items():
                out[f"{key}.{p}"] = t.contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha)
            ranks[int(layer.r[adapter])] += 1
            alphas[alpha] += 1
    if not out:
        raise UserError("internal: no LoHa/LoKr layer to save")
    summary = {"algo": algos.pop() if len(algos) == 1 else "mixed",
               "rank": ranks.most_common(1)[0][0], "alpha": alphas.most_common(1)[0][0]}
    return out, summary


def kohya_header(summary: Mapping[str, Any], *, factor: int = -1) -> dict[str, str]:
    """The ``ss_`` metadata kohya writes for a LyCORIS network (what A1111's and civitai's viewers show)."""
    args = {"algo": summary["algo"]}
    if summary["algo"] == "lokr":
        args["factor"] = str(factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
            "ss_network_dim": str(summary["rank"]), "ss_network_alpha": str(summary["alpha"]),
            "ss_base_model_version": "sdxl_base_v1-0"}


def save_lycoris(path: str | Path, models: Mapping[str, torch.nn.Module], *, metadata: Mapping[str, str] | None = None,
                 factor: int = -1, precision: str | None = None) -> Path:
    """Write the LoHa/LoKr of ``models`` as one LyCORIS file (atomically), with kohya's ``ss_`` header; its weights
    in ``precision`` (fp32, fp16, bf16) where given."""
    from .io import save_safetensors

    tensors, summary = lycoris_state_dict(models)
    save_safetensors(tensors, path, metadata={**kohya_header(summary, factor=factor), **(metadata or {})},
                     precision=precision)
    return Path(path)


# ---------------------------------------------------------------------------------------------- loading
def module_names(component: str, model: torch.nn.Module) -> dict[str, str]:
    """Every name a LyCORIS file may give one of the model's weighted modules -> the module's own name."""
    names = [n for n, m in _unwrap(model).named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    out: dict[str, str] = {}
    if component == "unet":
        from .lora_tools import _sgm_names

        for n in names:
            flat = n.replace(".", "_")
            out["lora_unet_" + flat] = n
            out["lycoris_" + flat] = n
        for n, sgm in _sgm_names(names).items():
            out.setdefault("lora_unet_" + sgm.replace(".", "_"), n)
    else:
        prefixes = ["lora_te1_", "lora_te_"] if component == "text_encoder" else ["lora_te2_"]
        for n in names:
            for prefix in prefixes:
                out[prefix + _clip_canonical(n).replace(".", "_")] = n
    return out


def split_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """LyCORIS module name -> {part: tensor} (alpha included)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PART.search(key)
        if m is None:
            continue
        modules.setdefault(key[:m.start()], {})[m[1]] = t
    return modules


def component_of(module: str) -> str | None:
    for component, prefix in PREFIXES.items():
        if module.startswith(prefix):
            return component
    return next((c for p, c in _OTHER_PREFIXES.items() if module.startswith(p)), None)


def _peft_config(algo: str, modules: Mapping[str, Mapping[str, torch.Tensor]], dims: Mapping[str, tuple[int, int]]):
    """A peft config under which each module gets exactly the factor shapes the file holds (alpha = rank: the file's
    scale is baked into the weights)."""
    from peft import LoHaConfig, LoKrConfig

    ranks: dict[str, int] = {}
    if algo == "loha":
        for name, parts in modules.items():
            ranks[name] = parts["hada_w1_b"].shape[0]
    else:
        from peft.tuners.lokr.layer import factorization

        shapes = {}
        for name, p in modules.items():
            out_dim, in_dim = dims[name]
            out_l, in_m = p["lokr_w1"].shape[:2] if "lokr_w1" in p else (p["lokr_w1_a"].shape[0],
                                                                          p["lokr_w1_b"].shape[1])
            out_k, in_n = out_dim // out_l, in_dim // in_m  # (w2 of a convolution also holds its kernel)
            shapes[name] = ((out_l, out_k), (in_m, in_n))
            # a low-rank factor's rank; both full: any rank above half the factor's size makes peft build full ones
            ranks[name] = (p["lokr_w2_a"].shape[1] if "lokr_w2_a" in p else p["lokr_w1_a"].shape[1]
                           if "lokr_w1_a" in p else max(out_k, in_n))
        factor = next((f for f in sorted({s[0][0] for s in shapes.values()}) + [-1]
                       if all(factorization(o[0] * o[1], f) == o and factorization(i[0] * i[1], f) == i
                              for o, i in shapes.values())), None)
        if factor is None:
            raise ValueError("its Kronecker factors follow no single LoKr factor (peft rebuilds them from one)")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): v for n, v in ranks.items() if v != r}  # full names: unique
    common = dict(r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(modules))
    if algo == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(**common, decompose_factor=factor,
                      decompose_both=any("lokr_w1_a" in p for p in modules.values()))


def load_lycoris(pipe, file: str | Path, adapter_name: str) -> int:
    """Put the LoHa/LoKr in ``file`` on the pipeline's UNet (and text encoders) as the peft adapter
    ``adapter_name``; returns how many layers it adapted. UserError where the file does not fit the model."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    modules = split_modules(load_file(str(file)))
    if any(p in parts for parts in modules.values() for p in TUCKER_PARTS):
        raise UserError(f"{file}: its 3x3 convolutions are Tucker-decomposed (LyCORIS' use_tucker), which peft "
                        f"does not load; use it in ComfyUI or A1111, or train without use_tucker")
    if any("dora_scale" in parts for parts in modules.values()):
        raise UserError(f"{file}: a LyCORIS file with DoRA weights (dora_scale) is not loaded here; use it in "
                        f"ComfyUI or A1111")
    resolved: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # component -> module -> parts
    unknown, names = [], {}
    for name, parts in modules.items():
        component = component_of(name)
        model = getattr(pipe, component, None) if component else None
        if model is not None and component not in names:
            names[component] = module_names(component, model)
        if model is None or name not in names[component]:
            unknown.append(name)
            continue
        parts = dict(parts)
        alpha = parts.pop("alpha", None)
        scale = lycoris_scale(parts, None if alpha is None else float(alpha))
        first = _first_factor(parts)
        parts[first] = parts[first].float() * scale
        resolved.setdefault(component, {})[names[component][name]] = parts
    if unknown:
        raise ValueError(f"{len(unknown)} of its {len(modules)} layers name no module of this model "
                         f"(first: {unknown[0]})")
    done = []
    for component, peft_modules in resolved.items():
        model = getattr(pipe, component)
        algo = algo_of(f".{p}" for parts in peft_modules.values() for p in parts)
        state = {f"{n}.{p}": t for n, parts in peft_modules.items() for p, t in parts.items()}
        try:
            layers = dict(model.named_modules())
            dims = {n: tuple(layers[n].weight.shape[:2]) for n in peft_modules}  # (out, in) of Linear and Conv
            config = _peft_config(algo, peft_modules, dims)
            model.add_adapter(config, adapter_name=adapter_name)
            done.append(model)
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".hada_" in k or ".lokr_" in k]
            if unexpected:
                raise ValueError(f"peft built other factor shapes for {unexpected[0]}")
        except (RuntimeError, ValueError) as exc:  # a size mismatch
            for m in done:
                _drop(m, adapter_name)
            raise ValueError(str(exc).strip().splitlines()[-1][:200]) from None
    return sum(len(m) for m in resolved.values())


def _drop(model, adapter_name: str) -> None:
    try:
        model.delete_adapters(adapter_name) if hasattr(model, "delete_adapters") else model.delete_adapter(adapter_name)
    except Exception:  # noqa: BLE001 - best effort while reporting the real error
        pass


def count_layers(keys) -> int:
    """How many adapted layers LyCORIS keys describe."""
    return len({k[:m.start()] for k in keys if (m := _PART.search(k)) and m[1] != "alpha"})


def count_loaded(pipe, adapter_name: str) -> int:
    from peft.tuners.lycoris_utils import LycorisLayer

    return sum(1 for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
               for m in getattr(pipe, c).modules()
               if isinstance(m, LycorisLayer) and adapter_name in m._available_adapters)


# ---------------------------------------------------------------------------------------------- to a LoRA
_CONV_NAME = re.compile(r"(conv\d?|conv_shortcut|conv_in|conv_out|downsamplers_0_conv|upsamplers_0_conv|_op|"
                        r"in_layers_2|out_layers_3|skip_connection|input_blocks_0_0|out_2)$")
_ONE_BY_ONE = re.compile(r"(conv_shortcut|skip_connection)$")


def delta_weight(parts: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A module's ΔW as ComfyUI and A1111 compute it from the file, as an (out, in·kh·kw) matrix."""
    p = {k: v.to(dtype) for k, v in parts.items() if k != "alpha"}
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "hada_w1_a" in p:
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        d = torch.kron(w1[:, :, None, None], w2) if w2.ndim == 4 else torch.kron(w1, w2)
    return (d * lycoris_scale(parts, alpha)).reshape(d.shape[0], -1)


def kernel_of(name: str, parts: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """A module's kernel size: from a 4-D factor where the file has one, else from its name (SDXL's convolutions are
    3x3 but for the 1x1 shortcuts); () for a Linear layer."""
    four = next((t for t in parts.values() if t.ndim == 4), None)
    if four is not None:
        return tuple(four.shape[2:])
    if not _CONV_NAME.search(name):
        return ()
    return (1, 1) if _ONE_BY_ONE.search(name) else (3, 3)


def lycoris_to_lora(path: str | Path, out_file: Path, *, rank: int | None, energy: float | None):
    """Each LoHa/LoKr layer's ΔW, SVD-truncated (``rank``, or the fewest directions holding ``energy`` of ||ΔW||²),
    written as a kohya-format LoRA: what diffusers' ``load_lora_weights``, ComfyUI and A1111 all read. Returns
    (file, ResizedLayer infos)."""
    from safetensors import safe_open

    from .io import save_safetensors
    from .lora_tools import ResizedLayer, _most_common, choose_rank

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    algo = algo_of(tensors)
    if any(k.endswith(TUCKER_PARTS) for k in tensors):
        raise UserError(f"{path}: its 3x3 convolutions are Tucker-decomposed (LyCORIS' use_tucker), which is not "
                        f"converted here")
    modules = split_modules(tensors)
    layers, infos = {}, []
    for name, parts in modules.items():
        if not any(p in parts for p in PARTS[algo]):
            continue
        delta = delta_weight(parts)
        kernel = kernel_of(name, parts)
        cols = delta.shape[1] // (kernel[0] * kernel[1] if kernel else 1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = choose_rank(s, rank=rank, energy=energy)
        root = torch.sqrt(s[:k])
        up, down = u[:, :k] * root, root[:, None] * vh[:k]
        if kernel:
            up, down = up[:, :, None, None], down.reshape(k, cols, *kernel)
        total = float((s ** 2).sum())
        out_name = name.replace("lycoris_", "lora_unet_", 1) if name.startswith("lycoris_") else name
        layers[out_name] = [down, up, k]
        infos.append(ResizedLayer(out_name, int(min(delta.shape)), k,
                                  float((s[:k] ** 2).sum()) / total if total > 0 else 1.0, s))
    # one alpha for the file (diffusers' kohya loader keeps only the most common one); other ranks absorb the rest
    alpha = _most_common(i.new_rank for i in infos)
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, k) in layers.items():
        fix = (k / alpha) ** 0.5
        out[f"{name}.lora_down.weight"] = (down * fix).float().contiguous()
        out[f"{name}.lora_up.weight"] = (up * fix).float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    kept = {k: v for k, v in header.items() if not k.startswith("ss_network_")}
    kept.update({"ss_network_module": "networks.lora", "ss_network_dim": str(alpha), "ss_network_alpha": str(alpha),
                 "billiard_lora.resized": json.dumps({"from": str(path), "from_lycoris": algo, "rank": rank,
                                                      "energy": energy})})
    save_safetensors(out, out_file, metadata=kept)
    return out_file, infos
