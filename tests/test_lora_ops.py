"""lora.run_adapters_fused (--fused_lora_ops): peft's adapted Linear as one autograd operation -- same math, and
peft's own forward wherever it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

import billiard_lora.lora as lora_mod
from billiard_lora.lora import run_adapters_fused


class Block(torch.nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.to_q = torch.nn.Linear(width, width, bias=False)
        self.to_out = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.to_out(torch.nn.functional.silu(self.to_q(x)))


def adapted(seed: int = 0, alpha: int = 4, dropout: float = 0.0, use_dora: bool = False, width: int = 64):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                                               target_modules=["to_q", "to_out"]), Block(width))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # peft starts B at 0: give the adapter something to add
    return model


def run(model, x, *, autocast: bool, seed: int = 1):
    """Output, input gradient and the trainable parameters' gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks for every model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x.bfloat16() if autocast else x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in model.parameters() if p.requires_grad]


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("alpha, dropout", [(4, 0.0), (8, 0.0), (4, 0.3)])
def test_float32_gives_peft_s_outputs_and_gradients(alpha, dropout):
    model = adapted(alpha=alpha, dropout=dropout)
    fused = copy.deepcopy(model)
    undo = run_adapters_fused([fused])
    x = torch.randn(3, 9, 64)
    for got, want in zip(run(fused, x, autocast=False), run(model, x, autocast=False)):
        assert rel(got, want) < 1e-6
    undo()
    assert not any("forward" in m.__dict__ for m in fused.modules())


@pytest.mark.parametrize("alpha, dropout", [(4, 0.0), (8, 0.3)])
def test_under_bf16_autocast_its_error_against_float64_is_the_size_of_peft_s(alpha, dropout):
    """The frozen weights in bf16, the adapter in float32, as training runs them; each held against the same model
    in float64 (the weights rounded to bf16 first, so only the arithmetic differs)."""
    errors = {"peft": [], "fused": []}
    for seed in range(4):
        model = adapted(seed, alpha=alpha, dropout=dropout, width=256)
        for name, p in model.named_parameters():
            if "lora" not in name:
                p.data = p.data.bfloat16()
        reference = copy.deepcopy(model).double()
        fused = copy.deepcopy(model)
        run_adapters_fused([fused])
        x = torch.randn(2, 128, 256).bfloat16().float()
        want = run(reference, x.double(), autocast=False)
        for name, m in (("peft", model), ("fused", fused)):
            errors[name].append([rel(g, w) for g, w in zip(run(m, x, autocast=True), want)])
    peft = torch.tensor(errors["peft"]).mean(0)
    fused = torch.tensor(errors["fused"]).mean(0)
    assert (peft > 0).all() and (peft < 0.02).all()  # bf16 rounding, nothing larger
    assert (fused <= 1.5 * peft).all(), (fused, peft)


