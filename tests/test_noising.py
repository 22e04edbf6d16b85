"""How a training step noises its latents: --timestep_bias_*, --multires_noise_*, --input_perturbation."""

from __future__ import annotations

import pytest
import torch

import billiard_lora.train as train_mod
from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
from billiard_lora.noising import multires_noise, timestep_weights
from billiard_lora.train import train
from test_train import Crash, crash_at_step, drawn_timesteps, lora_tensors, make_images, tiny_config


def config(**kw) -> TrainConfig:
    return TrainConfig(instance_prompt="x", **kw)


def test_timestep_weights_follow_diffusers_strategies_inside_min_and_max_timestep():
    assert timestep_weights(config(), 1000) is None  # uniform: torch.randint, as before
    later = timestep_weights(config(timestep_bias_strategy="later", timestep_bias_multiplier=3.0), 1000)
    # the last quarter weighs 3: 750 x 1 + 250 x 3 = 1500
    assert later.sum().item() == pytest.approx(1.0)
    assert torch.allclose(later[:750], torch.full((750,), 1 / 1500, dtype=torch.float64))
    assert torch.allclose(later[750:], torch.full((250,), 3 / 1500, dtype=torch.float64))
    earlier = timestep_weights(config(timestep_bias_strategy="earlier", timestep_bias_portion=0.5,
                                      timestep_bias_multiplier=0.5), 1000)
    assert earlier[0].item() == pytest.approx(0.5 / 750) and earlier[999].item() == pytest.approx(1 / 750)
    ranged = timestep_weights(config(timestep_bias_strategy="range", timestep_bias_begin=200, timestep_bias_end=500,
                                     timestep_bias_multiplier=2.0, min_timestep=100, max_timestep=900), 1000)
    # 100 zero, 100 x 1, 300 x 2, 400 x 1, 100 zero: 1100
    assert (ranged[:100] == 0).all() and (ranged[900:] == 0).all()
    assert ranged[150].item() == pytest.approx(1 / 1100) and ranged[200].item() == pytest.approx(2 / 1100)
    assert ranged[499].item() == pytest.approx(2 / 1100) and ranged[500].item() == pytest.approx(1 / 1100)


def test_biased_timesteps_are_drawn_where_the_bias_points(tiny_model_dir, tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", n=4)
    # the last tenth drawn 1000x as often as the rest: ~99 % of the draws, all below --max_timestep
    drawn = drawn_timesteps(monkeypatch, tiny_config(
        tiny_model_dir, data, tmp_path / "a", max_train_steps=6, train_batch_size=4, timestep_bias_strategy="later",
        timestep_bias_portion=0.1, timestep_bias_multiplier=1000.0, max_timestep=950))
    assert len(drawn) == 24 and max(drawn) < 950 and sum(t >= 900 for t in drawn) >= 20 and len(set(drawn)) > 5
    drawn = drawn_timesteps(monkeypatch, tiny_config(
        tiny_model_dir, data, tmp_path / "b", max_train_steps=6, train_batch_size=4, timestep_bias_strategy="range",
        timestep_bias_begin=10, timestep_bias_end=20, timestep_bias_multiplier=1e6))
    assert len(drawn) == 24 and all(10 <= t < 20 for t in drawn)
    with pytest.raises(UserError, match="--timestep_bias_end=2000 is past this model's 1000 timesteps"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "c", max_train_steps=1, timestep_bias_strategy="range",
                          timestep_bias_end=2000))


def test_multires_noise_has_unit_variance_per_image_and_low_frequencies():
    gen = torch.Generator().manual_seed(0)
    white = torch.randn((64, 4, 32, 32), generator=gen)
    noise = multires_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.3)
    assert not torch.equal(white, noise) and noise.shape == white.shape
    assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(64), atol=1e-5)
    # white noise's per-channel mean over 32x32 values has variance 1/1024; the coarse levels raise it, the more
    # the larger the discount, and neighbouring values correlate (white noise's do not)
    corr = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert white.mean(dim=(2, 3)).var().item() < 1.5 / 1024 and abs(corr(white)) < 0.01
    strong = multires_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.8)
    assert 2 / 1024 < noise.mean(dim=(2, 3)).var().item() < 50 / 1024 < strong.mean(dim=(2, 3)).var().item()
    assert 0.01 < corr(noise) < 0.2 < corr(strong)
    again = multires_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.3)
    assert torch.equal(noise, again)  # the generator's seed decides everything, the global RNG nothing


