"""Config loading and validation: every bad config gets its own specific message."""

from __future__ import annotations

import dataclasses

import pytest
from litegen.config import LiteGenConfig, check_world, config_as_dict, load_config

BAD_CONFIGS = [
    # (config, exception type, text the message must contain)
    ({"zero_degre": 3}, ValueError, "did you mean 'zero_degree'"),
    ({"sp_sise": 2}, ValueError, "did you mean 'sp_size'"),
    ({"ema": {"enabel": True}}, ValueError, "did you mean 'ema.enable'"),
    ({"encoder": {"fsdb": True}}, ValueError, "did you mean 'encoder.fsdp'"),
    ({"vae": {"slice": 4}}, ValueError, "did you mean 'vae.slice_size'"),
    ({"weight_decy": 0.01}, ValueError, "unknown key 'weight_decy' = 0.01; did you mean 'weight_decay'"),
    ({"zero_degree": 4}, ValueError, "zero_degree=4"),
    ({"zero_degree": -1}, ValueError, "zero_degree=-1"),
    ({"zero_degree": "3"}, TypeError, "'zero_degree' must be int"),
    ({"zero_degree": 2.0}, TypeError, "'zero_degree' must be int"),
    ({"zero_degree": True}, TypeError, "'zero_degree' must be int"),
    ({"group_zero": True, "zero_degree": 2}, ValueError, "grouped sharding needs zero_degree: 3"),
    ({"group_zero": 0, "zero_degree": 3}, ValueError, "group_zero=0"),
    ({"group_zero": "node", "zero_degree": 3}, TypeError, "'group_zero' must be bool or int"),
    ({"sp_size": 0}, ValueError, "sp_size=0"),
    ({"sp_size": 4, "sp_ring": 3}, ValueError, "sp_ring=3 is not allowed; null (chosen per attention call"),
    ({"cpu_offload": True, "zero_degree": 2}, ValueError, "offload needs zero_degree: 3"),
    ({"precision": "bf32"}, ValueError, "precision='bf32'"),
    ({"grad_precision": "int8"}, ValueError, "grad_precision='int8'"),
    ({"selective_ratio": 1.5}, ValueError, "selective_ratio=1.5"),
    ({"selective_ratio": -0.1}, ValueError, "selective_ratio=-0.1"),
    ({"selective_ratio": "half"}, TypeError, "'selective_ratio' must be float"),
    ({"ac_offload": "yes"}, TypeError, "'ac_offload' must be bool"),
    ({"global_batch_size": 0}, ValueError, "global_batch_size=0"),
    ({"num_workers": -2}, ValueError, "num_workers=-2"),
    ({"global_seed": -1}, ValueError, "global_seed=-1"),
    ({"lr": 0}, ValueError, "lr=0.0"),
    ({"lr": "1e-4"}, TypeError, "'lr' must be float or null"),
    ({"weight_decay": -0.01}, ValueError, "weight_decay=-0.01"),
    ({"max_steps": 0}, ValueError, "max_steps=0"),
    ({"checkpoint_keep": 0}, ValueError, "checkpoint_keep=0"),
    ({"checkpoint_every": -5, "checkpoint_dir": "ck"}, ValueError, "checkpoint_every=-5"),
    ({"auto_resume": True}, ValueError, "auto_resume=True is not allowed; it needs checkpoint_dir"),
    ({"resume_from": "latest"}, ValueError, "resume_from='latest' is not allowed; it needs checkpoint_dir"),
    ({"checkpoint_every": 100}, ValueError, "checkpoint_every=100 is not allowed; it needs checkpoint_dir"),
    (
        {"resume_from": "²", "checkpoint_dir": "ck"},
        ValueError,
        "resume_from='²' is not allowed; a step number",
    ),
    ({"init_from": "weights.pt"}, ValueError, "init_from='weights.pt'"),
    ({"collective_timeout": 0}, ValueError, "collective_timeout=0.0"),
    ({"log_level": "LOUD"}, ValueError, "log_level='LOUD'"),
    ({"ema": {"decay": 1.5}}, ValueError, "ema.decay=1.5"),
    ({"ema": {"decay": -0.1}}, ValueError, "ema.decay=-0.1"),
    ({"ema": {"enable": "true"}}, TypeError, "'ema.enable' must be bool"),
    ({"ema": {"update_after_step": -1}}, ValueError, "ema.update_after_step=-1"),
    ({"ema": True}, TypeError, "'ema' must be a mapping"),
    ({"encoder": {"group": 2}}, TypeError, "'encoder.group' must be bool"),
    ({"vae": {"slice_size": 0}}, ValueError, "vae.slice_size=0"),
    ({"vae": {"compile": 1}}, TypeError, "'vae.compile' must be bool"),
    ({"checkpoint_dir": ""}, ValueError, "checkpoint_dir=''"),
]


