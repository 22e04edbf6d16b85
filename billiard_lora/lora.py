"""LoRA adapters through peft, saved and loaded through diffusers' LoRA format and converters.

The whole idea of LoRA is one line in peft's layer: ``result + lora_B(lora_A(dropout(x))) * alpha / rank``. We never
write that layer ourselves: ``model.add_adapter(LoraConfig(...))`` puts it on the attention projections.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .io import save_safetensors

# The layers diffusers' DreamBooth-LoRA SDXL script adapts; the saved keys match that script's for the same settings.
UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# --lora_layers' groups: the UNet's layers a LoRA can adapt, by what they do
LORA_LAYER_GROUPS = {"attn": UNET_TARGET_MODULES,  # self- and cross-attention projections (diffusers' default)
                     "ff": ["ff.net.0.proj", "ff.net.2"],  # the feed-forward (GEGLU in, out)
                     "proj": ["proj_in", "proj_out"],  # each transformer stack's way in and out
                     # the ResNet blocks' 3x3 convolutions, their 1x1 shortcuts and the downsamplers' (most of
                     # kohya's LoCon, its --network_args conv_dim; not the upsamplers': A1111 cannot place SDXL's
                     # first one from a kohya file, its name converter was written for SD 1's layout)
                     "conv": ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"]}
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"  # a training run's checkpoint-N/ folders, each with its own LoRA file
METADATA_KEY = "billiard_lora.training_config"  # the run's settings, stored in the safetensors header


def unet_lora_layers(text: str) -> list[str]:
    """--lora_layers as peft target names: groups (attn, ff, proj, conv) and module names, comma-separated, in
    order."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        for name in LORA_LAYER_GROUPS.get(item, [item] if item else []):
            if name not in out:
                out.append(name)
    return out


# B-LoRA (arXiv 2403.14572; diffusers' advanced script's --use_blora): in SDXL's UNet, the first transformer stack of
# the first up block learns an image's content, the second its style (the original UNet's output_blocks.0.1, .1.1)
BLORA_BLOCKS = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")
BLORA_PARTS = {"content": BLORA_BLOCKS[:1], "style": BLORA_BLOCKS[1:], "blora": BLORA_BLOCKS}


def parse_unet_blocks(text: str) -> list[str]:
    """--lora_unet_blocks: comma-separated block names, whitespace and a leading ``unet.`` or ``diffusion_model.``
    dropped, in order, without repeats."""
    out: list[str] = []
    for item in text.split(","):
        name = "".join(item.split()).removeprefix("unet.").removeprefix("model.").removeprefix("diffusion_model.")
        name = name.rstrip(".")
        if name and name not in out:
            out.append(name)
    return out


def block_of(name: str, blocks: list[str], sgm: dict[str, str]) -> str | None:
    """The first of ``blocks`` (diffusers' or the original UNet's names) that holds UNet module ``name``; None if
    none. ``sgm``: diffusers name -> original name (``lora_tools._sgm_names``) of the UNet's modules."""
    name = name.removeprefix("unet.")
    for block in blocks:
        if name == block or name.startswith(block + ".") or (
                name in sgm and (sgm[name] == block or sgm[name].startswith(block + "."))):
            return block
    return None


def modules_in_blocks(unet: torch.nn.Module, targets: list[str], blocks: list[str],
                      flag: str = "--lora_unet_blocks") -> list[str]:
    """The full names of the UNet's modules named by ``targets`` (peft's rule: the name or its last parts) that lie
    in ``blocks``; UserError naming the blocks that hold none, and the UNet's blocks to choose from."""
    from .lora_tools import _sgm_names

    names = [n for n, _ in unet.named_modules()]
    sgm = _sgm_names(names)
    chosen = [n for n in names if n and any(n == t or n.endswith("." + t) for t in targets)]
    found = {b: [n for n in chosen if block_of(n, [b], sgm)] for b in blocks}
    if empty := [b for b, ns in found.items() if not ns]:
        stacks = [n for n, m in unet.named_modules() if re.fullmatch(r"(down|up)_blocks\.\d+\.attentions\.\d+|"
                                                                     r"mid_block\.attentions\.0", n)]
        raise UserError(f"{flag}: {', '.join(empty)} holds none of the UNet's {', '.join(targets)} "
                        f"layers; its transformer stacks are {', '.join(stacks)} (diffusers' names; the original "
                        f"UNet's, like output_blocks.1.1, work too)")
    return [n for n in chosen if block_of(n, blocks, sgm)]


