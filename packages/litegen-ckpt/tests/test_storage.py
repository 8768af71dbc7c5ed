"""The checksummed DCP storage: ``Digest`` and the reader's three ways in.

The reader reads straight into the destination, or through a buffer, or with ``torch.load``. Each way checks every
item. These tests run in one process without a process group.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from litegen_ckpt import Checkpointer, CheckpointError, storage
from litegen_ckpt.storage import BLOCK, Digest, VerifyingReader, tensor_digest
from torch import nn


def digest_of(*pieces: torch.Tensor) -> str:
    digest = Digest()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def test_the_digest_is_the_same_whatever_the_pieces_and_changes_with_any_corruption():
    data = torch.randint(
        0, 256, (5 * BLOCK + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    whole = digest_of(data)
    assert digest_of(data[:BLOCK], data[BLOCK : 4 * BLOCK], data[4 * BLOCK :]) == whole
    assert digest_of(torch.cat([torch.zeros(3, dtype=torch.uint8), data])[3:]) == whole  # not 8-byte aligned
    flipped = data.clone()
    flipped[3 * BLOCK + 77] ^= 1
    swapped = torch.cat([data[BLOCK : 2 * BLOCK], data[:BLOCK], data[2 * BLOCK :]])
    longer = torch.cat([data, torch.zeros(1, dtype=torch.uint8)])  # the padding is not data
    foreign = torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    digests = {
        whole,
        digest_of(flipped),
        digest_of(swapped),
        digest_of(longer),
        digest_of(foreign),
        digest_of(data[:-1]),
    }
    assert len(digests) == 6
    with pytest.raises(RuntimeError, match="ended mid-block"):
        Digest().update(data[:100]).update(data[100:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
def test_a_tensor_digest_is_that_of_its_values_in_row_major_order(dtype):
    values = torch.randint(0, 7, (64, 96), generator=torch.Generator().manual_seed(0)).to(dtype)
    assert tensor_digest(values.t()) == tensor_digest(values.t().contiguous()) != tensor_digest(values)
    assert tensor_digest(values[2]) == digest_of(values[2].clone().view(torch.uint8).reshape(-1))
    assert tensor_digest(torch.tensor(3.0)) != tensor_digest(torch.tensor(4.0))


def saved_linear(tmp_path, steps: int = 2) -> tuple[Checkpointer, nn.Linear, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Linear(96, 64)
    checkpointer = Checkpointer(tmp_path)
    weights = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(1.0)
        checkpointer.save(step, model=model)
        weights.append(model.weight.detach().clone())
    return checkpointer, model, weights


def test_tensors_are_read_straight_into_the_live_parameters(tmp_path, monkeypatch):
    checkpointer, model, weights = saved_linear(tmp_path, steps=1)
    filled = []
    read_into = storage._read_into

    def spy(stream, offset, dest, path, index):
        filled.append((index.fqn, dest.data_ptr()))
        return read_into(stream, offset, dest, path, index)

    monkeypatch.setattr(storage, "_read_into", spy)
    with torch.no_grad():
        model.weight.zero_()
    assert checkpointer.load(model=model) == 1
    assert torch.equal(model.weight, weights[0])
    assert ("model.weight", model.weight.data_ptr()) in filled  # no buffer, no second copy


def test_a_destination_of_another_dtype_is_filled_through_a_buffer(tmp_path):
    checkpointer, _, weights = saved_linear(tmp_path, steps=1)
    half = nn.Linear(96, 64).to(torch.bfloat16)
    assert checkpointer.load(model=half) == 1
    assert torch.equal(half.weight, weights[0].to(torch.bfloat16))


def test_without_the_record_offset_the_reader_falls_back_to_torch_load_and_still_checks(
    tmp_path, monkeypatch
):
    checkpointer, model, weights = saved_linear(tmp_path, steps=1)
    monkeypatch.setattr(VerifyingReader, "_data_start", lambda *args: None)
    state = {"model": {"weight": torch.zeros(64, 96), "bias": torch.zeros(64)}}
    storage.read_checkpoint(state, tmp_path / "step_1", no_dist=True)
    assert torch.equal(state["model"]["weight"], weights[0])
    corrupt_tensor(tmp_path / "step_1", "model.weight")
    with pytest.raises(
        CheckpointError, match=r"__0_0\.distcp does not match the checksum recorded for model\.weight"
    ):
        storage.read_checkpoint(state, tmp_path / "step_1", no_dist=True)


def corrupt_tensor(directory, fqn: str) -> None:
    """Flip one byte in the middle of ``fqn``'s values in its shard: the file keeps its size."""
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    (info,) = [info for index, info in metadata.storage_data.items() if index.fqn == fqn]
    shard = directory / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def test_a_modified_shard_is_named_at_load_and_fall_back_loads_the_previous_checkpoint(tmp_path, caplog):
    checkpointer, model, weights = saved_linear(tmp_path)
    corrupt_tensor(tmp_path / "step_2", "model.weight")
    with pytest.raises(
        CheckpointError, match=r"step_2/__0_0\.distcp does not match the checksum recorded for model\.weight"
    ):
        checkpointer.load(model=model)
    with caplog.at_level("WARNING", logger="litegen_ckpt"):
        assert checkpointer.load(fall_back=True, model=model) == 1
    assert torch.equal(model.weight, weights[0])
    (warning,) = [r.message for r in caplog.records if "instead of newer" in r.message]
    assert "step_2/__0_0.distcp" in warning


def test_a_missing_digest_file_is_named(tmp_path):
    checkpointer, model, _ = saved_linear(tmp_path, steps=1)
    (tmp_path / "step_1" / "digests_0.json").unlink()
    with pytest.raises(FileNotFoundError, match="digests_0.json"):
        checkpointer.load(model=model)


def test_the_writer_records_every_item_it_wrote(tmp_path):
    checkpointer, model, _ = saved_linear(tmp_path, steps=1)
    checkpointer.save(2, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rng=True)
    records = __import__("json").loads((tmp_path / "step_2" / "digests_0.json").read_text())["items"]
    metadata = dcp.FileSystemReader(tmp_path / "step_2").read_metadata()
    recorded = {(fqn, None if offset is None else tuple(offset)) for fqn, offset, _, _ in records}
    stored = {(i.fqn, None if i.offset is None else tuple(i.offset)) for i in metadata.storage_data}
    assert recorded == stored
    assert {kind for _, _, kind, _ in records} == {"digest", "crc32"}  # tensors, and pickled values (rng)
