"""Behaviour of the trainer on the tiny SDXL pipeline (CPU, seconds per test)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
import billiard_lora.train as train_mod
from billiard_lora.train import list_checkpoints, train

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int = 6, size: int = 48, captions: dict[int, str] | None = None) -> Path:
    """n small, distinct RGB images (random noise blobs), optionally with a metadata.jsonl caption table."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size + 8 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
    if captions is not None:
        with open(folder / "metadata.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"file_name": f"img_{i}.png", "prompt": captions.get(i, f"caption {i}")}) + "\n")
    return folder


def tiny_config(model_dir: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(data), output_dir=str(out),
                instance_prompt="a photo of sks billiard", resolution=32, train_batch_size=2, max_train_steps=3,
                checkpointing_steps=1000, seed=0, report_to="none", learning_rate=1e-3, lr_warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def sample(pipe, prompt="a photo of sks billiard", seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images[0]


def test_only_lora_weights_change_and_loss_is_finite(tiny_model_dir, tiny_components, tmp_path):
    c = tiny_components
    before = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in [("unet", c.unet), ("vae", c.vae), ("te1", c.text_encoder_one), ("te2", c.text_encoder_two)]}
    losses = []
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out")
    train(cfg, components=c, callback=lambda e: e["event"] == "step" and losses.append(e["loss"]))
    assert len(losses) == 3 and all(np.isfinite(losses))

    changed_lora = 0
    for name, m in [("unet", c.unet), ("vae", c.vae), ("te1", c.text_encoder_one), ("te2", c.text_encoder_two)]:
        for k, v in m.state_dict().items():
            if "lora_" in k:
                assert name == "unet", f"a LoRA appeared on {name} without --train_text_encoder"
                changed_lora += int(not torch.equal(v, before[name].get(k, v)))
            else:
                base_key = k.replace(".base_layer", "")
                assert torch.equal(v, before[name][base_key]), f"{name}.{k} changed: only LoRA weights may"
    lora_b = [v for k, v in c.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"


def _probe_loss(c, pixels: torch.Tensor, prompt: str, n: int = 24) -> float:
    """Denoising loss on a fixed set of (noise, timestep) draws: the same probe before and after training."""
    from billiard_lora.conditioning import batch_time_ids, encode_prompt

    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = c.vae.encode(pixels[None]).latent_dist.mean * c.vae.config.scaling_factor
        latents = latents.repeat(n, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        embeds, pooled = encode_prompt(c.text_encoders, c.tokenizers, [prompt] * n)
        ids = batch_time_ids([(32, 32)] * n, [(0, 0)] * n, 32)
        pred = c.unet(c.noise_scheduler.add_noise(latents, noise, t), t, embeds,
                      added_cond_kwargs={"time_ids": ids, "text_embeds": pooled}).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_overfitting_one_image_lowers_the_loss(tiny_model_dir, tiny_components, tmp_path):
    from billiard_lora.data import load_image, prepare_image

    data = make_images(tmp_path / "data", n=1, size=32)
    pixels = prepare_image(load_image(data / "img_0.png"), 32, center_crop=True, flip=False)[0]
    before = _probe_loss(tiny_components, pixels, "a photo of sks billiard")
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", train_batch_size=4, repeats=4, max_train_steps=80,
                      learning_rate=1e-2, rank=8, center_crop=True)
    train(cfg, components=tiny_components)
    after = _probe_loss(tiny_components, pixels, "a photo of sks billiard")
    # A random-weight UNet cannot become a good denoiser through attention LoRA alone (the floor is about 1.0,
    # predicting zero); what must hold is a clear, deterministic drop on the image it trained on.
    assert after < 0.95 * before, f"denoising loss on the training image did not fall: {before:.3f} -> {after:.3f}"


def test_saved_lora_reloads_to_the_same_images(tiny_model_dir, tiny_components, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.models import pipeline_from_components

    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", learning_rate=1e-2),
                components=tiny_components)
    trained = sample(pipeline_from_components(tiny_components))

    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = sample(fresh)
    fresh.load_lora_weights(str(out))
    reloaded = sample(fresh)
    assert np.abs(trained - base).max() > 1e-4, "the LoRA should change the output"
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


def test_lora_layers_adapt_the_feed_forward_and_projections_too_and_reload_in_both_formats(tiny_model_dir,
                                                                                          tiny_components, tmp_path):
    """--lora_layers attn,ff,proj (kohya's set): those layers train, the diffusers file and the kohya file reload
    to the trained model's images; a name that adapts nothing is one line."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.models import pipeline_from_components

    data = make_images(tmp_path / "data")
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-2, lora_layers="attn,ff,proj",
                            output_kohya_format=True), components=tiny_components)
    keys = lora_tensors(out)
    for leaf in ("to_q", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"):
        assert any(f".{leaf}.lora" in k for k in keys), leaf
    trained = sample(pipeline_from_components(tiny_components))
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
        fresh.load_lora_weights(str(out), weight_name=weight_name)
        np.testing.assert_allclose(sample(fresh), trained, atol=1e-5, err_msg=weight_name)
    from billiard_lora.generate import generate, load_generation_pipeline
    from billiard_lora.lora_tools import inspect_lora

    ours = load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(out)], device="cpu")  # all layers load
    image = generate(ours, "a photo of sks billiard", 0, num_inference_steps=2, height=32, width=32, progress=False)
    assert np.abs(np.asarray(image[0].image, dtype=np.int16) - np.round(trained * 255).astype(np.int16)).max() <= 1
    # the kohya file converted back, and a PiSSA run, come out in the same naming and load whole
    import billiard_lora.lora_tools as lt

    back = lt.convert_lora(out / "pytorch_lora_weights_kohya.safetensors", "diffusers", tmp_path / "back.safetensors")
    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    fresh.load_lora_weights(str(back.parent), weight_name=back.name)
    np.testing.assert_allclose(sample(fresh), trained, atol=1e-5)
    pissa = train(tiny_config(tiny_model_dir, data, tmp_path / "pissa", lora_layers="attn,ff", max_train_steps=1,
                              init_lora_weights="pissa_niter_2"))
    assert {".lora_A." in k or ".lora_B." in k for k in lora_tensors(pissa)} == {True}  # one naming throughout
    load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(pissa)], device="cpu")  # (refuses a partial)
    assert inspect_lora(out)["target_modules"]["unet"] == sorted(
        ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"])
    attn_only = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "attn", max_train_steps=1)))
    assert not any(".ff." in k or ".proj_in." in k for k in attn_only)  # the default: diffusers' layers alone

    with pytest.raises(UserError, match=r"--lora_layers=attn,conv9: conv9 names no layer of this UNet"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "bad", lora_layers="attn,conv9"))
    with pytest.raises(UserError, match=r"--lora_layers=nothing: no layer of this UNet has those names"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "bad2", lora_layers="nothing"))
    # --init_lora takes the file's layers, as it takes its rank; other layers asked for are refused
    again = train(tiny_config(tiny_model_dir, data, tmp_path / "again", init_lora=str(out), max_train_steps=1))
    assert json.loads((again / "config.json").read_text())["lora_layers"] == \
        "to_k,to_q,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out"
    with pytest.raises(UserError, match=r"adapts the UNet's to_k,.*proj_out, --lora_layers=attn,ff others"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "other", init_lora=str(out), lora_layers="attn,ff"))


def test_conv_lora_layers_train_save_and_reload_for_diffusers_and_the_webuis(tiny_model_dir, tiny_components,
                                                                              tmp_path):
    """--lora_layers attn,conv (kohya's LoCon): the ResNet and sampler convolutions get a LoRA too; both files reload
    to the trained images, the kohya file's keys are what ComfyUI and A1111 read; an SVD-based init, which peft
    has only for Linear layers, is one line; with the UNet stored in float8 the convolutions train too."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.lora_tools import inspect_lora
    from billiard_lora.models import pipeline_from_components

    data = make_images(tmp_path / "data")
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-2, lora_layers="attn,conv",
                            output_kohya_format=True), components=tiny_components)
    report = inspect_lora(out / "pytorch_lora_weights_kohya.safetensors")
    assert report["conv_layers"] > 0 and {"conv1", "conv2", "downsamplers.0.conv"} <= set(
        report["target_modules"]["unet"])
    assert report["loads_in"]["comfyui_not_loaded"] == report["loads_in"]["a1111_not_loaded"] == 0
    trained = sample(pipeline_from_components(tiny_components))
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
        fresh.load_lora_weights(str(out), weight_name=weight_name)
        np.testing.assert_allclose(sample(fresh), trained, atol=1e-5, err_msg=weight_name)
    with pytest.raises(UserError, match=r"--lora_layers=attn,conv with --init_lora_weights=pissa_niter_2: .*"
                                        r"SVD-based inits are for the Linear layers"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "pissa", lora_layers="attn,conv",
                          init_lora_weights="pissa_niter_2"))
    # --init_lora takes a LoCon file's layers too
    again = train(tiny_config(tiny_model_dir, data, tmp_path / "again", init_lora=str(out), max_train_steps=1))
    assert set(json.loads((again / "config.json").read_text())["lora_layers"].split(",")) == {
        "to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"}
    fp8 = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "fp8", lora_layers="conv", fp8_base=True,
                                         max_train_steps=2, learning_rate=1e-2)))
    assert any(".conv1." in k and v.abs().sum() > 0 for k, v in fp8.items() if "up" in k or "lora_B" in k)


def test_conv_rank_and_alpha_give_the_convolutions_their_own_and_reload_everywhere(tiny_model_dir, tiny_components,
                                                                                   tmp_path):
    """--conv_rank/--conv_alpha (kohya's conv_dim/conv_alpha): the convolutions train at their own rank and alpha,
    the attention layers at --rank; both files reload to the trained images with those ranks and alphas, --init_lora
    takes them back, and a LoHa's convolutions follow them too."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.lora_tools import inspect_lora, load_lora_file
    from billiard_lora.models import pipeline_from_components

    data = make_images(tmp_path / "data")
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", learning_rate=1e-2, lora_layers="attn,conv",
                            rank=4, lora_alpha=4, conv_rank=2, conv_alpha=1, output_kohya_format=True),
                components=tiny_components)
    for layer in load_lora_file(out / "pytorch_lora_weights_kohya.safetensors").layers.values():
        conv = layer.down.ndim == 4
        assert (layer.rank, layer.alpha) == ((2, 1.0) if conv else (4, 4.0)), layer.name
    report = inspect_lora(out)
    assert set(report["ranks"]) == {"2", "4"} and report["ranks"]["2"] == report["conv_layers"] > 0
    trained = sample(pipeline_from_components(tiny_components))
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
        fresh.load_lora_weights(str(out), weight_name=weight_name)
        np.testing.assert_allclose(sample(fresh), trained, atol=1e-5, err_msg=weight_name)
    again = train(tiny_config(tiny_model_dir, data, tmp_path / "again", init_lora=str(out), max_train_steps=1))
    saved = json.loads((again / "config.json").read_text())
    assert (saved["rank"], saved["lora_alpha"], saved["conv_rank"], saved["conv_alpha"]) == (4, 4, 2, 1)
    loha = load_file(str(train(tiny_config(tiny_model_dir, data, tmp_path / "loha", lora_type="loha",
                                           lora_layers="attn,conv", conv_rank=2, max_train_steps=1))
                          / "pytorch_lora_weights.safetensors"))
    assert {v.shape[0] for k, v in loha.items() if k.endswith("conv1.hada_w1_b")} == {2}
    assert {v.shape[0] for k, v in loha.items() if k.endswith("to_q.hada_w1_b")} == {4}
    with pytest.raises(UserError, match="--conv_rank=2 sets the rank of adapted convolutions, and "
                                        "--lora_layers=attn adapts none"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "none", conv_rank=2))
    with pytest.raises(UserError, match="--conv_alpha=1 goes with --conv_rank"):
        tiny_config(tiny_model_dir, data, tmp_path / "x", conv_alpha=1)


def test_blora_and_unet_blocks_confine_the_lora_and_generate_takes_content_and_style(tiny_model_dir, tmp_path):
    """--use_blora / --lora_unet_blocks (diffusers' advanced script): only the chosen layers inside the chosen blocks
    get a LoRA (diffusers' or the original UNet's block names); generate's --lora RUN@content / @style takes only
    that block's layers, from either file format and for a LoKr too, as loading a hand-filtered file does."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import prepare_pipeline

    data = make_images(tmp_path / "data")
    content, style = "up_blocks.0.attentions.0.", "up_blocks.0.attentions.1."
    runs = {}
    for name, kw in {"a": dict(use_blora=True, output_kohya_format=True), "b": dict(use_blora=True, seed=1),
                     "ff": dict(lora_unet_blocks="unet.output_blocks.1.1", lora_layers="attn,ff"),
                     "lokr": dict(use_blora=True, lora_type="lokr")}.items():
        runs[name] = train(tiny_config(tiny_model_dir, data, tmp_path / name, learning_rate=1e-2, **kw))
    keys = lora_tensors(runs["a"])
    assert {k[len("unet."):].split("transformer_blocks")[0] for k in keys} == {content, style}
    assert len(keys) == 2 * 2 * 4 * 2 * 2  # 2 blocks x 2 attentions x 4 projections x (down, up) x 2 depth
    ff = lora_tensors(runs["ff"])
    assert all(k.startswith("unet." + style) for k in ff) and any(".ff.net.2." in k for k in ff)
    assert "lora_unet_blocks" in (runs["ff"] / "README.md").read_text()
    assert "@content" in (runs["a"] / "README.md").read_text()
    from billiard_lora.lora_tools import format_inspect, inspect_lora

    for run in (runs["a"], runs["a"] / "pytorch_lora_weights_kohya.safetensors", runs["lokr"]):
        assert "up_blocks.0.attentions.0, up_blocks.0.attentions.1  (a B-LoRA" in format_inspect(inspect_lora(run))
    lokr = load_file(str(runs["lokr"] / "pytorch_lora_weights.safetensors"))
    assert lokr and all(k.startswith(("lora_unet_up_blocks_0_attentions_0_", "lora_unet_up_blocks_0_attentions_1_"))
                        for k in lokr)

    def images(loras=(), state_dicts=(), weights=()):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
        prepare_pipeline(pipe, list(loras))
        for i, sd in enumerate(state_dicts):  # diffusers' own loader on a filtered copy: the reference
            pipe.load_lora_weights(dict(sd), adapter_name=f"ref{i}")
        if state_dicts:
            pipe.set_adapters([f"ref{i}" for i in range(len(state_dicts))], adapter_weights=list(weights))
        return sample(pipe)

    only = lambda run, block: {k: v for k, v in lora_tensors(run).items() if k.startswith("unet." + block)}  # noqa
    full, base = images([str(runs["a"])]), images()
    np.testing.assert_allclose(images([f"{runs['a']}@content", f"{runs['a']}@style"]), full, atol=1e-6)
    mixed = images([f"{runs['a']}@content", f"{runs['b']}@style:0.5"])
    np.testing.assert_allclose(mixed, images(state_dicts=[only(runs["a"], content), only(runs["b"], style)],
                                             weights=[1.0, 0.5]), atol=1e-6)
    assert np.abs(mixed - full).max() > 1e-4 and np.abs(mixed - base).max() > 1e-4
    kohya = runs["a"] / "pytorch_lora_weights_kohya.safetensors"
    np.testing.assert_allclose(images([f"{kohya}@output_blocks.0.1"]), images([f"{runs['a']}@content"]), atol=1e-6)
    assert np.abs(images([f"{runs['lokr']}@style"]) - images([str(runs["lokr"])])).max() > 1e-5
    # A1111's LoRA Block Weight: a block's weight multiplies its layers' ΔW
    np.testing.assert_allclose(images([f"{runs['a']}@content=0.5,style"]),
                               images(state_dicts=[only(runs["a"], content), only(runs["a"], style)],
                                      weights=[0.5, 1.0]), atol=1e-6)
    np.testing.assert_allclose(images([f"{runs['lokr']}@style=0.5"]), images([f"{runs['lokr']}@style:0.5"]), atol=1e-6)
    np.testing.assert_allclose(images([f"{runs['a']}@content=0,style"]), images([f"{runs['a']}@style"]), atol=1e-6)
    from billiard_lora.lora_tools import merge_lora  # lora merge takes the same @ part

    merged = merge_lora(f"{runs['a']}@content=0.5:2", str(tiny_model_dir), tmp_path / "merged")
    np.testing.assert_allclose(sample(StableDiffusionXLPipeline.from_pretrained(str(merged))),
                               images([f"{runs['a']}@content"]), atol=1e-5)
    with pytest.raises(UserError, match=r"none of its layers lies in down_blocks\.1 \(32 layers elsewhere\)"):
        images([f"{runs['a']}@down_blocks.1"])
    with pytest.raises(UserError, match="--use_blora trains the blocks"):
        tiny_config(tiny_model_dir, data, tmp_path / "x", use_blora=True, lora_unet_blocks="mid_block")
    with pytest.raises(UserError, match="--lora_unet_blocks: down_blocks.0 holds none of the UNet's to_k"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "x", lora_unet_blocks="down_blocks.0"))
    with pytest.raises(UserError, match="adapts fewer of the UNet's layers than this run trains"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "y", init_lora=str(runs["a"])))


