"""--scale_weight_norms (kohya's max-norm regularization): every layer's weight change capped after each step, for
LoRA (linear and convolution), LoHa and LoKr; logged; resumed exactly; refused where it cannot apply."""

from __future__ import annotations

import csv

import pytest
import torch

from billiard_lora.errors import UserError
from billiard_lora.lora import MaxNorm, add_lora
from billiard_lora.train import train

from test_train import Crash, _stand_in_graphs, crash_at_step, lora_tensors, make_images, tiny_config


def _delta_norms(model) -> dict[str, float]:
    """Each adapted layer's ||ΔW||_F, built the slow way: peft's own full weight change."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        return {n: float(m.get_delta_weight(m.active_adapters[0]).float().norm()) for n, m in model.named_modules()
                if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("lora_type", ["lora", "loha", "lokr"])
def test_layers_above_the_limit_are_scaled_back_to_it_and_the_others_kept(tiny_components, lora_type, monkeypatch):
    unet = tiny_components.unet
    add_lora(unet, rank=4, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
             lora_type=lora_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every factor random (a LoRA's B starts at zero), at sizes that differ per layer
        for n, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 + 0.3 * (hash(n) % 7) / 7))
    before = _delta_norms(unet)
    regularizer = MaxNorm([unet], limit=0)
    assert len(regularizer.layers) == len(before) > 10
    assert any(t.ndim == 4 for _, ts, _ in regularizer.layers for t in ts) or lora_type != "lora"  # convolutions
    # the cheap norms (rank x rank products for a LoRA) are the full ΔW's
    torch.testing.assert_close(regularizer.norms(), torch.tensor(list(before.values())), rtol=1e-4, atol=1e-6)
    if lora_type == "lora":  # layers of one shape are stacked, in stacks of a bounded size: the same norms
        assert len(regularizer.stacks) < len(regularizer.layers)
        monkeypatch.setattr(MaxNorm, "STACK_BYTES", 1)
        one_by_one = MaxNorm([unet], limit=0)
        assert len(one_by_one.stacks) == len(one_by_one.layers)
        torch.testing.assert_close(one_by_one.norms(), regularizer.norms())
    limit = sorted(before.values())[len(before) // 2]  # half the layers above
    regularizer.limit = limit
    kept = {n: p.clone() for n, p in unet.named_parameters() if p.requires_grad}
    scaled, mean, largest = regularizer.step()
    after = _delta_norms(unet)
    above = [n for n, v in before.items() if v > limit]
    assert scaled == len(above) > 0
    for n, v in after.items():
        if n in above:
            assert v == pytest.approx(limit, rel=1e-4), n
        else:
            assert v == before[n], n
    assert largest == pytest.approx(limit, rel=1e-4) and mean == pytest.approx(sum(after.values()) / len(after), 1e-4)
    for n, p in unet.named_parameters():  # below the limit: untouched, bit for bit
        if p.requires_grad and not any(n.startswith(a + ".") for a in above):
            assert torch.equal(p, kept[n]), n
    assert regularizer.step()[0] == 0  # all within the limit now


def test_training_caps_every_layer_logs_the_scaling_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=4)
    kw = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=3e-2, scale_weight_norms=0.05,
              train_text_encoder=True, lora_layers="attn,conv")
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    rows = list(csv.DictReader(open(full / "loss_history.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert int(rows[-1]["keys_scaled"]) > 0  # the high learning rate pushes layers past the cap
    assert all(float(r["max_key_norm"]) <= 0.05 * (1 + 1e-5) for r in rows)
    assert 0 < float(rows[-1]["mean_key_norm"]) <= float(rows[-1]["max_key_norm"])
    # the saved LoRA: every layer's scale·B·A within the cap (kohya format: the file's alpha/rank scale)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(full))
    norms = {**_delta_norms(pipe.unet), **_delta_norms(pipe.text_encoder), **_delta_norms(pipe.text_encoder_2)}
    assert len(norms) > 20 and max(norms.values()) <= 0.05 * (1 + 1e-4)
    assert sum(v > 0.05 * 0.999 for v in norms.values()) >= int(rows[-1]["keys_scaled"])
    # resumed from step 2: the same LoRA and the same logged numbers
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(3))
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "loss_history.csv").read_text() == (full / "loss_history.csv").read_text()
    assert "scale_weight_norms" in (full / "README.md").read_text()  # the model card lists it


def test_recorded_steps_with_fused_ops_see_the_scaled_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Under --cuda_graphs (stood in for on the CPU) with --fused_lora_ops' kept bf16 copies, which a replay never
    re-checks, and 8-bit Adam writing the adapters in place: the scaling happens before the copies are refreshed,
    so the run is the eager one's, bit for bit."""
    import json

    import billiard_lora.lora as lora_mod

    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=4, gradient_accumulation_steps=2, mixed_precision="bf16", fused_lora_ops=True,
              gradient_checkpointing=True, use_8bit_adam=True, learning_rate=3e-2, scale_weight_norms=0.05)
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", cuda_graphs=False, **kw))
    assert int(list(csv.DictReader(open(eager / "loss_history.csv")))[-1]["keys_scaled"]) > 0
    _stand_in_graphs(monkeypatch)
    monkeypatch.setattr(lora_mod._HalfCopy, "current", lambda self: self.copies)  # as a replay: never re-checked
    graphed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", cuda_graphs=True, **kw))
    assert json.loads((graphed / "summary.json").read_text())["cuda_graph_replays"] > 0
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, message", [
    (dict(scale_weight_norms=0), "--scale_weight_norms=0 must be positive"),
    (dict(scale_weight_norms=1.0, use_dora=True), "DoRA rescales by its magnitudes: drop --use_dora or"),
    (dict(scale_weight_norms=1.0, init_lora_weights="pissa"), "--init_lora_weights=pissa starts at the weights'"),
    (dict(scale_weight_norms=1.0, optimizer="AdamW_ScheduleFree"), "--optimizer=AdamW_ScheduleFree's averaged"),
])
def test_settings_it_cannot_apply_to_are_refused_in_one_line(tiny_model_dir, tmp_path, kw, message):
    with pytest.raises(UserError, match=message) as err:
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "o", **kw)
    assert "\n" not in str(err.value)
