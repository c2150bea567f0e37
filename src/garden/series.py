"""Checkpoint series: the training steps a run has, and one tensor read from one step at a time.

A series never loads a whole model: safetensors are opened lazily (`safe_open`, which maps the file and
materialises only the requested tensor) and zip-format `.bin` files are memory-mapped
(`torch.load(mmap=True, weights_only=True)`), so reading a tensor touches only that tensor's pages.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import torch

from garden import families, formats
from garden.cache import ContentMemo, file_content_id
from garden.errors import GardenError
from garden.families import Revision, TensorSpec
from garden.formats import (  # the checkpoint formats, shared with the Hub source
    MappedSafetensors,
    WeightFiles,
    find_weight_files,
    held_content_id,
    missing_tensor_error,
    read_tensor_from,
    read_tensors_from,
    tensor_content_id,
    tensor_quick_id,
)

BLOCK_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CheckpointSeries(ABC):
    """A training run seen as checkpoints keyed by training step."""

    #: Stable identity of the series' content source, used in cache keys.
    identity: str
    #: Short label for run names and logs.
    label: str
    #: Whether reads go over the network (then the extraction fetches ahead while it computes).
    remote: bool = False

    @abstractmethod
    def steps(self) -> list[int]:
        """Training steps available, ascending."""

    @abstractmethod
    def tensor_names(self, step: int) -> list[str]:
        """Names of the tensors stored at a step."""

    @abstractmethod
    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        """One tensor of one step, in its stored dtype, on the CPU."""

    @abstractmethod
    def fingerprint(self, step: int, tensor: str) -> str:
        """Changes whenever the stored weights holding `tensor` change (invalidates cached statistics)."""

    def fingerprint_of(self, step: int, tensor: str, held: torch.Tensor) -> str:
        """`fingerprint`, from the tensor as just read (stored dtype): a series that hashes bytes hashes
        these instead of reading them again."""
        return self.fingerprint(step, tensor)

    def quick_id(self, step: int, tensor: str) -> str | None:
        """A cheap stand-in for `content_id` that differs wherever the content does (duplicates are looked
        for among equal quick ids only); the content id itself by default."""
        return self.content_id(step, tensor)

    def read_tensors(self, step: int, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors of one step ({name: tensor}, in the order asked); a source that can, reads each
        file once for all of them (a whole-model scan reads a checkpoint once)."""
        return {name: self.read_tensor(step, name) for name in names}

    @contextlib.contextmanager
    def holding_ids(self) -> Iterator[None]:
        """Content ids computed inside are remembered on disk once, at the end, instead of after each one
        (a scan fingerprints thousands of tensors); nothing to do for most series."""
        yield

    def open_step(self, step: int, names: Sequence[str] = ()) -> StepTensors:
        """One checkpoint held open for many reads of its tensors, one at a time (a whole-model scan reads
        the reference, the previous and the current step for each tensor in turn); close it when done.
        `names` are the tensors that will be read (a remote series fetches them at once)."""
        return StepTensors(self, step)

    def model_config(self) -> dict | None:
        """The Hugging Face config.json of the series, when it has one."""
        return None

    def prepare(self) -> None:  # noqa: B027  (a hook most series need not override)
        """Do the expensive part of opening now (the tiny series trains); nothing for most series."""

    def artifacts(self) -> list[Path]:
        """Files of the series a run keeps beside its results (the tiny series' training log)."""
        return []

    def training_history(self):
        """The training log of the series (a table of step, loss, lr), where it has one."""
        return None

    def training_monitor(self) -> dict | None:
        """What a live monitor saw while the series trained (the tiny series: its summary, events and stop
        reason); None where nothing watched the training."""
        return None

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        """The shape of a tensor where it is known without reading its values (None otherwise)."""
        return None

    def missing_from_cache(self, steps: list[int], tensor: str) -> list[int]:
        """Steps that cannot be read without the network while offline (none for files on disk)."""
        return []

    def checkpoint_folder(self, step: int) -> Path:
        """A local folder holding the whole checkpoint (for `from_pretrained` in model-level stages)."""
        raise GardenError(f"{self.label} cannot provide whole checkpoints")

    def fetch_report(self, steps: list[int], tensor: str) -> list[dict] | None:
        """Per-step provenance of remote reads (file, sha256, size, bytes fetched); None when local."""
        return None

    def bytes_fetched(self) -> int:
        """Bytes this object fetched over the network so far (0 for files on disk)."""
        return 0

    def content_id(self, step: int, tensor: str) -> str | None:
        """A content hash of the stored weights holding `tensor`, where one is known without reading
        them (the Hub's LFS sha256); identical ids mark duplicated checkpoints."""
        return None

    def checkpoint_content_id(self, step: int) -> str:
        """A content hash of the whole checkpoint a model-level stage loads (keys its cached records)."""
        raise GardenError(f"{self.label} cannot provide whole checkpoints")

    def same_checkpoint(self, step: int, earlier: int) -> bool:
        """Whether two steps whose content ids match are one checkpoint served twice (the Hub's ids are
        those of whole weight files: they are)."""
        return True

    def num_layers(self, step: int) -> int | None:
        """Number of transformer blocks, from config.json or else from the tensor names."""
        config = self.model_config()
        if config and isinstance(config.get("num_hidden_layers"), int):
            return config["num_hidden_layers"]
        blocks = {int(m.group(1)) for name in self.tensor_names(step) if (m := BLOCK_TENSOR.search(name))}
        return max(blocks) + 1 if blocks else None


