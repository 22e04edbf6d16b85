"""--sample_prompts: a validation prompt file in kohya's .txt form or SimpleTuner's .json library."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import billiard_lora.train as train_mod
from billiard_lora.errors import UserError
from billiard_lora.sample_prompts import SamplePrompt, read_sample_prompts
from test_train import REPO, make_images, tiny_config

KOHYA_TXT = """# prompts for the samples
a photo of sks billiard --n blurry, lowres --l 3.5 --s 3
a photo of obama playing billiard --w 1024 --h 768 --d 42

a billiard table
"""


def test_kohya_txt_lines_carry_their_own_negative_guidance_and_steps(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(KOHYA_TXT)
    rows, notes = read_sample_prompts(f)
    assert rows == [SamplePrompt("a photo of sks billiard", "blurry, lowres", 3.5, 3),
                    SamplePrompt("a photo of obama playing billiard"), SamplePrompt("a billiard table")]
    assert len(notes) == 1 and "--d (seed), --h (height), --w (width)" in notes[0]


@pytest.mark.parametrize("data", [{"messi": "a photo of messi playing billiard", "table": "a billiard table"},
                                  ["a photo of messi playing billiard", "a billiard table"],
                                  [{"prompt": "a photo of messi playing billiard"}, {"prompt": "a billiard table"}]])
def test_json_prompt_libraries_simpletuner_and_kohya(tmp_path, data):
    f = tmp_path / "library.json"
    f.write_text(json.dumps(data))
    rows, notes = read_sample_prompts(f)
    assert [r.prompt for r in rows] == ["a photo of messi playing billiard", "a billiard table"] and not notes
    f.write_text(json.dumps([{"prompt": "x", "negative_prompt": "blurry", "scale": 6, "sample_steps": 20}]))
    assert read_sample_prompts(f)[0] == [SamplePrompt("x", "blurry", 6.0, 20)]


def test_bad_prompt_files_are_one_line_naming_file_and_line(tmp_path):
    cases = {"missing.txt": None, "empty.txt": "# nothing\n\n", "bad.txt": "ok\nsks --l high\n",
             "lonely.txt": "--n blurry\n", "bad.json": "{\"a\": ", "odd.json": "[3]", "steps.txt": "x --s 0\n"}
    expected = {"missing.txt": "does not exist", "empty.txt": "holds no prompt",
                "bad.txt": r"line 2: --l 'high' is not a number", "lonely.txt": "line 1: options without a prompt",
                "bad.json": "is not valid JSON", "odd.json": "entry 1 is neither a prompt",
                "steps.txt": "line 1: --s '0' is not a whole number of steps"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=expected[name]):
            read_sample_prompts(tmp_path / name)
    r = subprocess.run([sys.executable, "-m", "billiard_lora.train", "--pretrained_model_name_or_path", "x",
                        "--instance_prompt", "x", "--sample_prompts", str(tmp_path / "bad.txt")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --sample_prompts {tmp_path / 'bad.txt'}, line 2")


def test_validation_grid_gets_the_files_rows_with_their_settings(tiny_model_dir, tiny_components, tmp_path):
    from accelerate import Accelerator

    from billiard_lora.models import pipeline_from_components

    c = tiny_components
    f = tmp_path / "prompts.txt"
    f.write_text(KOHYA_TXT)
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", validation_prompt="sks",
                      sample_prompts=str(f), validation_negative_prompt="ugly", num_validation_images=1,
                      validation_inference_steps=2)
    assert cfg.validation_prompts == ["sks", "a photo of sks billiard", "a photo of obama playing billiard",
                                      "a billiard table"]
    images = train_mod.run_validation(cfg, c, c.unet, c.text_encoder_one, c.text_encoder_two, Accelerator(cpu=True),
                                      torch.float32, 1, None)
    pipe = pipeline_from_components(c)

    def made(prompt, **kw):
        return np.asarray(pipe(prompt, height=32, width=32, generator=torch.Generator().manual_seed(0), **kw).images[0])

    run_default = dict(negative_prompt="ugly", guidance_scale=5.0, num_inference_steps=2)
    assert np.array_equal(np.asarray(images[0]), made("sks", **run_default))
    assert np.array_equal(np.asarray(images[1]), made("a photo of sks billiard", negative_prompt="blurry, lowres",
                                                      guidance_scale=3.5, num_inference_steps=3))
    assert np.array_equal(np.asarray(images[2]), made("a photo of obama playing billiard", **run_default))
    grid = Image.open(tmp_path / "out" / "validation" / "step-000001.png")
    rows = json.loads(grid.text["rows"])
    assert [r["num_inference_steps"] for r in rows] == [2, 3, 2, 2] and rows[1]["negative_prompt"] == "blurry, lowres"


def test_a_prompt_file_alone_turns_validation_on(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "library.json"
    f.write_text(json.dumps({"a": "a photo of sks billiard"}))
    out = train_mod.train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out",
                                      sample_prompts=str(f), num_validation_images=1, validation_inference_steps=1,
                                      validation_steps=2, max_train_steps=2))
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-000000.png", "step-000002.png"]
    f2 = tmp_path / "p.txt"
    f2.write_text("a photo of sks billiard --d 7\n")
    train_mod.train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out2",
                                sample_prompts=str(f2), num_validation_images=1, validation_inference_steps=1,
                                max_train_steps=1))
    assert "left out --d (seed)" in capsys.readouterr().out
