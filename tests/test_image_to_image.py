"""generate(..., init_image=...): image-to-image (A1111's img2img) with the LoRA, through diffusers' SDXL pipeline."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from billiard_lora.errors import UserError
from billiard_lora.generate import _is_fp8, fit_init_image, generate
from test_generate import FAST, PROMPT, REPO, _pipe, _px, _train

STEPS = dict(num_inference_steps=4, progress=False)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("img2img") / "run")


def _picture(seed: int, h: int = 40, w: int = 56) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_image_to_image_is_diffusers_img2img_on_the_same_models_with_the_lora(tiny_model_dir, lora_run):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, init_image=_picture(0), strength=0.5, **STEPS)[0]
    theirs = StableDiffusionXLImg2ImgPipeline(**pipe.components)(
        PROMPT, image=fit_init_image(pipe, _picture(0), None, None), strength=0.5, num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(ours), _px(theirs))
    assert ours.metadata()["init_image"] == "in-memory image" and ours.metadata()["strength"] == "0.5"
    other = generate(pipe, PROMPT, 0, init_image=_picture(1), strength=0.5, **STEPS)[0]
    assert not np.array_equal(_px(ours), _px(other))  # the starting image matters
    stronger = generate(pipe, PROMPT, 0, init_image=_picture(0), strength=1.0, **STEPS)[0]
    assert not np.array_equal(_px(ours), _px(stronger))
    # the LoRA shapes it: at scale 0 it is the bare model's image-to-image
    bare = generate(_pipe(tiny_model_dir), PROMPT, 0, init_image=_picture(0), strength=0.5, **STEPS)[0]
    off = generate(pipe, PROMPT, 0, init_image=_picture(0), strength=0.5, lora_scale=0.0, **STEPS)[0]
    assert np.abs(_px(bare) - _px(off)).max() <= 1 and not np.array_equal(_px(bare), _px(ours))


def test_the_starting_image_is_fitted_to_the_size_or_the_nearest_sdxl_bucket(tiny_model_dir):
    pipe = _pipe(tiny_model_dir)
    made = generate(pipe, PROMPT, 0, init_image=_picture(0), strength=0.5, height=32, width=48, **STEPS)[0]
    assert made.image.size == (48, 32)
    sdxl = types.SimpleNamespace(default_sample_size=128, vae_scale_factor=8)  # SDXL's 1024 px
    assert fit_init_image(sdxl, _picture(0, 800, 1200), None, None).size == (1216, 832)  # SDXL's 3:2 bucket
    assert fit_init_image(sdxl, _picture(0, 1000, 1000), None, None).size == (1024, 1024)
    assert fit_init_image(sdxl, _picture(0, 1000, 700), None, None).size == (832, 1216)


def test_image_to_image_leaves_the_pipeline_as_it_was(tiny_model_dir):
    """Built from the pipeline's components, not from_pipe (which casts every model to float32): float8 weights
    stay float8, and text-to-image afterwards makes the images it made before."""
    pipe = _pipe(tiny_model_dir, fp8_base=True)
    before = generate(pipe, PROMPT, 0, **FAST)[0]
    generate(pipe, PROMPT, 0, init_image=_picture(0), strength=0.5, **STEPS)
    assert _is_fp8(pipe)
    assert np.array_equal(_px(before), _px(generate(pipe, PROMPT, 0, **FAST)[0]))


def test_strengths_no_step_can_use_are_one_line(tiny_model_dir):
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(UserError, match=r"--strength=1.5 must be in \(0, 1\]"):
        generate(pipe, PROMPT, 0, init_image=_picture(0), strength=1.5, **STEPS)
    with pytest.raises(UserError, match=r"--strength=0.1 x --steps=4 is less than one denoising step"):
        generate(pipe, PROMPT, 0, init_image=_picture(0), strength=0.1, **STEPS)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "billiard_lora.generate", *args], capture_output=True, text=True,
                          cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})


def test_cli_init_image_and_strength(tiny_model_dir, tmp_path):
    _picture(0).save(tmp_path / "table.jpg")
    common = ["--model", str(tiny_model_dir), "--vae", "none", "--device", "cpu", "--prompt", PROMPT, "--steps", "4",
              "--out", str(tmp_path / "gen")]
    r = _cli(*common, "--init_image", str(tmp_path / "table.jpg"), "--strength", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "gen").glob("*.png")
    assert Image.open(png).text["init_image"] == "table.jpg" and Image.open(png).text["strength"] == "0.5"
    Image.new("L", (56, 40), 255).save(tmp_path / "mask.png")
    r = _cli(*common, "--init_image", str(tmp_path / "table.jpg"), "--mask_image", str(tmp_path / "mask.png"),
             "--out", str(tmp_path / "inpainted"))
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "inpainted").glob("*.png")
    assert Image.open(png).text["mask_image"] == "mask.png" and Image.open(png).text["strength"] == "0.99"
    for extra, message in ((["--strength", "0.5"], "--strength sets how much of --init_image is noised away"),
                           (["--mask_image", str(tmp_path / "mask.png")], "--mask_image marks what to redraw"),
                           (["--init_image", str(tmp_path / "none.jpg")], "none.jpg: file not found"),
                           (["--init_image", str(tmp_path / "table.jpg"), "--strength", "2"], "--strength=2.0 must")):
        r = _cli(*common, *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_image_to_image_with_cpu_offload_makes_the_same_images(tiny_model_dir, lora_run):
    kw = dict(init_image=_picture(0), strength=0.5, **STEPS)
    resident = generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), PROMPT, 0, **kw)[0]
    offloaded = _pipe(tiny_model_dir, loras=[str(lora_run)], cpu_offload=True)
    assert np.abs(_px(resident) - _px(generate(offloaded, PROMPT, 0, **kw)[0])).max() <= 1
    assert np.abs(_px(resident) - _px(generate(offloaded, PROMPT, 0, **kw)[0])).max() <= 1  # and again after it


def test_hires_fix_upscales_and_redraws_with_the_same_generator(tiny_model_dir, lora_run):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image as PILImage

    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, height=32, width=48, hires_scale=1.5, hires_strength=0.5, **STEPS)[0]
    assert ours.image.size == (72, 48)
    assert ours.metadata()["hires_scale"] == "1.5" and ours.metadata()["hires_strength"] == "0.5"
    g = torch.Generator("cpu").manual_seed(0)
    first = pipe(PROMPT, num_inference_steps=4, height=32, width=48, generator=g).images[0]
    theirs = StableDiffusionXLImg2ImgPipeline(**pipe.components)(
        PROMPT, image=first.resize((72, 48), resample=PILImage.Resampling.LANCZOS), strength=0.5,
        num_inference_steps=4, generator=g).images[0]
    assert np.array_equal(_px(ours), _px(theirs))
    with pytest.raises(UserError, match=r"--hires_scale=1.0 must be above 1"):
        generate(pipe, PROMPT, 0, hires_scale=1.0, **STEPS)
    with pytest.raises(UserError, match=r"--hires_strength=0.1 must be in \(0, 1\] and leave at least one"):
        generate(pipe, PROMPT, 0, hires_scale=1.5, hires_strength=0.1, **STEPS)


def test_inpainting_redraws_only_under_the_mask_as_diffusers_does(tiny_model_dir, lora_run, tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image as PILImage

    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    start = _picture(0, 32, 32)
    mask = PILImage.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # the left half is redrawn
    ours = generate(pipe, PROMPT, 0, init_image=start, mask_image=mask, height=32, width=32, **STEPS)[0]
    assert ours.metadata()["strength"] == "0.99" and ours.metadata()["mask_image"] == "in-memory image"
    got, before = _px(ours), _px(start)
    assert np.array_equal(got[:, 16:], before[:, 16:])  # the unmasked half, pixel for pixel
    assert not np.array_equal(got[:, :16], before[:, :16])
    painter = StableDiffusionXLInpaintPipeline(**pipe.components)
    theirs = painter(PROMPT, image=start, mask_image=mask, strength=0.99, num_inference_steps=4, height=32, width=32,
                     guidance_scale=5.0,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(got, _px(painter.image_processor.apply_overlay(mask, start, theirs)))
    with pytest.raises(UserError, match="--mask_image marks what to redraw in --init_image"):
        generate(pipe, PROMPT, 0, mask_image=mask, **STEPS)