class StepTensors:
    """A checkpoint open for reads of its tensors: here each read is `read_tensor`'s (a copy the caller
    owns); a series that can maps them instead (`MappedStep`)."""

    def __init__(self, series: CheckpointSeries, step: int):
        self.series, self.step = series, step

    def get(self, name: str) -> torch.Tensor:
        return self.series.read_tensor(self.step, name)

    def close(self) -> None:
        """Let go of the files (tensors already handed out stay valid)."""


class MappedStep(StepTensors):
    """A checkpoint of safetensors files on disk, each file opened once and its header read once; every
    tensor is mapped from the page cache (no copy) and its pages let go when the tensor is dropped."""

    def __init__(self, series: CheckpointSeries, files: WeightFiles):
        super().__init__(series, files.step)
        self.files = files
        self._open: dict[Path, MappedSafetensors] = {}

    def get(self, name: str) -> torch.Tensor:
        path = self.files.file_for(name)
        if path is None:
            raise missing_tensor_error(self.step, name, self.files.tensor_names())
        if path not in self._open:
            self._open[path] = MappedSafetensors(path, self.step)
        return self._open[path].tensor(name)

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


class Prefetcher:
    """Reads the tensors a pass will ask for, `depth` steps ahead of it, in worker threads: while the pass
    computes step k, steps k+1..k+depth are being fetched. At most `depth` tensors wait in memory.

    `order` is the pass's expected sequence of reads; a read that is not the next expected one (the pass
    took another path, e.g. after excluding a bad step) drops the guesses before it and is read at once.
    Errors surface where the pass reads the step, as if it had read it itself.
    """

    def __init__(self, read: Callable[[int], torch.Tensor], order: Sequence[int], depth: int):
        self._read = read
        self._order = deque(order)
        self._pending: deque[tuple[int, Future]] = deque()
        self._depth = max(0, int(depth))
        self._pool = (
            ThreadPoolExecutor(self._depth, thread_name_prefix="garden-fetch") if self._depth else None
        )
        self._top_up()

    def _top_up(self) -> None:
        while self._pool is not None and self._order and len(self._pending) < self._depth:
            step = self._order.popleft()
            self._pending.append((step, self._pool.submit(self._read, step)))

    def get(self, step: int) -> torch.Tensor:
        if any(pending == step for pending, _ in self._pending):
            while True:
                pending, future = self._pending.popleft()
                if pending == step:
                    self._top_up()
                    return future.result()
                future.cancel()
        if step in self._order:  # the pass skipped ahead of every read under way
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            while self._order.popleft() != step:
                pass
            self._top_up()
        return self._read(step)

    def close(self) -> None:
        """Stop fetching: queued reads are cancelled, the ones under way are waited for."""
        self._order.clear()
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The training log garden's tiny series writes beside its checkpoints (step, loss, lr).
TRAIN_LOG = "train_log.csv"


def read_training_log(path: Path):
    """A training log (`TRAIN_LOG`) as a table, or None where there is none."""
    import pandas as pd

    return pd.read_csv(path) if path.is_file() else None