def _count_fused_calls(monkeypatch) -> list:
    calls = []
    real = lora_mod._LoraLinearOp.apply
    monkeypatch.setattr(lora_mod._LoraLinearOp, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def test_where_it_does_not_apply_peft_s_forward_runs(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(2, 5, 64)

    dora = adapted(use_dora=True)
    expected = run(dora, x, autocast=False)
    run_adapters_fused([dora])
    assert all(torch.equal(a, b) for a, b in zip(run(dora, x, autocast=False), expected)) and not calls

    model = adapted()
    run_adapters_fused([model])
    model.to_q.enable_adapters(False)  # peft's switch for "the base model only"
    model.to_out.enable_adapters(False)
    with torch.no_grad():
        base_only = model.to_out.base_layer(torch.nn.functional.silu(model.to_q.base_layer(x)))
        assert torch.equal(model(x), base_only) and not calls
    model.to_q.enable_adapters(True)
    model.to_out.enable_adapters(True)

    with torch.no_grad():  # a merged adapter is in the base weight already
        model.to_q.merge()
        model(x)
    assert len(calls) == 1, "only the unmerged layer took the fused path"
    model.to_q.unmerge()

    mixed = adapted()
    run_adapters_fused([mixed])
    mixed.to_q.base_layer.half()  # fp16 base, fp32 adapter, no autocast: peft's dtype rules decide, not ours
    calls.clear()
    with torch.no_grad():
        mixed.to_q(x.half())
    assert not calls


def test_half_copies_cast_once_per_step_and_follow_every_change_of_the_weights(monkeypatch):
    """half_copies: the adapters cast to bf16 once and kept -- the same outputs and gradients as casting in every
    forward, through weight changes seen by their version counters (here SGD's step) or, where nothing moves them
    (torch's fused AdamW; any change, for a replayed CUDA graph), by refresh()."""
    casts = []
    real_to = torch.Tensor.to

    model = adapted(width=32)
    for name, p in model.named_parameters():
        if "lora" not in name:
            p.data = p.data.bfloat16()
    plain, kept = copy.deepcopy(model), copy.deepcopy(model)
    run_adapters_fused([plain])
    fused = run_adapters_fused([kept], half_copies=True)
    x = torch.randn(2, 6, 32)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (plain, kept)]

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.float32 and out.dtype == torch.bfloat16 and self.dim() == 2 and self.shape[0] in (4, 32):
            casts.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for step in range(3):
        casts.clear()
        got, want = run(kept, x, autocast=True), run(plain, x, autocast=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {step}"
        kept_casts = len(casts) - 4  # plain's forward casts A and B of both layers
        assert kept_casts == (4 if step == 0 else 0), "copies made at the first forward, then updated in place"
        for opt in optimizers:
            opt.step()  # in place: the version counters move, so the next forward casts again (step 2's equality)
        if step == 0:
            fused.refresh()  # ... unless refresh() already did (as the trainer calls it after each step)
    fused.refresh()
    for m in (plain, kept):  # a change no version counter sees (as from a replayed graph): stale until refresh()
        m.to_q.lora_A["default"].weight.detach().numpy()[:] *= 0.5
    stale = run(kept, x, autocast=True)[0]
    fresh = run(plain, x, autocast=True)[0]
    assert not torch.equal(stale, fresh)
    fused.refresh()
    assert torch.equal(run(kept, x, autocast=True)[0], fresh)
    fused()
    assert not any("_billiard_half_copies" in m.__dict__ or "forward" in m.__dict__ for m in kept.modules())


def test_adapter_gradients_come_out_of_the_gemm_in_float32_where_the_device_can(monkeypatch):
    """On CUDA the adapter weights' gradients come from torch.mm(..., out_dtype=float32) (no half-precision result, no
    cast after it). No GPU here: the same code path on the meta device, which has that operation too (shapes and
    dtypes only), and the fallback where a device lacks it."""
    monkeypatch.setattr(lora_mod, "GEMM_TO_FLOAT32_DEVICES", ("meta",))
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(k.get("out_dtype")) or real_mm(*a, **k))
    with torch.device("meta"):
        x = torch.empty(2, 7, 32, dtype=torch.float16, requires_grad=True)
        w, bias = torch.empty(48, 32, dtype=torch.float16), torch.empty(48, dtype=torch.float16)
        a = torch.empty(4, 32, requires_grad=True)
        b = torch.empty(48, 4, requires_grad=True)
    y = lora_mod._LoraLinearOp.apply(x, None, w, bias, a, b, 2.0, torch.float16)
    assert y.shape == (2, 7, 48) and y.dtype == torch.float16
    y.sum().backward()
    assert calls.count(torch.float32) == 2 and a.grad.dtype == b.grad.dtype == torch.float32
    assert a.grad.shape == a.shape and b.grad.shape == b.shape and x.grad.shape == x.shape

    def fails(*args, **kwargs):  # a PyTorch without out_dtype for this device
        if kwargs.get("out_dtype") is not None:
            raise RuntimeError("aten::mm.dtype not available")
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", fails)
    a.grad = b.grad = None
    lora_mod._LoraLinearOp.apply(x, None, w, bias, a, b, 2.0, torch.float16).sum().backward()
    assert a.grad.dtype == torch.float32 and "meta" in lora_mod._gemm_to_float32_failed
    lora_mod._gemm_to_float32_failed.discard("meta")
