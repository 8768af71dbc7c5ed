"""A small but real trainer on the LiteGen facade, launched by the reliability tests under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 ... small_trainer.py --run-dir DIR --steps 12 \
        --save-every 4 --config '{"zero_degree": 3, "auto_resume": true}'

``DIR/ckpt`` holds the checkpoints, ``DIR/final.safetensors`` the final weights (rank 0, via
``gen.full_state_dict()``), ``DIR/progress/rank<r>.json`` each rank's pid and last finished step (written
after every step, so a test knows when to kill). Fault injection, only in the first attempt
(``TORCHELASTIC_RESTART_COUNT == 0``):

- ``--stop RANK:STEP``: after finishing STEP (and its save) the rank writes ``DIR/stopped`` and stops
  calling collectives (sleeps), as a hung or about-to-be-killed worker does;
- ``--hang-in-save STEP``: every rank's DCP writer hangs after its first file item in the save of STEP
  (sync: in the main thread; async: in the background writer), after writing ``DIR/saving``.

``--report`` adds resource figures to the progress files: RSS and native thread count at step ``--rss-at``
and at the end, the python threads and child processes left after the ``LiteGen`` closed; and, for grouped
ZeRO-3, the ranks of this rank's shard group.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen import LiteGen
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

FEATURES, HIDDEN = 8, 16


class Block(nn.Module):
    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Denoiser(nn.Module):
    """x: (batch, FEATURES) noisy sample -> (batch, FEATURES) predicted noise."""

    def __init__(self, blocks: int = 2, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.head = nn.Linear(hidden, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Samples(Dataset):
    """Deterministic clean samples; 40 of them, so runs cross epoch boundaries."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randn(FEATURES, generator=torch.Generator().manual_seed(index))


def resources() -> dict[str, int]:
    return {"rss": psutil.Process().memory_info().rss, "native_threads": len(os.listdir("/proc/self/task"))}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def hang_in_dcp_writes(marker: Path) -> None:
    """Make DCP's file writer hang after its first item (the shard file exists, partly written)."""
    import torch.distributed.checkpoint.filesystem as filesystem

    write_item = filesystem._write_item

    def write_then_hang(*args, **kwargs):
        result = write_item(*args, **kwargs)
        marker.touch()
        time.sleep(3600)
        return result

    filesystem._write_item = write_then_hang


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--config", default="{}", help="LiteGen config overrides, JSON")
    parser.add_argument("--stop", default=None, help="RANK:STEP")
    parser.add_argument("--start-late", default=None, help="RANK:SECONDS, slept before joining the world")
    parser.add_argument("--hang-in-save", type=int, default=None)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--rss-at", type=int, default=200)
    parser.add_argument(
        "--hidden", type=int, default=HIDDEN, help="the model's width (the state grows as its square)"
    )
    args = parser.parse_args()

    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    config = {
        "global_batch_size": 4,
        "checkpoint_dir": str(args.run_dir / "ckpt"),
        "log_level": "WARNING",
        **json.loads(args.config),
    }
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # torchrun, else an srun step
    progress = args.run_dir / "progress"
    progress.mkdir(parents=True, exist_ok=True)
    if args.start_late is not None and rank == int(args.start_late.split(":")[0]):
        time.sleep(float(args.start_late.split(":")[1]))
    try:
        train(args, config, rank, progress, first_attempt)
    except Exception as error:
        (progress / f"error_rank{rank}.txt").write_text(f"{time.time()} {type(error).__name__}")
        raise


def train(args: argparse.Namespace, config: dict, rank: int, progress: Path, first_attempt: bool) -> None:
    stop_rank, stop_step = map(int, args.stop.split(":")) if args.stop else (-1, -1)
    with LiteGen(config) as gen:  # names a collective timeout in the loop, closes the checkpointer at the end
        model = Denoiser(hidden=args.hidden)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        model, optimizer, _ = gen.initialize(model, optimizer, Samples())
        record: dict = {
            "pid": os.getpid(),
            "started_at": gen.start_step,
            "step": gen.start_step,
            "losses": {},
        }
        if gen.runtime.zero_mesh.ndim == 2:
            record["shard_group"] = dist.get_process_group_ranks(gen.runtime.zero_mesh.get_group("shard"))
        batches = gen.batches()
        for step in range(gen.start_step + 1, args.steps + 1):
            clean = next(batches)
            noise = torch.randn_like(clean)
            loss = F.mse_loss(model(clean + noise), noise)
            loss.backward()
            gen.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
            if args.save_every and step % args.save_every == 0:
                if first_attempt and step == args.hang_in_save:
                    hang_in_dcp_writes(args.run_dir / "saving")
                gen.save(step)
            if args.report and step == args.rss_at:
                record["at"] = resources()
            record["step"] = step
            if step <= 50:
                record["losses"][step] = loss.item()
            write_json(progress / f"rank{rank}.json", record)
            if first_attempt and rank == stop_rank and step == stop_step:
                (args.run_dir / "stopped").write_text(str(os.getpid()))
                time.sleep(3600)
        weights = gen.full_state_dict()
        if rank == 0:
            save_file(weights, str(args.run_dir / "final.safetensors"))
        if args.report:
            record["end"] = resources()
    if args.report:
        record["threads"] = sorted(t.name for t in threading.enumerate())
        record["children"] = [p.pid for p in psutil.Process().children(recursive=True)]
    write_json(progress / f"rank{rank}.json", record)


if __name__ == "__main__":
    main()