class LocalSeries(CheckpointSeries):
    """A directory of checkpoint folders, each a Hugging Face checkpoint (any of the four layouts), named
    like its family's revisions: `step{N}/` (GPT-NeoX), `stage1-step{N}-tokens{M}B/` (OLMo-2), or as a
    Hugging Face `Trainer` saves them in its `output_dir`: `checkpoint-{N}/` (any family)."""

    def __init__(self, root: str | Path, label: str = "local", memo_dir: Path | None = None,
                 family: families.Family | None = None, revision_pattern: str | None = None,
                 must_exist: bool = True):  # fmt: skip
        """`memo_dir` keeps the content hashes of the series' files between runs (hashed once per file
        version); without it they are hashed once per process. Folder names are parsed by `family`'s
        revision pattern (or `revision_pattern`); with neither, by any registered family's."""
        self.root = Path(root).expanduser()
        if not str(root).strip():
            raise GardenError("model.path is empty: give the directory that holds the step{N}/ folders")
        if must_exist and not self.root.is_dir():
            raise GardenError(f"model.path {self.root} is not a directory")
        self.label = label
        self.family = family
        self.revision_pattern = revision_pattern
        self.identity = f"local:{self.root.resolve()}"
        name = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        self.memo = ContentMemo(None if memo_dir is None else Path(memo_dir) / f"{name}.json")
        self._holding = 0

    def training_history(self):
        """The folder's `TRAIN_LOG` (a series garden trained, analysed as itself or as `model=local`)."""
        return read_training_log(self.root / TRAIN_LOG)

    @cached_property
    def revisions(self) -> dict[int, Revision]:
        """{step: the folder's name parsed}: its step, and its tokens where the name has them."""
        names = [child.name for child in self.root.iterdir() if child.is_dir()]
        found = families.parse_revisions(names, self.family, self.revision_pattern, f"model.path {self.root}",
                                         trainer_folders=True)  # fmt: skip
        if not found:
            named = self.revision_pattern or (self.family.revision_pattern if self.family else None)
            raise GardenError(
                f"model.path {self.root} holds no checkpoint folders (e.g. step0/, step1000/, "
                f"stage1-step1000-tokens5B/, or a Trainer's checkpoint-500/)"
                f"{f' matching {named!r}' if named else ''}"
            )
        return found

    @cached_property
    def _step_folders(self) -> dict[int, Path]:
        return {step: self.root / revision.name for step, revision in self.revisions.items()}

    def steps(self) -> list[int]:
        return list(self._step_folders)

    def folder(self, step: int) -> Path:
        try:
            return self._step_folders[step]
        except KeyError:
            raise GardenError(f"step {step} is not in {self.root}") from None

    def checkpoint_folder(self, step: int) -> Path:
        return self.folder(step)

    def weight_files(self, step: int) -> WeightFiles:
        return find_weight_files(step, self.folder(step))

    def tensor_names(self, step: int) -> list[str]:
        return self.weight_files(step).tensor_names()

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        return read_tensor_from(self.weight_files(step), name)

    def read_tensors(self, step: int, names: list[str]) -> dict[str, torch.Tensor]:
        return read_tensors_from(self.weight_files(step), names)

    def open_step(self, step: int, names: Sequence[str] = ()) -> StepTensors:
        """Safetensors are mapped (`MappedStep`); a `.bin` is read a tensor at a time."""
        files = self.weight_files(step)
        return MappedStep(self, files) if files.fmt == "safetensors" else StepTensors(self, step)

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        """From the safetensors header, or the memory-mapped `.bin`'s pickle (no values are read)."""
        return formats.tensor_shape(self.weight_files(step), name)

    def fingerprint(self, step: int, tensor: str) -> str:
        """A hash of the tensor's stored dtype, shape and bytes: its content, not its path or date."""
        return self._remembered(step, tensor, tensor, tensor_content_id)

    def _remembered(self, step: int, tensor: str, part: str,
                    compute: Callable[[WeightFiles, str], str]) -> str:  # fmt: skip
        """An id of `tensor` at `step` (`part` names which), computed once per version of the file holding
        it and remembered (saved now, or at the end of `holding_ids`)."""
        files = self.weight_files(step)
        holder = files.file_for(tensor)
        if holder is None:
            raise missing_tensor_error(step, tensor, files.tensor_names())
        found = self.memo.get(holder, part, lambda: compute(files, tensor))
        if not self._holding:
            self.memo.save()
        return found

    @contextlib.contextmanager
    def holding_ids(self) -> Iterator[None]:
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                self.memo.save()

    def content_id(self, step: int, tensor: str) -> str | None:
        """The tensor's content hash: a step with an earlier step's id may repeat that checkpoint
        (`same_checkpoint` tells)."""
        return self.fingerprint(step, tensor)

    def fingerprint_of(self, step: int, tensor: str, held: torch.Tensor) -> str:
        return self._remembered(step, tensor, tensor, lambda files, name: held_content_id(files, name, held))

    def quick_id(self, step: int, tensor: str) -> str | None:
        """Three 64 KiB spans of the tensor's bytes hashed (`formats.tensor_quick_id`), remembered like
        the content ids: what duplicate detection reads before the pass, instead of every byte."""
        return self._remembered(step, tensor, f"{tensor}#quick", tensor_quick_id)

    def same_checkpoint(self, step: int, earlier: int) -> bool:
        """Whole step folders compared (hashed only for steps whose tensor matched), so a tensor that
        stops moving in a run that goes on is not taken for a duplicated checkpoint."""
        return self.checkpoint_content_id(step) == self.checkpoint_content_id(earlier)

    def checkpoint_content_id(self, step: int) -> str:
        """A hash over every file of the step folder (weights, config, tokenizer), by name."""
        folder = self.folder(step)
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            content = self.memo.get(path, "", lambda p=path: file_content_id(p))
            digest.update(f"{path.name}:{content};".encode())
        self.memo.save()
        return digest.hexdigest()

    def model_config(self) -> dict | None:
        for candidate in (
            self.root / "config.json",
            *(f / "config.json" for f in self._step_folders.values()),
        ):
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text())
                except json.JSONDecodeError as err:
                    raise GardenError(f"unreadable {candidate}: {err}") from err
        return None