def test_push_to_hub_makes_the_repo_before_training_and_uploads_the_run_without_checkpoints(tiny_model_dir, tmp_path,
                                                                                            monkeypatch):
    """--push_to_hub (diffusers' script): the repo is created before the first step (a missing login stops the run
    before training), the finished folder goes up in one commit without checkpoints or logs, the model card loads
    from the Hub; a failed upload is one line that says how to upload later, with the LoRA kept on disk. The Hub's
    client is replaced by recorders here (no network): what is checked is what it would be asked to do."""
    import types

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    events = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: events.append(("create", repo, kw))
                        or types.SimpleNamespace(repo_id=repo if "/" in repo else f"me/{repo}"))

    def upload_folder(**kw):
        files = [f.relative_to(kw["folder_path"]).as_posix() for f in Path(kw["folder_path"]).rglob("*") if f.is_file()]
        events.append(("upload", kw["repo_id"], sorted(filter_repo_objects(files, ignore_patterns=kw["ignore_patterns"]))))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    data = make_images(tmp_path / "data")
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "billiard-run", push_to_hub=True, hub_private_repo=True,
                            checkpointing_steps=1, output_kohya_format=True),
                callback=lambda e: e["event"] == "step" and events.append(("step",)))
    assert events[0] == ("create", "billiard-run", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert events[1] == ("step",) and events[-1][:2] == ("upload", "me/billiard-run")
    uploaded = events[-1][2]
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
            "config.json"} <= set(uploaded)
    assert list(out.glob("checkpoint-*")) and not any(f.startswith(("checkpoint-", "logs/")) for f in uploaded)
    card = (out / "README.md").read_text()
    assert 'pipe.load_lora_weights("me/billiard-run")' in card and "--lora me/billiard-run" in card
    assert json.loads((out / "config.json").read_text())["hub_model_id"] == "me/billiard-run"

    def offline(**kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    with pytest.raises(UserError, match=r"the LoRA is saved in .*again.* failed \(OSError: Network is unreachable\); "
                                        r"upload it later with: hf upload owner/x .*again"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "again", push_to_hub=True, hub_model_id="owner/x",
                          max_train_steps=1))
    assert (tmp_path / "again" / "pytorch_lora_weights.safetensors").is_file()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="--push_to_hub needs a Hugging Face login"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "nologin", push_to_hub=True))
    assert not (tmp_path / "nologin" / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(UserError, match="--hub_model_id and --hub_private_repo set the repo --push_to_hub"):
        tiny_config(tiny_model_dir, data, tmp_path / "x", hub_model_id="me/x")


def test_saved_keys_match_diffusers_naming_and_carry_the_config(tiny_model_dir, tmp_path):
    from billiard_lora.lora import read_metadata

    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", output_kohya_format=True,
                            lora_alpha=8))
    keys = list(lora_tensors(out))
    # diffusers' script: unet.<module>.lora.down.weight / lora.up.weight on to_q/to_k/to_v/to_out.0
    assert all(k.startswith("unet.") for k in keys)
    assert any(k.endswith("attn1.to_q.lora.down.weight") for k in keys)
    assert {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in keys} >= {"to_q", "to_k", "to_v", "0"}
    assert read_metadata(out / "pytorch_lora_weights.safetensors")["instance_prompt"] == "a photo of sks billiard"
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {8.0}, "kohya alpha must be the LoRA alpha, not the rank"
    for name in ("README.md", "config.json", "loss_history.csv", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert "load_lora_weights" in (out / "README.md").read_text()


class Crash(Exception):
    """A crash in the middle of training (raised from the step callback)."""


def crash_at_step(step: int):
    def callback(event):
        if event["event"] == "step" and event["step"] == step:
            raise Crash()
    return callback


def test_resume_equals_uninterrupted_run_bit_for_bit(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=5)
    # 5 images, batch 2 -> 3 batches/epoch; accumulation 2 -> 2 steps/epoch; checkpoint at 3 is mid-epoch.
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, random_flip=True,
              lora_dropout=0.1, lr_scheduler="cosine", lr_warmup_steps=2, snr_gamma=5.0, noise_offset=0.05)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))

    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))

    a, b = lora_tensors(full), lora_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    hist_a = (full / "loss_history.csv").read_text()
    hist_b = (tmp_path / "resumed" / "loss_history.csv").read_text()
    assert hist_a == hist_b


# ---------------------------------------------------------------- --caption_dropout_rate
def test_caption_dropout_draws_per_image_and_epoch_and_leaves_crops_and_class_images_alone():
    from billiard_lora.train import DreamBoothDataset, TrainImage

    rng = np.random.default_rng(0)
    images = [TrainImage(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), f"caption {i}", f"k{i}")
              for i in range(4)]
    cfg = TrainConfig(instance_prompt="x", resolution=32, random_flip=True, with_prior_preservation=True,
                      class_prompt="y", seed=3)
    plain = DreamBoothDataset(images, images[:2], cfg)
    dropping = DreamBoothDataset(images, images[:2], cfg.replace(caption_dropout_rate=0.3))
    drops = []
    for epoch in range(50):
        for i in range(4):
            a, b = plain[(epoch, i)], dropping[(epoch, i)]
            assert a["instance"]["key"] == b["instance"]["key"] and a["class"]["key"] == b["class"]["key"]
            assert "dropped" not in a["instance"] and "dropped" not in b["class"]
            drops.append(b["instance"]["dropped"])
            assert dropping[(epoch, i)]["instance"]["dropped"] == drops[-1]  # the same draw every time
    assert 0.2 < np.mean(drops) < 0.4
    batch = train_mod.collate([dropping[(0, i)] for i in range(4)])
    assert batch["dropped"] == drops[:4] + [False] * 4  # [instance..., class...]


@pytest.mark.parametrize("encoders", [False, True])
def test_dropped_captions_train_on_zeroed_text_conditioning(tiny_model_dir, tmp_path, encoders):
    """With every caption dropped the prompt cannot matter: two runs with different prompts train the same LoRA
    (and with none dropped they do not). Also when the text encoders learn, inside the micro-step."""
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=2, train_text_encoder=encoders)
    run = lambda name, prompt, rate: lora_tensors(train(tiny_config(
        tiny_model_dir, data, tmp_path / name, instance_prompt=prompt, caption_dropout_rate=rate, **kw)))
    a, b = run("a", "a photo of sks billiard", 0.9999), run("b", "a red cat on a sofa", 0.9999)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, d = run("c", "a photo of sks billiard", 0.0), run("d", "a red cat on a sofa", 0.0)
    assert any(not torch.equal(c[k], d[k]) for k in c)
    assert any(not torch.equal(a[k], c[k]) for k in c)


def drawn_timesteps(monkeypatch, config: TrainConfig) -> list[int]:
    """Every timestep a run of ``config`` trains at, in order (spied on the loss)."""
    seen, real = [], train_mod.diffusion_loss
    monkeypatch.setattr(train_mod, "diffusion_loss", lambda pred, target, t, *a: seen.extend(t.tolist()) or
                        real(pred, target, t, *a))
    train(config)
    monkeypatch.setattr(train_mod, "diffusion_loss", real)
    return seen


def test_timesteps_are_drawn_between_min_and_max_timestep(tiny_model_dir, tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", n=4)
    drawn = drawn_timesteps(monkeypatch, tiny_config(tiny_model_dir, data, tmp_path / "a", max_train_steps=6,
                                                     train_batch_size=4, min_timestep=700, max_timestep=710))
    assert len(drawn) == 24 and min(drawn) >= 700 and max(drawn) < 710 and len(set(drawn)) > 3
    with pytest.raises(UserError, match="--max_timestep=2000 is past this model's 1000 timesteps"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "b", max_train_steps=1, max_timestep=2000))
    with pytest.raises(UserError, match="--min_timestep=500 and --max_timestep=100"):
        tiny_config(tiny_model_dir, data, tmp_path / "c", min_timestep=500, max_timestep=100)


# ---------------------------------------------------------------- --loss_type
def test_losses_follow_their_formulas_huber_schedules_and_debiased_weights():
    from diffusers import DDPMScheduler

    from billiard_lora.train import diffusion_loss, huber_c

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    cfg = lambda **kw: TrainConfig(instance_prompt="x", **kw)
    t = torch.tensor([0, 500, 999])
    ac = sched.alphas_cumprod[t]
    sigma = ((1 - ac) / ac) ** 0.5
    torch.testing.assert_close(huber_c(t, sched, cfg(loss_type="huber")), (1 - 0.1) / (1 + sigma) ** 2 + 0.1)
    c = huber_c(t, sched, cfg(loss_type="huber", huber_schedule="exponential", huber_c=0.2))
    torch.testing.assert_close(c, torch.tensor([1.0, 0.2 ** 0.5, 0.2 ** 0.999]))
    assert torch.equal(huber_c(t, sched, cfg(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.5)),
                       torch.full((3,), 0.5))
    assert huber_c(t, sched, cfg()) is None

    # error 3 with c = 4: huber 2c(sqrt(9 + 16) - c) = 8, smooth_l1 2(sqrt(25) - 4) = 2, l2 9
    # (c is at most 1: an error of 3/4 with c = 1 is that case scaled down by 4, the Huber loss by 16)
    pred, target = torch.full((1, 4, 2, 2), 3.0), torch.zeros(1, 4, 2, 2)
    assert float(diffusion_loss(pred, target, torch.tensor([7]), sched, cfg())) == 9.0
    constant = dict(huber_schedule="constant", huber_c=1.0)
    e = lambda kind: float(diffusion_loss(pred / 4, target, torch.tensor([7]), sched, cfg(loss_type=kind, **constant)))
    assert e("huber") == pytest.approx(8 / 16) and e("smooth_l1") == pytest.approx(2 / 4)
    # --debiased_estimation_loss: each image's squared error over sqrt(SNR), times Min-SNR's weight where both
    from diffusers.training_utils import compute_snr

    t3 = torch.tensor([10, 500, 990])
    preds = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0)])
    snr = compute_snr(sched, t3)
    got = float(diffusion_loss(preds, torch.zeros_like(preds), t3, sched, cfg(debiased_estimation_loss=True)))
    assert got == pytest.approx(float((torch.tensor([1.0, 4.0, 9.0]) / snr.clamp(max=1000).sqrt()).mean()), rel=1e-6)
    both = float(diffusion_loss(preds, torch.zeros_like(preds), t3, sched,
                                cfg(debiased_estimation_loss=True, snr_gamma=5.0)))
    minsnr = snr.clamp(max=5.0) / snr
    assert both == pytest.approx(float((torch.tensor([1.0, 4.0, 9.0]) * minsnr / snr.clamp(max=1000).sqrt()).mean()),
                                 rel=1e-6)
    # with prior preservation each half is scored with its own images' c
    both = torch.cat([pred / 4, pred / 8]), torch.zeros(2, 4, 2, 2)
    kw = dict(loss_type="huber", huber_schedule="exponential", huber_c=0.1, with_prior_preservation=True,
              class_prompt="y", prior_loss_weight=0.5)
    t2 = torch.tensor([100, 900])
    c2 = huber_c(t2, sched, cfg(**kw))
    expect = lambda err, c: float(2 * c * ((err ** 2 + c ** 2) ** 0.5 - c))
    got = float(diffusion_loss(*both, t2, sched, cfg(**kw)))
    assert got == pytest.approx(expect(0.75, c2[0]) + 0.5 * expect(0.375, c2[1]), rel=1e-6)


def test_huber_loss_trains_and_differs_from_l2(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=3)
    l2 = train(tiny_config(tiny_model_dir, data, tmp_path / "l2", max_train_steps=2, snr_gamma=5.0))
    losses = []
    huber = train(tiny_config(tiny_model_dir, data, tmp_path / "huber", max_train_steps=2, snr_gamma=5.0,
                              loss_type="huber"), callback=lambda e: e["event"] == "step" and losses.append(e["loss"]))
    assert len(losses) == 2 and all(np.isfinite(losses))
    a, b = lora_tensors(l2), lora_tensors(huber)
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a if ".up." in k)
    assert json.loads((huber / "config.json").read_text())["loss_type"] == "huber"


# ---------------------------------------------------------------- --use_ema
def test_use_ema_saves_and_validates_the_average_and_no_ema_the_last_weights(tiny_model_dir, tiny_components,
                                                                            tmp_path, monkeypatch):
    from billiard_lora.lora import save_lora

    c = tiny_components
    raw = []  # the LoRA after each optimizer step, saved in the file format

    def after_step(event):
        if event["event"] == "step":
            raw.append(lora_tensors(save_lora(tmp_path / f"raw-{event['step']}", unet=c.unet).parent))

    validated = []  # the LoRA the validation images were made with
    monkeypatch.setattr(train_mod, "run_validation", lambda config, c, unet, *a, **k: validated.append(
        lora_tensors(save_lora(tmp_path / f"val-{len(validated)}", unet=unet).parent)))
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", use_ema=True,
                      validation_prompt="a photo", validation_steps=3, checkpointing_steps=3)
    out = train(cfg, components=c, callback=after_step)

    # diffusers' EMAModel: the first step copies the weights, then the decay is (1 + n) / (10 + n) after n steps
    expected = dict(raw[0])
    for n, weights in ((1, raw[1]), (2, raw[2])):
        d = (1 + n) / (10 + n)
        expected = {k: e - (1 - d) * (e - weights[k]) for k, e in expected.items()}
    saved, last = lora_tensors(out), lora_tensors(out / "no_ema")
    in_checkpoint = lora_tensors(out / "checkpoint-3")
    assert saved.keys() == expected.keys() == last.keys()
    for k in expected:
        torch.testing.assert_close(saved[k], expected[k], rtol=0, atol=1e-7)
        assert torch.equal(in_checkpoint[k], saved[k]) and torch.equal(validated[-1][k], saved[k])
        assert torch.equal(last[k], raw[-1][k]), "no_ema/ holds the last weights"
    assert any(not torch.allclose(saved[k], last[k]) for k in saved), "the average differs from the last weights"
    # training itself went on from (and ended with) its own weights, not the average
    now = lora_tensors(save_lora(tmp_path / "after", unet=c.unet).parent)
    assert all(torch.equal(now[k], last[k]) for k in now)
    assert "moving average" in (out / "README.md").read_text()


def test_use_ema_resume_equals_uninterrupted_run_and_cannot_be_switched(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=5)
    kw = dict(max_train_steps=5, gradient_accumulation_steps=2, checkpointing_steps=2, use_ema=True,
              ema_decay=0.5)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(3))
    assert (tmp_path / "resumed" / "checkpoint-2" / "custom_checkpoint_0.pkl").is_file()
    train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    for sub in ("", "no_ema"):
        a, b = lora_tensors(full / sub), lora_tensors(tmp_path / "resumed" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{sub or 'the average'} differs"

    with pytest.raises(UserError, match="use_ema=True but this run has use_ema=False"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="checkpoint-4",
                          **{**kw, "use_ema": False, "ema_decay": 0.9999}))


def test_latent_cache_changes_nothing_but_speed(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=4, random_flip=True, train_batch_size=2)
    cached = train(tiny_config(tiny_model_dir, data, tmp_path / "cached", **kw))
    uncached = train(tiny_config(tiny_model_dir, data, tmp_path / "uncached", cache_latents=False, **kw))
    in_worker = train(tiny_config(tiny_model_dir, data, tmp_path / "worker", dataloader_num_workers=1, **kw))
    a, b, w = lora_tensors(cached), lora_tensors(uncached), lora_tensors(in_worker)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], w[k]) for k in a)


def test_checkpoints_total_limit_keeps_the_newest(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=4,
                            checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "checkpoint-4" / "pytorch_lora_weights.safetensors").is_file()


def test_checkpointing_epochs_saves_at_each_epochs_end_beside_the_steps(tiny_model_dir, tmp_path):
    """5 images, batch 2: 3 steps an epoch; --checkpointing_epochs 2 saves after steps 6 and 12, besides every
    --checkpointing_steps 4; each checkpoint's history ends at its step, and the run resumes from the last one."""
    data = make_images(tmp_path / "data", n=5)
    kw = dict(max_train_steps=13, checkpointing_steps=4, checkpointing_epochs=2)
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", **kw), callback=crash_at_step(13))
    out = tmp_path / "out"
    assert sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1])) == \
        [f"checkpoint-{n}" for n in (4, 6, 8, 12)]
    rows = (out / "checkpoint-6" / "loss_history.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows][-1] == ["6", "1"]  # step 6 closes epoch 1 (counted from 0)
    resumed = train(tiny_config(tiny_model_dir, data, out, resume_from_checkpoint="latest", **kw))
    assert len((resumed / "loss_history.csv").read_text().splitlines()) == 1 + 13
    with pytest.raises(UserError, match="--checkpointing_epochs=0 must be at least 1"):
        tiny_config(tiny_model_dir, data, out, checkpointing_epochs=0)


def _lrs(out: Path) -> list[float]:
    return [float(r.split(",")[3]) for r in (out / "loss_history.csv").read_text().splitlines()[1:]]


def test_schedules_with_a_floor_cosine_with_min_lr_and_warmup_stable_decay(tiny_model_dir, tmp_path):
    """transformers' cosine_with_min_lr (kohya's) ends at --lr_scheduler_min_lr_ratio of the learning rate, not 0;
    warmup_stable_decay warms up, holds the learning rate, then decays over --lr_decay_steps to its floor; it
    resumes where it was."""
    data = make_images(tmp_path / "data", n=2)
    kw = dict(max_train_steps=10, train_batch_size=1, learning_rate=1e-3, lr_warmup_steps=2, checkpointing_steps=5)
    cosine = _lrs(train(tiny_config(tiny_model_dir, data, tmp_path / "cos", lr_scheduler="cosine_with_min_lr",
                                    lr_scheduler_min_lr_ratio=0.2, **kw)))
    plain = _lrs(train(tiny_config(tiny_model_dir, data, tmp_path / "plain", lr_scheduler="cosine", **kw)))
    assert cosine[:2] == pytest.approx([5e-4, 1e-3]) and plain[:2] == pytest.approx([5e-4, 1e-3])  # the warm-up
    assert cosine[-1] == pytest.approx(2e-4) and plain[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:])) and min(cosine) >= 2e-4 * (1 - 1e-6)
    wsd_kw = dict(kw, lr_scheduler="warmup_stable_decay", lr_decay_steps=3, lr_scheduler_min_lr_ratio=0.1)
    wsd = train(tiny_config(tiny_model_dir, data, tmp_path / "wsd", **wsd_kw))
    lrs = _lrs(wsd)
    assert lrs[1:7] == pytest.approx([1e-3] * 6)  # held from the warm-up's end to the decay
    assert lrs[7] < 1e-3 and lrs[-1] == pytest.approx(1e-4) and lrs[7] > lrs[8] > lrs[9]
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "wsd2", **wsd_kw), callback=crash_at_step(7))
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "wsd2", resume_from_checkpoint="latest", **wsd_kw))
    assert _lrs(resumed) == lrs
    with pytest.raises(UserError, match="--lr_warmup_steps 2 and --lr_decay_steps 9 are more than the run's 10"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "long", **dict(wsd_kw, lr_decay_steps=9)))
    for bad, message in ((dict(lr_scheduler="cosine", lr_scheduler_min_lr_ratio=0.1), "not cosine: choose one of"),
                         (dict(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=1.5),
                          r"must be in \[0, 1\)"),
                         (dict(lr_scheduler="cosine", lr_decay_steps=3), "--lr_decay_steps sets the decay of")):
        with pytest.raises(UserError, match=message):
            tiny_config(tiny_model_dir, data, tmp_path / "x", **bad)


