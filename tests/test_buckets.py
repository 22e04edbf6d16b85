"""Aspect-ratio bucketing (--use_aspect_ratio_buckets / --aspect_ratio_buckets): each image trained at the size of its
own shape, each batch one bucket, on the tiny SDXL pipeline (CPU, seconds per test)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import billiard_lora.train as train_mod
from billiard_lora.config import TrainConfig
from billiard_lora.data import auto_buckets, cover_size, nearest_bucket, parse_buckets, plan_crop, render_view
from billiard_lora.errors import UserError
from billiard_lora.train import BucketBatchSampler, DreamBoothDataset, EpochShuffleSampler, TrainImage, train

BUCKETS = "32,32;32,48;48,32"  # at the tiny tests' resolution, 32 px: square, landscape 3:2, portrait 2:3


def make_mixed_images(folder: Path, shapes=((48, 72), (72, 48), (40, 40), (50, 80), (80, 50), (48, 70))) -> Path:
    """Distinct noise images of the given (h, w): landscape, portrait and square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def config(model_dir: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(data), output_dir=str(out),
                instance_prompt="a photo of sks billiard", resolution=32, train_batch_size=2, max_train_steps=4,
                checkpointing_steps=1000, seed=0, report_to="none", learning_rate=1e-3, lr_warmup_steps=0,
                aspect_ratio_buckets=BUCKETS)
    base.update(kw)
    return TrainConfig(**base)


def test_auto_buckets_are_sdxls_own_at_1024_and_scale_with_the_resolution():
    b = auto_buckets(1024)
    assert b[0] == (1024, 1024)
    # SDXL's published training buckets, both orientations
    for h, w in [(896, 1152), (832, 1216), (768, 1344), (640, 1536), (512, 2048)]:
        assert (h, w) in b and (w, h) in b
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 and max(h / w, w / h) <= 4 for h, w in b)
    assert len(b) == len(set(b))
    assert all(h * w <= 512 ** 2 for h, w in auto_buckets(512)) and auto_buckets(512)[0] == (512, 512)
    assert parse_buckets("auto", 1024) == b
    assert parse_buckets("1024,1024; 896,1152;;896,1152", 1024) == [(1024, 1024), (896, 1152)]


@pytest.mark.parametrize("text, match", [("1024x1024", "height,width"), ("1024,1001", "multiples of 8"),
                                          ("0,64", "multiples of 8"), (" ; ", "names no bucket")])
def test_malformed_buckets_are_one_clear_error_naming_the_flag(text, match):
    with pytest.raises(UserError, match=match) as err:
        TrainConfig(instance_prompt="x", aspect_ratio_buckets=text)
    assert "--aspect_ratio_buckets" in str(err.value) and "\n" not in str(err.value)


def test_each_image_goes_to_the_bucket_of_its_shape_covered_and_cropped_to_it():
    b = [(32, 32), (32, 48), (48, 32)]
    assert nearest_bucket(72, 48, b) == (32, 48)  # landscape 3:2
    assert nearest_bucket(48, 72, b) == (48, 32)  # portrait 2:3
    assert nearest_bucket(41, 40, b) == (32, 32)
    assert nearest_bucket(1200, 800, auto_buckets(1024)) == (832, 1216)
    assert cover_size(100, 50, (32, 48)) == (64, 32)  # the height is the tight side: 32, the width follows
    assert cover_size(50, 100, (32, 48)) == (48, 96)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8))
    size, crop = plan_crop(100, 50, 32, center_crop=False, crop_rng=random.Random(0), target=(32, 48))
    assert size == (64, 32) and crop[0] == 0 and 0 <= crop[1] <= 64 - 48
    pixels = render_view(image, 32, size, crop, flip=False, target=(32, 48))
    assert pixels.shape == (3, 32, 48) and pixels.min() >= -1 and pixels.max() <= 1
    # without a target: the square resolution, as before buckets
    assert plan_crop(100, 50, 32, center_crop=True) == ((64, 32), (0, 16))


def _items(shapes):
    rng = np.random.default_rng(1)
    return [TrainImage(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "c", f"k{i}")
            for i, (h, w) in enumerate(shapes)]


