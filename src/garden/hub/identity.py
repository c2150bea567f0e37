"""Which file of a revision holds a tensor, and what that file is: its content id and size, as the
server gives them, and whole downloads checked against them.

Any Hub-API server is met as it is: the content id of a file is its LFS sha256 when the server gives one
(the Hub does for weights), else its git blob id (mirrors serving plain git files), else the ETag of a
HEAD request (servers without a paths-info API, or that give neither).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError

from garden import formats
from garden.errors import GardenError
from garden.hub.manifest import Manifest
from garden.hub.transport import HubTransport, TransientError, offline, unsupported
from garden.integrity import git_blob_id_of, sha256_of

#: How a content id is checked against a file on disk (an ETag is only the server's word: size alone).
HASHERS: dict[str, Callable[[str], str]] = {"sha256": sha256_of, "git-blob": git_blob_id_of}


@dataclass(frozen=True)
class RemoteFile:
    """The file of one revision that holds a tensor, with the content id the server gave for it."""

    step: int
    filename: str
    content_id: str
    id_kind: str  # sha256 | git-blob | etag
    size: int
    fmt: str  # "safetensors" | "bin"

    @classmethod
    def of(cls, step: int, filename: str, record: dict, fmt: str) -> RemoteFile:
        """From a manifest file record ({id, id_kind, size})."""
        return cls(step, filename, record["id"], record["id_kind"], int(record["size"]), fmt)

    @property
    def record(self) -> dict:
        return {"id": self.content_id, "id_kind": self.id_kind, "size": self.size}

    @property
    def key(self) -> str:
        """The content id as a cache key: its kind, then the id (hashed when it is not a plain token)."""
        token = self.content_id
        if not re.fullmatch(r"[0-9A-Za-z_.-]{1,128}", token):
            token = hashlib.sha256(token.encode()).hexdigest()
        return f"{self.id_kind}-{token}"


def id_of(record: dict) -> str:
    """A manifest file record's content id with its kind (sha256-…, git-blob-…, etag-…)."""
    return f"{record['id_kind']}-{record['id']}"


