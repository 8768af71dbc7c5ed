"""Sharded, resumable, crash-safe checkpoints of live training objects with torch.distributed.checkpoint.

On disk, under ``root``::

    latest                  text: the directory name of the newest complete checkpoint, e.g. "step_1000"
    step_<N>/               one complete checkpoint
        __<rank>_<i>.distcp     DCP shards (each rank writes its own)
        digests_<rank>.json     a checksum of every item (tensor chunk or python value) that rank wrote
        .metadata               DCP's index of every tensor and python value
        litegen.json            format, step, run id, world size, time, versions, entries, every file's size,
                                the CRC-32 of every file but the shards
        <attached files>        given to the ``Checkpointer`` (``files=``), e.g. the model's ``config.json``
    step_<N>.<run>.tmp/     a save in progress; removed by the run's next save
    step_<N>.removing-*.tmp/    an old checkpoint (beyond ``keep``) being deleted in the background

A save writes ``step_<N>.<run>.tmp/``, and only once every rank has written its shards, rank 0 adds
``litegen.json``, renames the directory to ``step_<N>/`` and replaces ``latest`` (write, then rename), so a
crash at any moment leaves ``latest`` naming a complete checkpoint.

A root belongs to one run (a random id in each ``litegen.json``): a ``Checkpointer`` continues the run of the
checkpoint it loaded, or starts a new one in an empty root; saving into a root that holds another run's
checkpoints or unfinished saves is refused. Rotation keeps the run's ``keep`` highest steps (and the step it
loaded), fall-back tries ``latest`` then the run's other steps, highest first: one order. A save after a
rewind (loaded step 4, saving 5 while 6 and 8 exist) first retires the later steps, so neither ``latest`` nor
fall-back can return to them.

Before reading anything, a load checks every file's size and the CRC-32 of the small files (each rank checks its
share), so a truncated file or a garbled index is named before anything is unpickled. Each item's checksum is then
checked on the bytes just read (``storage.VerifyingReader``, one pass over the data), so a modified or foreign
shard is named too. Such a failure may leave the live objects partly loaded: load a good checkpoint before
training (``fall_back=True`` does).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.optim import ZeroRedundancyOptimizer

from .statefuls import Adapter, ModelState, OptimizerState, RNGState, StatefulState, ZeroOptimizerState
from .storage import (
    SHARD_FILE,
    CheckpointError,
    DigestingWriter,
    agree,
    disk_full,
    raise_if,
    raise_named_failure,
    read_checkpoint,
    read_metadata,
    single_process_quiet,
    write_durably,
)

logger = logging.getLogger(__name__)

INFO_FILE = "litegen.json"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
DIGEST = re.compile(r"digests_\d+\.json")
METADATA_FILE = ".metadata"  # DCP's
LEGACY_RUN = "legacy"
FORMAT = 1  # litegen.json's "format": raised when a change would make older readers misread a checkpoint


class Checkpointer:
    """Save and load training state under ``root`` (see the module docstring for the layout).

    Statefuls are keyword arguments: ``model=`` (an ``nn.Module`` of any degree), ``optimizer=`` (saved with
    the one model passed in the same call, incl. ``ZeroRedundancyOptimizer`` and FSDP2), ``rng=True`` (this
    rank's torch / CUDA / python / numpy generators) and any object with ``state_dict()`` /
    ``load_state_dict()`` (EMA, sampler, scheduler). Every rank of the group calls every method.

    Args:
        root: directory of the checkpoints (created on the first save); shared by all ranks.
        keep: how many complete checkpoints to keep (the oldest are removed after a newer one is complete);
            ``None`` keeps all.
        async_save: ``save()`` returns once the state is copied to CPU memory; files are written in the
            background over a dedicated gloo group, completed by the next ``save``/``load``/``wait()``.
        process_group: the ranks that checkpoint together (default: the whole world, or one process).
        timeout: collective timeout of the background save's own group (default: torch's, 30 minutes for gloo);
            give the job's, so a dead peer fails a background save instead of hanging it.
        files: ``{file name: bytes}`` written into every checkpoint by rank 0 and checksummed with it, e.g.
            ``{"config.json": model.to_json_string().encode()}`` for an export that ``from_pretrained`` reads.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep: int | None = 3,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        timeout: datetime.timedelta | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        raise_if(
            not isinstance(root, (str, os.PathLike)),
            TypeError,
            f"root={root!r}; expected a str or os.PathLike directory",
        )
        self.root = Path(root)
        raise_if(
            self.root.exists() and not self.root.is_dir(),
            ValueError,
            f"root={str(root)!r} is a file; Checkpointer needs a directory (existing or not)",
        )
        raise_if(
            keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1),
            ValueError,
            f"keep={keep!r}; expected an int >= 1, or None to keep every checkpoint",
        )
        raise_if(
            not isinstance(async_save, bool), TypeError, f"async_save={async_save!r}; expected True or False"
        )
        raise_if(
            timeout is not None and not isinstance(timeout, datetime.timedelta),
            TypeError,
            f"timeout={timeout!r}; expected None or a datetime.timedelta",
        )
        raise_if(
            timeout is not None and timeout.total_seconds() <= 0,
            ValueError,
            f"timeout={timeout!r}; expected a positive duration",
        )
        self._distributed = dist.is_available() and dist.is_initialized()
        raise_if(
            process_group is not None and not self._distributed,
            ValueError,
            f"process_group={process_group!r} was given but torch.distributed is not initialized",
        )
        raise_if(
            process_group is not None and not isinstance(process_group, dist.ProcessGroup),
            TypeError,
            f"process_group={process_group!r}; expected a torch.distributed ProcessGroup or None",
        )
        self._files = _attachable(files)
        self.keep, self.async_save = keep, async_save
        self._run: str | None = None  # the run this Checkpointer saves for (set by a load or the first save)
        self._loaded: int | None = None  # the step it loaded: never rotated away
        self._group = process_group
        self._rank = dist.get_rank(process_group) if self._distributed else 0
        self._world_size = dist.get_world_size(process_group) if self._distributed else 1
        self._pending: Future[None] | None = None
        self._async_group: dist.ProcessGroup | None = None
        if async_save:
            if self._distributed:  # a collective: every rank of the world constructs the Checkpointer
                ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
                self._async_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
            # reused across saves: the CPU copies of the state are allocated once
            self._stager = DefaultStager(StagingOptions(torch.cuda.is_available(), False, False, False))
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="litegen-ckpt")

    def save(self, step: int, **statefuls: Any) -> None:
        """Write ``root/step_<step>/`` from the live objects, then point ``latest`` at it."""
        raise_if(not _is_step(step), ValueError, f"step={step!r}; expected an int >= 0")
        adapters = _adapters(statefuls, self._rank)
        self._finish_pending()  # the barrier below also orders it before this save
        self._claim()
        work_dir = self.root / f"step_{step}.{self._run}.tmp"
        problem = None
        if self._rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in [
                    *self.root.glob(f"step_*.{self._run}.tmp"),
                    *self.root.glob("step_*.removing-*.tmp"),
                ]:
                    shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save of this run
            except OSError as error:
                problem = error
        agree(problem, self._group)
        state = {name: adapter.state_dict() for name, adapter in adapters.items()}
        start = time.perf_counter()
        writer = DigestingWriter(work_dir)
        if self.async_save:
            upload = dcp.async_save(
                state,
                storage_writer=writer,
                process_group=self._async_group,
                async_stager=self._stager,
                no_dist=not self._distributed,
            )
            self._pending = self._executor.submit(self._finish, upload, step, writer, sorted(state))
            self._log(
                f"step {step}: state staged in {time.perf_counter() - start:.2f} s, writing in the background"
            )
            return
        try:
            with single_process_quiet():
                dcp.save(
                    state, storage_writer=writer, process_group=self._group, no_dist=not self._distributed
                )
        except dcp.CheckpointException as error:
            raise_named_failure(error)
            raise
        checksums = self._write_digests(writer, self._group)
        self._publish_everywhere(step, work_dir, sorted(state), checksums, self._group)
        self._log(
            f"step {step}: saved to {self.root / f'step_{step}'} in {time.perf_counter() - start:.2f} s"
        )

    def load(self, step: int | str = "latest", *, fall_back: bool = False, **statefuls: Any) -> int | None:
        """Load ``step`` (an int, or ``"latest"``) into the live objects; return the step, or None if none exists.

        Every file is checked first (size and checksum); a checkpoint that does not verify raises a
        ``CheckpointError`` (a ``ValueError``) or ``FileNotFoundError`` naming the file. ``fall_back=True``
        (with ``"latest"``): load the newest checkpoint that verifies instead, with one warning naming what was
        skipped. Works whatever the current world size and degree. RNG states are restored only when the world
        size is the one that saved them.
        """
        raise_if(
            step != "latest" and not _is_step(step),
            ValueError,
            f'step={step!r}; expected an int >= 0 or "latest"',
        )
        raise_if(
            not isinstance(fall_back, bool) or (fall_back and step != "latest"),
            ValueError,
            f'fall_back={fall_back!r} with step={step!r}; allowed: False, or True with "latest"',
        )
        adapters = _adapters(statefuls, self._rank)
        self.wait()
        choice: tuple[list[str], list[str]] | BaseException | None = None
        if self._rank == 0:  # one view of the root for every rank, whatever each node's file system shows
            try:
                if fall_back:
                    found, problems = self._candidates()
                else:
                    directory = self._directory(step)
                    found, problems = ([] if directory is None else [directory]), []
                choice = ([d.name for d in found], problems)
            except (FileNotFoundError, CheckpointError) as error:
                choice = error
        choice = self._broadcast(choice)
        if isinstance(choice, BaseException):
            raise type(choice)(str(choice))
        candidates, problems = [self.root / name for name in choice[0]], choice[1]
        for directory in candidates:
            try:
                info = verify_checkpoint(directory, self._group)
                self._load_from(directory, info, adapters)
            except (CheckpointError, FileNotFoundError) as error:
                if not fall_back:
                    raise
                problems.append(str(error))
                continue
            if problems:
                self._log(
                    f"loaded {directory} instead of newer checkpoints that do not verify: "
                    + "; ".join(problems),
                    logging.WARNING,
                )
            else:
                self._log(f"step {info['step']}: loaded from {directory}")
            self._run, self._loaded = _run_of(info), info["step"]
            return info["step"]
        if problems:
            raise CheckpointError(f"no checkpoint under {self.root} verifies: " + "; ".join(problems))
        return None

    def _load_from(self, directory: Path, info: dict[str, Any], adapters: dict[str, Adapter]) -> None:
        """Read a checkpoint whose files were checked into the live objects; raise if an item does not verify."""
        if info["world_size"] != self._world_size:
            rng = [name for name, adapter in adapters.items() if isinstance(adapter, RNGState)]
            for name in rng:
                self._log(
                    f"{name}: not restored, saved by {info['world_size']} ranks, loading on {self._world_size}",
                    logging.WARNING,
                )
            adapters = {name: adapter for name, adapter in adapters.items() if name not in rng}
        saved = read_metadata(directory)
        state = {name: adapter.template(saved, name) for name, adapter in adapters.items()}
        _check_compatible(state, saved, directory)
        read_checkpoint(
            state, directory, metadata=saved, process_group=self._group, no_dist=not self._distributed
        )
        for name, adapter in adapters.items():
            adapter.load(state[name])

    def wait(self) -> None:
        """Block until a background save is written and published, on every rank."""
        if self._finish_pending():
            self._barrier(self._async_group)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints under ``root``, ascending."""
        return sorted(_step_of(d) for d in _complete_dirs(self.root))

    def close(self) -> None:
        """Finish a background save and free the async resources (the CPU copy, the thread, the group)."""
        self.wait()
        if self.async_save:
            self._stager.close()
            self._executor.shutdown()
            if self._async_group is not None:
                dist.destroy_process_group(self._async_group)
                self._async_group = None

    def _candidates(self) -> tuple[list[Path], list[str]]:
        """The checkpoint ``latest`` names, then the other complete ones of its run, highest step first; and
        what is wrong so far. Without a readable ``latest``: every complete checkpoint, highest step first."""
        problems: list[str] = []
        try:
            candidates = [d for d in [latest_directory(self.root)] if d is not None]
        except FileNotFoundError as error:
            candidates, problems = [], [str(error)]
        if not candidates and not problems and _complete_dirs(self.root):
            problems.append(f"{self.root / LATEST_FILE} is missing")
        latest_info = _info_or_none(candidates[0]) if candidates else None
        run = None if latest_info is None else _run_of(latest_info)  # unknown: every run's steps
        others = (d for d in _complete_dirs(self.root) if d not in candidates)
        candidates += sorted(
            (d for d in others if run is None or _run_of(_info_or_none(d)) == run), key=_step_of, reverse=True
        )
        return candidates, problems

    def _claim(self) -> None:
        """Before the first save of a Checkpointer that loaded nothing: a new run id, in a root no other run uses."""
        if self._run is not None:
            return
        decision: tuple[str, str] | None = None
        if self._rank == 0:
            complete = sorted(_complete_dirs(self.root), key=_step_of)
            unfinished = (
                sorted(d.name for d in self.root.glob("step_*.tmp") if ".removing-" not in d.name)
                if self.root.is_dir()
                else []
            )
            if complete or unfinished:
                runs = sorted({_run_of(_info_or_none(d)) for d in complete})
                decision = (
                    "error",
                    f"root={str(self.root)!r} holds another run's checkpoints (steps {[_step_of(d) for d in complete]}, "
                    f"runs {runs}) or unfinished saves {unfinished}; load one first to continue that run (the facade: "
                    "auto_resume or resume_from), or give this run a root of its own",
                )
            else:
                decision = ("run", uuid.uuid4().hex[:12])
        kind, value = self._broadcast(decision)
        if kind == "error":
            raise ValueError(value)
        self._run = value

    def _broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank of the group."""
        if not self._distributed or self._world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, group_src=0, group=self._group)
        return box[0]

    def _directory(self, step: int | str) -> Path | None:
        if step == "latest":
            return latest_directory(self.root)
        directory = self.root / f"step_{step}"
        if not (directory / INFO_FILE).is_file():
            raise FileNotFoundError(
                f"step={step}: no complete checkpoint {directory}; complete steps: {self.steps()}"
            )
        return directory

    def _finish_pending(self) -> bool:
        """Wait for this rank's background save (rank 0 publishes it); return whether there was one."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        return pending is not None

    def _finish(self, upload: Future, step: int, writer: DigestingWriter, names: list[str]) -> None:
        try:
            upload.result()
        except dcp.CheckpointException as error:
            raise_named_failure(error)
            raise
        checksums = self._write_digests(writer, self._async_group)
        self._publish_everywhere(step, Path(writer.path), names, checksums, self._async_group)

    def _publish_everywhere(
        self,
        step: int,
        work_dir: Path,
        names: list[str],
        checksums: dict[str, str],
        group: dist.ProcessGroup | None,
    ) -> None:
        """Rank 0 publishes; a failure there (a full disk) is raised on every rank."""
        problem = None
        if self._rank == 0:
            try:
                self._publish(step, work_dir, names, checksums)
            except OSError as error:
                problem = disk_full(error, work_dir) or error
        agree(problem, group)

    def _write_digests(self, writer: DigestingWriter, group: dist.ProcessGroup | None) -> dict[str, str]:
        """Each rank writes the checksums of the items it wrote; return ``{digest file: CRC-32}`` of all ranks."""
        name = crc = problem = None
        try:
            name, crc = writer.write_digest_file(self._rank)
        except OSError as error:
            problem = disk_full(error, Path(writer.path)) or error
        agree(problem, group)
        if not self._distributed:
            return {name: crc}
        gathered: list[tuple[str, str] | None] = [None] * self._world_size
        dist.all_gather_object(gathered, (name, crc), group=group)
        return dict(part for part in gathered if part is not None)

    def _publish(self, step: int, work_dir: Path, names: list[str], checksums: dict[str, str]) -> None:
        """Rank 0, after every rank wrote its shards: record the files, rename, move ``latest``, rotate."""
        checksums = {**checksums, METADATA_FILE: _crc32(work_dir / METADATA_FILE)}
        for name, data in self._files.items():
            write_durably(work_dir / name, data)
            checksums[name] = f"{zlib.crc32(data):08x}"
        files = {p.name: p.stat().st_size for p in sorted(work_dir.iterdir()) if p.is_file()}
        unchecked = {name for name in files if not SHARD_FILE.fullmatch(name)} ^ set(checksums)
        if unchecked:
            raise RuntimeError(f"{work_dir}: no CRC-32 for, or no file of, {sorted(unchecked)}")
        info = {
            "format": FORMAT,
            "step": step,
            "run": self._run,
            "world_size": self._world_size,
            "time": time.time(),
            "litegen_version": _version(),
            "torch_version": torch.__version__,
            "entries": names,
            "files": files,
            "crc32": checksums,
        }
        write_durably(work_dir / INFO_FILE, json.dumps(info, indent=1).encode())
        final = self.root / f"step_{step}"
        mine = [d for d in _complete_dirs(self.root) if _run_of(_info_or_none(d)) == self._run]
        retired = [_discard(d) for d in mine if _step_of(d) > step]  # a rewind: later steps are abandoned
        replaced = _discard(final) if final.exists() else None
        os.replace(work_dir, final)
        _fsync_directory(self.root)  # the complete directory is on disk before latest names it
        write_durably(self.root / f"{LATEST_FILE}.tmp", final.name.encode())
        os.replace(self.root / f"{LATEST_FILE}.tmp", self.root / LATEST_FILE)
        _fsync_directory(self.root)
        mine = sorted(
            (d for d in _complete_dirs(self.root) if _run_of(_info_or_none(d)) == self._run), key=_step_of
        )
        old = mine[: -self.keep] if self.keep else []
        old = [d for d in old if d != final and _step_of(d) != self._loaded]
        for directory in [replaced, *retired, *(_discard(d) for d in old)]:
            if directory is not None:  # deleting GBs takes a while: off the training loop's path
                threading.Thread(
                    target=shutil.rmtree, args=(directory,), kwargs={"ignore_errors": True}
                ).start()

    def _barrier(self, group: dist.ProcessGroup | None) -> None:
        if self._distributed:
            dist.barrier(group=group)

    def _log(self, message: str, level: int = logging.INFO) -> None:
        if self._rank == 0:
            logger.log(level, message)


def latest_directory(root: Path) -> Path | None:
    """The checkpoint directory ``root/latest`` names, or None when there is none."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    directory = root / name
    if not STEP_DIR.fullmatch(name) or not directory.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
    if not (directory / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"{pointer} names {name!r}, which is not a complete checkpoint: {directory / INFO_FILE} is missing"
        )
    return directory


