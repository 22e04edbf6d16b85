"""generate with an SDXL ControlNet (--controlnet, --control_image, --canny): the images follow a control image, the
LoRA's subject in them, through diffusers' StableDiffusionXLControlNetPipeline on the same models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from billiard_lora.errors import UserError
from billiard_lora.generate import generate, load_generation_pipeline
from test_generate import PROMPT, REPO, _px, _train

KW = dict(num_inference_steps=3, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    from billiard_lora.tiny import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("controlnet") / "tiny-controlnet")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("controlled") / "run")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two photos-like pictures (smooth shapes: Canny finds edges in them), 48x40."""
    folder = tmp_path_factory.mktemp("control")
    out = []
    for i, (x, y) in enumerate([(10, 8), (26, 20)]):
        a = np.full((40, 48, 3), 30, np.uint8)
        a[y:y + 14, x:x + 16] = (200, 180, 40)
        Image.fromarray(a).save(folder / f"table_{i}.png")
        out.append(folder / f"table_{i}.png")
    return out


def _pipe(model_dir, controlnet_dir=None, loras=(), **kw):
    return load_generation_pipeline(str(model_dir), vae=None, loras=loras, device="cpu",
                                    controlnet=str(controlnet_dir) if controlnet_dir else None, **kw)


def test_the_images_follow_the_control_image_as_diffusers_controlnet_pipeline_makes_them(tiny_model_dir, controlnet_dir,
                                                                                         lora_run, pictures):
    from diffusers import StableDiffusionXLControlNetPipeline

    from billiard_lora.generate import fit_init_image

    pipe = _pipe(tiny_model_dir, controlnet_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, control_image=pictures[0], controlnet_scale=0.7, **KW)[0]
    reference = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=pipe.billiard_controlnet)
    control = fit_init_image(pipe, pictures[0], 32, 32)
    theirs = reference(PROMPT, image=control, controlnet_conditioning_scale=0.7, num_inference_steps=3, height=32,
                       width=32, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(ours), _px(theirs))
    meta = ours.metadata()
    assert (meta["controlnet"], meta["control_image"], meta["controlnet_scale"], meta["strength"]) == \
        (str(controlnet_dir), "table_0.png", "0.7", "")
    other = generate(pipe, PROMPT, 0, control_image=pictures[1], controlnet_scale=0.7, **KW)[0]
    assert np.abs(_px(ours) - _px(other)).max() > 2  # another control image, another image
    no_lora = generate(pipe, PROMPT, 0, control_image=pictures[0], controlnet_scale=0.7, lora_scale=0.0, **KW)[0]
    assert np.abs(_px(ours) - _px(no_lora)).max() > 2  # the LoRA still shapes it
    # at scale 0 the ControlNet adds nothing: the images of the pipeline without it
    off = generate(pipe, PROMPT, 0, control_image=pictures[0], controlnet_scale=0.0, **KW)[0]
    plain = generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), PROMPT, 0, **KW)[0]
    assert np.abs(_px(off) - _px(plain)).max() <= 1
    # --control_end: diffusers' control_guidance_end (the ControlNet steers the first share of the steps)
    early = generate(pipe, PROMPT, 0, control_image=pictures[0], controlnet_scale=0.7, control_end=0.5, **KW)[0]
    direct = reference(PROMPT, image=control, controlnet_conditioning_scale=0.7, control_guidance_end=0.5,
                       num_inference_steps=3, height=32, width=32,
                       generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(early), _px(direct)) and not np.array_equal(_px(early), _px(ours))
    assert early.metadata()["control_end"] == "0.5"