class RemoteFiles:
    """The weight files of a repository's revisions, looked up once (paths-info, else HEAD) and kept in
    the manifest; `revision_of` names the branch of a step."""

    def __init__(self, transport: HubTransport, manifest: Manifest, hf_cache: str,
                 revision_of: Callable[[int], str]):  # fmt: skip
        self.transport, self.manifest, self.hf_cache = transport, manifest, hf_cache
        self.repo, self.endpoint = transport.repo, transport.endpoint
        self.api = HfApi(endpoint=self.endpoint)
        self.revision_of = revision_of

    # ---------------------------------------------------------------- which file holds a tensor

    def files(self, step: int) -> dict[str, dict]:
        """The weight files of a revision with their content ids and sizes (one paths-info call, kept)."""
        key = self.revision_of(step)
        known = self.manifest.get("revisions", key)
        if known is None:
            if offline():
                raise GardenError(
                    f"step {step}: HF_HUB_OFFLINE is set and {self.repo}@{key} is not in the cache"
                )
            files = self._records_of(step, formats.WEIGHT_FILES)
            if not files:
                names = ", ".join(formats.WEIGHT_FILES)
                raise GardenError(f"step {step}: {self.repo}@{key} holds none of {names}")
            known = self.manifest.record("revisions", key, value={"files": files}, keep=True)
        return known["files"]

    def weights(self, step: int) -> tuple[str, str]:
        """The file a revision's weights are read through (a shard index or a single file), and its format."""
        found = formats.preferred_weights(self.files(step).__contains__)
        if found is None:  # a revision is recorded only with some weight file
            raise GardenError(f"step {step}: {self.repo}@{self.revision_of(step)} holds no weights")
        return found

    def weight_map(self, step: int) -> dict[str, str] | None:
        """{tensor: shard} from the revision's shard index (read once, kept); None when unsharded."""
        index, _ = self.weights(step)
        if index not in formats.INDEXES:
            return None
        key = self.revision_of(step)
        known = self.manifest.get("revisions", key)
        if "weight_map" in known:
            return known["weight_map"]
        path, _ = self.download(step, index, known["files"][index])
        weight_map = formats.read_weight_map(path, step, index)
        return self.manifest.record("revisions", key, "weight_map", value=weight_map)

    def locate(self, step: int, tensor: str) -> RemoteFile:
        """The file of the revision that holds `tensor`, preferring safetensors."""
        weight_map = self.weight_map(step)
        if weight_map is None:
            return self.single(step)
        if tensor not in weight_map:
            raise formats.missing_tensor_error(step, tensor, list(weight_map))
        shard = weight_map[tensor]
        return RemoteFile.of(step, shard, self.shard(step, shard), self.weights(step)[1])

    def single(self, step: int) -> RemoteFile:
        """The one weight file of an unsharded revision."""
        name, fmt = self.weights(step)
        return RemoteFile.of(step, name, self.files(step)[name], fmt)

    def shard(self, step: int, shard: str) -> dict:
        """A shard's record (content id, size) in the revision's manifest, looked up once and kept."""
        files = self.files(step)
        if shard in files:
            return files[shard]
        if offline():
            raise GardenError(
                f"step {step}: HF_HUB_OFFLINE is set and {shard} of {self.repo} is not in the cache"
            )
        found = self._records_of(step, (shard,))
        if shard not in found:
            raise GardenError(f"step {step}: the shard index names {shard}, which {self.repo} does not hold")
        return self.manifest.record("revisions", self.revision_of(step), "files", shard, value=found[shard])

    def checkpoint_id(self, step: int) -> str:
        """The content ids of every weight file of the revision (shards included), known without reading."""
        ids = {name: id_of(entry) for name, entry in self.files(step).items()}
        for shard in sorted(set((self.weight_map(step) or {}).values())):
            ids[shard] = id_of(self.shard(step, shard))
        return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------- what the server says a file is

    def _records_of(self, step: int, names: tuple[str, ...]) -> dict[str, dict]:
        """The content id and size of each of `names` that the revision holds: one paths-info call, or,
        where the server has no paths-info API (some mirrors and proxies), a HEAD request per file."""
        revision = self.revision_of(step)

        def paths_info() -> list[Any] | None:
            try:
                return self.api.get_paths_info(self.repo, list(names), revision=revision)
            except HfHubHTTPError as err:
                if unsupported(err):
                    return None
                raise

        what = f"step {step}: listing the weight files of {self.repo}@{revision}"
        infos = self.transport.call(paths_info, what)
        if infos is not None:
            return {info.path: self._file_record(step, info) for info in infos if info.path in names}
        self.transport.warn_once(
            "no-paths-info",
            "%s has no paths-info API: garden identifies each file by the ETag of a HEAD request",
            self.endpoint,
        )
        found = {name: self._head_record(step, name) for name in names}
        return {name: record for name, record in found.items() if record is not None}

    def _file_record(self, step: int, info: Any) -> dict:
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
        """A file's ETag and size from a HEAD request; None when the revision does not hold it (where
        the file is `required`, that fails instead)."""
        url = hf_hub_url(self.repo, name, revision=self.revision_of(step), endpoint=self.endpoint)

        def head() -> Any:
            try:
                return get_hf_file_metadata(url, timeout=self.transport.timeout_seconds)
            except HfHubHTTPError as err:
                if not required and (isinstance(err, RemoteEntryNotFoundError) or unsupported(err)):
                    return None
                raise

        meta = self.transport.call(head, f"step {step}: asking {self.endpoint} for the ETag of {name}")
        if meta is None:
            return None
        if not meta.etag or meta.size is None:
            raise GardenError(
                f"step {step}: {self.endpoint} gives {name} of {self.repo} no LFS sha256, no git blob id, "
                "and no ETag and size: garden cannot tell whether a cached copy is current"
            )
        return {"id": meta.etag, "id_kind": "etag", "size": int(meta.size)}

    # ---------------------------------------------------------------- whole files

    def whole_file_in_cache(self, remote: RemoteFile) -> str | None:
        """The whole file, already in the standard Hugging Face cache (an earlier whole download)."""
        found = try_to_load_from_cache(
            self.repo, remote.filename, revision=self.revision_of(remote.step), cache_dir=self.hf_cache
        )
        return found if isinstance(found, str) else None

    def download(self, step: int, filename: str, record: dict) -> tuple[str, bool]:
        """A whole file into the Hugging Face cache, verified against its content id (and size): its path,
        and whether it was fetched now (not found there already)."""
        revision = self.revision_of(step)
        cached = try_to_load_from_cache(self.repo, filename, revision=revision, cache_dir=self.hf_cache)
        if isinstance(cached, str) and self._verified(cached, record):
            return cached, False
        if offline():
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
                etag_timeout=self.transport.timeout_seconds,
            )
            if not self._verified(path, record, fresh=True):
                _remove_cached(path)
                raise TransientError(f"{filename} does not match its {record['id_kind']} {record['id']}")
            return path

        path = self.transport.call(fetch, f"step {step}: downloading {filename}")
        self.transport.count(step, record["size"])
        return path, True

    def _verified(self, path: str, record: dict, fresh: bool = False) -> bool:
        """Size always; the content id once per file (remembered in the manifest by path, size and mtime)
        where it is a hash of the content (sha256 or git blob id; an ETag is only the server's word)."""
        stat = os.stat(path)
        if stat.st_size != record["size"]:
            return False
        hasher = HASHERS.get(record["id_kind"])
        if hasher is None:
            return True
        stamp = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
        if not fresh and self.manifest.get("verified", stamp) == record["id"]:
            return True
        if hasher(path) != record["id"]:
            return False
        self.manifest.record("verified", stamp, value=record["id"])
        return True


def _remove_cached(path: str) -> None:
    """Drop a bad download: the blob it links to and the link."""
    real = os.path.realpath(path)
    for candidate in {real, path}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(candidate)