class DerivedTensors(CheckpointSeries):
    """A series that also serves derived tensors (`TensorSpec.derive`: q rows of a fused qkv, separate
    q/k/v joined): a read reads the stored parts and combines them; fingerprints and content ids combine
    the parts', so caches and duplicates follow the stored bytes. Everything else is the inner series'."""

    def __init__(self, inner: CheckpointSeries, spec: TensorSpec):
        self.inner, self.spec = inner, spec
        self.identity, self.label, self.remote = inner.identity, inner.label, inner.remote
        try:  # the derivation's code is part of what cached statistics depend on
            code = inspect.getsource(spec.derive)  # type: ignore[arg-type]
        except (TypeError, OSError):  # a builtin such as torch.cat
            code = repr(spec.derive)
        self._how = f"{spec.how}|{hashlib.sha256(code.encode()).hexdigest()[:12]}"

    def __getattr__(self, name: str):  # series-specific attributes (root, revisions, ...)
        return getattr(self.inner, name)

    def _combined(self, ids: list[str | None]) -> str | None:
        if any(i is None for i in ids):
            return None
        return hashlib.sha256(f"{self._how}|{'|'.join(ids)}".encode()).hexdigest()  # type: ignore[arg-type]

    def steps(self) -> list[int]:
        return self.inner.steps()

    def tensor_names(self, step: int) -> list[str]:
        names = self.inner.tensor_names(step)
        return [*names, self.spec.name] if all(p in names for p in self.spec.parts) else names

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        if name != self.spec.name:
            return self.inner.read_tensor(step, name)
        return self.spec.derive([self.inner.read_tensor(step, part) for part in self.spec.parts])

    def fingerprint(self, step: int, tensor: str) -> str:
        if tensor != self.spec.name:
            return self.inner.fingerprint(step, tensor)
        return self._combined([self.inner.fingerprint(step, part) for part in self.spec.parts])  # type: ignore[return-value]

    def content_id(self, step: int, tensor: str) -> str | None:
        if tensor != self.spec.name:
            return self.inner.content_id(step, tensor)
        return self._combined([self.inner.content_id(step, part) for part in self.spec.parts])

    def fingerprint_of(self, step: int, tensor: str, held: torch.Tensor) -> str:
        if tensor != self.spec.name:
            return self.inner.fingerprint_of(step, tensor, held)
        return self.fingerprint(step, tensor)  # (the parts' bytes, not the derived tensor's)

    def quick_id(self, step: int, tensor: str) -> str | None:
        if tensor != self.spec.name:
            return self.inner.quick_id(step, tensor)
        return self._combined([self.inner.quick_id(step, part) for part in self.spec.parts])

    def open_step(self, step: int, names: Sequence[str] = ()) -> StepTensors:
        stored = [part for name in names for part in (self.spec.parts if name == self.spec.name else (name,))]
        return _DerivedStep(self, self.inner.open_step(step, list(dict.fromkeys(stored))))

    def holding_ids(self):
        return self.inner.holding_ids()

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        return None if name == self.spec.name else self.inner.tensor_shape(step, name)

    def missing_from_cache(self, steps: list[int], tensor: str) -> list[int]:
        parts = self.spec.parts if tensor == self.spec.name else (tensor,)
        return sorted({s for part in parts for s in self.inner.missing_from_cache(steps, part)})

    def fetch_report(self, steps: list[int], tensor: str) -> list[dict] | None:
        if tensor != self.spec.name:
            return self.inner.fetch_report(steps, tensor)
        reports = [self.inner.fetch_report(steps, part) or [] for part in self.spec.parts]
        rows = {(row["step"], row["file"]): row for report in reports for row in report}  # one per file
        return list(rows.values()) or None

    def model_config(self) -> dict | None:
        return self.inner.model_config()

    def checkpoint_folder(self, step: int) -> Path:
        return self.inner.checkpoint_folder(step)

    def checkpoint_content_id(self, step: int) -> str:
        return self.inner.checkpoint_content_id(step)

    def same_checkpoint(self, step: int, earlier: int) -> bool:
        return self.inner.same_checkpoint(step, earlier)

    def prepare(self) -> None:
        self.inner.prepare()

    def artifacts(self) -> list[Path]:
        return self.inner.artifacts()

    def training_history(self):
        return self.inner.training_history()

    def training_monitor(self) -> dict | None:
        return self.inner.training_monitor()

    def bytes_fetched(self) -> int:
        return self.inner.bytes_fetched()

    def num_layers(self, step: int) -> int | None:
        return self.inner.num_layers(step)


