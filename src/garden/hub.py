"""A checkpoint series on the Hugging Face Hub: one tensor per checkpoint branch, the branches named as the
model family names them (Pythia's `step{N}`, OLMo-2's `stage1-step{N}-tokens{M}B`; `garden.families`).

What is fetched per step, and no more:
- safetensors (single or sharded): the header by a range request, then the selected tensor's bytes;
- zip-format `.bin` (single or sharded): the zip's directory and `data.pkl` by range requests, read by
  `garden.torchzip` without executing anything, then the selected tensor's storage bytes; a legacy
  (pre-zip) `.bin` is downloaded whole into the standard Hugging Face cache, verified, with a warning.

Range-read tensors go to garden's own cache (`paths.cache_dir`, env GARDEN_CACHE), keyed by the content id
of the file they came from, with a manifest per repository (revision -> weight files with their content
id and size, the parsed headers): a second run asks the server nothing it already knows and
`HF_HUB_OFFLINE=1` works from the caches alone. Whole downloads stay in the standard Hugging Face cache.

Any Hub-API server is met as it is: the content id of a file is its LFS sha256 when the server gives one,
else its git blob id, else its ETag; a server (mirror, proxy) that answers a range request with the whole
body (HTTP 200) is read up to the bytes needed and closed; 4xx answers fail at once naming the repository,
step and file; connection errors, timeouts, 429/5xx and short bodies are retried with backoff; a body
that cannot be right (offsets beyond the size the server listed) fails at once naming the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from safetensors import safe_open
from safetensors.torch import save_file

from garden import cache, families, torchzip
from garden.errors import GardenError
from garden.integrity import git_blob_id_of, sha256_of
from garden.series import (
    BIN,
    BIN_INDEX,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    CheckpointSeries,
    load_bin,
    missing_tensor_error,
)

log = logging.getLogger("garden.hub")
T = TypeVar("T")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request drowns the job log

WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
HEADER_PROBE = 100_000  # one request usually holds the whole header (Pythia's are ~20-40 kB)
MANIFEST_FORMAT = 3  # bump when the manifest's records change shape: older ones are relearnt


class TransientError(Exception):
    """A failure worth retrying: dropped connection, 5xx, short or corrupt body."""


class RangeIgnored(GardenError):
    """The server answered a range request of a `.bin` with the whole file: reading the zip's tail would
    stream all of it anyway, so the file is downloaded whole (once, verified) instead."""


def default_cache_dir() -> Path:
    """garden's own cache (range-read tensors, Hub manifests): GARDEN_CACHE, else data/cache."""
    return Path(os.environ.get("GARDEN_CACHE") or Path(os.environ.get("GARDEN_DATA_DIR") or "data") / "cache")


@dataclass(frozen=True)
class RemoteFile:
    """The file of one revision that holds a tensor, with the content id the server gave for it."""

    step: int
    filename: str
    content_id: str
    id_kind: str  # sha256 | git-blob | etag
    size: int
    fmt: str  # "safetensors" | "bin"

    @property
    def key(self) -> str:
        """The content id as a cache key: its kind, then the id (hashed when it is not a plain token)."""
        token = self.content_id
        if not re.fullmatch(r"[0-9A-Za-z_.-]{1,128}", token):
            token = hashlib.sha256(token.encode()).hexdigest()
        return f"{self.id_kind}-{token}"


