"""Crash safety: kill -9 at any moment loses nothing, NaN losses and failed writes stop cleanly, tokens never leak."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from billiard_lora.errors import UserError
from billiard_lora.train import find_checkpoint, list_checkpoints, train
from billiard_lora.train import main as train_main
from test_train import REPO, make_images, tiny_config


def _train_cmd(model: Path, data: Path, out: Path, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "billiard_lora.train", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={data}", f"--output_dir={out}", "--instance_prompt=a photo of sks billiard",
            "--resolution=32", "--train_batch_size=2", "--gradient_accumulation_steps=2", "--max_train_steps=8",
            "--checkpointing_steps=1", "--seed=0", "--report_to=none", "--learning_rate=1e-3", "--random_flip",
            "--lr_warmup_steps=0", "--lora_dropout=0.1"]
    return args + (["--resume_from_checkpoint=latest"] if resume else [])


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_then_resume_gives_the_same_lora(tiny_model_dir, tmp_path):
    data = make_images(tmp_path / "data", n=5)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    ref = tmp_path / "uninterrupted"
    subprocess.run(_train_cmd(tiny_model_dir, data, ref, False), env=env, check=True, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(_train_cmd(tiny_model_dir, data, out, resume=attempt > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for training to make progress (a new checkpoint), then kill at a random moment soon after:
        # sometimes between steps, sometimes in the middle of writing the next checkpoint.
        seen = len(list_checkpoints(out))
        deadline = time.time() + 120
        while proc.poll() is None and len(list_checkpoints(out)) <= seen and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        if (out / "pytorch_lora_weights.safetensors").exists() and kills >= 3:
            break
        if kills >= 3:
            r = subprocess.run(_train_cmd(tiny_model_dir, data, out, resume=True), env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            break
    assert kills >= 1, "the run finished before it could be killed; the test did not test anything"
    a = load_file(str(ref / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after {kills} kill(s) and resumes"
    assert (ref / "loss_history.csv").read_text() == (out / "loss_history.csv").read_text()


def test_interrupted_checkpoint_is_ignored_by_latest(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=2,
                            checkpointing_steps=1))
    # what a kill in the middle of saving checkpoint 3 leaves behind: a hidden partial folder, or a folder without
    # its state file
    (out / ".checkpoint-3.partial").mkdir()
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "optimizer.bin").write_bytes(b"\0" * 10)
    assert find_checkpoint(out, "latest") == out / "checkpoint-2"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=20,
                      checkpointing_steps=1, learning_rate=1e30, adam_epsilon=1e-30)
    with pytest.raises(UserError, match=r"NaN/inf at step \d+.*learning rate.*last good checkpoint is"):
        train(cfg)
    out = tmp_path / "out"
    assert list_checkpoints(out), "the checkpoints written before the loss diverged must remain"
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "no final LoRA from a diverged run"


OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.75 GiB of which "
               "1.02 GiB is free. Including non-PyTorch memory, this process has 13.72 GiB memory in use.")


@pytest.mark.parametrize("where, phase", [("step", "in a training step"), ("validation", "making validation images")])
def test_running_out_of_memory_is_one_line_naming_what_would_fit_and_keeps_the_checkpoints(
        tiny_model_dir, tmp_path, monkeypatch, capsys, where, phase):
    """Out of memory at the 3rd optimizer step (or in the validation after step 2): one line saying where, the
    memory savers not yet used, and the last checkpoint; every checkpoint written before stays."""
    import billiard_lora.models as models_mod
    import billiard_lora.train as train_mod

    if where == "step":
        real, calls = train_mod.diffusion_loss, []

        def loss_then_out_of_memory(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError(OOM_MESSAGE)
            return real(*args, **kwargs)

        monkeypatch.setattr(train_mod, "diffusion_loss", loss_then_out_of_memory)
    else:
        real_pipe, made = models_mod.pipeline_from_components, []

        def pipeline_then_out_of_memory(*args, **kwargs):
            made.append(1)
            if len(made) == 2:  # the first is the baseline before training
                raise torch.OutOfMemoryError(OOM_MESSAGE)
            return real_pipe(*args, **kwargs)

        monkeypatch.setattr(models_mod, "pipeline_from_components", pipeline_then_out_of_memory)
    data, out = make_images(tmp_path / "data"), tmp_path / "out"
    args = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--instance_data_dir={data}", f"--output_dir={out}",
            "--instance_prompt=a photo of sks billiard", "--resolution=32", "--train_batch_size=2",
            "--max_train_steps=4", "--checkpointing_steps=1", "--seed=0", "--report_to=none", "--lr_warmup_steps=0",
            "--validation_prompt=a photo of sks billiard", "--validation_steps=2", "--num_validation_images=1",
            "--validation_inference_steps=1"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    msg = errors[0]
    assert f"out of GPU memory {phase} (2.00 GiB more was asked of a 14.75 GiB GPU): try --gradient_checkpointing, " \
           f"--use_8bit_adam, --fp8_base, --train_batch_size 1 --gradient_accumulation_steps 2" in msg, msg
    assert "--resume_from_checkpoint latest" in msg and "--resolution" not in msg, "32 px is small already"
    written = [p.name for p in list_checkpoints(out)]
    assert written == ["checkpoint-1", "checkpoint-2"] and f"the last checkpoint, {out / 'checkpoint-2'}," in msg
    assert load_file(str(out / "checkpoint-2" / "pytorch_lora_weights.safetensors"))


def test_a_failed_write_is_one_clear_error_and_earlier_files_survive(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.lora as lora_mod

    real = lora_mod.save_lora
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint saves; the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_mod, "save_lora", flaky_save)
    with pytest.raises(UserError, match="could not write .*No space left on device"):
        train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=3,
                          checkpointing_steps=1))
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))


def test_tokens_never_reach_outputs_or_logs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    secrets = {"HF_TOKEN": "hf_FAKEtoken1234567890", "KAGGLE_KEY": "kagglefakekey0987654321",
               "KAGGLE_USERNAME": "someone"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=2,
                            checkpointing_steps=1, output_kohya_format=True, report_to="tensorboard"))
    printed = capsys.readouterr()
    for secret in (secrets["HF_TOKEN"], secrets["KAGGLE_KEY"]):
        assert secret not in printed.out + printed.err
        for f in out.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f"{f} contains a token"


def test_broken_files_stop_training_before_any_model_loads_unless_skipped(tiny_model_dir, tmp_path, monkeypatch):
    import billiard_lora.models as models

    data = make_images(tmp_path / "data", n=3)
    (data / "truncated.png").write_bytes((data / "img_0.png").read_bytes()[:200])
    (data / "notes.jpg").write_text("not an image")

    def must_not_load(*a, **k):
        raise AssertionError("a model was loaded before the data were checked")

    monkeypatch.setattr(models, "load_components", must_not_load)
    with pytest.raises(UserError) as err:
        train(tiny_config(tiny_model_dir, data, tmp_path / "out"))
    msg = str(err.value)
    assert "truncated.png" in msg and "notes.jpg" in msg and "--skip_bad_images" in msg
    assert not (tmp_path / "out").exists(), "nothing may be written for a run that cannot start"
    monkeypatch.undo()

    with pytest.warns(UserWarning, match="skipping 2 bad image"):
        out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", skip_bad_images=True, max_train_steps=1))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_files_deleted_mid_run_do_not_stop_it(tiny_model_dir, tmp_path):
    import shutil

    data = make_images(tmp_path / "data", n=3)

    def delete_the_data(event):
        if event["event"] == "step" and event["step"] == 1:
            shutil.rmtree(data)

    out = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=3), callback=delete_the_data)
    assert not data.exists() and (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_reader_that_goes_away_early_costs_no_traceback():
    """`python -m billiard_lora lora inspect F | head -1`: the pipe closes while a command still writes. Any
    command's main through cli_entry, writing far more than a pipe holds."""
    code = ("import sys\nfrom billiard_lora.errors import cli_entry\n"
            "@cli_entry\ndef main():\n    for i in range(200000): print('line', i)\n"
            "sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # like `head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert first == b"line 0\n" and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_missing_model_folder_and_a_second_data_source_are_named_plainly(tmp_path):
    from billiard_lora.data import resolve_source
    from billiard_lora.errors import UserError
    from billiard_lora.models import load_components

    with pytest.raises(UserError, match=r"'/nonexistent/model': no such folder$"):
        load_components("/nonexistent/model")
    with pytest.raises(UserError, match="--dataset_name default or --instance_data_dir"):
        resolve_source("default", str(tmp_path))


def test_audit_takes_trains_kaggle_flag_names_too(tmp_path):
    import numpy as np
    from PIL import Image

    from billiard_lora.audit import main

    for split in ("train", "valid"):
        (tmp_path / split / "pool").mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 9 if split == "train" else 200, dtype=np.uint8)).save(
            tmp_path / split / "pool" / "a.png")
    assert main([str(tmp_path), "--kaggle_class", "pool", "--kaggle_splits", "train,valid", "--resolution", "64"]) == 0


