"""Evaluation: the metrics on hand-made tensors, the prompts, and a whole run on a tiny LoRA with tiny CLIP and DINO."""

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

from billiard_lora import evaluate as ev
from billiard_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
E1, E2, E3 = torch.eye(3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine, two threads made each image 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics on tensors


def test_subject_similarity_is_one_for_identical_zero_for_orthogonal_and_ignores_scale():
    same = torch.stack([E1, E1 * 3.0])
    assert ev.subject_similarity(same, E1[None]) == pytest.approx(1.0)
    assert ev.subject_similarity(torch.stack([E1, E1]), torch.stack([E2, E3])) == pytest.approx(0.0)
    assert ev.subject_similarity(E1[None], -E1[None]) == pytest.approx(-1.0)
    # every (generated, real) pair counts: 2 of the 4 pairs match
    assert ev.subject_similarity(torch.stack([E1, E2]), torch.stack([E1, E2])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ev.subject_similarity(torch.zeros(0, 3), E1[None])


def test_prompt_similarity_pairs_each_image_with_its_own_prompt():
    images = torch.stack([E1, E2])
    assert ev.prompt_similarity(images, torch.stack([E1, E2])) == pytest.approx(1.0)
    assert ev.prompt_similarity(images, torch.stack([E2, E1])) == pytest.approx(0.0)
    assert ev.prompt_similarity(images, torch.stack([E1, E3 + E2])) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    with pytest.raises(ValueError, match="pairs rows"):
        ev.prompt_similarity(images, E1[None])


def test_self_similarity_leaves_out_each_row_with_itself():
    assert ev.self_similarity(torch.stack([E1, E1, E1])) == pytest.approx(1.0)
    assert ev.self_similarity(torch.stack([E1, E2, E3])) == pytest.approx(0.0)
    assert ev.self_similarity(E1[None]) is None


def test_diversity_is_one_minus_within_group_similarity():
    groups = ev.groups_of(["a", "a", "b", "b"])
    assert groups == [[0, 1], [2, 3]]
    assert ev.diversity(torch.stack([E1, E1, E2, E2]), groups) == pytest.approx(0.0)
    assert ev.diversity(torch.stack([E1, E2, E2, E3]), groups) == pytest.approx(1.0)
    assert ev.diversity(torch.stack([E1, E1, E2, E3]), groups) == pytest.approx(0.5)
    assert ev.diversity(torch.stack([E1, E2]), [[0], [1]]) is None  # one image per prompt: no pairs


def test_lpips_diversity_averages_pair_distances_per_group():
    def l1(a, b):  # a stand-in for the LPIPS network: any (1,3,H,W) x (1,3,H,W) -> distance
        return (a - b).abs().mean()

    black, white, grey = (Image.new("RGB", (4, 4), c) for c in ((0, 0, 0), (255, 255, 255), (128, 128, 128)))
    assert ev.lpips_diversity([black, black], [[0, 1]], l1) == pytest.approx(0.0)
    # inputs are scaled to [-1, 1], as LPIPS expects: black vs white is 2 apart
    assert ev.lpips_diversity([black, white, grey, grey], [[0, 1], [2, 3]], l1) == pytest.approx(1.0)


def test_nearest_and_near_copies():
    real = torch.stack([E1, E2])
    generated = torch.stack([E1, E1 + E2, E3])
    sims, idx = ev.nearest(generated, real)
    assert sims.tolist() == pytest.approx([1.0, math.sqrt(0.5), 0.0])
    assert idx[0] == 0
    assert ev.near_copies(sims, 0.95) == [0]
    assert ev.near_copies(sims, 0.7) == [0, 1]


def test_lpips_is_reported_unavailable_rather_than_crashing():
    metric, reason = ev.load_lpips()
    assert (metric is None) == (reason is not None)
    if metric is None:
        assert "lpips" in reason.lower() or "alexnet" in reason.lower()


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def test_subject_phrase_drops_framing_words_and_tags():
    assert ev.subject_phrase("a photo of messi playing billiard") == "messi playing billiard"
    assert ev.subject_phrase("A close-up photo of messi playing billiard, 4k, detailed.") == "messi playing billiard"
    assert ev.subject_phrase("an image of sks billiard") == "sks billiard"
    assert ev.subject_phrase("sks dog") == "sks dog"


def test_evaluation_prompts_cover_every_kind_first_and_fill_in_the_subject():
    prompts = ev.evaluation_prompts("a photo of messi playing billiard")
    assert len(prompts) == 25 == len(set(prompts))
    assert all("messi playing billiard" in p and "{}" not in p for p in prompts)
    first = ev.evaluation_prompts("a photo of messi playing billiard", 3)
    assert first == prompts[:3]
    assert "jungle" in first[0] and "hat" in first[1] and "painting" in first[2]  # background, outfit, rendition
    with pytest.raises(UserError, match="between 1 and 25"):
        ev.evaluation_prompts("a photo of messi playing billiard", 26)
    assert ev.fill_prompts(["{} at night", "a cat"], "a photo of sks billiard") == ["sks billiard at night", "a cat"]


def test_class_prompt_replaces_the_subject_with_a_class_word():
    assert ev.class_prompt_for("a photo of messi playing billiard") == "a photo of a person playing billiard"
    assert ev.class_prompt_for("a photo of sks billiard") == "a photo of billiard"
    assert ev.class_prompt_for("messi", "a photo of a man playing billiard") == "a photo of a man playing billiard"
    assert ev.class_prompt_for("messi") == "a photo of a person playing billiards"


# ----------------------------------------------------------------------------------------------------------------------
# Tiny CLIP / DINO


@pytest.fixture(scope="module")
def tiny_eval_models(tmp_path_factory) -> tuple[Path, Path]:
    from billiard_lora.tiny import save_tiny_clip, save_tiny_dino

    root = tmp_path_factory.mktemp("eval-models")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


def noise_images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8 * (i % 2), 3), dtype=np.uint8)) for i in range(n)]


