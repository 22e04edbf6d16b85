"""The optimizer over the LoRA parameters: torch's fused AdamW, bitsandbytes' 8-bit AdamW, Prodigy; schedule-free
AdamW, transformers' Adafactor and bitsandbytes' Lion as their packages give them.

bitsandbytes steps its 8-bit AdamW one tensor at a time and waits for the GPU after each one
(``bitsandbytes.utils.sync_gpu`` calls ``torch.cuda.synchronize()`` per parameter). SDXL's rank-4 UNet LoRA is
1,120 small tensors, so each optimizer step was 1,120 launches, each followed by a full stop of the GPU, while the
update itself is 5.8 M numbers. ``FlatAdamW8bit`` hands bitsandbytes the same numbers as a few flat buffers
instead: one update per buffer, the same algorithm, and on this project's CPU the same bits (tested). Prodigy reads
two numbers back from the GPU per tensor per step (``.item()``); ``FlatProdigy`` runs it over flat buffers too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from typing import Sequence

import torch

from .config import TrainConfig
from .errors import UserError
from .lora import lora_parameters

STATE_BLOCK = 256  # bitsandbytes' blockwise 8-bit states keep one scale per 256 numbers (CPU and CUDA kernels)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states


def make_optimizer(config: TrainConfig, unet, text_encoders: Sequence, num_processes: int,
                   embeddings: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) or Prodigy over the LoRA parameters, text encoders at their own rate,
    new token embeddings (``embeddings``, --train_text_encoder_ti) at theirs without weight decay."""
    lr, te_lr, ti_lr = config.learning_rate, config.text_encoder_lr, config.ti_learning_rate
    if config.scale_lr:
        factor = config.gradient_accumulation_steps * config.train_batch_size * num_processes
        lr, te_lr, ti_lr = lr * factor, te_lr * factor, ti_lr * factor
    name = config.optimizer.lower()
    if name == "prodigy":
        te_lr = ti_lr = lr  # Prodigy adapts one learning rate; diffusers' script uses the same for all
    groups = loraplus_groups([unet], lr, config.adam_weight_decay, config.loraplus_lr_ratio)
    if any(lora_parameters(te) for te in text_encoders):
        groups += loraplus_groups(text_encoders, te_lr, config.adam_weight_decay_text_encoder,
                                  config.loraplus_lr_ratio)
    if embeddings:
        groups.append({"params": list(embeddings), "lr": ti_lr, "weight_decay": 0.0})
    betas = (config.adam_beta1, config.adam_beta2)
    if name == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise UserError("--optimizer=Prodigy needs the prodigyopt package: pip install prodigyopt")
        if lr <= 0.1:
            warnings.warn(f"Prodigy usually wants --learning_rate around 1.0; got {lr}", stacklevel=2)
        return FlatProdigy(groups, lr=lr, betas=betas, beta3=config.prodigy_beta3, eps=config.adam_epsilon,
                           decouple=config.prodigy_decouple, use_bias_correction=config.prodigy_use_bias_correction,
                           safeguard_warmup=config.prodigy_safeguard_warmup)
    if config.schedule_free:
        if importlib.util.find_spec("schedulefree") is None:
            raise UserError(f"--optimizer={config.optimizer} needs the schedulefree package: pip install schedulefree")
        from schedulefree import AdamWScheduleFree

        # (its foreach form: one kernel per operation over all the LoRA's tensors, and no host synchronisation)
        # warm-up as the schedules it replaces: --lr_scheduler constant has none, constant_with_warmup its steps
        warmup = config.lr_warmup_steps if config.lr_scheduler == "constant_with_warmup" else 0
        return AdamWScheduleFree(groups, lr=lr, betas=betas, eps=config.adam_epsilon, warmup_steps=warmup)
    if name == "adafactor":  # kohya's SDXL recipe: the fixed learning rate, no relative step or parameter scale
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in ("lion", "lion8bit"):
        # (Lion's own betas, 0.9 and 0.99: Adam's --adam_beta2 0.999 would make its momentum far slower)
        return FlatLion(groups, lr=lr, betas=(config.adam_beta1, 0.99), bits=8 if name == "lion8bit" else 32)
    if config.use_8bit_adam:
        return FlatAdamW8bit(groups, lr=lr, betas=betas, eps=config.adam_epsilon)
    # torch's fused AdamW: one kernel for all ~1,100 LoRA tensors instead of a few per tensor (SDXL's rank-4 LoRA
    # on this project's CPU: 9 ms per step against 37-39 for the default foreach form); the same algorithm
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=config.adam_epsilon, fused=True)
    except (RuntimeError, TypeError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=config.adam_epsilon)


