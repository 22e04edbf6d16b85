"""The LoRA toolbox on LoRAs trained for a few steps on the tiny SDXL pipeline (CPU, seconds per test).

The trained LoRA has rank 4, alpha 8 (scale 2, so an alpha lost anywhere shows in the images) and adapts both
text encoders, so every component and both alpha conventions are exercised.
"""

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
from safetensors.torch import load_file, save_file

from billiard_lora import lora_tools as lt
from billiard_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def sample(pipe, **kw) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks billiard", num_inference_steps=2, height=32, width=32, generator=g,
                output_type="np", **kw).images[0]


def fresh(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(model_dir))


def with_lora(model_dir: Path, lora_path: Path):
    pipe = fresh(model_dir)
    path = lt.resolve_lora_path(lora_path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipe


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A training output folder: 3 steps, rank 4, lora_alpha 8, LoRA on the UNet and both text encoders."""
    from test_train import make_images, tiny_config

    from billiard_lora.train import train

    root = tmp_path_factory.mktemp("lora-tools")
    cfg = tiny_config(tiny_model_dir, make_images(root / "data"), root / "out", rank=4, lora_alpha=8,
                      train_text_encoder=True, learning_rate=1e-2)
    return train(cfg)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, trained) -> dict[str, np.ndarray]:
    """Images from stock diffusers: the base model, and the base model with the trained LoRA loaded."""
    return {"base": sample(fresh(tiny_model_dir)), "lora": sample(with_lora(tiny_model_dir, trained))}


@pytest.fixture(scope="module")
def kohya_file(trained, tmp_path_factory) -> Path:
    return lt.convert_lora(trained, "kohya", tmp_path_factory.mktemp("kohya") / "billiards.safetensors")


def module_deltas(pipe) -> dict[tuple[str, str], tuple[torch.Tensor, int]]:
    """(ΔW, rank) that the loaded pipeline actually applies, per (component, module name)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in lt.COMPONENTS:
        for name, m in getattr(pipe, comp).named_modules():
            if isinstance(m, LoraLayer) and m.lora_A:
                a = next(iter(m.lora_A))
                delta = (m.lora_B[a].weight.flatten(1) @ m.lora_A[a].weight.flatten(1)).double() * m.scaling[a]
                out[comp, name.removeprefix("text_model.")] = (delta, m.r[a])  # names as in file_deltas
    return out


def file_deltas(path: Path) -> dict[tuple[str, str], torch.Tensor]:
    """ΔW per (component, module name) as the file defines it (names normalised to the loaded modules')."""
    out = {}
    for layer in lt.load_lora_file(path).layers.values():
        module = layer.module.removeprefix("text_model.")  # CLIPTextModel lost .text_model in transformers 5
        if layer.component == "unet" and module.startswith(("down_blocks_", "mid_block_", "up_blocks_")):
            continue  # kohya names are compared through the loaded pipeline instead
        out[layer.component, module] = layer.delta()
    return out


# ============================================================================ inspect
def test_inspect_reports_format_base_model_ranks_alphas_and_training_config(trained):
    r = lt.inspect_lora(trained)
    assert r["format"] == "diffusers" and r["base_model"] == "SDXL"
    assert r["layers"] == {"unet": 96, "text_encoder": 12, "text_encoder_2": 12}
    assert r["ranks"] == {"4": 120} and r["alphas"] == {"8": 120} and r["scales"] == {"2": 120}
    assert r["target_modules"]["unet"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert r["target_modules"]["text_encoder"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert r["text_encoder_lora"] is True and r["dora"] is False
    tensors = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    assert r["parameters"] == sum(t.numel() for t in tensors.values())
    assert r["training_config"]["rank"] == 4 and r["training_config"]["lora_alpha"] == 8
    assert len(r["per_layer"]) == 120 and {p["alpha"] for p in r["per_layer"]} == {8}
    text = lt.format_inspect(r)
    assert "SDXL" in text and "8 (x120)" in text and "learning_rate=0.01" in text


def test_inspect_cli_json_on_a_kohya_file(kohya_file, capsys):
    assert lt.main(["inspect", str(kohya_file), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "kohya" and r["base_model"] == "SDXL"
    assert r["alphas"] == {"8": 120} and r["alpha_source"].startswith("stored per layer")
    assert r["loads_in"]["comfyui_not_loaded"] == 0 and r["loads_in"]["a1111_not_loaded"] == 0
    assert r["kohya_metadata"]["ss_network_alpha"] == "8" and r["training_config"]["rank"] == 4


def test_the_tools_take_a_lora_on_the_hub_by_its_repo_id(kohya_file, hub_cache, tmp_path, capsys):
    """inspect / convert / resize read a LoRA on the Hugging Face Hub (owner/name[/FILE.safetensors]) through the
    Hub's cache, offline here; one not cached is one line saying how to get it."""
    snap = hub_cache("someone/billiard-kohya", {"billiard.safetensors": kohya_file})
    assert lt.resolve_lora_path("someone/billiard-kohya/billiard.safetensors") == snap / "billiard.safetensors"
    assert lt.main(["inspect", "someone/billiard-kohya/billiard.safetensors", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "kohya" and r["base_model"] == "SDXL" and r["alphas"] == {"8": 120}
    out = tmp_path / "diffusers"
    assert lt.main(["convert", "someone/billiard-kohya/billiard.safetensors", "--to", "diffusers", "--out",
                    str(out)]) == 0
    assert lt.inspect_lora(out)["format"] == "diffusers"
    assert snap.joinpath("billiard.safetensors").read_bytes() == kohya_file.read_bytes()  # the cache left alone
    capsys.readouterr()
    assert lt.main(["inspect", "someone/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Hub's cache does not hold it" in err and "hf download someone/not-cached" in err


@pytest.mark.parametrize("keys, shape, family", [
    # SD1.5: attention in down_blocks.0, cross-attention from CLIP-L (768)
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"], (4, 768), "SD1.x"),
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"], (4, 1024), "SD2.x"),
    # SDXL: cross-attention from CLIP-L + bigG (2048), even on a single layer
    (["unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"], (4, 2048), "SDXL"),
    (["lora_unet_output_blocks_1_1_transformer_blocks_5_attn1_to_q"], (4, 1280), "SDXL"),
    (["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"], (4, 1280), "SDXL"),
])
def test_base_model_is_told_from_names_and_shapes(tmp_path, keys, shape, family):
    tensors = {}
    for name in keys:
        kohya = name.startswith("lora_")
        down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora.down.weight", ".lora.up.weight")
        tensors[name + down] = torch.zeros(shape)
        tensors[name + up] = torch.zeros(shape[1], shape[0])
    save_file(tensors, str(tmp_path / "x.safetensors"))
    assert lt.detect_base_model(lt.load_lora_file(tmp_path / "x.safetensors"))[0] == family


# ============================================================================ convert and the loaders' key rules
def test_converted_kohya_keys_all_load_in_comfyui_and_a1111_and_a_corrupted_key_is_reported(kohya_file, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    tensors = load_file(str(kohya_file))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)  # CLIP's canonical names
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)
    config = UNet2DConditionModel.load_config(str(tiny_model_dir / "unet"))
    for against in (config, lt.SDXL_UNET_CONFIG):  # the tiny model itself, and SDXL base 1.0 (same block layout)
        report = lt.kohya_key_report(tensors, against, text_encoder_layers=(3, 3))
        assert report.ok, report.summary()
        assert report.total == len(tensors) == 360  # 120 layers x (down, up, alpha)

    names = [f"unet.{n}" for n in lt.unet_module_names(config)]
    bad = dict(tensors)
    good_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    bad[good_key.replace("to_q", "to_qq")] = bad.pop(good_key)
    bad["lora_te1_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = bad.pop(
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight")
    report = lt.kohya_key_report(bad, names, text_encoder_layers=(3, 3))
    assert good_key.replace("to_q", "to_qq") in report.comfyui and good_key.replace("to_q", "to_qq") in report.a1111
    assert "lora_te1_encoder_layers_0_self_attn_q_proj.lora_up.weight" in report.comfyui
    # the down half of that text-encoder layer is left without its up half: A1111 drops it too
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in report.a1111
    assert not report.ok and len(report.comfyui) < 10


def test_save_lora_kohya_output_loads_in_comfyui_and_a1111(tiny_model_dir, tmp_path):
    from billiard_lora.lora import add_lora, save_lora

    pipe = fresh(tiny_model_dir)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        add_lora(model, rank=2, init_lora_weights=False)
    save_lora(tmp_path, unet=pipe.unet, text_encoder_one=pipe.text_encoder, text_encoder_two=pipe.text_encoder_2,
              kohya=True)
    tensors = load_file(str(tmp_path / "pytorch_lora_weights_kohya.safetensors"))
    report = lt.kohya_key_report(tensors, pipe)
    assert report.ok, report.summary()


def test_the_key_rules_know_sdxls_original_block_layout():
    sgm = lt._sgm_names(lt.unet_module_names(lt.SDXL_UNET_CONFIG))
    attn = "transformer_blocks.0.attn1.to_q"
    assert sgm[f"down_blocks.1.attentions.0.{attn}"] == f"input_blocks.4.1.{attn}"
    assert sgm["up_blocks.0.attentions.2.proj_out"] == "output_blocks.2.1.proj_out"
    assert sgm["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert sgm["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert sgm["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert sgm["add_embedding.linear_1"] == "label_emb.0.0"
    # SGM-named kohya keys (what kohya's own SDXL trainer writes) load in both
    sgm_keys = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    assert lt.kohya_key_report(sgm_keys).ok
    # A1111 maps up_blocks.0's upsampler to output_blocks.2.1 (right for SD1, not SDXL); ComfyUI gets it right
    up = [f"lora_unet_up_blocks_0_upsamplers_0_conv.{part}" for part in ("lora_down.weight", "lora_up.weight")]
    report = lt.kohya_key_report(up)
    assert report.comfyui == [] and len(report.a1111) == 2


def test_kohya_round_trip_reloads_into_stock_diffusers_with_identical_images(trained, kohya_file, reference,
                                                                              tiny_model_dir, tmp_path):
    back = lt.convert_lora(kohya_file, "diffusers", tmp_path / "back")
    assert back == tmp_path / "back" / "pytorch_lora_weights.safetensors"
    r = lt.inspect_lora(back)
    assert r["format"] == "diffusers" and r["alphas"] == {"8": 120}, "alpha must survive, not be baked in"
    assert r["training_config"]["rank"] == 4
    for path in (kohya_file, back):
        pipe = with_lora(tiny_model_dir, path)
        assert lt.count_lora_layers(pipe) == {"unet": 96, "text_encoder": 12, "text_encoder_2": 12}
        np.testing.assert_allclose(sample(pipe), reference["lora"], atol=1e-5)
    assert np.abs(reference["lora"] - reference["base"]).max() > 1e-2  # the LoRA does change the image


def test_pre_peft_diffusers_files_convert_to_kohya_too(kohya_file, tiny_model_dir, tmp_path):
    """2023-era SDXL LoRAs name layers "attn1.processor.to_q_lora.down.weight" (and store no alpha)."""
    from diffusers import StableDiffusionXLPipeline

    old_style, _ = StableDiffusionXLPipeline.lora_state_dict(str(kohya_file))
    assert any(".processor.to_q_lora.down.weight" in k for k in old_style)
    save_file(old_style, str(tmp_path / "old.safetensors"))
    assert lt.load_lora_file(tmp_path / "old.safetensors").format == "diffusers"
    converted = lt.convert_lora(tmp_path / "old.safetensors", "kohya", tmp_path / "new.safetensors")
    assert lt.kohya_key_report(load_file(str(converted)), text_encoder_layers=(3, 3)).ok
    old, new = (module_deltas(with_lora(tiny_model_dir, f)) for f in (tmp_path / "old.safetensors", converted))
    assert set(old) == set(new) and len(old) == 120
    for key in old:
        torch.testing.assert_close(new[key][0], old[key][0])


def test_convert_refuses_to_overwrite_its_input(kohya_file):
    with pytest.raises(UserError, match="input file"):
        lt.convert_lora(kohya_file, "kohya", kohya_file)


# ============================================================================ resize
def test_resize_to_the_original_rank_reproduces_every_delta(trained, reference, tiny_model_dir, tmp_path):
    out, infos = lt.resize_lora(trained, tmp_path / "r4", rank=4)
    src, res = lt.load_lora_file(trained), lt.load_lora_file(out)
    biggest = max(layer.delta().abs().max().item() for layer in src.layers.values())
    for name, layer in src.layers.items():
        assert res.layers[name].rank == 4 and res.layers[name].scale == 1.0
        assert (res.layers[name].delta() - layer.delta()).abs().max().item() <= 1e-6 * biggest
    assert all(abs(i.energy - 1.0) < 1e-9 for i in infos)
    assert lt.inspect_lora(out)["training_config"]["rank"] == 4  # the header travels along
    np.testing.assert_allclose(sample(with_lora(tiny_model_dir, out)), reference["lora"], atol=1e-5)


def test_resize_to_a_lower_rank_loses_exactly_the_discarded_singular_values(trained, tmp_path):
    out, infos = lt.resize_lora(trained, tmp_path / "r2", rank=2)
    src, res = lt.load_lora_file(trained), lt.load_lora_file(out)
    checked = 0
    for info in infos:
        delta = src.layers[info.name].delta()
        s = torch.linalg.svdvals(delta)  # independent of the QR shortcut inside the tool
        if s[0] == 0:
            continue  # an untrained layer
        error = torch.linalg.matrix_norm(delta - res.layers[info.name].delta()).item()
        assert math.isclose(error, s[2:].norm().item(), rel_tol=1e-6, abs_tol=1e-12)  # Eckart-Young
        assert math.isclose(info.energy, (s[:2].square().sum() / s.square().sum()).item(), rel_tol=1e-9)
        assert res.layers[info.name].rank == 2
        checked += 1
    assert checked > 100


def test_resize_by_energy_picks_per_layer_ranks_that_stock_diffusers_applies_exactly(trained, tiny_model_dir, tmp_path):
    out, infos = lt.resize_lora(trained, tmp_path / "e", energy=0.9)
    assert len({i.new_rank for i in infos}) > 1, "a trained LoRA should need different ranks per layer"
    for i in infos:
        if i.singular_values[0] == 0:
            continue  # an untrained layer
        cum = i.singular_values.square().cumsum(0) / i.singular_values.square().sum()
        assert i.energy >= 0.9 - 1e-12 and (i.new_rank == 1 or cum[i.new_rank - 2] < 0.9)  # the fewest reaching 0.9
    loaded = module_deltas(with_lora(tiny_model_dir, out))
    wanted = file_deltas(out)
    assert set(loaded) == set(wanted) and len(wanted) == 120
    for key, delta in wanted.items():
        torch.testing.assert_close(loaded[key][0], delta, atol=1e-7, rtol=1e-5)


def test_resized_kohya_file_stays_kohya_and_loads_at_the_right_strength(kohya_file, tiny_model_dir, tmp_path):
    out, infos = lt.resize_lora(kohya_file, tmp_path / "small.safetensors", energy=0.8)
    res = lt.load_lora_file(out)
    assert res.format == "kohya" and len({i.new_rank for i in infos}) > 1
    assert lt.kohya_key_report(res.tensors, text_encoder_layers=(3, 3)).ok
    for info in infos:  # in the file: each layer is the top-k SVD part of the original's ΔW
        full = lt.load_lora_file(kohya_file).layers[info.name].delta()
        u, s, vh = torch.linalg.svd(full)
        k = info.new_rank
        torch.testing.assert_close(res.layers[info.name].delta(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-7, rtol=1e-5)
    # through diffusers' own kohya loader, every module gets exactly that (one alpha for all layers; the factors of
    # layers whose rank differs carry the correction), even though ranks differ from layer to layer
    loaded = module_deltas(with_lora(tiny_model_dir, out))
    original = module_deltas(with_lora(tiny_model_dir, kohya_file))
    assert set(loaded) == set(original) and len(loaded) == 120
    for key, (delta, k) in loaded.items():
        u, s, vh = torch.linalg.svd(original[key][0])
        torch.testing.assert_close(delta, (u[:, :k] * s[:k]) @ vh[:k], atol=1e-7, rtol=1e-5)


def test_resize_arguments_are_checked(trained, tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        lt.resize_lora(trained, tmp_path / "x", rank=2, energy=0.9)
    with pytest.raises(UserError, match="energy"):
        lt.resize_lora(trained, tmp_path / "x", energy=1.5)
    top = max(layer.rank for layer in lt.load_lora_file(trained).layers.values())
    with pytest.raises(UserError, match=f"--rank {top + 1} is above this LoRA's rank \\({top}\\).*only lower"):
        lt.resize_lora(trained, tmp_path / "x", rank=top + 1)


# ============================================================================ merge
def test_merged_pipeline_gives_the_base_plus_lora_image(trained, tiny_model_dir, tmp_path):
    out = lt.merge_lora(trained, str(tiny_model_dir), tmp_path / "merged", scale=0.5)
    merged = fresh(out)  # stock StableDiffusionXLPipeline.from_pretrained
    assert lt.count_lora_layers(merged) == {"unet": 0, "text_encoder": 0, "text_encoder_2": 0}
    assert list((out / "unet").glob("*.safetensors"))
    expected = sample(with_lora(tiny_model_dir, trained), cross_attention_kwargs={"scale": 0.5})
    np.testing.assert_allclose(sample(merged), expected, atol=1e-4)
    assert json.loads((out / "merged_lora.json").read_text())["scale"] == 0.5
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "the merged folder must get mkdir's mode, not mkdtemp's 0700"


def test_merge_refuses_a_lora_whose_layers_are_not_in_the_model(tiny_model_dir, tmp_path):
    name = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"  # the tiny UNet has two blocks
    save_file({f"{name}.lora.down.weight": torch.ones(2, 64), f"{name}.lora.up.weight": torch.ones(64, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError):
        lt.merge_lora(tmp_path / "other.safetensors", str(tiny_model_dir), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ============================================================================ SVD-based initialisation
def test_init_lora_weights_values_are_validated():
    assert lt.validate_init_lora_weights("gaussian") == "gaussian"
    assert lt.validate_init_lora_weights("PiSSA") == "pissa"
    assert lt.validate_init_lora_weights("pissa_niter_16") == "pissa_niter_16"
    assert lt.validate_init_lora_weights("olora") == "olora"
    assert lt.validate_init_lora_weights("true") is True and lt.validate_init_lora_weights(False) is False
    for bad in ("pisa", "pissa_niter_", "pissa_niter_x", "loftq", "kaiming"):
        with pytest.raises(UserError, match="init_lora_weights"):
            lt.validate_init_lora_weights(bad)
    with pytest.raises(UserError, match="use_dora"):
        lt.validate_init_lora_weights("pissa", use_dora=True)
    assert lt.is_mutating_init("pissa_niter_4") and not lt.is_mutating_init("gaussian")


def unet_output(unet) -> torch.Tensor:
    """One UNet forward on fixed inputs: cheaper than a pipeline run and just as telling about the weights."""
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(latents, 500, context, added_cond_kwargs=added).sample


def test_pissa_adapter_must_be_saved_as_a_delta_to_load_into_the_stock_model(tiny_model_dir, tmp_path):
    from billiard_lora.lora import add_lora, peft_state_dict, save_lora

    unet = fresh(tiny_model_dir).unet
    base_out = unet_output(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    add_lora(unet, rank=4, alpha=8, init_lora_weights="pissa_niter_4")
    initial = {k: v.detach().clone() for k, v in peft_state_dict(unet).items()}
    after = unet.state_dict()
    residual = [k for k in after
                if ".base_layer." in k and not torch.equal(after[k], before[k.replace(".base_layer", "")])]
    assert len(residual) == 96, "PiSSA moves the principal part of every adapted weight into the adapter"
    torch.testing.assert_close(unet_output(unet), base_out, atol=1e-5, rtol=1e-4)  # ... keeping the function

    g = torch.Generator().manual_seed(1)  # stand-in for training: move every A and B
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    trained_out = unet_output(unet)
    assert (trained_out - base_out).abs().max() > 1e-3

    saved = lt.save_pissa_lora(tmp_path / "delta", {"unet": initial}, unet=unet, metadata={"rank": 4})
    r = lt.inspect_lora(saved)
    assert r["ranks"] == {"8": 96} and r["scales"] == {"2": 96} and not r["warnings"]
    torch.testing.assert_close(unet_output(with_lora(tiny_model_dir, saved).unet), trained_out, atol=1e-5, rtol=1e-4)

    # Saving the trained A, B as they are gives a LoRA that only fits the residual model ...
    unet.peft_config["default"].init_lora_weights = True
    naive = save_lora(tmp_path / "naive", unet=unet)
    assert (unet_output(with_lora(tiny_model_dir, naive).unet) - trained_out).abs().max() > 1e-2
    # ... and with the pissa init left in its config, diffusers would re-run PiSSA on the user's model: flagged
    unet.peft_config["default"].init_lora_weights = "pissa_niter_4"
    flagged = save_lora(tmp_path / "flagged", unet=unet)
    assert any("init_lora_weights=pissa_niter_4" in w for w in lt.inspect_lora(flagged)["warnings"])


def test_pissa_to_lora_is_the_difference_of_the_two_products():
    g = torch.Generator().manual_seed(0)
    a0, b0, a, b = (torch.randn(s, generator=g) for s in ((3, 5), (7, 3), (3, 5), (7, 3)))
    out = lt.pissa_to_lora({"m.lora_A.weight": a0, "m.lora_B.weight": b0}, {"m.lora_A.weight": a, "m.lora_B.weight": b})
    torch.testing.assert_close(out["m.lora_B.weight"] @ out["m.lora_A.weight"], b @ a - b0 @ a0)
    cfg = lt.mutated_init_config({"r": 3, "lora_alpha": 6, "init_lora_weights": "pissa", "rank_pattern": {"x": 2}})
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"], cfg["rank_pattern"]) == (6, 12, True, {"x": 4})


# ============================================================================ command line
def test_cli_errors_are_one_line_and_commands_print_what_they_did(trained, tmp_path, capsys):
    assert lt.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
    assert lt.main(["resize", str(trained), "--out", str(tmp_path / "x")]) == 2  # neither --rank nor --energy
    assert "error:" in capsys.readouterr().err
    assert lt.main(["resize", str(trained), "--rank", "2", "--out", str(tmp_path / "r2"), "--quiet"]) == 0
    assert "total rank 480 -> 240" in capsys.readouterr().out
    assert lt.main(["convert", str(trained), "--to", "kohya", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "pytorch_lora_weights_kohya.safetensors" in out and "ComfyUI: all load; A1111: all load" in out


@pytest.mark.slow
def test_python_dash_m_billiard_lora_lora_runs(trained):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "billiard_lora.lora", "inspect", str(trained)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0 and "format" in ok.stdout and "SDXL" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "billiard_lora.lora", "inspect", "/nonexistent.safetensors"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "error:" in bad.stderr


def test_merge_never_replaces_a_folder_that_is_not_an_earlier_merge(tmp_path, tiny_model_dir):
    """`lora merge --out` once wiped whatever folder it named (a training run, the base model itself)."""
    import billiard_lora.lora_tools as lt

    run = tmp_path / "run"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    for out, kw, match in [(tiny_model_dir, {}, "base model's own folder"), (run, {}, "not empty"),
                           (run, {"overwrite": True}, "not an earlier merge"),
                           (run / "pytorch_lora_weights.safetensors", {}, "is a file")]:
        with pytest.raises(UserError, match=match):
            lt.merge_lora(tmp_path / "missing.safetensors", str(tiny_model_dir), out, **kw)
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == b"precious"
    assert (tiny_model_dir / "model_index.json").is_file()
    earlier = tmp_path / "merged"
    earlier.mkdir()
    (earlier / "merged_lora.json").write_text("{}")
    lt.check_merge_out(earlier, str(tiny_model_dir), overwrite=True)  # allowed: an earlier merge's output
    lt.check_merge_out(tmp_path / "new", str(tiny_model_dir))  # a new folder
    with pytest.raises(UserError, match="--overwrite replaces"):
        lt.check_merge_out(earlier, str(tiny_model_dir))


def test_convert_and_resize_never_replace_a_file_unasked(trained, tmp_path):
    """`lora convert x --to diffusers --out RUN` wrote over the run's own trained LoRA, and exited 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"the run's own LoRA")
    kohya = lt.convert_lora(trained, "kohya", tmp_path / "k.safetensors")
    with pytest.raises(UserError, match=r"--out .*run/pytorch_lora_weights.safetensors already exists; pass "
                                        r"--overwrite to replace it"):
        lt.convert_lora(kohya, "diffusers", run)
    with pytest.raises(UserError, match="already exists"):
        lt.resize_lora(trained, run / "pytorch_lora_weights.safetensors", rank=2)
    with pytest.raises(UserError, match="already exists"):
        lt.convert_lora(trained, "kohya", tmp_path / "k.safetensors")  # the same command twice
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == b"the run's own LoRA"
    assert lt.convert_lora(trained, "kohya", tmp_path / "k.safetensors", overwrite=True) == tmp_path / "k.safetensors"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"--out .*notes.txt is a file; pass a folder"):
        lt.convert_lora(trained, "kohya", tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"is not a LoRA file: it has no lora_down"):
        lt.load_lora_file(_non_lora_file(tmp_path))


def _non_lora_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    return tmp_path / "vae.safetensors"


# ---------------------------------------------------------------- combine
@pytest.fixture(scope="module")
def second(tiny_model_dir, tmp_path_factory) -> Path:
    """Another LoRA: UNet only, rank 2, attention and feed-forward layers (some layers the first one lacks)."""
    from test_train import make_images, tiny_config

    from billiard_lora.train import train

    root = tmp_path_factory.mktemp("lora-second")
    return train(tiny_config(tiny_model_dir, make_images(root / "data"), root / "out", rank=2, lora_alpha=1,
                             lora_layers="attn,ff", seed=1, learning_rate=1e-2))


def test_combined_lora_applies_the_weighted_sum_of_its_sources_exactly(trained, second, kohya_file, tiny_model_dir,
                                                                       tmp_path):
    one, two = module_deltas(with_lora(tiny_model_dir, trained)), module_deltas(with_lora(tiny_model_dir, second))
    assert set(two) - set(one) and set(one) - set(two)  # each has layers the other lacks
    for first, weights in ((trained, (0.7, -0.5)), (kohya_file, (1.0, 1.0))):
        out, n, top = lt.combine_loras([(first, weights[0]), (second, weights[1])],
                                       tmp_path / f"c{weights[0]}.safetensors")
        assert n == len(set(one) | set(two)) and top == 4 + 2
        got = module_deltas(with_lora(tiny_model_dir, out))
        assert set(got) == set(one) | set(two)
        for key, (delta, rank) in got.items():
            expected = sum(w * d[key][0] for w, d in zip(weights, (one, two)) if key in d)
            assert rank == sum(d[key][1] for d in (one, two) if key in d)
            assert torch.allclose(delta, expected, atol=1e-6, rtol=1e-4), key
    resized, _, top = lt.combine_loras([(trained, 1.0), (second, 1.0)], tmp_path / "r2.safetensors", rank=2)
    got = module_deltas(with_lora(tiny_model_dir, resized))
    assert top == 2 and {r for _, r in got.values()} == {2}
    for key, (delta, _) in got.items():  # the best rank-2 part of the sum: closer to it than to nothing
        full = sum(d[key][0] for d in (one, two) if key in d)
        assert (delta - full).norm() < full.norm() or full.norm() == delta.norm() == 0  # (an untrained layer: 0)


def test_combine_refuses_what_it_cannot_do_in_one_line(trained, second, tmp_path):
    with pytest.raises(UserError, match="combine needs at least two LoRAs"):
        lt.combine_loras([(trained, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="--rank must be at least 1"):
        lt.combine_loras([(trained, 1.0), (second, 1.0)], tmp_path / "x.safetensors", rank=0)
    with pytest.raises(UserError, match="is the input file"):
        lt.combine_loras([(trained, 1.0), (second, 1.0)], trained / "pytorch_lora_weights.safetensors")
    r = subprocess.run([sys.executable, "-m", "billiard_lora.lora", "combine", f"{trained}:0.5", str(second),
                        "--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "2 LoRAs at weights 0.5, 1 as one" in r.stdout and "(exact)" in r.stdout
    assert (tmp_path / "cli" / "pytorch_lora_weights.safetensors").is_file()