class HubSeries(CheckpointSeries):
    #: Reads go over the network: the extraction fetches ahead while it computes (series.prefetch).
    remote = True

    def __init__(
        self,
        repo: str,
        label: str,
        cache_dir: Path | str | None = None,
        hf_cache: Path | str | None = None,
        endpoint: str | None = None,
        retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        family: families.Family | None = None,
        revision_pattern: str | None = None,
    ):
        """Branches are parsed by `family`'s revision pattern (or `revision_pattern`); with neither, by
        any registered family's."""
        self.repo = repo
        self.family = family
        self.revision_pattern = revision_pattern
        self.label = label
        self.identity = f"hub:{repo}"
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self._sleep = sleep
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint)
        #: The standard Hugging Face cache (HF_HUB_CACHE): whole downloads only.
        self.hf_cache = str(hf_cache) if hf_cache is not None else constants.HF_HUB_CACHE
        #: garden's own cache for this repository: the manifest and the range-read tensors.
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = root / "hub" / repo.replace("/", "--")
        self.manifest_path = self.cache / "manifest.json"
        self._lock = threading.RLock()  # the prefetch threads share the manifest and the counters
        self.manifest = self._load_manifest()
        #: What this process fetched from the server, in bytes, per step (header and index reads included).
        self.fetched: dict[int, int] = {}
        #: How each step's tensor was obtained: range | download | cache (the most costly way wins).
        self.how: dict[int, str] = {}
        self._warned: set[str] = set()
        self._revisions: dict[int, families.Revision] | None = None
        #: Set when the server answers a range request with the whole body (HTTP 200).
        self.ignores_range = False
        _note_old_cache(self.hf_cache)

    # ---------------------------------------------------------------- manifest (what the server told us)

    @staticmethod
    def offline() -> bool:
        return bool(constants.HF_HUB_OFFLINE)

    def _load_manifest(self) -> dict:
        found = cache.read_json(self.manifest_path, "Hub manifest")
        if found is None or found.get("format") != MANIFEST_FORMAT:
            return {"repo": self.repo, "format": MANIFEST_FORMAT, "branches": None, "revisions": {}}
        return found

    def _save_manifest(self) -> None:
        """Merge what this process learnt into the manifest on disk (other jobs may have added their own
        revisions meanwhile), under the manifest's lock, then write it atomically."""
        with self._lock, cache.producing(self.manifest_path, f"the manifest of {self.repo}"):
            on_disk = cache.read_json(self.manifest_path, "Hub manifest") or {}
            if on_disk.get("format") == MANIFEST_FORMAT:
                for section in ("revisions", "headers", "verified"):
                    self.manifest[section] = {**on_disk.get(section, {}), **self.manifest.get(section, {})}
                if self.manifest.get("branches") is None:
                    self.manifest["branches"] = on_disk.get("branches")
            cache.write_json(self.manifest_path, self.manifest)

    def steps(self) -> list[int]:
        return list(self.revisions)

    @property
    def revisions(self) -> dict[int, families.Revision]:
        """{step: branch} of the checkpoint branches (the branch list from the manifest when offline or
        already known; parsed here, so a changed model.revision_pattern needs no new listing)."""
        if self.manifest.get("branches") is None:
            if self.offline():
                raise GardenError(
                    f"HF_HUB_OFFLINE is set and {self.repo} has never been listed: nothing of it is cached "
                    f"(looked in {self.cache}); run once online first"
                )
            refs = self._call(
                lambda: self.api.list_repo_refs(self.repo), f"listing the branches of {self.repo}"
            )
            with self._lock:
                self.manifest["branches"] = sorted(b.name for b in refs.branches)
                self._save_manifest()
        if self._revisions is None:
            where = f"{self.repo} on {self.endpoint}"
            found = families.parse_revisions(
                self.manifest["branches"], self.family, self.revision_pattern, where
            )
            if not found:
                pattern = self.revision_pattern or (
                    self.family.revision_pattern if self.family else "step{N}"
                )
                raise GardenError(f"{where} has no checkpoint branches matching {pattern!r}")
            self._revisions = found
        return self._revisions

    def revision(self, step: int) -> str:
        """The branch of a training step."""
        try:
            return self.revisions[step].name
        except KeyError:
            raise GardenError(
                f"step {step}: {self.repo} has no such revision on {self.endpoint} (no branch is step "
                f"{step}; check the steps setting, or model.revision_pattern)"
            ) from None

    def _revision(self, step: int) -> dict:
        """The weight files of a revision with their content ids and sizes (one paths-info call, kept)."""
        key = self.revision(step)
        known = self.manifest["revisions"].get(key)
        if known is not None:
            return known
        if self.offline():
            raise GardenError(f"step {step}: HF_HUB_OFFLINE is set and {self.repo}@{key} is not in the cache")
        files = self._records_of(step, WEIGHT_FILES)
        if not files:
            raise GardenError(f"step {step}: {self.repo}@{key} holds none of {', '.join(WEIGHT_FILES)}")
        with self._lock:
            record = self.manifest["revisions"].setdefault(key, {"files": files})
            self._save_manifest()
        return record

    def _records_of(self, step: int, names: tuple[str, ...]) -> dict[str, dict]:
        """The content id and size of each of `names` that the revision holds: one paths-info call, or,
        where the server has no paths-info API (some mirrors and proxies), a HEAD request per file."""
        revision = self.revision(step)

        def paths_info():
            try:
                return self.api.get_paths_info(self.repo, list(names), revision=revision)
            except HfHubHTTPError as err:
                if _unsupported(err):
                    return None
                raise

        infos = self._call(paths_info, f"step {step}: listing the weight files of {self.repo}@{revision}")
        if infos is not None:
            return {info.path: self._file_record(step, info) for info in infos if info.path in names}
        self._warn_once(
            "no-paths-info",
            "%s has no paths-info API: garden identifies each file by the ETag of a HEAD request",
            self.endpoint,
        )
        found = {name: self._head_record(step, name) for name in names}
        return {name: record for name, record in found.items() if record is not None}

    def _file_record(self, step: int, info) -> dict:
        """A file's content id: the LFS sha256 when the server gives one (the Hub does for weights), else
        the git blob id (mirrors serving plain git files), else the ETag of a HEAD request."""
        lfs = getattr(info, "lfs", None)
        if lfs is not None and getattr(lfs, "sha256", None):
            return {"id": lfs.sha256, "id_kind": "sha256", "size": int(lfs.size)}
        blob_id = getattr(info, "blob_id", None)
        if blob_id:
            return {"id": blob_id, "id_kind": "git-blob", "size": int(info.size)}
        return self._head_record(step, info.path, required=True)

    def _head_record(self, step: int, name: str, required: bool = False) -> dict | None:
        """A file's ETag and size from a HEAD request; None when the revision does not hold it."""
        url = hf_hub_url(self.repo, name, revision=self.revision(step), endpoint=self.endpoint)

        def head():
            try:
                return get_hf_file_metadata(url, timeout=self.timeout_seconds)
            except HfHubHTTPError as err:
                if not required and (isinstance(err, RemoteEntryNotFoundError) or _unsupported(err)):
                    return None
                raise

        meta = self._call(head, f"step {step}: asking {self.endpoint} for the ETag of {name}")
        if meta is None:
            return None
        if not meta.etag or meta.size is None:
            raise GardenError(
                f"step {step}: {self.endpoint} gives {name} of {self.repo} no LFS sha256, no git blob id, "
                "and no ETag and size: garden cannot tell whether a cached copy is current"
            )
        return {"id": meta.etag, "id_kind": "etag", "size": int(meta.size)}

    def _weight_map(self, step: int, index_name: str) -> dict[str, str]:
        record = self._revision(step)
        if "weight_map" not in record:
            path = self._download(step, index_name, record["files"][index_name])
            try:
                weight_map = json.loads(Path(path).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise GardenError(f"step {step}: unreadable shard index {index_name}: {err}") from err
            with self._lock:
                record["weight_map"] = weight_map
                self._save_manifest()
        return record["weight_map"]

    def locate(self, step: int, tensor: str) -> RemoteFile:
        """The file of `step{N}` that holds `tensor`, preferring safetensors."""
        files = self._revision(step)["files"]
        for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if index_name in files:
                weight_map = self._weight_map(step, index_name)
                if tensor not in weight_map:
                    raise missing_tensor_error(step, tensor, list(weight_map))
                shard = weight_map[tensor]
                return _remote(step, shard, self._shard(step, shard), fmt)
        return self._single(step)

    def _shard(self, step: int, shard: str) -> dict:
        """A shard's record (content id, size) in the revision's manifest, looked up once and kept."""
        files = self._revision(step)["files"]
        if shard not in files:
            record = self._shard_record(step, shard)
            with self._lock:
                files[shard] = record
                self._save_manifest()
        return files[shard]

    def _single(self, step: int) -> RemoteFile:
        """The unsharded weight file of a revision (safetensors preferred)."""
        files = self._revision(step)["files"]
        name, fmt = (SAFETENSORS, "safetensors") if SAFETENSORS in files else (BIN, "bin")
        if name not in files:
            raise GardenError(f"step {step}: {self.repo}@{self.revision(step)} has an index but no weights")
        return _remote(step, name, files[name], fmt)

    def _shard_record(self, step: int, shard: str) -> dict:
        if self.offline():
            raise GardenError(
                f"step {step}: HF_HUB_OFFLINE is set and {shard} of {self.repo} is not in the cache"
            )
        found = self._records_of(step, (shard,))
        if shard not in found:
            raise GardenError(f"step {step}: the shard index names {shard}, which {self.repo} does not hold")
        return found[shard]

    # ---------------------------------------------------------------- the series interface

    def fingerprint(self, step: int, tensor: str) -> str:
        return self.locate(step, tensor).key

    def content_id(self, step: int, tensor: str) -> str | None:
        return self.fingerprint(step, tensor)

    def checkpoint_content_id(self, step: int) -> str:
        """The content ids of every weight file of the revision (shards included), known without reading."""
        files = self._revision(step)["files"]
        ids = {name: _id_of(entry) for name, entry in files.items()}
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if index_name in files:
                for shard in sorted(set(self._weight_map(step, index_name).values())):
                    ids[shard] = _id_of(self._shard(step, shard))
                break
        return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()

    def tensor_names(self, step: int) -> list[str]:
        files = self._revision(step)["files"]
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if index_name in files:
                return sorted(self._weight_map(step, index_name))
        single = self._single(step)
        if single.fmt == "safetensors":
            return sorted(k for k in self._header(single) if not k.startswith("__"))
        layout = self._bin_layout(single)
        if layout is not None:
            return sorted(layout["tensors"])
        return sorted(load_bin(self._local_file(single)))

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        """From the safetensors header or the `.bin`'s data.pkl (small range reads, cached)."""
        remote = self.locate(step, name)
        if remote.fmt == "safetensors":
            entry = self._header(remote).get(name)
        else:
            layout = self._bin_layout(remote)
            entry = None if layout is None else layout["tensors"].get(name)
        return None if entry is None else tuple(entry["shape"])

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        remote = self.locate(step, name)
        cached = self._tensor_cache_path(remote, name)
        if cached.is_file():
            return self._from_tensor_cache(step, cached, name)
        if self.offline():
            whole = self._whole_file_in_cache(remote)
            if whole is None:
                raise GardenError(
                    f"step {step}: HF_HUB_OFFLINE is set and {name} of {self.repo}@{self.revision(step)} "
                    "is not cached"
                )
            return self._tensor_of_file(step, whole, remote.fmt, name)
        with cache.producing(cached, f"{name} of {self.repo}@{self.revision(step)}"):
            if cached.is_file():  # fetched by another job while this one waited
                return self._from_tensor_cache(step, cached, name)
            tensor, how = self._fetch_tensor(remote, name)
            metadata = {"repo": self.repo, "source_id": remote.content_id, "source_id_kind": remote.id_kind}
            cache.atomic_write(
                cached, lambda tmp: save_file({name: tensor.contiguous()}, str(tmp), metadata=metadata)
            )
        self._note_how(step, how)
        return tensor

    def _fetch_tensor(self, remote: RemoteFile, name: str) -> tuple[torch.Tensor, str]:
        """The tensor's bytes by range requests, or out of one verified whole download (a legacy `.bin`,
        or any `.bin` where the server ignores Range)."""
        if remote.fmt == "safetensors":
            return self._range_read_tensor(remote, name), "range"
        layout = self._bin_layout(remote)
        if layout is not None:
            with contextlib.suppress(RangeIgnored):
                return self._range_read_bin_tensor(remote, layout, name), "range"
        return self._tensor_of_file(remote.step, self._local_file(remote), "bin", name), "download"

    def _from_tensor_cache(self, step: int, cached: Path, name: str) -> torch.Tensor:
        self._note_how(step, "cache")
        with safe_open(str(cached), framework="pt") as handle:
            return handle.get_tensor(name)

    def _note_how(self, step: int, how: str) -> None:
        """Record how a step was read; a later cache hit for the same step (the extraction reads the
        reference and the final step twice) does not hide that it was fetched in this run."""
        order = ("cache", "range", "download")
        with self._lock:
            if order.index(how) >= order.index(self.how.get(step, "cache")):
                self.how[step] = how

    def _tensor_of_file(self, step: int, path: str, fmt: str, name: str) -> torch.Tensor:
        if fmt == "safetensors":
            with safe_open(path, framework="pt") as handle:
                if name not in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    raise missing_tensor_error(step, name, list(handle.keys()))
                return handle.get_tensor(name)
        state = load_bin(Path(path))
        if name not in state:
            raise missing_tensor_error(step, name, list(state))
        return state[name].clone()

    def missing_from_cache(self, steps: list[int], tensor: str) -> list[int]:
        """Steps whose tensor could not be read offline (for a clear error before any work)."""
        if not self.offline():
            return []
        missing = []
        for step in steps:
            try:
                remote = self.locate(step, tensor)
            except GardenError:
                missing.append(step)
                continue
            if (
                not self._tensor_cache_path(remote, tensor).is_file()
                and self._whole_file_in_cache(remote) is None
            ):
                missing.append(step)
        return missing

    # ---------------------------------------------------------------- fetching

    def _tensor_cache_path(self, remote: RemoteFile, tensor: str) -> Path:
        """Content-addressed: the source file's content id, and the version of the code that cut the
        tensor out of it (`garden.cache`, kind hub_tensor)."""
        safe_name = tensor.replace("/", "_")
        code = cache.code_version("hub_tensor")
        return self.cache / "tensors" / remote.key / f"{safe_name}.{code}.safetensors"

    def _header(self, remote: RemoteFile) -> dict:
        """The safetensors header of a remote file (cached in the manifest: it never changes for a content
        id)."""
        headers = self.manifest.setdefault("headers", {})
        if remote.key in headers:
            return headers[remote.key]
        if self.offline():
            raise GardenError(
                f"step {remote.step}: HF_HUB_OFFLINE is set and the header of {remote.filename} is not cached"
            )
        if remote.size < 8:
            raise GardenError(f"step {remote.step}: {remote.filename} is {remote.size} bytes: no safetensors")
        probe = self._range(remote, 0, min(HEADER_PROBE, remote.size) - 1)
        length = int.from_bytes(probe[:8], "little")
        if length <= 0 or 8 + length > remote.size:
            raise GardenError(
                f"step {remote.step}: {remote.filename} has an invalid safetensors header length {length} "
                f"(the file is {remote.size} bytes)"
            )
        raw = (
            probe[8 : 8 + length]
            if 8 + length <= len(probe)
            else probe[8:] + self._range(remote, len(probe), 7 + length)
        )
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as err:
            raise GardenError(
                f"step {remote.step}: unreadable safetensors header in {remote.filename}: {err}"
            ) from err
        header["__data_start__"] = 8 + length
        with self._lock:
            headers[remote.key] = header
            self._save_manifest()
        return header

    def _range_read_tensor(self, remote: RemoteFile, name: str) -> torch.Tensor:
        header = self._header(remote)
        if name not in header:
            raise missing_tensor_error(remote.step, name, [k for k in header if not k.startswith("__")])
        entry = header[name]
        begin, end = entry["data_offsets"]
        start = header["__data_start__"]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise GardenError(f"step {remote.step}: {name} has an unsupported dtype {entry['dtype']}")
        if not 0 <= begin <= end or start + end > remote.size:
            raise GardenError(
                f"step {remote.step}: the header of {remote.filename} places {name} at bytes "
                f"{start + begin}-{start + end}, beyond the file's {remote.size} bytes: the checkpoint is "
                "truncated or damaged on the server"
            )
        raw = self._range(remote, start + begin, start + end - 1) if end > begin else bytearray()
        if not raw:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"])

    def _bin_layout(self, remote: RemoteFile) -> dict | None:
        """Where each tensor of a zip-format `.bin` lives (from its directory and data.pkl, read by ranges
        and kept in the manifest); None for a legacy `.bin`, which is downloaded whole instead."""
        headers = self.manifest.setdefault("headers", {})
        code = cache.code_version("hub_tensor")
        found = headers.get(remote.key)
        if found is not None and found.get("code") == code:
            return None if found.get("legacy") else found
        if self.ignores_range:
            return None
        if self.offline():
            raise GardenError(
                f"step {remote.step}: HF_HUB_OFFLINE is set and the layout of {remote.filename} is not cached"
            )
        try:
            layout = self._with_zip_reader(
                remote, None, torchzip.TorchZipReader.layout, f"reading the layout of {remote.filename}"
            )
        except RangeIgnored:
            return None
        except torchzip.NotTorchZip as err:
            self._warn_once(
                f"legacy:{remote.key}",
                "step %d: %s is not a zip-format checkpoint (%s): it is downloaded whole and verified",
                remote.step, remote.filename, err,
            )  # fmt: skip
            layout = {"legacy": True}
        layout["code"] = code
        with self._lock:
            headers[remote.key] = layout
            self._save_manifest()
        return None if layout.get("legacy") else layout

    def _range_read_bin_tensor(self, remote: RemoteFile, layout: dict, name: str) -> torch.Tensor:
        """The tensor's storage bytes only (or just the span it views); a storage read whole is checked
        against its CRC-32 and fetched again when it fails."""
        if name not in layout["tensors"]:
            raise missing_tensor_error(remote.step, name, list(layout["tensors"]))
        return self._with_zip_reader(
            remote, layout, lambda reader: reader.tensor(name), f"reading {name} from {remote.filename}"
        )

    def _with_zip_reader(self, remote: RemoteFile, layout: dict | None,
                         use: Callable[[torchzip.TorchZipReader], T], what: str) -> T:  # fmt: skip
        """`use` a reader of the remote `.bin` (one that already knows `layout`, when given) under the
        retry loop: bytes that fail their CRC-32 are fetched again; the reader's own errors name the step
        and the file; a legacy file (NotTorchZip) and a server ignoring Range (RangeIgnored) pass through
        for the caller to fall back on a whole download."""

        def read(first: int, last: int) -> bytes:
            return self._range(remote, first, last)

        def attempt() -> T:
            reader = (
                torchzip.TorchZipReader(read, remote.size)
                if layout is None
                else torchzip.TorchZipReader.from_layout(read, remote.size, layout)
            )
            try:
                return use(reader)
            except torchzip.CorruptMember as err:
                raise TransientError(str(err)) from err
            except (torchzip.NotTorchZip, RangeIgnored):
                raise
            except GardenError as err:
                if str(err).startswith(f"step {remote.step}:"):  # a failed read already names the step
                    raise
                raise GardenError(f"step {remote.step}: {remote.filename}: {err}") from err

        return self._call(attempt, f"step {remote.step}: {what}")

    def _range(self, remote: RemoteFile, first: int, last: int) -> bytes:
        """Bytes [first, last] of a remote file, exactly that many, retried with backoff.

        huggingface_hub's `http_backoff` retries status codes and connection errors but cannot see a short
        body, nor a server that ignores `Range`; the loop here handles all of them and never returns a
        body of the wrong length.
        """
        if not 0 <= first <= last < remote.size:
            raise GardenError(
                f"step {remote.step}: bytes {first}-{last} of {remote.filename} lie beyond its {remote.size} "
                f"bytes (the size {self.endpoint} listed): the checkpoint is truncated or damaged"
            )
        url = hf_hub_url(
            self.repo, remote.filename, revision=self.revision(remote.step), endpoint=self.endpoint
        )
        expected = last - first + 1

        def fetch() -> bytes:
            with get_session().stream(
                "GET",
                url,
                headers={**build_hf_headers(), "Range": f"bytes={first}-{last}"},
                timeout=self.timeout_seconds,
                follow_redirects=True,
            ) as response:
                status = response.status_code
                if status >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if status == 206:
                    _check_content_range(response.headers.get("Content-Range"), remote, first)
                    body, received = _slice_of(response.iter_bytes(), 0, expected)
                elif status == 200:
                    self._warn_ignored_range(remote, response.headers.get("Content-Length"))
                    if remote.fmt == "bin":
                        raise RangeIgnored(f"{self.endpoint} ignores Range")
                    body, received = _slice_of(response.iter_bytes(), first, expected)
                else:
                    raise TransientError(f"HTTP {status} to a range request")
            self._count(remote.step, received)
            if len(body) != expected:
                raise TransientError(f"short read: {len(body)} of {expected} bytes")
            return body

        return self._call(fetch, f"step {remote.step}: reading bytes {first}-{last} of {remote.filename}")

    def _warn_ignored_range(self, remote: RemoteFile, length: str | None) -> None:
        if length is not None and int(length) != remote.size:
            raise GardenError(
                f"step {remote.step}: {self.endpoint} sent {remote.filename} as {length} bytes but listed "
                f"it as {remote.size}: the file changed on the server or the server is inconsistent"
            )
        self.ignores_range = True
        self._warn_once(
            "ignored-range",
            "%s answers range requests with the whole file (HTTP 200: it ignores `Range`, as some mirrors "
            "and proxies do); garden reads a safetensors file's body only as far as it needs and closes "
            "it, and downloads a .bin whole (verified) instead of reading its parts",
            self.endpoint,
        )

    def _warn_once(self, key: str, message: str, *args) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)

    def _count(self, step: int, received: int) -> None:
        with self._lock:
            self.fetched[step] = self.fetched.get(step, 0) + received

    def _whole_file_in_cache(self, remote: RemoteFile) -> str | None:
        """The whole file, already in the standard Hugging Face cache (an earlier whole download)."""
        found = try_to_load_from_cache(
            self.repo, remote.filename, revision=self.revision(remote.step), cache_dir=self.hf_cache
        )
        return found if isinstance(found, str) else None

    def _local_file(self, remote: RemoteFile) -> str:
        record = {"id": remote.content_id, "id_kind": remote.id_kind, "size": remote.size}
        return self._download(remote.step, remote.filename, record)

    def _download(self, step: int, filename: str, record: dict) -> str:
        """A whole file into the Hugging Face cache, verified against its content id (and size)."""
        revision = self.revision(step)
        cached = try_to_load_from_cache(self.repo, filename, revision=revision, cache_dir=self.hf_cache)
        if isinstance(cached, str) and self._verified(cached, record):
            return cached
        if self.offline():
            raise GardenError(
                f"step {step}: HF_HUB_OFFLINE is set and {filename} of {self.repo}@{revision} is not cached"
            )

        def fetch() -> str:
            path = hf_hub_download(
                self.repo,
                filename,
                revision=revision,
                cache_dir=self.hf_cache,
                endpoint=self.endpoint,
                etag_timeout=self.timeout_seconds,
            )
            if not self._verified(path, record, fresh=True):
                _remove_cached(path)
                raise TransientError(f"{filename} does not match its {record['id_kind']} {record['id']}")
            return path

        path = self._call(fetch, f"step {step}: downloading {filename}")
        self._count(step, record["size"])
        if filename not in (SAFETENSORS_INDEX, BIN_INDEX):
            self._note_how(step, "download")
        return path

    def _verified(self, path: str, record: dict, fresh: bool = False) -> bool:
        """Size always; the content id once per file (remembered in the manifest by path, size and mtime)
        where it is a hash of the content (sha256 or git blob id; an ETag is only the server's word)."""
        stat = os.stat(path)
        if stat.st_size != record["size"]:
            return False
        hasher = {"sha256": sha256_of, "git-blob": git_blob_id_of}.get(record["id_kind"])
        if hasher is None:
            return True
        seen = self.manifest.setdefault("verified", {})
        stamp = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
        if not fresh and seen.get(stamp) == record["id"]:
            return True
        if hasher(path) != record["id"]:
            return False
        with self._lock:
            seen[stamp] = record["id"]
            self._save_manifest()
        return True

    def _call(self, action: Callable, what: str):
        """Run a server call, retrying only what can succeed later (connection errors, timeouts, 429/5xx,
        short bodies) with exponential backoff; any other answer fails at once, naming `what` and what to
        check."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return action()
            except GardenError:
                raise
            except Exception as err:
                status = getattr(getattr(err, "response", None), "status_code", None)
                if status is not None and status not in RETRY_STATUS:
                    raise GardenError(f"{what}: {self._explain(err, status)}") from err
                if status is None and not _transient(err):
                    raise GardenError(f"{what}: {type(err).__name__}: {err}") from err
                last = err
            if attempt < self.retries:
                wait = self.backoff_seconds * 2**attempt
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, _first_line(last), attempt + 1,
                    self.retries, wait,
                )  # fmt: skip
                self._sleep(wait)
        raise GardenError(f"{what}: failed after {self.retries + 1} attempts: {_first_line(last)}")

    def _explain(self, err: Exception, status: int) -> str:
        """What a 4xx answer means for a garden user, and what to check."""
        where = f"{self.endpoint} (HTTP {status})"
        if isinstance(err, GatedRepoError):
            return f"{self.repo} is gated on {where}: accept its conditions on the Hub, then set HF_TOKEN"
        if isinstance(err, RepositoryNotFoundError):
            return (
                f"repository {self.repo} was not found on {where}: check model.repo (model.deduped_repo for "
                "variant=deduped) and HF_ENDPOINT; a private repository also needs HF_TOKEN"
            )
        if isinstance(err, RevisionNotFoundError):
            return (
                f"{self.repo} has no such revision on {where}: check the steps setting against the "
                "repository's step branches"
            )
        if isinstance(err, RemoteEntryNotFoundError):
            return (
                f"{where} says it does not exist: check model.repo, the steps setting and HF_ENDPOINT (some "
                "mirrors answer this for a repository they do not hold)"
            )
        if status in (401, 403):
            return f"access to {self.repo} was refused by {where}: set HF_TOKEN to a token that can read it"
        if status == 416:
            return (
                f"{where} cannot serve that byte range: the file is shorter than the server listed "
                "(truncated or changed)"
            )
        return f"{where}: {_first_line(err)}"

    def checkpoint_folder(self, step: int) -> Path:
        """The whole checkpoint (config, tokenizer, weights) in the Hugging Face cache, for model-level
        stages; files already there are not fetched again."""
        from huggingface_hub import snapshot_download

        revision = self.revision(step)
        path = self._call(
            lambda: snapshot_download(
                self.repo, revision=revision, cache_dir=self.hf_cache, endpoint=self.endpoint,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            ),
            f"step {step}: downloading the checkpoint {self.repo}@{revision}",
        )  # fmt: skip
        return Path(path)

    def bytes_fetched(self) -> int:
        return sum(self.fetched.values())

    def fetch_report(self, steps: list[int], tensor: str) -> list[dict]:
        """What each step's tensor came from: file, content id, size, how it was read, bytes fetched."""
        rows = []
        for step in steps:
            remote = self.locate(step, tensor)
            rows.append({
                "step": step, "revision": self.revision(step), "tokens": self.revisions[step].tokens,
                "file": remote.filename, "format": remote.fmt,
                "content_id": remote.content_id, "id_kind": remote.id_kind, "file_size": remote.size,
                "how": self.how.get(step, "cache"), "bytes_fetched": self.fetched.get(step, 0),
            })  # fmt: skip
        return rows


