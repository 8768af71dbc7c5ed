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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from .statefuls import Adapter, RNGState, adapters
from .storage import (
    SHARD_FILE,
    CheckpointError,
    DigestingWriter,
    agree,
    each_rank,
    named_failures,
    naming_a_full_disk,
    on_rank_0,
    raise_if,
    rank_and_size,
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
        self._rank, self._world_size = rank_and_size(process_group)
        self._pending: Future[None] | None = None
        self._deleting: list[threading.Thread] = []  # old checkpoints being deleted; close() joins them
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
        state_of = adapters(statefuls, self._rank)
        self.wait()
        self._run = on_rank_0(self._prepare_root, self._group)
        state = {name: adapter.state_dict() for name, adapter in state_of.items()}
        start = time.perf_counter()
        writer = DigestingWriter(self.root / f"step_{step}.{self._run}.tmp")
        if self.async_save:
            upload = dcp.async_save(
                state,
                storage_writer=writer,
                process_group=self._async_group,
                async_stager=self._stager,
                no_dist=not self._distributed,
            )
            self._pending = self._executor.submit(
                self._complete, upload.result, step, writer, sorted(state), self._async_group
            )
            self._log(
                f"step {step}: state staged in {time.perf_counter() - start:.2f} s, writing in the background"
            )
        else:
            write = partial(
                dcp.save,
                state,
                storage_writer=writer,
                process_group=self._group,
                no_dist=not self._distributed,
            )
            with single_process_quiet():
                self._complete(write, step, writer, sorted(state), self._group)
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
        state_of = adapters(statefuls, self._rank)
        self.wait()
        # one view of the root for every rank, whatever each node's file system shows
        names, problems = on_rank_0(partial(self._candidates, step, fall_back), self._group)
        for name in names:
            try:
                return self._load_from(self.root / name, state_of, problems)
            except (CheckpointError, FileNotFoundError) as error:
                if not fall_back:
                    raise
                problems.append(str(error))
        if problems:
            raise CheckpointError(f"no checkpoint under {self.root} verifies: " + "; ".join(problems))
        return None

    def _load_from(self, directory: Path, state_of: dict[str, Adapter], skipped: list[str]) -> int:
        """Verify a checkpoint and read it into the live objects; return its step. ``skipped``: what was wrong with
        the newer ones (``fall_back``), for the warning."""
        info = verify_checkpoint(directory, self._group)
        if info["world_size"] != self._world_size:
            rng = [name for name, adapter in state_of.items() if isinstance(adapter, RNGState)]
            for name in rng:
                self._log(
                    f"{name}: not restored, saved by {info['world_size']} ranks, loading on {self._world_size}",
                    logging.WARNING,
                )
            state_of = {name: adapter for name, adapter in state_of.items() if name not in rng}
        saved = read_metadata(directory)
        state = {name: adapter.template(saved, name) for name, adapter in state_of.items()}
        _check_compatible(state, saved, directory)
        read_checkpoint(
            state, directory, metadata=saved, process_group=self._group, no_dist=not self._distributed
        )
        for name, adapter in state_of.items():
            adapter.load(state[name])
        if skipped:
            self._log(
                f"loaded {directory} instead of newer checkpoints that do not verify: " + "; ".join(skipped),
                logging.WARNING,
            )
        else:
            self._log(f"step {info['step']}: loaded from {directory}")
        self._run, self._loaded = _run_of(info), info["step"]
        return info["step"]

    def wait(self) -> None:
        """Block until a background save is written and published, on every rank."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # rank 0 publishes it
            if self._distributed:
                dist.barrier(group=self._async_group)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints under ``root``, ascending."""
        return [_step_of(d) for d in _complete_dirs(self.root)]

    def close(self) -> None:
        """Finish a background save and the deletion of rotated checkpoints; free the async resources (the CPU
        copy, the thread, the group)."""
        self.wait()
        for thread in self._deleting:
            thread.join()
        if self.async_save:
            self._stager.close()
            self._executor.shutdown()
            if self._async_group is not None:
                dist.destroy_process_group(self._async_group)
                self._async_group = None

    def _candidates(self, step: int | str, fall_back: bool) -> tuple[list[str], list[str]]:
        """Rank 0: the checkpoints to try, in order, and what is wrong so far.

        ``step``: that one. ``"latest"``: the one ``latest`` names (none in an empty root); with ``fall_back``,
        then the other complete ones of its run, highest step first (without a readable ``latest``: every
        complete checkpoint, highest step first).
        """
        if step != "latest":
            directory = self.root / f"step_{step}"
            if not (directory / INFO_FILE).is_file():
                raise FileNotFoundError(
                    f"step={step}: no complete checkpoint {directory}; complete steps: {self.steps()}"
                )
            return [directory.name], []
        try:
            latest, problems = latest_directory(self.root), []
        except FileNotFoundError as error:
            if not fall_back:
                raise
            latest, problems = None, [str(error)]
        names = [] if latest is None else [latest.name]
        if not fall_back:
            return names, problems
        latest_info = None if latest is None else _info_or_none(latest)
        run = None if latest_info is None else _run_of(latest_info)  # unknown: every run's steps
        others = [d.name for d in reversed(_complete_dirs(self.root, run)) if d != latest]
        if others and not names and not problems:
            problems.append(f"{self.root / LATEST_FILE} is missing")
        return names + others, problems

    def _prepare_root(self) -> str:
        """Rank 0, before a save: create the root, clear the run's crashed saves and removals left behind; return
        the run's id. The first save of a Checkpointer that loaded nothing starts a new run, in a root no other run
        uses."""
        run = self._run
        if run is None:
            complete = _complete_dirs(self.root)
            unfinished = sorted(d.name for d in self.root.glob("step_*.tmp") if ".removing-" not in d.name)
            if complete or unfinished:
                raise ValueError(
                    f"root={str(self.root)!r} holds another run's checkpoints (steps {[_step_of(d) for d in complete]}, "
                    f"runs {sorted({_run_of(_info_or_none(d)) for d in complete})}) or unfinished saves {unfinished}; "
                    "load one first to continue that run (the facade: auto_resume or resume_from), or give this run "
                    "a root of its own",
                )
            run = uuid.uuid4().hex[:12]
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in [*self.root.glob(f"step_*.{run}.tmp"), *self.root.glob("step_*.removing-*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)
        return run

    def _complete(
        self,
        write: Callable[[], Any],
        step: int,
        writer: DigestingWriter,
        names: list[str],
        group: dist.ProcessGroup | None,
    ) -> None:
        """Finish a save, the same now or in the background: ``write`` (or wait for) every rank's shards, then each
        rank writes the checksums of its items and rank 0 publishes. A failure on any rank is raised on all."""
        with named_failures():
            write()
        checksums = dict(each_rank(partial(writer.write_digest_file, self._rank), group))
        on_rank_0(partial(self._publish, step, Path(writer.path), names, checksums), group)

    def _publish(self, step: int, work_dir: Path, names: list[str], checksums: dict[str, str]) -> None:
        """Rank 0, after every rank wrote its shards: record the files, rename, move ``latest``, rotate."""
        with naming_a_full_disk(work_dir):
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
            # a rewind: the run's later steps are abandoned
            retired = [_discard(d) for d in _complete_dirs(self.root, self._run) if _step_of(d) > step]
            replaced = _discard(final) if final.exists() else None
            os.replace(work_dir, final)
            _fsync_directory(self.root)  # the complete directory is on disk before latest names it
            write_durably(self.root / f"{LATEST_FILE}.tmp", final.name.encode())
            os.replace(self.root / f"{LATEST_FILE}.tmp", self.root / LATEST_FILE)
            _fsync_directory(self.root)
            mine = _complete_dirs(self.root, self._run)
            old = (
                [d for d in mine[: -self.keep] if d != final and _step_of(d) != self._loaded]
                if self.keep
                else []
            )
            self._deleting = [thread for thread in self._deleting if thread.is_alive()]
            for directory in [replaced, *retired, *map(_discard, old)]:
                if directory is not None:  # deleting GBs takes a while: off the training loop's path
                    thread = threading.Thread(
                        target=shutil.rmtree, args=(directory,), kwargs={"ignore_errors": True}
                    )
                    thread.start()
                    self._deleting.append(thread)

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
    rank, world = rank_and_size(group)
    info, problem = {}, None
    try:
        info = _read_info(directory)
        problem = next(file_problems(directory, info, rank, world), None)
    except (ValueError, FileNotFoundError) as error:
        problem = error if isinstance(error, FileNotFoundError) else CheckpointError(str(error))
    agree(problem, group)
    return info


def _read_info(directory: Path) -> dict[str, Any]:
    path = directory / INFO_FILE
    raise_if(
        not path.is_file(), FileNotFoundError, f"{path} is missing: {directory} is not a complete checkpoint"
    )
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


def file_problems(
    directory: Path, info: dict[str, Any], rank: int = 0, world: int = 1
) -> Iterator[CheckpointError | FileNotFoundError]:
    """Each file ``info`` lists that is missing or of another size than recorded, and each of this rank's share of
    them (every ``world``-th, from ``rank``) whose CRC-32 (recorded for all but the shards) differs."""
    checksums = info.get("crc32", {})
    for index, (name, size) in enumerate(sorted(info["files"].items())):
        path = directory / name
        if not path.is_file():
            yield FileNotFoundError(f"checkpoint file {path} is missing (listed in {INFO_FILE})")
        elif path.stat().st_size != size:
            yield CheckpointError(
                f"checkpoint file {path} has {path.stat().st_size} bytes but {INFO_FILE} records {size}: "
                "it was truncated or modified"
            )
        elif index % world == rank and name in checksums and _crc32(path) != checksums[name]:
            yield CheckpointError(
                f"checkpoint file {path} does not match the CRC-32 {INFO_FILE} records: it was modified, "
                "or comes from another checkpoint"
            )


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _is_step(step: Any) -> bool:
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


def _check_compatible(state: dict[str, Any], saved: Metadata, directory: Path) -> None:
    """Every live tensor must exist in the checkpoint with the same (global) shape."""
    flat, _ = flatten_state_dict(state)
    missing = [key for key in flat if key not in saved.state_dict_metadata]
    if missing:
        raise ValueError(
            f"checkpoint {directory} lacks {len(missing)} entries the live objects need, e.g. {missing[:5]}; "
            f"it holds {sorted({key.split('.')[0] for key in saved.state_dict_metadata})}"
        )
    for key, value in flat.items():
        meta = saved.state_dict_metadata[key]
        live = isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata)
        if live and tuple(value.shape) != tuple(meta.size):
            raise ValueError(
                f"{key}: checkpoint {directory} holds shape {tuple(meta.size)}, "
                f"the live tensor has shape {tuple(value.shape)}"
            )


def _complete_dirs(root: Path, run: str | None = None) -> list[Path]:
    """The complete checkpoints under ``root`` (of ``run`` only, if given), by step."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if STEP_DIR.fullmatch(d.name) and (d / INFO_FILE).is_file()]
    return sorted((d for d in found if run is None or _run_of(_info_or_none(d)) == run), key=_step_of)


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