def test_prior_preservation_generates_class_images_once(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    class_dir = tmp_path / "class"
    kw = dict(with_prior_preservation=True, class_prompt="a photo of a billiard table", class_data_dir=str(class_dir),
              num_class_images=3, sample_batch_size=2, validation_inference_steps=2, max_train_steps=2)
    train(tiny_config(tiny_model_dir, data, tmp_path / "a", **kw))
    made = sorted(class_dir.glob("*.jpg"))
    assert len(made) == 3
    stamps = [p.stat().st_mtime_ns for p in made]
    train(tiny_config(tiny_model_dir, data, tmp_path / "b", **kw))
    assert sorted(class_dir.glob("*.jpg")) == made and [p.stat().st_mtime_ns for p in made] == stamps
    with pytest.warns(UserWarning, match="generated for the class prompt 'a photo of a billiard table', not 'a dog'"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "c", **{**kw, "class_prompt": "a dog"}))


def test_per_image_captions_reach_the_text_encoders(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.train as train_mod

    seen: list[str] = []
    original = train_mod.PromptCache.build.__func__

    def spy(cls, captions, components, device):
        seen.extend(captions)
        return original(cls, captions, components, device)

    monkeypatch.setattr(train_mod.PromptCache, "build", classmethod(spy))
    data = make_images(tmp_path / "data", n=3, captions={0: "messi at a pool table", 1: "a snooker final"})
    train(tiny_config(tiny_model_dir, data, tmp_path / "out", caption_column="prompt"))
    assert {"messi at a pool table", "a snooker final", "caption 2"} <= set(seen)


def test_text_encoder_lora_is_saved_and_reloads(tiny_model_dir, tiny_components, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.models import pipeline_from_components

    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", train_text_encoder=True,
                            text_encoder_lr=1e-2, learning_rate=1e-2), components=tiny_components)
    keys = lora_tensors(out).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    trained = sample(pipeline_from_components(tiny_components))
    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    fresh.load_lora_weights(str(out))
    np.testing.assert_allclose(sample(fresh), trained, atol=1e-5)


def test_validation_writes_a_baseline_and_step_grids(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=2,
                            validation_prompt="sks billiard", validation_steps=2, num_validation_images=2,
                            validation_inference_steps=2))
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000000.png", "step-000002.png"]
    assert Image.open(out / "validation" / grids[0]).size[0] >= 2 * 32


def test_validation_grid_has_a_row_per_prompt_made_with_the_negative_prompt_and_guidance(tiny_model_dir,
                                                                                          tiny_components, tmp_path):
    from accelerate import Accelerator

    from billiard_lora.models import pipeline_from_components

    c = tiny_components
    prompts = ["sks billiard", "a photo of obama playing billiard", "a billiard table " + "in a smoky hall " * 6]
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", validation_prompt=prompts[0],
                      extra_validation_prompts=prompts[1:], validation_negative_prompt="blurry",
                      validation_guidance_scale=7.0, num_validation_images=2, validation_inference_steps=2)
    events = []
    images = train_mod.run_validation(cfg, c, c.unet, c.text_encoder_one, c.text_encoder_two, Accelerator(cpu=True),
                                      torch.float32, 5, events.append)
    assert len(images) == 6 and events[0]["images"] == images

    pipe = pipeline_from_components(c)
    def made(prompt, seed, **kw):
        return np.asarray(pipe(prompt, num_inference_steps=2, height=32, width=32, generator=torch.Generator()
                               .manual_seed(seed), **kw).images[0])

    settings = dict(negative_prompt="blurry", guidance_scale=7.0)
    for row, prompt in enumerate(prompts):  # prompt by prompt, seeds 0 and 1
        for col in range(2):
            assert np.array_equal(np.asarray(images[2 * row + col]), made(prompt, col, **settings)), (prompt, col)
    assert not np.array_equal(np.asarray(images[2]), made(prompts[1], 0, guidance_scale=7.0))
    assert not np.array_equal(np.asarray(images[2]), made(prompts[1], 0, negative_prompt="blurry"))

    grid = Image.open(tmp_path / "out" / "validation" / "step-000005.png")
    assert grid.size[1] >= 3 * 32 and grid.size[0] > 2 * 32  # three rows, two seeds and the prompts' labels
    assert grid.size[0] <= 3 * 32 + 32, "a long prompt's label wraps instead of widening the grid"
    assert json.loads(grid.text["prompts"]) == prompts and grid.text["negative_prompt"] == "blurry"


def test_validation_images_reach_tensorboard(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=2,
                            report_to="tensorboard", validation_prompt="sks billiard", validation_steps=2,
                            extra_validation_prompts=["a billiard table"], num_validation_images=2,
                            validation_inference_steps=1))
    events = EventAccumulator(str(out / "logs" / "dreambooth-lora-sdxl"), size_guidance={IMAGES: 0})
    events.Reload()
    tags = events.Tags()[IMAGES]
    assert tags == ["validation/0: sks billiard", "validation/1: a billiard table"]
    for tag in tags:
        shown = events.Images(tag)
        assert [e.step for e in shown] == [0, 2]  # the baseline, then step 2
        assert (shown[0].width, shown[0].height) == (2 * 32, 32)  # its two seeds side by side
    assert "loss" in events.Tags()["scalars"]


def test_bad_settings_are_one_clear_error(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data")
    with pytest.raises(UserError, match="multiple of 8"):
        tiny_config(tiny_model_dir, data, tmp_path / "o", resolution=30)
    with pytest.raises(UserError, match="--instance_prompt"):
        tiny_config(tiny_model_dir, data, tmp_path / "o", instance_prompt=None)
    with pytest.raises(UserError, match="--class_prompt"):
        tiny_config(tiny_model_dir, data, tmp_path / "o", class_prompt="a dog")
    with pytest.raises(UserError, match="--torch_compile='fast'.*regional"):
        tiny_config(tiny_model_dir, data, tmp_path / "o", torch_compile="fast")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_checkpoint_from_another_lora_shape_is_refused(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data")
    train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(UserError, match="rank=4 but this run has rank=8"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=2, checkpointing_steps=1, rank=8,
                          resume_from_checkpoint="latest"))


def test_checkpoint_from_another_optimizer_is_refused(tiny_model_dir, tmp_path):
    """An optimizer's saved state fits only that optimizer: resuming with another one is one clear error."""
    import billiard_lora.train as train_mod

    if not train_mod._bnb_works("cpu"):
        pytest.skip("bitsandbytes has no working 8-bit optimizer on this CPU")
    data = make_images(tmp_path / "data", n=2)
    train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(UserError, match="optimizer='AdamW' but this run has optimizer='AdamW8bit'"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=2, checkpointing_steps=1,
                          use_8bit_adam=True, resume_from_checkpoint="latest"))


def _launch_two() -> list[str]:
    """`accelerate launch` with 2 CPU processes on a port of their own (tests may run side by side: pytest -n)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=kw.pop("cwd", REPO), timeout=600, **kw)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = _run([sys.executable, "-m", "billiard_lora.train", "--instance_prompt=x", "--learning_rat=1"])
    assert r.returncode == 2 and "did you mean '--learning_rate'" in r.stderr and "Traceback" not in r.stderr
    r = _run([sys.executable, "-m", "billiard_lora.train", "--instance_prompt=x", "--resolution=1000",
              f"--output_dir={tmp_path / 'o'}", "--pretrained_model_name_or_path=/nonexistent"])
    assert r.returncode == 0 or r.returncode == 2
    assert "Traceback" not in r.stderr
    r = _run([sys.executable, "-m", "billiard_lora.train", "--instance_prompt=x", f"--output_dir={tmp_path / 'o2'}",
              "--pretrained_model_name_or_path=/nonexistent/model", "--resolution=64"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not load SDXL pipeline '/nonexistent/model'" in r.stderr


def test_seed_command_runs_unchanged_on_the_tiny_model(tiny_model_dir, shared_billiards, tmp_path):
    """The seed's exact flags; only the model/VAE paths, the data folder, steps and resolution point at test sizes."""
    seed_flags = [
        f"--pretrained_model_name_or_path={tiny_model_dir}",
        f"--pretrained_vae_model_name_or_path={tiny_model_dir / 'vae'}",
        f"--dataset_name={shared_billiards / 'train' / 'billiards'}", f"--output_dir={tmp_path / 'messi_billiard_LoRA'}",
        "--caption_column=prompt", "--mixed_precision=fp16", "--instance_prompt=a photo of messi playing billiard",
        "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=3", "--gradient_checkpointing",
        "--learning_rate=1e-4", "--snr_gamma=5.0", "--lr_scheduler=constant", "--lr_warmup_steps=0",
        "--mixed_precision=fp16", "--use_8bit_adam", "--max_train_steps=2", "--checkpointing_steps=717", "--seed=0",
    ]
    r = _run([sys.executable, "-m", "billiard_lora.train", *seed_flags])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "messi_billiard_LoRA"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["mixed_precision"] in ("no", "fp16") and saved["gradient_accumulation_steps"] == 3
    if not torch.cuda.is_available():
        assert any("fp16" in f for f in saved["fallbacks"]), "the fp16 fallback must be recorded"


@pytest.mark.parametrize("extra", [[], ["--fp8_base", "--use_8bit_adam", "--save_precision=bf16"],
                                   ["--use_ema", "--train_text_encoder_ti", "--instance_prompt=TOK billiard"],
                                   ["--optimizer=AdamW_ScheduleFree", "--loraplus_lr_ratio=8", "--masked_loss",
                                    "--shuffle_caption", "--multires_noise_iterations=4", "--input_perturbation=0.1",
                                    "--timestep_bias_strategy=later", "--instance_prompt=sks billiard, green felt"],
                                   ["--lora_type=lokr", "--lokr_factor=4", "--lora_layers=attn,conv", "--conv_rank=2",
                                    "--scale_weight_norms=0.01", "--learning_rate=1e-2"]])
def test_accelerate_launch_two_processes_on_cpu(tiny_model_dir, tmp_path, extra):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import LoraSpec, load_lora

    data = make_images(tmp_path / "data", n=4)
    if "--masked_loss" in extra:  # half-white masks beside the photos
        (tmp_path / "masks").mkdir()
        for p in data.glob("*.png"):
            w, h = Image.open(p).size
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h))
            mask.save(tmp_path / "masks" / p.name)
        extra = [*extra, f"--mask_data_dir={tmp_path / 'masks'}"]
    out = tmp_path / "ddp"
    r = _run([*_launch_two(), "-m", "billiard_lora.train",
              f"--pretrained_model_name_or_path={tiny_model_dir}", f"--instance_data_dir={data}", f"--output_dir={out}",
              "--instance_prompt=sks billiard", "--resolution=32", "--train_batch_size=1", "--max_train_steps=2",
              "--seed=0", "--report_to=none", "--checkpointing_steps=1", "--auto_gradient_checkpointing", *extra])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 process(es)" in r.stdout
    assert "trial step without checkpointing fits" in r.stdout  # both processes agreed (a collective)
    assert json.loads((out / "config.json").read_text())["use_8bit_adam"] == ("--use_8bit_adam" in extra)
    ema = "--use_ema" in extra  # each process keeps the average; the main one saves it
    assert (out / "no_ema" / "pytorch_lora_weights.safetensors").is_file() == ema
    assert (out / "checkpoint-2" / "custom_checkpoint_0.pkl").is_file() == ema
    # the token embeddings live outside DDP's modules: their gradients are averaged by hand (a collective of both)
    assert (out / "ddp_emb.safetensors").is_file() == ("--train_text_encoder_ti" in extra)
    if "--scale_weight_norms=0.01" in extra:  # each process scales its copy of the adapters alike
        rows = [r.split(",") for r in (out / "loss_history.csv").read_text().splitlines()[1:]]
        assert any(int(r[4]) > 0 for r in rows) and all(float(r[6]) <= 0.01 * (1 + 1e-5) for r in rows)
    if "--save_precision=bf16" in extra:
        assert {v.dtype for v in lora_tensors(out).values()} == {torch.bfloat16}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    load_lora(pipe, LoraSpec(str(out)))  # diffusers' load_lora_weights, or ours for the LoKr
    assert np.isfinite(sample(pipe)).all()


def test_pissa_init_saves_a_lora_for_the_unmodified_base(tiny_model_dir, tiny_components, tmp_path):
    """PiSSA rewrites the base weights at init; the saved file must still reproduce the trained model on stock SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.models import pipeline_from_components

    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", learning_rate=1e-2,
                            init_lora_weights="pissa_niter_4", output_kohya_format=True), components=tiny_components)
    trained = sample(pipeline_from_components(tiny_components))
    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = sample(fresh)
    fresh.load_lora_weights(str(out))
    assert np.abs(trained - base).max() > 1e-4
    np.testing.assert_allclose(sample(fresh), trained, atol=1e-4)


def test_unknown_init_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--init_lora_weights"):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "o", init_lora_weights="svd")


def _unet_step(unet, seed=0):
    """One forward + backward of a tiny UNet at 32 px; returns the loss and the LoRA gradients by name."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    x = torch.randn(1, 4, 4, 4, generator=g)
    emb = torch.randn(1, 77, cross, generator=g)
    cond = {"text_embeds": torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 *
                                       unet.config.addition_time_embed_dim, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    loss = unet(x, torch.tensor([500]), emb, added_cond_kwargs=cond).sample.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


# Each case traces the tiny UNet anew (dynamo: ~40 s of CPU per case), so the settings are crossed rather than
# multiplied: both scopes, both intervals, fused and peft's layers, each selective level, each at least once.
@pytest.mark.parametrize("mode, interval, fused, selective", [
    ("regional", 1, False, "off"), ("full", 2, False, "costly"), ("regional", 2, True, "products")])
def test_compile_keeps_the_math_and_the_lora_keys(tiny_components, monkeypatch, mode, interval, fused, selective):
    """--torch_compile compiles in place (regions, or the whole UNet), checkpointed as train() does (every block,
    or every 2nd), without a graph break: same loss and LoRA gradients as the eager UNet without checkpointing, same
    state-dict keys; with --fused_lora_ops too (its autograd operation traced, not run around the graph).

    Traced with the aot_eager backend (dynamo + autograd tracing, no C++ compilation) to stay fast; inductor is
    what training uses, measured in benchmarks/RESULTS.md.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from billiard_lora.train import checkpoint_unet, compile_unet

    unet, plain = _lora_unet_and_copy(tiny_components)  # (non-zero B: the LoRA path shapes outputs and gradients)
    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", TINY_SELECTIVE)  # (the tiny model keeps some)
    record: dict = {}
    checkpoint_unet(unet, reentrant=False, interval=interval, selective=selective, record=record)  # as train() does
    if fused:
        from billiard_lora.lora import run_adapters_fused

        run_adapters_fused([unet])
    keys = list(unet.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compile_unet(unet, mode, backend="aot_eager")
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())
    dynamo = torch._dynamo.config  # room for every block variant, not torch's default 8
    assert getattr(dynamo, "recompile_limit", getattr(dynamo, "cache_size_limit", 0)) >= 64
    assert list(unet.state_dict()) == keys
    loss_c, grads_c = _unet_step(unet)
    # a graph break (e.g. at the checkpoint call) would silently run that code uncompiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_e, grads_e = _unet_step(plain)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_c
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    assert (selective == "off") == (not any(k.startswith("kept:") for k in record))  # (policy traced into the graph)
    torch._dynamo.reset()


# --selective_checkpointing's thresholds scaled down to the tiny UNet's widths (32-64 channels, 16-64 tokens), so
# that each level keeps something there and 'costly' less than 'products'
TINY_SELECTIVE = {"costly": 160, "products": 64}


def _watch_policy(monkeypatch) -> list[dict]:
    """The records of every selective policy train() makes from now on (each: what it kept, what it left)."""
    records, real = [], train_mod.keep_costly_outputs

    def watched(threshold, record=None, tail=None):
        records.append({} if record is None else record)
        return real(threshold, records[-1], tail)

    monkeypatch.setattr(train_mod, "keep_costly_outputs", watched)
    return records


def _kept(records) -> int:
    return sum(v for r in records for k, v in r.items() if k.startswith("kept:"))


@pytest.mark.parametrize("fused", [False, True])
def test_selective_checkpointing_keeps_costly_outputs_with_the_same_gradients(tiny_components, monkeypatch, fused):
    """--selective_checkpointing keeps, in each recomputed block, the outputs of the operations that cost at least
    the level's FLOPs per value (never the LoRA's up-projection) and recomputes the rest: the loss and LoRA
    gradients of no checkpointing, alone and with --gradient_checkpointing_interval, with peft's layers and with
    --fused_lora_ops (whose operation must leave a kept output unchanged); 'costly' keeps less than 'products' and
    leaves more to recompute."""
    from billiard_lora.lora import run_adapters_fused
    from billiard_lora.train import checkpoint_unet, selective_threshold

    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", TINY_SELECTIVE)
    unet, plain = _lora_unet_and_copy(tiny_components)
    if fused:
        run_adapters_fused([unet])
    assert selective_threshold("off", unet) is None and selective_threshold("costly", unet) == 160
    loss_p, grads_p = _unet_step(plain)
    records = {}
    for level, interval in (("costly", 1), ("products", 1), ("products", 2)):
        records[level, interval] = record = {}
        checkpoint_unet(unet, interval=interval, selective=level, record=record, reentrant=True)
        loss, grads = _unet_step(unet)
        torch.testing.assert_close(loss, loss_p)
        for name in grads_p:
            torch.testing.assert_close(grads[name], grads_p[name], rtol=1e-5, atol=1e-7)
        for p in unet.parameters():
            p.grad = None

    def kept(r):
        return sum(v for k, v in r.items() if k.startswith("kept:"))

    costly, products, every_2nd = records["costly", 1], records["products", 1], records["products", 2]
    assert 0 < kept(costly) < kept(products) and costly["recomputed_flops"] > products["recomputed_flops"] > 0
    assert {"kept:convolution", "kept:mm"} <= products.keys() and 0 < kept(every_2nd) < kept(products)
    # the LoRA's up-projection (2 x rank FLOPs per value) is never kept, whatever the level's threshold
    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", {"costly": 1, "products": 1})
    assert selective_threshold("products", unet) == 2 * 4 + 1


@pytest.mark.parametrize("fused", [False, True])
def test_checkpointed_blocks_run_no_in_place_operation(tiny_components, fused):
    """Selective checkpointing keeps some outputs for the recompute, which must find them unchanged (eager: "Tensor
    cached during selective activation checkpoint has been mutated"; compiled: torch's warning, which compile_unet
    silences on the strength of this test): no block diffusers checkpoints runs an in-place operation in its forward
    (which the recompute runs again), with peft's LoRA layers or with --fused_lora_ops, under autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from billiard_lora.lora import run_adapters_fused

    unet, _ = _lora_unet_and_copy(tiny_components)
    if fused:
        run_adapters_fused([unet])
    in_place, blocks = [], []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.is_mutable:
                in_place.append(str(func))
            return func(*args, **(kwargs or {}))

    def watched(block, *args):
        blocks.append(block)
        with Watch():
            return block(*args)

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=watched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _unet_step(unet)
    assert len(blocks) > 20 and not in_place, sorted(set(in_place))


