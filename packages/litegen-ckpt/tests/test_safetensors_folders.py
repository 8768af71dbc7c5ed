"""load_safetensors from what pretrained weights ship as: a file, a sharded index, a diffusers / transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from litegen_ckpt import load_safetensors
from safetensors.torch import save_file
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.blocks = nn.ModuleList(nn.Linear(10, 10) for _ in range(2))
        self.head = nn.Linear(10, 2)
        self.register_buffer("scale", torch.tensor([1.0, 2.0]))


class Base(Net):
    """A transformers-style base model: checkpoints of its task models prefix its names with "transformer."."""

    base_model_prefix = "transformer"


class Task(nn.Module):
    base_model_prefix = "transformer"

    def __init__(self) -> None:
        super().__init__()
        self.transformer = Net()


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Net().state_dict().items()}


def write_index(folder: Path, stem: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shard files and ``<stem>.safetensors.index.json``, as ``save_pretrained(max_shard_size=...)`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {f"{stem}-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def assert_holds(model: nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    state = model.state_dict()
    assert set(state) == {prefix + k for k in expected}
    for key, value in expected.items():
        assert torch.equal(state[prefix + key], value), key


def test_an_index_and_both_folder_layouts_load_the_same_weights(tmp_path):
    expected = weights()
    index = write_index(tmp_path / "sharded", "model", expected)
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    save_file(expected, diffusers / "diffusion_pytorch_model.safetensors")
    (diffusers / "config.json").write_text("{}")
    transformers = tmp_path / "transformers"
    write_index(transformers, "model", expected)
    (transformers / "config.json").write_text("{}")
    sharded_diffusers = tmp_path / "sharded_diffusers"
    write_index(sharded_diffusers, "diffusion_pytorch_model", expected)
    for path in (index, tmp_path / "sharded", diffusers, transformers, sharded_diffusers):
        model = Net()
        load_safetensors(model, path)
        assert_holds(model, expected)


def test_the_base_model_prefix_is_stripped_or_added_only_when_every_name_then_matches(tmp_path):
    expected = weights()
    prefixed = {f"transformer.{k}": v for k, v in expected.items()}
    write_index(tmp_path / "task", "model", prefixed)  # a task model's checkpoint into its base model
    base = Base()
    load_safetensors(base, tmp_path / "task")
    assert_holds(base, expected)
    save_file(expected, tmp_path / "base.safetensors")  # a base model's checkpoint into a task model
    task = Task()
    load_safetensors(task, tmp_path / "base.safetensors")
    assert_holds(task, expected, prefix="transformer.")

    partly = {**expected, "transformer.head.bias": expected["head.bias"]}  # stripping matches only some names
    del partly["head.bias"]
    save_file(partly, tmp_path / "partly.safetensors")
    with pytest.raises(
        ValueError, match=r"missing keys \['head.bias'\], unexpected keys \['transformer.head.bias'\]"
    ):
        load_safetensors(Base(), tmp_path / "partly.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \[.*'embed.bias'"):  # no base_model_prefix: as is
        load_safetensors(Net(), tmp_path / "task")


def test_folders_and_indexes_that_cannot_load_are_named(tmp_path):
    model = Net()
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"empty'? is a folder without diffusion_pytorch_model.safetensors"
    ):
        load_safetensors(model, tmp_path / "empty")
    index = write_index(tmp_path / "lost", "model", weights())
    next((tmp_path / "lost").glob("*00002.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"names shard files that do not exist: \[.*00002"):
        load_safetensors(model, index)
    bad = tmp_path / "bad" / "model.safetensors.index.json"
    bad.parent.mkdir()
    bad.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="is not a safetensors index"):
        load_safetensors(model, bad)
    index = write_index(tmp_path / "wrong", "model", weights())
    table = json.loads(index.read_text())
    table["weight_map"]["head.bias"] = "model-00002-of-00002.safetensors"  # it is in the first shard
    index.write_text(json.dumps(table))
    with pytest.raises(
        ValueError, match=r"puts head.bias in .*00002-of-00002.safetensors, which does not hold"
    ):
        load_safetensors(model, index)
    index = write_index(tmp_path / "pickled", "model", weights())
    torch.save(weights(), next((tmp_path / "pickled").glob("*00002.safetensors")))
    with pytest.raises(ValueError, match=r"index.json' names a file that is not a valid safetensors file"):
        load_safetensors(model, index)
    with pytest.raises(FileNotFoundError, match=r"does not exist or is not a .safetensors file"):
        load_safetensors(model, tmp_path / "weights.bin")
