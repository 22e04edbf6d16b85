"""Grids put each image in its cell with its label; PNGs keep their metadata and are written atomically; loss plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from billiard_lora import viz
from billiard_lora.viz import ema, image_grid, plot_loss, save_image

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid(color, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def has_ink(img: Image.Image, box) -> bool:
    """Anything darker than the white background inside box (x0, y0, x1, y1)?"""
    return bool((np.asarray(img.crop(box).convert("L")) < 128).any())


def test_grid_places_images_row_by_row():
    grid = image_grid([solid(c) for c in COLORS[:5]], rows=2, cols=3)
    assert grid.size == (24, 12)
    for i, color in enumerate(COLORS[:5]):
        r, c = divmod(i, 3)
        assert grid.getpixel((c * 8 + 4, r * 6 + 3)) == color
        assert grid.getpixel((c * 8, r * 6)) == color and grid.getpixel((c * 8 + 7, r * 6 + 5)) == color
    assert grid.getpixel((20, 9)) == (255, 255, 255)  # the sixth cell is empty


def test_grid_resizes_to_the_first_image_and_checks_counts():
    grid = image_grid([solid(COLORS[0]), solid(COLORS[1], (32, 24)), solid(COLORS[2]).convert("L")], 1, 3)
    assert grid.size == (24, 6) and grid.getpixel((12, 3)) == COLORS[1]
    with pytest.raises(ValueError, match="do not fit"):
        image_grid([solid(c) for c in COLORS], 2, 2)
    with pytest.raises(ValueError):
        image_grid([], 1, 1)


def test_labels_get_their_own_strip_under_each_cell():
    images = [solid(c, (80, 60)) for c in COLORS[:4]]
    grid = image_grid(images, 2, 2, ["seed 0", None, "a long caption that has to wrap over several lines", ""])
    w, h = grid.size
    lh = h // 2 - 60
    assert w == 160 and lh > 10  # a label strip exists
    assert grid.getpixel((40, 30)) == COLORS[0] and grid.getpixel((40, 60 + lh + 30)) == COLORS[2]  # cells moved down
    assert has_ink(grid, (0, 60, 80, 60 + lh))  # "seed 0" under cell 0
    assert not has_ink(grid, (80, 60, 160, 60 + lh))  # no label under cell 1
    assert has_ink(grid, (0, 120 + lh, 80, 120 + 2 * lh))
    # The long caption wraps: ink on more than one text line.
    rows_with_ink = np.nonzero((np.asarray(grid.crop((0, 120 + lh, 80, 120 + 2 * lh)).convert("L")) < 128).any(1))[0]
    assert rows_with_ink.max() - rows_with_ink.min() > 15

    fixed = image_grid(images, 2, 2, ["a", "b", "c", "d"], label_height=20)
    assert fixed.size == (160, 2 * (60 + 20))


def test_row_and_column_headers():
    images = [solid(c, (80, 60)) for c in COLORS[:4]]
    grid = image_grid(images, 2, 2, row_labels=["base", "LoRA"], col_labels=["seed 1", "seed 2"])
    w, h = grid.size
    left, top = w - 160, h - 120
    assert left > 0 and top > 0
    assert grid.getpixel((left + 40, top + 30)) == COLORS[0]
    assert has_ink(grid, (left, 0, left + 80, top)) and has_ink(grid, (0, top, left, top + 60))
    with pytest.raises(ValueError, match="row labels"):
        image_grid(images, 2, 2, row_labels=["only one"])


def test_save_image_roundtrips_metadata_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "grid.png"
    meta = {"prompt": "a man playing billiard", "seed": 3, "lora_scales": [0.5, 1.0]}
    assert save_image(solid(COLORS[0]), path, meta) == path
    with Image.open(path) as img:
        assert img.text == {"prompt": "a man playing billiard", "seed": "3", "lora_scales": "[0.5, 1.0]"}
        assert img.getpixel((0, 0)) == COLORS[0]
    save_image(solid(COLORS[1]), path)  # overwrite
    assert Image.open(path).getpixel((0, 0)) == COLORS[1]
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match=".png"):
        save_image(solid(COLORS[0]), tmp_path / "x.jpg")


def test_save_image_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_image(solid(COLORS[0]), path, {"v": "old"})
    broken = solid(COLORS[1])
    monkeypatch.setattr(broken, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_image(broken, path, {"v": "new"})
    assert Image.open(path).text == {"v": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_ema_is_debiased_and_skips_nan():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    out = ema([1.0, float("nan"), 1.0], 0.5)
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1]) and out[2] == pytest.approx(1.0)


def test_plot_loss_draws_raw_smoothed_and_lr(tmp_path):
    history = [{"step": s, "loss": 1.0 / (1 + s) + 0.1 * (s % 3), "lr": 1e-4 * min(1, s / 5)} for s in range(40)]
    fig = plot_loss(history, tmp_path / "loss.png")
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert labels == ["loss", "loss (EMA 0.9)", "lr"]
    raw = fig.axes[0].get_lines()[0].get_ydata()
    smooth = fig.axes[0].get_lines()[1].get_ydata()
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == list(range(40))
    assert np.std(np.diff(smooth[10:])) < np.std(np.diff(raw[10:]))  # smoother
    with Image.open(tmp_path / "loss.png") as img:
        assert img.format == "PNG" and img.width > 300
    assert len(plot_loss([]).axes) == 1  # nothing logged yet: an empty plot, not an error
    assert viz.plot_loss([{"step": 0, "loss": 1.0}]).axes[0].get_lines()  # no lr column
