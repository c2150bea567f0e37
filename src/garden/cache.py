"""One module for every keyed cache garden keeps (tiny series, extraction records, evaluation records,
co-occurrence runs, Hub tensors), so that each follows the same four rules:

- its key covers what the result depends on: the content it read (content ids, never a path alone), the
  config it used, and the code that produced it (`code_version`: a hash of the producing functions'
  normalised syntax, so a bug fix in a kernel, the trainer or a scorer retires its old records without a
  hand-kept number, while a comment, a docstring, a reformat or a refactor of a loop retires none);
- writes are atomic, with unique temporary names in the target folder, so two jobs never tear a file;
- a folder being produced is held by a file lock (`producing`): a second job waits, says so, and then
  reuses what the first produced instead of producing it again;
- an unreadable record is recomputed with a warning (`read_or_none`), never trusted and never fatal.

The caches live under `paths.data_dir` (the Hub tensors under `paths.cache_dir`), outside DVC;
deleting a folder is always safe: it is produced again on the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TypeVar

import xxhash
from filelock import FileLock, Timeout

from garden import codehash
from garden.codehash import code_hash

log = logging.getLogger("garden")

T = TypeVar("T")

#: The code each cache's records are produced by: the kernels and their constants, the trainers' loops,
#: the scorers (`module` for all its definitions, `module:name` for one). Their normalised syntax
#: (garden.codehash: no comments, docstrings, annotations or log lines; a definition keyed by its name,
#: not its module) is hashed into the cache's keys. What only drives, reports or stores (the extraction's
#: step loop, retries, manifests) is left out, so it can change without retiring any record; a test checks
#: that every garden function a producer calls is a producer too, or listed in NOT_PRODUCERS.
PRODUCERS: dict[str, tuple[str, ...]] = {
    "tiny": (
        "garden.tiny",
        "garden.corpus:load_corpus",
        "garden.corpus:text_files",
        "garden.corpus:read_text_files",
        "garden.corpus:read_tar_members",
        "garden.schedule:log_linear_schedule",
    ),
    "extract": (
        "garden.extract.kernel",
        "garden.extract.fused",
        "garden.extract.records",
        "garden.extract.plan:ExtractionPlan",
        "garden.extract.plan:UNIT_STATS",
        "garden.extract.plan:SPLIT_FIELDS",
        "garden.extract.plan:_default",
        "garden.extract.plan:check_shape",
        "garden.extract.plan:check_finite",
        "garden.extract.plan:extent",
        "garden.dip",
        "garden.dip_kernels",
    ),
    # What decides where a live monitor stops a training (garden.tiny keys a series with a stop rule by it).
    "monitor": (
        "garden.monitor",
        "garden.extract.kernel",
        "garden.extract.fused",
        "garden.extract.plan:ExtractionPlan",
        "garden.extract.plan:_default",
        "garden.extract.records:quantile_column",
        "garden.dip",
        "garden.dip_kernels",
        "garden.metrics.units:bimodal_units",
        "garden.metrics.units:unit_step_series",
        "garden.metrics.events:onset_index",
        "garden.metrics.events:stationary_onset",
        "garden.metrics.diffusion:relative_displacement",
        "garden.families:detect",
        "garden.families.base:TensorSpec",
    ),
    # The family's own module is added per family (family_version): a new family retires nothing.
    "evaluate": (
        "garden.evaluation.perplexity",
        "garden.evaluation.stability",
        "garden.evaluation.scorers",
        "garden.evaluation.stage:load_model",
        "garden.evaluation.stage:_final_activations",
        # What the stability stage asks of a family (the family's own module is added per family).
        "garden.families.base:Family.blocks",
        "garden.families.base:Family.attention_output",
        "garden.families.base:Family.mlp_output",
        "garden.families.base:Family.value_weight",
        "garden.families.base:Family.ov_circuits",
    ),
    "cooccurrence": (
        "garden.cooccurrence",
        "garden.schedule:log_linear_schedule",
        "garden.metrics.events:onset_index",
    ),
    # Only the functions that turn a remote file's bytes into a tensor: the rest of garden.hub (retries,
    # manifests) can change without re-downloading gigabytes of unchanged tensors.
    "hub_tensor": (
        "garden.formats:safetensors_header",
        "garden.formats:safetensors_extent",
        "garden.formats:safetensors_tensor",
        "garden.formats:bin_layout",
        "garden.formats:bin_tensor",
        "garden.formats:load_bin",
        "garden.formats:read_tensor_file",
        "garden.formats:header_names",
        "garden.formats:HEADER_PROBE",
        "garden.formats:SAFETENSORS_DTYPES",
        "garden.hub.transport:_check_content_range",
        "garden.hub.series:HubSeries._fetch_tensor",
        "garden.hub.ranges:RangeReader.tensor",
        "garden.hub.ranges:RangeReader.reader",
        "garden.hub.transport:HubTransport.read_range",
        "garden.hub.transport:slice_of",
        "garden.torchzip",
    ),
}

#: What producers call that never shapes a record's content: atomic writes and locks, progress reports,
#: devices, content ids and verified downloads (which key or check what is read), the series readers
#: (their content ids are in the keys), the in-memory trajectory records are assembled into.
NOT_PRODUCERS = (
    "garden.cache",
    "garden.codehash",
    "garden.progress",
    "garden.devices",
    "garden.errors",
    "garden.integrity",
    "garden.registry",
    "garden.settings",  # settings' values are in the keys themselves
    "garden.settings.schema",
    "garden.settings.pipeline",
    "garden.settings.models",
    "garden.settings.evaluation",
    "garden.settings.declare",
    "garden.series",
    "garden.trajectory",
    "garden.corpus:fetch_sdist",
    "garden.extract.plan:DIP_THREADS",  # how many threads compute the dips, not what they compute
    "garden.extract.plan:EXCLUDE_HINT",  # the wording of an error
    "garden.formats:missing_tensor_error",  # the wording of an error
    "garden.formats:_failing_as",  # the wording of an error
    "garden.corpus:text_content_id",
    "garden.tracking:send_metrics",  # where the monitor's numbers are logged, not what they are
)


@cache
def code_version(kind: str) -> str:
    """A short hash of the code that produces a cache's records (its normalised definitions)."""
    if kind not in PRODUCERS:
        raise KeyError(f"no cache named {kind!r}; known: {', '.join(PRODUCERS)}")
    return code_hash(PRODUCERS[kind])


