"""Behaviour of generation on the tiny SDXL pipeline and a LoRA trained on it for two steps (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from billiard_lora.errors import UserError
from billiard_lora.generate import (
    GeneratedImage,
    LoraSpec,
    base_vs_lora,
    checkpoint_grid,
    famous_prompts,
    fuse_loras,
    generate,
    load_generation_pipeline,
    load_lora,
    main,
    parse_lora_arg,
    prompt_seed_grid,
    read_prompts_file,
    resolve_lora_file,
    save_results,
    scale_sweep,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of messi playing billiard"
SIZE = 32
FAST = dict(num_inference_steps=2, height=SIZE, width=SIZE, progress=False)


def _images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _train(model_dir: Path, out: Path, **kw) -> Path:
    from billiard_lora.config import TrainConfig
    from billiard_lora.train import train

    cfg = dict(pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(_images(out.parent / "data")),
               output_dir=str(out), instance_prompt=PROMPT, resolution=32, train_batch_size=2, max_train_steps=2,
               checkpointing_steps=1, seed=0, report_to="none", learning_rate=1e-2, lr_warmup_steps=0)
    return train(TrainConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A training output folder: final LoRA (diffusers + kohya files), checkpoint-1 and checkpoint-2."""
    return _train(tiny_model_dir, tmp_path_factory.mktemp("gen") / "run", output_kohya_format=True)


def _pipe(model_dir: Path, loras=(), **kw):
    return load_generation_pipeline(str(model_dir), vae=None, loras=loras, device="cpu", **kw)


def _px(result_or_image) -> np.ndarray:
    img = result_or_image.image if isinstance(result_or_image, GeneratedImage) else result_or_image
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _close(a, b) -> bool:
    """Equal up to one uint8 step (float round-off of ~1e-6 can flip a rounding)."""
    return np.abs(_px(a) - _px(b)).max() <= 1


def _cell(grid: Image.Image, row: int, col: int, rows: int, cols: int) -> Image.Image:
    """A grid cell, counted from the bottom-right corner (labels sit above and left of the cells)."""
    left, top = grid.width - cols * SIZE, grid.height - rows * SIZE
    return grid.crop((left + col * SIZE, top + row * SIZE, left + (col + 1) * SIZE, top + (row + 1) * SIZE))


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and arguments


def test_famous_prompts_swap_the_subject_of_the_instance_prompt():
    prompts = famous_prompts(PROMPT)
    assert len(prompts) == 8 and len(set(prompts)) == 8
    assert prompts[0] == PROMPT
    assert "a photo of cristiano ronaldo playing billiard" in prompts
    assert "a photo of messi in a tuxedo playing billiard" in prompts
    assert all(p.startswith("a photo of ") and p.endswith(" playing billiard") for p in prompts)
    assert famous_prompts(PROMPT) == prompts and famous_prompts() == prompts  # deterministic; seed prompt by default
    assert famous_prompts("Ronaldo playing billiards in a bar", n=3) == [
        "Ronaldo playing billiards in a bar", "cristiano ronaldo playing billiards in a bar",
        "albert einstein playing billiards in a bar"]


def test_famous_prompts_append_variations_when_there_is_no_subject_to_swap():
    prompts = famous_prompts("a photo of sks billiard", n=5)
    assert prompts[0] == "a photo of sks billiard" and len(prompts) == 5
    assert all(p.startswith("a photo of sks billiard, ") and p.endswith("playing billiards") for p in prompts[1:])


def test_parse_lora_arg_takes_a_trailing_number_as_scale():
    assert parse_lora_arg("out/run") == LoraSpec("out/run", 1.0)
    assert parse_lora_arg("out/run:0.7") == LoraSpec("out/run", 0.7)
    assert parse_lora_arg("/a/b.safetensors:-0.5") == LoraSpec("/a/b.safetensors", -0.5)
    assert parse_lora_arg("runs:v2") == LoraSpec("runs:v2", 1.0)  # not a number: part of the path
    with pytest.raises(UserError, match="DIR_OR_FILE"):
        parse_lora_arg(":0.5")


def test_parse_lora_arg_takes_blocks_after_an_at_sign():
    """@content / @style (a B-LoRA's blocks) or UNet block names; any other @ belongs to the path."""
    assert parse_lora_arg("runs/dog@content:0.8") == LoraSpec("runs/dog", 0.8, blocks=("up_blocks.0.attentions.0",))
    assert parse_lora_arg("paint.safetensors@style").blocks == ("up_blocks.0.attentions.1",)
    assert parse_lora_arg("x@unet.up_blocks.1, output_blocks.1.1").blocks == ("up_blocks.1", "output_blocks.1.1")
    assert parse_lora_arg("runs/v1@2x") == LoraSpec("runs/v1@2x", 1.0)
    assert parse_lora_arg("me@home/run:0.5") == LoraSpec("me@home/run", 0.5)
    weighted = parse_lora_arg("x@content=0.5,mid_block:0.8")  # A1111's LoRA Block Weight: a weight per block
    assert (weighted.blocks, weighted.block_weights, weighted.scale) == (
        ("up_blocks.0.attentions.0", "mid_block"), (0.5, 1.0), 0.8)
    assert weighted.blocks_text == "up_blocks.0.attentions.0=0.5+mid_block"
    with pytest.raises(UserError, match="the weight of mid_block is 'half', not a number"):
        parse_lora_arg("x@mid_block=half")


