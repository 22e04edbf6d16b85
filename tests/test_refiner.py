"""generate with SDXL's refiner (--refiner): base + LoRA for the noisy part, the refiner finishes, as diffusers' docs."""

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

KW = dict(num_inference_steps=5, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    from billiard_lora.tiny import save_tiny_refiner

    return save_tiny_refiner(tmp_path_factory.mktemp("refiner") / "tiny-refiner")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("refined") / "run")


def _pipe(model_dir, refiner_dir, loras=(), **kw):
    return load_generation_pipeline(str(model_dir), vae=None, loras=loras, device="cpu", refiner=str(refiner_dir),
                                    **kw)


def test_the_refiner_finishes_the_base_models_latents_as_diffusers_ensemble_of_experts(tiny_model_dir, refiner_dir,
                                                                                     lora_run):
    pipe = _pipe(tiny_model_dir, refiner_dir, loras=[str(lora_run)])
    assert pipe.billiard_refiner.text_encoder_2 is pipe.text_encoder_2 and pipe.billiard_refiner.vae is pipe.vae
    ours = generate(pipe, PROMPT, 0, refiner_start=0.6, **KW)[0]
    g = torch.Generator("cpu").manual_seed(0)
    latents = pipe(PROMPT, num_inference_steps=5, height=32, width=32, generator=g, denoising_end=0.6,
                   output_type="latent").images
    theirs = pipe.billiard_refiner(PROMPT, image=latents, num_inference_steps=5, denoising_start=0.6,
                                   generator=g).images[0]
    assert np.array_equal(_px(ours), _px(theirs))
    meta = ours.metadata()
    assert meta["refiner"] == str(refiner_dir) and meta["refiner_start"] == "0.6"
    # the LoRA shapes the base model's part: at scale 0 the image is the bare base's + refiner's
    bare = generate(_pipe(tiny_model_dir, refiner_dir), PROMPT, 0, refiner_start=0.6, **KW)[0]
    off = generate(pipe, PROMPT, 0, refiner_start=0.6, lora_scale=0.0, **KW)[0]
    assert np.abs(_px(bare) - _px(off)).max() <= 1 and not np.array_equal(_px(bare), _px(ours))
    # and the refiner changes the image
    plain = generate(load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(lora_run)], device="cpu"),
                     PROMPT, 0, **KW)[0]
    assert not np.array_equal(_px(plain), _px(ours))


def test_refiner_with_prompt_weighting_and_image_to_image(tiny_model_dir, refiner_dir):
    pipe = _pipe(tiny_model_dir, refiner_dir)
    for negative in (None, "blurry"):  # plain prompts: compel's encoding is the refiner's own
        a = generate(pipe, PROMPT, 0, negative_prompt=negative, **KW)[0]
        b = generate(pipe, PROMPT, 0, negative_prompt=negative, prompt_weighting=True, **KW)[0]
        assert np.array_equal(_px(a), _px(b))
    long = ", ".join(["a green billiard table with red and yellow balls"] * 10)
    made = generate(pipe, f"{long}, (messi:1.4)", 0, prompt_weighting=True, **KW)[0]
    assert made.image.size == (32, 32)
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    refined = generate(pipe, PROMPT, 0, init_image=start, strength=0.8, num_inference_steps=5, progress=False)[0]
    assert refined.metadata()["refiner"] and refined.metadata()["init_image"] == "in-memory image"


def test_pivotal_tokens_reach_the_refiner_through_the_shared_tokenizer(tiny_model_dir, refiner_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path / "ti", train_text_encoder_ti=True,
                 instance_prompt="a photo of TOK playing billiard")
    pipe = _pipe(tiny_model_dir, refiner_dir, loras=[str(run)])
    image = generate(pipe, "a photo of TOK playing billiard", 0, **KW)[0]
    assert image.image.size == (32, 32)
    assert "<s0>" in pipe.billiard_refiner.tokenizer_2.get_vocab()


def test_refiner_settings_no_run_can_use_are_one_line(tiny_model_dir, refiner_dir, tmp_path):
    pipe = _pipe(tiny_model_dir, refiner_dir)
    with pytest.raises(UserError, match=r"--refiner_start=1.0 must be in \(0, 1\)"):
        generate(pipe, PROMPT, 0, refiner_start=1.0, **KW)
    with pytest.raises(UserError, match="--refiner does not combine with --cpu_offload"):
        _pipe(tiny_model_dir, refiner_dir, cpu_offload=True)
    with pytest.raises(UserError, match="could not load SDXL refiner .*no such folder"):
        _pipe(tiny_model_dir, tmp_path / "nowhere")


def test_cli_refiner(tiny_model_dir, refiner_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--device", "cpu", "--prompt", PROMPT, "--steps", "5", "--height", "32", "--width", "32",
                        "--refiner", str(refiner_dir), "--refiner_start", "0.7", "--out", str(tmp_path / "gen")],
                       capture_output=True, text=True, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "gen").glob("*.png")
    assert Image.open(png).text["refiner_start"] == "0.7"
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--device", "cpu", "--prompt", PROMPT, "--refiner_start", "0.7", "--out", str(tmp_path / "g2")],
                       capture_output=True, text=True, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert r.returncode == 2 and "--refiner_start sets where the refiner takes over: add --refiner" in r.stderr