def family_version(family) -> str | None:
    """The code version of one model family's own module (what its evaluation records depend on beyond
    the shared `evaluate` code); None for no family."""
    if family is None:
        return None
    return f"{family.name}:{code_hash((type(family).__module__,))}"


def clear_versions() -> None:
    """Forget computed versions and parsed modules (tests that edit a producer's source)."""
    code_version.cache_clear()
    codehash.clear()


def version_tags(*kinds: str) -> dict[str, str]:
    """MLflow tags naming the code version of each cache a run used (`garden.cache.<kind>`)."""
    return {f"garden.cache.{kind}": code_version(kind) for kind in kinds}


def cache_key(kind: str, **parts) -> str:
    """The key of a cache entry: its kind, the producing code's version and every part it depends on."""
    payload = json.dumps({"cache": kind, "code": code_version(kind), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------ writing


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a unique temporary file beside `path`, then rename it into place."""
    tmp = _temporary(Path(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=True))


def temporary_folder(target: Path) -> Path:
    """A fresh, uniquely named folder beside `target` (to be filled, then renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


# ------------------------------------------------------------------------------------------ reading


def read_or_none(path: Path, load: Callable[[Path], T], what: str = "cache record") -> T | None:
    """`load(path)`, or None when the file is missing; an unreadable one (torn by a crash, cut short on
    a full disk) is deleted with a warning, so the caller recomputes it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as err:  # every reader raises its own types for a damaged file (zip, json, pickle)
        log.warning("unreadable %s %s (%s: %s); recomputing it", what, path, type(err).__name__, err)
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def read_json(path: Path, what: str = "cache record"):
    return read_or_none(path, lambda p: json.loads(p.read_text()), what)


# ------------------------------------------------------------------------------------------ locking


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _folder_lock(folder: Path) -> FileLock:
    """The OS file lock of a folder being produced (beside it, `lock_path`)."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextlib.contextmanager
def producing_if_free(folder: Path) -> Iterator[bool]:
    """Hold `folder`'s lock if no other job holds it (yields True), else yield False at once: a scan
    computes the tensors no other job is producing first, and waits for the others after."""
    lock = _folder_lock(folder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def producing(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock while producing it. A job that finds it held logs that it waits, waits, and
    then goes on (finding the folder complete, it reuses it). The lock is an OS file lock, released by
    the kernel when its holder dies, so a killed job never blocks the next one."""
    lock = _folder_lock(folder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another job producing %s (%s)", what, folder)
        lock.acquire()
        log.info("%s is free again; reusing what the other job produced", folder)
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ content ids


def content_hash(data) -> str:
    """A 128-bit content id of a buffer. xxh3 rather than sha256: it hashes a 77 MB tensor in 3 ms
    instead of 45 ms, and these ids key caches (downloads are still checked against sha256)."""
    return xxhash.xxh3_128_hexdigest(data)


def file_content_id(path: Path, begin: int = 0, end: int | None = None) -> str:
    """The content id of a file, or of its bytes [begin, end), read through a memory map (no copy)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        end = size if end is None else end
        if not 0 <= begin <= end <= size:
            raise ValueError(f"{path} has {size} bytes; cannot hash bytes {begin}..{end}")
        if size == 0:
            return content_hash(b"")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return content_hash(view[begin:end])
            finally:
                view.release()


class ContentMemo:
    """Content hashes of files on disk, remembered per (path, size, mtime, ctime, inode), so a file is
    hashed once per version. ctime cannot be set from user space: a copy over a file, even one that
    keeps size and mtime (`cp -p`), gets a new entry. Saved atomically; a lost update only costs a rehash."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, str] = {}
        if self.path is not None:
            self.entries = read_json(self.path, "content-id memo") or {}
        self.dirty = False

    @staticmethod
    def _signature(path: Path, part: str) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{part}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"

    def get(self, path: Path, part: str, compute: Callable[[], str]) -> str:
        """The content id of `part` of a file (e.g. one tensor's bytes), computed once per version."""
        signature = self._signature(Path(path), part)
        found = self.entries.get(signature)
        if found is None:
            found = self.entries[signature] = compute()
            self.dirty = True
        return found

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        on_disk = read_json(self.path, "content-id memo") or {}
        write_json(self.path, {**on_disk, **self.entries})
        self.dirty = False
