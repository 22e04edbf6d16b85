"""`lora extract`: a LoRA from the difference between a fine-tuned model and its base (kohya's
extract_lora_from_models.py), on tiny SDXL pipelines whose "fine-tune" is a trained LoRA merged in."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from billiard_lora.errors import UserError
from billiard_lora.extract import extract_lora, format_extraction
from billiard_lora.lora_tools import count_lora_layers, inspect_lora, load_lora_file, main, merge_lora
from billiard_lora.train import train
from test_train import make_images, sample, tiny_config


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(base folder, base as a single file, the tuned model as a folder and as a single file): a rank-4 LoRA on the
    UNet's attention, feed-forward, projections and convolutions and on both text encoders, merged in."""
    from billiard_lora.tiny import save_tiny_pipeline, save_tiny_single_file

    root = tmp_path_factory.mktemp("extract")
    folder = save_tiny_pipeline(root / "tiny", seed=0, shape="tiny-single-file")
    single = save_tiny_single_file(folder)
    run = train(tiny_config(folder, make_images(root / "data"), root / "run", learning_rate=2e-2, max_train_steps=4,
                            lora_layers="attn,ff,proj,conv", train_text_encoder=True))
    from billiard_lora.models import load_pipeline

    pipe = load_pipeline(str(merge_lora(run, str(folder), root / "merged-lora")))
    g = torch.Generator().manual_seed(0)
    for te in (pipe.text_encoder, pipe.text_encoder_2):  # a full fine-tune would change the MLPs too: rank 2 here
        fc1 = next(m for n, m in te.named_modules() if n.endswith("layers.0.mlp.fc1"))
        with torch.no_grad():
            fc1.weight += 0.05 * torch.randn(fc1.weight.shape[0], 2, generator=g) @ torch.randn(2, fc1.weight.shape[1],
                                                                                                generator=g)
    pipe.save_pretrained(root / "merged")
    return folder, single, root / "merged", merge_lora(run, str(folder), root / "merged.safetensors")


def _images(model, lora=None, **kw):
    from billiard_lora.models import load_pipeline

    pipe = load_pipeline(str(model), **kw)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        assert sum(count_lora_layers(pipe).values()) == len(load_lora_file(lora).layers)  # every layer found a place
    return sample(pipe)


def test_at_the_change_s_own_rank_the_extracted_lora_is_the_fine_tune(tuned, tmp_path):
    """Rank 4 (the merged LoRA's) with the convolutions and text encoders: base + extracted LoRA gives the tuned
    model's images, in kohya's format (what the webuis read) loaded by stock diffusers; untouched layers (the text
    encoders' MLPs) are left out."""
    folder, _, merged, _ = tuned
    result = extract_lora(str(folder), str(merged), tmp_path, rank=4, conv_rank=4, min_diff=0.0)
    want, base = _images(merged), _images(folder)
    assert np.abs(want - base).max() > 1e-2  # the fine-tune changed the images
    np.testing.assert_allclose(_images(folder, result.out), want, atol=1e-4)
    assert result.out.name == "pytorch_lora_weights_kohya.safetensors" and result.skipped == []
    report = inspect_lora(result.out)
    assert report["format"] == "kohya" and report["ranks"] == {"4": len(result.infos)} and report["text_encoder_lora"]
    assert report["conv_layers"] > 0 and result.unchanged > 0  # the encoders' other MLP layers: not written
    names = [x.name for x in load_lora_file(result.out).layers.values()]
    assert sum(n.endswith("mlp_fc1") for n in names) == 2 and not any(n.endswith("mlp_fc2") for n in names)
    assert min(i.energy for i in result.infos) > 0.9999
    text = format_extraction(result)
    assert "text_encoder: largest weight change" in text and "(extracted;" in text


