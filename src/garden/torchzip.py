"""One tensor out of a PyTorch zip checkpoint (`pytorch_model.bin`) by HTTP range requests.

Pythia's Hub revisions often hold only `.bin` weights. `torch.load` needs the whole file (a local path or
a seekable stream, GBs per revision) and unpickles `data.pkl` itself; to study one matrix across hundreds
of revisions we want only its bytes. A torch checkpoint is a zip of *stored* members, so the central
directory, `data.pkl` and the one storage member can each be fetched by range. `data.pkl` is read by a
restricted unpickler that calls nothing from torch or the file: every allowed global resolves to one of
garden's stand-ins that only records where a tensor's bytes lie (`TensorRecord`).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from garden.errors import GardenError

ReadRange = Callable[[int, int], bytes]  # read(first, last) -> exactly bytes [first, last] of the file

TAIL = 65_536 + 22 + 20 + 56  # longest comment + EOCD + ZIP64 locator + ZIP64 EOCD record
EXTRA_GUESS = 128  # local extra field (torch pads data to 64-byte alignment); fetched with the header
NEAR = 64 * 1024  # a member's data this close to its header is fetched together with the header
WHOLE_STORAGE = 1.05  # fetch (and CRC-check) the whole storage when it is at most this much of the view
LOCAL_HEADER = struct.Struct("<I4xH16xHH")  # signature, method, name length, extra length
CENTRAL_HEADER = struct.Struct("<I4xHH4xIIIHHH8xI")  # sig, flags, method, crc, sizes, n, m, k, offset
EOCD = struct.Struct("<IHHHHIIH")
ZIP64_LOCATOR = struct.Struct("<IIQI")
ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
U32 = 0xFFFFFFFF


class NotTorchZip(GardenError):
    """Not a zip checkpoint (legacy torch format or anything else): the caller downloads the whole file."""


class CorruptMember(GardenError):
    """A member's bytes fail their CRC-32: damaged in transit or on the server (worth fetching again)."""


class UnsafePickle(GardenError):
    """data.pkl asks for a global or opcode garden does not allow; nothing from it was executed."""


@dataclass(frozen=True)
class ZipEntry:
    """One central-directory entry (sizes and offset already widened from ZIP64 fields)."""

    name: str
    local_header_offset: int
    compressed_size: int
    size: int
    method: int
    crc32: int


def read_directory(read: ReadRange, size: int) -> dict[str, ZipEntry]:
    """The central directory, from one read of the file's tail (more only for a huge directory)."""
    if size < EOCD.size:
        raise NotTorchZip(f"{size} bytes is too short for a zip archive")
    tail_start = size - min(size, TAIL)
    tail = read(tail_start, size - 1)
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0 and not (
        pos + EOCD.size <= len(tail) and pos + EOCD.size + EOCD.unpack_from(tail, pos)[7] == len(tail)
    ):
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    if pos < 0:
        raise NotTorchZip("no zip end-of-central-directory record (a legacy torch file?)")

    def span(first: int, length: int) -> bytes:
        if first < 0 or first + length > size:
            raise GardenError(f"zip structure at {first}+{length} lies outside the {size}-byte file")
        if first >= tail_start:
            return tail[first - tail_start : first - tail_start + length]
        return read(first, first + length - 1) if length else b""

    _, _, _, _, count, cd_size, cd_offset, _ = EOCD.unpack_from(tail, pos)
    cd_end = tail_start + pos
    if pos >= ZIP64_LOCATOR.size and tail[pos - 20 : pos - 16] == b"PK\x06\x07":
        cd_end = ZIP64_LOCATOR.unpack_from(tail, pos - 20)[2]
        record = ZIP64_EOCD.unpack(span(cd_end, ZIP64_EOCD.size))
        if record[0] != 0x06064B50:
            raise GardenError(f"bad ZIP64 end-of-central-directory record at {cd_end}")
        count, cd_size, cd_offset = record[7:10]
    if cd_offset + cd_size > cd_end:
        raise GardenError(f"central directory {cd_offset}+{cd_size} overruns its end record at {cd_end}")
    cd = span(cd_offset, cd_size)
    entries: dict[str, ZipEntry] = {}
    at = 0
    for _ in range(count):
        if at + CENTRAL_HEADER.size > len(cd) or cd[at : at + 4] != b"PK\x01\x02":
            raise GardenError(f"central directory entry {len(entries)} is truncated or corrupt")
        _, flags, method, crc, csize, usize, n, m, k, offset = CENTRAL_HEADER.unpack_from(cd, at)
        name = cd[at + 46 : at + 46 + n].decode("utf-8" if flags & 0x800 else "cp437")
        extra = cd[at + 46 + n : at + 46 + n + m]
        usize, csize, offset = _zip64_fields(extra, usize, csize, offset)
        if offset + LOCAL_HEADER.size + n + csize > cd_offset:
            raise GardenError(f"zip member {name} ({offset}+{csize}) overlaps the directory at {cd_offset}")
        entries[name] = ZipEntry(name, offset, csize, usize, method, crc)
        at += 46 + n + m + k
    return entries


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF sizes/offset by the ZIP64 extended-information field (0x0001), in spec order."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            usize = next(values) if usize == U32 else usize
            csize = next(values) if csize == U32 else csize
            offset = next(values) if offset == U32 else offset
        at += 4 + length
    return usize, csize, offset


