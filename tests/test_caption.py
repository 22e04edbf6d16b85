"""python -m billiard_lora.caption: BLIP captions as .txt files beside the photos, which training then reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from billiard_lora.caption import caption_photos
from billiard_lora.data import resolve_source
from billiard_lora.errors import UserError
from test_data import make_kaggle_layout
from test_train import REPO, make_images


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    from billiard_lora.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def captioner(blip):
    from billiard_lora.models import load_captioner

    return load_captioner(str(blip))


def test_captions_go_beside_the_photos_with_the_prefix_and_training_reads_them(captioner, tmp_path):
    data = make_images(tmp_path / "photos", n=3)
    (data / "img_1.txt").write_text("my own caption\n")
    report = caption_photos(data, prefix="a photo of TOK, ", captioner=captioner, batch_size=2)
    assert sorted(p.name for p in report.written) == ["img_0.txt", "img_2.txt"]
    assert [p.name for p in report.kept] == ["img_1.png"]
    for txt in report.written:
        text = txt.read_text().strip()
        assert text.startswith("a photo of TOK, ") and len(text) > len("a photo of TOK, ")
    assert (data / "img_1.txt").read_text() == "my own caption\n"  # kept
    source = resolve_source(None, str(data))
    assert "3 captions from .txt files" in source.description
    assert {e.caption for e in source.examples} >= {"my own caption"}
    again = caption_photos(data, overwrite=True, captioner=captioner)
    assert len(again.written) == 3 and not (data / "img_1.txt").read_text().startswith("my own")


def test_a_kaggle_layout_folder_gets_captions_for_the_photos_training_takes(captioner, tmp_path):
    root = make_kaggle_layout(tmp_path / "sports", with_csv=False)
    report = caption_photos(root, kaggle_class="billiards", kaggle_splits="train", captioner=captioner)
    assert {p.parent.relative_to(root).as_posix() for p in report.written} == {"train/billiards"}
    assert not list((root / "train" / "golf").glob("*.txt")) and not list((root / "valid").rglob("*.txt"))


def test_unreadable_photos_are_listed_and_the_rest_captioned(captioner, tmp_path):
    data = make_images(tmp_path / "photos", n=2)
    (data / "broken.png").write_bytes(b"not a png")
    report = caption_photos(data, captioner=captioner)
    assert len(report.written) == 2 and [p.name for p, _ in report.bad] == ["broken.png"]
    assert "1 unreadable, skipped: broken.png (not an image" in report.summary()


def test_folders_it_must_not_write_into_are_one_line(captioner, tmp_path):
    from billiard_lora.paths import DEFAULT_DATA_DIR

    with pytest.raises(UserError, match="is the embedded default data"):
        caption_photos(DEFAULT_DATA_DIR, captioner=captioner)
    data = make_images(tmp_path / "photos", n=1)
    (data / "metadata.jsonl").write_text('{"file_name": "img_0.png", "prompt": "x"}\n')
    with pytest.raises(UserError, match="metadata.jsonl holds this folder's captions"):
        caption_photos(data, captioner=captioner)
    with pytest.raises(UserError, match="no such folder"):
        caption_photos(tmp_path / "nowhere", captioner=captioner)


def test_cli(blip, tmp_path):
    data = make_images(tmp_path / "photos", n=2)
    r = subprocess.run([sys.executable, "-m", "billiard_lora.caption", str(data), "--model", str(blip), "--prefix",
                        "sks billiard, ", "--device", "cpu"], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "captioned 2 photo(s)" in r.stdout and "img_0.txt: sks billiard, " in r.stdout
