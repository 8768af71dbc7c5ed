"""Launch ``small_trainer.py`` under real torchrun launchers (the ``launch`` fixtures of ``conftest.py``).

``Launcher()(run_dir, *trainer_args, nproc=2, ...)`` starts ``python -m torch.distributed.run`` in its own
session with a c10d rendezvous on 127.0.0.1 and returns a ``Launch``; ``Launch.wait(timeout)`` returns the exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

TRAINER = Path(__file__).resolve().parent / "small_trainer.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    process: subprocess.Popen
    log: Path
    run_dir: Path

    def wait(self, timeout: float) -> int:
        """The launcher's exit code; kills it (and its workers) and fails the test past ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"torchrun did not finish within {timeout:.0f} s; log tail:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the launcher and every worker of this run: torchrun starts each worker in its own session,
        so they are found as the launcher's descendants and, once orphaned, by the run directory they got."""
        processes = []
        try:
            launcher = psutil.Process(self.process.pid)
            processes = [launcher, *launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        marker = f"--run-dir {self.run_dir} "
        for process in psutil.process_iter(["cmdline"]):
            if marker in " ".join(process.info["cmdline"] or []) and process not in processes:
                processes.append(process)
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)
        self.process.wait(10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def progress(run_dir: Path) -> dict[int, dict]:
    """Each rank's progress record written by the trainer: {rank: {"pid", "step", ...}}."""
    records = {}
    for path in sorted((run_dir / "progress").glob("rank*.json")):
        records[int(path.stem[4:])] = json.loads(path.read_text())
    return records


def wait_for(predicate, timeout: float, what: str, launch: Launch) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if launch.process.poll() is not None:
            pytest.fail(
                f"torchrun exited ({launch.process.returncode}) before {what}; log tail:\n{launch.tail()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s; log tail:\n{launch.tail()}")
        time.sleep(0.1)


class Launcher:
    """``launcher(run_dir, *trainer_args, nproc=2, nnodes=1, node_rank=0, port=None, max_restarts=0, env=None,
    log_name="torchrun.log") -> Launch``; ``close()`` kills every launch it started."""

    def __init__(self) -> None:
        self.started: list[Launch] = []

    def __call__(
        self,
        run_dir: Path,
        *trainer_args: str,
        nproc: int = 2,
        nnodes: int = 1,
        node_rank: int = 0,
        port: int | None = None,
        max_restarts: int = 0,
        env: dict | None = None,
        log_name: str = "torchrun.log",
    ) -> Launch:
        run_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2",
            f"--rdzv-id=reliability-{port}",
        ]
        if nnodes > 1:  # two launchers on one machine: say which one hosts the rendezvous store
            command += [f"--node-rank={node_rank}", f"--rdzv-conf=is_host={int(node_rank == 0)}"]
        command += [str(TRAINER), "--run-dir", str(run_dir), *trainer_args]
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's shared rendezvous store keeps the previous attempt's
        # keys, so without it a restarted group can fail to connect (pytorch#135712; LiteGen warns about it)
        full_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            **(env or {}),
        }
        log = run_dir / log_name
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        self.started.append(Launch(process, log, run_dir))
        return self.started[-1]

    def close(self) -> None:
        for item in self.started:
            item.kill()
