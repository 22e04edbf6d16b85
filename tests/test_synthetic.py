"""The embedded default data: deterministic drawings, committed files that match the code, captions that fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from billiard_lora import paths
from billiard_lora.data import resolve_source
from billiard_lora.synthetic import draw_billiard_scene, main, scene_caption, write_default_dataset

REGENERATE = "regenerate with: python -m billiard_lora.synthetic data/default"


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_committed_default_data_is_what_the_code_draws():
    d = paths.DEFAULT_DATA_DIR
    if not (d / "metadata.jsonl").is_file():
        pytest.fail(f"{d} is missing; {REGENERATE}")
    rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"file_name", "prompt"}
    for seed, row in enumerate(rows):
        assert row["file_name"] == f"billiard_{seed:03d}.png"
        committed = Image.open(d / row["file_name"])
        assert committed.size == (256, 256)
        assert np.array_equal(pixels(committed), pixels(draw_billiard_scene(seed, 256))), f"seed {seed}: {REGENERATE}"
        assert row["prompt"] == scene_caption(seed)
    assert sum(p.stat().st_size for p in d.iterdir()) < 1_000_000  # it lives in git


def test_same_seed_same_image_different_seed_different_image():
    a, b = draw_billiard_scene(7, 96), draw_billiard_scene(7, 96)
    assert np.array_equal(pixels(a), pixels(b))
    c = draw_billiard_scene(8, 96)
    assert np.abs(pixels(a) - pixels(c)).mean() > 10  # a different scene, not a pixel of noise
    assert a.size == (96, 96) and a.mode == "RGB"


def test_captions_vary_and_name_what_is_drawn():
    captions = [scene_caption(s) for s in range(12)]
    assert all(c.startswith("a photo of a man playing billiard, ") for c in captions)
    assert len(set(captions)) == 12
    # The felt colour in the caption is the colour that dominates the table area of the picture.
    for seed, caption in enumerate(captions):
        felt = caption.split(", ")[1].removesuffix(" table")
        table = pixels(draw_billiard_scene(seed, 64))[36:48, 16:48].reshape(-1, 3)  # middle of the felt
        r, g, b = np.median(table, axis=0)
        dominant = {"red": r, "green": g, "blue": b}
        assert max(dominant, key=dominant.get) == felt, (seed, caption, (r, g, b))


def test_write_default_dataset_is_a_trainable_captioned_folder(tmp_path):
    out = write_default_dataset(tmp_path / "default", n=3, size=64)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "billiard_000.png", "billiard_001.png", "billiard_002.png", "metadata.jsonl",
    ]
    source = resolve_source(str(out), caption_column="prompt")
    assert [e.caption for e in source.examples] == [scene_caption(s) for s in range(3)]
    assert Image.open(out / "billiard_001.png").size == (64, 64)


def test_cli_writes_to_the_given_folder(tmp_path, capsys):
    assert main([str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "billiard_011.png").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["--bogus"]) == 2


def test_default_data_passes_its_own_audit():
    from billiard_lora.audit import audit

    report = audit(paths.DEFAULT_DATA_DIR, resolution=512)
    assert report.trainable and len(report.images) == 12
    assert report.near_duplicates == []  # scenes vary enough not to look like copies of each other
