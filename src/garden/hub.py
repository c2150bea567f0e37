"""A checkpoint series on the Hugging Face Hub (the Pythia suite): one tensor per `step{N}` branch.

What is fetched per step, and no more:
- safetensors (single or sharded): the header by a range request, then the selected tensor's bytes by
  another; the tensor is kept in a small content-addressed cache (keyed by the file's LFS sha256, so
  duplicated branches share it) beside the Hugging Face cache;
- `.bin` only (single or sharded): the one file that holds the tensor, through `hf_hub_download` into the
  standard cache, checked against its LFS sha256, then memory-mapped with `weights_only=True`.

A manifest per repository (revision -> weight files with their sha256 and size, safetensors headers)
is kept in the same cache, so a second run asks the Hub nothing it already knows and `HF_HUB_OFFLINE=1`
works from the cache alone. Connection drops, 5xx answers and short reads are retried with exponential
backoff; a body of the wrong length or hash is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from safetensors import safe_open
from safetensors.torch import save_file

from garden import cache
from garden.errors import GardenError
from garden.integrity import sha256_of
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
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request drowns the job log

WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
RETRY_STATUS = (429, 500, 502, 503, 504)
HEADER_PROBE = 100_000  # one request usually holds the whole header (Pythia's are ~20-40 kB)


class TransientError(Exception):
    """A failure worth retrying: dropped connection, 5xx, short or corrupt body."""


def revision_of(step: int) -> str:
    return f"step{step}"


@dataclass(frozen=True)
class RemoteFile:
    """The file of one revision that holds a tensor."""

    step: int
    filename: str
    sha256: str
    size: int
    fmt: str  # "safetensors" | "bin"


class HubSeries(CheckpointSeries):
    def __init__(
        self,
        repo: str,
        label: str,
        cache_dir: Path | None = None,
        endpoint: str | None = None,
        retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.repo = repo
        self.label = label
        self.identity = f"hub:{repo}"
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self._sleep = sleep
        self.endpoint = endpoint or constants.ENDPOINT
        self.api = HfApi(endpoint=self.endpoint)
        #: The standard Hugging Face cache (HF_HUB_CACHE); garden keeps its manifest and tensors inside it.
        self.hf_cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
        self.cache = Path(self.hf_cache) / "garden" / repo.replace("/", "--")
        self.manifest_path = self.cache / "manifest.json"
        self.manifest = self._load_manifest()
        #: What this process fetched from the Hub, in bytes, per step (header and index fetches included).
        self.fetched: dict[int, int] = {}
        #: How each step's tensor was obtained: range | download | cache.
        self.how: dict[int, str] = {}

    # ---------------------------------------------------------------- manifest (what the Hub told us)

    @staticmethod
    def offline() -> bool:
        return bool(constants.HF_HUB_OFFLINE)

    def _load_manifest(self) -> dict:
        found = cache.read_json(self.manifest_path, "Hub manifest")
        return found if found is not None else {"repo": self.repo, "steps": None, "revisions": {}}

    def _save_manifest(self) -> None:
        """Merge what this process learnt into the manifest on disk (other jobs may have added their own
        revisions meanwhile), under the manifest's lock, then write it atomically."""
        with cache.producing(self.manifest_path, f"the manifest of {self.repo}"):
            on_disk = cache.read_json(self.manifest_path, "Hub manifest") or {}
            for section in ("revisions", "headers", "verified"):
                self.manifest[section] = {**on_disk.get(section, {}), **self.manifest.get(section, {})}
            if self.manifest.get("steps") is None:
                self.manifest["steps"] = on_disk.get("steps")
            cache.write_json(self.manifest_path, self.manifest)

    def steps(self) -> list[int]:
        """The `step{N}` branches of the repository (from the manifest when offline or already known)."""
        if self.manifest.get("steps") is None:
            if self.offline():
                raise GardenError(
                    f"HF_HUB_OFFLINE is set and {self.repo} has never been listed: nothing of it is cached "
                    f"(looked in {self.cache}); run once online first"
                )
            refs = self._call(
                lambda: self.api.list_repo_refs(self.repo), f"listing the branches of {self.repo}"
            )
            steps = sorted(
                int(b.name[4:]) for b in refs.branches if b.name.startswith("step") and b.name[4:].isdigit()
            )
            if not steps:
                raise GardenError(f"{self.repo} has no step{{N}} branches")
            self.manifest["steps"] = steps
            self._save_manifest()
        return list(self.manifest["steps"])

    def _revision(self, step: int) -> dict:
        """The weight files of a revision, with LFS sha256 and size (one paths-info call, then cached)."""
        key = revision_of(step)
        known = self.manifest["revisions"].get(key)
        if known is not None:
            return known
        if self.offline():
            raise GardenError(f"step {step}: HF_HUB_OFFLINE is set and {self.repo}@{key} is not in the cache")
        infos = self._call(
            lambda: self.api.get_paths_info(self.repo, list(WEIGHT_FILES), revision=key),
            f"step {step}: listing the weight files of {self.repo}@{key}",
        )
        files = {info.path: _file_record(info) for info in infos if info.path in WEIGHT_FILES}
        if not files:
            raise GardenError(f"step {step}: {self.repo}@{key} holds none of {', '.join(WEIGHT_FILES)}")
        record = {"files": files}
        self.manifest["revisions"][key] = record
        self._save_manifest()
        return record

    def _weight_map(self, step: int, index_name: str) -> dict[str, str]:
        record = self._revision(step)
        if "weight_map" not in record:
            path = self._download(step, index_name, record["files"][index_name])
            record["weight_map"] = json.loads(Path(path).read_text())["weight_map"]
            self._save_manifest()
        return record["weight_map"]

    def locate(self, step: int, tensor: str) -> RemoteFile:
        """The file of `step{N}` that holds `tensor`, preferring safetensors (read by ranges)."""
        record = self._revision(step)
        files = record["files"]
        for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if index_name in files:
                weight_map = self._weight_map(step, index_name)
                if tensor not in weight_map:
                    raise missing_tensor_error(step, tensor, list(weight_map))
                shard = weight_map[tensor]
                entry = self._shard(step, shard)
                return RemoteFile(step, shard, entry["sha256"], entry["size"], fmt)
        return self._single(step)

    def _shard(self, step: int, shard: str) -> dict:
        """A shard's record (sha256, size) in the revision's manifest, looked up once and kept."""
        files = self._revision(step)["files"]
        if shard not in files:
            files[shard] = self._shard_record(step, shard)
            self._save_manifest()
        return files[shard]

    def _single(self, step: int) -> RemoteFile:
        """The unsharded weight file of a revision (safetensors preferred)."""
        files = self._revision(step)["files"]
        name, fmt = (SAFETENSORS, "safetensors") if SAFETENSORS in files else (BIN, "bin")
        if name not in files:
            raise GardenError(f"step {step}: {self.repo}@step{step} has an index but no weights")
        return RemoteFile(step, name, files[name]["sha256"], files[name]["size"], fmt)

    def _shard_record(self, step: int, shard: str) -> dict:
        if self.offline():
            raise GardenError(
                f"step {step}: HF_HUB_OFFLINE is set and {shard} of {self.repo} is not in the cache"
            )
        infos = self._call(
            lambda: self.api.get_paths_info(self.repo, [shard], revision=revision_of(step)),
            f"step {step}: looking up {shard}",
        )
        if not infos:
            raise GardenError(f"step {step}: the shard index names {shard}, which {self.repo} does not hold")
        return _file_record(infos[0])

    # ---------------------------------------------------------------- the series interface

    def fingerprint(self, step: int, tensor: str) -> str:
        return self.locate(step, tensor).sha256

    def content_id(self, step: int, tensor: str) -> str | None:
        return self.locate(step, tensor).sha256

    def checkpoint_content_id(self, step: int) -> str:
        """The LFS sha256 of every weight file of the revision (shards included), known without reading."""
        record = self._revision(step)
        files = record["files"]
        ids = {name: entry["sha256"] for name, entry in files.items()}
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if index_name in files:
                for shard in sorted(set(self._weight_map(step, index_name).values())):
                    ids[shard] = self._shard(step, shard)["sha256"]
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
        return sorted(load_bin(self._local_bin(single)))

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        """From the safetensors header (one small range read, cached); unknown for `.bin` branches."""
        remote = self.locate(step, name)
        if remote.fmt != "safetensors":
            return None
        entry = self._header(remote).get(name)
        return None if entry is None else tuple(entry["shape"])

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        remote = self.locate(step, name)
        cached = self._tensor_cache_path(remote, name)
        if cached.is_file():
            return self._from_tensor_cache(step, cached, name)
        if remote.fmt == "bin":
            state = load_bin(self._local_bin(remote))
            if name not in state:
                raise missing_tensor_error(step, name, list(state))
            return state[name]
        if self.offline():
            raise GardenError(
                f"step {step}: HF_HUB_OFFLINE is set and {name} of {self.repo}@step{step} is not cached"
            )
        with cache.producing(cached, f"{name} of {self.repo}@step{step}"):
            if cached.is_file():  # fetched by another job while this one waited
                return self._from_tensor_cache(step, cached, name)
            tensor = self._range_read_tensor(remote, name)
            metadata = {"repo": self.repo, "source_sha256": remote.sha256}
            cache.atomic_write(cached, lambda tmp: save_file({name: tensor}, str(tmp), metadata=metadata))
        self.how[step] = "range"
        return tensor

    def _from_tensor_cache(self, step: int, cached: Path, name: str) -> torch.Tensor:
        self.how[step] = "cache"
        with safe_open(str(cached), framework="pt") as handle:
            return handle.get_tensor(name)

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
            if remote.fmt == "safetensors":
                present = self._tensor_cache_path(remote, tensor).is_file()
            else:
                present = isinstance(
                    try_to_load_from_cache(
                        self.repo, remote.filename, revision=revision_of(step), cache_dir=self.hf_cache
                    ),
                    str,
                )
            if not present:
                missing.append(step)
        return missing

    # ---------------------------------------------------------------- fetching

    def _tensor_cache_path(self, remote: RemoteFile, tensor: str) -> Path:
        """Content-addressed: the source file's sha256, and the version of the code that cut the tensor
        out of it (`garden.cache`, kind hub_tensor)."""
        safe_name = tensor.replace("/", "_")
        code = cache.code_version("hub_tensor")
        return self.cache / "tensors" / remote.sha256 / f"{safe_name}.{code}.safetensors"

    def _header(self, remote: RemoteFile) -> dict:
        """The safetensors header of a remote file (cached in the manifest: it never changes for a sha256)."""
        headers = self.manifest.setdefault("headers", {})
        if remote.sha256 in headers:
            return headers[remote.sha256]
        if self.offline():
            raise GardenError(
                f"step {remote.step}: HF_HUB_OFFLINE is set and the header of {remote.filename} is not cached"
            )
        probe = self._range(remote, 0, min(HEADER_PROBE, remote.size) - 1)
        length = int.from_bytes(probe[:8], "little")
        if length <= 0 or 8 + length > remote.size:
            raise GardenError(
                f"step {remote.step}: {remote.filename} has an invalid safetensors header length {length}"
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
        headers[remote.sha256] = header
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
        raw = self._range(remote, start + begin, start + end - 1) if end > begin else b""
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry["shape"])

    def _range(self, remote: RemoteFile, first: int, last: int) -> bytes:
        """Bytes [first, last] of a remote file, exactly that many, retried with backoff.

        huggingface_hub's `http_backoff` retries status codes and connection errors but cannot see a short
        body; the loop here treats all three alike and never returns a body of the wrong length.
        """
        url = hf_hub_url(
            self.repo, remote.filename, revision=revision_of(remote.step), endpoint=self.endpoint
        )
        expected = last - first + 1

        def fetch() -> bytes:
            response = get_session().get(
                url,
                headers={**build_hf_headers(), "Range": f"bytes={first}-{last}"},
                timeout=self.timeout_seconds,
                follow_redirects=True,
            )
            if response.status_code in RETRY_STATUS:
                raise TransientError(f"HTTP {response.status_code}")
            hf_raise_for_status(response)
            body = response.content
            if len(body) != expected:
                raise TransientError(f"short read: {len(body)} of {expected} bytes")
            return body

        body = self._call(fetch, f"step {remote.step}: reading bytes {first}-{last} of {remote.filename}")
        self.fetched[remote.step] = self.fetched.get(remote.step, 0) + len(body)
        return body

    def _download(self, step: int, filename: str, record: dict) -> str:
        """A whole file into the Hugging Face cache, verified against its LFS sha256 (or git size)."""
        revision = revision_of(step)
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
                raise TransientError(f"{filename} does not match its sha256 {record.get('sha256')}")
            return path

        path = self._call(fetch, f"step {step}: downloading {filename}")
        self.fetched[step] = self.fetched.get(step, 0) + record["size"]
        return path

    def _local_bin(self, remote: RemoteFile) -> str:
        before = self.fetched.get(remote.step, 0)
        path = self._download(remote.step, remote.filename, {"sha256": remote.sha256, "size": remote.size})
        self.how[remote.step] = "download" if self.fetched.get(remote.step, 0) > before else "cache"
        return path

    def _verified(self, path: str, record: dict, fresh: bool = False) -> bool:
        """Size always; sha256 once per file (remembered in the manifest by path, size and mtime)."""
        stat = os.stat(path)
        if stat.st_size != record["size"]:
            return False
        if not record.get("sha256"):
            return True
        seen = self.manifest.setdefault("verified", {})
        stamp = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
        if not fresh and seen.get(stamp) == record["sha256"]:
            return True
        if sha256_of(path) != record["sha256"]:
            return False
        seen[stamp] = record["sha256"]
        self._save_manifest()
        return True

    def _call(self, action: Callable, what: str):
        """Run a Hub call, retrying transient failures with exponential backoff; fail naming `what`."""
        import httpx2

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return action()
            except GardenError:
                raise
            except (TransientError, httpx2.TransportError, OSError) as err:
                last = err
            except Exception as err:  # huggingface_hub wraps HTTP errors; retry the server-side ones
                status = getattr(getattr(err, "response", None), "status_code", None)
                if status not in RETRY_STATUS:
                    raise GardenError(f"{what}: {err}") from err
                last = err
            if attempt < self.retries:
                wait = self.backoff_seconds * 2**attempt
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, last, attempt + 1, self.retries, wait
                )
                self._sleep(wait)
        raise GardenError(f"{what}: failed after {self.retries + 1} attempts: {last}")

    def checkpoint_folder(self, step: int) -> Path:
        """The whole checkpoint (config, tokenizer, weights) in the Hugging Face cache, for model-level
        stages; files already there are not fetched again."""
        from huggingface_hub import snapshot_download

        revision = revision_of(step)
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
        """What each step's tensor came from: file, sha256, size, how it was read, bytes fetched."""
        rows = []
        for step in steps:
            remote = self.locate(step, tensor)
            rows.append({
                "step": step, "revision": revision_of(step), "file": remote.filename, "format": remote.fmt,
                "sha256": remote.sha256, "file_size": remote.size, "how": self.how.get(step, "cache"),
                "bytes_fetched": self.fetched.get(step, 0),
            })  # fmt: skip
        return rows


def _file_record(info) -> dict:
    lfs = getattr(info, "lfs", None)
    return {
        "sha256": lfs.sha256 if lfs is not None else None,
        "size": int(lfs.size if lfs is not None else info.size),
        "blob_id": getattr(info, "blob_id", None),
    }


def _remove_cached(path: str) -> None:
    """Drop a bad download: the blob it links to and the link."""
    real = os.path.realpath(path)
    for candidate in {real, path}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(candidate)