def _local_data_start(header: bytes, entry: ZipEntry, at: int = 0) -> int:
    """Offset of the data from the local header (30 + name + local extra; the extra differs from the CD's)."""
    sig, method, n, m = LOCAL_HEADER.unpack_from(header, at)
    if sig != 0x04034B50:
        raise CorruptMember(f"no local header for zip member {entry.name} at {entry.local_header_offset}")
    if method != 0 or entry.method != 0:
        raise GardenError(f"zip member {entry.name} is compressed (method {method}); torch stores members")
    return LOCAL_HEADER.size + n + m


def data_offset(read: ReadRange, entry: ZipEntry) -> int:
    """Absolute offset of a member's data, from one read of its 30-byte local header."""
    offset = entry.local_header_offset
    return offset + _local_data_start(read(offset, offset + LOCAL_HEADER.size - 1), entry)


@dataclass(frozen=True, slots=True)  # slots: a pickle BUILD cannot rewrite a record's fields
class TensorRecord:
    """Where one tensor's elements lie: a storage member, its dtype, and the strided view into it."""

    storage_key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements of dtype
    metadata: dict[str, bool] = field(default_factory=dict)  # conj / neg bits, as torch.load applies


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: torch.dtype


_TENSOR_TYPE = object()  # torch.Tensor / Parameter as `_rebuild_from_type_v2`'s new_type
TORCH_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
LEGACY_STORAGES = {
    "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8,
    "Byte": torch.uint8, "Bool": torch.bool, "ComplexDouble": torch.complex128,
    "ComplexFloat": torch.complex64,
}  # fmt: skip
SAFE_OPCODES = {op.name for op in pickletools.opcodes} - {
    "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER",
}  # fmt: skip


def _record(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any, metadata: Any) -> TensorRecord:
    shape, stride = tuple(size), tuple(stride)
    ok = (
        isinstance(storage, _Storage)
        and isinstance(dtype, torch.dtype)
        and isinstance(offset, int)
        and offset >= 0
        and len(shape) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in shape + stride)
        and isinstance(metadata, dict | None)
        and all(k in ("conj", "neg") and isinstance(v, bool) for k, v in (metadata or {}).items())
    )
    if not ok:
        raise GardenError(f"data.pkl holds a malformed tensor record ({storage!r}, {offset!r}, {size!r})")
    return TensorRecord(storage.key, dtype, shape, stride, offset, dict(metadata or {}))


