"""--train_text_encoder_ti (pivotal tuning): new tokens whose embeddings train with the LoRA, saved beside it, and
loaded with it for generation (tiny SDXL pipeline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
from billiard_lora.pivotal import insert_tokens, token_map
from billiard_lora.train import train
from test_train import Crash, crash_at_step, lora_tensors, make_images, tiny_config

PROMPT = "a photo of TOK playing billiard"
TI = dict(instance_prompt=PROMPT, train_text_encoder_ti=True, ti_learning_rate=1e-2)


def test_token_abstractions_become_new_tokens_as_whole_words():
    mapping = token_map("TOK, TOK2", 2)
    assert mapping == {"TOK": ["<s0>", "<s1>"], "TOK2": ["<s2>", "<s3>"]}
    assert insert_tokens("TOK and TOK2 in TOKYO, (TOK)", mapping) == "<s0><s1> and <s2><s3> in TOKYO, (<s0><s1>)"
    assert insert_tokens(None, mapping) is None


@pytest.mark.parametrize("kw, message", [
    (dict(train_text_encoder_ti=True, instance_prompt="a photo of messi"), "does not contain --token_abstraction TOK"),
    (dict(train_text_encoder_ti=True, train_text_encoder=True), "choose one"),
    (dict(token_abstraction="SKS"), "apply with --train_text_encoder_ti"),
    (dict(train_text_encoder_ti=True, num_new_tokens_per_abstraction=0), "must be at least 1"),
    (dict(train_text_encoder_ti=True, train_text_encoder_ti_frac=0), r"must be in \(0, 1\]"),
    (dict(train_text_encoder_ti_frac=1.0), "apply with --train_text_encoder_ti"),
])
def test_pivotal_settings_are_checked(kw, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{"instance_prompt": PROMPT, **kw})


@pytest.fixture(scope="module")
def ti_run(tiny_model_dir, tmp_path_factory):
    """A pivotal-tuning run on the caller's components; what they were before and the validation images made
    at its last step."""
    from billiard_lora.models import load_components

    tmp = tmp_path_factory.mktemp("ti")
    c = load_components(str(tiny_model_dir))
    before = {"tokenizers": [len(t) for t in c.tokenizers],
              "embeddings": [te.get_input_embeddings() for te in c.text_encoders],
              "weights": [te.get_input_embeddings().weight.detach().clone() for te in c.text_encoders]}
    images = []
    out = train(tiny_config(tiny_model_dir, make_images(tmp / "data", n=3), tmp / "run", max_train_steps=3,
                            checkpointing_steps=2, validation_prompt="TOK on a green table", validation_steps=3,
                            num_validation_images=1, validation_inference_steps=2, **TI),
                components=c, callback=lambda e: e["event"] == "validation" and images.append(e["images"][0]))
    return out, c, before, images


def test_only_the_lora_and_the_new_rows_train_and_the_callers_models_come_back(tiny_model_dir, ti_run):
    from billiard_lora.models import load_components
    from billiard_lora.pivotal import PivotalTuning

    out, c, before, _ = ti_run
    emb = load_file(str(out / "run_emb.safetensors"))
    assert {k: tuple(v.shape) for k, v in emb.items()} == {"clip_l": (2, 32), "clip_g": (2, 32)}
    fresh = load_components(str(tiny_model_dir))
    start = PivotalTuning(token_map("TOK", 2), fresh.tokenizers, fresh.text_encoders, seed=0).state()  # as drawn
    at_2 = load_file(str(out / "checkpoint-2" / "checkpoint-2_emb.safetensors"))
    assert all(not torch.equal(at_2[k], start[k]) for k in emb), "the embeddings trained"
    # --train_text_encoder_ti_frac 0.5 of 3 steps: they train in steps 1-2, then stay; the LoRA trains on
    assert all(torch.equal(emb[k], at_2[k]) for k in emb)
    lora_2, lora_3 = lora_tensors(out / "checkpoint-2"), lora_tensors(out)
    assert any(not torch.equal(lora_2[k], lora_3[k]) for k in lora_3)
    # the caller's tokenizers and text encoders are as they were: no new token, their own embedding, unchanged
    assert [len(t) for t in c.tokenizers] == before["tokenizers"] and "<s0>" not in c.tokenizer_one.get_vocab()
    for te, layer, weight in zip(c.text_encoders, before["embeddings"], before["weights"]):
        assert te.get_input_embeddings() is layer and torch.equal(layer.weight, weight)
        assert not any("lora" in n for n, _ in te.named_parameters()), "no LoRA on the frozen text encoders"
    from billiard_lora.lora_tools import format_inspect, inspect_lora

    report = inspect_lora(out)
    assert report["token_embeddings"]["tokens"] == {"TOK": ["<s0>", "<s1>"]}
    assert "TOK -> <s0><s1>  (run_emb.safetensors: clip_l 2x32, clip_g 2x32)" in format_inspect(report)
    card = (out / "README.md").read_text()
    assert "`TOK` is `<s0><s1>`" in card and "load_textual_inversion" in card


def test_generate_loads_the_embeddings_with_the_lora_and_makes_the_validation_images(tiny_model_dir, ti_run):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import generate, load_generation_pipeline

    out, _, _, images = ti_run
    pipe = load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(out)], device="cpu")
    made = generate(pipe, "TOK on a green table", 0, num_inference_steps=2, height=32, width=32, progress=False)[0]
    px = lambda im: np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(px(made.image) - px(images[-1])).max() <= 1, "the trained model's validation image, reloaded"

    # diffusers' own calls, as the model card gives them, make the same image
    state = load_file(str(out / "run_emb.safetensors"))
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    plain.load_lora_weights(str(out))
    plain.load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=plain.text_encoder,
                                 tokenizer=plain.tokenizer)
    plain.load_textual_inversion(state["clip_g"], token=["<s0>", "<s1>"], text_encoder=plain.text_encoder_2,
                                 tokenizer=plain.tokenizer_2)
    theirs = plain("<s0><s1> on a green table", num_inference_steps=2, height=32, width=32,
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(px(theirs) - px(made.image)) .max() <= 1

    # without its embeddings the LoRA makes another image: they matter
    bare = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    bare.load_lora_weights(str(out))
    other = bare("TOK on a green table", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(px(other), px(made.image))


def test_each_image_has_the_embeddings_of_the_loras_active_for_it(tiny_model_dir, ti_run):
    """The checkpoint grid of a run also loaded as --lora (generate --lora RUN --checkpoints RUN): each row with its
    own checkpoint's embeddings, then the run's again; two active LoRAs with the same tokens are one line."""
    from billiard_lora.generate import checkpoint_grid, generate, load_generation_pipeline

    out, _, _, _ = ti_run
    kw = dict(num_inference_steps=2, height=32, width=32)
    pipe = load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(out)], device="cpu")
    first = generate(pipe, "TOK on a green table", 0, progress=False, **kw)[0]
    grid = checkpoint_grid(pipe, out, ["TOK on a green table"], 0, **kw)
    assert isinstance(grid, Image.Image)
    again = generate(pipe, "TOK on a green table", 0, progress=False, **kw)[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image)), "the run's own embeddings came back"
    assert list(pipe.billiard_tokens) == ["run"]
    # at LoRA scale 0 (the base row of --compare, a sweep's first column) the base model sees the prompt as written
    from diffusers import StableDiffusionXLPipeline

    off = generate(pipe, "TOK on a green table", 0, lora_scale=0.0, progress=False, **kw)[0]
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = plain("TOK on a green table", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.abs(np.asarray(off.image, dtype=np.int16) - np.asarray(base, dtype=np.int16)).max() <= 1
    assert "<s0>" not in pipe.tokenizer.get_vocab()
    both = load_generation_pipeline(str(tiny_model_dir), vae=None, loras=[str(out), str(out / "checkpoint-2")],
                                    device="cpu")
    with pytest.raises(UserError, match="LoRAs checkpoint-2 and run both bring the token <s0> of their pivotal "
                                        "tuning: generate with one of them at a time|LoRAs run and checkpoint-2 both"):
        generate(both, "TOK", 0, progress=False, **kw)


def test_pivotal_run_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=3)
    kw = dict(max_train_steps=5, checkpointing_steps=2, use_ema=True, train_text_encoder_ti_frac=0.6, **TI)
    # (the embeddings stop at step 3: after the checkpoint resumed from, before the crash)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(4))
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    for a, b in [(full / "full_emb.safetensors", resumed / "resumed_emb.safetensors"),
                 (full / "no_ema" / "no_ema_emb.safetensors", resumed / "no_ema" / "no_ema_emb.safetensors")]:
        ea, eb = load_file(str(a)), load_file(str(b))
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    la, lb = lora_tensors(full), lora_tensors(resumed)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    ema, last = load_file(str(full / "full_emb.safetensors")), load_file(str(full / "no_ema" / "no_ema_emb.safetensors"))
    assert not torch.equal(ema["clip_l"], last["clip_l"]), "--use_ema averages the embeddings too"
    with pytest.raises(UserError, match="train_text_encoder_ti=True but this run has train_text_encoder_ti=False"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="checkpoint-2",
                          max_train_steps=5, checkpointing_steps=2, use_ema=True, instance_prompt=PROMPT))


def test_a_run_without_pivotal_tuning_removes_an_earlier_runs_embeddings(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    out = train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_train_steps=1, **TI))
    assert (out / "run_emb.safetensors").is_file()
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_train_steps=1, overwrite_output_dir=True))
    assert not (out / "run_emb.safetensors").exists(), "they would be loaded with a LoRA not trained with them"


def test_a_pivotal_lora_on_the_hub_brings_its_embeddings(tiny_model_dir, ti_run, hub_cache, monkeypatch):
    import huggingface_hub

    from billiard_lora.generate import load_generation_pipeline
    from billiard_lora.hub import fetch_embeddings

    out = ti_run[0]
    snap = hub_cache("someone/ti", {"pytorch_lora_weights.safetensors": out / "pytorch_lora_weights.safetensors",
                                    "run_emb.safetensors": out / "run_emb.safetensors"})
    from billiard_lora.generate import sync_embeddings

    pipe = load_generation_pipeline(str(tiny_model_dir), vae=None, loras=["someone/ti"], device="cpu")
    sync_embeddings(pipe)
    assert pipe.billiard_tokens == {"ti": {"TOK": ["<s0>", "<s1>"]}}  # offline: from the cache
    # online (stood in for): the repo's embeddings beside the LoRA are downloaded with it, no others
    fetched = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: [
        "pytorch_lora_weights.safetensors", "run_emb.safetensors", "older/older_emb.safetensors"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: fetched.append(name))
    fetch_embeddings("someone/ti", snap / "pytorch_lora_weights.safetensors")
    assert fetched == ["run_emb.safetensors"]