def unmatched_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The target names that adapted no module of ``model`` (peft stops only when none matches)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in adapted)]


def add_lora(model: torch.nn.Module, *, rank: int, alpha: int | None = None, dropout: float = 0.0,
             use_dora: bool = False, target_modules: list[str] | None = None, init_lora_weights: Any = "gaussian",
             lora_type: str = "lora", lokr_factor: int = -1, conv_rank: int | None = None,
             conv_alpha: int | None = None):
    """Attach a trainable adapter named "default" to a diffusers UNet or a transformers CLIP text encoder: a LoRA,
    or with ``lora_type`` a LyCORIS LoHa/LoKr (``lycoris.py``). ``conv_rank``/``conv_alpha``: the rank and alpha of
    the adapted convolutions (kohya's conv_dim, conv_alpha), through peft's per-module rank_pattern/alpha_pattern."""
    from peft import LoraConfig

    is_text_encoder = type(model).__name__.startswith("CLIPText")
    targets = target_modules or (TEXT_ENCODER_TARGET_MODULES if is_text_encoder else UNET_TARGET_MODULES)
    alpha = alpha if alpha is not None else rank
    patterns = {}
    if conv_rank is not None and not is_text_encoder:
        convs = [re.escape(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and any(n == t or n.endswith("." + t) for t in targets)]
        alpha_value = conv_alpha if conv_alpha is not None else conv_rank
        patterns = {"rank_pattern": {n: conv_rank for n in convs}, "alpha_pattern": {n: alpha_value for n in convs}}
    if lora_type != "lora":
        from .lycoris import lycoris_config, match_lycoris_scale

        model.add_adapter(lycoris_config(lora_type, rank=rank, alpha=alpha, target_modules=targets,
                                         factor=lokr_factor, **patterns))
        match_lycoris_scale(model)
        return model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                        init_lora_weights=init_lora_weights, target_modules=targets, **patterns)
    model.add_adapter(config)
    return model