class _DerivedStep(StepTensors):
    """A checkpoint of a `DerivedTensors` series: its derived tensor made from the inner step's parts."""

    def __init__(self, series: DerivedTensors, inner: StepTensors):
        super().__init__(series, inner.step)
        self.spec, self.inner = series.spec, inner

    def get(self, name: str) -> torch.Tensor:
        if name != self.spec.name:
            return self.inner.get(name)
        return self.spec.derive([self.inner.get(part) for part in self.spec.parts])

    def close(self) -> None:
        self.inner.close()


def find_duplicates(series: CheckpointSeries, steps: list[int], tensor: str) -> dict[int, int]:
    """{step: earlier step with byte-identical weights} among `steps`, where content ids are known. Only
    steps whose quick id another step shares can repeat a checkpoint: their full content ids are read,
    the others' bytes are left for the pass to hash as it reads them."""
    probes = {step: series.quick_id(step, tensor) for step in steps}
    shared = Counter(probe for probe in probes.values() if probe is not None)
    first_with: dict[str, int] = {}
    duplicates: dict[int, int] = {}
    for step in steps:
        if probes[step] is None or shared[probes[step]] < 2:
            continue
        content = series.content_id(step, tensor)
        if content is None:
            continue
        if content in first_with and series.same_checkpoint(step, first_with[content]):
            duplicates[step] = first_with[content]
        elif content not in first_with:
            first_with[content] = step
    return duplicates


def apply_duplicate_policy(steps: list[int], duplicates: dict[int, int], policy: str) -> list[int]:
    """Drop (exclude), keep, or refuse (error) checkpoints that duplicate an earlier one.

    A duplicated branch looks exactly like a frozen or forking dynamic, so the default is to drop it.
    """
    if not duplicates or policy == "keep":
        return list(steps)
    listing = ", ".join(f"step{d} = step{o}" for d, o in sorted(duplicates.items()))
    if policy == "error":
        raise GardenError(
            f"duplicated checkpoints (identical weights): {listing}; set series.on_duplicate=exclude or keep"
        )
    return [s for s in steps if s not in duplicates]