@pytest.mark.parametrize("level", ["costly", "products"])
def test_selective_checkpointing_keeps_nothing_the_recompute_does_not_read(tiny_components, monkeypatch, level):
    """The non-reentrant checkpoint's recompute stops once backward's tensors are back, before a block's last
    products (the feed-forward's output projection, a ResNet block's second convolution and shortcut): outputs kept
    from those would be memory held for nothing. After a forward and backward every kept output has been read."""
    import torch.utils.checkpoint as cp

    if not all(hasattr(cp, n) for n in ("_CachingTorchDispatchMode", "_RECOMPUTE", "_CONSUMED")):
        pytest.skip("this PyTorch's selective checkpointing keeps its cache otherwise")
    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", TINY_SELECTIVE)
    storages, real_init = [], cp._CachingTorchDispatchMode.__init__

    def init(self, policy_fn, storage, *args, **kwargs):
        storages.append(storage)
        real_init(self, policy_fn, storage, *args, **kwargs)

    monkeypatch.setattr(cp._CachingTorchDispatchMode, "__init__", init)
    unet, _ = _lora_unet_and_copy(tiny_components)
    record: dict = {}
    train_mod.checkpoint_unet(unet, selective=level, record=record)
    per_step = []
    for step in range(3):  # every step alike (an early stop inside a block's last product once left it marked)
        storages.clear()
        _unet_step(unet, seed=step)
        entries = [e for st in storages for per_op in st.values() for e in per_op.values()]
        kept = [e for e in entries if e is not cp._RECOMPUTE]
        assert kept, f"step {step} kept nothing"
        assert all(e is cp._CONSUMED for e in kept), f"{sum(e is not cp._CONSUMED for e in kept)} kept, never read"
        per_step.append(len(kept))
    assert per_step[0] == per_step[1] == per_step[2] and _kept([record]) > 0


def test_a_region_compiled_by_itself_is_recomputed_whole(monkeypatch):
    """With --torch_compile regional a ResNet block is a compiled region checkpointed from eager code: there the
    selective policy would watch inductor's kernels write into buffers it keeps ("Tensor cached during selective
    activation checkpoint has been mutated", measured on the CPU), so that block is recomputed whole; an eager
    block gets the policy (and the non-reentrant form, the only one that takes it)."""
    import torch.utils.checkpoint

    seen = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **kw: seen.append(kw) or fn(*a))
    policy = train_mod.keep_costly_outputs(1)
    x = torch.randn(2, 4, requires_grad=True)
    plain, compiled = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    compiled.compile(backend="eager")
    for block in (plain, compiled):
        train_mod._checkpoint_block(block, x, reentrant=True, context_fn=policy)
    assert seen[0] == {"use_reentrant": False, "context_fn": policy}
    assert seen[1] == {"use_reentrant": True}


def test_selective_checkpointing_is_checked_and_falls_back_where_torch_cannot(monkeypatch):
    with pytest.raises(UserError, match="only applies with --gradient_checkpointing") as err:
        TrainConfig(instance_prompt="x", selective_checkpointing="products")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--selective_checkpointing='some' must be one of off, costly, products"):
        TrainConfig(instance_prompt="x", gradient_checkpointing=True, selective_checkpointing="some")
    config = TrainConfig(instance_prompt="x", auto_gradient_checkpointing=True, selective_checkpointing="costly")
    assert train_mod.selective_checkpointing_works()  # (this torch)
    monkeypatch.setattr(train_mod, "selective_checkpointing_works", lambda: False)
    resolved = train_mod.resolve_hardware(config)
    assert resolved.selective_checkpointing == "off"
    assert any("--selective_checkpointing=costly needs a newer PyTorch" in n for n in resolved.fallbacks)


@pytest.mark.parametrize("scope", ["regional", "full"])
def test_compiled_training_matches_eager_training_end_to_end(tiny_model_dir, tmp_path, monkeypatch, scope):
    """train() with --torch_compile (checkpointing; validation images at steps 0, 2 and 3: the UNet switches
    between training and inference graphs) writes the same loss history and LoRA as without compiling.

    dynamo + AOT autograd trace it as for inductor; the aot_eager backend runs the traced graphs without generating
    C++ so the test takes seconds (inductor's own kernels are what the GPU benchmarks time)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import billiard_lora.train as train_mod

    real = train_mod.compile_unet
    monkeypatch.setattr(train_mod, "compile_unet", lambda unet, s, **kw: real(unet, s, **kw, backend="aot_eager"))
    monkeypatch.setattr(train_mod, "_can_compile", lambda cuda: True)
    data = make_images(tmp_path / "data", n=4)
    kw = dict(max_train_steps=3, gradient_checkpointing=True, validation_prompt="a photo of sks billiard",
              validation_steps=2, num_validation_images=1, validation_inference_steps=1)
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_config(tiny_model_dir, data, tmp_path / "compiled", torch_compile=scope, **kw))
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]  # training and inference graphs
    torch._dynamo.reset()
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", **kw))
    assert json.loads((compiled / "config.json").read_text())["torch_compile"] == scope
    loss_c = [float(r.split(",")[2]) for r in (compiled / "loss_history.csv").read_text().splitlines()[1:]]
    loss_e = [float(r.split(",")[2]) for r in (eager / "loss_history.csv").read_text().splitlines()[1:]]
    assert len(loss_c) == 3 and np.allclose(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    a, b = lora_tensors(compiled), lora_tensors(eager)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert sorted(p.name for p in (compiled / "validation").iterdir()) == \
        sorted(p.name for p in (eager / "validation").iterdir())


def test_compiled_code_is_kept_in_the_package_cache(tmp_path, monkeypatch):
    """torch.compile's generated code goes to $BILLIARD_LORA_CACHE/torch_compile (not /tmp, which reboots and new
    Colab VMs empty), unless the user chose a folder; an unwritable cache leaves torch's default."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from billiard_lora.train import keep_compiled_code

    monkeypatch.setenv("BILLIARD_LORA_CACHE", str(tmp_path / "cache"))
    for before in (None, default_cache_dir()):  # unset, or set to torch's default by an import of diffusers
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        keep_compiled_code()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch_compile")
        assert (tmp_path / "cache" / "torch_compile").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    keep_compiled_code()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("BILLIARD_LORA_CACHE", str(tmp_path / "file"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    keep_compiled_code()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()


def test_adamw_is_torch_fused_and_takes_the_same_steps(tiny_components, tmp_path):
    """--optimizer=AdamW without 8-bit: torch's fused AdamW over the LoRA parameters only (one kernel for all of
    them), stepping as the default AdamW does."""
    from billiard_lora.lora import add_lora, lora_parameters
    from billiard_lora.optim import make_optimizer

    unet = tiny_components.unet.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(unet, rank=4)
    params = list(lora_parameters(unet))
    config = tiny_config(tmp_path, tmp_path, tmp_path / "o", learning_rate=1e-2, adam_weight_decay=1e-2)
    opt = make_optimizer(config, unet, [], num_processes=1)
    assert opt.defaults["fused"] is True
    assert [p for g in opt.param_groups for p in g["params"]] == params
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2,
                                  weight_decay=1e-2, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, reference.param_groups[0]["params"]):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        reference.step()
    for p, q in zip(params, reference.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_cuda_graphs_with_regional_compile_and_checkpointing_fall_back_with_a_note(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """CUDA graphs fail on regionally compiled, checkpointed blocks (measured on an H100): the run keeps compiling
    without CUDA graphs and says so; other combinations are left as asked."""
    import billiard_lora.train as train_mod

    monkeypatch.setattr(train_mod, "_can_compile", lambda cuda: True)
    base = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "o", torch_compile="regional",
                       gradient_checkpointing=True)
    for asked, got in (("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")):
        resolved = train_mod.resolve_hardware(base.replace(torch_compile_mode=asked))
        assert resolved.torch_compile == "regional" and resolved.torch_compile_mode == got
        note = resolved.fallbacks[-1]
        assert f"--torch_compile_mode={asked}" in note and f"--torch_compile_mode={got}" in note and "\n" not in note
    for kept in (base.replace(torch_compile_mode="reduce-overhead", gradient_checkpointing=False),
                 base.replace(torch_compile_mode="reduce-overhead", torch_compile="full"),
                 base.replace(torch_compile_mode="max-autotune-no-cudagraphs")):
        assert train_mod.resolve_hardware(kept).torch_compile_mode == kept.torch_compile_mode
    resolved = train_mod.resolve_hardware(base.replace(torch_compile_mode="reduce-overhead", gradient_checkpointing=False,
                                                       auto_gradient_checkpointing=True))
    assert resolved.torch_compile_mode == "default"  # the trial step may well choose checkpointing


def _lora_unet_and_copy(tiny_components):
    """The tiny UNet with a rank-4 LoRA whose weights are all non-zero (as after training), and an exact copy."""
    import copy

    from billiard_lora.lora import add_lora

    unet = tiny_components.unet.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(unet, rank=4)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return unet, copy.deepcopy(unet)


def test_reentrant_checkpointing_gives_every_adapter_its_gradient(tiny_components, monkeypatch):
    """train() checkpoints with PyTorch's reentrant form (less CPU per step) wherever a block's input needs a
    gradient, the non-reentrant form elsewhere; the gradients match a run without checkpointing."""
    import torch.utils.checkpoint

    from billiard_lora.train import checkpoint_unet

    unet, plain = _lora_unet_and_copy(tiny_components)
    calls, real = [], torch.utils.checkpoint.checkpoint

    def spy(fn, *args, use_reentrant, **kw):
        calls.append((use_reentrant, any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))
        return real(fn, *args, use_reentrant=use_reentrant, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    checkpoint_unet(unet)
    assert unet.is_gradient_checkpointing
    loss, grads = _unet_step(unet)
    loss_p, grads_p = _unet_step(plain)
    torch.testing.assert_close(loss, loss_p)
    assert grads.keys() == grads_p.keys() and len(grads) > 8
    for name in grads_p:
        torch.testing.assert_close(grads[name], grads_p[name], rtol=1e-5, atol=1e-7)
    # the blocks before the first adapter get no gradient-needing input: reentrant there would cut the gradient off
    assert {(True, True), (False, False)} <= set(calls) and (True, False) not in calls
    calls.clear()
    checkpoint_unet(unet, reentrant=False)  # for a compiled UNet
    _unet_step(unet)
    assert calls and {r for r, _ in calls} == {False}


def test_cached_views_are_not_rendered_again(tiny_model_dir, tmp_path, monkeypatch):
    """With the latent cache on, a view's pixels are made only until its latent is cached."""
    import billiard_lora.data as data_mod

    calls = {"n": 0}
    real = data_mod.render_view

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "render_view", counting)
    data = make_images(tmp_path / "data", n=2)
    kw = dict(max_train_steps=6, train_batch_size=1, center_crop=True)  # 2 views, 6 samples
    train(tiny_config(tiny_model_dir, data, tmp_path / "cached", **kw))
    assert calls["n"] == 2
    calls["n"] = 0
    train(tiny_config(tiny_model_dir, data, tmp_path / "uncached", cache_latents=False, **kw))
    assert calls["n"] == 6


def test_compile_without_a_code_generator_falls_back_with_a_note(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.train as train_mod

    monkeypatch.setattr(train_mod.shutil, "which", lambda name: None)  # no C++ compiler on this "machine"
    config = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "o", torch_compile="regional")
    resolved = train_mod.resolve_hardware(config)
    assert resolved.torch_compile == "none"
    assert any("--torch_compile=regional needs" in note for note in resolved.fallbacks)


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True)])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_trains_in_fp16_with_a_note(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capability, native):
    """A T4 (7.5): PyTorch would emulate bf16 there; an A100-class GPU (8.0) keeps it."""
    import billiard_lora.train as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4" if not native else "A100")
    config = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "o", mixed_precision="bf16")
    resolved = train_mod.resolve_hardware(config)
    notes = [n for n in resolved.fallbacks if n.startswith(train_mod.BF16_FALLBACK)]
    if native:
        assert resolved.mixed_precision == "bf16" and not notes
    else:
        assert resolved.mixed_precision == "fp16"
        assert len(notes) == 1 and "Tesla T4 (compute capability 7.5)" in notes[0] and "fp16" in notes[0]


def test_latent_cache_lives_on_the_cpu_and_stops_growing_at_its_budget(tiny_components):
    from billiard_lora.caches import LatentCache

    notes = []
    vae = tiny_components.vae
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    one_view = LatentCache(vae)._posterior(pixels[0])
    budget = 2 * sum(t.nbytes for t in one_view)  # room for two views
    cache = LatentCache(vae, max_bytes=budget, say=notes.append)
    mean, std = cache.posterior(list(pixels), ["a", "b", "c"])
    assert list(cache.table) == ["a", "b"] and cache.full and len(notes) == 1 and "latent cache reached" in notes[0]
    assert all(t.device.type == "cpu" for pair in cache.table.values() for t in pair)
    again_mean, again_std = cache.posterior([None, None, pixels[2]], ["a", "b", "c"])  # cached views need no pixels
    assert torch.equal(again_mean, mean) and torch.equal(again_std, std)
    assert (cache.hits, cache.misses) == (2, 4) and len(notes) == 1


def test_auto_gradient_checkpointing_trains_without_it_when_the_trial_step_fits(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=3)
    kw = dict(lora_dropout=0.1)  # dropout draws from the global RNG: the trial must put it back
    plain = train(tiny_config(tiny_model_dir, data, tmp_path / "plain", gradient_checkpointing=False, **kw))
    auto = train(tiny_config(tiny_model_dir, data, tmp_path / "auto", gradient_checkpointing=True,
                             auto_gradient_checkpointing=True, **kw))
    assert json.loads((auto / "config.json").read_text())["gradient_checkpointing"] is False
    a, b = lora_tensors(plain), lora_tensors(auto)
    assert all(torch.equal(a[k], b[k]) for k in a), "the trial step must leave no trace in training"


def simulate_memory(monkeypatch, kept_fraction_that_fits: float) -> list[float]:
    """A GPU too small for the tiny UNet unless at most this fraction of its blocks keeps its activations (the rest
    recomputed by checkpointing); returns the kept fractions of the forwards that ran out of memory."""
    from diffusers import UNet2DConditionModel

    real_forward, refused = UNet2DConditionModel.forward, []

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            recompute = [getattr(m, "_billiard_recompute", True) for m in self.modules()
                         if type(m).__name__ in train_mod.CHECKPOINTED_BLOCKS]
            kept = 1.0 if not self.is_gradient_checkpointing else 1 - sum(recompute) / len(recompute)
            if kept > kept_fraction_that_fits:
                refused.append(kept)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return refused


