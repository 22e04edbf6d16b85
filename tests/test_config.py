"""TrainConfig and its command line: diffusers' flag names, the seed's command, config files, clear errors."""

from __future__ import annotations

import re

import pytest

from billiard_lora.config import TrainConfig, parse_args
from billiard_lora.errors import UserError

SEED_COMMAND = """--pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0
--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix --dataset_name=billiard
--output_dir=messi_billiard_LoRA --caption_column=prompt --mixed_precision=fp16
--instance_prompt=a_photo_of_messi_playing_billiard --resolution=1024 --train_batch_size=1
--gradient_accumulation_steps=3 --gradient_checkpointing --learning_rate=1e-4 --snr_gamma=5.0
--lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=fp16 --use_8bit_adam --max_train_steps=500
--checkpointing_steps=717 --seed=0""".split()


def test_the_seed_command_parses_to_the_seed_recipe():
    config = parse_args(SEED_COMMAND)
    assert config == TrainConfig.seed_recipe(instance_prompt="a_photo_of_messi_playing_billiard")
    assert config.gradient_checkpointing is True and config.use_8bit_adam is True and config.snr_gamma == 5.0


def test_defaults_are_diffusers_defaults():
    c = TrainConfig(instance_prompt="x")
    assert (c.learning_rate, c.rank, c.train_batch_size, c.lr_warmup_steps, c.checkpointing_steps,
            c.validation_epochs, c.num_class_images, c.adam_weight_decay, c.max_grad_norm, c.resolution) == \
        (1e-4, 4, 4, 500, 500, 50, 100, 1e-4, 1.0, 1024)
    assert c.alpha == c.rank  # lora_alpha defaults to rank, as in the script


def test_repeated_flag_the_later_wins():
    c = parse_args(["--instance_prompt=x", "--mixed_precision=fp16", "--mixed_precision=bf16"])
    assert c.mixed_precision == "bf16"


def test_several_validation_prompts_on_the_command_line():
    c = parse_args(["--instance_prompt=x", "--validation_prompt=a photo of messi playing billiard",
                    "--extra_validation_prompts", "a photo of obama playing billiard", "a billiard table"])
    assert c.validation_prompts == ["a photo of messi playing billiard", "a photo of obama playing billiard",
                                    "a billiard table"]
    assert parse_args(["--instance_prompt=x"]).validation_prompts == []


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("instance_prompt: a photo of sks dog\nrank: 16\nlearning_rate: 0.0005\n")
    c = parse_args([f"--config={f}", "--rank=8"])
    assert (c.instance_prompt, c.rank, c.learning_rate) == ("a photo of sks dog", 8, 5e-4)
    bad = tmp_path / "bad.json"
    bad.write_text('{"instance_prompt": "x", "learnig_rate": 1}')
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        parse_args([f"--config={bad}"])


def test_config_file_values_are_read_as_their_flags_would_be(tmp_path):
    """YAML reads 1e-4 as a string and "false" stays a string: the first stopped with a TypeError, the second
    trained with DoRA switched on."""
    f = tmp_path / "run.yaml"
    f.write_text('instance_prompt: x\nlearning_rate: 1e-4\nuse_dora: "false"\nrandom_flip: "yes"\nrank: 8.0\n'
                 "seed: null\ncuda_graphs: off\ngradient_checkpointing: on\nselective_checkpointing: off\n")
    c = parse_args([f"--config={f}"])
    assert (c.learning_rate, c.use_dora, c.random_flip, c.rank, c.seed, c.cuda_graphs) == (1e-4, False, True, 8, None,
                                                                                           False)
    assert c.selective_checkpointing == "off"  # (YAML's bare off is false: the choice named off)
    assert type(c.rank) is int
    for line, message in [("rank: four", "rank: expected a whole number, got 'four'"),
                          ("rank: 2.5", "rank: expected a whole number, got 2.5"),
                          ("learning_rate: fast", "learning_rate: expected a number"),
                          ("use_dora: maybe", "use_dora: expected true or false"),
                          ("mixed_precision: fp64", "mixed_precision: 'fp64' is not one of no, fp16, bf16"),
                          ("resolution: null", "resolution cannot be empty")]:
        f.write_text(f"instance_prompt: x\n{line}\n")
        with pytest.raises(UserError, match=f"^{re.escape(str(f))}: {re.escape(message)}"):
            parse_args([f"--config={f}"])
    with pytest.raises(UserError, match="--mixed_precision='fp32' must be one of no, fp16, bf16"):
        TrainConfig(instance_prompt="x", mixed_precision="fp32")  # a notebook's config, no file involved
    f.write_text("instance_prompt: x\nvalidation_prompt: a\nextra_validation_prompts: b\n")  # one text: a list of one
    assert parse_args([f"--config={f}"]).validation_prompts == ["a", "b"]
    f.write_text("instance_prompt: x\nvalidation_prompt: a\nextra_validation_prompts: [b, {c: d}]\n")
    with pytest.raises(UserError, match="extra_validation_prompts: expected a list of text"):
        parse_args([f"--config={f}"])
    f.write_text("instance_prompt: x\nfold-accumulation: true\naspect_ratio_buckets: auto\n")  # as flags: - or _
    c = parse_args([f"--config={f}"])
    assert c.fold_accumulation and c.use_aspect_ratio_buckets, "giving the buckets turns bucketing on, as recorded"