def set_input_casting(models, enabled: bool) -> None:
    """Whether peft casts each adapted layer's input to the adapter's dtype before the adapter's matmuls.

    Training keeps the adapter in float32 and runs under fp16/bf16 autocast, which casts the matmul inputs back to
    fp16/bf16 anyway: peft's cast is a copy of the activation (and, backwards, of its gradient) that changes no
    value. Turning it off gives the same numbers with fewer operations: 3,074 of the 49,338 of a checkpointed
    micro-step on SDXL's layout, 5 % of its host time (``benchmarks/count_ops.py``; eager steps on a fast GPU
    are bound by issuing operations).
    Only for plain LoRA under autocast: outside autocast an fp16 input would meet fp32 weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = enabled


def run_adapters_fused(models, *, half_copies: bool = False) -> "FusedAdapters":
    """peft's adapted Linear layers of ``models`` compute base layer and LoRA as one autograd operation, with the
    same math and fewer kernels, until the returned object is called (the undo). Training turns it on
    (``--fused_lora_ops``).

    peft's layer runs ``base(x) + lora_B(lora_A(dropout(x))) * scale``; under autocast each adapter weight is cast
    to fp16/bf16 in every forward and recompute, the product is scaled and added in separate passes over the
    layer's output, and in backward the input's two gradients are summed in another. Counted on an H100 (session
    11), the rank-4 LoRA adds 15,000 kernels, about 3 µs each, to a checkpointed micro-step of SDXL's UNet: 45 %
    more time for 0.15 % more FLOPs. Here (``_LoraLinearOp``): the up-projection adds into the base output inside
    its GEMM (``addmm`` with the base output as its input), the LoRA's share of the input's gradient likewise, the
    scale goes on the small rank-r tensors, and on CUDA the adapters' float32 gradients come out of their GEMMs
    directly. With ``half_copies`` the adapter weights are also kept cast to the compute dtype between optimizer
    steps instead of cast in every forward and recompute (``FusedAdapters.refresh``).

    The adapter is still peft's (parameters, config, state dict, saving, loading); a layer runs peft's own forward
    wherever this one does not apply: several active adapters, DoRA and other variants, a merged or disabled
    adapter, extra arguments, a base layer with hooks or trainable weights, or mixed dtypes outside autocast.
    """
    import types

    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for model in models for m in model.modules() if type(m) is LoraLinear]
    for m in layers:
        m.forward = types.MethodType(_fused_forward, m)
        m._billiard_half_copies = {} if half_copies else None
    return FusedAdapters(layers)


class FusedAdapters:
    """What ``run_adapters_fused`` switched on: call it to switch back; ``refresh()`` after the adapters' weights
    changed (the trainer: after each optimizer step).

    The half-precision copies are made at a layer's first forward (on the weights' device, in the autocast dtype)
    and kept at fixed addresses, so a recorded CUDA graph reads the fresh values once ``refresh()`` has run. A
    forward outside a graph also casts again where the weights' version counters moved (a loaded state, most
    in-place changes), but not every update moves them -- torch's fused AdamW does not (measured, torch 2.13), and a
    replayed graph runs no Python at all -- hence ``refresh()`` after every optimizer step.
    """

    def __init__(self, layers):
        self.layers = layers

    def refresh(self) -> None:
        copies = [c for m in self.layers for c in (m.__dict__.get("_billiard_half_copies") or {}).values()]
        if copies:
            halves, weights = [t for c in copies for t in c.copies], [w.detach() for c in copies for w in c.weights]
            with torch.no_grad():
                try:
                    torch._foreach_copy_(halves, weights)  # one multi-tensor kernel where PyTorch has it
                except (RuntimeError, AttributeError):  # older PyTorch: no _foreach_copy_ across dtypes
                    for half, weight in zip(halves, weights):
                        half.copy_(weight)
            for c in copies:
                c.versions = [w._version for w in c.weights]

    def __call__(self) -> None:
        for m in self.layers:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_billiard_half_copies", None)


class _HalfCopy:
    """An adapter's (A, B) cast to the compute dtype, with the weights' versions it was cast at."""

    def __init__(self, weights: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
        self.weights = weights
        self.copies = [w.detach().to(dtype) for w in weights]
        self.versions = [w._version for w in weights]

    def current(self) -> list[torch.Tensor]:
        if [w._version for w in self.weights] != self.versions:  # changed since: cast again, in place
            with torch.no_grad():
                for c, w in zip(self.copies, self.weights):
                    c.copy_(w.detach())
            self.versions = [w._version for w in self.weights]
        return self.copies


def _fused_forward(self, x, *args, **kwargs):
    name, dtype = _fusable(self, x, args, kwargs)
    if name is None:
        from peft.tuners.lora import Linear as LoraLinear

        return LoraLinear.forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    lora_x = None if isinstance(dropout, torch.nn.Identity) or not dropout.training else dropout(x)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    a_half = b_half = None
    copies = self.__dict__.get("_billiard_half_copies")
    if copies is not None and a.dtype != dtype:
        kept = copies.get(name)
        if kept is None or kept.weights[0] is not a or kept.weights[1] is not b or kept.copies[0].dtype != dtype \
                or kept.copies[0].device != a.device:
            kept = copies[name] = _HalfCopy((a, b), dtype)
        a_half, b_half = kept.current()
    return _LoraLinearOp.apply(x, lora_x, base.weight, base.bias, a, b, float(self.scaling[name]), dtype,
                               a_half, b_half)


def _fusable(layer, x, args, kwargs) -> tuple[str | None, torch.dtype | None]:
    """(adapter name, compute dtype) where ``_LoraLinearOp`` computes what peft's forward would; else (None, None)."""
    if args or kwargs or layer.disable_adapters or layer.merged or not x.is_floating_point():
        return None, None
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    variants = getattr(layer, "lora_variant", None) or {}  # DoRA and the like (older peft: use_dora)
    if len(names) != 1 or names[0] in variants or getattr(layer, "use_dora", {}).get(names[0]):
        return None, None
    base = layer.base_layer
    if (type(base).forward is not torch.nn.Linear.forward or "forward" in base.__dict__ or base._forward_hooks
            or base._forward_pre_hooks or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None, None
    autocast = _autocast_dtype(x.device.type)
    if autocast is not None:
        return names[0], autocast
    a, b = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight
    if not x.dtype == base.weight.dtype == a.dtype == b.dtype:  # peft's dtype promotions: left to peft
        return None, None
    return names[0], x.dtype


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, None where it is off (or the device has none, e.g. meta)."""
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)
    except (RuntimeError, TypeError, AttributeError):  # no autocast for this device; PyTorch before 2.4
        if device == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


class _LoraLinearOp(torch.autograd.Function):
    """``y = x W^T + b + scale * (lora_x A^T) B^T`` in ``dtype``, lora_x being ``x`` (None) or its dropout; the
    frozen ``W``, ``b`` get no gradient, ``A`` and ``B`` theirs in their own dtype (float32 in training).
    ``a_half``, ``b_half``: A and B already in ``dtype`` (the same values), used instead of casting them here."""

    @staticmethod
    def forward(ctx, x, lora_x, weight, bias, lora_a, lora_b, scale, dtype, a_half=None, b_half=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        l2 = x2 if lora_x is None else lora_x.reshape(-1, shape[-1]).to(dtype)
        w = weight.to(dtype)
        a = lora_a.to(dtype) if a_half is None else a_half  # (half_copies: cast once per optimizer step)
        b = lora_b.to(dtype) if b_half is None else b_half
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        z = torch.mm(l2, a.t())
        # (a new tensor, not addmm_ into y: selective checkpointing may keep y, which it must find unchanged)
        y = torch.addmm(y, z, b.t(), alpha=scale)
        ctx.save_for_backward(x2, None if lora_x is None else l2, w, a, b, z)
        ctx.scale, ctx.shape, ctx.lora_shape = scale, shape, None if lora_x is None else lora_x.shape
        ctx.lora_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, l2, w, a, b, z = ctx.saved_tensors
        own_input = l2 is None
        l2 = x2 if own_input else l2
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gz = torch.mm(g, b)  # the gradient at the rank-r bottleneck
        if ctx.scale != 1.0:
            gz.mul_(ctx.scale)
        gx = gl = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, w)
            if own_input:
                gx.addmm_(gz, a)
            gx = gx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            gl = torch.mm(gz, a).view(ctx.lora_shape)
        if ctx.needs_input_grad[4]:
            ga = _weight_grad(gz.t(), l2, ctx.lora_dtypes[0])
        if ctx.needs_input_grad[5]:
            gb = _weight_grad(g.t(), z, ctx.lora_dtypes[1])
            if ctx.scale != 1.0:
                gb.mul_(ctx.scale)
        return gx, gl, None, None, ga, gb, None, None, None, None


GEMM_TO_FLOAT32_DEVICES = ("cuda",)  # where torch.mm(..., out_dtype=float32) takes fp16/bf16 (PyTorch 2.8+)
_gemm_to_float32_failed: set[str] = set()


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # PyTorch 2.3+
    return bool(is_compiling and is_compiling())


def _weight_grad(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m1 @ m2`` as an adapter weight's gradient in ``dtype`` (float32 in training). On CUDA it comes straight out
    of the GEMM's float32 accumulator (``out_dtype``): no half-precision rounding and no cast kernel after it --
    1,120 kernels fewer per micro-step for SDXL's UNet LoRA. Elsewhere, while compiling (inductor fuses the cast
    itself), or where that fails once: the product, then a cast, as autograd would do it."""
    device = m1.device.type
    if (dtype == torch.float32 and m1.dtype in (torch.float16, torch.bfloat16) and device in GEMM_TO_FLOAT32_DEVICES
            and device not in _gemm_to_float32_failed and not _compiling()):
        try:
            return torch.mm(m1, m2, out_dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):  # an older PyTorch: cast after the product
            _gemm_to_float32_failed.add(device)
    return torch.mm(m1, m2).to(dtype)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``model`` (everything else stays frozen)."""
    return [p for n, p in model.named_parameters() if p.requires_grad]


class MaxNorm:
    """kohya's --scale_weight_norms (max-norm regularization, Srivastava et al. 2014, "Dropout", section 5.1):
    after each optimizer step, every adapted layer whose weight change ΔW -- a LoRA's scale·B·A, a LoHa's or LoKr's
    product -- has a Frobenius norm above ``limit`` is scaled back to it. ``step()`` returns, as kohya logs them,
    the number of layers scaled ("keys scaled") and the mean and largest norm after scaling.

    ΔW is multilinear in a layer's adapter tensors, each of which appears once (LoRA: A, B; LoHa: its four or six;
    LoKr: two to five), so multiplying each of the d tensors by ratio^(1/d) multiplies ΔW by ratio (kohya scales a
    LoRA's up and down by sqrt(ratio)). A LoRA's norm comes from the rank x rank products BᵀB and AAᵀ
    (||BA||² = Σ (BᵀB) ⊙ (AAᵀ)), batched over the layers of one shape, never from the full out x in matrix;
    LoHa/LoKr layers build their ΔW (peft's ``get_delta_weight``). One read of the GPU per step, where the loss is
    read anyway. On SDXL's rank-4 attention LoRA (CPU, 2 threads) that is 7.4 ms per step against 974 ms for kohya's
    per-layer full products, and closer to the float64 norm (1.5e-7 against 6.6e-5; benchmarks/bench_max_norm.py)."""

    TOLERANCE = 1e-5  # a norm within float32's rounding of the limit counts as at it

    def __init__(self, models, limit: float):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.limit = float(limit)
        self.layers: list[tuple[torch.nn.Module, list[torch.nn.Parameter], bool]] = []  # (layer, tensors, is LoRA)
        for model in models:
            for module in _unwrap(model).modules():
                if not isinstance(module, BaseTunerLayer) or "default" not in getattr(module, "active_adapters", ()):
                    continue
                tensors = []
                for name in type(module).adapter_layer_names:
                    container = getattr(module, name, None)  # a ModuleDict or ParameterDict, by adapter name
                    if container is None or "default" not in container:
                        continue
                    held = container["default"]
                    if name == "lora_magnitude_vector":
                        raise UserError("--scale_weight_norms does not apply to DoRA (--use_dora): drop one of the two")
                    found = list(held.parameters()) if isinstance(held, torch.nn.Module) else [held]
                    tensors += [t for t in found if t.requires_grad]
                if tensors:
                    self.layers.append((module, tensors, hasattr(module, "lora_A")))

        # LoRA layers of the same shapes, in stacks of at most STACK_BYTES: one batched product per stack instead of
        # a few kernels per layer (SDXL's rank-4 attention LoRA: 560 layers in 4 stacks)
        groups: dict[tuple, list[int]] = {}
        for i, (layer, _, is_lora) in enumerate(self.layers):
            if is_lora:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                groups.setdefault((a.shape, b.shape, a.device, a.dtype), []).append(i)
        self.stacks: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        for (a_shape, b_shape, device, dtype), members in groups.items():
            per_layer = (a_shape.numel() + b_shape.numel()) * dtype.itemsize
            size = max(1, self.STACK_BYTES // per_layer)
            for start in range(0, len(members), size):
                part = members[start:start + size]
                layers = [self.layers[i][0] for i in part]
                self.stacks.append(([m.lora_A["default"].weight for m in layers],
                                    [m.lora_B["default"].weight for m in layers],
                                    torch.tensor(part, device=device),
                                    torch.tensor([abs(float(m.scaling["default"])) for m in layers], device=device)))
        self.others = [i for i, (_, _, is_lora) in enumerate(self.layers) if not is_lora]

    STACK_BYTES = 64 * 2**20

    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        """Each layer's ||ΔW||_F, stacked (on the adapters' device)."""
        device = self.layers[0][1][0].device
        out = torch.empty(len(self.layers), device=device)
        for a_list, b_list, index, scale in self.stacks:
            a = torch.stack(a_list).float().flatten(2)  # (n, r, in) or (n, r, in·k·k)
            b = torch.stack(b_list).float().flatten(2)  # (n, out, r)
            squared = (torch.bmm(b.transpose(1, 2), b) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
            out.index_copy_(0, index.to(device), squared.clamp(min=0).sqrt() * scale.to(device))  # (to ~1e-7)
        for i in self.others:
            out[i] = self.layers[i][0].get_delta_weight("default").float().norm()
        return out

    @torch.no_grad()
    def step(self) -> tuple[int, float, float]:
        """Scale the layers above the limit back to it; (layers scaled, mean norm, largest norm), after scaling."""
        if not self.layers:
            return 0, 0.0, 0.0
        norms = self.norms()
        # (a layer scaled back to the limit is not scaled again by rounding next step)
        ratio = torch.where(norms > self.limit * (1 + self.TOLERANCE), self.limit / norms, 1.0)
        after = norms * ratio
        *ratios, mean, largest = torch.cat([ratio, after.mean()[None], after.max()[None]]).tolist()
        scaled = 0
        for (layer, tensors, _), r in zip(self.layers, ratios):
            if r < 1.0:
                scaled += 1
                for t in tensors:
                    t.mul_(r ** (1.0 / len(tensors)))
        return scaled, mean, largest


def peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _unwrap(model):
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_lora(output_dir: str | Path, *, unet, text_encoder_one=None, text_encoder_two=None,
              metadata: dict[str, Any] | None = None, kohya: bool = False,
              weight_name: str = LORA_WEIGHT_NAME, pissa_initial: dict[str, dict] | None = None,
              precision: str | None = None) -> Path:
    """Write the LoRA in diffusers format (what ``pipe.load_lora_weights(dir)`` reads), optionally kohya too;
    ``precision`` (--save_precision: fp32, fp16, bf16): the weights' precision in the files, else the adapters' own.

    Keys and the peft adapter metadata come from diffusers' own ``save_lora_weights``; we add the training config
    to the safetensors header and write each file atomically. ``pissa_initial`` (component -> adapter state right
    after a PiSSA/OLoRA init, which rewrote the base weights) saves the *difference* training made instead, a
    rank-2r LoRA for the unmodified base model (see ``lora_tools.save_pissa_lora``).
    """
    from .lycoris import adapter_type, save_lycoris

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = {METADATA_KEY: json.dumps(metadata, default=str)} if metadata else {}
    if pissa_initial is not None:
        from .lora_tools import save_pissa_lora

        save_pissa_lora(output_dir, pissa_initial, metadata=metadata, weight_name=weight_name, unet=unet,
                        text_encoder=text_encoder_one, text_encoder_2=text_encoder_two, precision=precision)
    elif adapter_type(unet) != "lora":  # LoHa/LoKr: LyCORIS' own format (diffusers' has none for them)

        factor = int((metadata or {}).get("lokr_factor", -1))
        save_lycoris(output_dir / weight_name, {"unet": unet, "text_encoder": text_encoder_one,
                                                "text_encoder_2": text_encoder_two}, metadata=extra, factor=factor,
                     precision=precision)
        if kohya:  # that file already is kohya's format; a LoRA's kohya file an earlier run left here is not this
            (output_dir / KOHYA_WEIGHT_NAME).unlink(missing_ok=True)
        return output_dir / weight_name
    else:
        _save_diffusers(output_dir, weight_name, unet, text_encoder_one, text_encoder_two, extra, precision)
    if kohya:
        # per component, with the webui key names (ComfyUI, A1111) and each layer's true alpha
        from .lora_tools import load_lora_file, to_kohya

        kohya_sd, header = to_kohya(load_lora_file(output_dir / weight_name))
        save_safetensors(kohya_sd, output_dir / KOHYA_WEIGHT_NAME, metadata={**header, **extra}, precision=precision)
    return output_dir / weight_name


def _save_diffusers(output_dir: Path, weight_name: str, unet, text_encoder_one, text_encoder_two,
                    extra: dict[str, str], precision: str | None = None) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    layers: dict[str, Any] = {}
    adapter_meta: dict[str, Any] = {}
    for key, model in (("unet", unet), ("text_encoder", text_encoder_one), ("text_encoder_2", text_encoder_two)):
        if model is None:
            continue
        model = _unwrap(model)
        state = diffusers_names(peft_state_dict(model))
        if key != "unet":
            state = {_clip_canonical(k): v for k, v in state.items()}
        layers[f"{key}_lora_layers"] = state
        adapter_meta[f"{key}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".lora-") as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, **layers, **adapter_meta, weight_name=weight_name)
        with safe_open(Path(tmp) / weight_name, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_safetensors(tensors, output_dir / weight_name, metadata={**header, **extra}, precision=precision)


def diffusers_names(state: dict[str, Any]) -> dict[str, Any]:
    """A component's peft state dict under the names diffusers' SDXL script saves (``lora.down``/``lora.up``, what
    older loaders read); where some layer has no such name (--lora_layers ff, proj), the whole component keeps
    peft's names, which diffusers loads too: a file mixing both styles loses the older-named layers on loading."""
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(dict(state))
    return dict(state) if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted


def _clip_canonical(key: str) -> str:
    """CLIP text-encoder keys as every loader spells them (``text_model.encoder.layers.N...``): transformers 5's
    CLIPTextModel dropped the ``.text_model`` wrapper, transformers 4 and the webuis expect it."""
    return "text_model." + key if key.startswith(("encoder.", "embeddings.", "final_layer_norm")) else key


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The training config stored in a LoRA file's header ({} if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


def save_adapter_state(path: str | Path, models: dict[str, torch.nn.Module],
                       extra: dict[str, torch.Tensor] | None = None) -> None:
    """Exact training state of the adapters (peft keys, fp32, DoRA magnitudes included) for checkpoints, and of
    ``extra`` trained tensors (new token embeddings) under ``extra.NAME``."""
    tensors = {f"{name}.{k}": v.detach().cpu() for name, m in models.items() if m is not None
               for k, v in peft_state_dict(_unwrap(m)).items()}
    tensors.update({f"extra.{k}": v.detach().cpu() for k, v in (extra or {}).items()})
    save_safetensors(tensors, path, metadata={"format": "pt"})


def load_adapter_state(path: str | Path, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Load what ``save_adapter_state`` wrote back into the same adapters, checking that every key fits; returns
    the ``extra`` tensors it holds."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
    for name, m in models.items():
        if m is None:
            continue
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model = _unwrap(m)
        expected = peft_state_dict(model)
        if set(sub) != set(expected) or any(sub[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{path}: the {name} LoRA in this checkpoint has a different shape "
                             f"(rank, target modules or model) than the run being resumed")
        set_peft_model_state_dict(model, sub, adapter_name="default")
    return extra


if __name__ == "__main__":  # python -m billiard_lora.lora inspect|convert|resize|merge ...
    from .lora_tools import main

    raise SystemExit(main())
