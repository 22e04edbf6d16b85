"""The optimizers over the LoRA parameters: 8-bit AdamW over flat buffers steps exactly as bitsandbytes per tensor."""

from __future__ import annotations

import logging

import pytest
import torch

import billiard_lora.optim as optim
from billiard_lora.optim import FlatAdamW8bit

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# LoRA-like shapes: some over bitsandbytes' 4,096-number threshold for 8-bit states, some under, none a whole number
# of 256-number blocks except the first
SHAPES = [(4, 1024), (640, 4), (4, 2048), (1280, 4), (3, 5), (4, 300), (2000, 4), (10, 700)]


def params(seed: int = 1) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in SHAPES]


def groups(ps: list, te_lr: float = 3e-3) -> list[dict]:
    return [{"params": ps[:5], "lr": 1e-2, "weight_decay": 1e-2}, {"params": ps[5:], "lr": te_lr, "weight_decay": 0.1}]


def step_both(reference, flat, a, b, steps: int, g: torch.Generator, start: int = 0, lr_at=None,
              second_group_lr: float = 0.3) -> None:
    for step in range(start, start + steps):
        for p, q in zip(a, b):  # gradients across magnitudes; parameter 3 never has one (an unused layer's LoRA)
            p.grad = None if p is a[3] else torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 2)
            q.grad = None if p.grad is None else p.grad.clone()
        if lr_at:  # a schedule changes the groups' learning rates between steps
            for opt in (reference, flat):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step) * (1 if group is opt.param_groups[0] else second_group_lr)
        reference.step()
        flat.step()


def assert_same(a, b) -> None:
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach()), (p - q).abs().max()


def test_flat_8bit_adamw_steps_exactly_as_bitsandbytes_per_tensor():
    a, b = params(), params()
    reference = bnb.optim.AdamW8bit(groups(a), lr=1e-2)
    flat = FlatAdamW8bit(groups(b), lr=1e-2)
    step_both(reference, flat, a, b, 12, torch.Generator().manual_seed(2), lr_at=lambda s: 1e-2 / (1 + s))
    assert_same(a, b)
    # bitsandbytes' own choice of state per tensor: 8-bit at 4,096 numbers and over, 32-bit under
    kinds = sorted((str(s["state1"].dtype), s["state1"].numel()) for s in flat._inner.state.values())
    assert kinds == [("torch.float32", 1200), ("torch.float32", 2575), ("torch.uint8", 15360), ("torch.uint8", 17408)]
    assert torch.equal(b[3], params()[3])  # never given a gradient: never moved, not even by weight decay


@pytest.mark.parametrize("bits", [8, 32])
def test_flat_lion_steps_and_resumes_exactly_as_bitsandbytes_per_tensor(bits):
    """--optimizer Lion8bit / Lion: bitsandbytes' Lion over flat buffers, the same bits as per tensor (8-bit states
    from 4,096 numbers, 32-bit under), and its state saved and loaded mid-way goes on exactly."""
    from billiard_lora.optim import FlatLion

    a, b = params(), params()
    reference = (bnb.optim.Lion8bit if bits == 8 else bnb.optim.Lion)(groups(a), lr=1e-3)
    flat = FlatLion(groups(b), lr=1e-3, bits=bits)
    g = torch.Generator().manual_seed(2)
    step_both(reference, flat, a, b, 6, g, lr_at=lambda s: 1e-3 / (1 + s))
    assert_same(a, b)
    kinds = sorted(str(s["state1"].dtype) for s in flat._inner.state.values())
    assert kinds == (["torch.float32", "torch.float32", "torch.uint8", "torch.uint8"] if bits == 8
                     else ["torch.float32", "torch.float32"])
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FlatLion(groups(c), lr=1.0, bits=bits)
    resumed.load_state_dict(flat.state_dict())
    step_both(reference, resumed, a, c, 6, g, start=6)
    assert_same(a, c)


def test_without_padding_to_whole_blocks_the_8bit_states_would_differ(monkeypatch):
    """What makes the flat form exact: each 256-number block holds one tensor's numbers only."""
    monkeypatch.setattr(optim, "STATE_BLOCK", 1)
    a, b = params(), params()
    reference, flat = bnb.optim.AdamW8bit(groups(a), lr=1e-2), FlatAdamW8bit(groups(b), lr=1e-2)
    step_both(reference, flat, a, b, 6, torch.Generator().manual_seed(2))
    assert any(not torch.equal(p, q) for p, q in zip(a, b))


