"""Tensors read out of remote weight files by range requests, fetching per step no more than:
- safetensors (single or sharded): the header by a range request, then the selected tensor's bytes;
- zip-format `.bin` (single or sharded): the zip's directory and `data.pkl` by range requests, read by
  `garden.torchzip` without executing anything, then the selected tensor's storage bytes.
Headers and layouts never change for a content id: they are kept in the manifest. A legacy (pre-zip)
`.bin`, or any `.bin` on a server that ignores `Range`, cannot be read this way: the caller downloads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from garden import cache, formats, torchzip
from garden.errors import GardenError
from garden.hub.identity import RemoteFile
from garden.hub.manifest import Manifest
from garden.hub.transport import HubTransport, RangeIgnored, TransientError, offline
from garden.torchzip import ReadRange

T = TypeVar("T")


class RangeReader:
    """Range reads of one repository's weight files; `url_of` gives a file's URL at its revision."""

    def __init__(self, transport: HubTransport, manifest: Manifest, url_of: Callable[[RemoteFile], str]):
        self.transport, self.manifest, self.url_of = transport, manifest, url_of

    def reader(self, remote: RemoteFile) -> ReadRange:
        """Bytes [first, last] of the file; a server ignoring Range is read through for a safetensors
        file, and raises RangeIgnored for a `.bin` (whose reads start at the end of the file)."""
        url = self.url_of(remote)
        whole_body = remote.fmt != "bin"
        return lambda first, last: self.transport.read_range(url, remote, first, last, whole_body)

    def tensor(self, remote: RemoteFile, name: str) -> torch.Tensor | None:
        """Tensor `name` from its bytes alone; None where the file has to be downloaded whole instead."""
        if remote.fmt == "safetensors":
            return formats.safetensors_tensor(
                self.reader(remote), remote.size, self.header(remote), name, remote.step, remote.filename,
                on_server=True,
            )  # fmt: skip
        layout = self.bin_layout(remote)
        if layout is None:
            return None
        try:
            return self._zip_read(
                remote,
                lambda read: formats.bin_tensor(read, remote.size, layout, name, remote.step),
                f"reading {name} from {remote.filename}",
            )
        except RangeIgnored:
            return None

    def names(self, remote: RemoteFile) -> list[str] | None:
        """The tensors of a file, from its header or layout; None for a file read only whole."""
        if remote.fmt == "safetensors":
            return formats.header_names(self.header(remote))
        layout = self.bin_layout(remote)
        return None if layout is None else sorted(layout["tensors"])

    def shape(self, remote: RemoteFile, name: str) -> tuple[int, ...] | None:
        """A tensor's shape from the header or the layout (None where neither can be read by ranges)."""
        if remote.fmt == "safetensors":
            entry = self.header(remote).get(name)
        else:
            layout = self.bin_layout(remote)
            entry = None if layout is None else layout["tensors"].get(name)
        return None if entry is None else tuple(entry["shape"])

    def header(self, remote: RemoteFile) -> dict:
        """The safetensors header of a remote file (kept in the manifest by content id)."""
        known = self.manifest.get("headers", remote.key)
        if known is not None:
            return known
        if offline():
            raise GardenError(
                f"step {remote.step}: HF_HUB_OFFLINE is set and the header of {remote.filename} is not cached"
            )
        header = formats.safetensors_header(self.reader(remote), remote.size, remote.step, remote.filename)
        return self.manifest.record("headers", remote.key, value=header)

    def bin_layout(self, remote: RemoteFile) -> dict | None:
        """Where each tensor of a zip-format `.bin` lives (from its directory and data.pkl, read by ranges
        and kept in the manifest); None for a legacy `.bin`, which is downloaded whole instead."""
        code = cache.code_version("hub_tensor")
        known = self.manifest.get("headers", remote.key)
        if known is not None and known.get("code") == code:
            return None if known.get("legacy") else known
        if self.transport.ignores_range:
            return None
        if offline():
            raise GardenError(
                f"step {remote.step}: HF_HUB_OFFLINE is set and the layout of {remote.filename} is not cached"
            )
        try:
            layout = self._zip_read(
                remote,
                lambda read: formats.bin_layout(read, remote.size),
                f"reading the layout of {remote.filename}",
            )
        except RangeIgnored:
            return None
        except torchzip.NotTorchZip as err:
            self.transport.warn_once(
                f"legacy:{remote.key}",
                "step %d: %s is not a zip-format checkpoint (%s): it is downloaded whole and verified",
                remote.step, remote.filename, err,
            )  # fmt: skip
            layout = {"legacy": True}
        layout["code"] = code
        self.manifest.record("headers", remote.key, value=layout)
        return None if layout.get("legacy") else layout

    def _zip_read(self, remote: RemoteFile, use: Callable[[ReadRange], T], what: str) -> T:
        """`use` the remote `.bin`'s reads under the retry loop: bytes that fail their CRC-32 are fetched
        again; the reader's own errors name the step and the file; a legacy file (NotTorchZip) and a
        server ignoring Range (RangeIgnored) pass through for the caller to fall back on a whole
        download."""
        read = self.reader(remote)

        def attempt() -> T:
            try:
                return use(read)
            except torchzip.CorruptMember as err:
                raise TransientError(str(err)) from err
            except (torchzip.NotTorchZip, RangeIgnored):
                raise
            except GardenError as err:
                if str(err).startswith(f"step {remote.step}:"):  # a failed read already names the step
                    raise
                raise GardenError(f"step {remote.step}: {remote.filename}: {err}") from err

        return self.transport.call(attempt, f"step {remote.step}: {what}")