@pytest.mark.parametrize("fits, interval", [(0.0, 1), (0.55, 2)])
def test_auto_gradient_checkpointing_turns_it_on_when_memory_runs_out(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                      fits, interval):
    """Trial steps try no checkpointing, then every 4th, 3rd, 2nd block; the first that fits is trained with, else
    every block is checkpointed; the LoRA is the one that setting gives when asked for directly."""
    refused = simulate_memory(monkeypatch, kept_fraction_that_fits=fits)
    data = make_images(tmp_path / "data", n=3)
    ckpt = train(tiny_config(tiny_model_dir, data, tmp_path / "ckpt", gradient_checkpointing=True,
                             gradient_checkpointing_interval=interval))
    assert not refused
    auto = train(tiny_config(tiny_model_dir, data, tmp_path / "auto", auto_gradient_checkpointing=True))
    # 24 blocks: every 4th recomputed keeps 18 (0.75), every 3rd 16, every 2nd 12
    assert refused == pytest.approx([1.0, 0.75, 2 / 3, 0.5] if interval == 1 else [1.0, 0.75, 2 / 3])
    saved = json.loads((auto / "config.json").read_text())
    assert (saved["gradient_checkpointing"], saved["gradient_checkpointing_interval"]) == (True, interval)
    log = capsys.readouterr()
    assert "trial steps without checkpointing does not fit, with checkpointing of every 4th block does not fit" \
        in log.out + log.err
    a, b = lora_tensors(ckpt), lora_tensors(auto)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointing_interval_recomputes_every_nth_block_with_the_same_gradients(tiny_components, monkeypatch):
    """--gradient_checkpointing_interval N checkpoints every Nth of the blocks diffusers hands over and runs the
    others plainly (their activations kept): the loss and LoRA gradients of no checkpointing, every N."""
    import torch.utils.checkpoint

    from billiard_lora.train import checkpoint_unet

    unet, plain = _lora_unet_and_copy(tiny_components)
    loss_p, grads_p = _unet_step(plain)
    calls, real = [], torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    seen = {}
    for interval in (1, 2, 3, 0):
        calls.clear()
        checkpoint_unet(unet, interval=interval)
        loss, grads = _unet_step(unet)
        torch.testing.assert_close(loss, loss_p)
        for name in grads_p:
            torch.testing.assert_close(grads[name], grads_p[name], rtol=1e-5, atol=1e-7)
        seen[interval] = list(calls)
        for p in unet.parameters():
            p.grad = None
    # (mid_block.resnets.0 never; nor the ResNet blocks before the first adapter, which backward never reaches)
    assert len(seen[1]) == 20 and not seen[0] and not unet.is_gradient_checkpointing
    order = [m for m in unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    for interval in (2, 3):
        assert set(seen[interval]) == {b for i, b in enumerate(order) if i % interval == 0} & set(seen[1])
        assert 20 / interval - 1 <= len(seen[interval]) <= 20 / interval + 2


def test_checkpointing_interval_is_checked():
    for kw, words in ((dict(gradient_checkpointing=True, gradient_checkpointing_interval=0), "at least 1"),
                      (dict(gradient_checkpointing_interval=2), "only applies with --gradient_checkpointing")):
        with pytest.raises(UserError, match=words) as err:
            TrainConfig(instance_prompt="x", **kw)
        assert "--gradient_checkpointing_interval=" in str(err.value) and "\n" not in str(err.value)
    TrainConfig(instance_prompt="x", auto_gradient_checkpointing=True, gradient_checkpointing_interval=3)


def test_auto_gradient_checkpointing_tries_only_the_interval_given():
    config = TrainConfig(instance_prompt="x", auto_gradient_checkpointing=True, gradient_checkpointing_interval=3)
    asked = []
    interval, selective, tried = train_mod.choose_checkpointing(config, lambda k, sel: asked.append(k) or False)
    assert (interval, selective, asked) == (1, "off", [0, 3])
    assert tried[-1] == "with checkpointing of every 3rd block does not fit"
    asked.clear()
    assert train_mod.choose_checkpointing(config.replace(gradient_checkpointing_interval=1),
                                          lambda k, sel: asked.append(k) or k == 3)[:2] == (3, "off")
    assert asked == [0, 4, 3]


def test_auto_gradient_checkpointing_with_a_selective_level_falls_back_to_whole_blocks():
    """With --selective_checkpointing, every block keeping the level's outputs is a trial of its own (it can keep
    more than every 3rd block recomputed whole), then the intervals recomputing whole blocks; where nothing fits,
    every block is recomputed whole, the least memory."""
    config = TrainConfig(instance_prompt="x", auto_gradient_checkpointing=True, selective_checkpointing="products")
    asked = []
    interval, selective, tried = train_mod.choose_checkpointing(config, lambda k, sel: asked.append((k, sel)) or False)
    assert asked == [(0, "off"), (4, "products"), (3, "products"), (2, "products"), (1, "products"),
                     (4, "off"), (3, "off"), (2, "off")]
    assert (interval, selective) == (1, "off")
    assert tried[4] == "with checkpointing of every block (products kept) does not fit"
    assert tried[-1] == "with checkpointing of every 2nd block does not fit"
    assert train_mod.choose_checkpointing(config, lambda k, sel: k == 1)[:2] == (1, "products")
    assert train_mod.choose_checkpointing(config, lambda k, sel: sel == "off" and k == 2)[:2] == (2, "off")


def test_views_are_counted_and_a_complete_cache_says_so_once(tiny_components, tmp_path):
    from billiard_lora.caches import LatentCache, count_views
    from billiard_lora.train import TrainImage

    square, wide = TrainImage(Image.new("RGB", (64, 64)), "a", "s"), TrainImage(Image.new("RGB", (80, 64)), "b", "w")
    config = tiny_config(tmp_path, tmp_path, tmp_path / "o", resolution=32)
    assert count_views([square, wide], config) == 1 + 9  # the wide one resizes to 40x32: 9 crop positions
    assert count_views([square, wide], config.replace(center_crop=True, random_flip=True)) == 4
    done = []
    cache = LatentCache(tiny_components.vae, "cpu", views=2, on_complete=lambda: done.append(True))
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    cache.posterior(list(pixels[:2]), ["a", "a"])  # one distinct view so far
    assert done == []
    cache.posterior(list(pixels[1:]), ["b", "a"])
    assert done == [True]
    cache.posterior([None, None], ["a", "b"])
    assert done == [True]


def test_compile_mode_reaches_torch_compile(tiny_components, monkeypatch):
    from billiard_lora.train import compile_unet

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    compile_unet(tiny_components.unet, "regional", mode="reduce-overhead")
    assert {name for name, _ in seen} == {"Transformer2DModel", "ResnetBlock2D"}
    assert all(kw == {"mode": "reduce-overhead"} for _, kw in seen)
    seen.clear()
    compile_unet(tiny_components.unet, "full", mode="max-autotune")
    assert seen == [("UNet2DConditionModel", {"mode": "max-autotune"})]
    with pytest.raises(UserError, match="--torch_compile_mode='fastest'"):
        TrainConfig(instance_prompt="x", torch_compile_mode="fastest")


def test_skipping_peft_input_upcast_under_autocast_changes_no_number(tiny_model_dir, tiny_components, tmp_path,
                                                                    monkeypatch):
    """bf16 autocast: the adapter's inputs are no longer copied to float32 first, and the LoRA is bit-identical."""
    import billiard_lora.lora as lora_mod
    from peft.tuners.tuners_utils import BaseTunerLayer

    data = make_images(tmp_path / "data", n=2)
    kw = dict(mixed_precision="bf16", max_train_steps=2)
    c = tiny_components
    skipped = train(tiny_config(tiny_model_dir, data, tmp_path / "skip", **kw), components=c)
    layers = [m for m in c.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers), "train() must give the caller peft's default back"
    seen = []
    real = lora_mod.set_input_casting
    monkeypatch.setattr(lora_mod, "set_input_casting", lambda models, enabled: seen.append(enabled) or real(models, True))
    kept = train(tiny_config(tiny_model_dir, data, tmp_path / "keep", **kw))
    assert seen[0] is False, "under autocast the trainer turns peft's input upcast off"
    a, b = lora_tensors(skipped), lora_tensors(kept)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    from billiard_lora.train import make_accelerator

    again = make_accelerator(tiny_config(tiny_model_dir, data, tmp_path / "o", mixed_precision="no"), tmp_path / "o")
    assert again.mixed_precision == "no", "a notebook can train again with another precision"


def test_half_precision_norms_patch_the_unets_norms_for_the_run_and_give_them_back(tiny_model_dir, tiny_components,
                                                                                   tmp_path, monkeypatch):
    """--half_precision_norms (the default): every norm of the UNet runs outside autocast while training, none after;
    on a CPU (where autocast leaves norms in bf16 anyway) the LoRA is bit for bit the one trained without it."""
    import billiard_lora.models as models_mod

    data = make_images(tmp_path / "data", n=2)
    kw = dict(mixed_precision="bf16", max_train_steps=2)
    c = tiny_components
    norms = [m for m in c.unet.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    calls = []
    real = models_mod.run_norms_in_half

    def spy(model):
        undo = real(model)
        calls.append(sum("forward" in m.__dict__ for m in norms))
        return lambda: (undo(), calls.append("undone"))

    monkeypatch.setattr(models_mod, "run_norms_in_half", spy)
    half = train(tiny_config(tiny_model_dir, data, tmp_path / "half", half_precision_norms=True, **kw), components=c)
    assert calls == [len(norms), "undone"] and norms and not any("forward" in m.__dict__ for m in norms)
    assert json.loads((half / "config.json").read_text())["half_precision_norms"] is True
    plain = train(tiny_config(tiny_model_dir, data, tmp_path / "plain", half_precision_norms=False, **kw))
    assert len(calls) == 2, "turned off: not applied"
    assert TrainConfig(instance_prompt="x").half_precision_norms is True  # the default
    a, b = lora_tensors(half), lora_tensors(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train(tiny_config(tiny_model_dir, data, tmp_path / "fp32", half_precision_norms=True, max_train_steps=1))
    assert len(calls) == 2, "float32 training has no half precision to run them in"


def test_fused_lora_ops_train_peft_s_lora_and_are_given_back(tiny_model_dir, tiny_components, tmp_path, monkeypatch):
    """--fused_lora_ops: every adapted layer (UNet and text encoders) runs as one operation while training, none after;
    the LoRA is peft's up to the order of float32 sums (addmm adds into its accumulator), through checkpointing,
    dropout and a scale other than 1; in bf16 as close to peft's as two roundings allow."""
    from peft.tuners.lora import Linear as LoraLinear

    import billiard_lora.lora as lora_mod

    data = make_images(tmp_path / "data", n=2)
    kw = dict(max_train_steps=2, gradient_checkpointing=True, lora_dropout=0.1, lora_alpha=8, train_text_encoder=True)
    calls = []
    real = lora_mod._LoraLinearOp.apply
    monkeypatch.setattr(lora_mod._LoraLinearOp, "apply", lambda *a: calls.append(1) or real(*a))
    c = tiny_components
    fused = train(tiny_config(tiny_model_dir, data, tmp_path / "fused", fused_lora_ops=True, **kw), components=c)
    layers = [m for m in (*c.unet.modules(), *c.text_encoder_one.modules()) if isinstance(m, LoraLinear)]
    assert calls and layers and not any("forward" in m.__dict__ for m in layers), "given back after the run"
    assert json.loads((fused / "config.json").read_text())["fused_lora_ops"] is True
    n = len(calls)
    plain = train(tiny_config(tiny_model_dir, data, tmp_path / "plain", **kw))
    assert len(calls) == n, "off by default"
    a, b = lora_tensors(fused), lora_tensors(plain)
    assert a.keys() == b.keys() and any("text_encoder" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * b[k].abs().max(), k
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    half = dict(kw, mixed_precision="bf16", lora_dropout=0.0, train_text_encoder=False)
    kept = []
    real_current = lora_mod._HalfCopy.current
    monkeypatch.setattr(lora_mod._HalfCopy, "current", lambda self: kept.append(1) or real_current(self))
    a = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "f16", fused_lora_ops=True, **half)))
    assert kept, "under autocast the adapters' half-precision copies are kept"
    b = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "p16", **half)))
    assert len(calls) > n
    # the adapters' bf16 copies, kept between optimizer steps, train what casting them in every forward trains
    real_run = lora_mod.run_adapters_fused
    monkeypatch.setattr(lora_mod, "run_adapters_fused", lambda models, half_copies: real_run(models))
    c16 = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "c16", fused_lora_ops=True, **half)))
    assert all(torch.equal(a[k], c16[k]) for k in a)
    # Adam's first steps move each weight by about ±lr whatever the gradient's size: compare the LoRA as a whole
    ups = [k for k in a if "lora_B" in k or "lora.up" in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm() / torch.cat([b[k].flatten() for k in ups]).norm()
    print("bf16: relative difference of the up-projections", diff.item())
    assert diff < 0.05


def test_a_failed_run_gives_the_callers_model_back_as_it_came(tiny_model_dir, tiny_components, tmp_path, monkeypatch):
    """Training that stops with an error still puts back what it changed in how the caller's models run."""
    import billiard_lora.train as train_mod
    from peft.tuners.tuners_utils import BaseTunerLayer

    def broken(*args, **kwargs):
        raise ValueError("optimizer broke")

    monkeypatch.setattr(train_mod, "make_optimizer", broken)
    c = tiny_components
    with pytest.raises(ValueError, match="optimizer broke"):
        train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "o", mixed_precision="bf16",
                          max_train_steps=1), components=c)
    layers = [m for m in c.unet.modules() if isinstance(m, BaseTunerLayer)]
    norms = [m for m in c.unet.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    assert norms and not any("forward" in m.__dict__ for m in norms)


@pytest.mark.parametrize("checkpointing, compile", [(True, "none"), (False, "none"), (True, "regional")])
def test_fp8_base_trains_the_float8_rounded_model_exactly(tiny_model_dir, tmp_path, monkeypatch, checkpointing,
                                                          compile):
    """--fp8_base stores the UNet's frozen layers in float8 and trains exactly what a model with those rounded weights
    would train, checkpointed or not, compiled or not; the stored weights do not move, the LoRA stays fp32."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import billiard_lora.train as train_mod
    from billiard_lora.models import FP8, load_components

    real = train_mod.compile_unet  # aot_eager: traced as for inductor, in seconds (see the compiled test above)
    monkeypatch.setattr(train_mod, "compile_unet", lambda unet, s, **kw: real(unet, s, **kw, backend="aot_eager"))
    monkeypatch.setattr(train_mod, "_can_compile", lambda cuda: True)
    torch._dynamo.reset()
    counters.clear()
    data = make_images(tmp_path / "data", n=4)
    # without checkpointing only where a trial step says it fits: --fp8_base alone turns checkpointing on
    kw = dict(gradient_checkpointing=checkpointing, auto_gradient_checkpointing=not checkpointing, max_train_steps=2,
              snr_gamma=5.0, torch_compile=compile)
    c8, losses8, losses = load_components(str(tiny_model_dir)), [], []
    out8 = train(tiny_config(tiny_model_dir, data, tmp_path / "fp8", fp8_base=True, **kw), components=c8,
                 callback=lambda e: e["event"] == "step" and losses8.append(e["loss"]))
    suffix = ".parametrizations.weight.original"
    stored = {k.replace(".base_layer", "").replace(suffix, ".weight"): v
              for k, v in c8.unet.state_dict().items() if k.endswith(suffix)}
    assert stored and all(v.dtype == FP8 for v in stored.values())
    frozen = [n.replace(".base_layer", "") + ".weight" for n, m in c8.unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in n]
    kept = ["conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.weight",
            "add_embedding.linear_1.weight", "add_embedding.linear_2.weight"]
    assert sorted(stored) == sorted(set(frozen) - set(kept)), "every other frozen Linear and Conv is in float8"
    assert all(v.dtype == torch.float32 for k, v in c8.unet.state_dict().items() if "lora_" in k)
    assert not counters["graph_break"]

    torch._dynamo.reset()
    ref = load_components(str(tiny_model_dir))
    state = ref.unet.state_dict()
    for k, v in stored.items():
        assert torch.equal(state[k].to(FP8).view(torch.uint8), v.view(torch.uint8)), f"{k} moved in training"
        state[k].copy_(v.float())  # the same model, rounded, in fp32
    # (the reference runs eager, which saves a second trace: the losses come out the same, the LoRA's last bits not)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "ref", **{**kw, "torch_compile": "none"}), components=ref,
                callback=lambda e: e["event"] == "step" and losses.append(e["loss"]))
    assert losses8 == losses and all(np.isfinite(losses))
    a, b = lora_tensors(out8), lora_tensors(out)
    assert a.keys() == b.keys() and a
    exact = compile == "none"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    used = json.loads((out8 / "config.json").read_text())
    assert used["fp8_base"] is True and used["gradient_checkpointing"] is checkpointing


def test_fp8_base_on_apple_mps_falls_back_with_a_note(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.train as train_mod

    monkeypatch.setattr(train_mod, "_mps_available", lambda: True)
    resolved = train_mod.resolve_hardware(tiny_config(tiny_model_dir, tmp_path, tmp_path / "o", fp8_base=True))
    assert resolved.fp8_base is False and not resolved.gradient_checkpointing and "MPS" in resolved.fallbacks[-1]


def test_fp8_base_alone_turns_checkpointing_on_with_a_note(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "o", fp8_base=True,
                            max_train_steps=1))
    used = json.loads((out / "config.json").read_text())
    assert used["gradient_checkpointing"] is True
    assert any("--fp8_base without --gradient_checkpointing" in note for note in used["fallbacks"])


def _fake_capture(fn, inputs, pool=None):
    """Stands in for CUDA graph recording on the CPU: like a graph, it runs nothing now, and each replay reads the
    same input buffers and writes the same output tensor."""
    out = torch.empty(())
    return (lambda: out.copy_(fn(*inputs))), out


def _stand_in_graphs(monkeypatch) -> None:
    """From here on the trainer records its micro-steps as on a CUDA GPU, with ``_fake_capture`` for the recording."""
    import billiard_lora.graphs as graphs

    monkeypatch.setattr(train_mod, "_cuda_graphs_possible", lambda: True)
    monkeypatch.setattr(graphs, "_capture", _fake_capture)


def _eager_then_graphed(model_dir: Path, data: Path, tmp_path: Path, monkeypatch, **kw) -> tuple[Path, Path]:
    """The same run eagerly and with recorded micro-steps (stood in for): both runs' folders, once the recorded one
    replayed its graphs without a failure and logged the eager run's losses."""
    eager = train(tiny_config(model_dir, data, tmp_path / "eager", cuda_graphs=False, **kw))
    _stand_in_graphs(monkeypatch)
    graphed = train(tiny_config(model_dir, data, tmp_path / "graphed", cuda_graphs=True, **kw))
    summary = json.loads((graphed / "summary.json").read_text())
    assert summary["cuda_graph_replays"] > 0 and summary["cuda_graph_failure"] is None
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    return eager, graphed


def test_micro_step_graph_warms_up_records_replays_and_guards_its_tensors():
    import billiard_lora.graphs as graphs

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))

    def fn(x):
        loss = (w * x).square().sum()
        loss.backward()
        return loss.detach()

    notes = []
    step = graphs.MicroStepGraph(fn, lambda: [w, w.grad], enabled=True, say=notes.append)
    real = graphs._capture
    graphs._capture = _fake_capture
    try:
        xs = [torch.randn(3) for _ in range(6)] + [torch.randn(2, 3)]  # the last one: another shape
        losses = [float(step(x)) for x in xs]
    finally:
        graphs._capture = real
    assert (step.calls, step.replays) == (7, 3)  # 3 eager warm-up calls, then recorded + 2 replays, 1 eager odd shape
    w2 = torch.nn.Parameter(w.detach().clone())
    w2.grad = None
    expected = []
    for x in xs:
        loss = (w2 * x).square().sum()
        loss.backward()
        expected.append(loss.item())
    assert losses == expected and torch.equal(w.grad, w2.grad), "replays read the new inputs, add into the same .grad"
    w.grad = torch.zeros(3)  # a new gradient tensor: the recorded graph would write into the old one
    with pytest.raises(RuntimeError, match="cleared in place"):
        step(xs[0])

    def broken(inputs_fn, inputs, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = broken
    try:
        step2 = graphs.MicroStepGraph(fn, lambda: [w, w.grad], enabled=True, say=notes.append)
        for x in xs[:5]:
            step2(x)
    finally:
        graphs._capture = real
    assert not step2.enabled and step2.replays == 0 and "recording the micro-step failed" in notes[-1]


def test_cuda_graphs_training_equals_eager_training(tiny_model_dir, tmp_path, monkeypatch):
    """train() with --cuda_graphs (recording stood in for on the CPU): the same losses and LoRA bit for bit as
    without, the optimizer clearing gradients in place, a smaller last batch run eagerly, then as a graph of its
    own."""

    data = make_images(tmp_path / "data", n=5)  # batch 2: batches of 2, 2 and 1 per epoch
    kw = dict(max_train_steps=5, gradient_accumulation_steps=2, gradient_checkpointing=True, snr_gamma=5.0)
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", **kw))
    _stand_in_graphs(monkeypatch)
    graphed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", cuda_graphs=True, **kw))
    summary = json.loads((graphed / "summary.json").read_text())
    # 3 batches per epoch, 2 per step: micro-steps 2 + 1 per epoch (accelerate steps at an epoch's end), 8 in all;
    # sizes 2, 2, 1, 2, 2, 1, 2, 2: the first 3 warm up; then the size-2 ones are recorded once and replayed (4), the
    # size-1 one, met eagerly in the warm-up, is recorded at its second call (1)
    assert (summary["micro_steps"], summary["cuda_graph_replays"], summary["cuda_graphs_recorded"]) == (8, 5, 2)
    assert summary["cuda_graph_failure"] is None
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_recorded_micro_step_with_ema_pivotal_tuning_caption_dropout_and_huber_trains_eagers_lora(
        tiny_model_dir, tmp_path, monkeypatch):
    """The recording stood in for (as above): the caption mask as one more input of the graph, the frozen text
    encoders with their new token rows and the per-image Huber threshold inside it, the average and the embeddings
    outside; and without --cuda_graphs asked for, pivotal tuning trains eagerly (not yet run on a GPU)."""

    data = make_images(tmp_path / "data", n=5)
    kw = dict(max_train_steps=4, gradient_accumulation_steps=2, gradient_checkpointing=True, use_ema=True,
              train_text_encoder_ti=True, instance_prompt="a photo of TOK playing billiard", caption_dropout_rate=0.3,
              loss_type="huber", ti_learning_rate=1e-2)
    eager, graphed = _eager_then_graphed(tiny_model_dir, data, tmp_path, monkeypatch, **kw)
    for sub, name in (("", "pytorch_lora_weights"), ("no_ema", "pytorch_lora_weights"), ("", "eager_emb")):
        a = load_file(str(eager / sub / f"{name}.safetensors"))
        b = load_file(str(graphed / sub / f"{name.replace('eager', 'graphed')}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (sub, name)
    default = train(tiny_config(tiny_model_dir, data, tmp_path / "default", **{**kw, "max_train_steps": 1}))
    used = json.loads((default / "config.json").read_text())
    assert used["cuda_graphs"] is False  # (None asked: decided; not by default with --train_text_encoder_ti)


def test_cuda_graphs_fall_back_with_a_note_where_they_cannot_work(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.train as train_mod

    data = make_images(tmp_path / "data", n=2)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "cpu", cuda_graphs=True, max_train_steps=1))
    used = json.loads((out / "config.json").read_text())
    assert used["cuda_graphs"] is False and any("--cuda_graphs needs a CUDA GPU" in n for n in used["fallbacks"])
    monkeypatch.setattr(train_mod, "_cuda_graphs_possible", lambda: True)
    dropout = tiny_config(tiny_model_dir, data, tmp_path / "o", cuda_graphs=True, lora_dropout=0.1)
    monkeypatch.setattr(train_mod, "_rng_state_recordable", lambda: False)  # PyTorch before 2.10
    for kw in (dict(gradient_checkpointing=True), dict(auto_gradient_checkpointing=True), dict(fp8_base=True)):
        resolved = train_mod.resolve_hardware(dropout.replace(**kw))
        assert resolved.cuda_graphs is False and "--lora_dropout" in resolved.fallbacks[-2 if "fp8" in str(kw) else -1]
    assert train_mod.resolve_hardware(dropout).cuda_graphs is True  # no recompute: masks drawn once, in the graph
    monkeypatch.setattr(train_mod, "_rng_state_recordable", lambda: True)
    assert train_mod.resolve_hardware(dropout.replace(gradient_checkpointing=True)).cuda_graphs is True
    resolved = train_mod.resolve_hardware(tiny_config(tiny_model_dir, data, tmp_path / "o", cuda_graphs=True,
                                                      torch_compile="regional", torch_compile_mode="reduce-overhead"))
    assert resolved.cuda_graphs and resolved.torch_compile_mode == "default"


def test_cuda_graphs_left_unset_are_on_exactly_where_they_apply_and_off_silently_elsewhere(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    import billiard_lora.train as train_mod

    data = make_images(tmp_path / "data", n=2)

    def decided(**kw):
        c = train_mod.resolve_hardware(tiny_config(tiny_model_dir, data, tmp_path / "o", **kw))
        assert not any("cuda_graphs" in n for n in c.fallbacks), c.fallbacks  # nobody asked: nothing to warn about
        return c.cuda_graphs

    assert tiny_config(tiny_model_dir, data, tmp_path / "o").cuda_graphs is None  # the default: decide
    assert decided() is False  # this CPU
    monkeypatch.setattr(train_mod, "_cuda_graphs_possible", lambda: True)
    assert decided() is True
    assert decided(torch_compile="regional") is True  # measured on an H100 (benchmarks/RESULTS.md)
    assert decided(cuda_graphs=False) is False
    for kw in (dict(train_text_encoder=True), dict(torch_compile="full"),
               dict(torch_compile="full", torch_compile_mode="reduce-overhead")):
        assert decided(**kw) is False, kw
    # LoRA dropout: the masks drawn inside the graph (the eager LoRA bit for bit on an H100); with checkpointing
    # only where PyTorch can record the random-number state the recompute restores (2.10+)
    monkeypatch.setattr(train_mod, "_rng_state_recordable", lambda: True)
    assert decided(lora_dropout=0.1) is True and decided(lora_dropout=0.1, gradient_checkpointing=True) is True
    monkeypatch.setattr(train_mod, "_rng_state_recordable", lambda: False)
    assert decided(lora_dropout=0.1) is True and decided(lora_dropout=0.1, gradient_checkpointing=True) is False
    monkeypatch.setattr(train_mod, "_rng_state_recordable", lambda: True)
    assert decided(train_text_encoder=True, cuda_graphs=True) is True  # asked for: the text encoders recorded too
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert decided() is True  # several processes: each records its own; gradients averaged by hand (tested below)
    # what ran is what config.json records: a plain bool
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(train_mod, "_cuda_graphs_possible", lambda: False)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "cpu", max_train_steps=1))
    assert json.loads((out / "config.json").read_text())["cuda_graphs"] is False


@pytest.mark.parametrize("text_encoders", [False, True])
def test_the_recorded_micro_step_never_needs_the_host(tiny_model_dir, tmp_path, monkeypatch, text_encoders):
    """What --cuda_graphs records (UNet forward, Min-SNR loss, backward through checkpointed blocks, bf16 autocast;
    with --train_text_encoder both CLIP encoders from token ids too) has no operation a CUDA graph cannot hold: none
    that reads a value back to the CPU (.item(), nonzero, masked indexing...) and no copy between devices. Checked
    op by op as the stand-in records it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import billiard_lora.graphs as graphs
    import billiard_lora.train as train_mod

    needs_host = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "equal",
                  "is_nonzero", "lift_fresh", "lift_fresh_copy", "repeat_interleave", "item"}
    seen, moves = set(), []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            seen.add(func.__name__.split(".")[0])
            if func.__name__.startswith("_to_copy") and kwargs.get("device") not in (None, args[0].device):
                moves.append(str(func))
            return func(*args, **kwargs)

    def record(fn, inputs, pool=None):
        with Record():
            out = fn(*inputs)
        return (lambda: out.copy_(fn(*inputs))), out

    monkeypatch.setattr(train_mod, "_cuda_graphs_possible", lambda: True)
    monkeypatch.setattr(graphs, "_capture", record)
    data = make_images(tmp_path / "data", n=4)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "o", cuda_graphs=True, max_train_steps=3,
                            gradient_accumulation_steps=2, gradient_checkpointing=True, snr_gamma=5.0,
                            mixed_precision="bf16", train_text_encoder=text_encoders))
    assert json.loads((out / "summary.json").read_text())["cuda_graph_replays"] > 0
    assert {"convolution_backward", "mm", "mse_loss_backward"} <= seen, "the whole micro-step was recorded"
    if text_encoders:
        assert "embedding" in seen, "the text encoders ran in the recorded step"
    assert not seen & needs_host and not moves, (seen & needs_host, moves)


def test_cuda_graphs_with_lora_dropout_and_checkpointing_equal_eager_training(tiny_model_dir, tmp_path, monkeypatch):
    """--lora_dropout --cuda_graphs (recording stood in for on the CPU) with checkpointing: the checkpoint saves and
    restores the random-number state, so the recompute draws the forward's masks again, and training is eager
    training: LoRA and losses bit for bit, through a resume. (That a real graph draws the numbers an eager step
    would is PyTorch's design; gpu_check.sh part 21 compares the two on a GPU.)"""
    import shutil

    import torch.utils.checkpoint


    data = make_images(tmp_path / "data", n=4)
    kw = dict(max_train_steps=4, gradient_accumulation_steps=2, gradient_checkpointing=True, lora_dropout=0.3,
              checkpointing_steps=2)
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", **kw))
    undropped = train(tiny_config(tiny_model_dir, data, tmp_path / "undropped", **{**kw, "lora_dropout": 0.0}))
    _stand_in_graphs(monkeypatch)
    preserved, real = [], torch.utils.checkpoint.checkpoint

    def spy(fn, *args, preserve_rng_state=True, **kw2):
        preserved.append(preserve_rng_state)
        return real(fn, *args, preserve_rng_state=preserve_rng_state, **kw2)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    graphed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", cuda_graphs=True, **kw))
    assert json.loads((graphed / "summary.json").read_text())["cuda_graph_replays"] > 0
    assert preserved and all(preserved), "the recompute must restore the random-number state"
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    a, b, u = lora_tensors(eager), lora_tensors(graphed), lora_tensors(undropped)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], u[k]) for k in a)
    # stopped after the checkpoint at step 2, resumed: the same masks from there on
    shutil.rmtree(graphed / "checkpoint-4")
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", cuda_graphs=True,
                                resume_from_checkpoint="latest", overwrite_output_dir=True, **kw))
    r = lora_tensors(resumed)
    assert all(torch.equal(a[k], r[k]) for k in a)