def _id_of(record: dict) -> str:
    """A manifest file record's content id with its kind (sha256-…, git-blob-…, etag-…)."""
    return f"{record['id_kind']}-{record['id']}"


def _remote(step: int, filename: str, record: dict, fmt: str) -> RemoteFile:
    return RemoteFile(step, filename, record["id"], record["id_kind"], int(record["size"]), fmt)


def _transient(err: Exception) -> bool:
    """Connection errors and timeouts (httpx's transport errors, huggingface_hub's offline fallbacks, OS
    socket errors) and garden's own short-body errors."""
    import httpx2

    return isinstance(err, (TransientError, httpx2.TransportError, OSError))


def _unsupported(err: HfHubHTTPError) -> bool:
    """A 404/405/501 without the Hub's error code: the server has no such API (not a missing repo,
    revision or file, which the Hub and its mirrors name in X-Error-Code)."""
    response = getattr(err, "response", None)
    if response is None or response.status_code not in (404, 405, 501):
        return False
    return not response.headers.get("X-Error-Code")


def _check_content_range(value: str | None, remote: RemoteFile, first: int) -> None:
    """A 206 must be the asked range of a file of the listed size; anything else cannot become right."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if match is None:
        return  # a proxy that drops the header: the body length is still checked
    start, total = int(match.group(1)), match.group(3)
    if start != first or (total != "*" and int(total) != remote.size):
        raise GardenError(
            f"step {remote.step}: the server answered bytes {value} of {remote.filename}, asked from byte "
            f"{first} of {remote.size}: the file changed on the server or the server is inconsistent"
        )


def _slice_of(chunks: Iterator[bytes], first: int, length: int) -> tuple[bytearray, int]:
    """Bytes [first, first + length) of a streamed body, copied once into one buffer (a tensor is built
    on it without another copy), reading no further; and how many bytes were received."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    position = received = taken = 0
    for chunk in chunks:
        received += len(chunk)
        end = position + len(chunk)
        if end > first and taken < length:
            piece = memoryview(chunk)[max(0, first - position) : first + length - position]
            view[taken : taken + len(piece)] = piece
            taken += len(piece)
        position = end
        if taken >= length:
            break
    del view
    return (buffer if taken == length else buffer[:taken]), received


def _first_line(err: Exception | None) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _remove_cached(path: str) -> None:
    """Drop a bad download: the blob it links to and the link."""
    real = os.path.realpath(path)
    for candidate in {real, path}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(candidate)


_OLD_CACHE_NOTED: set[str] = set()


def _note_old_cache(hf_cache: str) -> None:
    """Earlier garden versions kept their Hub cache inside the Hugging Face cache (`hub/garden/`), which
    `hf cache ls` reports as an inconsistency; say once that it is unused and can go."""
    old = Path(hf_cache) / "garden"
    if hf_cache not in _OLD_CACHE_NOTED and old.is_dir():
        _OLD_CACHE_NOTED.add(hf_cache)
        log.warning("%s is an old garden cache that is no longer used: it can be deleted", old)