def test_embedders_give_unit_vectors_and_are_deterministic(tiny_eval_models):
    clip_dir, dino_dir = tiny_eval_models
    clip = ev.ClipEmbedder.load(str(clip_dir), device="cpu", batch_size=2)
    dino = ev.DinoEmbedder.load(str(dino_dir), device="cpu")
    images = noise_images(3)
    for emb, dim in ((clip.images(images), 16), (dino.images(images), 32), (clip.texts(["a", "a photo of messi"]), 16)):
        assert emb.shape[1] == dim and emb.dtype == torch.float32
        assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
    # batching does not change an image's embedding; the same image embeds the same way
    torch.testing.assert_close(clip.images(images[:1]), clip.images(images)[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(dino.images(images[1:2] * 2)[0], dino.images(images)[1], atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError):
        dino.texts(["a"])


def test_loaders_refuse_the_wrong_kind_of_model(tiny_eval_models, tmp_path):
    from billiard_lora.models import load_clip, load_dino

    clip_dir, dino_dir = tiny_eval_models
    with pytest.raises(UserError, match="not a CLIP model"):
        load_clip(str(dino_dir))
    with pytest.raises(UserError, match="not a DINO model"):
        load_dino(str(clip_dir))
    with pytest.raises(UserError, match="no config.json"):
        load_clip(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# A whole evaluation on a tiny trained LoRA


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny LoRA run with checkpoint-1, checkpoint-2 and the final LoRA (seconds on CPU)."""
    from billiard_lora.config import TrainConfig
    from billiard_lora.train import train

    root = tmp_path_factory.mktemp("eval-run")
    data = root / "data"
    data.mkdir()
    for i, img in enumerate(noise_images(4, size=48)):
        img.save(data / f"img_{i}.png")
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_model_dir), instance_data_dir=str(data),
                      output_dir=str(root / "run"), instance_prompt="a photo of messi playing billiard",
                      resolution=32, train_batch_size=2, max_train_steps=2, checkpointing_steps=1, seed=0,
                      report_to="none", learning_rate=1e-2, lr_warmup_steps=0)
    return train(cfg)


@pytest.fixture(scope="module")
def evaluated(trained_run, tiny_eval_models) -> dict:
    clip_dir, dino_dir = tiny_eval_models
    return ev.evaluate_run(trained_run, num_prompts=2, images_per_prompt=2, num_class_images=2, steps=2,
                           clip_model=str(clip_dir), dino_model=str(dino_dir), device="cpu", progress=False)


def test_evaluation_scores_base_each_checkpoint_and_the_final_lora(evaluated, trained_run):
    r = evaluated
    assert [x["label"] for x in r["labels"]] == ["base", "checkpoint-1", "checkpoint-2", "final"]
    assert [x["step"] for x in r["labels"]] == [0, 1, 2, 2]
    assert r["protocol"]["class_prompt"] == "a photo of a person playing billiard"
    assert len(r["protocol"]["prompts"]) == 2 and r["protocol"]["seeds"] == [0, 1]
    assert (r["protocol"]["width"], r["protocol"]["height"]) == (32, 32)  # the training resolution
    assert r["real_images"]["count"] == 4 and -1 <= r["real_images"]["dino"] <= 1
    assert r["paper"]["DreamBooth (Stable Diffusion)"]["dino"] == 0.668
    assert r["models"]["div"] in (ev.DIV_LPIPS, ev.DIV_FALLBACK)
    for row in r["labels"]:
        assert set(row["metrics"]) == set(ev.METRICS)
        assert all(isinstance(v, float) and -1.0001 <= v <= 2 for v in row["metrics"].values())
        assert len(row["images"]) == 4 and len(row["class_images"]) == 2 and len(row["per_prompt"]) == 2
        assert row["generated"] == 6 and row["cached"] == 0
        assert all(0 <= im["nearest_real"] < 4 for im in row["images"])
        assert (row["lora"] is None) == (row["label"] == "base")
    # the LoRAs changed the images: not every label's scores equal the base model's
    assert len({round(row["metrics"]["dino"], 6) for row in r["labels"]}) > 1

    out = trained_run / "eval"
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["labels"][0]["metrics"] == pytest.approx(r["labels"][0]["metrics"])
    for name in ("eval.md", "metrics.png", "overview.png", "best_worst_base.png", "best_worst_final.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "images" / "checkpoint-1").glob("*.png"))) == 6
    md = (out / "eval.md").read_text()
    assert "| checkpoint-2 | 2 |" in md and "0.668" in md and (ev.DIV_FALLBACK in md or ev.DIV_LPIPS in md)
    assert r["models"]["clip"].endswith("clip") and r["models"]["clip"] in md and r["models"]["dino"] in md


def test_a_rerun_generates_nothing_and_loads_no_pipeline(evaluated, trained_run, tiny_eval_models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a fully cached evaluation must not load SDXL or generate")

    monkeypatch.setattr(ev, "load_generation_pipeline", refuse)
    monkeypatch.setattr(ev, "generate", refuse)
    clip_dir, dino_dir = tiny_eval_models
    again = ev.evaluate_run(trained_run, num_prompts=2, images_per_prompt=2, num_class_images=2, steps=2,
                            clip_model=str(clip_dir), dino_model=str(dino_dir), device="cpu", progress=False)
    assert all(row["generated"] == 0 and row["cached"] == 6 for row in again["labels"])
    for a, b in zip(again["labels"], evaluated["labels"]):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)


def test_a_changed_setting_generates_only_what_it_changes(evaluated, trained_run, tiny_eval_models, tmp_path):
    clip_dir, dino_dir = tiny_eval_models
    # one more seed per prompt, without the base model: only the new seed's images are generated
    r = ev.evaluate_run(trained_run, num_prompts=2, images_per_prompt=3, num_class_images=2, steps=2,
                        include_base=False, clip_model=str(clip_dir), dino_model=str(dino_dir), device="cpu",
                        progress=False)
    assert [x["label"] for x in r["labels"]] == ["checkpoint-1", "checkpoint-2", "final"]
    assert all(row["generated"] == 2 and row["cached"] == 6 for row in r["labels"])


def test_memory_savers_reuse_offloaded_images_and_cache_tiled_ones_apart(trained_run, tiny_eval_models, tmp_path):
    """--vae_tiling changes pixels, so tiled images are keyed apart (and say so); --cpu_offload does not, so its
    evaluation takes every image from the cache."""
    clip_dir, dino_dir = tiny_eval_models
    kw = dict(num_prompts=1, images_per_prompt=1, num_class_images=1, steps=2, height=96, width=96,
              include_base=False, clip_model=str(clip_dir), dino_model=str(dino_dir), device="cpu", progress=False,
              out=tmp_path / "eval")
    tiled = ev.evaluate_run(trained_run, vae_tiling=64, **kw)
    assert tiled["protocol"]["vae_tiling"] == 64 and all(row["generated"] == 2 for row in tiled["labels"])
    png = next((tmp_path / "eval" / "images" / "final").glob("*.png"))
    assert Image.open(png).text["vae_tiling"] == "64"
    whole = ev.evaluate_run(trained_run, **kw)
    assert whole["protocol"]["vae_tiling"] == 0 and all(row["generated"] == 2 for row in whole["labels"])
    offloaded = ev.evaluate_run(trained_run, cpu_offload=True, vae_tiling=64, **kw)
    assert all(row["generated"] == 0 and row["cached"] == 2 for row in offloaded["labels"])
    with pytest.raises(UserError, match="multiple of 64"):
        ev.evaluate_run(trained_run, vae_tiling=100, **kw)


def test_cli_evaluates_from_the_cache_and_prints_the_table(evaluated, trained_run, tiny_eval_models, capsys):
    clip_dir, dino_dir = tiny_eval_models
    rc = ev.main([str(trained_run), "--num_prompts", "2", "--images_per_prompt", "2", "--num_class_images", "2",
                  "--steps", "2", "--clip_model", str(clip_dir), "--dino_model", str(dino_dir), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "checkpoint-1" in out and "final" in out and "eval.md" in out


@pytest.mark.parametrize("run, extra, message", [
    ("/no/such/run", [], "does not exist"),
    ("{run}", ["--images_per_prompt", "0"], "at least 1"),
    ("{run}", ["--num_prompts", "30"], "between 1 and 25"),
    ("{run}", ["--height", "30"], "multiple of 8"),
    ("{run}", ["--clip_model", "{tmp}"], "no config.json"),
    ("{run}", ["--bogus"], "unrecognized arguments"),
    ("{run}/config.json", [], "is a file: pass a training run's folder"),
    ("{run}", ["--out", "{run}/config.json"], "is a file; pass a folder"),
    ("{run}", ["--device", "bogus"], "is not a device"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(run, extra, message, trained_run, tmp_path, capsys):
    small = ["--out", str(tmp_path / "eval"), "--num_prompts", "1", "--images_per_prompt", "1", "--steps", "1"]
    # argparse keeps a flag's last value: the case's flags come after the small defaults
    argv = [run.format(run=trained_run)] + small + [a.format(tmp=tmp_path, run=trained_run) for a in extra]
    rc = ev.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "eval" / "images").exists(), "bad input must fail before generating anything"


def test_cli_missing_folder_in_a_subprocess_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "billiard_lora.evaluate", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