def test_flat_8bit_adamw_state_dict_resumes_exactly():
    """Saved after 5 steps and loaded into a fresh optimizer over fresh parameters, 5 more steps land where 10
    uninterrupted ones do; the groups' hyperparameters come back too."""
    a, b = params(), params()
    reference, flat = bnb.optim.AdamW8bit(groups(a), lr=1e-2), FlatAdamW8bit(groups(b), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    step_both(reference, flat, a, b, 5, g)
    saved = flat.state_dict()
    saved["param_groups"][1]["lr"] = 5e-3  # as a schedule would have left it
    reference.param_groups[1]["lr"] = 5e-3

    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FlatAdamW8bit(groups(c, te_lr=1.0), lr=1.0)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["lr"] == 5e-3 and resumed.param_groups[0]["lr"] == 1e-2
    step_both(reference, resumed, a, c, 5, g, start=5)
    assert_same(a, c)


def test_bitsandbytes_per_tensor_state_resumes_in_the_flat_form_exactly():
    """A checkpoint an older billiard-lora wrote (bitsandbytes' state per tensor, 8-bit and 32-bit, and none for the
    tensor that never had a gradient) goes on in the flat form exactly as bitsandbytes itself would."""
    a, b = params(), params()
    reference, earlier = bnb.optim.AdamW8bit(groups(a), lr=1e-2), bnb.optim.AdamW8bit(groups(b), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    step_both(reference, earlier, a, b, 5, g)
    saved = earlier.state_dict()

    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FlatAdamW8bit(groups(c, te_lr=1.0), lr=1.0)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["lr"] == 3e-3
    # the state converted decodes to the one the flat form reaches itself, and to zeros in the padding
    a2, d = params(), params()
    flat_all_along = FlatAdamW8bit(groups(d), lr=1e-2)
    step_both(bnb.optim.AdamW8bit(groups(a2), lr=1e-2), flat_all_along, a2, d, 5, torch.Generator().manual_seed(2))
    for mine, theirs in zip(resumed._packs, flat_all_along._packs):
        x, y = resumed._inner.state[mine.flat], flat_all_along._inner.state[theirs.flat]
        assert sorted(x) == sorted(y) and x["step"] == y["step"] == 5
        real = torch.zeros(mine.flat.numel(), dtype=torch.bool)
        for v in mine.values:
            real[v.storage_offset():v.storage_offset() + v.numel()] = True
        for n in "12":
            if mine.small:
                assert torch.equal(x[f"state{n}"], y[f"state{n}"])
                continue
            decoded = [st[f"qmap{n}"][st[f"state{n}"].long()] * st[f"absmax{n}"].repeat_interleave(256)
                       for st in (x, y)]
            assert torch.equal(decoded[0][real], decoded[1][real]) and not decoded[0][~real].any()
    step_both(reference, resumed, a, c, 5, g, start=5)
    assert_same(a, c)


def test_another_optimizers_state_is_refused_in_one_line():
    from billiard_lora.errors import UserError

    ps = params()
    adamw = torch.optim.AdamW(groups(ps), lr=1e-2)
    for p in ps:
        p.grad = torch.ones_like(p)
    adamw.step()
    with pytest.raises(UserError, match="not bitsandbytes' 8-bit AdamW's over this LoRA"):
        FlatAdamW8bit(groups(params()), lr=1e-2).load_state_dict(adamw.state_dict())
    with pytest.raises(UserError, match="resume with the settings it was saved with"):
        FlatAdamW8bit(groups(params()[:6]), lr=1e-2).load_state_dict(adamw.state_dict())


def test_under_the_fp16_loss_scaler_flat_steps_and_skips_exactly_as_per_tensor():
    """The path fp16 training takes on a GPU (here torch's GradScaler on the CPU): the scaler unscales and checks the
    model's own gradients, clipping sees them unscaled, an overflowing step is skipped, and the flat form lands
    where per-tensor bitsandbytes does."""
    a, b = params(), params()
    runs = [(bnb.optim.AdamW8bit(groups(a), lr=1e-2), a), (FlatAdamW8bit(groups(b), lr=1e-2), b)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in runs]
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        targets = [torch.randn(p.shape, generator=g) for p in a]
        for (opt, ps), scaler in zip(runs, scalers):
            loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, targets) if p is not ps[3])
            if step == 2:
                loss = loss * float("inf")  # an overflow: this step must be skipped, and the scale lowered
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=False)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert scalers[1].get_scale() < 2.0 ** 10  # the overflow was seen
    assert_same(a, b)


# ---------------------------------------------------------------------------------------------- Prodigy
def prodigy_groups(ps: list) -> list[dict]:
    return [{"params": ps[:5], "lr": 1.0, "weight_decay": 1e-2}, {"params": ps[5:], "lr": 1.0, "weight_decay": 1e-3}]


TARGETS = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in SHAPES]


def descend_both(reference, flat, a, b, steps: int, start: int = 0, lr_at=None) -> None:
    """Steps on a quadratic (gradient p - target, where a direction persists and Prodigy's d can grow); parameter 3
    never gets a gradient."""
    for step in range(start, start + steps):
        for ps, opt in ((a, reference), (b, flat)):
            for i, p in enumerate(ps):
                p.grad = None if i == 3 else (p.detach() - TARGETS[i]).clone()
            if lr_at:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)  # Prodigy takes one learning rate for all groups
            opt.step()


