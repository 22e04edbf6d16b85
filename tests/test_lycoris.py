"""--lora_type loha / lokr: LyCORIS adapters trained through peft, saved in LyCORIS' format, loaded by generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from billiard_lora.config import TrainConfig
from billiard_lora.errors import UserError
from billiard_lora.train import train
from test_train import REPO, Crash, crash_at_step, make_images, sample, tiny_config

# (lora_type, settings): LoHa with text encoders and convolutions; LoKr as peft factorises it by default (on the tiny
# model mostly two full factors, which LyCORIS does not scale by alpha); LoKr with a fixed factor and a rank low
# enough that its second factor is low-rank (scaled by alpha / rank)
CASES = {"loha": dict(lora_type="loha", lora_layers="attn,conv", train_text_encoder=True, lora_alpha=2),
         "lokr": dict(lora_type="lokr", lora_layers="attn,ff", lora_alpha=2),
         "lokr-low-rank": dict(lora_type="lokr", lokr_factor=4, rank=2, lora_alpha=1, lora_layers="attn,conv")}


def webui_delta(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """A layer's weight change as ComfyUI (comfy/weight_adapter/loha.py, lokr.py) and A1111 compute it from the
    file, written here from their formulas: the reference the saved file must meet."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "hada_w1_a" in parts:
        d = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        return (d * (alpha / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0)).reshape(shape)
    dim = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        dim, w1 = parts["lokr_w1_b"].shape[0], parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        dim, w2 = parts["lokr_w2_b"].shape[0], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


def file_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path)).items():
        base, _, part = k.partition(".")
        out.setdefault(base, {})[part] = v
    return out


@pytest.fixture(scope="module")
def lycoris_runs(tiny_model_dir, tmp_path_factory):
    """Each case trained once (3 steps); the trained components kept for comparison."""
    from billiard_lora.models import load_components

    root = tmp_path_factory.mktemp("lycoris")
    data = make_images(root / "data")
    runs = {}
    for name, kw in CASES.items():
        c = load_components(str(tiny_model_dir))
        before = {m: {k: v.clone() for k, v in getattr(c, m).state_dict().items()}
                  for m in ("unet", "text_encoder_one", "text_encoder_two", "vae")}
        out = train(tiny_config(tiny_model_dir, data, root / name, learning_rate=1e-2, **kw), components=c)
        runs[name] = (out, c, before)
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_trains_only_its_weights_and_saves_what_comfyui_and_a1111_apply(lycoris_runs, case):
    from peft.tuners.lycoris_utils import LycorisLayer

    from billiard_lora.lycoris import PREFIXES

    out, c, before = lycoris_runs[case]
    kw = CASES[case]
    prefix = "hada_" if kw["lora_type"] == "loha" else "lokr_"
    for m in ("unet", "text_encoder_one", "text_encoder_two", "vae"):
        for k, v in getattr(c, m).state_dict().items():
            if f".{prefix}" in k:
                continue
            assert torch.equal(v, before[m][k.replace(".base_layer", "")]), f"{m}.{k} changed: only adapters may"
    adapters = {p: v for p, v in c.unet.state_dict().items() if f".{prefix}" in p}
    assert adapters and len(adapters) == sum(p.requires_grad for p in c.unet.parameters())

    file = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"])["algo"] == kw["lora_type"]
    assert json.loads(header["billiard_lora.training_config"])["lora_type"] == kw["lora_type"]
    assert all(k.startswith(tuple(PREFIXES.values())) and (f".{prefix}" in k or k.endswith(".alpha")) for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys) == bool(kw.get("train_text_encoder"))
    card = (out / "README.md").read_text()  # the model card says how to load what diffusers' loader cannot
    kind = {"loha": "LoHa", "lokr": "LoKr"}[kw["lora_type"]]
    assert f"LyCORIS {kind} weights" in card and "load_lycoris(pipe, " in card and "load_lora_weights(" not in card
    assert f"| `lora_type` | `{kw['lora_type']}` |" in card

    # every trained layer's change, as the webuis compute it from the file, is the change training made
    layers = {}
    for component, model in (("unet", c.unet), ("text_encoder", c.text_encoder_one),
                             ("text_encoder_2", c.text_encoder_two)):
        for name, layer in model.named_modules():
            if isinstance(layer, LycorisLayer):
                flat = ("text_model." + name if name.startswith("encoder.") else name).replace(".", "_")
                layers[PREFIXES[component] + flat] = layer
    modules = file_modules(file)
    assert set(modules) == set(layers)
    moved = 0
    for name, layer in layers.items():
        want = layer.get_delta_weight("default").detach()
        torch.testing.assert_close(webui_delta(modules[name], want.shape), want, rtol=1e-5, atol=1e-7)
        moved += int(want.abs().max() > 0 or not name.startswith("lora_unet_"))
    # (the text encoders' last layers never train: SDXL reads the layer before them)
    assert moved == len(layers), "every UNet adapter layer trained away from its zero start"
    if case == "lokr":
        assert any("lokr_w1" in p and "lokr_w2" in p for p in modules.values()), "the case meant to test full factors"
    if case == "lokr-low-rank":
        assert all("lokr_w2_a" in p for p in modules.values()) and {float(p["alpha"]) for p in modules.values()} == {1.0}


