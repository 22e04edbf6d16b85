"""Single-file SDXL checkpoints (civitai's, A1111's): read through diffusers' converters, written by ours."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from billiard_lora.errors import UserError
from billiard_lora.train import train
from test_train import REPO, make_images, sample, tiny_config


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(a tiny SDXL folder, the same model as one single-file checkpoint): what `tiny --single_file` writes."""
    from billiard_lora.tiny import save_tiny_pipeline, save_tiny_single_file

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("sf") / "tiny", seed=0, shape="tiny-single-file")
    return folder, save_tiny_single_file(folder)


def test_a_written_checkpoint_has_the_original_layout_and_reads_back_bit_for_bit(single_file):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.single_file import load_single_file_pipeline

    folder, file = single_file
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.out.2.weight",
            "model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding"} <= keys
    assert in_proj.shape == (3 * 48, 48) and q.ndim == 4  # q, k, v as one; the VAE's attention as 1x1 convolutions
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    ours = StableDiffusionXLPipeline.from_pretrained(str(folder))
    back = load_single_file_pipeline(file, config=str(folder))  # diffusers' from_single_file
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"


def test_training_on_a_single_file_is_training_on_its_folder(single_file, tmp_path):
    """The same LoRA bit for bit; generate, without --model, takes the checkpoint and its layout from the run."""
    from billiard_lora.generate import main as generate_main

    folder, file = single_file
    data = make_images(tmp_path / "data")
    a = train(tiny_config(folder, data, tmp_path / "folder", max_train_steps=2))
    b = train(tiny_config(file, data, tmp_path / "file", max_train_steps=2, single_file_config=str(folder)))
    sa = safe_open(str(a / "pytorch_lora_weights.safetensors"), framework="pt")
    sb = safe_open(str(b / "pytorch_lora_weights.safetensors"), framework="pt")
    assert set(sa.keys()) == set(sb.keys()) and all(torch.equal(sa.get_tensor(k), sb.get_tensor(k)) for k in sa.keys())
    saved = json.loads((b / "config.json").read_text())
    assert saved["pretrained_model_name_or_path"] == str(file) and saved["single_file_config"] == str(folder)
    card = (b / "README.md").read_text()
    assert f'StableDiffusionXLPipeline.from_single_file("{file}", config="{folder}", ' in card
    for run in (a, b):
        generate_main(["--lora", str(run), "--prompt", "a photo of sks billiard", "--seeds", "0", "--steps", "2",
                       "--height", "32", "--width", "32", "--vae", "none", "--out", str(run / "gen")])
    images = [np.asarray(Image.open(next((r / "gen").glob("*.png")))) for r in (a, b)]
    np.testing.assert_array_equal(images[0], images[1])


def test_merge_writes_a_single_file_checkpoint_with_the_lora_fused_in(single_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import billiard_lora.lora_tools as lt
    from billiard_lora.generate import LoraSpec, load_lora
    from billiard_lora.single_file import load_single_file_pipeline

    folder, file = single_file
    run = train(tiny_config(file, make_images(tmp_path / "data"), tmp_path / "run", max_train_steps=2,
                            learning_rate=1e-2, single_file_config=str(folder)))
    merged = lt.merge_lora(run, str(file), tmp_path / "merged.safetensors", single_file_config=str(folder))
    assert merged.is_file() and merged.suffix == ".safetensors"
    with_lora = StableDiffusionXLPipeline.from_pretrained(str(folder))
    base = sample(with_lora)
    load_lora(with_lora, LoraSpec(str(run)))
    want = sample(with_lora)
    assert np.abs(want - base).max() > 1e-4
    np.testing.assert_allclose(sample(load_single_file_pipeline(merged, config=str(folder))), want, atol=1e-4)
    with pytest.raises(UserError, match="is a file an earlier merge wrote: --overwrite replaces it"):
        lt.merge_lora(run, str(file), merged, single_file_config=str(folder))
    again = lt.merge_lora(run, str(file), merged, single_file_config=str(folder), overwrite=True, scale=0.0)
    np.testing.assert_allclose(sample(load_single_file_pipeline(again, config=str(folder))), base, atol=1e-5)
    lora_file = run / "pytorch_lora_weights.safetensors"  # never replaced, --overwrite or not
    with pytest.raises(UserError, match="is a file that no earlier merge wrote"):
        lt.merge_lora(run, str(file), lora_file, single_file_config=str(folder), overwrite=True)


def test_single_file_mistakes_are_one_line(single_file, tmp_path):
    from billiard_lora.config import TrainConfig
    from billiard_lora.models import load_components

    folder, file = single_file
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(UserError, match="model.ckpt is a pickled checkpoint, which can run code when loaded"):
        TrainConfig(pretrained_model_name_or_path=str(tmp_path / "model.ckpt"), instance_prompt="x")
    with pytest.raises(UserError, match="--single_file_config describes a single-file checkpoint, and "):
        TrainConfig(pretrained_model_name_or_path=str(folder), single_file_config=str(folder), instance_prompt="x")
    with pytest.raises(UserError, match="needs SDXL's layout .* HF_HUB_OFFLINE forbids fetching: run once online, or "
                                        "pass --single_file_config"):
        load_components(str(file))  # the tests run offline: without a layout folder there is none to fetch
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UserError, match="could not read .*junk.safetensors as a single-file SDXL checkpoint"):
        load_components(str(tmp_path / "junk.safetensors"), single_file_config=str(folder))
    r = subprocess.run([sys.executable, "-m", "billiard_lora.train", "--pretrained_model_name_or_path",
                        str(tmp_path / "model.ckpt"), "--instance_prompt", "x"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "pickled checkpoint" in r.stderr.splitlines()[-1]


def test_tiny_writes_a_single_file_checkpoint_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "billiard_lora.tiny", str(tmp_path / "t"), "--single_file"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "t" / "tiny-sdxl.safetensors").is_file() and "--single_file_config" in r.stdout


def test_sdxls_full_layout_maps_to_names_diffusers_reads_back(monkeypatch):
    """SDXL base 1.0's real architecture (built on the meta device: names and shapes, no memory): diffusers'
    converters take every name our writer gives back to the module it came from, with its shape."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                      convert_open_clip_checkpoint)

    from billiard_lora.single_file import (CLIP_G_PREFIX, clip_g_to_single_file, unet_to_single_file,
                                           vae_to_single_file)
    from billiard_lora.tiny import FULL, build_components

    c = build_components(FULL, device="meta")
    for model, written, convert in (
            (c["unet"], unet_to_single_file(c["unet"]), lambda ck: convert_ldm_unet_checkpoint(ck, c["unet"].config)),
            (c["vae"], vae_to_single_file(c["vae"]), lambda ck: convert_ldm_vae_checkpoint(ck, c["vae"].config)),
            (c["text_encoder_2"], clip_g_to_single_file(c["text_encoder_2"]),
             lambda ck: convert_open_clip_checkpoint(c["text_encoder_2"], ck, prefix=CLIP_G_PREFIX))):
        want = model.state_dict()
        back = convert(written)
        assert set(back) == set(want), sorted(set(back) ^ set(want))[:5]
        assert all(back[k].shape == want[k].shape for k in want)
