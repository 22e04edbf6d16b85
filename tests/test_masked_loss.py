"""--masked_loss: the loss counts only where each image's mask is white (its alpha channel, or --mask_data_dir)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import billiard_lora.train as train_mod
from billiard_lora.data import plan_crop, render_mask, render_view
from billiard_lora.errors import UserError
from billiard_lora.train import diffusion_loss, train
from test_train import _eager_then_graphed, lora_tensors, make_images, tiny_config


def masked_images(folder: Path, n: int = 3, alpha: int | None = None, size: int = 48) -> Path:
    """n RGBA images whose alpha is ``alpha`` everywhere, or (None) white on the left half, black on the right."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        rgba = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
        rgba[..., 3] = 255 if alpha is None else alpha
        if alpha is None:
            rgba[:, rgba.shape[1] // 2:, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / f"img_{i}.png")
    return folder


def test_a_mask_view_is_cut_as_its_image_and_averaged_to_the_latents_size():
    """A bright left half with a white left-half mask: for any random crop and flip, the mask's view at 1/8 scale
    is where the image's view is bright."""
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[:, :45] = 255
    image, mask = Image.fromarray(arr), Image.fromarray(arr[..., 0], "L")
    for seed in range(6):
        rng = random.Random(seed)
        flip = seed % 2 == 1
        size, crop = plan_crop(90, 60, 32, center_crop=False, crop_rng=rng, target=(32, 48))
        pixels = render_view(image, 32, size, crop, flip=flip, target=(32, 48))
        view = render_mask(mask, size, crop, flip=flip, target=(32, 48))
        bright = (pixels[0] > 0).float()[None, None]
        expected = torch.nn.functional.interpolate(bright, size=(4, 6), mode="area")[0]
        assert view.shape == (1, 4, 6) and torch.allclose(view, expected, atol=0.1)


def test_masked_diffusion_loss_ignores_errors_where_the_mask_is_black():
    from diffusers import DDPMScheduler

    from billiard_lora.config import TrainConfig

    sched = DDPMScheduler(num_train_timesteps=1000)
    mask = torch.ones((2, 1, 4, 4))
    mask[:, :, :, 2:] = 0
    t = torch.tensor([10, 900])
    for kw in (dict(), dict(loss_type="huber"), dict(snr_gamma=5.0, debiased_estimation_loss=True)):
        cfg = TrainConfig(instance_prompt="x", **kw)
        pred = torch.randn((2, 4, 4, 4), requires_grad=True)
        target = torch.randn((2, 4, 4, 4))
        loss = diffusion_loss(pred, target, t, sched, cfg, mask)
        loss.backward()
        assert (pred.grad[..., 2:] == 0).all() and (pred.grad[..., :2] != 0).all()
        far = target.clone()
        far[..., 2:] += 100.0  # errors where the mask is black change nothing
        assert diffusion_loss(pred, far, t, sched, cfg, mask).item() == pytest.approx(loss.item(), rel=1e-6)
        assert diffusion_loss(pred, target, t, sched, cfg, torch.ones_like(mask)).item() == \
            pytest.approx(diffusion_loss(pred, target, t, sched, cfg).item(), rel=1e-6)
    # prior preservation: the class half is scored by its own rows of the mask (all ones for class images)
    cfg = TrainConfig(instance_prompt="x", with_prior_preservation=True, class_prompt="y", prior_loss_weight=1.0)
    pred, target = torch.randn((2, 4, 4, 4)), torch.randn((2, 4, 4, 4))
    half = torch.cat([mask[:1], torch.ones_like(mask[:1])])
    expected = ((pred[0] - target[0]) ** 2 * mask[0]).mean() + ((pred[1] - target[1]) ** 2).mean()
    assert diffusion_loss(pred, target, t, sched, cfg, half).item() == pytest.approx(expected.item(), rel=1e-6)


def test_black_alpha_trains_nothing_white_equals_unmasked_and_half_masks_reach_the_loss(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    black = masked_images(tmp_path / "black", alpha=0)
    out = train(tiny_config(tiny_model_dir, black, tmp_path / "b", masked_loss=True, max_train_steps=2))
    ups = [v for k, v in lora_tensors(out).items() if "lora_B" in k or "lora.up" in k]
    assert ups and all((v == 0).all() for v in ups)  # no gradient ever reached the LoRA: B stays at its zeros

    # all-white masks from --mask_data_dir (made at half the images' size): the unmasked run's LoRA
    data = make_images(tmp_path / "data", n=3)
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in data.glob("*.png"):
        w, h = Image.open(p).size
        Image.new("L", (w // 2, h // 2), 255).save(masks / f"{p.stem}.jpg")
    a = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "plain", max_train_steps=2)))
    b = lora_tensors(train(tiny_config(tiny_model_dir, data, tmp_path / "white", max_train_steps=2, masked_loss=True,
                                       mask_data_dir=str(masks))))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    seen, real = [], train_mod.diffusion_loss
    monkeypatch.setattr(train_mod, "diffusion_loss", lambda *a: seen.append(a[5]) or real(*a))
    half = masked_images(tmp_path / "half", size=32)  # the training resolution: no resize to blur the edge
    train(tiny_config(tiny_model_dir, half, tmp_path / "h", masked_loss=True, max_train_steps=2, center_crop=True,
                      with_prior_preservation=True, class_prompt="a billiard table",
                      class_data_dir=str(make_images(tmp_path / "class", n=2)), num_class_images=2))
    assert [m.shape for m in seen] == [(4, 1, 4, 4), (2, 1, 4, 4)]  # 3 images in batches of 2, each with a class one
    for m in seen:  # [instance..., class...]: the left half of each instance view, every class pixel
        n = len(m) // 2
        assert (m[:n, :, :, :2] == 1).all() and (m[:n, :, :, 2:] == 0).all() and (m[n:] == 1).all()


def test_masked_loss_under_cuda_graphs_equals_eager(tiny_model_dir, tmp_path, monkeypatch):
    """The mask is one more input of the recorded micro-step (stood in for on the CPU), beside caption dropout's."""
    data = masked_images(tmp_path / "data", n=4)
    kw = dict(max_train_steps=3, gradient_accumulation_steps=2, masked_loss=True, caption_dropout_rate=0.3,
              random_flip=True)
    eager, graphed = _eager_then_graphed(tiny_model_dir, data, tmp_path, monkeypatch, **kw)
    a, b = lora_tensors(eager), lora_tensors(graphed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case, message", [
    ("no alpha", r"--masked_loss: 3 images of 3 without a mask \(img_0.png, img_1.png, img_2.png\): give each an "
                 r"alpha channel"),
    ("missing file", r"--masked_loss: 1 image of 3 without a mask \(img_2.png\): give each a file of the same name"),
    ("other shape", r"img_0.png: mask is 10x40 but its image is 48x48"),
    ("no folder", r"--mask_data_dir=.*nowhere: no such folder"),
    ("broken", r"masks/img_1.png: not an image"),
])
def test_missing_or_unfit_masks_are_one_line_errors(tiny_model_dir, tmp_path, case, message):
    data, masks = make_images(tmp_path / "data", n=3), tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        Image.new("L", (48 + 8 * (i % 2), 48), 255).save(masks / f"img_{i}.png")
    kw = dict(masked_loss=True, mask_data_dir=str(masks))
    if case == "no alpha":
        kw.pop("mask_data_dir")
    elif case == "missing file":
        (masks / "img_2.png").unlink()
    elif case == "other shape":
        Image.new("L", (10, 40), 255).save(masks / "img_0.png")
    elif case == "no folder":
        kw["mask_data_dir"] = str(tmp_path / "nowhere")
    else:
        (masks / "img_1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=message) as err:
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", **kw))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_mask_data_dir_needs_masked_loss(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--mask_data_dir holds the masks of --masked_loss: add that flag"):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "out", mask_data_dir=str(tmp_path))


def test_masks_are_found_beside_the_images_relative_path_before_the_top_of_the_folder(tmp_path):
    """Kaggle's layout repeats file names across splits (train/billiards/001.jpg, valid/billiards/001.jpg): the mask
    at the image's relative path wins; one at the top of the folder serves images without one there."""
    from billiard_lora.data import find_mask_file

    root, masks = tmp_path / "data", tmp_path / "masks"
    for split in ("train", "valid"):
        (masks / split / "billiards").mkdir(parents=True)
        (masks / split / "billiards" / "001.png").write_bytes(b"")
    (masks / "002.PNG").write_bytes(b"")
    assert find_mask_file(root / "train" / "billiards" / "001.jpg", root, masks) == masks / "train/billiards/001.png"
    assert find_mask_file(root / "valid" / "billiards" / "001.jpg", root, masks) == masks / "valid/billiards/001.png"
    assert find_mask_file(root / "valid" / "billiards" / "002.jpg", root, masks) == masks / "002.PNG"
    assert find_mask_file(root / "test" / "billiards" / "003.jpg", root, masks) is None
