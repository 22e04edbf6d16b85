"""The tiny SDXL that our code builds, the full-size architecture, and loading errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from billiard_lora.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cli_writes_a_pipeline_that_stock_diffusers_loads_offline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "tiny"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "billiard_lora.tiny", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert any((out / sub).glob("*.safetensors")), sub
    for sub in ("tokenizer", "tokenizer_2"):  # vocabularies written by our code
        assert (out / sub / "vocab.json").is_file() and (out / sub / "merges.txt").is_file()
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 20
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = pipe("a photo of messi playing billiard", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_tiny_pipeline_is_seeded(tmp_path):
    from billiard_lora.tiny import build_components

    a, b = build_components(seed=3), build_components(seed=3)
    c = build_components(seed=4)
    wa, wb, wc = (next(x["unet"].parameters()) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tokenizers_split_prompts_into_words():
    from billiard_lora.tiny import build_tokenizers

    tok1, tok2 = build_tokenizers()
    ids = tok1("a photo of messi playing billiard").input_ids
    assert tok1.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "photo</w>", "of</w>", "messi</w>", "playing</w>",
                                                       "billiard</w>"]
    assert tok2.pad_token == "!" and tok1.pad_token == "<|endoftext|>"  # as SDXL's two tokenizers
    # any text still tokenizes (byte-level fallback), padded to CLIP's 77
    assert len(tok1("Zürich 🎱", padding="max_length", max_length=77).input_ids) == 77


def test_full_size_architecture_matches_sdxl_base():
    """Built on the meta device: the shapes of SDXL base 1.0 without allocating its 10 GB."""
    from billiard_lora.tiny import FULL, build_components

    c = build_components(FULL, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(c["unet"]) == 2_567_463_684  # SDXL base UNet
    assert count(c["text_encoder"]) == 123_060_480  # CLIP ViT-L/14 text model
    assert count(c["text_encoder_2"]) == 694_659_840  # OpenCLIP ViT-bigG/14 text model + projection
    assert count(c["vae"]) == 83_653_863
    assert c["unet"].config.cross_attention_dim == 2048


def test_hub_model_offline_is_one_clear_error(monkeypatch):
    from billiard_lora.models import load_components

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_components("stabilityai/stable-diffusion-xl-base-1.0", cache_dir="/nonexistent-cache")
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    from billiard_lora.models import load_components

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a complete diffusers SDXL pipeline"):
        load_components(str(tmp_path / "empty"))


def test_a_non_sdxl_model_is_refused(tmp_path):
    """An SD1.5-style UNet (no text_time conditioning) is not what this trainer is for."""
    from diffusers import UNet2DConditionModel

    from billiard_lora.models import load_components
    from billiard_lora.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "p")
    sd15_unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                     attention_head_dim=2)
    sd15_unet.save_pretrained(folder / "unet")
    with pytest.raises(UserError, match="not an SDXL model"):
        load_components(str(folder))


def test_load_components_in_a_given_dtype_converts_the_unet_and_text_encoders_not_the_vae(tiny_model_dir):
    """torch_dtype loads the UNet and both text encoders converted (the same numbers as casting after loading);
    the VAE stays float32, for its own config to decide."""
    import torch

    from billiard_lora.models import load_components

    half = load_components(str(tiny_model_dir), torch_dtype=torch.float16)
    full = load_components(str(tiny_model_dir))
    assert {next(m.parameters()).dtype for m in (half.unet, half.text_encoder_one, half.text_encoder_two)} == \
        {torch.float16}
    assert next(half.vae.parameters()).dtype == next(full.unet.parameters()).dtype == torch.float32
    for a, b in ((half.unet, full.unet), (half.text_encoder_two, full.text_encoder_two)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q.to(torch.float16)), name


def test_run_norms_in_half_takes_layer_and_group_norms_out_of_autocast_only_in_half_precision():
    from billiard_lora.models import run_norms_in_half

    seen = []

    class LN(torch.nn.LayerNorm):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    class GN(torch.nn.GroupNorm):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    ln, gn = LN(8).bfloat16(), GN(2, 8).bfloat16()
    model = torch.nn.ModuleList([ln, gn])
    x, y = torch.randn(2, 8).bfloat16(), torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        want = ln(x), gn(y)
    assert seen == [True, True]
    undo = run_norms_in_half(model)
    with torch.autocast("cpu", torch.bfloat16):
        got = ln(x), gn(y)
    assert seen[2:] == [False, False]
    assert all(torch.equal(a, b) for a, b in zip(want, got))  # on a CPU autocast left them in bf16 already
    ln.float()
    with torch.autocast("cpu", torch.bfloat16):
        ln(x.float())  # float32 weights: left to autocast, as before
    assert seen[4:] == [True]
    undo()
    assert not any("forward" in m.__dict__ for m in model)
