"""Where garden writes, checked before any work: the data folder, the Hub and Hugging Face caches and the
MLflow store, each opened and written once in seconds, so a read-only folder or a store that cannot be
written fails before training or reading, naming the setting.

The settings' own types and ranges are the schema's (garden.settings): checked when the composed config
is read into Settings.
"""

from __future__ import annotations

import sqlite3
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from garden.errors import GardenError
from garden.settings import Settings

# ------------------------------------------------------------------------------- where garden writes


def check_writable(key: str, folder: str | Path) -> None:
    """Create the folder if needed and write (then delete) a file in it."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".garden-write-check."):
            pass
    except OSError as err:
        raise GardenError(f"{key}={str(folder)!r} is not writable ({err.strerror or err}); "
                          "valid: a folder garden can create and write to") from None  # fmt: skip


def check_paths(settings: Settings) -> None:
    paths = settings.paths
    check_writable("paths.data_dir", paths.data_dir)
    if settings.model.source == "hub":
        check_writable("paths.cache_dir", paths.cache_dir)
    if paths.hf_cache:
        check_writable("paths.hf_cache", paths.hf_cache)


def check_tracking_store(uri: str, timeout_seconds: float = 5.0) -> None:
    """Open the MLflow store and write to it once, in seconds, before a run is created. A sqlite store
    takes (and rolls back) a write lock; a file store gets a probe file; an HTTP server answers /health.
    Other stores (databases, Databricks) are left to MLflow."""
    parsed = urllib.parse.urlparse(uri)
    valid = "a sqlite:///<path>, file:<folder> or http(s):// MLflow store garden can write to"
    try:
        if parsed.scheme == "sqlite":
            path = uri.removeprefix("sqlite:///")
            if path in ("", ":memory:"):
                return
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                raise GardenError(f"tracking.uri={uri!r}: the folder {parent} does not exist; valid: {valid}")
            if not Path(path).expanduser().exists():  # MLflow creates it: the folder must take a file
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".garden-write-check."):
                    return
            connection = sqlite3.connect(path, timeout=timeout_seconds)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            finally:
                connection.close()
        elif parsed.scheme in ("", "file"):
            folder = parsed.path if parsed.scheme == "file" else uri
            check_writable("tracking.uri", folder)
        elif parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_seconds):
                pass
    except GardenError:
        raise
    except (OSError, sqlite3.Error) as err:
        raise GardenError(
            f"tracking.uri={uri!r} cannot be opened for writing ({err}); valid: {valid}"
        ) from None


def check_environment(settings: Settings) -> None:
    """The places garden writes to: the data folder, the Hugging Face cache and the MLflow store."""
    check_paths(settings)
    check_tracking_store(settings.tracking.uri)
