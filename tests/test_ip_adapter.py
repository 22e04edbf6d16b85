"""generate with an IP-Adapter (--ip_adapter, --ip_image, --ip_scale): a picture as a second prompt, beside the LoRA,
through diffusers' load_ip_adapter; a tiny IP-Adapter built by our code stands in for h94/IP-Adapter's SDXL one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from billiard_lora.errors import UserError
from billiard_lora.generate import generate, load_generation_pipeline
from test_generate import PROMPT, REPO, _px, _train

KW = dict(num_inference_steps=2, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    from billiard_lora.tiny import save_tiny_ip_adapter

    return save_tiny_ip_adapter(tmp_path_factory.mktemp("ip") / "tiny-ip-adapter")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("ip-lora") / "run")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip-pictures")
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"face_{i}.png")
        out.append(folder / f"face_{i}.png")
    return out


def _pipe(model_dir, ip_dir=None, loras=(), **kw):
    kw.setdefault("ip_adapter", str(ip_dir / "ip-adapter_sdxl.safetensors") if ip_dir else None)
    return load_generation_pipeline(str(model_dir), vae=None, loras=loras, device="cpu", **kw)


def test_the_picture_prompts_as_diffusers_load_ip_adapter_makes_it(tiny_model_dir, ip_dir, lora_run, pictures):
    from diffusers import StableDiffusionXLPipeline

    pipe = _pipe(tiny_model_dir, ip_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, ip_image=pictures[0], ip_scale=0.8, **KW)[0]
    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    reference.load_lora_weights(str(lora_run))
    reference.load_ip_adapter(str(ip_dir), subfolder="", weight_name="ip-adapter_sdxl.safetensors")
    reference.set_ip_adapter_scale(0.8)
    theirs = reference(PROMPT, ip_adapter_image=Image.open(pictures[0]).convert("RGB"), num_inference_steps=2,
                       height=32, width=32, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(_px(ours) - _px(theirs)).max() <= 1
    meta = ours.metadata()
    assert (meta["ip_image"], meta["ip_scale"]) == ("face_0.png", "0.8") and meta["ip_adapter"].endswith(".safetensors")
    other = generate(pipe, PROMPT, 0, ip_image=pictures[1], ip_scale=0.8, **KW)[0]
    assert np.abs(_px(ours) - _px(other)).max() > 2  # another picture, another image
    no_lora = generate(pipe, PROMPT, 0, ip_image=pictures[0], ip_scale=0.8, lora_scale=0.0, **KW)[0]
    assert np.abs(_px(ours) - _px(no_lora)).max() > 2  # the LoRA still counts
    off = generate(pipe, PROMPT, 0, ip_image=pictures[0], ip_scale=0.0, **KW)[0]
    plain = generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), PROMPT, 0, **KW)[0]
    assert np.abs(_px(off) - _px(plain)).max() <= 1  # at scale 0 the picture adds nothing
    hires = generate(pipe, PROMPT, 0, ip_image=pictures[0], hires_scale=1.5, **KW)[0]  # both passes take it
    assert hires.image.size == (48, 48)


def test_an_image_encoder_given_apart_is_the_one_beside_the_weights(tiny_model_dir, ip_dir, pictures, tmp_path):
    """--ip_image_encoder (the plus adapters keep theirs elsewhere): the encoder it names is the one that runs."""
    import shutil

    elsewhere = shutil.copytree(ip_dir / "image_encoder", tmp_path / "encoder")
    given = generate(_pipe(tiny_model_dir, ip_dir, ip_image_encoder=str(elsewhere)), PROMPT, 0, ip_image=pictures[0],
                     **KW)[0]
    beside = generate(_pipe(tiny_model_dir, ip_dir), PROMPT, 0, ip_image=pictures[0], **KW)[0]
    assert np.array_equal(_px(given), _px(beside))
    with pytest.raises(UserError, match="could not load IP-Adapter image encoder .*no such folder"):
        _pipe(tiny_model_dir, ip_dir, ip_image_encoder=str(tmp_path / "nowhere"))


def test_ip_adapter_settings_no_run_can_use_are_one_line(tiny_model_dir, ip_dir, pictures, tmp_path):
    pipe = _pipe(tiny_model_dir, ip_dir)
    with pytest.raises(UserError, match="--ip_adapter needs --ip_image FILE"):
        generate(pipe, PROMPT, 0, **KW)
    with pytest.raises(UserError, match=r"--ip_scale=3.0 must be in \[0, 2\]"):
        generate(pipe, PROMPT, 0, ip_image=pictures[0], ip_scale=3.0, **KW)
    with pytest.raises(UserError, match="--ip_image is a picture prompt for an IP-Adapter: add --ip_adapter"):
        generate(_pipe(tiny_model_dir), PROMPT, 0, ip_image=pictures[0], **KW)
    with pytest.raises(UserError, match="a .bin file is a pickle"):
        _pipe(tiny_model_dir, ip_adapter="h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin")
    with pytest.raises(UserError, match="give the IP-Adapter's .safetensors file"):
        _pipe(tiny_model_dir, ip_adapter=str(tmp_path))
    with pytest.raises(UserError, match="--ip_adapter does not combine with --cpu_offload"):
        _pipe(tiny_model_dir, ip_dir, cpu_offload=True)
    with pytest.raises(UserError, match="could not load IP-Adapter 'h94/IP-Adapter'.*HF_HUB_OFFLINE"):
        _pipe(tiny_model_dir, ip_adapter="h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors")


def test_cli_ip_adapter_and_the_tiny_writer(tiny_model_dir, pictures, tmp_path, capsys):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"}
    from billiard_lora.tiny import main as tiny_main

    assert tiny_main([str(tmp_path / "ip"), "--ip_adapter"]) == 0 and "IP-Adapter" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--device", "cpu", "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32",
                        "--ip_adapter", str(tmp_path / "ip" / "ip-adapter_sdxl.safetensors"), "--ip_image",
                        str(pictures[1]), "--ip_scale", "0.7", "--out", str(tmp_path / "gen")],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "gen").glob("*.png")
    assert (Image.open(png).text["ip_image"], Image.open(png).text["ip_scale"]) == ("face_1.png", "0.7")
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--prompt", PROMPT, "--ip_image", str(pictures[0]), "--out", str(tmp_path / "g2")],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and "--ip_image is a picture prompt for an IP-Adapter" in r.stderr