@pytest.mark.parametrize("flags, message", [
    (["--resolution=1001"], "multiple of 8"),
    ([], "missing --instance_prompt"),
    (["--class_prompt=a dog"], "only used with --with_prior_preservation"),
    (["--with_prior_preservation"], "needs --class_prompt"),
    (["--lr_scheduler=cosin"], "did you mean 'cosine'"),
    (["--optimizer=sgd"], "choose AdamW, Prodigy, AdamW_ScheduleFree, Adafactor, Lion or Lion8bit"),
    (["--rank=0"], "--rank=0 must be at least 1"),
    (["--fp8_base", "--use_dora"], "--fp8_base does not combine with --use_dora .*drop one"),
    (["--ema_decay=0.99"], "--ema_decay=0.99 only applies with --use_ema"),
    (["--caption_dropout_rate=1"], r"--caption_dropout_rate=1.0 must be in \[0, 1\)"),
    (["--huber_c=0.2"], "--huber_c only applies with --loss_type huber or smooth_l1"),
    (["--huber_schedule=constant"], "--huber_schedule only applies with --loss_type"),
    (["--loss_type=huber", "--huber_c=0"], r"--huber_c=0.0 must be in \(0, 1\]"),
    (["--loss_type=l1"], "argument --loss_type/--loss-type: invalid choice: 'l1'"),
    (["--extra_validation_prompts", "a", "b"], "--extra_validation_prompts goes with --validation_prompt"),
    (["--validation_negative_prompt=blurry"], "--validation_negative_prompt goes with --validation_prompt"),
    (["--validation_prompt=a", "--extra_validation_prompts", " "], "holds an empty prompt"),
    (["--validation_prompt=a", "--validation_guidance_scale=-1"], "--validation_guidance_scale=-1.0 must be 0 or"),
    (["--use_ema", "--ema_decay=1.5"], r"--ema_decay=1.5 must be in \[0, 1\]"),
])
def test_bad_settings_name_the_flag(flags, message):
    args = flags if any(f.startswith("--instance_prompt") for f in flags) or message.startswith("missing") \
        else ["--instance_prompt=x", *flags]
    with pytest.raises(UserError, match=message):
        parse_args(args)


def test_unknown_flag_suggests_the_closest(capsys):
    from billiard_lora.train import main

    assert main(["--instance_prompt=x", "--gradient_acumulation_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "did you mean '--gradient_accumulation_steps'" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: unrecognized arguments: --gradient_acumulation_steps"), err  # as every command


@pytest.mark.parametrize("flag, message", [
    ("--hub_token=hf_secret123", "hf auth login"),
    ("--do_edm_style_training", "EDM-style"),
])
def test_diffusers_flags_we_refuse_say_what_to_do_instead(flag, message):
    with pytest.raises(UserError, match=message) as err:
        parse_args(["--instance_prompt=x", flag])
    assert "hf_secret123" not in str(err.value)  # a token is never echoed


def test_push_to_hub_flags_parse_as_diffusers_spells_them():
    c = parse_args(["--instance_prompt=x", "--push_to_hub", "--hub_model_id=me/billiard", "--hub_private_repo"])
    assert (c.push_to_hub, c.hub_model_id, c.hub_private_repo) == (True, "me/billiard", True)


def test_xformers_flag_is_accepted_and_noted():
    """diffusers users add it out of habit: PyTorch's SDPA already is the fast attention; the note is recorded."""
    c = parse_args(["--instance_prompt=x", "--enable_xformers_memory_efficient_attention"])
    assert any("scaled-dot-product attention" in note for note in c.fallbacks)
    assert parse_args(["--instance_prompt=x"]).fallbacks == []


def test_fields_train_fills_in_are_not_flags():
    from billiard_lora.config import build_parser

    assert "--fallbacks" not in build_parser().format_help()  # it was listed, as "not a flag"
    with pytest.raises(UserError, match="unrecognized arguments: --fallbacks"):
        parse_args(["--instance_prompt=x", "--fallbacks", "x"])


def test_cuda_graphs_flag_unset_bare_or_with_a_value():
    base = ["--instance_prompt=x"]
    assert parse_args(base).cuda_graphs is None  # decided at training time
    assert parse_args(base + ["--cuda_graphs"]).cuda_graphs is True
    assert parse_args(base + ["--cuda_graphs", "--seed", "1"]).cuda_graphs is True
    assert parse_args(base + ["--cuda_graphs", "false"]).cuda_graphs is False
    assert parse_args(base + ["--cuda_graphs=no"]).cuda_graphs is False


@pytest.mark.parametrize("flag, value, message", [
    ("seed", -5, "between 0 and"), ("adam_beta1", 1.5, "in [0, 1)"), ("adam_epsilon", -1.0, "positive"),
    ("dataloader_num_workers", -1, "0 or more"), ("resolution", 16, "too small"), ("lora_alpha", 0, "switches it off"),
    ("lr_num_cycles", 0, "at least 1"), ("snr_gamma", -1.0, "positive"), ("text_encoder_lr", -1.0, "positive"),
    ("noise_offset", -1.0, "0 or more"), ("max_grad_norm", -1.0, "positive"), ("prior_loss_weight", -1.0, "0 or more"),
    ("lr_warmup_steps", -5, "0 or more"), ("crops_coords_top_left_h", -5, "0 or more")])
def test_values_no_run_can_use_are_one_line_errors_naming_the_flag(flag, value, message):
    """Each of these once reached a library (a traceback) or trained to no effect without a word."""
    with pytest.raises(UserError) as err:
        TrainConfig(instance_prompt="x", **{flag: value})
    assert message in str(err.value) and str(err.value).startswith(f"--{flag}={value}") and "\n" not in str(err.value)