def test_written_files_follow_the_umask_like_any_other_file(tiny_model_dir, tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700) and safetensors replaces the file it writes: every file
    of a run, checkpoints and kohya copy and loss plot included, must still get the mode open()/mkdir() would."""
    old = os.umask(0o022)
    try:
        out = train(tiny_config(tiny_model_dir, make_images(tmp_path / "data"), tmp_path / "out", max_train_steps=2,
                                checkpointing_steps=1, output_kohya_format=True))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert "pytorch_lora_weights.safetensors" in modes and "checkpoint-2" in modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, wrong


def test_commands_print_warnings_as_one_plain_line(tiny_model_dir, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=3)
    (data / "notes.jpg").write_text("not an image")
    args = _train_cmd(tiny_model_dir, data, tmp_path / "out", resume=False)[3:]
    assert train_main([*args, "--skip_bad_images", "--max_train_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping 1 bad image(s); training on the 3 good ones\n" in err
    assert "UserWarning" not in err and "warnings.warn(" not in err, err


def test_a_librarys_warning_keeps_its_category_and_package(capsys):
    import io
    import warnings

    from billiard_lora.errors import show_warning_plainly

    stream = io.StringIO()
    show_warning_plainly(FutureWarning("`foo` is deprecated"), FutureWarning,
                         "/x/lib/python3.11/site-packages/diffusers/utils/deprecation_utils.py", 40, file=stream)
    assert stream.getvalue() == "warning: `foo` is deprecated [FutureWarning from diffusers]\n"
    show_warning_plainly(UserWarning("Could not find a config file in m - will assume that the vocabulary was not "
                                     "modified."), UserWarning, "/x/site-packages/peft/utils/save_and_load.py", 313,
                         file=stream)
    assert stream.getvalue().count("\n") == 1, "a known harmless library warning is left out"
    assert warnings.showwarning is not show_warning_plainly, "cli_entry must put Python's own back afterwards"


def test_a_run_stopped_before_its_first_save_starts_again_without_flags(tiny_model_dir, tmp_path):
    """A crash or Ctrl-C while the model loads left config.json (and logs, class images): the same command then
    said the folder was not empty. It may start over there; a folder with anything else in it is still refused."""
    data = make_images(tmp_path / "data", n=2)

    def stop_at_first_step(event):
        if event["event"] == "step":
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model_dir, data, out, max_train_steps=2, report_to="tensorboard"),
              callback=stop_at_first_step)
    assert (out / "config.json").is_file() and not list(out.glob("*.safetensors"))
    again = train(tiny_config(tiny_model_dir, data, out, max_train_steps=2))
    assert (again / "pytorch_lora_weights.safetensors").is_file()
    # stopped while generating class images (before config.json): the same command starts again, keeping them
    cls = tmp_path / "cls"

    def stop_after_one(*args, **kwargs):
        raise KeyboardInterrupt

    prior = dict(with_prior_preservation=True, class_prompt="a billiard table", num_class_images=2,
                 sample_batch_size=1, validation_inference_steps=1)
    import billiard_lora.io as io_mod

    real_write = io_mod.atomic_write_bytes
    writes = []

    def write_then_stop(path, data):
        real_write(path, data)
        writes.append(path)
        if Path(path).suffix == ".jpg":  # the first class image written (after the record of its prompt)
            stop_after_one()

    io_mod.atomic_write_bytes = write_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tiny_model_dir, data, cls, max_train_steps=1, **prior))
    finally:
        io_mod.atomic_write_bytes = real_write
    assert sorted(p.name for p in cls.iterdir()) == ["class_images"] and len(list(cls.glob("class_images/*.jpg"))) == 1
    train(tiny_config(tiny_model_dir, data, cls, max_train_steps=1, **prior))
    assert len(list(cls.glob("class_images/*.jpg"))) == 2 and (cls / "pytorch_lora_weights.safetensors").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "something else"}')
    with pytest.raises(UserError, match="is not empty"):
        train(tiny_config(tiny_model_dir, data, mine))


def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_go_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import billiard_lora.train as train_mod

    data = make_images(tmp_path / "data", n=2)
    args = _train_cmd(tiny_model_dir, data, tmp_path / "out", resume=False)[3:]
    real = train_mod.train

    def interrupted(config, **kw):
        def stop(event):
            if event["event"] == "step" and event["step"] == 2:
                raise KeyboardInterrupt
        return real(config, callback=stop, **kw)

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert train_main(args) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"interrupted; {tmp_path / 'out' / 'checkpoint-1'} is kept: add --resume_from_checkpoint=latest "
                   "to the same command to go on from it"), err
