"""generate(..., prompt_weighting=True): long prompts whole, weighted words (compel), the same images otherwise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from billiard_lora.errors import UserError
from billiard_lora.generate import generate
from billiard_lora.prompts import a1111_to_compel, token_count
from test_generate import FAST, PROMPT, REPO, _pipe, _px, _train

LONG = ", ".join(["a green billiard table under a lamp with red and yellow balls"] * 7)  # ~100 tokens


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return _pipe(tiny_model_dir)


def test_a1111_weights_become_compels_and_the_rest_stays_as_written():
    assert a1111_to_compel("a photo of (messi:1.3) at a (green felt: 0.8 ) table") == \
        "a photo of (messi)1.3 at a (green felt)0.8 table"
    assert a1111_to_compel("billiard++ (cue)1.2, black-and-white") == "billiard++ (cue)1.2, black-and-white"
    assert a1111_to_compel("time: 10:30 (tonight)") == "time: 10:30 (tonight)"


def test_plain_short_prompts_make_the_pipelines_own_images(pipe):
    """No weights, under 77 tokens: compel's embeddings are the pipeline's, so are the images (with and without a
    negative prompt, whose absence leaves SDXL's zeroed unconditional embedding as it is)."""
    for negative in (None, "blurry, lowres"):
        plain = generate(pipe, [PROMPT, "a red ball"], [0, 1], negative_prompt=negative, **FAST)
        weighted = generate(pipe, [PROMPT, "a red ball"], [0, 1], negative_prompt=negative, prompt_weighting=True,
                            **FAST)
        assert all(np.array_equal(_px(a), _px(b)) for a, b in zip(plain, weighted))
        assert weighted[0].metadata()["prompt_weighting"] == "True" and plain[0].metadata()["prompt_weighting"] == \
            "False"


def test_weights_change_the_image_and_a1111s_form_is_compels(pipe):
    base = generate(pipe, "a photo of messi playing billiard", 0, **FAST)[0]
    a1111 = generate(pipe, "a photo of (messi:1.8) playing billiard", 0, prompt_weighting=True, **FAST)[0]
    compel = generate(pipe, "a photo of (messi)1.8 playing billiard", 0, prompt_weighting=True, **FAST)[0]
    assert np.array_equal(_px(a1111), _px(compel)) and not np.array_equal(_px(base), _px(a1111))


def test_words_past_77_tokens_count_only_with_prompt_weighting(pipe):
    assert token_count(pipe, LONG) > 90
    with pytest.warns(UserWarning, match=r"is \d+ tokens: SDXL's text encoders read 77, the rest is cut off; "
                                         r"--prompt_weighting"):
        red, blue = (generate(pipe, f"{LONG}, {c} ball", 0, **FAST)[0] for c in ("red", "blue"))
    assert np.array_equal(_px(red), _px(blue))  # the colour sits past token 77: cut off
    red, blue = (generate(pipe, f"{LONG}, {c} ball", 0, prompt_weighting=True, **FAST)[0] for c in ("red", "blue"))
    assert not np.array_equal(_px(red), _px(blue))
    # a long negative prompt too (compel pads the shorter of prompt and negative to the same chunks)
    image = generate(pipe, "a red ball", 0, negative_prompt=LONG, prompt_weighting=True, **FAST)[0]
    assert image.image.size == (32, 32)


def test_text_encoder_lora_and_its_scale_reach_compels_encoding(tiny_model_dir, tmp_path):
    """A LoRA trained on the text encoders: compel encodes through them as the pipeline does, at every scale."""
    run = _train(tiny_model_dir, tmp_path / "run", train_text_encoder=True, text_encoder_lr=1e-2)
    pipe = _pipe(tiny_model_dir, loras=[str(run)])
    for scale in (None, 0.5):
        plain = generate(pipe, PROMPT, 0, lora_scale=scale, **FAST)[0]
        weighted = generate(pipe, PROMPT, 0, lora_scale=scale, prompt_weighting=True, **FAST)[0]
        assert np.abs(_px(plain) - _px(weighted)).max() <= 1


def test_pivotal_tuning_tokens_are_written_before_compel_reads_the_prompt(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path / "ti", train_text_encoder_ti=True,
                 instance_prompt="a photo of TOK playing billiard")
    pipe = _pipe(tiny_model_dir, loras=[str(run)])
    plain = generate(pipe, "a photo of TOK playing billiard", 0, **FAST)[0]
    weighted = generate(pipe, "a photo of TOK playing billiard", 0, prompt_weighting=True, **FAST)[0]
    assert np.abs(_px(plain) - _px(weighted)).max() <= 1
    other = generate(pipe, "a photo of (TOK:1.5) playing billiard", 0, prompt_weighting=True, **FAST)[0]
    assert not np.array_equal(_px(other), _px(weighted))


def test_unreadable_weights_are_one_line(pipe):
    with pytest.raises(UserError, match=r"compel cannot read its weights .*check the brackets") as err:
        generate(pipe, '("messi", "ronaldo").blend(0.5) playing billiard', 0, prompt_weighting=True, **FAST)
    assert "\n" not in str(err.value)


def test_cli_prompt_weighting_writes_images_that_say_so(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "billiard_lora.generate", "--model", str(tiny_model_dir), "--vae",
                        "none", "--device", "cpu", "--prompt", "a photo of (messi:1.3) playing billiard", "--steps",
                        "2", "--height", "32", "--width", "32", "--prompt_weighting", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = out.glob("*.png")
    assert Image.open(png).text["prompt_weighting"] == "True"