def loraplus_groups(models: Sequence[torch.nn.Module], lr: float, weight_decay: float,
                    ratio: float | None) -> list[dict]:
    """The models' LoRA parameters as one optimizer group, or with --loraplus_lr_ratio two: the A matrices at
    ``lr``, then the B matrices and any other 1-D parameter (DoRA's magnitudes) at ``lr * ratio``, the split of
    peft's ``create_loraplus_optimizer``."""
    named = [(n, p) for m in models for n, p in m.named_parameters() if p.requires_grad]
    if ratio is None:
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay}]
    fast = [p for n, p in named if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named if not ("lora_B" in n or p.ndim == 1)]
    return [{"params": slow, "lr": lr, "weight_decay": weight_decay},
            {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]


class _Pack:
    """Parameters of one group, device and dtype that share a flat buffer: their values and gradients in one place."""

    def __init__(self, group_index: int, params: list[torch.nn.Parameter], small: bool, block: int):
        self.group_index, self.params, self.small = group_index, params, small
        sizes = [-(-p.numel() // block) * block for p in params]  # each tensor padded to whole blocks
        self.flat = torch.nn.Parameter(torch.zeros(sum(sizes), device=params[0].device, dtype=params[0].dtype))
        self.grad_buffer = self.flat.grad = torch.zeros_like(self.flat)
        self.values, self.grads, start = [], [], 0
        for p, size in zip(params, sizes):
            self.values.append(self.flat.data[start:start + p.numel()].view_as(p))
            self.grads.append(self.grad_buffer[start:start + p.numel()].view_as(p))
            start += size


class _FlatOptimizer(torch.optim.Optimizer):
    """An optimizer run over the parameters copied into a few flat buffers: the same update, few launches.

    The parameters and groups a caller sees (and that GradScaler, gradient clipping, ``zero_grad`` and learning-rate
    schedules work on) are the model's own. ``step()`` copies values and gradients into one buffer per group (and
    device and dtype), runs the wrapped optimizer over the buffers, and copies the values back: three
    ``_foreach_copy_`` calls around a handful of updates, instead of a few launches -- and in the optimizers
    wrapped here, GPU synchronisations -- per tensor.
    A parameter without a gradient keeps its value, as both wrapped optimizers leave it. (One that never gets a
    gradient, like the LoRA on the last layer of SDXL's first text encoder, whose output SDXL does not use, is
    therefore as per tensor. One that misses only some steps would see its moments decay in those steps, where
    they would freeze.) A state the wrapped optimizer saved per tensor (checkpoints of older versions) is laid out
    into the buffers on loading; another optimizer's is refused in one line.
    """

    MARKER = "flat"  # the key of a state dict this class wrote
    SYNCED = ("lr", "weight_decay")  # what a schedule (or the caller) may change on the groups between steps

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._packs: list[_Pack] | None = None  # built at the first use, once the model is on its device
        self._inner = None

    # what a subclass says
    def _small(self, p: torch.nn.Parameter) -> bool:  # in a buffer of its own (another kind of state)
        return False

    def _block(self, small: bool) -> int:
        return 1

    def _make_inner(self, groups: list[dict]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _from_per_tensor(self, state_dict: dict) -> dict:
        raise NotImplementedError

    def _unfit(self) -> UserError:
        return UserError(f"the checkpoint's optimizer state is not {self.NAME}'s over this LoRA (was it saved with "
                         f"other --use_8bit_adam/--optimizer/--train_text_encoder settings?): resume with the "
                         f"settings it was saved with, or start a new --output_dir")

    def _build(self) -> None:
        if self._packs is not None:
            return
        self._packs = []
        for gi, group in enumerate(self.param_groups):
            keys: dict[tuple, list] = {}
            for p in group["params"]:
                keys.setdefault((p.device, p.dtype, self._small(p)), []).append(p)
            self._packs += [_Pack(gi, ps, small, self._block(small)) for (_, _, small), ps in keys.items()]
        self._inner = self._make_inner([
            {**{k: v for k, v in self.param_groups[k_.group_index].items() if k != "params"}, "params": [k_.flat],
             "small": k_.small} for k_ in self._packs])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._build()
        for pack, inner in zip(self._packs, self._inner.param_groups):
            group = self.param_groups[pack.group_index]
            inner.update({k: group[k] for k in self.SYNCED})  # a schedule changed the lr: the buffer steps with it
            if all(p.grad is None for p in pack.params):
                pack.flat.grad = None  # skipped, as a parameter without a gradient is
                continue
            pack.flat.grad = pack.grad_buffer
            torch._foreach_copy_(pack.values, [p.detach() for p in pack.params])
            torch._foreach_copy_(pack.grads, [p.grad if p.grad is not None else torch.zeros_like(p)
                                              for p in pack.params])
        self._inner.step()
        for pack in self._packs:
            if pack.flat.grad is not None:
                stepped = [(p, v) for p, v in zip(pack.params, pack.values) if p.grad is not None]
                torch._foreach_copy_([p.detach() for p, _ in stepped], [v for _, v in stepped])
        return loss

    def state_dict(self) -> dict:
        self._build()
        return {self.MARKER: self._inner.state_dict(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._build()
        if self.MARKER not in state_dict:  # the wrapped optimizer's own, per tensor (older versions wrote these)
            groups, states = state_dict.get("param_groups"), state_dict.get("state")
            if groups is None or states is None or \
                    [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
                raise self._unfit()
            state_dict = self._from_per_tensor(state_dict)
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise self._unfit()
        for group, hyper in zip(self.param_groups, saved):
            group.update(hyper)
        self._inner.load_state_dict(state_dict[self.MARKER])

    def _per_tensor_states(self, state_dict: dict, pack: _Pack) -> list[dict]:
        """The saved per-tensor states of a pack's parameters, in its order ({} for one that never stepped)."""
        position = {id(q): i for i, q in enumerate(self.param_groups[pack.group_index]["params"])}
        saved = state_dict["param_groups"][pack.group_index]["params"]
        return [dict(state_dict["state"].get(saved[position[id(p)]], {})) for p in pack.params]

    def _converted(self, state_dict: dict, states: dict[int, dict]) -> dict:
        inner = self._inner.state_dict()
        inner["state"] = states
        groups = [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]]
        for index, pack in enumerate(self._packs):  # the wrapped optimizer's group values (Prodigy's d...) too
            inner["param_groups"][index].update({k: v for k, v in groups[pack.group_index].items()
                                                 if k in inner["param_groups"][index]})
        return {self.MARKER: inner, "param_groups": groups}


class FlatAdamW8bit(_FlatOptimizer):
    """bitsandbytes' ``AdamW8bit`` over flat buffers: the same update bit for bit (tested), 4 GPU synchronisations
    per step instead of one per tensor. Tensors under 4,096 numbers share a buffer of their own and keep 32-bit
    states, as bitsandbytes gives them; the others are padded to whole 256-number blocks, so that each block's
    8-bit scale covers the same numbers as it would per tensor."""

    MARKER, NAME = "flat_adamw8bit", "bitsandbytes' 8-bit AdamW"
    SYNCED = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size

    def _small(self, p) -> bool:
        return p.numel() < self.min_8bit_size

    def _block(self, small: bool) -> int:
        return 1 if small else STATE_BLOCK

    def _make_inner(self, groups):
        return _bnb_adamw8bit()(groups, min_8bit_size=self.min_8bit_size)

    def _from_per_tensor(self, state_dict: dict) -> dict:
        """bitsandbytes' per-tensor AdamW8bit state laid out in the buffers, exactly: each 8-bit tensor's codes and
        block scales go where its padded blocks are (padding gets the code of zero), 32-bit states are concatenated,
        and the step count is the tensors' common one."""
        from bitsandbytes.optim.optimizer import Optimizer8bit

        states = {}
        for index, pack in enumerate(self._packs):
            per = self._per_tensor_states(state_dict, pack)
            for s in per:
                s.update(s.pop(Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY, {}))
            steps = {int(s["step"]) for s in per if s}
            if not steps:
                continue  # none of them stepped yet
            want = torch.float32 if pack.small else torch.uint8
            if len(steps) > 1 or any(s and (s.get("state1") is None or s["state1"].dtype != want) for s in per):
                raise self._unfit()
            ref = next(s for s in per if s)
            state = {"step": steps.pop()}
            if pack.small:
                for key in ("state1", "state2"):
                    state[key] = torch.cat([s[key].reshape(-1).cpu() if s else torch.zeros(p.numel())
                                            for s, p in zip(per, pack.params)])
            else:
                for n in "12":
                    qmap = ref[f"qmap{n}"]
                    zero = int((qmap == 0).nonzero()[0])  # the code that decodes to 0 (bitsandbytes' maps hold one)
                    codes, scales = [], []
                    for s, p in zip(per, pack.params):
                        blocks = -(-p.numel() // STATE_BLOCK)
                        code = torch.full((blocks * STATE_BLOCK,), zero, dtype=torch.uint8)
                        if s:
                            code[:p.numel()] = s[f"state{n}"].reshape(-1).cpu()
                        codes.append(code)
                        scales.append(s[f"absmax{n}"].reshape(-1).cpu() if s else torch.zeros(blocks))
                    state.update({f"state{n}": torch.cat(codes), f"absmax{n}": torch.cat(scales), f"qmap{n}": qmap})
            states[index] = state
        return self._converted(state_dict, states)


class FlatProdigy(_FlatOptimizer):
    """Prodigy over flat buffers. Per tensor, Prodigy reads two numbers back from the GPU for every tensor at every
    step (``.item()`` of a dot product and of a sum: 2,240 synchronisations per step for SDXL's UNet LoRA); over
    the buffers, two per buffer. The same algorithm: its sums over all parameters are taken in another order, so
    the numbers agree to rounding, not bit for bit."""

    MARKER, NAME = "flat_prodigy", "Prodigy"
    SYNCED = ("lr",)

    def __init__(self, params, **kwargs):
        import prodigyopt

        self._prodigy = prodigyopt.Prodigy
        with contextlib.redirect_stdout(io.StringIO()):  # (it prints a line about weight decay; the real one will)
            probe = prodigyopt.Prodigy([torch.nn.Parameter(torch.zeros(1))], **kwargs)  # its defaults and checks
        super().__init__(params, dict(probe.defaults))

    def _make_inner(self, groups):
        return self._prodigy(groups, **{k: v for k, v in self.defaults.items() if k not in ("d", "d_max", "d_numerator",
                                                                                           "k")})

    def _from_per_tensor(self, state_dict: dict) -> dict:
        """Prodigy's per-tensor state concatenated into the buffers (its initial values ``p0`` too; a tensor that
        never stepped gets zero moments and its current values as ``p0``)."""
        states = {}
        for index, pack in enumerate(self._packs):
            per = self._per_tensor_states(state_dict, pack)
            steps = {int(s["step"]) for s in per if s}
            if not steps:
                continue
            if len(steps) > 1 or any(s and "exp_avg_sq" not in s for s in per):
                raise self._unfit()
            state = {"step": steps.pop()}
            for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
                if key == "exp_avg" and not any(key in s for s in per):
                    continue  # beta1 = 0: Prodigy keeps none
                parts = []
                for s, p in zip(per, pack.params):
                    t = s.get(key)
                    if t is None:
                        t = p.detach().reshape(-1) if key == "p0" else torch.zeros(p.numel())
                    elif t.numel() == 1 and p.numel() > 1:  # Prodigy's p0 of an all-zero tensor: a scalar zero
                        t = torch.zeros(p.numel())
                    parts.append(t.reshape(-1).cpu().float())
                state[key] = torch.cat(parts)
            states[index] = state
        return self._converted(state_dict, states)


def _bnb_adamw8bit():
    """bitsandbytes' AdamW8bit, whose groups marked ``small`` keep 32-bit states (tensors under 4,096 numbers)."""
    import bitsandbytes as bnb

    return _small_groups_32bit(bnb.optim.AdamW8bit)


def _small_groups_32bit(cls):
    """A bitsandbytes 8-bit optimizer class whose groups marked ``small`` keep 32-bit states, as bitsandbytes gives
    each tensor under ``min_8bit_size`` numbers (a flat buffer of many small tensors is larger than that)."""

    class SmallGroups32bit(cls):
        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            if group.get("small"):
                config["optim_bits"] = 32
            return config

    return SmallGroups32bit


class ScheduleFreeAverage:
    """Schedule-free AdamW's averaged weights (its ``eval()`` mode, what the paper evaluates) for a while: saving and
    validation images; then training goes on from the very weights it left, bit for bit. (The optimizer's own
    ``train()`` would lerp back and round differently, so a run that validated would drift from one that did not.)
    The interface of ``AdapterEMA.applied``."""

    def __init__(self, optimizer, params: Sequence[torch.nn.Parameter], *, on_change=None):
        self.optimizer, self.params, self.on_change = optimizer, list(params), on_change

    @contextlib.contextmanager
    def applied(self):
        kept = [p.detach().clone() for p in self.params]
        self.optimizer.eval()
        self._changed()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)
            for group in self.optimizer.param_groups:
                group["train_mode"] = True
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class AdapterEMA:
    """``--use_ema``: an exponential moving average of the LoRA weights, kept beside them (diffusers' ``EMAModel``).

    After each optimizer step the average moves toward the weights by ``1 - decay``; diffusers' EMAModel ramps the
    decay as ``(1 + n) / (10 + n)`` after n steps, capped at ``decay``, so a run of a few thousand steps averages
    about its last ninth. The average stays on the weights' device in float32 (SDXL's rank-4 UNet LoRA: 23 MB).
    ``applied()`` puts it in the adapters for a while (saving, validation images), then the weights training goes
    on from. Registered with accelerate, it is part of each checkpoint: a resumed run's average equals an
    uninterrupted one's.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, *, on_change=None):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.ema = EMAModel(self.params, decay=decay, foreach=True)
        self.on_change = on_change  # called after the adapters' weights were swapped (fused ops' half copies)

    def step(self) -> None:
        self.ema.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        self._changed()
        try:
            yield
        finally:
            self.ema.restore(self.params)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def steps(self) -> int:
        return self.ema.optimization_step

    # accelerate's save_state / load_state (a checkpoint's custom_checkpoint_0.pkl)
    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow_params")
        if shadow is None or len(shadow) != len(self.params) or any(
                s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise UserError("the checkpoint's --use_ema average does not fit this run's LoRA (another rank, "
                            "targets or --train_text_encoder): resume with the same settings")
        self.ema.load_state_dict(state)
        self.ema.to(device=self.device)  # accelerate loads it onto the CPU


class FlatLion(_FlatOptimizer):
    """bitsandbytes' ``Lion`` (``bits=32``) or ``Lion8bit`` over flat buffers: the same update bit for bit (tested),
    without the per-tensor GPU synchronisation of bitsandbytes' step (see the module's docstring). As for
    ``FlatAdamW8bit``, 8-bit states go in whole 256-number blocks per tensor and tensors under 4,096 numbers keep
    32-bit states in a buffer of their own."""

    MARKER = "flat_lion"
    SYNCED = ("lr", "betas", "weight_decay")

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, bits: int = 8,
                 min_8bit_size: int | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.bits, self.NAME = bits, f"bitsandbytes' {'8-bit ' if bits == 8 else ''}Lion"
        self.min_8bit_size = MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size

    def _small(self, p) -> bool:
        return self.bits == 8 and p.numel() < self.min_8bit_size

    def _block(self, small: bool) -> int:
        return STATE_BLOCK if self.bits == 8 and not small else 1

    def _make_inner(self, groups):
        import bitsandbytes as bnb

        with contextlib.redirect_stdout(io.StringIO()):  # (bitsandbytes prints its setup on first use)
            if self.bits == 8:
                return _small_groups_32bit(bnb.optim.Lion8bit)(groups, min_8bit_size=self.min_8bit_size)
            return bnb.optim.Lion(groups)

    def _from_per_tensor(self, state_dict: dict) -> dict:
        raise self._unfit()  # (no billiard-lora version saved Lion per tensor)
