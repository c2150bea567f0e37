"""Checkpoint formats, written once for files on disk (`garden.series`) and on the Hub (`garden.hub`).

A Hugging Face checkpoint stores its weights in one of four layouts: `model.safetensors`,
`pytorch_model.bin`, or either one sharded with an index (`*.index.json`, whose `weight_map` names the
shard of each tensor). Here are the parts both sources share: which file to read, the safetensors header
and a tensor cut out of its bytes, a zip-format `.bin`'s layout and tensors (by `garden.torchzip`, over
any range reader), and one tensor read out of a whole file.
"""

from __future__ import annotations

import json
import mmap
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from garden import torchzip
from garden.cache import content_hash, file_content_id
from garden.errors import GardenError
from garden.torchzip import ReadRange

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Every file a checkpoint's weights can be read through.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
#: In order of preference: a shard index before a single file (a sharded checkpoint may keep a stale
#: single file beside it), safetensors before `.bin` (no pickle, and a header that is cheap to read).
PREFERENCE = (
    (SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin"), (SAFETENSORS, "safetensors"), (BIN, "bin"),
)  # fmt: skip
INDEXES = (SAFETENSORS_INDEX, BIN_INDEX)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
HEADER_PROBE = 100_000  # one read usually holds the whole header (Pythia's are ~20-40 kB)


def missing_tensor_error(step: int, tensor: str, names: list[str]) -> GardenError:
    listing = "\n  ".join(sorted(names))
    return GardenError(f"step {step}: the checkpoint has no tensor {tensor!r}; it has:\n  {listing}")


def preferred_weights(holds: Callable[[str], bool]) -> tuple[str, str] | None:
    """The file a checkpoint's weights are read through (a shard index or a single file) and its format,
    given which of `WEIGHT_FILES` it `holds`; None when it holds none."""
    return next(((name, fmt) for name, fmt in PREFERENCE if holds(name)), None)


def read_weight_map(path: Path | str, step: int, shown: object) -> dict[str, str]:
    """A shard index's {tensor: shard}; errors name the step and the index as `shown`."""
    try:
        return json.loads(Path(path).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise GardenError(f"step {step}: unreadable shard index {shown}: {err}") from err


@dataclass(frozen=True)
class WeightFiles:
    """How one checkpoint stores its weights: one file, or shards plus an index mapping names to shards."""

    step: int
    folder: Path
    fmt: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None = None

    def file_for(self, tensor: str) -> Path | None:
        if self.weight_map is None:
            return self.files[0]
        shard = self.weight_map.get(tensor)
        return None if shard is None else self.folder / shard

    def tensor_names(self) -> list[str]:
        if self.weight_map is not None:
            return sorted(self.weight_map)
        return sorted(_read_names(self.step, self.fmt, self.files[0]))


def find_weight_files(step: int, folder: Path) -> WeightFiles:
    """Detect the storage format of a step folder (Hugging Face naming), preferring safetensors."""
    found = preferred_weights(lambda name: (folder / name).is_file())
    if found is None:
        raise GardenError(
            f"step {step}: no weights in {folder} (expected {SAFETENSORS}, {SAFETENSORS_INDEX} with shards, "
            f"{BIN} or {BIN_INDEX} with shards)"
        )
    name, fmt = found
    if name not in INDEXES:
        return WeightFiles(step, folder, fmt, (folder / name,))
    weight_map = read_weight_map(folder / name, step, folder / name)
    shards = tuple(folder / shard for shard in sorted(set(weight_map.values())))
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise GardenError(f"step {step}: shard index {folder / name} names missing files {missing}")
    return WeightFiles(step, folder, fmt, shards, weight_map)


# ------------------------------------------------------------------------------------------ safetensors


@contextmanager
def file_reader(path: Path | str) -> Iterator[tuple[ReadRange, int]]:
    """A range reader over a file on disk and the file's size: the reads a remote file gets by HTTP."""
    handle = os.open(path, os.O_RDONLY)
    try:
        yield (lambda first, last: os.pread(handle, last - first + 1, first)), os.fstat(handle).st_size
    finally:
        os.close(handle)


def safetensors_header(read: ReadRange, size: int, step: int, filename: object) -> dict:
    """The JSON header of a safetensors file, with `__data_start__` (where the tensors' bytes begin)
    added; read in one probe when it fits. Errors name the step and the file."""
    if size < 8:
        raise GardenError(f"step {step}: {filename} is {size} bytes: no safetensors")
    probe = read(0, min(HEADER_PROBE, size) - 1)
    length = int.from_bytes(probe[:8], "little")
    if length <= 0 or 8 + length > size:
        raise GardenError(
            f"step {step}: {filename} has an invalid safetensors header length {length} "
            f"(the file is {size} bytes)"
        )
    raw = probe[8 : 8 + length] if 8 + length <= len(probe) else probe[8:] + read(len(probe), 7 + length)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise GardenError(f"step {step}: unreadable safetensors header in {filename}: {err}") from err
    header["__data_start__"] = 8 + length
    return header


def header_names(header: dict) -> list[str]:
    """The tensors a safetensors header lists (not `__metadata__` nor garden's `__data_start__`)."""
    return sorted(name for name in header if not name.startswith("__"))


def safetensors_extent(header: dict, name: str, size: int, step: int, filename: object,
                       on_server: bool = False) -> tuple[int, int]:  # fmt: skip
    """Bytes [first, stop) of the file that hold tensor `name`, checked against the file's size."""
    if name not in header:
        raise missing_tensor_error(step, name, header_names(header))
    begin, end = header[name]["data_offsets"]
    start = header["__data_start__"]
    if not 0 <= begin <= end or start + end > size:
        raise GardenError(
            f"step {step}: the header of {filename} places {name} at bytes {start + begin}-{start + end}, "
            f"beyond the file's {size} bytes: the checkpoint is truncated or damaged"
            + (" on the server" if on_server else "")
        )
    return start + begin, start + end


def safetensors_tensor(read: ReadRange, size: int, header: dict, name: str, step: int, filename: object,
                       on_server: bool = False) -> torch.Tensor:  # fmt: skip
    """Tensor `name` built on its bytes alone (one read, no copy), as its header describes it."""
    first, stop = safetensors_extent(header, name, size, step, filename, on_server)
    entry = header[name]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise GardenError(f"step {step}: {name} has an unsupported dtype {entry['dtype']}")
    raw = read(first, stop - 1) if stop > first else bytearray()
    if not raw:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"])


class MappedSafetensors:
    """One safetensors file opened once (its header read once) whose tensors are mapped from the file's
    pages when asked: no copy, and a tensor's pages are let go when it is dropped, so a pass that takes one
    tensor at a time holds one tensor's pages whatever the file's size. `safe_open().get_tensor` copies
    each tensor into memory of its own, which a whole-model scan re-reading the reference and the previous
    step for every tensor cannot afford."""

    def __init__(self, path: Path | str, step: int, header: dict | None = None):
        """`header`: the file's, already known (a spool file holding a remote file's tensors at their
        offsets has no header bytes of its own)."""
        self.path, self.step = Path(path), step
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            read = lambda a, b: os.pread(self._fd, b - a + 1, a)  # noqa: E731
            self.header = (
                header if header is not None else safetensors_header(read, self.size, step, self.path)
            )
        except BaseException:
            os.close(self._fd)
            raise

    def tensor(self, name: str) -> torch.Tensor:
        first, stop = safetensors_extent(self.header, name, self.size, self.step, self.path)
        entry = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise GardenError(f"step {self.step}: {name} has an unsupported dtype {entry['dtype']}")
        if stop == first:
            return torch.empty(entry["shape"], dtype=dtype)
        base = first - first % mmap.ALLOCATIONGRANULARITY
        # A private (copy-on-write) map: writable as torch wants its buffers, while reads share the page
        # cache; the map lives as long as the tensor (torch.frombuffer holds it).
        pages = mmap.mmap(self._fd, stop - base, offset=base, access=mmap.ACCESS_COPY)
        itemsize = torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(pages, dtype=dtype, count=(stop - first) // itemsize, offset=first - base)
        return flat.reshape(entry["shape"])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ------------------------------------------------------------------------------------------ .bin


def bin_layout(read: ReadRange, size: int) -> dict:
    """Where each tensor of a zip-format `.bin` lies (its directory and data.pkl, read without executing
    anything), as plain JSON; raises `torchzip.NotTorchZip` for a legacy (pre-zip) file."""
    return torchzip.TorchZipReader(read, size).layout()


def bin_tensor(read: ReadRange, size: int, layout: dict, name: str, step: int) -> torch.Tensor:
    """Tensor `name` of a zip-format `.bin` whose `layout` is known: only its storage bytes are read."""
    if name not in layout["tensors"]:
        raise missing_tensor_error(step, name, list(layout["tensors"]))
    return torchzip.TorchZipReader.from_layout(read, size, layout).tensor(name)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a zip-format checkpoint (tensors are paged in only when touched); a legacy (pre-zip)
    one cannot be mapped and is read whole."""
    mmap = zipfile.is_zipfile(path)
    state = torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)
    if not isinstance(state, dict):
        raise GardenError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


# ------------------------------------------------------------------------------------------ whole files


def read_tensor_file(
    step: int, path: Path | str, fmt: str, name: str, own_memory: bool = False
) -> torch.Tensor:
    """One tensor (in its stored dtype) out of a weight file on disk; errors name the step and the path.
    A `.bin` tensor stays on the file's memory map unless `own_memory` (a file in the Hugging Face cache
    may be replaced by a later download)."""
    with _failing_as(f"step {step}: cannot read {name!r} from {path}"):
        if fmt == "safetensors":
            with safe_open(str(path), framework="pt") as handle:
                if name not in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    raise missing_tensor_error(step, name, list(handle.keys()))
                return handle.get_tensor(name)
        state = load_bin(Path(path))
        if name not in state:
            raise missing_tensor_error(step, name, list(state))
        return state[name].clone() if own_memory else state[name]


def read_tensor_from(files: WeightFiles, tensor: str) -> torch.Tensor:
    """Read one tensor (in its stored dtype) from a checkpoint; errors name the step and the path."""
    path = files.file_for(tensor)
    if path is None:
        raise missing_tensor_error(files.step, tensor, files.tensor_names())
    return read_tensor_file(files.step, path, files.fmt, tensor)


def read_tensors_from(files: WeightFiles, names: list[str]) -> dict[str, torch.Tensor]:
    """Several tensors (stored dtypes) of one checkpoint, each file opened once for all of its tensors:
    what a whole-model scan reads per step. Errors name the step, the path and the missing tensor."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        path = files.file_for(name)
        if path is None:
            raise missing_tensor_error(files.step, name, files.tensor_names())
        by_file.setdefault(path, []).append(name)
    found: dict[str, torch.Tensor] = {}
    for path, wanted in by_file.items():
        with _failing_as(f"step {files.step}: cannot read {wanted[0]!r} from {path}"):
            if files.fmt == "safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    stored = set(handle.keys())
                    for name in wanted:
                        if name not in stored:
                            raise missing_tensor_error(files.step, name, sorted(stored))
                        found[name] = handle.get_tensor(name)
            else:
                state = load_bin(path)
                for name in wanted:
                    if name not in state:
                        raise missing_tensor_error(files.step, name, list(state))
                    found[name] = state[name]
    return {name: found[name] for name in names}


def tensor_content_id(files: WeightFiles, tensor: str) -> str:
    """A content id of a tensor: its dtype, shape and stored bytes. For safetensors only its byte range
    is hashed (located by the header, through a memory map), so it costs a fraction of reading it."""
    path = files.file_for(tensor)
    with _failing_as(f"step {files.step}: cannot read {tensor!r} from {path}"):
        if files.fmt == "safetensors":
            entry, first, stop = _stored_extent(files, tensor, path)
            return _tensor_id(entry["dtype"], entry["shape"], file_content_id(path, first, stop))
        return held_content_id(files, tensor, read_tensor_from(files, tensor))


def _stored_extent(files: WeightFiles, tensor: str, path: Path) -> tuple[dict, int, int]:
    """A tensor's header entry in its safetensors file `path` and its bytes' range [first, stop)."""
    header, size = _header_on_disk(files.step, path)
    if tensor not in header:
        raise missing_tensor_error(files.step, tensor, files.tensor_names())
    first, stop = safetensors_extent(header, tensor, size, files.step, path)
    return header[tensor], first, stop


def _tensor_id(dtype: object, shape: list[int], data: str) -> str:
    """The one formula of a tensor's content id: its dtype (as its file names it), shape and bytes' id."""
    return content_hash(f"{dtype}|{list(shape)}|{data}".encode())


#: Bytes of each span a quick id hashes (the start, the middle and the end of a tensor's bytes).
QUICK_SPAN = 1 << 16
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def held_content_id(files: WeightFiles, tensor: str, held: torch.Tensor) -> str:
    """`tensor_content_id` of a tensor already read in its stored dtype (the pass hashes the copy it holds
    instead of reading the bytes a second time): the same id."""
    data = content_hash(held.contiguous().view(-1).view(torch.uint8).numpy().data)
    dtype = SAFETENSORS_CODES.get(held.dtype) if files.fmt == "safetensors" else held.dtype
    return _tensor_id(dtype, list(held.shape), data)


def tensor_quick_id(files: WeightFiles, tensor: str) -> str:
    """A cheap probe of a tensor's content: its dtype, shape and three spans of its bytes (the start, the
    middle, the end; a safetensors file's only, a `.bin` gets its full id). Different quick ids mean
    different contents; equal ones are confirmed by the full id (`find_duplicates`)."""
    path = files.file_for(tensor)
    if files.fmt != "safetensors" or path is None:
        return tensor_content_id(files, tensor)
    with _failing_as(f"step {files.step}: cannot read {tensor!r} from {path}"):
        entry, first, stop = _stored_extent(files, tensor, path)
        middle = first + max(0, (stop - first) // 2 - QUICK_SPAN // 2)
        spans = sorted({(first, min(stop, first + QUICK_SPAN)), (middle, min(stop, middle + QUICK_SPAN)),
                        (max(first, stop - QUICK_SPAN), stop)})  # fmt: skip
        with file_reader(path) as (read, _):
            parts = [content_hash(read(a, b - 1)) if b > a else "" for a, b in spans]
        return content_hash(f"quick|{entry['dtype']}|{entry['shape']}|{spans}|{parts}".encode())


def tensor_shape(files: WeightFiles, name: str) -> tuple[int, ...] | None:
    """From the safetensors header, or the memory-mapped `.bin`'s pickle (no values are read)."""
    path = files.file_for(name)
    if path is None:
        return None
    with _failing_as(f"step {files.step}: cannot read the shape of {name!r} from {path}"):
        if files.fmt == "safetensors":
            header, _ = _header_on_disk(files.step, path)
            return tuple(header[name]["shape"]) if name in header_names(header) else None
        tensor = load_bin(path).get(name)
        return None if tensor is None else tuple(tensor.shape)


def _read_names(step: int, fmt: str, path: Path) -> list[str]:
    with _failing_as(f"step {step}: cannot read {path}"):
        if fmt == "safetensors":
            return header_names(_header_on_disk(step, path)[0])
        return list(load_bin(path).keys())


def _header_on_disk(step: int, path: Path) -> tuple[dict, int]:
    """The safetensors header of a file on disk, and the file's size."""
    with file_reader(path) as (read, size):
        return safetensors_header(read, size, step, path), size


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Any error of reading a file as a GardenError that says `what` was read (safetensors and torch raise
    several types for a corrupt file); garden's own errors already say it."""
    try:
        yield
    except GardenError:
        raise
    except Exception as err:
        raise GardenError(f"{what}: {err}") from err