@pytest.mark.parametrize("case", ["loha", "lokr-low-rank"])
def test_lycoris_reloads_to_the_same_images_and_scales_like_a_lora(lycoris_runs, tiny_model_dir, case):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import LoraSpec, fuse_loras, load_lora
    from billiard_lora.models import pipeline_from_components

    out, c, _ = lycoris_runs[case]
    trained = sample(pipeline_from_components(c))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = sample(pipe)
    name = load_lora(pipe, LoraSpec(str(out), 1.0))
    assert np.abs(trained - base).max() > 1e-4, "the adapter should change the output"
    np.testing.assert_allclose(sample(pipe), trained, atol=1e-5)
    pipe.set_adapters([name], adapter_weights=[0.0])
    np.testing.assert_allclose(sample(pipe), base, atol=1e-5)
    pipe.set_adapters([name], adapter_weights=[1.0])
    fuse_loras(pipe)  # merged into the weights, adapter modules gone
    np.testing.assert_allclose(sample(pipe), trained, atol=1e-4)


def test_lycoris_files_in_sgm_names_and_simpletuners_prefix_load_alike(lycoris_runs, tiny_model_dir, tmp_path):
    """Most SDXL LyCORIS files name the UNet's modules as the original (SGM) UNet does; SimpleTuner's use the
    prefix lycoris_: the same layers either way."""
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import LoraSpec, load_lora
    from billiard_lora.lora_tools import _sgm_names

    out, c, _ = lycoris_runs["loha"]
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    sgm = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + s.replace(".", "_")
           for d, s in _sgm_names(n for n, _ in c.unet.named_modules()).items()}
    renamed = {"sgm": {}, "simpletuner": {}}
    for k, v in tensors.items():
        base, _, part = k.partition(".")
        renamed["sgm"][f"{sgm.get(base, base)}.{part}"] = v
        renamed["simpletuner"][f"{base.replace('lora_unet_', 'lycoris_')}.{part}"] = v
    assert renamed["sgm"].keys() != tensors.keys()
    images = []
    for label, state in [("ours", tensors), *renamed.items()]:
        save_file(state, tmp_path / f"{label}.safetensors")
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
        load_lora(pipe, LoraSpec(str(tmp_path / f"{label}.safetensors")))
        images.append(sample(pipe))
    np.testing.assert_array_equal(images[1], images[0])
    np.testing.assert_array_equal(images[2], images[0])


def test_lycoris_files_that_do_not_fit_are_one_line(lycoris_runs, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import LoraSpec, load_lora

    out, _, _ = lycoris_runs["lokr"]
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    other = dict(tensors, **{"lora_unet_down_blocks_5_attentions_0_proj_in.lokr_w1": torch.ones(4, 4)})
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"does not fit the base model .*1 of its \d+ layers name no module"):
        load_lora(pipe, LoraSpec(str(tmp_path / "other.safetensors")))
    assert pipe.get_list_adapters() == {}, "nothing of a refused file stays on the model"
    key = next(k for k in tensors if k.endswith(".lokr_w1"))
    save_file(dict(tensors, **{key.replace("lokr_w1", "lokr_t2"): torch.ones(2, 2, 3, 3)}), tmp_path / "t.safetensors")
    with pytest.raises(UserError, match="Tucker-decomposed"):
        load_lora(pipe, LoraSpec(str(tmp_path / "t.safetensors")))
    np.testing.assert_array_equal(sample(pipe), sample(StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))))