def test_block_weights_unet_and_te_are_diffusers_per_component_weights(tiny_model_dir, tmp_path):
    """@unet,te=0.5 (A1111's block weights' BASE: the text encoders): diffusers' own per-component adapter weights;
    @unet alone drops the text-encoder layers; a block's own weight wins over unet's."""
    run = _train(tiny_model_dir, tmp_path / "te-run", train_text_encoder=True, text_encoder_lr=5e-2, max_train_steps=3)
    reference = _pipe(tiny_model_dir, loras=[str(run)])
    name = next(iter(reference.billiard_loras))
    reference.set_adapters([name], adapter_weights=[{"unet": 1.0, "text_encoder": 0.5, "text_encoder_2": 0.5}])
    want = generate(reference, PROMPT, 0, **FAST)[0]
    got = generate(_pipe(tiny_model_dir, loras=[f"{run}@unet,te=0.5"]), PROMPT, 0, **FAST)[0]
    assert np.abs(_px(got) - _px(want)).max() <= 1 and got.lora_names[0].endswith("@unet+te=0.5")
    reference.set_adapters([name], adapter_weights=[{"unet": 1.0, "text_encoder": 0.0, "text_encoder_2": 0.0}])
    unet_only = generate(_pipe(tiny_model_dir, loras=[f"{run}@unet"]), PROMPT, 0, **FAST)[0]
    assert np.abs(_px(unet_only) - _px(generate(reference, PROMPT, 0, **FAST)[0])).max() <= 1
    assert np.abs(_px(unet_only) - _px(want)).max() > 1
    mixed = generate(_pipe(tiny_model_dir, loras=[f"{run}@unet=0,up_blocks,te"]), PROMPT, 0, **FAST)[0]
    only_up = generate(_pipe(tiny_model_dir, loras=[f"{run}@up_blocks,te"]), PROMPT, 0, **FAST)[0]
    assert np.array_equal(_px(mixed), _px(only_up))


def test_prompts_file_skips_blank_lines_and_comments(tmp_path):
    (tmp_path / "p.txt").write_text("# famous people\n\na photo of messi playing billiard\n  snooker final  \n")
    assert read_prompts_file(tmp_path / "p.txt") == [PROMPT, "snooker final"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts_file(tmp_path / "empty.txt")


def test_missing_or_empty_lora_paths_fail_before_the_model_loads(tmp_path):
    # The model path does not exist either: the LoRA must be checked first (seconds, not minutes of loading).
    with pytest.raises(UserError, match=r"LoRA '.*nope' does not exist: expected a training output folder"):
        load_generation_pipeline("/nonexistent/model", loras=[str(tmp_path / "nope")])
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no pytorch_lora_weights.safetensors.*try .*checkpoint-3"):
        resolve_lora_file(tmp_path / "run")
    with pytest.raises(UserError, match=r"the scale 'abc' after the colon is not a number; write it as .*run:0.8"):
        resolve_lora_file(parse_lora_arg(f"{tmp_path / 'run'}:abc").path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .safetensors file"):
        resolve_lora_file(tmp_path / "w.bin")
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))  # a VAE, say
    with pytest.raises(UserError, match=r"--lora .*vae.safetensors is not a LoRA file: it has no lora_down"):
        resolve_lora_file(tmp_path / "vae.safetensors")