class _RecordingUnpickler(pickle.Unpickler):
    """Resolves only allowlisted names, each to a stand-in; never imports or calls torch or the file."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.allowed: dict[str, Any] = {
            "collections.OrderedDict": OrderedDict,
            "torch.Size": tuple,
            "torch.Tensor": _TENSOR_TYPE,
            "torch.nn.parameter.Parameter": _TENSOR_TYPE,
            "torch.storage.UntypedStorage": _StorageType(torch.uint8),
            "torch.UntypedStorage": _StorageType(torch.uint8),
            "torch._utils._rebuild_tensor": self.rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor,
            "torch._utils._rebuild_tensor_v3": self.rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self.rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self.rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": self.rebuild_from_type_v2,
        }
        self.allowed |= {f"torch.{k}Storage": _StorageType(v) for k, v in LEGACY_STORAGES.items()}
        self.allowed |= {f"torch.{name}": dtype for name, dtype in TORCH_DTYPES.items()}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[f"{module}.{name}"]
        except KeyError:
            raise UnsafePickle(
                f"data.pkl asks for {module}.{name}, which is not on garden's allowlist; "
                "nothing from the pickle was executed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickle(f"data.pkl has an unexpected persistent id {pid!r}; nothing was executed")
        _, kind, key, _, numel = pid
        key = key.decode() if isinstance(key, bytes) else key
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and isinstance(numel, int)):
            raise GardenError(f"data.pkl has a malformed storage id {pid!r}")
        return _Storage(key, kind.dtype)

    def rebuild_tensor(self, *args: Any) -> TensorRecord:
        """_rebuild_tensor(storage, offset, size, stride) and _v2(..., grad, hooks, metadata=None)."""
        storage, offset, size, stride, *rest = args
        metadata = rest[2] if len(rest) > 2 else None
        return _record(storage, offset, size, stride, getattr(storage, "dtype", None), metadata)

    def rebuild_tensor_v3(self, *args: Any) -> TensorRecord:
        """(storage, offset, size, stride, grad, hooks, dtype, metadata=None) on an UntypedStorage."""
        storage, offset, size, stride, _, _, dtype, *metadata = args
        return _record(storage, offset, size, stride, dtype, metadata[0] if metadata else None)

    def rebuild_parameter(self, data: Any, *_: Any) -> TensorRecord:
        if not isinstance(data, TensorRecord):
            raise GardenError(f"data.pkl wraps {type(data).__name__} in a Parameter")
        return data

    def rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> TensorRecord:
        allowed = (self.rebuild_tensor, self.rebuild_tensor_v3, self.rebuild_parameter)
        if new_type is not _TENSOR_TYPE or func not in allowed or not isinstance(args, tuple):
            raise GardenError("data.pkl rebuilds a tensor subclass garden cannot read")
        return func(*args)


def tensor_records(pickle_bytes: bytes) -> dict[str, TensorRecord]:
    """name -> TensorRecord of a state dict's data.pkl, without executing anything from it."""
    try:
        for op, _, pos in pickletools.genops(pickle_bytes):
            if op.name not in SAFE_OPCODES:
                raise UnsafePickle(f"data.pkl uses pickle opcode {op.name} at {pos}; nothing was executed")
        state = _RecordingUnpickler(pickle_bytes).load()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, struct.error) as err:
        raise GardenError(f"data.pkl is not a readable state dict: {err}") from err
    if not isinstance(state, dict):
        raise GardenError(f"data.pkl holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, TensorRecord)}


class TorchZipReader:
    """Tensors of one remote checkpoint; caches the directory and records, and logs every range read."""

    def __init__(self, read: ReadRange, size: int) -> None:
        self._read = read
        self.size = size
        self.ranges: list[tuple[int, int]] = []  # (first, last) of every read, in order
        self._directory: dict[str, ZipEntry] | None = None
        self._records: dict[str, TensorRecord] | None = None
        self._data_offsets: dict[str, int] = {}
        self.prefix = ""
        self.big_endian = False

    @property
    def bytes_read(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def read(self, first: int, last: int) -> bytes:
        """The caller's read, checked for length (a short body must never become a tensor)."""
        body = self._read(first, last)
        self.ranges.append((first, last))
        if len(body) != last - first + 1:
            raise GardenError(f"read of bytes {first}-{last} returned {len(body)} bytes")
        return body

    @property
    def directory(self) -> dict[str, ZipEntry]:
        if self._directory is None:
            self._directory = read_directory(self.read, self.size)
        return self._directory

    @property
    def records(self) -> dict[str, TensorRecord]:
        """All tensors of data.pkl; fetched together with `byteorder` when that member sits near it."""
        if self._records is None:
            pickles = [n for n in self.directory if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise NotTorchZip(f"a zip archive but not a torch checkpoint (data.pkl members: {pickles})")
            self.prefix = pickles[0].removesuffix("/data.pkl")
            pkl = self.directory[pickles[0]]
            order = self.directory.get(f"{self.prefix}/byteorder")
            bodies: dict[str, bytes | memoryview] = {}
            if order is not None:
                lo = min(pkl.local_header_offset, order.local_header_offset)
                hi = min(self.size, max(self._guess_end(e, e.size) for e in (pkl, order)))
                if hi - lo <= pkl.size + NEAR:  # one read for both
                    buf = self.read(lo, hi - 1)
                    for entry in (pkl, order):
                        if (body := self._slice(entry, 0, entry.size, buf, lo)) is not None:
                            bodies[entry.name] = self._verified(entry, body)
                marker = bodies.get(order.name) or self._member(order, 0, order.size, verify=True)
                if marker not in (b"little", b"big"):
                    raise GardenError(f"{order.name} says {bytes(marker[:20])!r}, not 'little' or 'big'")
                self.big_endian = marker == b"big"
            data = bodies.get(pkl.name) or self._member(pkl, 0, pkl.size, verify=True)
            self._records = tensor_records(bytes(data))
        return self._records

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as torch.load gives it (dtype, shape, stride, values), from few bytes."""
        record = self.records.get(name)
        if record is None:
            names = sorted(self.records)
            raise GardenError(f"no tensor {name!r} in this checkpoint; it has {len(names)}, e.g. {names[:8]}")
        key = f"{self.prefix}/data/{record.storage_key}"
        if (entry := self.directory.get(key)) is None:
            raise GardenError(f"tensor {name}: its storage member {key} is missing from the checkpoint")
        dtype, shape, stride = record.dtype, record.shape, record.stride
        if 0 in shape:
            return torch.empty_strided(shape, stride, dtype=dtype)
        width = dtype.itemsize
        first = record.storage_offset
        stop = first + 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if stop * width > entry.size:
            raise GardenError(f"tensor {name} views {stop * width} bytes of {entry.size}-byte {key}")
        if entry.size <= WHOLE_STORAGE * (stop - first) * width:
            raw, base = self._member(entry, 0, entry.size, verify=True), 0
        else:
            raw, base = self._member(entry, first * width, stop * width), first
        flat = torch.frombuffer(bytearray(raw[: len(raw) // width * width]), dtype=torch.uint8)  # one copy
        if self.big_endian and width > 1:
            swap = width // 2 if dtype.is_complex else width
            flat = flat.view(-1, swap).flip(1).reshape(-1)
        tensor = torch.as_strided(flat.view(dtype), shape, stride, first - base)
        if record.metadata:
            torch._utils.set_tensor_metadata(tensor, record.metadata)
        return tensor

    def layout(self) -> dict:
        """What a later reader needs to fetch any tensor without reading the directory and data.pkl again,
        as plain JSON (garden keeps it in its Hub manifest, so offline runs can name and shape tensors)."""
        records = self.records
        keys = {f"{self.prefix}/data/{r.storage_key}" for r in records.values()}
        return {
            "format": "torch-zip",
            "prefix": self.prefix,
            "big_endian": self.big_endian,
            "tensors": {
                name: {
                    "storage_key": r.storage_key,
                    "dtype": str(r.dtype).removeprefix("torch."),
                    "shape": list(r.shape),
                    "stride": list(r.stride),
                    "storage_offset": r.storage_offset,
                    "metadata": r.metadata,
                }
                for name, r in records.items()
            },
            "members": {
                name: [e.local_header_offset, e.compressed_size, e.size, e.method, e.crc32]
                for name, e in self.directory.items()
                if name in keys
            },
            "data_offsets": {name: offset for name, offset in self._data_offsets.items() if name in keys},
        }

    @classmethod
    def from_layout(cls, read: ReadRange, size: int, layout: dict) -> TorchZipReader:
        """A reader that already knows the layout `layout()` gave: it reads only storage bytes."""
        reader = cls(read, size)
        reader.prefix, reader.big_endian = layout["prefix"], bool(layout["big_endian"])
        reader._directory = {name: ZipEntry(name, *fields) for name, fields in layout["members"].items()}
        reader._records = {
            name: TensorRecord(t["storage_key"], TORCH_DTYPES[t["dtype"]], tuple(t["shape"]),
                               tuple(t["stride"]), int(t["storage_offset"]), dict(t["metadata"]))
            for name, t in layout["tensors"].items()
        }  # fmt: skip
        reader._data_offsets = dict(layout["data_offsets"])
        return reader

    def _guess_end(self, entry: ZipEntry, stop: int) -> int:
        """Where data byte `stop` of a member lies if its local extra field is at most EXTRA_GUESS long."""
        return entry.local_header_offset + LOCAL_HEADER.size + len(entry.name.encode()) + EXTRA_GUESS + stop

    def _slice(self, entry: ZipEntry, start: int, stop: int, buf: bytes, base: int) -> memoryview | None:
        """Data bytes [start, stop) of a member if `buf` (the file from `base`) holds its header and them."""
        at = entry.local_header_offset - base
        if at < 0 or at + LOCAL_HEADER.size > len(buf):
            return None
        self._set_offset(entry, entry.local_header_offset + _local_data_start(buf, entry, at))
        begin = self._data_offsets[entry.name] - base
        return memoryview(buf)[begin + start : begin + stop] if begin + stop <= len(buf) else None

    def _set_offset(self, entry: ZipEntry, offset: int) -> None:
        if offset + entry.compressed_size > self.size:
            raise GardenError(f"zip member {entry.name} runs past the end of the {self.size}-byte file")
        self._data_offsets[entry.name] = offset

    def _member(self, entry: ZipEntry, start: int, stop: int, verify: bool = False) -> bytes | memoryview:
        """Data bytes [start, stop) of a member; read with its local header when they are close."""
        body = None
        if entry.name not in self._data_offsets and start <= NEAR:
            head = entry.local_header_offset
            buf = self.read(head, min(self.size, self._guess_end(entry, stop)) - 1)
            body = self._slice(entry, start, stop, buf, head)
        if body is None:
            if entry.name not in self._data_offsets:
                self._set_offset(entry, data_offset(self.read, entry))
            offset = self._data_offsets[entry.name]
            body = self.read(offset + start, offset + stop - 1) if stop > start else b""
        return self._verified(entry, body) if verify else body

    @staticmethod
    def _verified(entry: ZipEntry, body: bytes | memoryview) -> bytes | memoryview:
        if len(body) != entry.size or zlib.crc32(body) != entry.crc32:
            raise CorruptMember(f"zip member {entry.name} fails its CRC-32 check: the bytes are corrupt")
        return body


def read_tensor(read: ReadRange, size: int, name: str) -> torch.Tensor:
    """One tensor of one remote checkpoint; use TorchZipReader to read several from the same file."""
    return TorchZipReader(read, size).tensor(name)