def test_bucket_batches_hold_one_bucket_cover_every_image_once_and_shard_whole_across_processes():
    from accelerate.data_loader import BatchSamplerShard

    targets = [(32, 48), (48, 32), (32, 32), (32, 48), (32, 48), (48, 32), (32, 48)]
    sampler = EpochShuffleSampler(len(targets), seed=3)
    batches = BucketBatchSampler(sampler, lambda i: targets[i], batch_size=2)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = list(batches)
        assert len(got) == len(batches) == 2 + 1 + 1  # 4 landscape, 2 portrait, 1 square
        assert all(e == epoch for b in got for e, _ in b)
        assert sorted(i for b in got for _, i in b) == list(range(len(targets)))
        assert all(len({targets[i] for _, i in b}) == 1 and len(b) <= 2 for b in got)
        assert got == list(batches)  # the same epoch, the same batches
        orders.append(got)
    assert orders[0] != orders[1]
    # accelerate hands each process whole batches (never mixing two buckets), every process as many
    shards = [list(BatchSamplerShard(batches, num_processes=2, process_index=p, even_batches=True)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert all(len({targets[i] for _, i in b}) == 1 for s in shards for b in s)


def test_class_images_take_their_instance_images_bucket_and_views_are_counted_per_bucket(tmp_path):
    from billiard_lora.caches import count_views

    instance = _items([(48, 72), (72, 48), (40, 40)])
    class_images = _items([(64, 64), (60, 90)])
    cfg = TrainConfig(instance_prompt="x", resolution=32, aspect_ratio_buckets=BUCKETS, center_crop=True,
                      random_flip=True, with_prior_preservation=True, class_prompt="y", seed=0)
    ds = DreamBoothDataset(instance, class_images, cfg)
    assert ds.instance_targets == [(32, 48), (48, 32), (32, 32)]
    keys = set()
    for epoch in range(12):
        for i in range(len(ds)):
            ex = ds[(epoch, i)]
            assert ex["instance"]["pixel_values"].shape == ex["class"]["pixel_values"].shape == (3, *ds.target(i))
            assert ex["instance"]["target_size"] == ds.target(i)
            keys |= {ex["instance"]["key"], ex["class"]["key"]}
    views = ds.views()  # 3 instance views + class 0 at two sizes (indices 0 and 2) + class 1 at one (index 1)
    assert len(views) == 6
    assert count_views([im for im, _ in views], cfg, targets=[t for _, t in views]) == 12 == len(keys)
    # the square bucket keeps the key a square view had before buckets (latent caches on disk stay valid)
    plain = DreamBoothDataset(instance, [], cfg.replace(aspect_ratio_buckets=None, with_prior_preservation=False,
                                                         class_prompt=None))
    assert ds[(0, 2)]["instance"]["key"] == plain[(0, 2)]["instance"]["key"]


def test_training_with_buckets_runs_each_batch_at_its_bucket_and_conditions_on_it(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """Every micro-step's latents have its bucket's shape and SDXL's target-size conditioning says the same; a
    resumed run equals an uninterrupted one, bit for bit."""
    seen = []
    real_lookup, real_loss = train_mod.TimeIdCache.lookup, train_mod.diffusion_loss
    monkeypatch.setattr(train_mod.TimeIdCache, "lookup", lambda self, *a: seen.append(["ids", real_lookup(self, *a)])
                        or seen[-1][1])
    monkeypatch.setattr(train_mod, "diffusion_loss", lambda pred, *a, **k: seen[-1].append(pred.shape)
                        or real_loss(pred, *a, **k))
    data = make_mixed_images(tmp_path / "data")
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=3, random_flip=True,
              snr_gamma=5.0)
    full = train(config(tiny_model_dir, data, tmp_path / "full", **kw))
    shapes = {tuple(s[2][2:]) for s in seen}
    assert shapes == {(4, 6), (6, 4), (4, 4)}, "landscape, portrait and square latents (32x48, 48x32, 32x32 px)"
    for _, ids, shape in seen:
        assert ids[:, 4:].tolist() == [[shape[2] * 8, shape[3] * 8]] * shape[0], "target size = the bucket"
    used = json.loads((full / "config.json").read_text())
    assert used["aspect_ratio_buckets"] == BUCKETS

    class Crash(Exception):
        pass

    def crash(event):
        if event["event"] == "step" and event["step"] == 4:
            raise Crash()

    with pytest.raises(Crash):
        train(config(tiny_model_dir, data, tmp_path / "resumed", **kw), callback=crash)
    train(config(tiny_model_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_square_photos_train_with_buckets_on_exactly_as_without(tiny_model_dir, tmp_path):
    """--use_aspect_ratio_buckets on a set of square photos (the Kaggle billiards are all 224x224) changes nothing:
    one bucket, the square resolution, the same order of batches, the same LoRA bit for bit."""
    data = make_mixed_images(tmp_path / "data", shapes=((40, 40), (48, 48), (44, 44), (40, 40)))
    kw = dict(aspect_ratio_buckets=None, max_train_steps=3, random_flip=True)
    plain = train(config(tiny_model_dir, data, tmp_path / "plain", **kw))
    bucketed = train(config(tiny_model_dir, data, tmp_path / "auto", **{**kw, "use_aspect_ratio_buckets": True}))
    a = load_file(str(plain / "pytorch_lora_weights.safetensors"))
    b = load_file(str(bucketed / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((bucketed / "config.json").read_text())["use_aspect_ratio_buckets"] is True


def test_buckets_whose_sides_the_unet_cannot_halve_evenly_still_train(tiny_model_dir, tmp_path):
    """A bucket need only be a multiple of 8 (the VAE): diffusers' UNet sizes its upsampling to the skip connections
    (40x56 px: 5x7 latents, which the tiny UNet downsamples to 3x4)."""
    out = train(config(tiny_model_dir, make_mixed_images(tmp_path / "data"), tmp_path / "o",
                       aspect_ratio_buckets="32,32;40,56;56,40", max_train_steps=2))
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "pytorch_lora_weights.safetensors")).values())


def test_cuda_graphs_record_one_graph_per_bucket_and_replay_each(monkeypatch):
    """The micro-step recorder (recording stood in for on the CPU): each shape met twice gets a graph of its own;
    replays of either add into the same gradients, exactly as eager steps would."""
    import billiard_lora.graphs as graphs

    def fake_capture(fn, inputs, pool=None):
        out = torch.empty(())
        return (lambda: out.copy_(fn(*inputs))), out

    monkeypatch.setattr(graphs, "_capture", fake_capture)
    w = torch.nn.Parameter(torch.randn(3))

    def fn(x):
        loss = (x @ w).square().sum()
        loss.backward()
        return loss.detach()

    step = graphs.MicroStepGraph(fn, lambda: [w, w.grad], enabled=True, say=print)
    xs = [torch.randn(n, 3) for n in (2, 3, 2, 3, 2, 3, 2, 3)]
    losses = [float(step(x)) for x in xs]
    # 3 warm-up calls (both shapes seen), then each recorded at its next call and replayed after
    assert (step.calls, step.replays, len(step.graphs)) == (8, 5, 2)
    w2 = torch.nn.Parameter(w.detach().clone())
    expected = []
    for x in xs:
        loss = (x @ w2).square().sum()
        loss.backward()
        expected.append(loss.item())
    assert losses == expected and torch.equal(w.grad, w2.grad)
    assert math.isfinite(sum(losses))


def test_audit_points_to_buckets_where_square_crops_would_cut_off_much_of_the_photos(tmp_path):
    from billiard_lora.audit import audit

    mixed = audit(make_mixed_images(tmp_path / "mixed"), resolution=32)
    assert any("5 of 6 photos lose 31% to 38%" in w and "--use_aspect_ratio_buckets" in w for w in mixed.warnings)
    square = audit(make_mixed_images(tmp_path / "square", shapes=((40, 40), (40, 44), (64, 64))), resolution=32)
    assert not any("aspect_ratio_buckets" in w for w in square.warnings)


def test_the_memory_trial_runs_at_the_largest_bucket_in_use(tiny_model_dir, tmp_path, monkeypatch):
    sizes, real = [], train_mod.fits_in_memory
    monkeypatch.setattr(train_mod, "fits_in_memory", lambda *a, size=None, **k: sizes.append(size) or real(*a, size=size, **k))
    data = make_mixed_images(tmp_path / "data", shapes=((40, 40), (50, 80)))
    train(config(tiny_model_dir, data, tmp_path / "o", aspect_ratio_buckets="32,32;32,64", max_train_steps=1,
                 auto_gradient_checkpointing=True))
    assert sizes and set(sizes) == {(32, 64)}


def test_buckets_that_hold_only_one_shape_say_so(tiny_model_dir, tmp_path, capsys):
    """At --resolution 32 'auto' has just the square (sides are multiples of 32 up to 32): bucketing then did
    nothing, silently."""
    data = make_mixed_images(tmp_path / "data", shapes=((40, 64), (64, 40)))
    train(config(tiny_model_dir, data, tmp_path / "one", aspect_ratio_buckets="auto", max_train_steps=1))
    assert "buckets at --resolution 32 hold only 32x32: every image is cropped to it" in capsys.readouterr().err
