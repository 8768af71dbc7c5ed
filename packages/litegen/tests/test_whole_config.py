"""A whole training config: LiteGen's keys read (top level or ``litegen:``), the trainer's left alone,
near-misses of LiteGen's keys refused, the original LiteGen's keys accepted or translated."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import pytest
import yaml
from litegen.config import NEAR_MISS, LiteGenConfig, load_config, split_config

TOOLS_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "tools" / "configs").glob("*.yaml"))

# A config written for the original LiteGen (its README's "Config file" keys) inside a trainer's config.
ORIGINAL = """
exp_name: video_generation_exp1
results_dir: runs/exp1
init_from: null
resume_from: null
auto_resume: false
precision: bf16
grad_precision: fp32
allow_tf32: true
lr: 1.0e-4
weight_decay: 0.0
fused_optimizer: true
zero_degree: 3
group_zero: true
sp_size: 2
fused_layernorm: true
ac_offload: true
selective_ratio: 0
ema:
  enable: true
  sharded: true
  resume_from: null
encoder:
  fsdp: true
  group: false
global_seed: 3407
max_steps: 1000
num_workers: 4
pin_memory: true
global_batch_size: 64
# the trainer's
model: VchitectXL
data_path: /data/videos.csv
image_size: [480, 720]
num_frames: 16
log_every: 50
ckpt_every: 500
ema_decay: 0.9999
lr_scheduler: cosine
max_train_steps: 1000
"""

# Keys of diffusers' train_*.py, DiT / Latte / ColoDiffusion / OpenSora-style and Megatron-style configs.
TRAINER_KEYS = """
log_every ema_decay exp_name lr_scheduler model data_path image_size max_train_steps
pretrained_model_name_or_path revision variant dataset_name dataset_config_name train_data_dir image_column
caption_column max_train_samples validation_prompt num_validation_images validation_epochs validation_steps
output_dir logging_dir report_to cache_dir seed resolution center_crop random_flip train_batch_size
num_train_epochs gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr lr_warmup_steps
snr_gamma use_8bit_adam use_ema non_ema_revision offload_ema foreach_ema dataloader_num_workers adam_beta1
adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id prediction_type
mixed_precision local_rank checkpointing_steps checkpoints_total_limit resume_from_checkpoint noise_offset
enable_xformers_memory_efficient_attention tracker_project_name results_dir_name ckpt_every clip_max_norm
num_frames frame_interval use_image_num learn_sigma fixed_spatial extras pretrained pretrained_model_path
use_compile local_batch_size num_classes class_dropout_prob latent_size vae_path sample_method
num_sampling_steps cfg_scale epochs log_interval ckpt_interval grad_clip grad_checkpoint plugin dtype outputs
wandb load start_from_scratch text_encoder scheduler bucket_config mask_ratios num_bucket_build_workers
record_time ema_update_every warmup_steps dataset micro_batch_size eval_batch_size val_batch_size
total_batch_size val_num_workers eval_num_workers max_val_steps max_eval_steps resume_from_ckpt init_from_ckpt
dp_size pp_size ep_size cp_size tensor_parallel_size zero_stage optimizer betas eps min_lr weight_decay_rate
save_every sample_every eval_every save_steps logging_steps train_steps iters max_iters work_dir run_name
checkpoint checkpoint_path ckpt_path ckpt_dir save_dir log_dir project name debug device num_gpus num_nodes
prefetch_factor persistent_workers seq_len max_length model_max_length hidden_size depth num_heads patch_size
mlp_ratio in_channels t5_path clip_path fused_optimizer fused_layernorm distributed_backend
""".split()

# Near-misses of LiteGen's keys: (typo, the key it names).
TYPOS = [
    ("zero_degre", "zero_degree"),
    ("zero_dgree", "zero_degree"),
    ("Zero_Degree", "zero_degree"),
    ("sp_sise", "sp_size"),
    ("global_batch_sise", "global_batch_size"),
    ("global_batchsize", "global_batch_size"),
    ("selective_ration", "selective_ratio"),
    ("ac_offlaod", "ac_offload"),
    ("num_worker", "num_workers"),
    ("global_seeds", "global_seed"),
    ("auto_resum", "auto_resume"),
    ("resume_frm", "resume_from"),
    ("init_form", "init_from"),
    ("checkpoint_dirs", "checkpoint_dir"),
    ("grad_precison", "grad_precision"),
    ("precison", "precision"),
    ("group_zeros", "group_zero"),
    ("pin_memroy", "pin_memory"),
    ("weight_decy", "weight_decay"),
    ("allow_tf23", "allow_tf32"),
    ("max_step", "max_steps"),
    ("encodr", "encoder"),
    ("LR", "lr"),
]


def test_a_file_of_original_litegen_and_trainer_keys_loads(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(ORIGINAL)
    split = split_config(path)
    c = split.config
    assert (c.zero_degree, c.group_zero, c.sp_size, c.precision, c.grad_precision) == (
        3,
        True,
        2,
        "bf16",
        "fp32",
    )
    assert (c.ac_offload, c.selective_ratio, c.allow_tf32, c.lr, c.weight_decay) == (
        True,
        0.0,
        True,
        1e-4,
        0.0,
    )
    assert (c.global_seed, c.max_steps, c.num_workers, c.global_batch_size) == (3407, 1000, 4, 64)
    assert (c.ema.enable, c.ema.sharded, c.encoder.fsdp, c.encoder.group) == (True, True, True, False)
    assert c.checkpoint_dir == "runs/exp1"  # results_dir, the original's fallback
    assert split.renamed == [
        "results_dir='runs/exp1' read as checkpoint_dir (the original LiteGen's fallback)"
    ]
    assert split.trainer_keys == [
        "exp_name",
        "fused_optimizer",
        "fused_layernorm",
        "model",
        "data_path",
        "image_size",
        "num_frames",
        "log_every",
        "ckpt_every",
        "ema_decay",
        "lr_scheduler",
        "max_train_steps",
        "ema.resume_from",
    ]
    assert load_config(path) == c


def test_realistic_trainer_keys_are_left_to_the_trainer():
    assert len(TRAINER_KEYS) >= 150
    data = {key: 1 for key in TRAINER_KEYS}
    split = split_config({"zero_degree": 1, **data})
    assert split.trainer_keys == TRAINER_KEYS
    assert split.config == LiteGenConfig(zero_degree=1)


@pytest.mark.parametrize(("typo", "key"), TYPOS, ids=[t for t, _ in TYPOS])
def test_a_near_miss_of_a_litegen_key_is_refused_with_the_key_value_and_suggestion(typo, key):
    assert difflib.SequenceMatcher(None, typo.lower(), key).ratio() >= NEAR_MISS
    with pytest.raises(ValueError) as info:
        split_config({"model": "DiT-XL/2", typo: 3})
    assert f"config: unknown key {typo!r} = 3; did you mean {key!r}?" in str(info.value)


@pytest.mark.parametrize("form", ["top level", "litegen section"])
@pytest.mark.parametrize(
    ("section", "typo", "text"),
    [
        ("ema", {"enabel": True}, "unknown key 'ema.enabel' = True; did you mean 'ema.enable'?"),
        ("ema", {"decay_rate": 0.99}, "unknown key 'ema.decay_rate' = 0.99; did you mean 'ema.decay'?"),
        ("encoder", {"fsdb": True}, "unknown key 'encoder.fsdb' = True; did you mean 'encoder.fsdp'?"),
        ("vae", {"slice_sise": 4}, "unknown key 'vae.slice_sise' = 4; did you mean 'vae.slice_size'?"),
        ("vae", {"type": "AutoencoderKL"}, "unknown key 'vae.type' = 'AutoencoderKL'; Valid keys here"),
    ],
)
def test_an_unknown_key_in_litegen_sections_is_refused(form, section, typo, text):
    config = {section: typo, "exp_name": "x"}
    if form == "litegen section":
        config = {"litegen": {section: typo}, "train": {"exp_name": "x"}}
        text = text.replace(f"'{section}.", f"'litegen.{section}.")
    with pytest.raises(ValueError) as info:
        split_config(config)
    assert text in str(info.value)


@pytest.mark.parametrize("path", TOOLS_CONFIGS, ids=[p.name for p in TOOLS_CONFIGS])
def test_the_litegen_section_of_tools_configs_is_read_and_the_rest_is_the_trainers(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    data["litegen"].setdefault("checkpoint_dir", str(tmp_path))  # as tools/train.py does, from train.out_dir
    split = split_config(data)
    assert split.config == load_config(data["litegen"])
    assert split.trainer_keys == ["train"]


def test_the_litegen_section_is_strict_and_every_other_top_level_key_is_the_trainers():
    split = split_config({"litegen": {"zero_degree": 2}, "model": "DiT", "zero_degre": 3, "learning_rate": 1})
    assert split.config == LiteGenConfig(zero_degree=2)
    assert split.trainer_keys == ["model", "zero_degre", "learning_rate"]
    assert split_config({"litegen": None, "train": {}}).config == LiteGenConfig()  # an empty section
    with pytest.raises(ValueError, match="unknown key 'litegen.learning_rate' = 1; did you mean"):
        split_config({"litegen": {"learning_rate": 1}})
    with pytest.raises(
        ValueError, match="did you mean 'litegen.results_dir'|did you mean 'litegen.resume_from'"
    ):
        split_config({"litegen": {"results_dir": "runs"}})  # the original's spellings: top-level form only
    with pytest.raises(TypeError, match="'litegen' must be a mapping of LiteGen's keys, got 3"):
        split_config({"litegen": 3})


def test_litegen_keys_both_at_the_top_level_and_in_a_litegen_section_are_refused():
    with pytest.raises(ValueError) as info:
        split_config({"litegen": {"zero_degree": 2}, "sp_size": 2, "lr": 1e-4, "model": "DiT"})
    message = str(info.value)
    assert "'sp_size' = 2, 'lr' = 0.0001 at the top level and a 'litegen:' section" in message
    assert "move the key under 'litegen:'" in message


def test_the_original_litegen_keys_are_translated_or_refused_with_the_reason():
    split = split_config({"precision": "tf32", "grad_precision": "tf32", "zero_degree": 2})
    assert (split.config.precision, split.config.grad_precision) == ("fp32", "fp32")
    assert split.renamed == [
        "precision='tf32' read as 'fp32' (TF32 matmuls: allow_tf32)",
        "grad_precision='tf32' read as 'fp32' (TF32 matmuls: allow_tf32)",
    ]
    assert split.trainer_keys == []
    both = split_config({"results_dir": "runs", "checkpoint_dir": "ckpt"})  # checkpoint_dir wins, as there
    assert (both.config.checkpoint_dir, both.trainer_keys, both.renamed) == ("ckpt", ["results_dir"], [])
    with pytest.raises(
        ValueError, match=r"ema.resume_from='ema_10.pth' is not allowed; null \(the EMA is saved"
    ):
        split_config({"ema": {"enable": True, "resume_from": "ema_10.pth"}})
    with pytest.raises(TypeError, match="'zero_degree' must be int, got None"):
        split_config({"zero_degree": None})  # the original's README said DDP, its code chose a sharding
    with pytest.raises(ValueError, match="resume_from='model_10.pth' is not allowed; a step number"):
        split_config({"checkpoint_dir": "ckpt", "resume_from": "model_10.pth"})
    with pytest.raises(ValueError, match="init_from='model.pth' is not allowed; a .safetensors file"):
        split_config({"init_from": "model.pth"})


def test_the_keys_left_to_the_trainer_are_logged_once_at_info(caplog):
    caplog.set_level(logging.DEBUG, logger="litegen")
    split = split_config({"results_dir": "runs", "zero_degree": 1, "model": "DiT", "log_every": 10})
    assert caplog.records == []  # split_config logs nothing: LiteGen() logs on rank 0
    split.log(logging.getLogger("litegen.facade"))
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.INFO, "config: left to the trainer (LiteGen does not read them): model, log_every"),
        (logging.INFO, "config: results_dir='runs' read as checkpoint_dir (the original LiteGen's fallback)"),
    ]
    caplog.clear()
    split_config({"zero_degree": 1}).log(logging.getLogger("litegen.facade"))
    assert caplog.records == []
