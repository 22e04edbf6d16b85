"""Image sources (folder, captions, Kaggle layout, Kaggle download, Hub, default) and the pure image prep."""

from __future__ import annotations

import json
import random
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from billiard_lora import data, paths
from billiard_lora.data import Example, collate, load_image, prepare_image, resized_size, resolve_source
from billiard_lora.errors import UserError


def tiny(path: Path, color=(200, 30, 30), size=(8, 8), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def rel(source, root: Path) -> list[str]:
    return [e.path.relative_to(root).as_posix() for e in source.examples]


def make_kaggle_layout(root: Path, with_csv: bool = True) -> Path:
    """train/valid/test with two classes; sports.csv lists all but one billiards file (and one missing file)."""
    rows = ["class id,filepaths,labels,data set"]
    for split, n in [("train", 3), ("valid", 1), ("test", 1)]:
        for cls in ("billiards", "golf"):
            for i in range(1, n + 1):
                p = tiny(root / split / cls / f"{i:03d}.jpg")
                rows.append(f"{0 if cls == 'billiards' else 1},{p.relative_to(root).as_posix()},{cls},{split}")
    tiny(root / "train" / "billiards" / "999.jpg")  # on disk, not in the CSV
    rows.append("0,train/billiards/404.jpg,billiards,train")  # in the CSV, not on disk
    if with_csv:
        (root / "sports.csv").write_text("\n".join(rows) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------------------------
# Plain folders and captions


def test_plain_folder_is_recursive_case_insensitive_and_skips_hidden(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.webp", "sub/deeper/d.JpEg", "e.bmp", "f.tiff"]:
        tiny(tmp_path / name, fmt={"webp": "WEBP", "tiff": "TIFF"}.get(name.rsplit(".", 1)[1].lower()))
    tiny(tmp_path / ".hidden.jpg")
    tiny(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    tiny(tmp_path / ".cache" / "x.png")
    (tmp_path / "notes.md").write_text("not an image")

    source = resolve_source(str(tmp_path))
    assert rel(source, tmp_path) == ["a.png", "b.JPG", "e.bmp", "f.tiff", "sub/c.webp", "sub/deeper/d.JpEg"]
    assert source.kind == "folder" and source.root == tmp_path and source.columns == []
    assert all(e.caption is None for e in source.examples)
    assert "6 images" in source.description


def test_kohya_folders_give_repeats_and_the_folder_words_as_captions(tmp_path):
    for name in ["10_sks billiard/a.png", "10_sks billiard/b.png", "1_billiard table/c.png"]:
        tiny(tmp_path / name)
    (tmp_path / "10_sks billiard" / "b.txt").write_text("sks billiard, green felt\n")
    source = resolve_source(str(tmp_path))
    assert source.kind == "kohya"
    got = {e.path.name: (e.caption, e.repeats) for e in source.examples}
    assert got == {"a.png": ("sks billiard", 10), "b.png": ("sks billiard, green felt", 10),
                   "c.png": ("billiard table", 1)}
    assert "21 views an epoch" in source.description
    # a subfolder that is not kohya's (or images beside them) makes it a plain folder again
    tiny(tmp_path / "a.png")
    assert resolve_source(str(tmp_path)).kind == "folder"
    (tmp_path / "a.png").unlink()
    tiny(tmp_path / "0_none" / "d.png")
    with pytest.raises(UserError, match="0_none: kohya's folder names start with the repeats, at least 1"):
        resolve_source(str(tmp_path))


def test_sidecar_txt_captions_are_stripped_and_empty_means_none(tmp_path):
    tiny(tmp_path / "a.jpg")
    tiny(tmp_path / "b.jpg")
    tiny(tmp_path / "c.jpg")
    (tmp_path / "a.txt").write_text("  a man cueing\n")
    (tmp_path / "b.txt").write_text("   \n")
    source = resolve_source(instance_data_dir=str(tmp_path))
    assert [e.caption for e in source.examples] == ["a man cueing", None, None]


def test_metadata_jsonl_caption_column(tmp_path):
    tiny(tmp_path / "x.png")
    tiny(tmp_path / "sub" / "y.png")
    tiny(tmp_path / "z.png")  # no row: instance prompt, with a warning
    (tmp_path / "x.txt").write_text("sidecar loses to the table")
    rows = [{"file_name": "x.png", "prompt": " first ", "other": 1}, {"file_name": "sub/y.png", "prompt": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    with pytest.warns(UserWarning, match="no row"):
        source = resolve_source(str(tmp_path), caption_column="prompt")
    assert [e.caption for e in source.examples] == [None, "first", None]  # sub/y.png, x.png, z.png
    assert rel(source, tmp_path) == ["sub/y.png", "x.png", "z.png"]
    assert source.columns == ["file_name", "prompt", "other"]

    # No --caption_column: diffusers trains every image on the instance prompt.
    assert all(e.caption is None for e in resolve_source(str(tmp_path)).examples)


def test_missing_caption_column_lists_the_columns(tmp_path):
    tiny(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,text,style\nx.png,hello,photo\n")
    with pytest.raises(UserError, match="'prompt'.*columns: file_name, text, style"):
        resolve_source(str(tmp_path), caption_column="prompt")
    assert resolve_source(str(tmp_path), caption_column="text").examples[0].caption == "hello"


def test_caption_column_on_a_plain_photo_folder_warns_and_uses_the_instance_prompt(tmp_path):
    # The seed command passes --caption_column=prompt to a folder of photos: it must still run.
    tiny(tmp_path / "a.jpg")
    with pytest.warns(UserWarning, match="every image uses the instance prompt"):
        source = resolve_source(instance_data_dir=str(tmp_path), caption_column="prompt")
    assert [e.caption for e in source.examples] == [None]


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_source(instance_data_dir=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no such folder"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not both"):
        resolve_source("kaggle:a/b", instance_data_dir=str(tmp_path))
    with pytest.raises(UserError, match="no images"):
        resolve_source(str(tmp_path))
    (tmp_path / "bad").mkdir()
    tiny(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        resolve_source(str(tmp_path / "bad"), caption_column="prompt")


def test_default_source_is_the_embedded_synthetic_set():
    if not paths.DEFAULT_DATA_DIR.is_dir():
        pytest.skip("data/default not generated")
    for name in (None, "default"):
        source = resolve_source(name, caption_column="prompt")
        assert source.root == paths.DEFAULT_DATA_DIR
        assert len(source) == 12
        assert all(e.caption and "billiard" in e.caption for e in source.examples)
        assert "embedded default" in source.description


# ----------------------------------------------------------------------------------------------------------------------
# Kaggle layout


def test_kaggle_layout_uses_sports_csv_and_selects_class_and_splits(tmp_path):
    root = make_kaggle_layout(tmp_path / "sports")
    with pytest.warns(UserWarning, match="1 file"):  # train/billiards/404.jpg is listed but gone
        source = resolve_source(str(root))
    assert source.kind == "kaggle"
    assert rel(source, root) == ["train/billiards/001.jpg", "train/billiards/002.jpg", "train/billiards/003.jpg"]

    source = resolve_source(str(root), kaggle_class="Golf", splits=("train", "test"))  # class names: any case
    assert rel(source, root) == ["train/golf/001.jpg", "train/golf/002.jpg", "train/golf/003.jpg", "test/golf/001.jpg"]
    assert "class Golf, splits train,test" in source.description


def test_kaggle_layout_without_csv_walks_the_folders(tmp_path):
    root = make_kaggle_layout(tmp_path / "sports", with_csv=False)
    source = resolve_source(instance_data_dir=str(root), splits=["train", "valid"])
    # 999.jpg is found now: no CSV says otherwise.
    assert rel(source, root) == [
        "train/billiards/001.jpg", "train/billiards/002.jpg", "train/billiards/003.jpg", "train/billiards/999.jpg",
        "valid/billiards/001.jpg",
    ]


def test_kaggle_layout_unknown_class_or_split(tmp_path):
    root = make_kaggle_layout(tmp_path / "sports", with_csv=False)
    with pytest.raises(UserError, match="class='snooker' is not a class in .*; classes: billiards, golf$"):
        resolve_source(str(root), kaggle_class="snooker")
    with pytest.raises(UserError, match="did you mean 'billiards'\\?$"):
        resolve_source(str(root), kaggle_class="biliard")
    with pytest.raises(UserError, match="split validation not found.*available: train, valid, test"):
        resolve_source(str(root), splits=("validation",))


def test_shared_billiards_folder_has_155_images():
    shared = paths.shared_billiards_dir()
    if shared is None:
        pytest.skip("team sample photos (../shared/data/sports-billiards) not present")
    source = resolve_source(str(shared), splits=("train", "valid", "test"))
    assert len(source) == 155
    assert len(resolve_source(str(shared))) == 145


# ----------------------------------------------------------------------------------------------------------------------
# Kaggle download (only the network call is faked)


def fake_kaggle_zip(dataset: str, dest_dir: Path, calls: list) -> None:
    """What Kaggle serves: one zip whose Kaggle layout sits one folder down, next to unrelated files."""
    calls.append(dataset)
    src = make_kaggle_layout(dest_dir.parent / "fake-src" / "sports", with_csv=False)
    with zipfile.ZipFile(dest_dir / f"{dataset.split('/')[1]}.zip", "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, "archive-v2/" + p.relative_to(src).as_posix())
        zf.writestr("EfficientNetB0-100.h5", b"model weights, not images")


def test_kaggle_download_unzips_locates_and_caches(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(data, "_kaggle_download", lambda ds, dest: fake_kaggle_zip(ds, dest, calls))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    cache = tmp_path / "cache"

    source = resolve_source("kaggle:gpiosenka/sports-classification", cache_dir=cache, splits=("train", "test"))
    root = cache / "gpiosenka/sports-classification/archive-v2"
    assert source.root == root and source.kind == "kaggle"
    assert rel(source, root)[-1] == "test/billiards/001.jpg" and len(source) == 5
    assert not list(cache.rglob("*.zip"))  # unpacked, zip removed
    assert source.description.startswith("kaggle:gpiosenka/sports-classification")

    # Second use: no download; "kaggle" alone means the default dataset.
    again = resolve_source("kaggle", cache_dir=cache)
    assert len(again) == 4 and calls == ["gpiosenka/sports-classification"]


def test_kaggle_without_credentials_says_how_to_provide_them(tmp_path, monkeypatch):
    for var in ["KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "KAGGLE_KERNEL_RUN_TYPE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setattr(data, "_kaggle_download", lambda *a: pytest.fail("must not try to download"))
    with pytest.raises(UserError) as err:
        resolve_source("kaggle:gpiosenka/sports-classification", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    for needle in ["KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "chmod 600", "google.colab", "userdata"]:
        assert needle in msg

    # A kaggle.json is enough to get past the check (the fake then "downloads").
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert data._kaggle_credentials_source().endswith("kaggle.json")


def test_kaggle_name_must_be_owner_slash_dataset(tmp_path):
    with pytest.raises(UserError, match="kaggle:<owner>/<dataset>"):
        resolve_source("kaggle:just-a-name", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Hub datasets (datasets imported lazily)


def test_hub_dataset_without_datasets_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="local folder, kaggle:.*default"):
        resolve_source("someone/some-dataset")


def test_hub_dataset_rows_become_in_memory_examples(monkeypatch):
    class FakeDataset(list):
        column_names = ["image", "text"]

    rows = FakeDataset(
        [{"image": Image.new("RGB", (4, 4)), "text": " a cue "}, {"image": Image.new("L", (4, 4)), "text": ""}]
    )
    fake = types.SimpleNamespace(load_dataset=lambda name, cache_dir=None: {"train": rows})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    source = resolve_source("someone/pool", caption_column="text")
    assert source.kind == "hub" and source.root is None
    assert [(e.path, e.caption) for e in source.examples] == [(None, "a cue"), (None, None)]
    assert source.examples[1].image.mode == "L"
    with pytest.raises(UserError, match="'prompt'.*columns: image, text"):
        resolve_source("someone/pool", caption_column="prompt")


# ----------------------------------------------------------------------------------------------------------------------
# load_image


def test_load_image_composites_alpha_on_white_and_scales_16_bit(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((3, 3)) == (255, 255, 255)

    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "g16.png")  # mid grey in 16 bits
    assert load_image(tmp_path / "g16.png").getpixel((1, 1)) == (128, 128, 128)  # not clipped to 255


def test_load_image_names_the_broken_file(tmp_path):
    (tmp_path / "photo.jpg").write_text("hello")
    with pytest.raises(UserError, match=r"photo\.jpg: not an image"):
        load_image(tmp_path / "photo.jpg")


# ----------------------------------------------------------------------------------------------------------------------
# prepare_image


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue: flips and crops show in the pixels."""
    img = Image.new("RGB", (w, h), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h))
    return img


def test_resized_size_matches_torchvision_resize_int():
    assert resized_size(224, 224, 64) == (64, 64)
    assert resized_size(300, 224, 100) == (133, 100)  # int(100 * 300 / 224) = 133
    assert resized_size(224, 301, 100) == (100, 134)


def test_prepare_image_center_crop_sizes_and_range():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 20, 20))
    pixels, original, crop = prepare_image(img, 10, center_crop=True, flip=False)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == torch.float32
    assert original == (20, 40)  # (h, w) of the input
    assert crop == (0, 5)  # resized to 20x10, centre 10 columns start at x=5
    assert pixels[:, :, 0].max() < -0.9 and pixels[:, :, -1].min() > 0.9  # black (-1) left, white (+1) right


def test_prepare_image_flips_before_cropping_and_reports_crop_in_flipped_image():
    img = halves(64, 32)
    resized_flipped = img.resize((32, 16), Image.Resampling.LANCZOS).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for seed in range(5):
        rng = random.Random(seed)
        pixels, original, (top, left) = prepare_image(img, 16, center_crop=False, flip=True, crop_rng=rng)
        assert original == (32, 64) and top == 0 and 0 <= left <= 16
        expected = np.asarray(resized_flipped.crop((left, top, left + 16, top + 16)), np.float32) / 127.5 - 1
        assert torch.allclose(pixels, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    # Flipped: blue now on the left.
    pixels, _, _ = prepare_image(img, 16, center_crop=True, flip=True)
    assert pixels[2, 0, 0] > 0.9 and pixels[0, 0, 0] < -0.9


def test_prepare_image_random_crop_is_reproducible_from_its_rng():
    img = halves(80, 40)
    crops = [prepare_image(img, 20, center_crop=False, flip=False, crop_rng=random.Random(s))[2] for s in range(20)]
    again = [prepare_image(img, 20, center_crop=False, flip=False, crop_rng=random.Random(s))[2] for s in range(20)]
    assert crops == again
    assert len(set(crops)) > 3  # it does move
    with pytest.raises(ValueError, match="crop_rng"):
        prepare_image(img, 20, center_crop=False, flip=False)
    with pytest.raises(UserError, match="unknown interpolation"):
        prepare_image(img, 20, center_crop=True, flip=False, interpolation="magic")


def test_prepare_image_converts_non_rgb_input():
    pixels, original, _ = prepare_image(Image.new("L", (12, 10), 255), 8, center_crop=True, flip=False)
    assert pixels.shape == (3, 8, 8) and torch.allclose(pixels, torch.ones_like(pixels))
    assert original == (10, 12)


def test_collate_stacks_tensors_and_lists_the_rest():
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "original_size": (4, 4), "caption": "a"},
        {"pixel_values": torch.ones(3, 4, 4), "original_size": (5, 6), "caption": None},
    ]
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"].is_contiguous()
    assert batch["original_size"] == [(4, 4), (5, 6)] and batch["caption"] == ["a", None]


def test_example_can_hold_an_in_memory_image():
    ex = Example(None, "cap", Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert data.load_example(ex).getpixel((0, 0)) == (255, 255, 255)
