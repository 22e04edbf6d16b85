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


def step_both(reference, flat, a, b, steps: int, g: torch.Generator, start: int = 0, lr_at=None) -> None:
    for step in range(start, start + steps):
        for p, q in zip(a, b):  # gradients across magnitudes; parameter 3 never has one (an unused layer's LoRA)
            p.grad = None if p is a[3] else torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 2)
            q.grad = None if p.grad is None else p.grad.clone()
        if lr_at:  # a schedule changes the groups' learning rates between steps
            for opt in (reference, flat):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step) * (1 if group is opt.param_groups[0] else 0.3)
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


def test_a_per_tensor_optimizer_state_is_refused_in_one_line():
    from billiard_lora.errors import UserError

    old = bnb.optim.AdamW8bit(groups(params()), lr=1e-2).state_dict()
    with pytest.raises(UserError, match="older billiard-lora"):
        FlatAdamW8bit(groups(params()), lr=1e-2).load_state_dict(old)