def test_cuda_graphs_with_text_encoder_training_equal_eager_training(tiny_model_dir, tmp_path, monkeypatch):
    """--train_text_encoder --cuda_graphs (recording stood in for on the CPU): both CLIP encoders encode the token
    ids inside the recorded micro-step, checkpointed, and learn exactly as eagerly: LoRA (UNet and text encoders)
    and losses bit for bit."""

    data = make_images(tmp_path / "data", n=4, captions={0: "a photo of sks cue", 2: "sks balls on a table"})
    kw = dict(max_train_steps=4, gradient_accumulation_steps=2, gradient_checkpointing=True, snr_gamma=5.0,
              train_text_encoder=True, text_encoder_lr=5e-4, caption_column="prompt")
    eager, graphed = _eager_then_graphed(tiny_model_dir, data, tmp_path, monkeypatch, **kw)
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert a.keys() == b.keys() and sum(k.startswith("text_encoder_2.") for k in a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_cuda_graphs_default_path_with_prior_preservation_validation_and_resume_equals_eager(tiny_model_dir, tmp_path,
                                                                                             monkeypatch):
    """What CUDA graphs (on by default on one GPU) must leave alone, recording stood in for on the CPU: prior
    preservation's doubled batch, validation images between steps, the 8-bit optimizer writing the adapters in
    place, and a crash + resume all give the LoRA and loss history of an uninterrupted eager run, bit for bit."""

    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, snr_gamma=5.0,
              with_prior_preservation=True, class_prompt="a photo of a billiard table",
              class_data_dir=str(tmp_path / "class"), num_class_images=2, sample_batch_size=2,
              validation_prompt="a photo of messi playing billiard", validation_steps=2, num_validation_images=1,
              validation_inference_steps=2, use_8bit_adam=True)
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", cuda_graphs=False, **kw))
    _stand_in_graphs(monkeypatch)

    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", **kw), callback=crash_at_step(4))
    graphed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", resume_from_checkpoint="latest", **kw))
    summary = json.loads((graphed / "summary.json").read_text())
    assert json.loads((graphed / "config.json").read_text())["cuda_graphs"] is True
    assert summary["cuda_graph_replays"] > 0 and summary["cuda_graph_failure"] is None
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (graphed / "validation").iterdir()) == \
        sorted(p.name for p in (eager / "validation").iterdir())


def test_cuda_graphs_with_fused_lora_ops_refresh_the_kept_half_copies_after_every_step(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """--fused_lora_ops under bf16 keeps the adapters' bf16 copies between optimizer steps; a replayed CUDA graph
    runs no Python, so no version check: only the trainer's refresh() after each step keeps them current. Stood in
    for on the CPU (copies never re-checked, as in a replay), through a crash and resume: the LoRA and loss history
    of an eager run, bit for bit."""
    import billiard_lora.lora as lora_mod

    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, mixed_precision="bf16",
              fused_lora_ops=True, gradient_checkpointing=True, use_8bit_adam=True)
    eager = train(tiny_config(tiny_model_dir, data, tmp_path / "eager", cuda_graphs=False, **kw))
    _stand_in_graphs(monkeypatch)
    monkeypatch.setattr(lora_mod._HalfCopy, "current", lambda self: self.copies)  # as a replay: never re-checked
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", **kw), callback=crash_at_step(4))
    graphed = train(tiny_config(tiny_model_dir, data, tmp_path / "graphed", resume_from_checkpoint="latest", **kw))
    assert json.loads((graphed / "summary.json").read_text())["cuda_graph_replays"] > 0
    assert (eager / "loss_history.csv").read_text() == (graphed / "loss_history.csv").read_text()
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_STAND_IN_LAUNCHER = """
import sys
import torch
import billiard_lora.graphs as graphs
import billiard_lora.train as train

def fake_capture(fn, inputs, pool=None):  # as in test_train: a replay reruns fn on the same buffers into the same output
    out = torch.empty(())
    return (lambda: out.copy_(fn(*inputs))), out

graphs._capture = fake_capture
train._cuda_graphs_possible = lambda: True
sys.exit(train.main())
"""


@pytest.mark.parametrize("extra", [[], ["--train_text_encoder"]])
def test_cuda_graphs_with_two_processes_average_gradients_as_ddp_does(tiny_model_dir, tmp_path, extra):
    """accelerate launch, 2 processes (gloo, CPU): the recorded micro-step runs the bare UNet (and text encoders)
    and the gradients are averaged by hand at each optimizer step; the LoRA equals DDP's, bit for bit (recording
    stood in for)."""
    data = make_images(tmp_path / "data", n=4)
    launcher = tmp_path / "launch_with_stand_in.py"
    launcher.write_text(_STAND_IN_LAUNCHER)
    runs = {}
    for name, graphs in (("ddp", "false"), ("graphs", "true")):
        out = tmp_path / name
        r = _run([*_launch_two(), str(launcher),
                  f"--pretrained_model_name_or_path={tiny_model_dir}", f"--instance_data_dir={data}",
                  f"--output_dir={out}", "--instance_prompt=sks billiard", "--resolution=32", "--train_batch_size=1",
                  "--gradient_accumulation_steps=2", "--max_train_steps=4", "--learning_rate=1e-3", "--seed=0",
                  "--report_to=none", "--gradient_checkpointing", f"--cuda_graphs={graphs}", *extra])
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        runs[name] = out
    summary = json.loads((runs["graphs"] / "summary.json").read_text())
    assert summary["cuda_graph_replays"] > 0 and summary["cuda_graph_failure"] is None
    assert "cuda_graph_replays" not in json.loads((runs["ddp"] / "summary.json").read_text())
    a, b = lora_tensors(runs["ddp"]), lora_tensors(runs["graphs"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adam_over_flat_buffers_trains_as_bitsandbytes_per_tensor_through_a_resume(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """--use_8bit_adam steps bitsandbytes' AdamW8bit over a few flat buffers instead of tensor by tensor: with
    text-encoder LoRAs at their own learning rate, a warm-up + cosine schedule, 8-bit states (the tiny model's
    tensors made to qualify) and a crash + resume, the LoRA and loss history equal per-tensor bitsandbytes' exactly;
    so does resuming a checkpoint whose optimizer state bitsandbytes wrote per tensor (older versions did)."""
    bnb = pytest.importorskip("bitsandbytes")
    import billiard_lora.optim as optim
    import billiard_lora.train as train_mod

    if not train_mod._bnb_works("cpu"):
        pytest.skip("bitsandbytes has no working 8-bit optimizer on this CPU")
    monkeypatch.setattr(optim, "MIN_8BIT_SIZE", 100)  # tiny LoRA tensors: 128 and 256 numbers, half a block and one
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, use_8bit_adam=True,
              train_text_encoder=True, text_encoder_lr=3e-4, adam_weight_decay=1e-2, lr_scheduler="cosine",
              lr_warmup_steps=2, snr_gamma=5.0)

    def per_tensor(config, unet, text_encoders, num_processes, **kw):
        flat = optim.make_optimizer(config, unet, text_encoders, num_processes, **kw)
        assert isinstance(flat, optim.FlatAdamW8bit)
        groups = [{k: v for k, v in g.items()} for g in flat.param_groups]
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, min_8bit_size=100)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "make_optimizer", per_tensor)
        reference = train(tiny_config(tiny_model_dir, data, tmp_path / "per_tensor", **kw))
        with pytest.raises(Crash):  # an older billiard-lora's checkpoint: bitsandbytes' state per tensor
            train(tiny_config(tiny_model_dir, data, tmp_path / "older", **kw), callback=crash_at_step(4))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "flat", **kw), callback=crash_at_step(4))
    flat = train(tiny_config(tiny_model_dir, data, tmp_path / "flat", resume_from_checkpoint="latest", **kw))
    older = train(tiny_config(tiny_model_dir, data, tmp_path / "older", resume_from_checkpoint="latest", **kw))

    a = lora_tensors(reference)
    assert any(k.startswith("text_encoder") for k in a)
    for run in (flat, older):
        assert (reference / "loss_history.csv").read_text() == (run / "loss_history.csv").read_text()
        b = lora_tensors(run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
            (run.name, [k for k in a if not torch.equal(a[k], b[k])])
    assert not all(torch.equal(a[k], lora_tensors(tmp_path / "flat" / "checkpoint-3")[k]) for k in a)  # it trained


def test_prodigy_over_flat_buffers_trains_and_resumes_exactly(tiny_model_dir, tmp_path):
    """--optimizer=prodigy (over flat buffers, with text-encoder LoRAs): it trains, and a crash + resume continues
    bit for bit as an uninterrupted run, Prodigy's adapted step size included."""
    pytest.importorskip("prodigyopt")
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, optimizer="prodigy",
              learning_rate=1.0, train_text_encoder=True, lr_scheduler="cosine", lr_warmup_steps=2)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert (full / "loss_history.csv").read_text() == (resumed / "loss_history.csv").read_text()
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ups = [k for k in a if "lora_B" in k or ".up." in k]
    assert ups and any(a[k].abs().max() > 0 for k in ups), "the LoRA trained (B starts at zero)"