def test_input_perturbation_noises_the_input_but_keeps_the_target(tiny_model_dir, tiny_components, tmp_path,
                                                                   monkeypatch):
    """The latents are noised with noise + gamma x fresh noise; the loss's target stays the noise."""
    from billiard_lora.models import load_components

    inputs, targets, real_loss = [], [], train_mod.diffusion_loss
    monkeypatch.setattr(train_mod, "diffusion_loss", lambda pred, target, *a: targets.append(target) or
                        real_loss(pred, target, *a))
    data = make_images(tmp_path / "data", n=4)
    for name, gamma, c in (("a", 0.1, tiny_components), ("b", 0.0, load_components(str(tiny_model_dir)))):
        real_add = c.noise_scheduler.add_noise
        c.noise_scheduler.add_noise = lambda latents, noise, t, add=real_add: inputs.append(noise) or \
            add(latents, noise, t)
        train(tiny_config(tiny_model_dir, data, tmp_path / name, max_train_steps=2, input_perturbation=gamma),
              components=c)
    assert len(inputs) == len(targets) == 4
    for noised_with, target in zip(inputs[:2], targets[:2]):
        assert (noised_with - target).std().item() == pytest.approx(0.1, rel=0.25)
    assert all(noised_with is target for noised_with, target in zip(inputs[2:], targets[2:]))  # without: the same


def test_noise_recipes_change_the_lora_and_resume_bit_for_bit(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=5)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, random_flip=True,
              noise_offset=0.05, multires_noise_iterations=4, input_perturbation=0.1,
              timestep_bias_strategy="later", timestep_bias_multiplier=2.0, noise_offset_random_strength=True,
              input_perturbation_random_strength=True)
    full = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw)))
    card = (tmp_path / "full" / "README.md").read_text()  # the model card lists the settings a run changed
    assert "| `timestep_bias_strategy` | `later` |" in card and "| `multires_noise_iterations` | `4` |" in card
    assert "masked_loss" not in card and "loraplus_lr_ratio" not in card
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "resumed",
                                             resume_from_checkpoint="latest", **kw)))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    for flag in ("multires_noise_iterations", "input_perturbation", "timestep_bias_strategy",
                 "noise_offset_random_strength", "input_perturbation_random_strength"):
        plain = {**kw, flag: {"multires_noise_iterations": 0, "input_perturbation": 0.0,
                              "timestep_bias_strategy": "none", "noise_offset_random_strength": False,
                              "input_perturbation_random_strength": False}[flag]}
        if flag == "timestep_bias_strategy":
            plain.pop("timestep_bias_multiplier")
        if flag == "input_perturbation":
            plain.pop("input_perturbation_random_strength")
        other = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / flag, **plain)))
        assert any(not torch.equal(full[k], other[k]) for k in full), f"--{flag} changed nothing"


@pytest.mark.parametrize("kw, message", [
    (dict(multires_noise_discount=0.5), "--multires_noise_discount=0.5 only applies with --multires_noise_iterations"),
    (dict(multires_noise_iterations=-1), "--multires_noise_iterations=-1 must be 0 or more"),
    (dict(multires_noise_iterations=6, multires_noise_discount=1.5), "--multires_noise_discount=1.5 must be in (0, 1)"),
    (dict(input_perturbation=-0.1), "--input_perturbation=-0.1 must be 0 or more"),
    (dict(noise_offset_random_strength=True), "--noise_offset_random_strength draws each batch's --noise_offset"),
    (dict(input_perturbation_random_strength=True), "--input_perturbation_random_strength draws each batch's "
                                                    "--input_perturbation below the value given"),
    (dict(timestep_bias_strategy="sooner"), "--timestep_bias_strategy='sooner' must be one of none, earlier"),
    (dict(timestep_bias_multiplier=2.0), "--timestep_bias_multiplier only applies with --timestep_bias_strategy"),
    (dict(timestep_bias_strategy="later", timestep_bias_multiplier=0.0), "--timestep_bias_multiplier=0.0 must be "
                                                                         "positive"),
    (dict(timestep_bias_strategy="later", timestep_bias_begin=100), "--timestep_bias_begin goes with "
                                                                    "--timestep_bias_strategy range, not later"),
    (dict(timestep_bias_strategy="range", timestep_bias_portion=0.5), "--timestep_bias_portion goes with "
                                                                      "--timestep_bias_strategy later or earlier"),
    (dict(timestep_bias_strategy="range", timestep_bias_begin=500, timestep_bias_end=100),
     "--timestep_bias_begin=500 and --timestep_bias_end=100"),
    (dict(timestep_bias_strategy="earlier", timestep_bias_portion=1.5), "--timestep_bias_portion=1.5 must be in"),
])
def test_noise_recipe_flags_out_of_place_or_range_are_one_line_errors(kw, message):
    with pytest.raises(UserError) as err:
        config(**kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