def test_lycoris_resume_equals_uninterrupted_run_bit_for_bit(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=4)
    kw = dict(lora_type="lokr", lokr_factor=4, rank=2, max_train_steps=4, checkpointing_steps=2, random_flip=True)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash_at_step(3))
    train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="lora_type='lokr' but this run has lora_type='loha'"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest",
                          **dict(kw, lora_type="loha", lokr_factor=-1, max_train_steps=6)))


def test_lycoris_settings_that_do_not_apply_are_one_clear_error(tiny_model_dir, tmp_path):
    base = dict(pretrained_model_name_or_path=str(tiny_model_dir), instance_prompt="x", output_dir=str(tmp_path))
    for kw, msg in [(dict(lora_type="lycoris"), "choose lora, loha or lokr .SimpleTuner's lycoris preset is a LoKr"),
                    (dict(lora_type="loha", lokr_factor=8), "--lokr_factor=8 applies with --lora_type lokr"),
                    (dict(lora_type="lokr", lokr_factor=0), "--lokr_factor=0"),
                    (dict(lora_type="lokr", use_dora=True), "--use_dora does not apply to --lora_type lokr"),
                    (dict(lora_type="loha", loraplus_lr_ratio=16.0), "--loraplus_lr_ratio does not apply"),
                    (dict(lora_type="loha", lora_dropout=0.1), "--lora_dropout does not apply"),
                    (dict(lora_type="lokr", init_lora_weights="pissa"), "--init_lora_weights does not apply"),
                    (dict(lora_type="lokr", output_kohya_format=True), "already is in the kohya/LyCORIS format")]:
        with pytest.raises(UserError, match=msg):
            TrainConfig(**base, **kw)
    r = subprocess.run([sys.executable, "-m", "billiard_lora.train", "--pretrained_model_name_or_path",
                        str(tiny_model_dir), "--instance_prompt", "x", "--lora_type", "loha", "--use_dora"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --use_dora does not apply to --lora_type loha")


def test_lora_toolbox_inspects_and_merges_a_lycoris_and_refuses_the_rest_in_one_line(lycoris_runs, tiny_model_dir,
                                                                                      tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import billiard_lora.lora_tools as lt
    from billiard_lora.generate import LoraSpec, load_lora

    out, _, _ = lycoris_runs["loha"]
    r = lt.inspect_lora(out)
    assert r["format"].startswith("LyCORIS LoHa")
    assert set(r["layers"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert r["ranks"] == {"4": sum(r["layers"].values())} and r["scales"] == {"0.5": sum(r["layers"].values())}
    assert r["conv_layers"] > 0 and r["training_config"]["lora_type"] == "loha"
    assert r["loads_in"]["comfyui_not_loaded"] == 0 and r["loads_in"]["a1111_not_loaded"] == 0
    assert "LyCORIS LoHa" in lt.format_inspect(r)
    for call in (lambda: lt.convert_lora(out, "diffusers", tmp_path / "c"),
                 lambda: lt.combine_loras([(out, 1.0), (out, 0.5)], tmp_path / "c2")):
        with pytest.raises(UserError, match="is a LyCORIS LoHa, not a LoRA: convert, combine .* `lora resize FILE"):
            call()

    merged = lt.merge_lora(out, str(tiny_model_dir), tmp_path / "merged", scale=1.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    load_lora(pipe, LoraSpec(str(out)))
    np.testing.assert_allclose(sample(StableDiffusionXLPipeline.from_pretrained(str(merged))), sample(pipe),
                               atol=1e-4)


def test_webui_key_rules_need_a_complete_lycoris_layer():
    from billiard_lora.lora_tools import kohya_key_report

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = {f"{name}.{p}": 0 for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    assert kohya_key_report(loha).ok
    assert kohya_key_report({f"{name}.lokr_w1": 0, f"{name}.lokr_w2_a": 0, f"{name}.lokr_w2_b": 0}).ok
    partial = {k: v for k, v in loha.items() if not k.endswith("hada_w2_b")}
    assert kohya_key_report(partial).a1111  # A1111 builds no module from three of LoHa's four matrices
    assert kohya_key_report({"lora_unet_no_such_layer.lokr_w1": 0, "lora_unet_no_such_layer.lokr_w2": 0}).comfyui


def test_the_model_cards_python_loads_the_lycoris(lycoris_runs, monkeypatch):
    """The card's diffusers snippet, run as written (on the CPU in float32, 2 steps): it loads the LoHa."""
    import re

    out, c, _ = lycoris_runs["loha"]
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    code = (code.replace('.to("cuda")', "").replace("torch.float16", "torch.float32")
            .replace("num_inference_steps=25", "num_inference_steps=2"))
    monkeypatch.chdir(out.parent)
    scope: dict = {}
    exec(compile(code, "model card", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert scope["pipe"].get_list_adapters()["unet"] == ["subject"]
    assert scope["image"].size[0] > 0


@pytest.mark.parametrize("case", ["loha", "lokr-low-rank"])
def test_resize_turns_a_lycoris_into_a_lora_that_stock_diffusers_loads(lycoris_runs, tiny_model_dir, tmp_path, case):
    """diffusers' SDXL loader reads no LoHa/LoKr: `lora resize` makes each layer's ΔW a LoRA (SVD), at full rank the
    same model, which load_lora_weights, ComfyUI and A1111 read; --energy keeps fewer directions."""
    from diffusers import StableDiffusionXLPipeline

    import billiard_lora.lora_tools as lt
    from billiard_lora.generate import LoraSpec, load_lora

    out, _, _ = lycoris_runs[case]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    load_lora(pipe, LoraSpec(str(out)))
    want = sample(pipe)
    file, infos = lt.resize_lora(out, tmp_path / "full", rank=10_000)
    assert file.name == "pytorch_lora_weights.safetensors" and all(i.energy > 0.999999 for i in infos)
    report = lt.inspect_lora(file)
    assert report["format"] == "kohya" and report["loads_in"]["comfyui_not_loaded"] == 0
    assert report["loads_in"]["a1111_not_loaded"] == 0
    stock = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    stock.load_lora_weights(str(file.parent))  # diffusers' own loader, kohya converter
    np.testing.assert_allclose(sample(stock), want, atol=1e-4)
    small, small_infos = lt.resize_lora(out, tmp_path / "small" / "x.safetensors", energy=0.5)
    assert sum(i.new_rank for i in small_infos) < sum(i.new_rank for i in infos)
    assert all(i.energy >= 0.5 for i in small_infos)
    with safe_open(str(small), framework="pt") as f:
        assert json.loads(f.metadata()["billiard_lora.resized"])["from_lycoris"] == CASES[case]["lora_type"]


@pytest.mark.parametrize("kind,rank,factor,layers", [("lokr", 4, -1, "attn,ff,proj,conv"), ("lokr", 100000, 16, "attn"),
                                                     ("loha", 4, -1, "attn,conv")])
def test_lycoris_files_in_sgm_names_load_every_layer_of_sdxls_full_unet(kind, rank, factor, layers, tmp_path):
    """SDXL's real layout (2.6 B parameters, left uninitialised: only the adapters are touched, ~1.4 GB): a LyCORIS
    file named as most SDXL LoHa/LoKr files are (SGM names), with the factor shapes peft builds for each of its layers,
    loads every layer, and each layer's ΔW is the webuis'."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lycoris_utils import LycorisLayer

    from billiard_lora.lora import add_lora, unet_lora_layers
    from billiard_lora.lora_tools import SDXL_UNET_CONFIG, _sgm_names
    from billiard_lora.lycoris import count_loaded, load_lycoris

    with torch.device("meta"):
        shapes_from = UNet2DConditionModel.from_config(dict(SDXL_UNET_CONFIG))
    add_lora(shapes_from, rank=rank, lora_type=kind, lokr_factor=factor, target_modules=unet_lora_layers(layers))
    sgm = _sgm_names(n for n, _ in shapes_from.named_modules())
    torch.manual_seed(0)
    state, names = {}, {}
    for name, layer in shapes_from.named_modules():
        if isinstance(layer, LycorisLayer):
            base = "lora_unet_" + sgm[name].replace(".", "_")
            names[base] = name
            for part in (p for p in dir(layer) if p.startswith(("hada_w", "lokr_w"))):
                if "default" in getattr(layer, part, {}):
                    state[f"{base}.{part}"] = torch.randn(getattr(layer, part)["default"].shape) * 0.02
            state[f"{base}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "sgm.safetensors")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(SDXL_UNET_CONFIG))
    pipe = type("Pipe", (), {"unet": unet.to_empty(device="cpu")})()
    assert load_lycoris(pipe, tmp_path / "sgm.safetensors", "x") == len(names) == count_loaded(pipe, "x")
    modules = dict(pipe.unet.named_modules())
    for base in list(names)[::50]:
        parts = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(base + ".")}
        got = modules[names[base]].get_delta_weight("x").detach()
        torch.testing.assert_close(got, webui_delta(parts, got.shape), rtol=1e-5, atol=1e-9)