def test_a_lora_on_the_hub_loads_by_its_repo_id_from_the_hubs_cache(tiny_model_dir, lora_run, tmp_path, hub_cache,
                                                                     monkeypatch):
    """--lora owner/name (or owner/name/FILE.safetensors) takes a LoRA from the Hugging Face Hub through
    huggingface_hub's cache: offline, a cached one loads as the local file does; one not cached, a repo that does
    not exist, or a repo with several files each get one line saying what to do; a mistyped local path whose first
    folder exists stays a local path."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    assert constants.HF_HUB_OFFLINE  # (tests run offline: the cache is all there is)
    local = lora_run / "pytorch_lora_weights.safetensors"
    snap = hub_cache("someone/messi-billiard-lora", {"pytorch_lora_weights.safetensors": local,
                                                     "v2/style.safetensors": local})
    assert resolve_lora_file("someone/messi-billiard-lora") == snap / "pytorch_lora_weights.safetensors"
    assert resolve_lora_file("someone/messi-billiard-lora/v2/style.safetensors") == snap / "v2" / "style.safetensors"
    pipe = _pipe(tiny_model_dir, loras=["someone/messi-billiard-lora:0.5"])
    assert [s.scale for s in pipe.billiard_loras.values()] == [0.5]
    assert list(pipe.billiard_loras) == ["messi-billiard-lora"]  # named after the repo, not the cache's commit
    by_path = _pipe(tiny_model_dir, loras=[f"{local}:0.5"])
    assert np.array_equal(_px(generate(pipe, PROMPT, 0, **FAST)[0]), _px(generate(by_path, PROMPT, 0, **FAST)[0]))

    # a repo cached earlier under its own file name is found offline too (no listing of the repo needed)
    only = hub_cache("someone/style-lora", {"style.safetensors": local})
    assert resolve_lora_file("someone/style-lora") == only / "style.safetensors"
    with pytest.raises(UserError, match=r"the scale 'abc' after the colon is not a number"):
        resolve_lora_file(parse_lora_arg("someone/style-lora:abc").path)
    with pytest.raises(UserError, match=r"LoRA 'nobody/missing' is not a local path, HF_HUB_OFFLINE is set, and "
                                        r"the Hub's cache does not hold it: download it once .*hf download "
                                        r"nobody/missing --local-dir DIR"):
        resolve_lora_file("nobody/missing")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"LoRA 'runs/mesi' does not exist"):  # a local folder's typo
        resolve_lora_file("runs/mesi")
    with pytest.raises(UserError, match=r"LoRA 'a/b/c' does not exist"):  # not a repo id with a file
        resolve_lora_file("a/b/c")

    # Online answers, stood in for: no such repo; no training run's file but one .safetensors; several
    def no_repo(repo, filename, **kw):  # (the client's error wants the HTTP response: its headers and request)
        raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_repo)
    with pytest.raises(UserError, match=r"LoRA 'nobody/nothing' does not exist: not a local path, and no Hub repo"):
        resolve_lora_file("nobody/nothing")
    asked = []

    def other_names(repo, filename, **kw):
        asked.append(filename)
        if filename == "pytorch_lora_weights.safetensors":
            raise EntryNotFoundError("404")
        return str(snap / "v2" / "style.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", other_names)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: ["README.md", "v2/style.safetensors"])
    assert resolve_lora_file("someone/style") == snap / "v2" / "style.safetensors"
    assert asked == ["pytorch_lora_weights.safetensors", "v2/style.safetensors"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: ["a.safetensors", "b.safetensors"])
    with pytest.raises(UserError, match=r"LoRA 'someone/style' holds 2 .safetensors files \(a.safetensors, "
                                        r"b.safetensors\): pass one as someone/style/FILE"):
        resolve_lora_file("someone/style")


def test_lora_for_another_base_model_is_refused_and_the_pipeline_is_unharmed(tiny_model_dir, lora_run, tmp_path):
    from billiard_lora.tiny import TINY, build_pipeline

    # Same architecture, narrower text encoders: the cross-attention LoRA matrices have other shapes.
    other_shape = dataclasses.replace(TINY, te1=dict(TINY.te1, hidden_size=16, num_attention_heads=2),
                                      te2=dict(TINY.te2, hidden_size=16, num_attention_heads=2, projection_dim=16))
    other_model = tmp_path / "other-sdxl"
    build_pipeline(other_shape).save_pretrained(other_model)
    foreign = _train(other_model, tmp_path / "other-run", max_train_steps=1, checkpointing_steps=1000)

    with pytest.raises(UserError, match="does not fit the base model") as err:
        _pipe(tiny_model_dir, loras=[str(foreign)])
    assert f"trained on '{other_model}'" in str(err.value) and "size mismatch" in str(err.value)

    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    before = generate(pipe, PROMPT, 0, **FAST)[0]
    stray = {"unet.foo.to_q.lora.down.weight": torch.zeros(4, 8), "unet.foo.to_q.lora.up.weight": torch.zeros(8, 4)}
    save_file(stray, str(tmp_path / "nowhere.safetensors"))  # LoRA keys for a module this model does not have
    # Mostly fitting keys plus one stray layer: diffusers loads the rest with only a warning.
    fitting = load_file(str(lora_run / "pytorch_lora_weights.safetensors"))
    save_file({**fitting, **stray}, str(tmp_path / "part.safetensors"))
    for bad, reason in [(foreign, "size mismatch"), (tmp_path / "nowhere.safetensors", "not found"),
                        (tmp_path / "part.safetensors", r"only \d+ of its \d+ LoRA layers")]:
        with pytest.raises(UserError, match=f"does not fit the base model .*{reason}"):
            load_lora(pipe, LoraSpec(str(bad)))
    assert np.array_equal(_px(generate(pipe, PROMPT, 0, **FAST)[0]), _px(before))
    assert pipe.get_active_adapters() == ["run"]


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def test_each_image_depends_only_on_its_prompt_and_seed(tiny_model_dir, lora_run):
    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    prompts = [PROMPT, "a photo of albert einstein playing billiard", "snooker"]
    batch = generate(pipe, prompts, [0, 1, 2], **FAST)
    assert [(r.prompt, r.seed) for r in batch] == [(p, s) for p in prompts for s in (0, 1, 2)]
    alone = generate(pipe, prompts[1], 2, **FAST)[0]
    assert np.array_equal(_px(alone), _px(batch[5]))
    assert not np.array_equal(_px(batch[3]), _px(batch[4])), "different seeds must give different images"
    r = batch[0]
    assert (r.width, r.height, r.steps, r.lora_names, r.lora_scale) == (SIZE, SIZE, 2, ("run",), 1.0)


def test_schedulers_keep_the_models_schedule_and_default_puts_its_own_back(tiny_model_dir, lora_run):
    from billiard_lora.generate import SCHEDULERS, set_scheduler

    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    own, own_config = type(pipe.scheduler).__name__, dict(pipe.scheduler.config)
    base = generate(pipe, PROMPT, 0, **FAST)[0]
    assert base.scheduler == "default"
    made = {}
    for name, (class_name, kw) in SCHEDULERS.items():
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == (class_name or own)
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            assert pipe.scheduler.config[key] == own_config[key], (name, key)  # the model's training schedule
        assert all(pipe.scheduler.config[k] == v for k, v in kw.items())
        first, again = generate(pipe, [PROMPT, PROMPT], 0, **FAST)
        assert first.scheduler == name and np.array_equal(_px(first), _px(again)), name  # ancestral/SDE too
        made[name] = _px(first)
    assert np.array_equal(made["default"], _px(base))
    for a, b in [("dpm++_2m", "dpm++_2m_karras"), ("euler", "euler_a"), ("dpm++_2m_karras", "dpm++_2m_sde_karras"),
                 ("euler", "ddim"), ("euler", "unipc"), ("euler", "euler_trailing"), ("euler", "lcm"),
                 ("lcm", "tcd")]:  # (2 steps of UniPC are 2 of DPM++ 2M)
        assert not np.array_equal(made[a], made[b]), (a, b)
    set_scheduler(pipe, "dpm++_2m")  # built from the model's own settings, not from the last scheduler's
    assert set(made) == set(SCHEDULERS) and pipe.scheduler.config.use_karras_sigmas is False
    set_scheduler(pipe, "default")
    assert type(pipe.scheduler).__name__ == own and np.array_equal(_px(generate(pipe, PROMPT, 0, **FAST)[0]),
                                                                  _px(base))
    with pytest.raises(UserError, match="unknown scheduler 'euler-a' \\(did you mean 'euler_a'\\?\\)"):
        set_scheduler(pipe, "euler-a")


def test_guidance_rescale_is_diffusers_and_recorded(tiny_model_dir, lora_run):
    """--guidance_rescale (A1111's CFG rescale, arXiv 2305.08891): diffusers' own guidance_rescale, in the image's
    settings; 0 is off."""
    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    ours = generate(pipe, PROMPT, 0, guidance_rescale=0.7, **FAST)[0]
    theirs = pipe(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=5.0, guidance_rescale=0.7,
                  generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(_px(ours), _px(theirs)) and ours.metadata()["guidance_rescale"] == "0.7"
    plain = generate(pipe, PROMPT, 0, **FAST)[0]
    assert np.abs(_px(plain) - _px(ours)).max() > 1 and plain.metadata()["guidance_rescale"] == "0.0"
    with pytest.raises(UserError, match=r"--guidance_rescale=1.5 must be in \[0, 1\]"):
        generate(pipe, PROMPT, 0, guidance_rescale=1.5, **FAST)


def test_lora_scale_zero_is_the_base_model_and_one_is_the_default(tiny_model_dir, lora_run):
    base = generate(_pipe(tiny_model_dir), PROMPT, 0, **FAST)[0]
    assert base.lora_scale is None and base.lora_names == ()
    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    default = generate(pipe, PROMPT, 0, **FAST)[0]
    assert np.abs(_px(default) - _px(base)).max() > 10, "the LoRA should change the image"
    assert _close(generate(pipe, PROMPT, 0, lora_scale=0.0, **FAST)[0], base)
    assert np.array_equal(_px(generate(pipe, PROMPT, 0, lora_scale=1.0, **FAST)[0]), _px(default))
    half = generate(pipe, PROMPT, 0, lora_scale=0.5, **FAST)[0]
    assert not _close(half, default) and not _close(half, base)
    # The scale is temporary, and it multiplies the weight the LoRA was loaded with.
    assert np.array_equal(_px(generate(pipe, PROMPT, 0, **FAST)[0]), _px(default))
    at_half = generate(_pipe(tiny_model_dir, loras=[f"{lora_run}:0.5"]), PROMPT, 0, **FAST)[0]
    assert _close(at_half, half) and at_half.lora_weights == (0.5,)


def test_kohya_file_gives_the_same_images_as_the_diffusers_file(tiny_model_dir, lora_run):
    ours = generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), PROMPT, 0, **FAST)[0]
    kohya = _pipe(tiny_model_dir, loras=[str(lora_run / "pytorch_lora_weights_kohya.safetensors")])
    assert _close(generate(kohya, PROMPT, 0, **FAST)[0], ours)


def _unet_ops(pipe) -> list[str]:
    """The ATen operations of one UNet forward, in order (what sampling costs per step, apart from kernel speed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    cond = {"text_embeds": torch.randn(1, text, generator=g), "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]])}
    with torch.no_grad(), Record() as rec:
        pipe.unet(torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g), torch.tensor([500]),
                  torch.randn(1, 77, cfg.cross_attention_dim, generator=g), added_cond_kwargs=cond)
    return rec.ops


def test_fused_loras_match_unfused_and_refuse_scale_changes(tiny_model_dir, lora_run):
    loras = [f"{lora_run}:0.6", f"{lora_run / 'checkpoint-1'}:0.5"]
    unfused = generate(_pipe(tiny_model_dir, loras=loras), PROMPT, 0, **FAST)[0]
    fused_pipe = _pipe(tiny_model_dir, loras=loras, fuse=True)
    fused = generate(fused_pipe, PROMPT, 0, **FAST)[0]
    assert _close(fused, unfused) and fused.fused and fused.lora_names == ("run", "checkpoint-1")
    # the adapters are merged and gone: sampling runs exactly the base model's operations, in the same order
    assert not any(hasattr(m, "lora_A") for m in fused_pipe.unet.modules())
    base_ops = _unet_ops(_pipe(tiny_model_dir))
    assert _unet_ops(fused_pipe) == base_ops and len(_unet_ops(_pipe(tiny_model_dir, loras=loras))) > len(base_ops)
    with pytest.raises(UserError, match="fused"):
        generate(fused_pipe, PROMPT, 0, lora_scale=0.5, **FAST)
    with pytest.raises(UserError, match="fused"):
        base_vs_lora(fused_pipe, [PROMPT], 0, **FAST)


def test_sampling_cuda_graphs_give_the_same_images_and_leave_the_unet_as_it_was(tiny_model_dir, lora_run, monkeypatch):
    """generate(cuda_graphs=True): the UNet's forward recorded in the call (stood in for on the CPU: each replay runs
    the recorded function on the same input buffers) and replayed at each later step -- the same images, LoRA scale
    included; the pipeline's UNet is untouched afterwards."""
    import billiard_lora.graphs as graphs

    made = []

    class Spy(graphs.SamplingGraphs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def fake_capture(fn, inputs):
        out = torch.empty_like(fn(*inputs))  # a recording's output holds nothing until replayed
        return (lambda: out.copy_(fn(*inputs))), out

    monkeypatch.setattr(graphs, "SamplingGraphs", Spy)
    monkeypatch.setattr(graphs, "sampling_graphs_possible", lambda unet: True)
    monkeypatch.setattr(graphs, "_capture", fake_capture)
    pipe = _pipe(tiny_model_dir, loras=[f"{lora_run}:0.7"])
    firsts = []
    for kw in ({}, {"lora_scale": 0.3}):
        eager = generate(pipe, PROMPT, [0, 1], **kw, **FAST)
        graphed = generate(pipe, PROMPT, [0, 1], cuda_graphs=True, **kw, **FAST)
        assert all(np.array_equal(_px(a), _px(b)) for a, b in zip(eager, graphed))
        # 2 steps x 2 images: a warm-up call, then recorded and replayed, then 2 more replays
        assert (made[-1].calls, made[-1].replays, made[-1].failure) == (4, 3, None)
        assert "forward" not in vars(pipe.unet) and not made[-1].graphs  # restored, graphs dropped
        firsts.append(_px(graphed[0]))
    assert not np.array_equal(*firsts)  # the scale reached the second call's recording
    on_pipe = _pipe(tiny_model_dir, cuda_graphs=True)  # the pipeline's setting is generate()'s default
    generate(on_pipe, PROMPT, 0, **FAST)
    assert made[-1].replays == 1


def test_fp8_base_generation_halves_the_unet_and_keeps_the_images(tiny_model_dir, lora_run):
    """fp8_base: the UNet's weights (LoRA fused in) in float8; the images stay close to the full-precision ones, a
    LoRA loaded afterwards still applies, and fusing after the fact is refused instead of silently lost."""
    from billiard_lora.models import FP8

    full = _pipe(tiny_model_dir, loras=[str(lora_run)], fuse=True)
    small = _pipe(tiny_model_dir, loras=[str(lora_run)], fuse=True, fp8_base=True)
    size = lambda pipe: sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    assert size(small) < 0.4 * size(full)  # fp32 -> float8 on the CPU
    assert any(p.dtype == FP8 for p in small.unet.parameters())
    a, b = generate(full, PROMPT, 0, **FAST)[0], generate(small, PROMPT, 0, **FAST)[0]
    assert b.fp8_base and b.fused and b.metadata()["fp8_base"] == "True" and not a.fp8_base
    diff = np.abs(_px(a) - _px(b))
    assert 0 < diff.mean() < 8, "float8 rounding changes the image a little, not a lot"

    base8 = _pipe(tiny_model_dir, fp8_base=True)
    plain = generate(base8, PROMPT, 0, **FAST)[0]
    load_lora(base8, LoraSpec(str(lora_run)))
    with_lora = generate(base8, PROMPT, 0, **FAST)[0]
    assert with_lora.lora_names and not _close(with_lora, plain)
    with pytest.raises(UserError, match="float8"):
        fuse_loras(base8)


def test_cpu_offload_gives_the_same_images_and_loras_still_load_and_sweep(tiny_model_dir, lora_run):
    """cpu_offload: accelerate's hooks move each whole model to the device as it runs (on the CPU the moves are
    CPU to CPU, but the hooks run); the images equal those of a pipeline that holds everything, with a LoRA loaded at
    start, with float8 weights, and with a LoRA loaded, scaled and unloaded on the offloaded pipeline."""
    plain = _pipe(tiny_model_dir, loras=[str(lora_run)])
    offloaded = _pipe(tiny_model_dir, loras=[str(lora_run)], cpu_offload=True)
    assert all(hasattr(getattr(offloaded, m), "_hf_hook") for m in ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert np.array_equal(_px(generate(offloaded, PROMPT, 3, **FAST)[0]), _px(generate(plain, PROMPT, 3, **FAST)[0]))
    assert np.array_equal(_px(generate(offloaded, PROMPT, 3, lora_scale=0.5, **FAST)[0]),
                          _px(generate(plain, PROMPT, 3, lora_scale=0.5, **FAST)[0]))

    fp8 = _pipe(tiny_model_dir, loras=[str(lora_run)], fuse=True, fp8_base=True)
    fp8_offloaded = _pipe(tiny_model_dir, loras=[str(lora_run)], fuse=True, fp8_base=True, cpu_offload=True)
    assert np.array_equal(_px(generate(fp8_offloaded, PROMPT, 3, **FAST)[0]), _px(generate(fp8, PROMPT, 3, **FAST)[0]))

    base = _pipe(tiny_model_dir, cpu_offload=True)  # a LoRA loaded after offloading (as checkpoint grids do)
    name = load_lora(base, LoraSpec(str(lora_run)))
    assert np.array_equal(_px(generate(base, PROMPT, 3, **FAST)[0]), _px(generate(plain, PROMPT, 3, **FAST)[0]))
    from billiard_lora.generate import unload_lora

    unload_lora(base, name)
    assert _close(generate(base, PROMPT, 3, **FAST)[0], generate(_pipe(tiny_model_dir), PROMPT, 3, **FAST)[0])
    with pytest.raises(UserError, match="--cuda_graphs cannot be combined with --cpu_offload"):
        _pipe(tiny_model_dir, cpu_offload=True, cuda_graphs=True)


def test_vae_tiling_decodes_large_images_in_tiles_and_says_so(tiny_model_dir, monkeypatch):
    """vae_tiling=N: above N pixels the decoder sees tiles of N/8 latents, never the whole latent; at or below N
    nothing changes; each image records the tile size it was decoded with (0: whole). A bad size is one line."""
    plain, tiled = _pipe(tiny_model_dir), _pipe(tiny_model_dir, vae_tiling=64)
    small = dict(FAST, height=64, width=64)
    a, b = generate(plain, PROMPT, 0, **small)[0], generate(tiled, PROMPT, 0, **small)[0]
    assert np.array_equal(_px(a), _px(b)) and b.vae_tiling == 0 and b.metadata()["vae_tiling"] == "0"

    seen = []
    decoder_forward = type(tiled.vae.decoder).forward
    monkeypatch.setattr(type(tiled.vae.decoder), "forward",
                        lambda self, z, *a, **k: seen.append(tuple(z.shape[-2:])) or decoder_forward(self, z, *a, **k))
    big = dict(FAST, height=128, width=96)
    c = generate(tiled, PROMPT, 0, **big)[0]
    assert c.vae_tiling == 64 and c.metadata()["vae_tiling"] == "64" and c.image.size == (96, 128)
    assert len(seen) > 1 and max(h for h, _ in seen) <= 8 and max(w for _, w in seen) <= 8, seen
    seen.clear()
    d = generate(plain, PROMPT, 0, **big)[0]
    assert seen == [(16, 12)] and d.vae_tiling == 0
    assert np.abs(_px(c) - _px(d)).max() > 0, "tiles blend: not the same pixels (random weights make that plain)"

    assert _pipe(tiny_model_dir, vae_tiling=True).vae.tile_sample_min_size == 512, "the default tile: 512 px"
    with pytest.raises(UserError, match="--vae_tiling takes a tile size in pixels, a multiple of 64"):
        _pipe(tiny_model_dir, vae_tiling=100)


def test_running_out_of_memory_names_what_would_fit_and_keeps_the_images_made(tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """An out-of-memory error while generating is one line that names the flags that save memory (those not yet
    used) and the size; the CLI writes the images made before it."""
    from billiard_lora.generate import GenerationOutOfMemory

    calls = []
    real_call = type(_pipe(tiny_model_dir)).__call__

    def third_runs_out(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                                         "capacity of 14.75 GiB of which 3.06 MiB is free. Including ...")
        return real_call(self, *a, **k)

    monkeypatch.setattr(type(_pipe(tiny_model_dir)), "__call__", third_runs_out)
    with pytest.raises(GenerationOutOfMemory) as info:
        generate(_pipe(tiny_model_dir, vae_tiling=64), PROMPT, [0, 1, 2, 3], **FAST)
    msg = str(info.value)
    assert "\n" not in msg and "out of cpu memory generating a 32x32 image (20.00 MiB more was asked of a 14.75 GiB " \
        "GPU), 2 of 4 made before it" in msg
    assert "--cpu_offload" in msg and "--fp8_base" in msg and "--vae_tiling" not in msg, "only what is not used yet"
    assert len(info.value.results) == 2

    calls.clear()
    offloaded = _pipe(tiny_model_dir, cpu_offload=True)
    with pytest.raises(GenerationOutOfMemory, match="try --vae_tiling, --fp8_base, a smaller") as info:
        generate(offloaded, PROMPT, [0, 1, 2], **FAST)
    assert "--cpu_offload" not in str(info.value)
    assert generate(offloaded, PROMPT, [0], **FAST)[0].image, "the offloaded pipeline still works afterwards"

    calls.clear()
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model_dir), "--vae", "none", "--prompt", PROMPT, "--seeds", "0", "1", "2",
                 "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "out of cpu memory" in errors[0] and "Traceback" not in err
    assert len(list(out.glob("*.png"))) == 2, "the two images made before it are written"


def test_bad_generation_settings_are_clear_errors(tiny_model_dir):
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(UserError, match="multiple of 8"):
        generate(pipe, PROMPT, 0, num_inference_steps=2, height=30, width=32)
    with pytest.raises(UserError, match="needs a LoRA"):
        generate(pipe, PROMPT, 0, lora_scale=0.5, **FAST)
    with pytest.raises(UserError, match="at least one seed"):
        generate(pipe, PROMPT, [], **FAST)


# ----------------------------------------------------------------------------------------------------------------------
# Grids


def test_grids_put_each_image_in_its_labelled_cell(tiny_model_dir, lora_run):
    pipe = _pipe(tiny_model_dir, loras=[str(lora_run)])
    prompts, seeds = [PROMPT, "snooker"], [0, 1, 2]
    grid = prompt_seed_grid(pipe, prompts, seeds, **FAST)
    assert grid.width > 3 * SIZE and grid.height > 2 * SIZE, "room for row and column labels"
    header = np.asarray(grid.convert("L"))[: grid.height - 2 * SIZE, grid.width - 3 * SIZE:]
    assert header.min() < 128, "column labels are drawn"
    for r, c in [(0, 0), (1, 2), (0, 1)]:  # rows are prompts, columns seeds
        assert np.array_equal(_px(_cell(grid, r, c, 2, 3)), _px(generate(pipe, prompts[r], seeds[c], **FAST)[0]))

    sweep = scale_sweep(pipe, PROMPT, [0, 1], scales=(0.0, 0.5, 1.0), **FAST)
    assert np.array_equal(_px(_cell(sweep, 1, 1, 2, 3)), _px(generate(pipe, PROMPT, 1, lora_scale=0.5, **FAST)[0]))
    assert np.array_equal(_px(_cell(sweep, 0, 2, 2, 3)), _px(generate(pipe, PROMPT, 0, **FAST)[0]))

    base = generate(_pipe(tiny_model_dir), "snooker", 3, **FAST)[0]
    compare = base_vs_lora(pipe, prompts, 3, **FAST)
    assert _close(_cell(compare, 1, 0, 2, 2), base)
    assert np.array_equal(_px(_cell(compare, 1, 1, 2, 2)), _px(generate(pipe, "snooker", 3, **FAST)[0]))


def test_checkpoint_grid_rows_follow_the_steps_and_never_stack(tiny_model_dir, lora_run):
    prompts = [PROMPT, "snooker"]
    pipe = _pipe(tiny_model_dir, loras=[f"{lora_run}:0.5"])  # the caller's own LoRA must neither stack nor vanish
    before = generate(pipe, PROMPT, 7, **FAST)[0]
    grid = checkpoint_grid(pipe, lora_run, prompts, 7, **FAST)
    expected_rows = [
        generate(_pipe(tiny_model_dir), prompts, 7, **FAST),                                         # base
        generate(_pipe(tiny_model_dir, loras=[str(lora_run / "checkpoint-1")]), prompts, 7, **FAST),  # step 1
        generate(_pipe(tiny_model_dir, loras=[str(lora_run / "checkpoint-2")]), prompts, 7, **FAST),  # step 2
        generate(_pipe(tiny_model_dir, loras=[str(lora_run)]), prompts, 7, **FAST),                   # final
    ]
    for r, row in enumerate(expected_rows):
        for c, want in enumerate(row):
            assert _close(_cell(grid, r, c, 4, 2), want), f"row {r} col {c}"
    assert not _close(expected_rows[0][0], expected_rows[1][0]), "step 1 should differ from the base model"
    assert np.array_equal(_px(generate(pipe, PROMPT, 7, **FAST)[0]), _px(before))
    assert pipe.get_list_adapters() == {"unet": ["run"]}


# ----------------------------------------------------------------------------------------------------------------------
# Saving and the command line


def test_save_results_writes_the_settings_into_each_png(tiny_model_dir, lora_run, tmp_path):
    pipe = _pipe(tiny_model_dir, loras=[f"{lora_run}:0.8"])
    results = generate(pipe, [PROMPT, "snooker"], [0, 5], negative_prompt="blurry", lora_scale=0.5, **FAST)
    paths = save_results(results, tmp_path)
    assert paths[1].name == "a-photo-of-messi-playing-billiard_seed5_scale0.5.png"
    for path, r in zip(paths, results):
        with Image.open(path) as img:
            text = dict(img.text)
            assert np.array_equal(_px(img), _px(r))
        assert text["prompt"] == r.prompt and text["seed"] == str(r.seed) and text["negative_prompt"] == "blurry"
        assert (text["steps"], text["guidance_scale"], text["lora_scale"]) == ("2", "5.0", "0.5")
        assert (text["lora_names"], text["lora_weights"], text["scheduler"]) == ("run", "0.8", "default")
    again = save_results(results[:1], tmp_path)
    assert again[0] != paths[0] and again[0].name.endswith("-2.png"), "earlier images are never overwritten"


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "billiard_lora.generate", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_cli_makes_famous_prompt_images_and_a_comparison(tiny_model_dir, lora_run, tmp_path):
    out = tmp_path / "out"
    r = _cli(["--model", str(tiny_model_dir), "--vae", str(tiny_model_dir / "vae"), "--lora", f"{lora_run}:0.8",
              "--seeds", "1", "--steps", "2", "--height", "32", "--width", "32", "--grid", "--compare",
              "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    # 8 default prompts (from the LoRA's instance prompt) x 1 seed, a grid, a comparison
    assert len(pngs) == 8 + 1 + 1 and (out / "grid.png").is_file() and (out / "compare_seed1.png").is_file()
    assert all(str(p) in r.stdout for p in pngs)
    prompts = {Image.open(p).text.get("prompt") for p in pngs}
    assert {PROMPT, "a photo of cristiano ronaldo playing billiard"} <= prompts
    assert Image.open(out / "a-photo-of-messi-playing-billiard_seed1_scale1.png").text["lora_weights"] == "0.8"

    bad = _cli(["--model", str(tiny_model_dir), "--vae", "none", "--lora", str(tmp_path / "missing")])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "missing' does not exist" in bad.stderr


@pytest.mark.parametrize("savers", [[], ["--cpu_offload", "--vae_tiling", "64"]])
def test_cli_sweep_and_checkpoints(tiny_model_dir, lora_run, tmp_path, capsys, savers):
    """Also with the memory savers: the checkpoint grid loads and unloads LoRAs on an offloaded pipeline."""
    common = ["--model", str(tiny_model_dir), "--vae", "none", "--steps", "2", "--height", "32", "--width", "32",
              "--device", "cpu", "--out", str(tmp_path)]
    assert main([*common, "--lora", str(lora_run), "--prompt", "snooker", "--sweep", "--scales", "0", "1",
                 "--checkpoints", str(lora_run), "--scheduler", "euler_a", *savers]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["checkpoints_seed0.png", "sweep_snooker.png"]
    text = Image.open(tmp_path / "sweep_snooker.png").text
    assert text["prompt"] == "snooker" and ("vae_tiling" in text) == bool(savers)
    assert text["scheduler"] == "euler_a"


@pytest.mark.parametrize("args, message", [
    (["--sweep"], "need a LoRA"),
    (["--lora", "x", "--fuse", "--compare"], "--fuse"),
    (["--height", "30"], "multiple of 8"),
    (["--stepz", "3"], "unrecognized arguments"),
    (["--vae_tiling", "100"], "multiple of 64"),
    (["--cpu_offload", "--cuda_graphs"], "cannot be combined"),
    (["--scales", "0.5", "1.5"], "--scales sets the LoRA scales of --sweep: add --sweep"),  # was silently ignored
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--scheduler", "dpm"], "argument --scheduler: invalid choice: 'dpm'"),
    (["--out", __file__], "is a file; pass a folder"),  # said before sampling, not as a traceback after it
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["--model", "/nonexistent", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_generates_with_the_model_and_vae_the_lora_was_trained_with(tiny_model_dir, lora_run, tmp_path):
    """`generate --lora RUN` (the model card's command) once fell back to SDXL base from the Hub and the fp16-fix
    VAE, whatever the run was trained on: offline, an error."""
    import argparse

    from billiard_lora.generate import SDXL_BASE, SDXL_VAE_FP16_FIX, _default_model_and_vae

    out = tmp_path / "out"
    code = main(["--lora", str(lora_run), "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0 and len(list(out.glob("*.png"))) == 1
    lora = lora_run / "pytorch_lora_weights.safetensors"
    ns = lambda **kw: argparse.Namespace(**{"model": None, "vae": "config", "checkpoints": None, **kw})
    assert _default_model_and_vae(ns(), [lora]) == (str(tiny_model_dir), None)  # the run used the model's own VAE
    assert _default_model_and_vae(ns(model="other"), [lora]) == ("other", SDXL_VAE_FP16_FIX)
    os.chdir(tiny_model_dir.parent)  # the run's model typed as a relative path is still the run's model
    try:
        assert _default_model_and_vae(ns(model=tiny_model_dir.name), [lora]) == (tiny_model_dir.name, None)
    finally:
        os.chdir(REPO)
    assert _default_model_and_vae(ns(vae="none"), []) == (SDXL_BASE, None)
    assert _default_model_and_vae(ns(checkpoints=str(lora_run)), []) == (str(tiny_model_dir), None)


def test_ctrl_c_keeps_the_images_already_made(tiny_model_dir, lora_run, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionXLPipeline

    real, calls = StableDiffusionXLPipeline.__call__, []

    def interrupted_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", interrupted_at_the_third)
    out = tmp_path / "out"
    code = main(["--lora", str(lora_run), "--prompt", PROMPT, "--seeds", "0", "1", "2", "3", "--steps", "2",
                 "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out)])
    assert code == 130 and len(list(out.glob("*.png"))) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted; the 2 of 4 images made are saved in {out}"
