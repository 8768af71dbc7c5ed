"""Scenario 5: untrusted weights and checkpoints. ``init_from`` and ``load_safetensors`` read safetensors only:
a pickle (under any name), a truncated or empty file is refused with a ValueError naming it, and nothing is ever
unpickled. A checkpoint directory whose ``.metadata`` or stored python values are crafted pickles (with sizes,
digests and CRCs made consistent, as an attacker would) is refused by ``Checkpointer.load`` and
``export_safetensors`` before any code runs (the pickles here create a marker file when unpickled)."""

from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path

import pytest
import torch
from litegen import LiteGen
from litegen_ckpt import load_safetensors
from safetensors.torch import save_file
from small_trainer import Denoiser


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: the proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_files(folder: Path) -> dict[str, Path]:
    marker = folder / "unpickled"
    evil = {"weights": Payload(marker), "w": torch.ones(2)}
    files = {
        "pickle named .safetensors": folder / "evil.safetensors",
        "torch.save .pt": folder / "evil.pt",
        "empty": folder / "empty.safetensors",
        "truncated": folder / "truncated.safetensors",
    }
    with open(files["pickle named .safetensors"], "wb") as f:
        pickle.dump(evil, f)
    torch.save(evil, files["torch.save .pt"])
    files["empty"].write_bytes(b"")
    good = folder / "good.safetensors"
    save_file({k: v.contiguous() for k, v in Denoiser().state_dict().items()}, str(good))
    files["truncated"].write_bytes(good.read_bytes()[:-64])
    return files


@pytest.mark.parametrize("case", ["pickle named .safetensors", "torch.save .pt", "empty", "truncated"])
def test_load_safetensors_refuses_anything_but_safetensors(tmp_path, case):
    path = bad_files(tmp_path)[case]
    with pytest.raises(ValueError, match=f"path='{path}' is not a valid safetensors file"):
        load_safetensors(Denoiser(), path)
    assert not (tmp_path / "unpickled").exists()


def init_from(path: str) -> str:
    try:
        with LiteGen({"init_from": path, "global_batch_size": 2}) as gen:
            model = Denoiser()
            gen.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1))
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "loaded"


def test_init_from_refuses_anything_but_safetensors(dist_pool, tmp_path):
    files = bad_files(tmp_path)
    results = {case: dist_pool.run(init_from, str(path), world_size=2) for case, path in files.items()}
    for case, per_rank in results.items():
        for message in per_rank:
            if case == "torch.save .pt":  # refused by the config check, before any file is opened
                assert message.startswith(f"ValueError: config: init_from='{files[case]}' is not allowed"), (
                    message
                )
            else:
                assert message.startswith(f"ValueError: path='{files[case]}' is not a valid safetensors"), (
                    message
                )
    assert not (tmp_path / "unpickled").exists()
    assert dist_pool.run(init_from, str(tmp_path / "good.safetensors"), world_size=2) == ["loaded", "loaded"]


class PayloadState:
    """A stateful whose saved python value unpickles into ``Payload`` (DCP stores python values with torch.save)."""

    def __init__(self, marker: Path) -> None:
        self.value: object = Payload(marker)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def crafted_checkpoint(root: Path, kind: str) -> Path:
    """A checkpoint an attacker built: consistent sizes, digests and CRCs, and a pickle that runs code."""
    from litegen_ckpt import Checkpointer

    marker = root / "unpickled"
    model = Denoiser()
    if kind == "python value":  # the normal save path writes the payload and records its checksums
        Checkpointer(root).save(1, model=model, extra=PayloadState(marker))
        return marker
    Checkpointer(root).save(1, model=model)
    directory = root / "step_1"
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    info = json.loads((directory / "litegen.json").read_text())  # the attacker rewrites the recorded CRC too
    info["files"][".metadata"] = (directory / ".metadata").stat().st_size
    info["crc32"][".metadata"] = f"{zlib.crc32((directory / '.metadata').read_bytes()):08x}"
    (directory / "litegen.json").write_text(json.dumps(info))
    return marker


@pytest.mark.parametrize("kind", [".metadata", "python value"])
@pytest.mark.parametrize("reader", ["Checkpointer.load", "export_safetensors"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, kind, reader):
    """Loading refuses both; exporting reads only tensors, so a crafted python value is never even read."""
    from litegen_ckpt import Checkpointer, CheckpointError, export_safetensors

    marker = crafted_checkpoint(tmp_path / "ckpt", kind)
    if reader == "export_safetensors" and kind == "python value":
        export_safetensors(tmp_path / "ckpt", tmp_path / "out.safetensors")
    else:
        with pytest.raises(
            CheckpointError, match="not DCP metadata LiteGen can read safely|not a plain python value"
        ):
            if reader == "Checkpointer.load":
                Checkpointer(tmp_path / "ckpt").load(model=Denoiser(), extra=PayloadState(tmp_path / "other"))
            else:
                export_safetensors(tmp_path / "ckpt", tmp_path / "out.safetensors")
    assert not marker.exists()