def test_with_init_image_and_mask_it_is_diffusers_controlnet_image_to_image_and_inpainting(tiny_model_dir, controlnet_dir, lora_run, pictures):
    """--init_image with --control_image: the picture noised by --strength, the control image steering, as diffusers'
    StableDiffusionXLControlNetImg2ImgPipeline makes it on the same models; with --mask_image, its inpainting one."""
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    from billiard_lora.generate import fit_init_image

    pipe = _pipe(tiny_model_dir, controlnet_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, control_image=pictures[0], init_image=pictures[1], strength=0.7,
                    controlnet_scale=0.8, **KW)[0]
    reference = StableDiffusionXLControlNetImg2ImgPipeline(**pipe.components, controlnet=pipe.billiard_controlnet)
    theirs = reference(PROMPT, image=fit_init_image(pipe, pictures[1], 32, 32),
                       control_image=fit_init_image(pipe, pictures[0], 32, 32), strength=0.7,
                       controlnet_conditioning_scale=0.8, num_inference_steps=3, height=32, width=32,
                       generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(ours), _px(theirs))
    meta = ours.metadata()
    assert (meta["init_image"], meta["strength"], meta["control_image"]) == ("table_1.png", "0.7", "table_0.png")
    plain = generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), PROMPT, 0, init_image=pictures[1], strength=0.7,
                     **KW)[0]
    assert np.abs(_px(ours) - _px(plain)).max() > 2  # the control image steers it
    # with --mask_image: diffusers' ControlNet inpainting pipeline, the unmasked pixels pasted back as they were
    from diffusers import StableDiffusionXLControlNetInpaintPipeline

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    painted = generate(pipe, PROMPT, 0, control_image=pictures[0], init_image=pictures[1], mask_image=mask,
                       strength=0.9, controlnet_scale=0.8, **KW)[0]
    inpainter = StableDiffusionXLControlNetInpaintPipeline(**pipe.components, controlnet=pipe.billiard_controlnet)
    start = fit_init_image(pipe, pictures[1], 32, 32)
    direct = inpainter(PROMPT, image=start, mask_image=mask, control_image=fit_init_image(pipe, pictures[0], 32, 32),
                       strength=0.9, controlnet_conditioning_scale=0.8, num_inference_steps=3, height=32, width=32,
                       generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(painted), _px(inpainter.image_processor.apply_overlay(mask, start, direct)))
    assert np.array_equal(_px(painted)[:8], _px(start)[:8])  # outside the mask: the picture itself


def test_canny_makes_edges_of_a_photo_as_diffusers_docs_do(tiny_model_dir, controlnet_dir, pictures):
    import cv2

    from billiard_lora.generate import canny_edges, fit_init_image

    pipe = _pipe(tiny_model_dir, controlnet_dir)
    fitted = fit_init_image(pipe, pictures[0], 32, 32)
    edges = canny_edges(fitted)
    want = cv2.Canny(np.asarray(fitted), 100, 200)
    assert edges.mode == "RGB" and edges.size == fitted.size and want.any()
    assert all(np.array_equal(np.asarray(edges)[..., c], want) for c in range(3))
    with_canny = generate(pipe, PROMPT, 0, control_image=pictures[0], canny=True, **KW)[0]
    edges_given = generate(pipe, PROMPT, 0, control_image=edges, **KW)[0]
    assert np.array_equal(_px(with_canny), _px(edges_given)) and with_canny.metadata()["canny"] == "True"
    assert np.abs(_px(with_canny) - _px(generate(pipe, PROMPT, 0, control_image=pictures[0], **KW)[0])).max() > 2