@pytest.mark.parametrize(("config", "kind", "text"), BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_config_gets_a_specific_message(config, kind, text):
    with pytest.raises(kind) as info:
        load_config(config)
    assert text in str(info.value), str(info.value)
    assert str(info.value).startswith("config:")


def test_the_bad_config_table_is_large_and_every_message_is_its_own():
    assert len(BAD_CONFIGS) >= 30
    messages = set()
    for config, kind, _ in BAD_CONFIGS:
        with pytest.raises(kind) as info:
            load_config(config)
        messages.add(str(info.value))
    assert len(messages) == len(BAD_CONFIGS)


@pytest.mark.parametrize(
    ("config", "world", "text"),
    [
        ({"sp_size": 3}, 4, "sp_size=3 is not allowed; a divisor of the world size 4"),
        ({"zero_degree": 3, "group_zero": 3}, 4, "group_zero=3 is not allowed; a group size that divides"),
        ({"zero_degree": 3, "group_zero": 2, "sp_size": 4}, 4, "a multiple of sp_size=4"),
        (
            {"global_batch_size": 3},
            2,
            "global_batch_size=3 is not allowed; a multiple of the data-parallel size 2",
        ),
    ],
)
def test_world_dependent_checks(config, world, text):
    with pytest.raises(ValueError) as info:
        check_world(load_config(config), world, world)
    assert text in str(info.value)


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir=.*not a file"):
        load_config({"checkpoint_dir": str(f)})


def test_yaml_dict_and_dataclass_give_the_same_config(tmp_path):
    data = {
        "zero_degree": 3,
        "group_zero": True,
        "sp_size": 2,
        "precision": "bf16",
        "grad_precision": "fp32",
        "selective_ratio": 0.5,
        "ac_offload": True,
        "encoder": {"fsdp": True, "group": True},
        "ema": {"enable": True, "sharded": True},
        "global_batch_size": 64,
        "num_workers": 2,
        "pin_memory": True,
        "global_seed": 7,
        "checkpoint_dir": "ckpt",
        "auto_resume": True,
        "resume_from": None,
        "init_from": None,
        "allow_tf32": True,
        "max_steps": 10,
        "lr": 1e-4,
        "weight_decay": 0,
    }
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    from_yaml, from_dict = load_config(str(path)), load_config(data)
    assert from_yaml == from_dict
    assert load_config(from_dict) == from_dict
    assert from_dict.weight_decay == 0.0 and isinstance(from_dict.weight_decay, float)
    assert config_as_dict(from_dict)["ema"]["enable"] is True


def test_group_zero_true_means_the_node():
    assert load_config({"zero_degree": 3, "group_zero": True}).group_size(2) == 2  # node size 2
    assert load_config({"zero_degree": 3, "group_zero": 4}).group_size(2) == 4
    assert load_config({}).group_size(2) is None


def test_direct_construction_is_validated_too():
    with pytest.raises(TypeError, match="'zero_degree' must be int"):
        LiteGenConfig(zero_degree="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sp_size=0"):
        dataclasses.replace(LiteGenConfig(), sp_size=0)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="holds a list"):
        load_config(str(tmp_path / "list.yaml"))
    with pytest.raises(TypeError, match="got int"):
        load_config(3)  # type: ignore[arg-type]
