"""olah (a self-hosted Hugging Face mirror, not written by garden) serving `step{N}/` folders, offline.

Each folder becomes a branch of a bare git repository of plain blobs (no git-lfs), which olah's mirror
mode serves as a Hub-API server: refs and paths-info answered from git (blob ids, no LFS sha256), file
downloads that ignore `Range` (a chunked `200` with the whole body), missing repositories and revisions
answered 401/404. The tests point garden at it through `series.endpoint`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STEP_DIR = re.compile(r"^step(\d+)$")


def _git(repo: Path, *args: str, stdin: bytes | None = None, env: dict | None = None) -> str:
    done = subprocess.run(["git", "--git-dir", str(repo), *args], input=stdin, capture_output=True,
                          check=True, env=env)  # fmt: skip
    return done.stdout.decode().strip()


def _tree(repo: Path, folder: Path) -> str:
    """A folder as a git tree of plain blobs (written with git's plumbing: no work tree, no filters)."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            entries.append(f"040000 tree {_tree(repo, path)}\t{path.name}")
        else:
            entries.append(
                f"100644 blob {_git(repo, 'hash-object', '-w', '--no-filters', str(path))}\t{path.name}"
            )
    return _git(repo, "mktree", stdin=("\n".join(entries) + "\n").encode() if entries else b"")


def build_mirror(series_root: Path, mirrors: Path, repo_id: str) -> dict[str, str]:
    """`<mirrors>/models/<repo_id>`: one branch per step folder (fixed dates, so commits repeat)."""
    steps = sorted((int(m.group(1)), p) for p in series_root.iterdir() if (m := STEP_DIR.match(p.name)))
    repo = mirrors / "models" / repo_id
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    refs, parent = {}, None
    for i, (step, folder) in enumerate(steps):
        date = f"{1_700_000_000 + 60 * i} +0000"
        env = {**os.environ, "GIT_AUTHOR_NAME": "garden", "GIT_AUTHOR_EMAIL": "garden@example.invalid",
               "GIT_COMMITTER_NAME": "garden", "GIT_COMMITTER_EMAIL": "garden@example.invalid",
               "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}  # fmt: skip
        parents = ["-p", parent] if parent else []
        parent = _git(repo, "commit-tree", _tree(repo, folder), "-m", f"step{step}", *parents, env=env)
        _git(repo, "update-ref", f"refs/heads/step{step}", parent)
        refs[f"step{step}"] = parent
    _git(repo, "update-ref", "refs/heads/main", parent)
    return refs


class OlahServer:
    """olah-cli in offline mode on a free port of 127.0.0.1, serving the mirrors under `mirrors`."""

    def __init__(self, mirrors: Path, workdir: Path, startup_seconds: float = 60.0):
        self.mirrors = Path(mirrors).resolve()
        self.workdir = Path(workdir).resolve()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> OlahServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.workdir / "repos"}"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n\n[accessibility]\noffline = true\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"} | {"HF_HUB_OFFLINE": "1"}
        cli = Path(sys.executable).parent / "olah-cli"
        self._log = open(self.workdir / "olah.log", "wb")
        self.process = subprocess.Popen(
            [str(cli), "-c", str(config), "--host", "127.0.0.1", "--port", str(self.port),
             "--log-path", str(self.workdir / "logs")],
            cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}; see {self._log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/api/models/probe/probe/refs", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer: it is up
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"olah did not answer within {self.startup_seconds} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