def test_flat_prodigy_adapts_and_steps_as_prodigy_per_tensor():
    """Prodigy over flat buffers: the same d estimate and the same parameters as Prodigy tensor by tensor, to the
    rounding of its sums over all parameters (taken in another order)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    from billiard_lora.optim import FlatProdigy

    a, b = params(), params()
    reference = prodigyopt.Prodigy(prodigy_groups(a), lr=1.0, weight_decay=1e-2, safeguard_warmup=True)
    flat = FlatProdigy(prodigy_groups(b), lr=1.0, weight_decay=1e-2, safeguard_warmup=True)
    descend_both(reference, flat, a, b, 12, lr_at=lambda s: min(1.0, (s + 1) / 4))
    d_ref, d_flat = reference.param_groups[0]["d"], flat._inner.param_groups[0]["d"]
    assert d_ref > 1e-5 and d_flat == pytest.approx(d_ref, rel=1e-4)  # it adapted (from 1e-6), and alike
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.equal(b[0], params()[0]) and torch.equal(b[3], params()[3])  # moved; never given a gradient


def test_flat_prodigy_resumes_exactly_and_from_a_per_tensor_state():
    prodigyopt = pytest.importorskip("prodigyopt")
    from billiard_lora.optim import FlatProdigy

    # flat -> flat: bit for bit
    a, b = params(), params()
    whole, first = (FlatProdigy(prodigy_groups(x), lr=1.0) for x in (a, b))
    descend_both(whole, first, a, b, 6)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FlatProdigy(prodigy_groups(c), lr=1.0)
    resumed.load_state_dict(first.state_dict())
    assert resumed._inner.param_groups[0]["d"] == whole._inner.param_groups[0]["d"] > 1e-5
    descend_both(whole, resumed, a, c, 6, start=6)
    assert_same(a, c)

    # Prodigy's own per-tensor state (older versions saved it): laid out into the buffers, the run goes on alike
    a, b = params(), params()
    reference, earlier = (prodigyopt.Prodigy(prodigy_groups(x), lr=1.0) for x in (a, b))
    descend_both(reference, earlier, a, b, 6)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FlatProdigy(prodigy_groups(c), lr=1.0)
    resumed.load_state_dict(earlier.state_dict())
    assert resumed._inner.param_groups[0]["d"] == reference.param_groups[0]["d"] > 1e-5
    descend_both(reference, resumed, a, c, 6, start=6)
    for p, q in zip(a, c):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- --use_ema
def test_adapter_ema_averages_swaps_in_and_puts_the_weights_back_exactly():
    ps = params()
    changes = []
    ema = optim.AdapterEMA(ps, decay=0.9999, on_change=lambda: changes.append(1))
    seen = []
    for step in range(1, 4):  # three "optimizer steps"
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn_like(p) * 0.1)
        seen.append([p.detach().clone() for p in ps])
        ema.step()
    # diffusers' EMAModel: the first step copies, then decay (1 + n) / (10 + n) after n steps
    expected = [s.clone() for s in seen[0]]
    for n, weights in ((1, seen[1]), (2, seen[2])):
        d = (1 + n) / (10 + n)
        expected = [e - (1 - d) * (e - w) for e, w in zip(expected, weights)]
    with ema.applied():
        assert len(changes) == 1
        for p, e in zip(ps, expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
    assert len(changes) == 2
    assert all(torch.equal(p.detach(), w) for p, w in zip(ps, seen[-1])), "the last weights come back bit for bit"
    assert not all(torch.allclose(p.detach(), e) for p, e in zip(ps, expected)), "the average is not the weights"


def test_adapter_ema_state_round_trips_and_refuses_another_lora():
    ps = params()
    ema = optim.AdapterEMA(ps, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            ps[0].add_(1.0)
        ema.step()
    state = {k: ([t.clone() for t in v] if k == "shadow_params" else v) for k, v in ema.state_dict().items()}
    again = optim.AdapterEMA(params(seed=2), decay=0.5)
    again.load_state_dict(state)
    assert again.steps == 3 and again.ema.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(again.ema.shadow_params, ema.ema.shadow_params))
    other = optim.AdapterEMA([torch.nn.Parameter(torch.zeros(8, 4))], decay=0.99)
    with pytest.raises(optim.UserError, match="does not fit this run's LoRA"):
        other.load_state_dict(state)


def test_schedule_free_average_is_the_optimizers_eval_weights_and_training_goes_on_bit_for_bit():
    from schedulefree import AdamWScheduleFree

    from billiard_lora.optim import ScheduleFreeAverage

    def run(look: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 3))
        opt = AdamWScheduleFree([w], lr=0.05, warmup_steps=2)
        opt.train()
        seen = []
        for step in range(6):
            w.grad = torch.sin(w.detach() * (step + 1))
            opt.step()
            if look:
                with ScheduleFreeAverage(opt, [w]).applied():
                    seen.append(w.detach().clone())
        return w.detach().clone(), seen

    plain, _ = run(False)
    looked, seen = run(True)
    assert torch.equal(plain, looked)  # looking at the average left training exactly where it was
    # what it showed is the optimizer's own eval() weights: x = y + (1 - 1/beta1) (z - y)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = AdamWScheduleFree([w], lr=0.05, warmup_steps=2)
    opt.train()
    for step in range(6):
        w.grad = torch.sin(w.detach() * (step + 1))
        opt.step()
    opt.eval()
    assert torch.equal(seen[-1], w.detach()) and not torch.equal(seen[-1], plain)
