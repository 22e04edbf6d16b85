"""--prediction_type / --zero_terminal_snr, and a single-file checkpoint's v_pred / ztsnr markers (ComfyUI's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import billiard_lora.train as train_mod
from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
from test_train import make_images, tiny_config


@pytest.fixture(scope="module")
def vpred_file(tmp_path_factory):
    """A tiny single-file checkpoint carrying the v_pred and ztsnr markers NoobAI-style v-prediction files carry."""
    from billiard_lora.tiny import save_tiny_pipeline, save_tiny_single_file

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("vp") / "tiny", seed=0, shape="tiny-single-file")
    state = load_file(str(save_tiny_single_file(folder)))
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, folder / "vpred.safetensors")
    return folder, folder / "vpred.safetensors"


def test_single_file_markers_set_v_prediction_and_zero_terminal_snr(vpred_file):
    from billiard_lora.models import load_components, load_pipeline

    folder, file = vpred_file
    c = load_components(str(file), single_file_config=str(folder))
    cfg = c.noise_scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr
    assert float(c.noise_scheduler.alphas_cumprod[-1]) == 0.0  # the last timestep is pure noise
    pipe = load_pipeline(str(file), single_file_config=str(folder))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # sampling starts at the pure-noise timestep
    plain = load_components(str(folder)).noise_scheduler.config
    assert plain.prediction_type == "epsilon" and not plain.get("rescale_betas_zero_snr")


def test_v_prediction_trains_on_the_velocity_and_zero_snr_keeps_the_loss_finite(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    from diffusers import DDPMScheduler

    calls = []
    real = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or real(self, *a))
    losses = []
    data = make_images(tmp_path / "data")
    out = train_mod.train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=2,
                                      prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=5.0,
                                      min_timestep=990),  # the last timesteps, where SNR is (near) zero
                          callback=lambda e: e["event"] == "step" and losses.append(e["loss"]))
    assert calls and len(losses) == 2 and np.isfinite(losses).all()
    saved = json.loads((out / "config.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["zero_terminal_snr"] is True
    assert ('pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction", '
            'rescale_betas_zero_snr=True, timestep_spacing="trailing")') in (out / "README.md").read_text()
    calls.clear()
    train_mod.train(tiny_config(tiny_model_dir, data, tmp_path / "eps", max_train_steps=1))
    assert not calls, "an epsilon model trains on the noise"


def test_generate_samples_with_the_noise_schedule_the_run_trained_with(tiny_model_dir, tmp_path, monkeypatch):
    import argparse

    from billiard_lora.generate import _default_model_and_vae

    out = train_mod.train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out",
                                      max_train_steps=1, prediction_type="v_prediction"))
    args = argparse.Namespace(model=None, vae="config", checkpoints=None, single_file_config=None)
    _default_model_and_vae(args, [out / "pytorch_lora_weights.safetensors"])
    assert args.noise_schedule == {"prediction_type": "v_prediction", "zero_terminal_snr": False}


def test_noise_schedule_mistakes_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown --prediction_type='v'"):
        TrainConfig(instance_prompt="x", prediction_type="v")
    with pytest.raises(UserError, match="--zero_terminal_snr trains the last timestep on pure noise"):
        TrainConfig(instance_prompt="x", prediction_type="epsilon", zero_terminal_snr=True)
    with pytest.raises(UserError, match="zero terminal SNR .* where an epsilon model has nothing to predict"):
        train_mod.train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out",
                                    zero_terminal_snr=True))  # the tiny model is an epsilon model
