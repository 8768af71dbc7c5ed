"""The ``litegen`` command on a real checkpoint: a tiny diffusers PixArt trained 3 steps through the facade at
ZeRO-3 with a sharded EMA on 2 ranks. ``export`` gives what ``from_pretrained`` and ``load_file`` read (one file,
sharded folders, the EMA, bf16), ``inspect`` and ``verify`` describe and check it, and bad paths, damaged files
and a newer format are named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers_models import make_batches, make_model_and_optimizer, rows, train_steps
from litegen import LiteGen
from litegen.cli import main
from litegen_ckpt.storage import read_metadata
from safetensors.torch import load_file

STEPS, GLOBAL_BATCH = 3, 4


def train_and_save(root: str) -> dict:
    """Rank 0: the trained model's and EMA's consolidated weights, after saving step 3 under ``root``."""
    gen = LiteGen(
        {"zero_degree": 3, "global_seed": 0, "checkpoint_dir": root, "ema": {"enable": True, "sharded": True}}
    )
    model, opt = gen.initialize(*make_model_and_optimizer("pixart"))
    rt = gen.runtime
    per = GLOBAL_BATCH // rt.dp_size
    batches = [
        rows(b, rt.dp_rank * per, (rt.dp_rank + 1) * per, GLOBAL_BATCH) for b in make_batches("pixart", 4, 3)
    ]
    for step, batch in enumerate(batches):
        train_steps(model, opt, [batch], lambda m: gen.clip_grad_norm_(1e9))
        gen.ema.update(step)
    gen.save(STEPS)
    out = {"model": gen.full_state_dict(), "ema": gen.ema.full_state_dict()}
    gen.close()
    return out


@pytest.fixture(scope="module")
def trained(dist_pool, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cli") / "checkpoints"
    return root, dist_pool.run(train_and_save, str(root), world_size=2, timeout=300)[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def equal(ours: dict, theirs: dict, dtype: torch.dtype | None = None) -> bool:
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in theirs.items()}
    return ours.keys() == cast.keys() and all(torch.equal(ours[k], cast[k]) for k in ours)


def test_export_a_folder_from_pretrained_reads(trained, tmp_path, capsys):
    root, weights = trained
    code, out, _ = run(capsys, "export", root, tmp_path / "pixart", "--quiet")
    assert code == 0 and (tmp_path / "pixart" / "config.json").is_file(), out
    loaded = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart")
    assert equal(loaded.state_dict(), weights["model"])


def test_export_shards_the_ema_in_bf16(trained, tmp_path, capsys):
    root, weights = trained
    out_dir = tmp_path / "ema"
    code, out, err = run(
        capsys, "export", root, out_dir, "--ema", "--dtype", "bf16", "--max-shard-size", "20KB"
    )
    assert code == 0, err
    shards = sorted(out_dir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    index = json.loads((out_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 20_000 + 10_000 for s in shards)  # a shard holds at most 20 KB of tensors
    loaded = diffusers.PixArtTransformer2DModel.from_pretrained(out_dir, torch_dtype=torch.bfloat16)
    assert equal(loaded.state_dict(), weights["ema"], torch.bfloat16)
    assert not equal(weights["ema"], weights["model"])  # the EMA is not the model


def test_export_one_file_with_a_progress_bar(trained, tmp_path, capsys):
    root, weights = trained
    code, out, err = run(capsys, "export", root / "step_3", tmp_path / "model.safetensors")
    assert code == 0 and "export" in err and "100%" in err  # tqdm's bar on stderr
    assert equal(load_file(tmp_path / "model.safetensors"), weights["model"])


def test_inspect(trained, capsys):
    root, weights = trained
    code, out, _ = run(capsys, "inspect", root)
    assert code == 0
    params = sum(v.numel() for v in weights["model"].values())
    for line in (
        "step        3",
        "world       2 processes (dp 2 x sp 1)",
        f"parameters  {params:,}",
        "latest -> step_3",
    ):
        assert line in out, out
    for entry in ("model", "optimizer", "ema", "rng", "layout"):
        assert f"\n  {entry} " in out, out
    code, out, _ = run(capsys, "inspect", root / "step_3", "--json")
    described = json.loads(out)
    assert described["step"] == 3 and described["layout"] == {"dp_size": 2, "sp_size": 1, "world_size": 2}
    assert described["entries"]["model"]["elements"] == params and described["config"] is True


def test_verify_names_each_damaged_file_and_tensor(trained, tmp_path, capsys):
    root, _ = trained
    assert run(capsys, "verify", root)[0] == 0
    copy = tmp_path / "step_3"
    shutil.copytree(root / "step_3", copy)
    shard = copy / "__1_0.distcp"
    items = read_metadata(copy).storage_data.items()
    index, where = max(((i, s) for i, s in items if s.relative_path == shard.name), key=lambda x: x[1].length)
    data = bytearray(shard.read_bytes())
    data[where.offset + where.length // 2] ^= 0xFF  # one flipped byte inside the largest tensor rank 1 wrote
    shard.write_bytes(bytes(data))
    config = copy / "config.json"
    config.write_text(config.read_text().replace("PixArt", "PixArx"))  # same size, other bytes
    code, out, _ = run(capsys, "verify", copy)
    problems = out.splitlines()[:-1]
    assert code == 1 and out.splitlines()[-1].endswith("2 problems"), out
    assert any("config.json does not match the CRC-32" in p for p in problems), out
    assert any(f"__1_0.distcp does not match the checksum recorded for {index.fqn}" in p for p in problems), (
        out
    )
    (copy / "__0_0.distcp").write_bytes((copy / "__0_0.distcp").read_bytes()[:100])
    code, out, _ = run(capsys, "verify", copy)
    assert code == 1 and "__0_0.distcp has 100 bytes but litegen.json records" in out


def test_errors_name_the_path_and_the_format(trained, tmp_path, capsys):
    root, _ = trained
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2 and f"path={str(tmp_path)!r} is not a LiteGen checkpoint" in err
    newer = tmp_path / "newer"
    shutil.copytree(root / "step_3", newer)
    info = json.loads((newer / "litegen.json").read_text())
    (newer / "litegen.json").write_text(json.dumps({**info, "format": 99}))
    code, _, err = run(capsys, "inspect", newer)
    assert code == 2 and "has format 99, written by a newer LiteGen" in err
    code, _, err = run(capsys, "export", root, tmp_path / "x.safetensors", "--max-shard-size", "1GB")
    assert code == 2 and "max_shard_bytes and config apply to a folder output" in err
    with pytest.raises(SystemExit):
        main(["export", str(root), str(tmp_path / "y"), "--max-shard-size", "lots"])


def test_the_console_script_is_installed():
    script = Path(sys.executable).with_name("litegen")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("inspect", "verify", "export"))
