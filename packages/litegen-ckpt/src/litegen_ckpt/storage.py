"""DCP storage with a checksum per item: the writer records them, the reader checks them on the bytes it reads.

Writing is DCP's ``FileSystemWriter``. Before writing, each rank takes a ``Digest`` of every tensor chunk it writes,
where the tensor lives and at memory speed. After writing, it takes the CRC-32 of every pickled (non-tensor) item.
It keeps both in ``digests_<rank>.json``.

Reading is DCP's ``FileSystemReader`` with ``read_metadata`` and ``read_data`` replaced. Each tensor chunk is read
with one ``readinto``: into its destination when the layouts allow (a load at the saving world size and degree),
else into a CPU buffer that is then narrowed and copied. Each piece is digested while it is still in cache, so a
modified or foreign shard raises a ``CheckpointError`` naming the file and the tensor, with no extra pass over the
checkpoint.

Nothing read runs code. DCP unpickles ``.metadata`` and loads python values with ``torch.load(weights_only=False)``;
here ``.metadata`` goes through an unpickler that only builds DCP's own metadata classes, torch dtypes, sizes and
paths (``read_metadata``), and python values (optimizer hyper-parameters, RNG and loader states) through
``torch.load(weights_only=True)`` (``SafeLoadPlanner``): a crafted checkpoint fails with a ``CheckpointError``.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # DCP's file names: __<rank in the group>_<index>.distcp
DIGEST_FILE = "digests_{rank}.json"
BLOCK = 4096  # bytes per digest block
PIECE = 8 << 20  # bytes read, then digested while in cache, at a time (a multiple of BLOCK)
_MASK = (1 << 64) - 1
FULL_BYTES = 1 << 20  # a failed write with less than this free on the device is a full disk


class CheckpointError(ValueError):
    """A checkpoint on disk is incomplete or corrupted; the message names the file."""


class Digest:
    """A checksum of bytes fed in order, in pieces of whole 4 KiB blocks (only the last piece may end mid-block).

    Each block (the last zero-padded) is read as 512 little-endian 64-bit words; ``s_i`` is their sum. The digest
    is the byte count, ``sum(s_i)`` and ``sum((i + 1) * s_i)``, all mod 2**64. torch's integer sums compute it at
    memory speed, on CPU or GPU, and one extra in-cache pass costs little on a load. Any changed word changes it,
    as do missing, foreign or reordered blocks; a random change goes unseen with probability about 2**-64. Words
    swapped within one block go unseen, which no storage failure does. It guards against accidents, not
    tampering.
    """

    def __init__(self) -> None:
        self._sums: list[torch.Tensor] = []  # per piece: the word sums of its blocks
        self._bytes = 0
        self._ended = False

    def update(self, data: torch.Tensor) -> Digest:
        """Feed the next bytes, a 1-D uint8 tensor ``(n,)`` on any device."""
        raise_if(self._ended, RuntimeError, "Digest.update after a piece that ended mid-block")
        whole = data.numel() // BLOCK * BLOCK
        if whole:
            body = data[:whole]
            if body.storage_offset() % 8:  # int64 words need 8-byte alignment
                body = body.clone()
            self._sums.append(body.view(torch.int64).view(-1, BLOCK // 8).sum(1))
        if whole < data.numel():
            last = torch.nn.functional.pad(data[whole:], (0, whole + BLOCK - data.numel()))  # zero-padded
            self._sums.append(last.view(torch.int64).sum(0, keepdim=True))
            self._ended = True
        self._bytes += data.numel()
        return self

    def hexdigest(self) -> str:
        sums = torch.cat(self._sums) if self._sums else torch.zeros(1, dtype=torch.int64)
        weights = torch.arange(1, sums.numel() + 1, device=sums.device)
        total, weighted = torch.stack([sums.sum(), (sums * weights).sum()]).tolist()
        return f"{self._bytes:x}:{total & _MASK:016x}{weighted & _MASK:016x}"


def tensor_digest(tensor: torch.Tensor) -> str:
    """The digest of a tensor's values in row-major order: the bytes DCP writes for it."""
    return Digest().update(_bytes_of(tensor.detach().contiguous())).hexdigest()


