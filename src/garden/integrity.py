"""Content hashes of files on disk: downloads are checked against the id their source publishes (the
LFS sha256, or for a plain git file its git blob id)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def git_blob_id_of(path: str | Path) -> str:
    """git's object id of a file: sha1 over `blob <size>\\0` and the bytes (what `git hash-object` prints)."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