def test_from_single_files_with_energy_in_diffusers_format(tuned, tmp_path):
    """Both models as single-file checkpoints (layout from --single_file_config); --energy 0.9999 keeps each layer's
    change and none of float32's rounding; diffusers' format; text encoders changed by less than --min_diff are left
    out."""
    folder, single, merged, merged_file = tuned
    mixed = extract_lora(str(folder), str(merged_file), tmp_path / "mixed.safetensors", rank=1,  # (a folder too)
                         single_file_config=str(folder))
    assert mixed.infos
    result = extract_lora(str(single), str(merged_file), tmp_path / "x.safetensors", energy=0.9999, conv_rank=4,
                          single_file_config=str(folder), to="diffusers", min_diff=1.0)
    assert result.skipped == ["text_encoder", "text_encoder_2"] and "left out" in format_extraction(result)
    lora = load_lora_file(result.out)
    assert lora.format == "diffusers" and {x.component for x in lora.layers.values()} == {"unet"}
    assert max(x.rank for x in lora.layers.values()) == 4  # the change's own rank: the rest is float32 rounding
    from billiard_lora.models import load_pipeline

    pipe = load_pipeline(str(folder))
    pipe.load_lora_weights(str(tmp_path), weight_name="x.safetensors")
    ref = load_pipeline(str(merged))
    ref.text_encoder, ref.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2  # (only the UNet was extracted)
    np.testing.assert_allclose(sample(pipe), sample(ref), atol=1e-4)


def test_a_lower_rank_keeps_the_strongest_directions_and_bad_input_is_one_line(tuned, tmp_path):
    folder, _, merged, _ = tuned
    result = extract_lora(str(folder), str(merged), tmp_path / "r1.safetensors", rank=1)
    assert {x.rank for x in load_lora_file(result.out).layers.values()} == {1}
    assert not any(x.down.ndim == 4 for x in load_lora_file(result.out).layers.values())  # no --conv_rank: no convs
    energies = [i.energy for i in result.infos]
    assert 0 < min(energies) < 1 and all(0 < e <= 1 for e in energies)
    with pytest.raises(UserError, match="--out .* exists"):
        extract_lora(str(folder), str(merged), tmp_path / "r1.safetensors", rank=1)
    with pytest.raises(UserError, match="have the same weights in every layer"):
        extract_lora(str(folder), str(shutil.copytree(folder, tmp_path / "copy")), tmp_path / "same.safetensors",
                     rank=1)
    with pytest.raises(UserError, match="give exactly one of --rank N or --energy F"):
        extract_lora(str(folder), str(merged), tmp_path / "y.safetensors")
    with pytest.raises(UserError, match="--base and --tuned are the same model"):
        extract_lora(str(folder), str(folder), tmp_path / "y.safetensors", rank=1)
    with pytest.raises(UserError, match="--tuned .*nowhere: no such file or folder"):
        extract_lora(str(folder), str(tmp_path / "nowhere"), tmp_path / "y.safetensors", rank=1)
    with pytest.raises(UserError, match="--clamp_quantile is a quantile"):
        extract_lora(str(folder), str(merged), tmp_path / "y.safetensors", rank=1, clamp_quantile=2)
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "same.safetensors").exists()


def test_a_model_of_another_layout_is_refused(tuned, tiny_model_dir, tmp_path):
    folder, _, merged, _ = tuned
    with pytest.raises(UserError, match="is not laid out as --base .* extract needs a fine-tune of the same"):
        extract_lora(str(tiny_model_dir), str(merged), tmp_path / "z.safetensors", rank=2)


def test_cli_prints_each_layer_and_the_summary(tuned, tmp_path, capsys):
    folder, _, merged, _ = tuned
    assert main(["extract", "--base", str(folder), "--tuned", str(merged), "--rank", "2", "--clamp_quantile", "0.99",
                 "--out", str(tmp_path), "--save_precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "-> 2" in out and "wrote" in out and "pytorch_lora_weights_kohya.safetensors" in out
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(tmp_path / "pytorch_lora_weights_kohya.safetensors")).values()} == \
        {torch.float16}  # (--save_precision: half the file)
    assert main(["extract", "--base", str(folder), "--tuned", str(merged), "--rank", "2", "--out", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