class DigestingWriter(dcp.FileSystemWriter):
    """DCP's file writer (one fsync'd file per rank) that records a checksum of every item it writes.

    ``records`` holds ``[fqn, chunk offsets or None, "digest" | "crc32", value]`` for this rank's items;
    ``write_digest_file`` stores them.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.records: list[list[Any]] = []

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        pickled = {item.index for item in plan.items if item.type == WriteItemType.BYTE_IO}
        self.records += [  # every tensor, where it lives, before it is written
            _record(item.index, "digest", tensor_digest(planner.resolve_data(item)))
            for item in plan.items
            if item.index not in pickled
        ]
        # torch.save's zip writer reports a full disk as a RuntimeError
        with naming_a_full_disk(Path(self.path), (OSError, RuntimeError)):
            written = super().write_data(plan, _Contiguous(planner))
        # torch.save's bytes of a python object vary (an id): read them back, each file once
        results = sorted(
            (r for r in written.wait() if r.index in pickled), key=lambda r: r.storage_data.relative_path
        )
        for relative_path, in_file in groupby(results, key=lambda r: r.storage_data.relative_path):
            with open(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for result in in_file:
                    stream.seek(result.storage_data.offset)
                    crc = zlib.crc32(stream.read(result.storage_data.length))
                    self.records.append(_record(result.index, "crc32", f"{crc:08x}"))
        return written

    def write_digest_file(self, rank: int) -> tuple[str, str]:
        """Write ``digests_<rank>.json`` (fsync'd) next to the shards; return its name and CRC-32."""
        name = DIGEST_FILE.format(rank=rank)
        data = json.dumps({"items": self.records}).encode()
        with naming_a_full_disk(Path(self.path)):
            write_durably(Path(self.fs.concat_path(self.path, name)), data)
        return name, f"{zlib.crc32(data):08x}"


class _Contiguous:
    """A save planner whose tensors are contiguous: DCP then writes each one's bytes in row-major order."""

    def __init__(self, planner: SavePlanner) -> None:
        self._planner = planner

    def resolve_data(self, item: Any) -> Any:
        data = self._planner.resolve_data(item)
        return data.contiguous() if isinstance(data, torch.Tensor) else data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


# What ``.metadata`` may build: DCP's metadata classes and the plain torch / pathlib values inside them.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): dict,
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only ``_METADATA_CLASSES`` and torch dtypes; anything else is refused before it is created."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return _METADATA_CLASSES[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The DCP metadata of the checkpoint in ``directory``, unpickled with an allow-list (no code runs)."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle raises many kinds on a garbled or crafted file
        raise CheckpointError(
            f"checkpoint file {path} is not DCP metadata LiteGen can read safely ({type(error).__name__}: "
            f"{error}); it was not loaded"
        ) from None
    raise_if(
        not isinstance(metadata, Metadata),
        CheckpointError,
        f"checkpoint file {path} holds a {type(metadata).__name__}, not DCP metadata",
    )
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but python values are loaded with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as error:  # weights_only refuses every type it does not know, each its own way
            raise CheckpointError(
                f"checkpoint item {fqn} is not a plain python value ({type(error).__name__}: {error}); it was "
                "not loaded"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class VerifyingReader(dcp.FileSystemReader):
    """DCP's file reader that reads tensors with one copy and checks every item against ``digests_<rank>.json``.

    The digest files must have been verified first (``Checkpointer`` checks their CRC-32 before reading).
    ``metadata``: the checkpoint's, if already read (it is not read again).
    """

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata
        self._expected: dict[int, dict[tuple[str, tuple[int, ...] | None], tuple[str, str]]] = {}
        self._chunks: dict[MetadataIndex, tuple[torch.Size, torch.dtype]] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_metadata(self.path)
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._chunks = {
            MetadataIndex(fqn, chunk.offsets): (chunk.sizes, entry.properties.dtype)
            for fqn, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
            for chunk in entry.chunks
        }

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        items = sorted(plan.items, key=lambda item: self._place(item.storage_index))  # sequential reads
        for relative_path, in_file in groupby(items, key=lambda item: self._place(item.storage_index)[0]):
            path = Path(self.fs.concat_path(self.path, relative_path))
            with self.fs.create_stream(path, "rb") as stream:
                for item in in_file:
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(
                            item, io.BytesIO(self._read_item(stream, path, item.storage_index))
                        )
                    else:
                        self._read_tensor(stream, path, item, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def problems(self) -> Iterator[str]:
        """Check every item of the checkpoint against its recorded checksum, one chunk in memory at a time; yield
        one message per item that fails (naming the file and the tensor) or per file that cannot be read."""
        self.set_up_storage_reader(self.read_metadata(), True)
        ordered = sorted(self.storage_data, key=self._place)
        for relative_path, in_file in groupby(ordered, key=lambda index: self._place(index)[0]):
            path, indices = Path(self.fs.concat_path(self.path, relative_path)), list(in_file)
            try:
                stream = open(path, "rb")  # noqa: SIM115 - closed below, a missing file is one problem
            except OSError as error:
                yield f"checkpoint file {path} cannot be read ({error}): {len(indices)} items are unchecked"
                continue
            with stream:
                for index in indices:
                    try:
                        self._read_item(stream, path, index)
                    except (CheckpointError, FileNotFoundError) as error:
                        yield str(error)

    def _place(self, index: MetadataIndex) -> tuple[str, int]:
        """Where a saved item lies: its file and offset."""
        info = self.storage_data[index]
        return info.relative_path, info.offset

    def _read_tensor(self, stream: IO[bytes], path: Path, item: ReadItem, planner: LoadPlanner) -> None:
        """Read one tensor request (a region of a saved chunk) into its destination: straight into it where it is
        the whole chunk, on CPU, contiguous and of the saved dtype; else the chunk is read whole, then copied."""
        index, target = item.storage_index, planner.resolve_tensor(item).detach()
        shape, dtype = self._chunks[index]
        whole = list(item.storage_offsets) == [0] * len(shape) and list(item.lengths) == list(shape)
        direct = whole and target.device.type == "cpu" and target.is_contiguous() and target.dtype == dtype
        chunk = self._read_item(stream, path, index, target if direct else None)
        if chunk is not target:
            source = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
            if source.shape != target.shape:
                raise CheckpointError(
                    f"checkpoint file {path}: {index.fqn} at {list(item.storage_offsets)} has shape "
                    f"{tuple(source.shape)}, the destination {tuple(target.shape)}"
                )
            target.copy_(source)
        planner.commit_tensor(item, target)

    def _read_item(
        self, stream: IO[bytes], path: Path, index: MetadataIndex, into: torch.Tensor | None = None
    ) -> bytes | torch.Tensor:
        """Read one saved item and check it against its recorded checksum; raise a ``CheckpointError`` if it differs.

        Returns a python value's bytes, or a tensor chunk ``(chunk shape)``: read into ``into`` where given (CPU,
        contiguous, the chunk's shape and dtype) and torch can say where the chunk's bytes lie (``_data_start``).
        """
        info = self.storage_data[index]
        if info.transform_descriptors:
            raise CheckpointError(
                f"checkpoint file {path}: {index.fqn} was written with DCP stream transforms "
                f"{list(info.transform_descriptors)}, which LiteGen does not write"
            )
        expected = self._expectation(index, path)
        if index not in self._chunks:  # a pickled python value
            stream.seek(info.offset)
            data = stream.read(info.length)
            raise_if(
                len(data) != info.length,
                CheckpointError,
                f"checkpoint file {path} ends inside {index.fqn}: it was truncated",
            )
            actual = ("crc32", f"{zlib.crc32(data):08x}")
        elif (start := self._data_start(stream, path, info, index)) is None:  # torch.load it, as DCP does
            try:
                data = torch.load(self._slice_file(stream, info), map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises RuntimeError, pickle.UnpicklingError, ValueError, ...
                raise CheckpointError(
                    f"checkpoint file {path}: the entry of {index.fqn} at byte {info.offset} is not a tensor torch "
                    f"can read ({error}); the file is corrupted"
                ) from error
            if not isinstance(data, torch.Tensor):
                raise CheckpointError(
                    f"checkpoint file {path}: the entry of {index.fqn} at byte {info.offset} holds a "
                    f"{type(data).__name__}, not a tensor; the file is corrupted"
                )
            actual = ("digest", tensor_digest(data))
        else:
            shape, dtype = self._chunks[index]
            data = torch.empty(shape, dtype=dtype) if into is None else into
            actual = ("digest", _read_into(stream, start, _bytes_of(data), path, index))
        raise_if(
            actual != expected,
            CheckpointError,
            f"checkpoint file {path} does not match the checksum recorded for {index.fqn} (chunk at "
            f"{None if index.offset is None else list(index.offset)}): it was modified, or comes from another "
            "checkpoint",
        )
        return data

    def _data_start(self, stream: IO[bytes], path: Path, info: Any, index: MetadataIndex) -> int | None:
        """Where a saved chunk's bytes start in the file: the one storage record of its ``torch.save`` entry.

        The chunk was written contiguous (``DigestingWriter``), so those bytes are its values in row-major order,
        as the checkpoint's metadata describes them. None where torch's reader cannot say (older torch): that
        chunk is read with ``torch.load``, as DCP does.
        """
        if not hasattr(torch._C.PyTorchFileReader, "get_record_size"):
            return None
        shape, dtype = self._chunks[index]
        try:
            entry = torch._C.PyTorchFileReader(self._slice_file(stream, info))
            records = [name for name in entry.get_all_records() if name.startswith("data/")]
            offset, size = entry.get_record_offset("data/0"), entry.get_record_size("data/0")
        except RuntimeError as error:
            raise CheckpointError(
                f"checkpoint file {path}: the entry of {index.fqn} at byte {info.offset} is not a tensor torch can "
                f"read ({error}); the file is corrupted"
            ) from error
        if records != ["data/0"] or size != shape.numel() * dtype.itemsize or offset + size > info.length:
            raise CheckpointError(
                f"checkpoint file {path}: the entry of {index.fqn} at byte {info.offset} does not hold "
                f"{tuple(shape)} {dtype} values; the file is corrupted"
            )
        return info.offset + offset

    def _expectation(self, index: MetadataIndex, path: Path) -> tuple[str, str]:
        """The recorded ``(kind, checksum)`` of a saved item, from the digest file of the rank that wrote it."""
        match = SHARD_FILE.fullmatch(self.storage_data[index].relative_path)
        writer = int(match.group(1)) if match else 0
        if writer not in self._expected:
            digest_file = Path(self.fs.concat_path(self.path, DIGEST_FILE.format(rank=writer)))
            try:
                records = json.loads(digest_file.read_bytes())["items"]
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"{digest_file} is missing: the checksums of {path} are unknown"
                ) from error
            self._expected[writer] = {
                (fqn, None if offset is None else tuple(offset)): (kind, value)
                for fqn, offset, kind, value in records
            }
        key = (index.fqn, None if index.offset is None else tuple(index.offset))
        if key not in self._expected[writer]:
            raise CheckpointError(
                f"checkpoint file {path} holds {index.fqn} (chunk at {key[1]}), which "
                f"{DIGEST_FILE.format(rank=writer)} does not record: the file comes from another checkpoint"
            )
        return self._expected[writer][key]


def read_checkpoint(
    state: dict[str, Any],
    directory: Path,
    *,
    metadata: Metadata | None = None,
    process_group: Any = None,
    no_dist: bool = False,
) -> None:
    """``dcp.load`` into ``state`` with a ``VerifyingReader``; a rank's ``CheckpointError`` is raised on every rank."""
    with single_process_quiet(), named_failures():
        dcp.load(
            state,
            storage_reader=VerifyingReader(directory, metadata),
            planner=SafeLoadPlanner(),
            process_group=process_group,
            no_dist=no_dist,
        )


@contextlib.contextmanager
def named_failures() -> Iterator[None]:
    """DCP gathers every rank's failure into one exception: raise the lowest rank's named one, the same everywhere."""
    try:
        yield
    except dcp.CheckpointException as error:
        for _, (failure, _) in sorted(error.failures.items()):
            if isinstance(failure, (CheckpointError, FileNotFoundError)):
                raise type(failure)(str(failure)) from None
        raise


@contextlib.contextmanager
def naming_a_full_disk(path: Path, errors: tuple[type[Exception], ...] = (OSError,)) -> Iterator[None]:
    """Raise a write error of the block as a ``CheckpointError`` naming ``path`` and the free space if the disk is full.

    Full: ``ENOSPC``, or any of ``errors`` with under ``FULL_BYTES`` left on the device (torch's zip writer turns
    ``ENOSPC`` into a ``RuntimeError`` about the file position).
    """
    try:
        yield
    except errors as error:
        folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(folder).free
        if getattr(error, "errno", None) != errno.ENOSPC and free >= FULL_BYTES:
            raise
        raise CheckpointError(
            f"no space left on the device writing {path} ({free} bytes free in {folder}): the save was abandoned "
            "and the previous checkpoint stays latest; free space or save elsewhere"
        ) from error


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def agree(problem: BaseException | None, group: Any = None, value: Any = None) -> list[Any]:
    """Every rank passes its own problem (or None) and a value; every rank raises the lowest rank's problem, as the
    same error, or returns every rank's value, in rank order.

    One ``all_gather_object`` over ``group``: it replaces the barrier after a step one rank may fail alone,
    so the others learn why instead of waiting for the collective timeout.
    """
    mine = (value, None if problem is None else (type(problem).__name__, str(problem)))
    outcomes = [mine] * rank_and_size(group)[1]
    if len(outcomes) > 1:
        dist.all_gather_object(outcomes, mine, group=group)
    first = next((described for _, described in outcomes if described is not None), None)
    if first is not None:  # the same class where it is ours or a builtin one (FileNotFoundError, ...)
        name, message = first
        kind = CheckpointError if name == "CheckpointError" else getattr(builtins, name, None)
        known = isinstance(kind, type) and issubclass(kind, Exception)
        raise (kind(message) if known else RuntimeError(f"{name}: {message}")) from problem
    return [value for value, _ in outcomes]


def each_rank(work: Callable[[], Any] | None, group: Any = None) -> list[Any]:
    """Each rank of ``group`` runs its ``work`` (None: nothing); every rank returns every rank's result, in rank
    order, or raises the lowest rank's error (see ``agree``)."""
    result = problem = None
    try:
        result = None if work is None else work()
    except Exception as error:  # any: the other ranks learn it now, not from a collective timeout
        problem = error
    return agree(problem, group, result)


def on_rank_0(work: Callable[[], Any], group: Any = None) -> Any:
    """Rank 0 of ``group`` runs ``work``; every rank returns its result, or raises its error (see ``agree``)."""
    return each_rank(work if rank_and_size(group)[0] == 0 else None, group)[0]


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process: that is intended without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _record(index: MetadataIndex, kind: str, value: str) -> list[Any]:
    return [index.fqn, None if index.offset is None else list(index.offset), kind, value]


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view ``(nbytes,)``."""
    return tensor.reshape(-1).view(torch.uint8)


def _read_into(stream: IO[bytes], offset: int, dest: torch.Tensor, path: Path, index: MetadataIndex) -> str:
    """Fill the CPU uint8 tensor ``dest`` ``(n,)`` from ``offset`` piece by piece, digesting each; return the digest."""
    digest, size = Digest(), dest.numel()
    if size:
        view = memoryview((ctypes.c_ubyte * size).from_address(dest.data_ptr())).cast("B")
        stream.seek(offset)
        done = digested = 0
        while done < size:
            got = stream.readinto(view[done : min(size, done + PIECE)])
            raise_if(
                not got, CheckpointError, f"checkpoint file {path} ends inside {index.fqn}: it was truncated"
            )
            done += got
            ready = size if done == size else done // BLOCK * BLOCK
            if ready > digested:
                digest.update(dest[digested:ready])
                digested = ready
    return digest.hexdigest()


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())