def test_several_controlnets_each_follow_their_own_image_as_diffusers_multi_controlnet(tiny_model_dir, controlnet_dir,
                                                                                      pictures, tmp_path, capsys):
    """--controlnet twice (Multi-ControlNet, e.g. canny and depth): one control image and scale each, in order; the
    images diffusers' pipeline makes with the list of ControlNets; a ControlNet at scale 0 adds nothing, so the
    other one's order is checked; counts that do not match are one line, before any model loads."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from billiard_lora.generate import fit_init_image, main
    from billiard_lora.tiny import save_tiny_controlnet

    second = save_tiny_controlnet(tmp_path / "second-controlnet", seed=1)
    pipe = load_generation_pipeline(str(tiny_model_dir), vae=None, device="cpu",
                                    controlnet=[str(controlnet_dir), str(second)])
    ours = generate(pipe, PROMPT, 0, control_image=pictures, controlnet_scale=[0.7, 0.4], **KW)[0]
    reference = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=pipe.billiard_controlnet)
    controls = [fit_init_image(pipe, p, 32, 32) for p in pictures]
    theirs = reference(PROMPT, image=controls, controlnet_conditioning_scale=[0.7, 0.4], num_inference_steps=3,
                       height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pil").images[0]
    assert np.array_equal(_px(ours.image), _px(theirs))
    meta = ours.metadata()
    assert (meta["controlnet"], meta["control_image"], meta["controlnet_scale"]) == \
        (f"{controlnet_dir}, {second}", "table_0.png, table_1.png", "0.7, 0.4")
    # one scale: for each of them
    both = generate(pipe, PROMPT, 0, control_image=pictures, controlnet_scale=0.4, **KW)[0]
    assert np.array_equal(_px(both.image), _px(generate(pipe, PROMPT, 0, control_image=pictures,
                                                         controlnet_scale=[0.4, 0.4], **KW)[0].image))
    # the second at 0: the first alone, with its own image
    alone = generate(_pipe(tiny_model_dir, controlnet_dir), PROMPT, 0, control_image=pictures[0],
                     controlnet_scale=0.7, **KW)[0]
    first_only = generate(pipe, PROMPT, 0, control_image=pictures, controlnet_scale=[0.7, 0.0], **KW)[0]
    np.testing.assert_allclose(_px(first_only.image), _px(alone.image), atol=1)
    assert not np.array_equal(_px(first_only.image), _px(ours.image))
    with pytest.raises(UserError, match=r"--control_image given 1 time\(s\) for 2 --controlnet: give one for each"):
        generate(pipe, PROMPT, 0, control_image=pictures[0], **KW)
    with pytest.raises(UserError, match="--controlnet_scale given 3 times for 2 --controlnet"):
        generate(pipe, PROMPT, 0, control_image=pictures, controlnet_scale=[0.5, 0.5, 0.5], **KW)
    assert main(["--model", str(tiny_model_dir), "--prompt", PROMPT, "--controlnet", str(controlnet_dir),
                 "--controlnet", str(second), "--control_image", str(pictures[0]), "--out",
                 str(tmp_path / "g")]) == 2  # (refused before any model loads)
    assert "--control_image given 1 time(s) for 2 --controlnet" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "--vae", "none", "--device", "cpu", "--prompt", PROMPT, "--steps",
                 "2", "--height", "32", "--width", "32", "--controlnet", str(controlnet_dir), "--controlnet",
                 str(second), "--control_image", str(pictures[0]), "--control_image", str(pictures[1]),
                 "--controlnet_scale", "0.6", "--out", str(tmp_path / "cli")]) == 0
    (png,) = (tmp_path / "cli").glob("*.png")
    text = Image.open(png).text
    assert (text["control_image"], text["controlnet_scale"]) == ("table_0.png, table_1.png", "0.6, 0.6")


def test_controlnet_settings_no_run_can_use_are_one_line(tiny_model_dir, controlnet_dir, pictures, tmp_path):
    pipe = _pipe(tiny_model_dir, controlnet_dir)
    with pytest.raises(UserError, match="--controlnet needs --control_image FILE"):
        generate(pipe, PROMPT, 0, **KW)
    with pytest.raises(UserError, match=r"--control_end=0.0 must be in \(0, 1\]"):
        generate(pipe, PROMPT, 0, control_image=pictures[0], control_end=0.0, **KW)
    with pytest.raises(UserError, match=r"--controlnet_scale=3.0 must be in \[0, 2\]"):
        generate(pipe, PROMPT, 0, control_image=pictures[0], controlnet_scale=3.0, **KW)
    with pytest.raises(UserError, match="--guidance_rescale does not combine with --controlnet"):
        generate(pipe, PROMPT, 0, control_image=pictures[0], guidance_rescale=0.7, **KW)
    bare = _pipe(tiny_model_dir)
    with pytest.raises(UserError, match="--control_image steers a ControlNet: add --controlnet MODEL"):
        generate(bare, PROMPT, 0, control_image=pictures[0], **KW)
    with pytest.raises(UserError, match="--canny turns --control_image into edges"):
        generate(bare, PROMPT, 0, canny=True, **KW)
    with pytest.raises(UserError, match="--controlnet does not combine with --cpu_offload"):
        _pipe(tiny_model_dir, controlnet_dir, cpu_offload=True)
    with pytest.raises(UserError, match="could not load SDXL ControlNet .*no such folder"):
        _pipe(tiny_model_dir, tmp_path / "nowhere")
    sd15 = tmp_path / "sd15-controlnet"  # an SD 1.5 ControlNet's layout: cross-attention 768 wide, no text_time
    sd15.mkdir()
    config = json.loads((controlnet_dir / "config.json").read_text())
    config.update(cross_attention_dim=768, addition_embed_type=None)
    (sd15 / "config.json").write_text(json.dumps(config))
    from diffusers import ControlNetModel

    ControlNetModel.from_config(config).save_pretrained(sd15)
    with pytest.raises(UserError, match="is not an SDXL ControlNet"):
        _pipe(tiny_model_dir, sd15)


def test_in_fp16_the_fp16_files_are_read_where_a_repo_has_them(controlnet_dir, tmp_path):
    """diffusers/controlnet-canny-sdxl-1.0 keeps a 2.5 GB fp16 copy beside its 5 GB fp32 files: in fp16 that one is
    read (here a folder holding only the fp16 files loads), and a folder without them still loads."""
    from diffusers import ControlNetModel

    from billiard_lora.models import load_controlnet

    ControlNetModel.from_pretrained(controlnet_dir).save_pretrained(tmp_path / "fp16-only", variant="fp16")
    assert not (tmp_path / "fp16-only" / "diffusion_pytorch_model.safetensors").exists()
    assert load_controlnet(str(tmp_path / "fp16-only"), torch_dtype=torch.float16).dtype == torch.float16
    assert load_controlnet(str(controlnet_dir), torch_dtype=torch.float16).dtype == torch.float16


def test_cli_controlnet_with_canny_and_the_tiny_writer(tiny_model_dir, pictures, tmp_path, capsys):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"}
    from billiard_lora.tiny import main as tiny_main

    assert tiny_main([str(tmp_path / "cn"), "--controlnet"]) == 0 and "ControlNet" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--device", "cpu", "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "40",
                        "--controlnet", str(tmp_path / "cn"),
                        "--control_image", str(pictures[1]), "--canny", "--controlnet_scale", "0.8", "--out",
                        str(tmp_path / "gen")], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "gen").glob("*.png")
    text = Image.open(png).text
    assert (text["control_image"], text["canny"], text["controlnet_scale"]) == ("table_1.png", "True", "0.8")
    assert Image.open(png).size == (40, 32)  # the control image fitted to --width x --height
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae", "none",
                        "--prompt", PROMPT, "--control_image", str(pictures[0]), "--out", str(tmp_path / "g2")],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and "--control_image steers a ControlNet: add --controlnet MODEL" in r.stderr
    from billiard_lora.generate import main

    assert main(["--model", str(tiny_model_dir), "--prompt", PROMPT, "--controlnet_scale", "0.9", "--out",
                 str(tmp_path / "g3")]) == 2  # (refused before any model loads)
    assert "--controlnet_scale and --control_end set how the images follow a ControlNet" in capsys.readouterr().err
