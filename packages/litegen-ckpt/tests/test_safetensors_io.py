"""safetensors export (live sharded model, EMA, checkpoint directory) and slice-wise import into sharded models."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from litegen_ckpt import Checkpointer, export_safetensors, load_safetensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

TIMEOUT = 240  # seconds per harness call: generous for a loaded machine


class Net(nn.Module):
    """Rows 10, 10 and 2: uneven and empty shards at world 3."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.blocks = nn.ModuleList(nn.Linear(10, 10) for _ in range(2))
        self.head = nn.Linear(10, 2)
        self.register_buffer("scale", torch.tensor([1.0, 2.0]))


def plain(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def sharded(seed: int, degree: str) -> nn.Module:
    """FSDP2 over the world ("zero3"), HSDP on a 2 x (world/2) mesh ("grouped"), or DDP ("ddp")."""
    net = plain(seed)
    world = dist.get_world_size()
    if degree == "ddp":
        return DistributedDataParallel(net)
    if degree == "grouped":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for i, block in enumerate(net.blocks):
        net.blocks[i] = checkpoint_wrapper(block)  # adds _checkpoint_wrapped_module to the raw names
        fully_shard(net.blocks[i], mesh=mesh)
    return fully_shard(net, mesh=mesh)


def load_then_gather(path: str, degree: str) -> tuple[dict, list[list[int]]]:
    """Load ``path`` into a freshly built sharded model; return rank 0's full weights and local shard shapes."""
    model = sharded(seed=1, degree=degree)
    load_safetensors(model, path)
    shapes = [list(p.to_local().shape) for p in model.parameters() if isinstance(p, DTensor)]
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return (full if dist.get_rank() == 0 else {}), shapes


@pytest.mark.parametrize("degree", ["zero3", "ddp"])
def test_load_safetensors_into_a_sharded_model_equals_a_plain_load(dist_pool, tmp_path, degree):
    path = tmp_path / "weights.safetensors"
    export_safetensors(plain(seed=0), path)
    results = dist_pool.run(load_then_gather, str(path), degree, world_size=3, timeout=TIMEOUT)
    reference = plain(seed=1)
    load_safetensors(reference, path)
    expected = reference.state_dict()
    assert results[0][0].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(results[0][0][key], value), key
    if degree == "zero3":  # 10 rows -> 4, 4, 2; 2 rows -> 1, 1, 0: each rank read only its slice
        assert [shapes[-2] for _, shapes in results] == [[1, 10], [1, 10], [0, 10]]


def export_live_and_reload(path: str, degree: str) -> tuple[list[str], dict]:
    model = sharded(seed=0, degree=degree)
    raw_names = [name for name, _ in model.named_parameters()]
    export_safetensors(model, path)
    return raw_names, load_then_gather(path, degree)[0]


@pytest.mark.parametrize("degree", ["grouped", "zero3"])
def test_export_from_a_live_sharded_model_has_clean_names_and_reloads(dist_pool, tmp_path, degree):
    path = tmp_path / "export.safetensors"
    raw_names, reloaded = dist_pool.run(
        export_live_and_reload, str(path), degree, world_size=4, timeout=TIMEOUT
    )[0]
    assert any("_checkpoint_wrapped_module" in n for n in raw_names)
    exported = load_file(path)
    expected = plain(seed=0).state_dict()
    assert exported.keys() == expected.keys() == reloaded.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value) and torch.equal(reloaded[key], value), key


class ShadowWeights:
    """An EMA-like object: ``full_state_dict()`` gives consolidated tensors."""

    def __init__(self, net: nn.Module) -> None:
        self.shadow = {n: p.detach() * 0.5 for n, p in net.named_parameters()}

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = dict(state)

    def full_state_dict(self) -> dict:
        return {**self.shadow, "decay": 0.99}  # python values are not weights: skipped


def test_export_from_a_checkpoint_directory_and_from_an_ema(tmp_path):
    net, root = plain(seed=0), tmp_path / "ckpt"
    ema = ShadowWeights(net)
    checkpointer = Checkpointer(root)
    checkpointer.save(1, model=net, ema=ema)
    checkpointer.save(2, model=plain(seed=5), ema=ema)

    export_safetensors(root / "step_1", tmp_path / "model.safetensors")
    assert load_file(tmp_path / "model.safetensors").keys() == net.state_dict().keys()
    for key, value in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(value, net.state_dict()[key]), key

    export_safetensors(root, tmp_path / "latest.safetensors")  # a root means its latest checkpoint
    assert torch.equal(load_file(tmp_path / "latest.safetensors")["head.weight"], plain(seed=5).head.weight)

    export_safetensors(ema, tmp_path / "ema_live.safetensors")
    loaded = load_file(tmp_path / "ema_live.safetensors")
    assert loaded.keys() == ema.shadow.keys()
    assert all(torch.equal(loaded[k], v) for k, v in ema.shadow.items())

    export_safetensors(root, tmp_path / "ema_ckpt.safetensors", name="ema")  # + the model's buffer
    loaded = load_file(tmp_path / "ema_ckpt.safetensors")
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in ema.shadow.items())
    assert torch.equal(loaded["scale"], net.scale)

    with pytest.raises(ValueError, match="name='optimizer'.*it holds \\['ema', 'model'\\]"):
        export_safetensors(root, tmp_path / "x.safetensors", name="optimizer")
    with pytest.raises(FileNotFoundError, match="source="):
        export_safetensors(tmp_path / "nowhere", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="path=.*is a directory"):
        export_safetensors(net, tmp_path)
    with pytest.raises(TypeError, match="source=int"):
        export_safetensors(3, tmp_path / "x.safetensors")


def test_load_safetensors_names_missing_unexpected_keys_and_shape_mismatches(tmp_path):
    weights = plain(seed=0).state_dict()
    renamed = {("module." + k if k.startswith("head") else k): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    model = plain(seed=1)
    with pytest.raises(
        ValueError, match=r"missing keys \['head.bias', 'head.weight'\], unexpected keys \['module.head.bias'"
    ):
        load_safetensors(model, tmp_path / "renamed.safetensors")
    load_safetensors(model, tmp_path / "renamed.safetensors", strict=False)
    assert torch.equal(model.embed.weight, weights["embed.weight"])
    assert not torch.equal(model.head.weight, weights["head.weight"])

    save_file({**weights, "head.weight": torch.zeros(3, 10)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"head.weight: .* shape \(3, 10\), the model has shape \(2, 10\)"):
        load_safetensors(model, tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="path="):
        load_safetensors(model, tmp_path / "absent.safetensors")


def test_only_safetensors_is_read_for_weights(tmp_path):
    """A pickle disguised as weights is refused by the safetensors parser, never unpickled."""
    torch.save(plain(seed=0).state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(Exception, match="(?i)header|safetensor"):
        load_safetensors(plain(seed=1), tmp_path / "weights.safetensors")


def test_exported_weights_load_into_a_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block)
    export_safetensors(model, tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert not any("_checkpoint_wrapped_module" in key for key in f.keys())
    tokens = torch.arange(10).unsqueeze(0)
    model.eval()
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
