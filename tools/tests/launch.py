"""Run tools/train.py for the tools' tests: under torchrun (or alone), or on the ranks of the shared pool."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int | None = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """tools/train.py with `args`: under torchrun with `nproc` processes, or one plain process (None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = [sys.executable]
    if nproc:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_port()}",
        ]
    return subprocess.run(
        [*launcher, str(TOOLS / "train.py"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def train_on_every_rank(argv: list[str]) -> float | None:
    """tools/train.py's main on each rank of a `dist_pool` world; rank 0 returns the prompt accuracy."""
    os.environ["TQDM_DISABLE"] = "1"
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import train

    return train.main(argv)
