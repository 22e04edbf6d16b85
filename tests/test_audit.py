"""The audit: every broken file named once, odd files converted and recorded, near-duplicates, CLI exit codes."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from billiard_lora import data, paths
from billiard_lora.audit import audit, main
from billiard_lora.data import load_image, resolve_source
from billiard_lora.errors import UserError
from billiard_lora.synthetic import draw_billiard_scene

BAD = {"truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, and almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (16, 12), (10, 200, 10)).save(d / "good.jpg")
    buf = io.BytesIO()
    noise(64, 64).save(buf, "JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a picture\n")
    (d / "bomb.png").write_bytes(png_header_only(50_000, 50_000))

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (30, 20), (90, 90, 90)).save(d / "rotated.jpg", exif=exif)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    Image.new("L", (8, 8), 77).save(d / "gray.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(d / "palette.png", transparency=0)  # index 0 transparent, index 1 red
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(d / "deep16.png")
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 255), (255, 255, 0)]]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "UPPER.JPG")
    Image.new("RGB", (8, 8), (200, 100, 50)).save(d / "pic.webp")

    # Must be ignored, though broken.
    (d / ".hidden.jpg").write_text("junk")
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "good-checkpoint.jpg").write_text("junk")
    return d


def by_name(report):
    return {im.path.name: im for im in report.images}


def test_audit_finds_every_bad_file_and_converts_the_odd_ones(messy):
    report = audit(messy, resolution=64)
    bad = {b.path.name: b.reason for b in report.bad}
    assert set(bad) == BAD
    assert "empty" in bad["empty.jpg"]
    assert "not an image" in bad["text.jpg"]
    assert "truncated" in bad["truncated.jpg"]
    assert "decompression bomb" in bad["bomb.png"]
    assert not report.trainable

    good = by_name(report)
    assert set(good) == {
        "good.jpg", "rotated.jpg", "cmyk.jpg", "gray.png", "palette.png", "deep16.png", "anim.gif", "UPPER.JPG",
        "pic.webp",
    }
    assert good["rotated.jpg"].size == (20, 30)  # transposed by EXIF
    assert "EXIF orientation 6" in good["rotated.jpg"].conversions[0]
    assert good["cmyk.jpg"].mode == "CMYK" and "CMYK -> RGB" in good["cmyk.jpg"].conversions
    assert "grayscale" in good["gray.png"].conversions[0]
    assert "palette with transparency" in good["palette.png"].conversions[0]
    assert "16-bit" in good["deep16.png"].conversions[0]
    assert "animated (2 frames)" in good["anim.gif"].conversions[0]
    assert good["good.jpg"].conversions == [] and good["pic.webp"].format == "WEBP"

    summary = report.summary()
    for name in BAD:
        assert name in summary
    assert "NOT trainable" in summary


def test_converted_pixels_are_what_the_trainer_should_see(messy):
    r, g, b = load_image(messy / "cmyk.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    pal = load_image(messy / "palette.png")
    assert pal.getpixel((0, 0)) == (255, 0, 0) and pal.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert load_image(messy / "deep16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(messy / "anim.gif").getpixel((0, 0)) == (0, 0, 255)  # first frame
    assert load_image(messy / "rotated.jpg").size == (20, 30)


def test_raise_for_bad_lists_every_bad_file_once_or_skips_them(messy):
    report = audit(messy, resolution=64)
    with pytest.raises(UserError) as err:
        report.raise_for_bad()
    msg = str(err.value)
    for name in BAD:
        assert msg.count(name) == 1
    assert "4 of 13 images" in msg
    assert "Fix or delete them, or pass --skip_bad_images to train on the 9 good ones" in msg

    with pytest.warns(UserWarning, match="skipping 4 bad image"):
        good = report.raise_for_bad(skip_bad=True)
    assert len(good) == 9 and all(ex.path.name not in BAD for ex in good)


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")
    real_open = Image.open

    def deny(fp, *args, **kwargs):  # as chmod 000 would, even when the tests run as root
        if Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    report = audit(tmp_path)
    assert [(b.path.name, b.reason) for b in report.bad] == [("locked.png", "unreadable: permission denied")]


def test_pixel_limit_is_ours_not_only_pillows(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    report = audit(tmp_path)
    assert "decompression bomb: 40x30" in report.bad[0].reason


def test_near_duplicates_found_including_mirrored_and_not_for_different_scenes(tmp_path):
    scene = draw_billiard_scene(3, 128)
    scene.save(tmp_path / "a.png")
    marked = scene.copy()
    ImageDraw.Draw(marked).rectangle([4, 110, 60, 124], fill=(255, 255, 255))  # a watermark-like caption bar
    marked.save(tmp_path / "b_watermarked.png")
    scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "c_mirrored.png")
    draw_billiard_scene(4, 128).save(tmp_path / "d_other.png")

    # Flat images all hash alike; only same-coloured ones are duplicates.
    Image.new("RGB", (32, 32), (20, 120, 40)).save(tmp_path / "e_flat_green.png")
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "f_flat_red.png")
    Image.new("RGB", (32, 32), (22, 118, 40)).save(tmp_path / "g_flat_green_too.png")

    report = audit(tmp_path, resolution=128)
    pairs = {(d.a.name, d.b.name): d for d in report.near_duplicates}
    assert ("e_flat_green.png", "g_flat_green_too.png") in pairs
    assert not any("f_flat_red.png" in key for key in pairs)
    assert ("a.png", "b_watermarked.png") in pairs
    assert pairs[("a.png", "c_mirrored.png")].mirrored
    assert not any("d_other.png" in key for key in pairs)
    assert report.trainable  # duplicates warn, they do not block
    assert any("near-duplicate" in w for w in report.warnings)


def test_sizes_and_upscale_warning(tmp_path):
    noise(224, 224, seed=1).save(tmp_path / "a.png")
    noise(448, 224, seed=2).save(tmp_path / "b.png")
    report = audit(tmp_path, resolution=1024)
    assert report.min_size == (224, 224) and report.max_size == (448, 224)
    assert report.aspect_ratios == {"1.00": 1, "2.00": 1}
    assert report.upscale_factor_max == pytest.approx(1024 / 224)
    assert report.warnings[0] == (
        "the photos are 224 px and training is at 1024 px: a 4.6x upscale; consider --resolution 512 or "
        "higher-resolution photos"
    )
    # 1.1x: fine; the 2:1 photo would lose half its width to a square crop
    assert audit(tmp_path, resolution=256).warnings == [
        "1 of 2 photos lose 50% of their width or height to a square crop; --use_aspect_ratio_buckets trains each "
        "at its own shape"]
    json.dumps(report.to_dict())  # JSON-able


def test_shared_billiards_photos():
    shared = paths.shared_billiards_dir()
    if shared is None:
        pytest.skip("team sample photos (../shared/data/sports-billiards) not present")
    report = audit(resolve_source(str(shared), splits=("train", "valid", "test")), resolution=1024)
    assert len(report.images) == 155 and not report.bad and report.trainable
    assert report.counts == {"train": {"billiards": 145}, "valid": {"billiards": 5}, "test": {"billiards": 5}}
    pairs = [(report.name(d.a), report.name(d.b)) for d in report.near_duplicates]
    # The one known duplicate (083 is 052 with a watermark); the default threshold gives no false positives here.
    assert pairs == [("train/billiards/052.jpg", "train/billiards/083.jpg")]
    assert "4.6x upscale" in report.summary()


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_exit_codes(messy, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([str(messy), "--resolution", "64", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "truncated.jpg" in printed and "NOT trainable" in printed
    saved = json.loads(out.read_text())
    assert saved["n_bad"] == 4 and saved["trainable"] is False

    ok = tmp_path / "ok"
    ok.mkdir()
    Image.new("RGB", (8, 8)).save(ok / "a.png")
    assert main([str(ok), "--resolution", "8"]) == 0

    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(ok), "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_cli_json_never_replaces_another_file_unasked(messy, tmp_path, capsys):
    """`audit DIR --json RUN/config.json` replaced the run's config with the report, and exited 0."""
    config = tmp_path / "config.json"
    config.write_text('{"instance_prompt": "x"}')
    assert main([str(messy), "--json", str(config)]) == 2
    assert "--json " + str(config) + " already exists; pass --overwrite" in capsys.readouterr().err
    assert config.read_text() == '{"instance_prompt": "x"}'
    assert main([str(messy), "--json", str(tmp_path)]) == 2  # a folder: one line, not IsADirectoryError
    assert "is a folder; pass a file name" in capsys.readouterr().err
    report = tmp_path / "report.json"
    assert main([str(messy), "--json", str(report)]) == 1 and main([str(messy), "--json", str(report)]) == 1
    assert main([str(messy), "--json", str(config), "--overwrite"]) == 1  # an earlier report, or asked: replaced
    assert json.loads(config.read_text())["n_bad"] == 4


def test_cli_as_a_module_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "billiard_lora.audit", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=paths.REPO_DIR, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such folder"
    assert "Traceback" not in proc.stderr
