"""--save_precision: the LoRA files in fp16/bf16 (kohya's flag), the same weights rounded, loaded everywhere; the
toolbox's --save_precision; the range checks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from billiard_lora.errors import UserError
from billiard_lora.io import in_precision
from billiard_lora.lora import METADATA_KEY
from billiard_lora.lora_tools import main as lora_main
from billiard_lora.train import train

from test_train import make_images, sample, tiny_config


def _dtypes(path) -> set[torch.dtype]:
    return {v.dtype for v in load_file(str(path)).values()}


def test_fp16_files_hold_the_fp32_runs_weights_rounded_and_load_in_diffusers(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    data = make_images(tmp_path / "data", n=4)
    kw = dict(max_train_steps=2, checkpointing_steps=1, output_kohya_format=True, use_ema=True, ema_decay=0.5)
    full = train(tiny_config(tiny_model_dir, data, tmp_path / "fp32", **kw))
    half = train(tiny_config(tiny_model_dir, data, tmp_path / "fp16", save_precision="fp16", **kw))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                 "no_ema/pytorch_lora_weights.safetensors", "checkpoint-1/pytorch_lora_weights.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(half / name))
        assert a.keys() == b.keys() and {v.dtype for v in a.values()} == {torch.float32}, name
        assert {v.dtype for v in b.values()} == {torch.float16}, name
        for k in a:  # the same training, only the files rounded
            assert torch.equal(a[k].half(), b[k]), (name, k)
        assert (half / name).stat().st_size < 0.6 * (full / name).stat().st_size
    assert any(float(v.abs().max()) > 0 for k, v in load_file(str(half / "pytorch_lora_weights.safetensors")).items()
               if "up" in k or "lora_B" in k)
    # the training state keeps fp32 (resuming is exact): only the LoRA files are rounded
    assert _dtypes(half / "checkpoint-1" / "adapter_state.safetensors") == {torch.float32}
    with safe_open(str(half / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["save_precision"] == "fp16"
    assert "save_precision" in (half / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = sample(pipe)
    images = {}
    for run in (full, half):
        pipe.load_lora_weights(str(run), adapter_name=run.name)
        pipe.set_adapters([run.name])
        images[run.name] = sample(pipe)
        pipe.delete_adapters(run.name)
    assert np.abs(images["fp32"] - base).max() > 1e-4
    np.testing.assert_allclose(images["fp16"], images["fp32"], atol=2e-3)


def test_bf16_lokr_and_the_precision_choice_is_checked(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "o", lora_type="lokr",
                            max_train_steps=1, save_precision="bf16"))
    assert _dtypes(out / "pytorch_lora_weights.safetensors") == {torch.bfloat16}
    from diffusers import StableDiffusionXLPipeline

    from billiard_lora.generate import LoraSpec, load_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    base = sample(pipe)
    load_lora(pipe, LoraSpec(str(out)))  # the LyCORIS loader takes the bf16 factors into the fp32 model
    changed = sample(pipe)
    assert np.isfinite(changed).all() and np.abs(changed - base).max() > 1e-5
    with pytest.raises(UserError, match="--save_precision='half' must be one of fp32, fp16, bf16, float"):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "o2", save_precision="half")


def test_values_beyond_fp16_keep_the_file_in_fp32_and_underflow_is_counted():
    t = {"a": torch.tensor([1.0, 7e4]), "b": torch.tensor([1e-9, 0.5]), "steps": torch.tensor([3])}
    with pytest.warns(UserWarning, match=r"x.safetensors: values up to 7e\+04 \(a\) lie beyond fp16's range .* saved "
                                         r"in float32 instead"):
        kept = in_precision(t, "fp16", "x.safetensors")
    assert all(kept[k] is t[k] for k in t)
    t["a"] = torch.tensor([1.0, -2.0])
    with pytest.warns(UserWarning, match=r"1 of 4 non-zero values are below fp16's smallest .* saved as 0"):
        half = in_precision(t, "fp16", "x.safetensors")
    assert half["a"].dtype == torch.float16 and half["b"].tolist() == [0.0, 0.5] and half["steps"].dtype == torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 has fp32's range: nothing to say
        assert in_precision(t, "bf16", "x")["b"][0] != 0 and in_precision(t, "float", "x")["a"].dtype == torch.float32


def test_toolbox_writes_the_precision_asked(tiny_model_dir, tmp_path, capsys):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data", n=2), tmp_path / "run", max_train_steps=2))
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora_main(["convert", str(lora), "--to", "kohya", "--out", str(tmp_path / "k16.safetensors"),
                      "--save_precision", "fp16"]) == 0
    assert _dtypes(tmp_path / "k16.safetensors") == {torch.float16}
    # and back: a half file converted keeps its precision unless asked
    assert lora_main(["convert", str(tmp_path / "k16.safetensors"), "--to", "diffusers",
                      "--out", str(tmp_path / "d.safetensors")]) == 0
    assert _dtypes(tmp_path / "d.safetensors") == {torch.float16}
    assert lora_main(["resize", str(lora), "--rank", "2", "--out", str(tmp_path / "r.safetensors"), "--quiet",
                      "--save_precision", "bf16"]) == 0
    assert _dtypes(tmp_path / "r.safetensors") == {torch.bfloat16}
    assert lora_main(["combine", f"{lora}:0.5", str(lora), "--out", str(tmp_path / "c.safetensors"),
                      "--save_precision", "float"]) == 0
    assert _dtypes(tmp_path / "c.safetensors") == {torch.float32}
    header = safe_open(str(tmp_path / "k16.safetensors"), framework="pt").metadata()
    assert header.get("ss_network_dim")  # the header survives the rewrite
    assert lora_main(["convert", str(lora), "--to", "kohya", "--out", str(tmp_path / "x.safetensors"),
                      "--save_precision", "fp8"]) == 2
    assert "--save_precision: invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