def verify_checkpoint(directory: Path, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Read ``litegen.json``; check every file it lists exists with its recorded size, and the recorded CRC-32s.

    The shards' bytes are checked as they are read (``storage.VerifyingReader``). Under torch.distributed every
    rank of ``group`` must call it: each reads its share of the files and all raise the same error. Returns the
    parsed ``litegen.json``.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    info: dict[str, Any] = {}
    problem: tuple[str, str] | None = None
    try:
        info = _read_info(directory)
        _check_files(directory, info, rank, world)
    except (ValueError, FileNotFoundError) as error:
        problem = (type(error).__name__, str(error))
    if distributed and world > 1:
        problems: list[tuple[str, str] | None] = [None] * world
        dist.all_gather_object(problems, problem, group=group)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        kind, message = problem
        raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(message)
    return info


def _read_info(directory: Path) -> dict[str, Any]:
    path = directory / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a complete checkpoint")
    try:
        info = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}): the checkpoint's index is garbled"
        ) from error
    fields = {"step": int, "world_size": int, "files": dict}
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in fields.items()):
        raise CheckpointError(
            f"{path} lacks valid {sorted(fields)} fields: the checkpoint's index is garbled"
        )
    version = info.get("format", FORMAT)  # checkpoints from before the field are format 1
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"{path} has format {version!r}, written by a newer LiteGen ({info.get('litegen_version')}); this "
            f"litegen-ckpt ({_version()}) reads formats up to {FORMAT}: upgrade LiteGen to read it"
        )
    return info