def test_text_encoder_checkpointing_interval_checkpoints_every_nth_layer(tiny_components):
    """With --train_text_encoder the interval applies to the CLIP layers too (transformers' every_n_layers)."""
    import inspect

    from billiard_lora.train import checkpoint_text_encoder

    te = tiny_components.text_encoder_one
    if "every_n_layers" not in inspect.signature(getattr(te, "activation_checkpointing_enable", print)).parameters:
        pytest.skip("this transformers checkpoints every layer (no every_n_layers)")
    for interval, expected in ((2, [True, False, True]), (1, [True, True, True])):
        checkpoint_text_encoder(te, interval=interval)
        layers = [m for name, m in te.named_modules() if name.rsplit(".", 1)[0].endswith("encoder.layers")]
        assert [layer.gradient_checkpointing for layer in layers] == expected


def test_training_with_a_checkpointing_interval_learns_what_checkpointing_every_block_learns(tiny_model_dir, tmp_path):
    """End to end, text encoders training too: every 2nd block or layer recomputed gives the LoRA of every one."""
    data = make_images(tmp_path / "data", n=3)
    kw = dict(gradient_checkpointing=True, train_text_encoder=True, text_encoder_lr=5e-4, max_train_steps=2)
    every = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "every", **kw)))
    second = train(tiny_config(tiny_model_dir, data, tmp_path / "second", gradient_checkpointing_interval=2, **kw))
    assert json.loads((second / "config.json").read_text())["gradient_checkpointing_interval"] == 2
    second = lora_tensors(second)
    assert every.keys() == second.keys() and any(k.startswith("text_encoder") for k in every)
    for k in every:
        torch.testing.assert_close(second[k], every[k], rtol=1e-4, atol=1e-6)  # (sums in another order)


def test_training_with_selective_checkpointing_learns_what_checkpointing_every_block_learns(tiny_model_dir, tmp_path,
                                                                                            monkeypatch):
    """End to end, with the tiny model keeping outputs: --selective_checkpointing products gives the LoRA of whole
    blocks recomputed, and is recorded in config.json."""
    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", TINY_SELECTIVE)
    data = make_images(tmp_path / "data", n=3)
    kw = dict(gradient_checkpointing=True, max_train_steps=2)
    every = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "every", **kw)))
    records = _watch_policy(monkeypatch)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "sel", selective_checkpointing="products", **kw))
    assert _kept(records) > 0, "the policy ran and kept outputs"
    assert json.loads((out / "config.json").read_text())["selective_checkpointing"] == "products"
    selective = lora_tensors(out)
    assert every.keys() == selective.keys()
    for k in every:
        torch.testing.assert_close(selective[k], every[k], rtol=1e-4, atol=1e-6)


def test_a_kohya_file_left_by_an_earlier_run_is_written_again_with_the_new_lora(tiny_model_dir, tmp_path):
    """Resumed without --output_kohya_format, a run once left the first run's kohya file beside its newer LoRA."""
    from billiard_lora.lora_tools import load_lora_file

    data = make_images(tmp_path / "data", n=2)
    out = tmp_path / "o"
    train(tiny_config(tiny_model_dir, data, out, max_train_steps=2, checkpointing_steps=2, output_kohya_format=True))
    train(tiny_config(tiny_model_dir, data, out, max_train_steps=3, resume_from_checkpoint="latest"))
    kohya = load_lora_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya.training_config["max_train_steps"] == 3
    diffusers = lora_tensors(out)
    assert len(kohya.tensors) >= len(diffusers) > 0


def test_resuming_with_other_settings_says_so_and_config_json_records_what_ran(tiny_model_dir, tmp_path, capsys):
    """A resumed run once trained at the checkpoint's learning rate while config.json recorded the new one, and
    took other data without a word."""
    data = make_images(tmp_path / "data", n=2)
    out = tmp_path / "o"
    train(tiny_config(tiny_model_dir, data, out, max_train_steps=2, checkpointing_steps=2))
    capsys.readouterr()
    train(tiny_config(tiny_model_dir, data, out, max_train_steps=3, resume_from_checkpoint="latest",
                      learning_rate=1e-2, random_flip=True, adam_weight_decay=0.5, image_interpolation_mode="nearest"))
    err = capsys.readouterr().err
    assert "keeps the checkpoint's learning_rate=0.001 (not 0.01)" in err
    assert "adam_weight_decay=0.0001 (not 0.5)" in err  # the optimizer's param_groups are restored whole
    assert "random_flip=False -> True" in err and "no longer as an uninterrupted run would" in err
    assert "image_interpolation_mode='lanczos' -> 'nearest'" in err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["learning_rate"], saved["adam_weight_decay"]) == (1e-3, 1e-4)
    rows = (out / "loss_history.csv").read_text().splitlines()
    assert rows[-1].endswith(",0.001"), "the resumed step trained at the checkpoint's 1e-3"


def test_a_run_without_seed_resumes_with_its_checkpoints_seed(tiny_model_dir, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=2)
    out = tmp_path / "o"
    train(tiny_config(tiny_model_dir, data, out, seed=None, max_train_steps=2, checkpointing_steps=2))
    first = json.loads((out / "config.json").read_text())["seed"]
    capsys.readouterr()
    train(tiny_config(tiny_model_dir, data, out, seed=None, max_train_steps=3, resume_from_checkpoint="latest"))
    assert json.loads((out / "config.json").read_text())["seed"] == first
    assert "other settings" not in capsys.readouterr().err


def test_relative_paths_are_recorded_absolute_so_the_run_works_from_any_folder(tiny_model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """`train --pretrained_model_name_or_path=model` once wrote "model" into config.json, the model card and the
    LoRA's header, so `generate --lora RUN` from another folder looked for a model called "model" on the Hub."""
    import argparse

    from billiard_lora.config import same_setting
    from billiard_lora.generate import _default_model_and_vae
    from billiard_lora.lora import read_metadata

    (tmp_path / "model").symlink_to(tiny_model_dir)
    make_images(tmp_path / "data", n=2)
    monkeypatch.chdir(tmp_path)
    train(tiny_config(Path("model"), Path("data"), Path("o"), max_train_steps=2, checkpointing_steps=2))
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["pretrained_model_name_or_path"] == str(tmp_path / "model")
    assert saved["instance_data_dir"] == str(tmp_path / "data")
    assert saved["pretrained_vae_model_name_or_path"] is None and saved["output_dir"] == "o"
    assert str(tmp_path / "model") in (tmp_path / "o" / "README.md").read_text()
    lora = tmp_path / "o" / "pytorch_lora_weights.safetensors"
    assert read_metadata(lora)["pretrained_model_name_or_path"] == str(tmp_path / "model")

    monkeypatch.chdir(tiny_model_dir)  # elsewhere: the LoRA still names a model that is there
    args = argparse.Namespace(model=None, vae="config", checkpoints=None)
    assert _default_model_and_vae(args, [lora]) == (str(tmp_path / "model"), None)

    monkeypatch.chdir(tmp_path)  # typed relative again: the same setting, no resume warning
    capsys.readouterr()
    train(tiny_config(Path("model"), Path("data"), Path("o"), max_train_steps=3, resume_from_checkpoint="latest"))
    assert "other settings" not in capsys.readouterr().err
    # a checkpoint from before, which recorded "data" as typed, is the same setting too; another folder is not
    assert same_setting("instance_data_dir", "data", str(tmp_path / "data"))
    assert not same_setting("instance_data_dir", "data2", str(tmp_path / "data"))
    assert not same_setting("instance_prompt", "data", str(tmp_path / "data"))


def test_micro_batch_rows_split_a_folded_batch_as_the_unfolded_run_drew_it():
    from billiard_lora.train import micro_batch_rows

    assert micro_batch_rows(3, 3, prior=False) == [[0, 1, 2]]  # not folded: the batch as it is
    assert micro_batch_rows(6, 2, prior=False) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batch_rows(5, 2, prior=False) == [[0, 1], [2, 3], [4]]  # an epoch's short last batch
    # [instance x 4, class x 4] in micro-batches of 2: each its instances, then their class images
    assert micro_batch_rows(8, 2, prior=True) == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("prior", [False, True], ids=["plain", "prior_preservation"])
def test_fold_accumulation_runs_the_same_step_as_one_batch(tiny_model_dir, tmp_path, prior):
    """Batch 1 x accumulation 3 and the same folded into one batch of 3: the same images, noise and timesteps, so
    the same losses; the LoRAs differ only by float rounding (a batch of 3 sums in another order)."""
    data = make_images(tmp_path / "data", n=6)
    kw = dict(train_batch_size=1, gradient_accumulation_steps=3, max_train_steps=2, random_flip=True,
              noise_offset=0.05, snr_gamma=5.0)
    if prior:  # (also: captions dropped and a Huber loss, per row: the rows must keep their own)
        kw.update(with_prior_preservation=True, class_prompt="a photo of a billiard table", num_class_images=6,
                  class_data_dir=str(make_images(tmp_path / "class", n=6)), caption_dropout_rate=0.5,
                  loss_type="huber", huber_schedule="exponential")
    unfolded = train(tiny_config(tiny_model_dir, data, tmp_path / "a", **kw))
    folded = train(tiny_config(tiny_model_dir, data, tmp_path / "b", fold_accumulation=True, **kw))
    losses = [[float(r.split(",")[2]) for r in (run / "loss_history.csv").read_text().splitlines()[1:]]
              for run in (unfolded, folded)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    a, b = lora_tensors(unfolded), lora_tensors(folded)
    # Adam's first steps move each weight by about +-lr whatever its gradient's size, so a gradient near zero that
    # rounds the other way flips a single weight: measured over the whole LoRA, the difference is rounding's
    # (1e-5 measured; a step with other noise or other images: order 1)
    gap = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) / sum(float((a[k] ** 2).sum()) for k in a))
    assert gap < 1e-3, gap
    saved = json.loads((folded / "config.json").read_text())  # what the user asked, to rerun or resume the same
    assert (saved["train_batch_size"], saved["gradient_accumulation_steps"], saved["fold_accumulation"]) == (1, 3, True)


def test_a_folded_run_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=7)  # 7 images in batches of 2 x 2 folded: a short batch each epoch
    kw = dict(train_batch_size=2, gradient_accumulation_steps=2, fold_accumulation=True, max_train_steps=5,
              checkpointing_steps=3, random_flip=True, noise_offset=0.05)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "loss_history.csv").read_text() == (resumed / "loss_history.csv").read_text()


def test_resuming_past_the_last_step_says_so_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """--max_train_steps 1 against a checkpoint at step 2 trained a third step and wrote over the final LoRA."""
    import billiard_lora.models as models

    data = make_images(tmp_path / "data", n=2)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "o", max_train_steps=2, checkpointing_steps=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded for a run with nothing to train")

    monkeypatch.setattr(models, "load_components", must_not_load)
    for steps in (1, 2):
        with pytest.raises(UserError, match=r"checkpoint-2 is at step 2, already at --max_train_steps=%d: nothing "
                                             r"to train" % steps):
            train(tiny_config(tiny_model_dir, data, out, max_train_steps=steps, resume_from_checkpoint="latest"))
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"already at --num_train_epochs=1 \(1 step\)"):  # 2 images, batch 2
        train(tiny_config(tiny_model_dir, data, out, max_train_steps=None, num_train_epochs=1,
                          resume_from_checkpoint="latest"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_output_dir_leaves_no_checkpoint_of_the_earlier_run(tiny_model_dir, tmp_path, capsys):
    """The earlier run's checkpoint-4 stayed beside the new run's checkpoint-1, and --resume_from_checkpoint=latest
    then went on with the earlier run."""
    data = make_images(tmp_path / "data", n=2)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "o", max_train_steps=4, checkpointing_steps=2,
                            validation_prompt="x", validation_steps=2, num_validation_images=1,
                            validation_inference_steps=1))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    train(tiny_config(tiny_model_dir, data, out, max_train_steps=1, checkpointing_steps=1, overwrite_output_dir=True))
    assert "removed the earlier run's checkpoint-2, checkpoint-4, validation" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not (out / "validation").exists()


@pytest.mark.slow
def test_fold_accumulation_on_two_processes_trains_the_unfolded_runs_lora(tiny_model_dir, tmp_path):
    """accelerate launch, 2 processes: a folded batch draws each image's noise with the generator the unfolded run
    gives that image on whichever process had it, so the averaged gradient, and the LoRA, are the same; the loss
    logged is the mean over both processes' images, the same folded or not (the main process's share, logged
    before, holds other images when folded)."""
    data = make_images(tmp_path / "data", n=8)
    loras, losses = [], []
    for fold in ([], ["--fold_accumulation"]):
        out = tmp_path / f"ddp{len(fold)}"
        r = _run([*_launch_two(), "-m", "billiard_lora.train",
                  f"--pretrained_model_name_or_path={tiny_model_dir}", f"--instance_data_dir={data}",
                  f"--output_dir={out}", "--instance_prompt=sks billiard", "--resolution=32", "--train_batch_size=1",
                  "--gradient_accumulation_steps=2", "--max_train_steps=2", "--seed=0", "--report_to=none",
                  "--checkpointing_steps=100", "--random_flip", "--noise_offset=0.05", "--learning_rate=1e-3", *fold])
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        loras.append(lora_tensors(out))
        losses.append([h["loss"] for h in train_mod.load_history(out)])
    a, b = loras
    gap = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) / sum(float((a[k] ** 2).sum()) for k in a))
    assert gap < 1e-3, gap  # measured 1.0e-5; other noise: order 1
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_settings_that_cannot_take_effect_are_recorded_as_what_ran():
    """Prodigy ignored --use_8bit_adam and trained the text encoders at --learning_rate while config.json said
    otherwise; --fold_accumulation with nothing to fold was recorded as on."""
    import billiard_lora.train as train_mod

    base = TrainConfig(instance_prompt="x", optimizer="prodigy", learning_rate=1.0, use_8bit_adam=True,
                       train_text_encoder=True, text_encoder_lr=5e-6, fold_accumulation=True, report_to="none")
    resolved = train_mod.resolve_hardware(base)
    assert (resolved.use_8bit_adam, resolved.text_encoder_lr, resolved.fold_accumulation) == (False, 1.0, False)
    notes = " | ".join(resolved.fallbacks)
    assert "Prodigy has no 8-bit form" in notes and "text encoders train at --learning_rate=1" in notes
    assert "nothing to fold with --gradient_accumulation_steps 1" in notes
    adam = train_mod.resolve_hardware(TrainConfig(instance_prompt="x", use_8bit_adam=True, report_to="none",
                                                  gradient_accumulation_steps=2, fold_accumulation=True))
    assert adam.use_8bit_adam and adam.fold_accumulation and not adam.fallbacks


def test_kaggle_flags_on_a_plain_folder_are_named_as_unused(tiny_model_dir, tmp_path):
    from billiard_lora.train import load_training_images

    data = make_images(tmp_path / "data", n=2)
    config = tiny_config(tiny_model_dir, data, tmp_path / "o", kaggle_class="archery")
    with pytest.warns(UserWarning, match="--kaggle_class/--kaggle_splits select from a Kaggle-layout folder"):
        assert len(load_training_images(config)) == 2


def test_the_speed_options_together_train_the_plain_runs_lora_and_resume_exactly(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """--fold_accumulation, --selective_checkpointing, --fused_lora_ops and a checkpointing interval, all at once
    (with flips, noise offset and Min-SNR): the LoRA of the plain checkpointed run to rounding (another seed: order
    1), and a run resumed from its checkpoint equals the uninterrupted one bit for bit."""
    monkeypatch.setattr(train_mod, "SELECTIVE_FLOPS_PER_ELEMENT", TINY_SELECTIVE)
    data = make_images(tmp_path / "data", n=6)
    base = dict(train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=4, gradient_checkpointing=True,
                random_flip=True, noise_offset=0.05, snr_gamma=5.0, checkpointing_steps=2)
    fast = dict(fold_accumulation=True, selective_checkpointing="products", fused_lora_ops=True,
                gradient_checkpointing_interval=2)
    plain = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "plain", **base)))
    records = _watch_policy(monkeypatch)
    together = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "fast", **base, **fast)))
    assert _kept(records) > 0, "the policy ran and kept outputs"
    gap = math.sqrt(sum(float(((together[k] - plain[k]) ** 2).sum()) for k in plain) /
                    sum(float((plain[k] ** 2).sum()) for k in plain))
    assert together.keys() == plain.keys() and gap < 1e-5, gap  # measured 2.0e-7
    out = tmp_path / "resumed"
    train(tiny_config(tiny_model_dir, data, out, **{**base, **fast, "max_train_steps": 2}))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, out, **base, **fast,
                                             resume_from_checkpoint="latest")))
    assert all(torch.equal(resumed[k], together[k]) for k in together)


