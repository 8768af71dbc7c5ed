"""Run a test function on every rank of a real gloo process group, with long-lived workers.

Importing torch costs seconds per process, so a ``DistPool`` spawns its worker processes once (per
pytest process, xdist workers included) and reuses them: each ``run`` call forms (or keeps) a default
gloo process group of the requested size over the first ``world_size`` workers, calls the function
on each, and returns the per-rank results in rank order.

    results = pool.run(fn, *args, world_size=4, timeout=60, **kwargs)

``fn`` must be a module-level function (the worker loads its module from the file by path, under
the same module name, so classes defined in a test module pickle both ways; the file's folder is
put on ``sys.path`` so its sibling helper modules import). A rank that raises
fails the call with a ``RankError`` that shows every failing rank's traceback and log tail. A call
that does not finish within ``timeout`` seconds (a hung collective, a dead rank) kills the
workers, which are respawned lazily, and raises ``RankError`` naming the ranks still running.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

# Gloo's own collective timeout inside the test worlds: shorter than a call's default deadline, so
# a hung collective usually ends as a readable exception on the waiting ranks before the kill.
GLOO_TIMEOUT_S = 30.0
DEFAULT_CALL_TIMEOUT_S = 60.0
# After one rank fails, how long the others get to finish (or fail) before they are killed.
FAILURE_GRACE_S = 5.0


class RankError(RuntimeError):
    """One or more ranks raised, hung or died during a harness call."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_module(name: str, path: str) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:  # the test's sibling helper modules import as in the pytest process
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load test module {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    parts = name.split(".")
    for depth in range(1, len(parts)):  # pickle imports the parents of a dotted name first
        parent = ".".join(parts[:depth])
        if parent not in sys.modules:
            sys.modules[parent] = types.ModuleType(parent)
            sys.modules[parent].__path__ = []
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding decisions when a world is re-formed.

    ``DeviceMesh.__eq__`` ignores process-group names, so a cached decision made in an earlier world
    can hand back a mesh whose groups were destroyed ("Could not resolve the process group"). Only a
    process that re-forms its world, as these workers do, can meet this.
    """
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import _gen_transform_infos

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's cache
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    _gen_transform_infos.cache_clear()


def _worker_main(index: int, conn: Connection, log_path: str, extra_sys_path: list[str]) -> None:
    """A worker's loop: (re)form the requested world, run calls, send back results or tracebacks."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    for p in extra_sys_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, force=True)
    world: tuple[int, str] | None = None  # (world_size, rendezvous) of the current default group
    conn.send(("ready", index))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _, world_size, rendezvous, mod_name, mod_path, qualname, payload = msg
        try:
            log.seek(0)
            log.truncate()
            if world != (world_size, rendezvous) or not dist.is_initialized():
                if dist.is_initialized():
                    dist.destroy_process_group()
                    _clear_dtensor_caches()
                host, port = rendezvous.rsplit(":", 1)
                os.environ.update(
                    RANK=str(index),
                    LOCAL_RANK=str(index),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size),
                    MASTER_ADDR=host,
                    MASTER_PORT=port,
                    GROUP_RANK="0",
                    ROLE_RANK=str(index),
                    ROLE_WORLD_SIZE=str(world_size),
                )
                dist.init_process_group(
                    "gloo",
                    init_method=f"tcp://{rendezvous}",
                    rank=index,
                    world_size=world_size,
                    timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
                )
                world = (world_size, rendezvous)
            module = _load_module(mod_name, mod_path)
            fn = module
            for part in qualname.split("."):
                fn = getattr(fn, part)
            args, kwargs = pickle.loads(payload)
            torch.manual_seed(0)
            result = fn(*args, **kwargs)
            conn.send(("ok", index, result))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
            world = None  # the group may be out of step now: re-form it next call
            tb = traceback.format_exc()
            try:
                conn.send(("error", index, f"{type(exc).__name__}: {exc}", tb))
            except Exception:  # the exception itself may not pickle
                conn.send(("error", index, repr(exc), tb))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    log_path: str