def _attachable(files: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """Check ``files=``: plain names that no checkpoint file of ours or DCP's takes, with bytes values."""
    if files is None:
        return {}
    raise_if(
        not isinstance(files, Mapping),
        TypeError,
        f"files={type(files).__name__}; expected a mapping of file name -> bytes, or None",
    )
    for name, data in files.items():
        raise_if(
            not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name),
            ValueError,
            f"files: name {name!r}; allowed: a plain file name of letters, digits, '_', '.', '-'",
        )
        raise_if(
            name in (INFO_FILE, METADATA_FILE) or SHARD_FILE.fullmatch(name) or DIGEST.fullmatch(name),
            ValueError,
            f"files: name {name!r} is a checkpoint file of LiteGen's or DCP's; choose another",
        )
        raise_if(
            not isinstance(data, bytes), TypeError, f"files[{name!r}]={type(data).__name__}; expected bytes"
        )
    return dict(files)


def _check_files(directory: Path, info: dict[str, Any], rank: int, world: int) -> None:
    """Sizes of every listed file; CRC-32 (recorded for all but the shards) of this rank's share of them."""
    checksums = info.get("crc32", {})
    for index, (name, size) in enumerate(sorted(info["files"].items())):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} is missing (listed in {INFO_FILE})")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {path} has {path.stat().st_size} bytes but {INFO_FILE} records {size}: "
                "it was truncated or modified"
            )
        raise_if(
            index % world == rank and name in checksums and _crc32(path) != checksums[name],
            CheckpointError,
            f"checkpoint file {path} does not match the CRC-32 {INFO_FILE} records: it was modified, "
            "or comes from another checkpoint",
        )


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _adapters(statefuls: dict[str, Any], rank: int) -> dict[str, Adapter]:
    """Classify the keyword statefuls; raise on anything that cannot be checkpointed."""
    raise_if(
        not statefuls, ValueError, "no statefuls given; pass e.g. model=model, optimizer=optimizer, rng=True"
    )
    models = [name for name, obj in statefuls.items() if isinstance(obj, nn.Module)]
    adapters: dict[str, Adapter] = {}
    for name, obj in statefuls.items():
        if isinstance(obj, torch.optim.Optimizer):
            if len(models) != 1:
                raise TypeError(
                    f"{name}= is an optimizer: pass exactly one nn.Module in the same call (the model it "
                    f"optimizes), got {len(models)}: {models}"
                )
            model = statefuls[models[0]]
            zero = isinstance(obj, ZeroRedundancyOptimizer)
            adapters[name] = ZeroOptimizerState(model, obj) if zero else OptimizerState(model, obj)
        elif isinstance(obj, nn.Module):
            adapters[name] = ModelState(obj)
        elif name == "rng" and isinstance(obj, bool):
            if obj:
                adapters[name] = RNGState(rank)
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            adapters[name] = StatefulState(obj)
        else:
            raise TypeError(
                f"{name}={type(obj).__name__}: expected an nn.Module, a torch Optimizer, rng=True/False, "
                "or an object with state_dict() and load_state_dict()"
            )
    return adapters


