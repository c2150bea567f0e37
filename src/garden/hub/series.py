"""A checkpoint series on the Hugging Face Hub: one tensor per checkpoint branch, the branches named as the
model family names them (Pythia's `step{N}`, OLMo-2's `stage1-step{N}-tokens{M}B`; `garden.families`).

Range-read tensors go to garden's own cache (`paths.cache_dir`, env GARDEN_CACHE), keyed by the content id
of the file they came from, with a manifest per repository (`garden.hub.manifest`): a second run asks the
server nothing it already knows and `HF_HUB_OFFLINE=1` works from the caches alone. Whole downloads (shard
indexes, legacy `.bin` files) stay in the standard Hugging Face cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_url
from safetensors import safe_open
from safetensors.torch import save_file

from garden import cache, families, formats
from garden.errors import GardenError
from garden.formats import MappedSafetensors
from garden.hub.identity import RemoteFile, RemoteFiles
from garden.hub.manifest import Manifest
from garden.hub.ranges import RangeReader
from garden.hub.transport import HubTransport, offline
from garden.series import CheckpointSeries, StepTensors

log = logging.getLogger("garden.hub")
HOW = ("cache", "range", "download")  # how a step's tensor was obtained, cheapest first


def default_cache_dir() -> Path:
    """garden's own cache (range-read tensors, Hub manifests): GARDEN_CACHE, else data/cache."""
    return Path(os.environ.get("GARDEN_CACHE") or Path(os.environ.get("GARDEN_DATA_DIR") or "data") / "cache")


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
        keep_files: bool = False,
    ):
        """Branches are parsed by `family`'s revision pattern (or `revision_pattern`); with neither, by
        any registered family's. `keep_files`: a scan's fetched tensors go to garden's tensor cache too
        (by default a scan keeps nothing it fetched once a step is done)."""
        self.repo, self.label, self.identity = repo, label, f"hub:{repo}"
        self.family, self.revision_pattern = family, revision_pattern
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.transport = HubTransport(repo, self.endpoint, retries, backoff_seconds, timeout_seconds, sleep)
        #: The standard Hugging Face cache (HF_HUB_CACHE): whole downloads only.
        self.hf_cache = str(hf_cache) if hf_cache is not None else constants.HF_HUB_CACHE
        #: garden's own cache for this repository: the manifest and the range-read tensors.
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = root / "hub" / repo.replace("/", "--")
        self.known = Manifest(self.cache / "manifest.json", repo)
        self.files = RemoteFiles(self.transport, self.known, self.hf_cache, self.revision)
        self.ranges = RangeReader(self.transport, self.known, self._url)
        #: How each step's tensor was obtained: range | download | cache (the most costly way wins).
        self.how: dict[int, str] = {}
        self._how_lock = threading.Lock()  # the prefetch threads note their reads
        self._revisions: dict[int, families.Revision] | None = None
        self.keep_files = keep_files
        _note_old_cache(self.hf_cache)

    @property
    def manifest(self) -> dict:
        """What the server told us about the repository, as saved (`garden.hub.manifest`)."""
        return self.known.data

    @property
    def fetched(self) -> dict[int, int]:
        """What this process fetched from the server, in bytes, per step (header and index reads included)."""
        return self.transport.fetched

    @property
    def ignores_range(self) -> bool:
        """Whether the server answered a range request with the whole body (HTTP 200)."""
        return self.transport.ignores_range

    @staticmethod
    def offline() -> bool:
        return offline()

    # ---------------------------------------------------------------- revisions

    def steps(self) -> list[int]:
        return list(self.revisions)

    @property
    def revisions(self) -> dict[int, families.Revision]:
        """{step: branch} of the checkpoint branches (the branch list from the manifest when offline or
        already known; parsed here, so a changed model.revision_pattern needs no new listing)."""
        if self.known.branches is None:
            if offline():
                raise GardenError(
                    f"HF_HUB_OFFLINE is set and {self.repo} has never been listed: nothing of it is cached "
                    f"(looked in {self.cache}); run once online first"
                )
            refs = self.transport.call(
                lambda: self.files.api.list_repo_refs(self.repo), f"listing the branches of {self.repo}"
            )
            self.known.record("branches", value=sorted(b.name for b in refs.branches))
        if self._revisions is None:
            where = f"{self.repo} on {self.endpoint}"
            found = families.parse_revisions(self.known.branches, self.family, self.revision_pattern, where)
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

    def _url(self, remote: RemoteFile) -> str:
        return hf_hub_url(
            self.repo, remote.filename, revision=self.revision(remote.step), endpoint=self.endpoint
        )

    # ---------------------------------------------------------------- the series interface

    def locate(self, step: int, tensor: str) -> RemoteFile:
        """The file of the step's revision that holds `tensor`, preferring safetensors."""
        return self.files.locate(step, tensor)

    def fingerprint(self, step: int, tensor: str) -> str:
        return self.locate(step, tensor).key

    def content_id(self, step: int, tensor: str) -> str | None:
        return self.fingerprint(step, tensor)

    def checkpoint_content_id(self, step: int) -> str:
        """The content ids of every weight file of the revision (shards included), known without reading."""
        return self.files.checkpoint_id(step)

    def tensor_names(self, step: int) -> list[str]:
        weight_map = self.files.weight_map(step)
        if weight_map is not None:
            return sorted(weight_map)
        single = self.files.single(step)
        names = self.ranges.names(single)
        if names is None:
            names = sorted(formats.load_bin(Path(self._local_file(single))))
        return names

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        """From the safetensors header or the `.bin`'s data.pkl (small range reads, cached)."""
        return self.ranges.shape(self.locate(step, name), name)

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        remote = self.locate(step, name)
        cached = self._tensor_cache_path(remote, name)
        if cached.is_file():
            return self._from_tensor_cache(step, cached, name)
        if offline():
            whole = self.files.whole_file_in_cache(remote)
            if whole is None:
                raise GardenError(
                    f"step {step}: HF_HUB_OFFLINE is set and {name} of {self.repo}@{self.revision(step)} "
                    "is not cached"
                )
            return formats.read_tensor_file(step, whole, remote.fmt, name, own_memory=True)
        with cache.producing(cached, f"{name} of {self.repo}@{self.revision(step)}"):
            if cached.is_file():  # fetched by another job while this one waited
                return self._from_tensor_cache(step, cached, name)
            tensor, how = self._fetch_tensor(remote, name)
            self._cache_tensor(remote, name, tensor, cached)
        self._note_how(step, how)
        return tensor

    def _cache_tensor(self, remote: RemoteFile, name: str, tensor: torch.Tensor, cached: Path) -> None:
        metadata = {"repo": self.repo, "source_id": remote.content_id, "source_id_kind": remote.id_kind}
        cache.atomic_write(
            cached, lambda tmp: save_file({name: tensor.contiguous()}, str(tmp), metadata=metadata)
        )

    def open_step(self, step: int, names: Sequence[str] = ()) -> StepTensors:
        """A scan's checkpoint: the tensors it will read fetched at once, in a few large range reads per
        file (`spool`); see `HubStep`."""
        return HubStep(self, step, list(names))

    def spool(self, remote: RemoteFile, names: list[str], into: Path) -> None:
        """Tensors `names` of a remote safetensors file written into `into` at their offsets in the file
        (a sparse file of the remote's size: only their bytes take disk), in as few range reads as the
        layout allows: neighbouring tensors (gaps under SPOOL_GAP) in one read, each read at most the
        larger of SPOOL_READ and the largest tensor (a read is held in memory until written). A server that
        ignores Range sends the body from its start: one read then, up to the last byte needed."""
        header = self.ranges.header(remote)
        extents = sorted(formats.safetensors_extent(header, name, remote.size, remote.step, remote.filename,
                                                    on_server=True) for name in names)  # fmt: skip
        extents = [(first, stop) for first, stop in extents if stop > first]
        largest = max((stop - first for first, stop in extents), default=0)
        limit = float("inf") if self.ignores_range else max(SPOOL_READ, largest)
        gap = float("inf") if self.ignores_range else SPOOL_GAP
        reads: list[list[int]] = []
        for first, stop in extents:
            if reads and first - reads[-1][1] <= gap and stop - reads[-1][0] <= limit:
                reads[-1][1] = max(reads[-1][1], stop)
            else:
                reads.append([first, stop])
        read = self.ranges.reader(remote)
        into.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(into, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(handle, remote.size)
            for first, stop in reads:
                os.pwrite(handle, read(first, stop - 1), first)
        finally:
            os.close(handle)
        self._note_how(remote.step, "range")

    def missing_from_cache(self, steps: list[int], tensor: str) -> list[int]:
        """Steps whose tensor could not be read offline (for a clear error before any work)."""
        if not offline():
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
                and self.files.whole_file_in_cache(remote) is None
            ):
                missing.append(step)
        return missing

    def checkpoint_folder(self, step: int) -> Path:
        """The whole checkpoint (config, tokenizer, weights) in the Hugging Face cache, for model-level
        stages; files already there are not fetched again."""
        from huggingface_hub import snapshot_download

        revision = self.revision(step)
        path = self.transport.call(
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

    # ---------------------------------------------------------------- fetching and the tensor cache

    def _fetch_tensor(self, remote: RemoteFile, name: str) -> tuple[torch.Tensor, str]:
        """The tensor's bytes by range requests, or out of one verified whole download (a legacy `.bin`,
        or any `.bin` where the server ignores Range)."""
        tensor = self.ranges.tensor(remote, name)
        if tensor is not None:
            return tensor, "range"
        return formats.read_tensor_file(
            remote.step, self._local_file(remote), "bin", name, own_memory=True
        ), "download"

    def _local_file(self, remote: RemoteFile) -> str:
        path, fetched = self.files.download(remote.step, remote.filename, remote.record)
        if fetched:
            self._note_how(remote.step, "download")
        return path

    def _tensor_cache_path(self, remote: RemoteFile, tensor: str) -> Path:
        """Content-addressed: the source file's content id, and the version of the code that cut the
        tensor out of it (`garden.cache`, kind hub_tensor)."""
        safe_name = tensor.replace("/", "_")
        code = cache.code_version("hub_tensor")
        return self.cache / "tensors" / remote.key / f"{safe_name}.{code}.safetensors"

    def _from_tensor_cache(self, step: int, cached: Path, name: str) -> torch.Tensor:
        self._note_how(step, "cache")
        with safe_open(str(cached), framework="pt") as handle:
            return handle.get_tensor(name)

    def _note_how(self, step: int, how: str) -> None:
        """Record how a step was read; a later cache hit for the same step (the extraction reads the
        reference and the final step twice) does not hide that it was fetched in this run."""
        with self._how_lock:
            if HOW.index(how) >= HOW.index(self.how.get(step, "cache")):
                self.how[step] = how


#: A scan's range reads: neighbouring tensors closer than this are read together (the gap read too)...
SPOOL_GAP = 4 << 20
#: ... in reads of at most this many bytes, or the largest tensor's.
SPOOL_READ = 64 << 20


class HubStep(StepTensors):
    """A scan's checkpoint on the Hub. The tensors it will read are fetched when it opens (in a prefetch
    thread, ahead of the pass), file by file, into spool files under garden's cache (`HubSeries.spool`),
    and mapped from there like a checkpoint on disk; the spools are deleted when the step is closed, so
    a scan of a 24 GB-per-step suite holds a few steps' selected bytes on disk, never the suite. Tensors
    already in garden's tensor cache are read from it; with `keep_files` the fetched ones are added to
    it. A `.bin` (read by ranges tensor by tensor) and offline reads go through `read_tensor`."""

    def __init__(self, series: HubSeries, step: int, names: list[str]):
        super().__init__(series, step)
        self.series: HubSeries = series
        self.remote_of: dict[str, RemoteFile] = {}
        self.mapped: dict[str, MappedSafetensors] = {}
        self.spools: list[Path] = []
        groups: dict[str, tuple[RemoteFile, list[str]]] = {}
        for name in names:
            remote = series.locate(step, name)
            if remote.fmt != "safetensors" or offline() or series._tensor_cache_path(remote, name).is_file():
                continue
            self.remote_of[name] = remote
            groups.setdefault(remote.key, (remote, []))[1].append(name)
        try:
            for key, (remote, group) in groups.items():
                spool = series.cache / "spool" / f"{os.getpid()}-step{step}-{key}.safetensors"
                self.spools.append(spool)
                series.spool(remote, group, spool)
                self.mapped[key] = MappedSafetensors(spool, step, series.ranges.header(remote))
                if series.keep_files:
                    for name in group:
                        series._cache_tensor(
                            remote, name, self.get(name), series._tensor_cache_path(remote, name)
                        )
        except BaseException:
            self.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        remote = self.remote_of.get(name)
        if remote is None:
            return self.series.read_tensor(self.step, name)
        return self.mapped[remote.key].tensor(name)

    def close(self) -> None:
        for handle in self.mapped.values():
            handle.close()
        self.mapped.clear()
        for spool in self.spools:
            spool.unlink(missing_ok=True)


_OLD_CACHE_NOTED: set[str] = set()


def _note_old_cache(hf_cache: str) -> None:
    """Earlier garden versions kept their Hub cache inside the Hugging Face cache (`hub/garden/`), which
    `hf cache ls` reports as an inconsistency; say once that it is unused and can go."""
    old = Path(hf_cache) / "garden"
    if hf_cache not in _OLD_CACHE_NOTED and old.is_dir():
        _OLD_CACHE_NOTED.add(hf_cache)
        log.warning("%s is an old garden cache that is no longer used: it can be deleted", old)