def test_init_lora_goes_on_training_an_existing_lora_from_its_weights_rank_and_alpha(tiny_model_dir, tmp_path):
    """--init_lora starts the adapters from an existing LoRA (a run's folder, its kohya file), with that LoRA's
    rank and alpha: one step at a negligible learning rate leaves the LoRA it started from, text encoders included;
    a kohya file starts the same run as the diffusers one; what cannot go on training is one line before any model
    loads."""
    import billiard_lora.lora_tools as lt

    data = make_images(tmp_path / "data", n=4)
    first = train(tiny_config(tiny_model_dir, data, tmp_path / "first", rank=2, lora_alpha=4, max_train_steps=2,
                              train_text_encoder=True, learning_rate=1e-2))
    before = lora_tensors(first)
    ups = [v for k, v in before.items() if k.endswith(("lora.up.weight", "lora_B.weight"))]
    assert any("text_encoder" in k for k in before) and sum(bool(v.abs().sum() > 0) for v in ups) > len(ups) // 2
    kohya = lt.convert_lora(first, "kohya", tmp_path / "first-kohya.safetensors")
    steps = []
    outs = {}
    for name, source in (("folder", first), ("kohya", kohya)):
        outs[name] = train(tiny_config(tiny_model_dir, data, tmp_path / name, init_lora=str(source), max_train_steps=1,
                                       train_text_encoder=True, learning_rate=1e-12, text_encoder_lr=1e-12,
                                       rank=8),  # (rank: the file's)
                           callback=lambda e: e["event"] == "step" and steps.append(e["loss"]))
    used = json.loads((outs["folder"] / "config.json").read_text())
    assert (used["rank"], used["lora_alpha"], used["init_lora"]) == (2, 4, str(first))
    for name, out in outs.items():
        after = lora_tensors(out)
        assert after.keys() == before.keys(), name
        for k in before:  # Adam moves each weight by about the learning rate: 1e-12
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-9, msg=f"{name}: {k}")
    assert steps[0] == pytest.approx(steps[1], rel=1e-6)  # the same starting LoRA, whichever file held it

    with pytest.raises(UserError, match="has text-encoder LoRA layers: add --train_text_encoder"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "no-te", init_lora=str(first)))
    with pytest.raises(UserError, match="is a plain LoRA: drop --use_dora"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "dora", init_lora=str(first), train_text_encoder=True,
                          use_dora=True))
    with pytest.raises(UserError, match="drop --init_lora_weights=pissa"):
        tiny_config(tiny_model_dir, data, tmp_path / "pissa", init_lora=str(first), init_lora_weights="pissa")
    with pytest.raises(UserError, match=r"^--init_lora: .*nope does not exist"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "missing", init_lora=str(tmp_path / "nope")))
    lt.resize_lora(first, tmp_path / "mixed.safetensors", energy=0.6)  # per-layer ranks
    assert len(lt.inspect_lora(tmp_path / "mixed.safetensors")["ranks"]) > 1
    with pytest.raises(UserError, match="going on training needs one rank and one alpha"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "mixed", init_lora=str(tmp_path / "mixed.safetensors"),
                          train_text_encoder=True))
    assert not (tmp_path / "no-te").exists() and not (tmp_path / "missing").exists()  # nothing written
    # a kohya file with a fractional alpha; a kohya DoRA (diffusers drops its magnitudes): refused, not half-loaded
    tensors = load_file(str(kohya))
    odd = {k: (torch.tensor(0.5) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    save_file(odd, str(tmp_path / "half-alpha.safetensors"))
    with pytest.raises(UserError, match="alpha 0.5 is not a whole number"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "half", init_lora=str(tmp_path / "half-alpha.safetensors"),
                          train_text_encoder=True))
    dora = dict(tensors)
    for k, v in tensors.items():
        if k.endswith(".lora_down.weight"):
            dora[k.replace(".lora_down.weight", ".dora_scale")] = torch.ones(1, v.shape[1])
    save_file(dora, str(tmp_path / "kohya-dora.safetensors"))
    with pytest.raises(UserError, match="is a kohya DoRA"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "kd", init_lora=str(tmp_path / "kohya-dora.safetensors"),
                          train_text_encoder=True, use_dora=True))
    peft_dir = tmp_path / "peft"  # peft's own adapter file: keys that name no component
    peft_dir.mkdir()
    save_file({"base_model.model." + k[len("unet."):].replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."):
               v for k, v in before.items() if k.startswith("unet.")}, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="is a peft adapter file; convert it first"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "p", init_lora=str(peft_dir)))
    # a file whose layers the model's adapters cannot all take (here: no text encoders for theirs) is refused
    from billiard_lora.lora_tools import load_init_lora
    from billiard_lora.models import load_components
    from billiard_lora.lora import add_lora

    c = load_components(str(tiny_model_dir))
    add_lora(c.unet, rank=2, alpha=4)
    with pytest.raises(UserError, match=r"LoRA layers could be loaded|does not fit this model"):
        load_init_lora(first / "pytorch_lora_weights.safetensors", c.unet, [])  # (no text encoders to take theirs)


# ---------------------------------------------------------------- --loraplus_lr_ratio
@pytest.mark.parametrize("ratio", [None, 4.0])
def test_loraplus_trains_the_b_matrices_at_its_multiple_of_the_learning_rate(tiny_model_dir, tiny_components,
                                                                              tmp_path, ratio):
    """Adam's first update moves each weight by the learning rate (its sign from the gradient); B starts at 0, so
    after one step every B entry that had a gradient is +-lr, and with LoRA+ +-lr x ratio, in the UNet and the text
    encoders, each at its own rate."""
    c = tiny_components
    train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "out", max_train_steps=1,
                      train_text_encoder=True, text_encoder_lr=1e-4, loraplus_lr_ratio=ratio), components=c)
    for model, lr in ((c.unet, 1e-3), (c.text_encoder_one, 1e-4), (c.text_encoder_two, 1e-4)):
        b = torch.cat([p.detach().abs().flatten() for n, p in model.named_parameters() if "lora_B" in n])
        moved = b[b > 0]
        assert len(moved) > 0.5 * len(b)
        assert moved.median().item() == pytest.approx(lr * (ratio or 1), rel=0.02)


def test_loraplus_groups_work_with_every_optimizer_and_resume_exactly(tiny_model_dir, tmp_path):
    from billiard_lora.lora import add_lora
    from billiard_lora.models import load_components
    from billiard_lora.optim import make_optimizer

    c = load_components(str(tiny_model_dir))
    add_lora(c.unet, rank=2, alpha=2, use_dora=True)
    names = {id(p): n for n, p in c.unet.named_parameters()}
    for kw in (dict(), dict(use_8bit_adam=True), dict(optimizer="prodigy", learning_rate=1.0)):
        cfg = TrainConfig(instance_prompt="x", loraplus_lr_ratio=16.0, **kw)
        slow, fast = make_optimizer(cfg, c.unet, [], 1).param_groups
        assert slow["lr"] == cfg.learning_rate and fast["lr"] == 16 * cfg.learning_rate
        assert all("lora_A" in names[id(p)] for p in slow["params"])
        assert {names[id(p)].split(".")[-3] for p in fast["params"]} == {"lora_B", "lora_magnitude_vector"}
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=4, checkpointing_steps=2, loraplus_lr_ratio=8.0, learning_rate=1e-4)
    full = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw)))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(3))
    with pytest.raises(UserError, match="was made with loraplus=True but this run has loraplus=False"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest",
                          **{**kw, "loraplus_lr_ratio": None}))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "resumed",
                                             resume_from_checkpoint="latest", **kw)))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ---------------------------------------------------------------- Ctrl-C / SIGTERM
def signal_at_step(step: int, *signums: int):
    import signal

    def callback(event):
        if event["event"] == "step" and event["step"] == step:
            for s in signums or (signal.SIGINT,):
                os.kill(os.getpid(), s)
    return callback


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_finishes_the_step_saves_a_checkpoint_and_resumes_exactly(tiny_model_dir, tmp_path, signame):
    """Ctrl-C (or a scheduler's SIGTERM) mid-run: the step under way completes, checkpoint-3 is saved (the run's own
    checkpoints come every 100 steps), the run stops with what to do; resuming gives the uninterrupted LoRA."""
    import signal

    data = make_images(tmp_path / "data", n=5)
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=100, random_flip=True,
              lora_dropout=0.1, snr_gamma=5.0)
    full = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw)))
    before = signal.getsignal(getattr(signal, signame))
    with pytest.raises(KeyboardInterrupt, match=r"stopped at step 3 by (Ctrl-C|SIGTERM): .*checkpoint-3 is kept: "
                                                r"add --resume_from_checkpoint=latest"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "stopped", **kw),
              callback=signal_at_step(3, getattr(signal, signame)))
    assert signal.getsignal(getattr(signal, signame)) is before  # the handler is put back
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["checkpoint-3"]
    assert not (tmp_path / "stopped" / "pytorch_lora_weights.safetensors").exists()
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "stopped",
                                             resume_from_checkpoint="latest", **kw)))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_second_ctrl_c_stops_at_once(tiny_model_dir, tmp_path):
    import signal

    data = make_images(tmp_path / "data", n=3)
    with pytest.raises(KeyboardInterrupt) as info:
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=5, checkpointing_steps=100),
              callback=signal_at_step(2, signal.SIGINT, signal.SIGINT))
    assert "at step" not in str(info.value) and not list_checkpoints(tmp_path / "out")


def test_cli_ctrl_c_during_training_saves_and_says_how_to_go_on(tiny_model_dir, tmp_path):
    """The command line, stopped by a terminal's Ctrl-C once it trains (SIGINT to its process group, data loader
    workers included): exit 130, a checkpoint, one line saying how to go on, no traceback."""
    import signal
    import time

    data = make_images(tmp_path / "data", n=8, size=32)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "billiard_lora.train", f"--pretrained_model_name_or_path="
                             f"{tiny_model_dir}", f"--instance_data_dir={data}", f"--output_dir={out}",
                             "--instance_prompt=a photo of sks billiard", "--resolution=32", "--max_train_steps=100000",
                             "--checkpointing_steps=100000", "--report_to=none", "--seed=0",
                             "--train_batch_size=1", "--gradient_accumulation_steps=3",
                             "--dataloader_num_workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + 120
    while (out / "config.json").exists() is False and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # (config.json is written just before the loop: let it take some steps)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    (ckpt,) = list_checkpoints(out)
    assert f"interrupted; stopped at step {ckpt.name.split('-')[1]} by Ctrl-C: {ckpt} is kept" in stderr


# ---------------------------------------------------------------- --shuffle_caption / --keep_tokens
def test_shuffle_tags_keeps_the_first_tags_and_every_tag():
    import random

    from billiard_lora.train import shuffle_tags

    caption = "sks billiard,  green felt, red ball ,cue, lamp, smoke"
    orders = {shuffle_tags(caption, 1, random.Random(i)) for i in range(30)}
    assert len(orders) > 10
    for order in orders:
        tags = order.split(", ")
        assert tags[0] == "sks billiard" and sorted(tags) == sorted(t.strip() for t in caption.split(","))
    assert shuffle_tags("a photo of sks billiard", 0, random.Random(0)) == "a photo of sks billiard"


def test_shuffled_captions_change_per_epoch_train_through_the_encoders_and_resume_exactly(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    from billiard_lora.train import DreamBoothDataset, TrainImage

    tags = "sks billiard, green felt, red ball, cue, lamp"
    data = make_images(tmp_path / "data", n=3, captions={i: tags for i in range(3)})
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "x", caption_column="prompt", shuffle_caption=True,
                      keep_tokens=1)
    images = [TrainImage(Image.new("RGB", (48, 48)), tags, f"k{i}") for i in range(3)]
    dataset = DreamBoothDataset(images, [], cfg)
    drawn = [dataset[(epoch, 0)]["instance"]["caption"] for epoch in range(6)]
    assert len(set(drawn)) > 2 and all(c.startswith("sks billiard, ") for c in drawn)
    assert dataset[(2, 1)]["instance"]["caption"] == DreamBoothDataset(images, [], cfg)[(2, 1)]["instance"]["caption"]
    assert dataset[(0, 0)]["instance"]["pixel_values"].equal(
        DreamBoothDataset(images, [], cfg.replace(shuffle_caption=False, keep_tokens=0))[(0, 0)]["instance"][
            "pixel_values"])  # crops and flips as without shuffling

    encoded = []
    real = train_mod.encode_prompt
    monkeypatch.setattr(train_mod, "encode_prompt", lambda *a, **k: encoded.append(1) or real(*a, **k))
    kw = dict(max_train_steps=6, checkpointing_steps=3, caption_column="prompt", shuffle_caption=True, keep_tokens=1)
    full = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw)))
    assert len(encoded) >= 6  # in every step, not once ahead
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "resumed",
                                             resume_from_checkpoint="latest", **kw)))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    plain = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "plain", max_train_steps=6,
                                           caption_column="prompt")))
    assert any(not torch.equal(full[k], plain[k]) for k in full)
    with pytest.raises(UserError, match="--keep_tokens=1 keeps the first tags in place when --shuffle_caption"):
        tiny_config(tiny_model_dir, data, tmp_path / "y", keep_tokens=1)


# ---------------------------------------------------------------- --optimizer AdamW_ScheduleFree
def test_schedule_free_saves_its_averaged_weights_validates_them_and_resumes_exactly(tiny_model_dir, tiny_components,
                                                                                     tmp_path):
    """The LoRA files hold schedule-free AdamW's averaged (eval-mode) weights, not the ones it trains; a run that
    validated and checkpointed along the way, crashed and resumed ends bit for bit where one that did neither ends."""
    from billiard_lora.lora import peft_state_dict

    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=6, optimizer="AdamW_ScheduleFree", learning_rate=1e-3, gradient_accumulation_steps=2)
    c = tiny_components
    quiet = train(tiny_config(tiny_model_dir, data, tmp_path / "quiet", **kw), components=c)
    trained = {k: v.detach().clone() for k, v in peft_state_dict(c.unet).items()}  # the weights it trains (y)
    saved = lora_tensors(quiet)
    ups = {k.removeprefix("unet.").removesuffix(".lora.up.weight"): v for k, v in saved.items() if ".lora.up." in k}
    bs = {k.removesuffix(".lora_B.weight"): v for k, v in trained.items() if k.endswith(".lora_B.weight")}
    assert ups.keys() == bs.keys() and any(not torch.equal(ups[k], bs[k]) for k in ups)
    busy = dict(kw, checkpointing_steps=2, validation_prompt="a photo of sks billiard", validation_steps=2,
                num_validation_images=1, validation_inference_steps=2)
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "busy", **busy), callback=crash_at_step(5))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "busy", resume_from_checkpoint="latest",
                                             **busy)))
    assert saved.keys() == resumed.keys() and all(torch.equal(saved[k], resumed[k]) for k in saved)
    adamw = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "adamw", max_train_steps=6,
                                           learning_rate=1e-3, gradient_accumulation_steps=2)))
    assert any(not torch.equal(saved[k], adamw[k]) for k in saved)


@pytest.mark.parametrize("optimizer", ["Adafactor", "Lion8bit"])
def test_adafactor_and_lion_train_and_resume_exactly(tiny_model_dir, tmp_path, optimizer):
    """kohya's --optimizer_type AdaFactor / Lion8bit: each trains the LoRA its own way (not AdamW's), and a run that
    crashed after a checkpoint and resumed ends bit for bit where an uninterrupted one ends (its state restored)."""
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=4, optimizer=optimizer, learning_rate=1e-3, checkpointing_steps=2, use_8bit_adam=True)
    whole = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "whole", **kw)))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", **kw), callback=crash_at_step(3))
    resumed = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "crashed",
                                             resume_from_checkpoint="latest", **kw)))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["use_8bit_adam"] is False and any("--use_8bit_adam is for AdamW" in n for n in saved["fallbacks"])
    adamw = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "adamw", max_train_steps=4,
                                           learning_rate=1e-3)))
    assert any(not torch.equal(whole[k], adamw[k]) for k in whole)
    with pytest.raises(UserError, match="was made with optimizer="):
        train(tiny_config(tiny_model_dir, data, tmp_path / "crashed", resume_from_checkpoint="latest",
                          max_train_steps=6, learning_rate=1e-3, checkpointing_steps=2))


@pytest.mark.parametrize("kw, message", [
    (dict(lr_scheduler="cosine"), "needs no learning-rate schedule"),
    (dict(use_ema=True), "already averages the weights: drop --use_ema"),
    (dict(train_text_encoder_ti=True, instance_prompt="a photo of TOK"), "cannot stop the token embeddings"),
])
def test_schedule_free_refuses_a_schedule_and_a_second_average(tiny_model_dir, tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "o", optimizer="adamwschedulefree", **kw)


def test_kohya_folder_repeats_make_an_epoch(tiny_model_dir, tmp_path):
    """3_sks billiard/ (2 images) and 1_billiard/ (1 image): 7 views an epoch, so one epoch at batch 1 is 7 steps,
    each image decoded and encoded once."""
    data = tmp_path / "kohya"
    make_images(data / "3_sks billiard", n=2)
    make_images(data / "1_billiard", n=1)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=None, num_train_epochs=1,
                            train_batch_size=1))
    assert len((out / "loss_history.csv").read_text().strip().splitlines()) == 1 + 7


def test_a_kohya_regularisation_folder_gives_the_class_images_and_their_prompts(tiny_model_dir, tmp_path):
    """--class_data_dir in kohya's layout (its --reg_data_dir): every image, N times, prompted by its .txt or its
    folder's words; no --class_prompt needed, nothing generated."""
    reg = tmp_path / "reg"
    make_images(reg / "2_a photo of a man", n=2)
    make_images(reg / "1_woman", n=1, size=40)  # (other bytes than the man folder's first image)
    (reg / "1_woman" / "img_0.txt").write_text("a woman at a billiard table")
    before = sorted(p.name for p in reg.rglob("*"))
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "out",
                      with_prior_preservation=True, class_data_dir=str(reg), max_train_steps=1)
    assert cfg.class_prompt is None and cfg.kohya_class_folder
    images = train_mod.ensure_class_images(cfg, None, None, None)
    assert sorted(im.caption for im in images) == ["a photo of a man"] * 4 + ["a woman at a billiard table"]
    assert len({im.key for im in images}) == 3
    train(cfg)
    assert sorted(p.name for p in reg.rglob("*")) == before  # used as they are
    with pytest.raises(UserError, match="needs --class_prompt .* or a --class_data_dir in kohya's layout"):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "x", with_prior_preservation=True,
                    class_data_dir=str(tmp_path / "data"))


# ---------------------------------------------------------------- --report_to wandb
def test_report_to_wandb_logs_losses_and_validation_images_offline(tiny_model_dir, tmp_path, monkeypatch):
    """diffusers' README runs with --report_to="wandb": the run goes to Weights & Biases (here WANDB_MODE=offline,
    kept under the run's logs/), losses by step and each validation row of seeds as images."""
    from accelerate.tracking import WandBTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = WandBTracker.log
    monkeypatch.setattr(WandBTracker, "log", lambda self, values, step=None, **kw: logged.append((step, values)) or
                        real_log(self, values, step=step, **kw))
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "out", report_to="all",
                            max_train_steps=2, validation_prompt="a photo of sks billiard", validation_steps=2,
                            extra_validation_prompts=["a red ball"], num_validation_images=2,
                            validation_inference_steps=2))
    assert [s for s, v in logged if "loss" in v] == [1, 2]
    images = {k: (s, v) for s, values in logged for k, v in values.items() if k.startswith("validation/")}
    assert set(images) == {"validation/0: a photo of sks billiard", "validation/1: a red ball"}
    assert all(len(v) == 2 and v[0]._caption == "seed 0" for _, v in images.values())
    assert list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))  # the run, on disk
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # and TensorBoard's too (report_to all)


def test_report_to_a_logger_that_is_not_installed_trains_without_it(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "out", report_to="all",
                            max_train_steps=1))
    saved = json.loads((out / "config.json").read_text())
    assert saved["report_to"] == "tensorboard"
    assert any("the wandb package is not installed (pip install wandb)" in f for f in saved["fallbacks"])
