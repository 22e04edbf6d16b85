"""The latent cache on disk (--cache_latents_to_disk): reused across runs, never a source of wrong numbers."""

from __future__ import annotations

import errno

import pytest
import torch
from PIL import Image

from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
from billiard_lora.train import train
from test_train import lora_tensors, make_images, tiny_config


def _encodes(monkeypatch) -> list:
    from diffusers import AutoencoderKL

    calls, real = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_a_second_run_reads_every_view_from_disk_and_trains_the_same_lora(tiny_model_dir, tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=4, random_flip=True, train_batch_size=2)
    disk = dict(kw, cache_latents_to_disk=True, latent_cache_dir=str(tmp_path / "latents"))
    encodes = _encodes(monkeypatch)
    memory_only = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "memory", **kw)))
    first_encodes = len(encodes)
    first = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "first", **disk)))
    files = list((tmp_path / "latents").glob("*/*.safetensors"))
    assert len(files) == first_encodes == len(encodes) - first_encodes, "one file per distinct view encoded"
    encodes.clear()
    second = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "second", **disk)))
    assert encodes == [], "every view was on disk: the VAE must not encode"
    in_worker = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "worker", dataloader_num_workers=1,
                                               **disk)))
    assert encodes == []
    for other in (first, second, in_worker):
        assert other.keys() == memory_only.keys() and all(torch.equal(memory_only[k], other[k]) for k in other)


def test_an_unreadable_file_is_encoded_again(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = make_images(tmp_path / "data", n=2)
    disk = dict(max_train_steps=2, cache_latents_to_disk=True, latent_cache_dir=str(tmp_path / "latents"))
    first = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "first", **disk)))
    files = sorted((tmp_path / "latents").glob("*/*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated, as a crash or a full disk leaves a file
    encodes = _encodes(monkeypatch)
    again = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "again", **disk)))
    assert len(encodes) == 1 and "is unreadable" in capsys.readouterr().out
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert files[0].stat().st_size > 40, "the broken file is written anew"


def test_a_failing_disk_stops_disk_caching_not_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, *a, **k):  # the latent folder's disk is full; the output folder's is not
        if "latents" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    data = make_images(tmp_path / "data", n=2)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=2, cache_latents_to_disk=True,
                            latent_cache_dir=str(tmp_path / "latents")))
    said = capsys.readouterr().out
    assert said.count("cannot write the latent cache") == 1 and "No space left on device" in said
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "latents").glob("*/*")), "no temporary file is left behind"


def test_the_folder_depends_on_the_vae_encoder_and_its_dtype(tiny_components, tmp_path):
    from billiard_lora.caches import LatentStore, vae_fingerprint

    vae = tiny_components.vae
    before = vae_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)
    assert vae_fingerprint(vae) == before, "the decoder plays no part in encoding"
    with torch.no_grad():
        vae.encoder.conv_in.weight.view(-1)[-1] += 1e-3
    changed = vae_fingerprint(vae)
    assert changed != before
    assert vae_fingerprint(vae.to(torch.float16)) not in (before, changed)
    store = LatentStore(tmp_path, vae)
    assert store.folder == tmp_path / vae_fingerprint(vae)
    mean = torch.randn(4, 4, 4)
    store.save("img:32:0,0:0:lanczos", mean, mean.abs())
    assert torch.equal(store.load("img:32:0,0:0:lanczos")[0], mean)
    assert store.load("img:32:0,0:1:lanczos") is None


def test_disk_cache_settings_are_checked_first(tmp_path):
    with pytest.raises(UserError, match="--cache_latents_to_disk .* drop --cache_latents=false"):
        TrainConfig(instance_prompt="x", cache_latents=False, cache_latents_to_disk=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path, make_images(tmp_path / "data", n=1), tmp_path / "out", cache_latents_to_disk=True,
                      latent_cache_dir=str(blocker))
    with pytest.raises(UserError, match="--latent_cache_dir=.*a_file is a file; pass a folder"):
        train(cfg)
    assert not (tmp_path / "out").exists(), "nothing is written before the settings are checked"


def test_with_center_crop_and_flips_each_view_brings_its_mirror_image(tiny_model_dir, tmp_path, monkeypatch):
    """--random_flip with one centred crop: encoding a view also encodes its mirror image, the image's other view."""
    from billiard_lora.data import render_view

    square = Image.new("RGB", (40, 40))
    square.paste((200, 30, 30), (0, 0, 10, 40))  # not symmetric: a mirrored view differs
    square.paste((20, 20, 220), (13, 7, 40, 12))
    plain = render_view(square, 32, (32, 32), (0, 0), flip=False)
    assert torch.equal(render_view(square, 32, (32, 32), (0, 0), flip=True), torch.flip(plain, dims=[-1]))

    data = make_images(tmp_path / "data", n=3)  # 48x48 twice (centred crops), 56x48 once (resized to 37 wide: not)
    kw = dict(center_crop=True, random_flip=True, train_batch_size=1, max_train_steps=3)  # one pass over the images
    encodes = _encodes(monkeypatch)
    train(tiny_config(tiny_model_dir, data, tmp_path / "one_pass", cache_latents_to_disk=True,
                      latent_cache_dir=str(tmp_path / "latents"), **kw))
    assert len(encodes) == 2 * 2 + 1, "both views of each centred image, the drawn view of the other"
    assert len(list((tmp_path / "latents").glob("*/*.safetensors"))) == 5
    kw["max_train_steps"] = 9  # later passes draw the mirrored views: their latents must be the rendered ones'
    twinned = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "twinned", **kw)))
    rendered = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "rendered", cache_latents=False, **kw)))
    assert all(torch.equal(twinned[k], rendered[k]) for k in twinned)