def _is_step(step: Any) -> bool:
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


def _check_compatible(state: dict[str, Any], saved: Metadata, directory: Path) -> None:
    """Every live tensor must exist in the checkpoint with the same (global) shape."""
    flat, _ = flatten_state_dict(state)
    missing = [key for key in flat if key not in saved.state_dict_metadata]
    if missing:
        held = sorted({key.split(".")[0] for key in saved.state_dict_metadata})
        raise ValueError(
            f"checkpoint {directory} lacks {len(missing)} entries the live objects need, e.g. {missing[:5]}; "
            f"it holds {held}"
        )
    for key, value in flat.items():
        meta = saved.state_dict_metadata[key]
        if isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata):
            if tuple(value.shape) != tuple(meta.size):
                raise ValueError(
                    f"{key}: checkpoint {directory} holds shape {tuple(meta.size)}, "
                    f"the live tensor has shape {tuple(value.shape)}"
                )


def _complete_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if STEP_DIR.fullmatch(d.name) and (d / INFO_FILE).is_file()]


def _info_or_none(directory: Path) -> dict[str, Any] | None:
    """A checkpoint's ``litegen.json``, or None when it cannot be read."""
    try:
        info = json.loads((directory / INFO_FILE).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _run_of(info: dict[str, Any] | None) -> str:
    """The run a checkpoint belongs to: checkpoints written before run ids all count as one run, "legacy"."""
    run = (info or {}).get("run")
    return run if isinstance(run, str) and re.fullmatch(r"[0-9a-z]{1,32}", run) else LEGACY_RUN


def _step_of(directory: Path) -> int:
    return int(STEP_DIR.fullmatch(directory.name).group(1))


def _discard(directory: Path) -> Path:
    """Rename a checkpoint out of sight (no longer complete, removed by the next save if not before)."""
    return directory.rename(directory.with_name(f"{directory.name}.removing-{uuid.uuid4().hex[:8]}.tmp"))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version() -> str:
    try:
        return package_metadata.version("litegen-ckpt")
    except package_metadata.PackageNotFoundError:  # vendored copy
        return "unknown"