@dataclass
class DistPool:
    """Long-lived worker processes that run functions under real gloo worlds of size 1..max_workers."""

    max_workers: int = 4
    workers: list[_Worker] = field(default_factory=list)
    _log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="litegen-harness-"))
    _world: tuple[int, str] | None = None

    def _spawn(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        extra = [str(Path(__file__).resolve().parent)]
        new = []
        for index in range(len(self.workers), count):
            parent, child = ctx.Pipe()
            log_path = os.path.join(self._log_dir, f"rank{index}.log")
            proc = ctx.Process(
                target=_worker_main,
                args=(index, child, log_path, extra),
                daemon=True,
                name=f"litegen-harness-{index}",
            )
            proc.start()
            child.close()
            new.append(_Worker(proc, parent, log_path))
        for w in new:  # wait for torch to import in all of them at once
            if not w.conn.poll(120):
                self.shutdown()
                raise RankError("a harness worker did not start within 120 s")
            w.conn.recv()
        self.workers.extend(new)

    def shutdown(self) -> None:
        """Stop every worker (killing stuck ones)."""
        for w in self.workers:
            if w.process.is_alive():
                try:
                    w.conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + 3
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
        self.workers = []
        self._world = None

    def _log_tail(self, index: int, lines: int = 25) -> str:
        try:
            text = Path(self.workers[index].log_path).read_text(errors="replace")
        except (OSError, IndexError):
            return ""
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(tail)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        world_size: int,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on ranks 0..world_size-1; return their results in rank order."""
        if not 1 <= world_size <= self.max_workers:
            raise ValueError(f"world_size={world_size}; the pool runs worlds of 1..{self.max_workers} ranks")
        mod = sys.modules.get(fn.__module__)
        mod_path = getattr(mod, "__file__", None)
        if mod_path is None or "<locals>" in fn.__qualname__:
            raise ValueError(f"{fn.__qualname__} must be a module-level function of a module with a file")
        if any(not w.process.is_alive() for w in self.workers):
            self.shutdown()
        if len(self.workers) < world_size:
            self._spawn(self.max_workers)
        if self._world is None or self._world[0] != world_size:
            self._world = (world_size, f"127.0.0.1:{_free_port()}")
        payload = pickle.dumps((args, kwargs))
        active = self.workers[:world_size]
        for w in active:
            w.conn.send(
                ("call", world_size, self._world[1], fn.__module__, mod_path, fn.__qualname__, payload)
            )
        return self._collect(active, timeout)

    def _collect(self, active: list[_Worker], timeout: float) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, str]] = {}
        pending = {w.conn: i for i, w in enumerate(active)}
        sentinels = {w.process.sentinel: i for i, w in enumerate(active)}
        deadline = time.monotonic() + timeout
        while pending:
            now = time.monotonic()
            if errors:
                deadline = min(deadline, now + FAILURE_GRACE_S)
            remaining = deadline - now
            if remaining <= 0:
                break
            ready = wait(list(pending) + list(sentinels), timeout=remaining)
            for obj in ready:
                if obj in pending:
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        continue
                    index = pending.pop(obj)
                    if msg[0] == "ok":
                        results[index] = msg[2]
                    else:
                        errors[index] = (msg[2], msg[3])
                elif obj in sentinels:
                    index = sentinels.pop(obj)
                    conn = active[index].conn
                    if conn in pending and not conn.poll():
                        pending.pop(conn)
                        code = active[index].process.exitcode
                        errors[index] = (f"worker process died (exit code {code})", "")
        if not pending and not errors:
            return [results[i] for i in range(len(active))]
        stuck = sorted(pending.values())
        parts = []
        if errors:
            first = min(errors)
            parts.append(f"rank {first} raised {errors[first][0]}")
        if stuck:
            why = "after another rank failed" if errors else f"within the {timeout:.0f} s timeout"
            parts.append(f"ranks {stuck} did not finish {why} (hung collective?); workers restarted")
        lines = ["; ".join(parts)]
        for index in sorted(errors):
            lines.append(f"\n----- rank {index} traceback -----\n{errors[index][1] or errors[index][0]}")
        for index in stuck:
            lines.append(f"\n----- rank {index} log tail -----\n{self._log_tail(index)}")
        if stuck:
            self.shutdown()
        else:
            self._world = None  # the group may be out of step: re-form it next call
        raise RankError("\n".join(lines))
