"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the tests and `make bench` (not shipped).

It serves the endpoints huggingface_hub uses to read a model repository (`refs`, `paths-info`, `resolve`
with HEAD and byte ranges) from folders on disk laid out as `<root>/<org>/<name>/<branch>/`, and behaves
like the servers users meet, not like garden's client expects:

- ids="lfs": weight files carry LFS metadata (sha256) as on the Hub; "blob": every file is a plain git
  blob (no LFS metadata, ETag = git blob id), as a mirror of a git repository serves it; "etag":
  paths-info gives neither (only the ETag of a HEAD request identifies the content);
- honour_range=False: range requests are answered `200` with the whole body, as some mirrors and
  proxies do;
- a missing repository is `401 RepoNotFound` (what the Hub answers an anonymous client), a missing
  revision `404 RevisionNotFound`, a missing file `404 EntryNotFound`;
- bandwidth (bytes/s per connection) and latency (seconds per request) for the bench;
- faults (5xx answers, dropped connections, truncated or corrupted bodies) to test retries.

It counts the body bytes it sends (`bytes_sent`, also at GET /_fakehub/stats). Point the real client at
it with `HF_ENDPOINT=<server.url>`. Run alone: `python tests/fakehub.py ROOT [--bandwidth B] ...` prints
the URL and serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

LFS_SUFFIXES = (".safetensors", ".bin")
ID_MODES = ("lfs", "blob", "etag")
CHUNK = 1 << 20  # large writes: the server shares the machine's two cores with the client


@dataclass
class Fault:
    """Answer the next `times` requests whose path contains `match` with `kind`, after letting `after`
    of them through: 500 | drop (close mid-body) | truncate (send half the promised body) | corrupt (flip
    the first byte of the body)."""

    match: str
    kind: str
    times: int = 1
    after: int = 0


class FakeHub:
    def __init__(
        self,
        root: Path,
        ids: str = "lfs",
        honour_range: bool = True,
        bandwidth: float | None = None,
        latency: float = 0.0,
        port: int = 0,
    ):
        if ids not in ID_MODES:
            raise ValueError(f"ids={ids!r}; valid: {', '.join(ID_MODES)}")
        self.root = Path(root)
        self.ids = ids
        self.honour_range = honour_range
        self.bandwidth = bandwidth
        self.latency = latency
        self.faults: list[Fault] = []
        self.bytes_sent = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take_fault(self, path: str) -> str | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in path:
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    fault.times -= 1
                    return fault.kind
        return None

    def hashes(self, path: Path) -> tuple[str, str]:
        """(sha256, git blob sha1) of a file, memoised by path, size and mtime."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            sha256 = hashlib.sha256()
            blob = hashlib.sha1(f"blob {stat.st_size}\0".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    sha256.update(block)
                    blob.update(block)
            self._hashes[key] = (sha256.hexdigest(), blob.hexdigest())
        return self._hashes[key]

    def is_lfs(self, name: str) -> bool:
        return self.ids == "lfs" and name.endswith(LFS_SUFFIXES)

    def commit(self, repo: str, branch: str) -> str:
        return hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -------------------------------------------------------------- routing
        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            self._wait()
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/(.+)", self.path)
            if not match:
                return self._send(404, b"{}")
            repo, revision = match.group(1), unquote(match.group(2))
            if hub.ids == "etag":
                return self._send(404, b"Not Found")
            fault = hub.take_fault(self.path)
            if fault:
                return self._fault(fault)
            if self._missing(repo, revision):
                return
            form = parse_qs(body)
            paths = form.get("paths", [])
            if not paths and body.startswith("{"):
                paths = json.loads(body).get("paths", [])
            infos = []
            for name in paths:  # the Hub leaves out the paths a revision does not hold
                path = hub.root / repo / revision / name
                if path.is_file():
                    sha256, blob = hub.hashes(path)
                    info = {"type": "file", "path": name, "size": path.stat().st_size, "oid": blob}
                    if hub.is_lfs(name):
                        info["lfs"] = {"oid": sha256, "size": path.stat().st_size, "pointerSize": 134}
                    infos.append(info)
            self._send(200, json.dumps(infos).encode(), "application/json")

        def _route(self, head: bool) -> None:
            with hub._lock:
                hub.requests.append(f"{self.command} {self.path}")
            if self.path == "/_fakehub/stats":
                stats = {"bytes_sent": hub.bytes_sent, "requests": len(hub.requests)}
                return self._send(200, json.dumps(stats).encode(), "application/json")
            self._wait()
            refs = re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs(\?.*)?", self.path)
            if refs:
                fault = hub.take_fault(self.path)
                if fault:
                    return self._fault(fault)
                repo = refs.group(1)
                if self._missing(repo, None):
                    return
                branches = [
                    {"name": b.name, "ref": f"refs/heads/{b.name}", "targetCommit": hub.commit(repo, b.name)}
                    for b in sorted((hub.root / repo).iterdir())
                    if b.is_dir()
                ]
                payload = {"branches": branches, "tags": [], "converts": [], "pullRequests": []}
                return self._send(200, json.dumps(payload).encode(), "application/json")
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
            if resolve:
                return self._file(
                    resolve.group(1), unquote(resolve.group(2)), unquote(resolve.group(3)), head
                )
            self._send(404, b"{}")

        def _missing(self, repo: str, revision: str | None, name: str | None = None) -> bool:
            """Answer as the Hub does when the repository, revision or file does not exist."""
            if not (hub.root / repo).is_dir():
                self._error(401, "RepoNotFound", "Repository not found")
            elif revision is not None and not (hub.root / repo / revision).is_dir():
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            elif name is not None and not (hub.root / repo / revision / name).is_file():
                self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
            else:
                return False
            return True

        # -------------------------------------------------------------- files
        def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
            if self._missing(repo, revision, name):
                return
            path = hub.root / repo / revision / name
            fault = None if head else hub.take_fault(self.path)
            if fault == "500":
                return self._send(500, b"internal error")
            size = path.stat().st_size
            sha256, blob = hub.hashes(path)
            first, last, status = 0, size - 1, 200
            wanted = self.headers.get("Range")
            if wanted and hub.honour_range:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                if match:
                    first = int(match.group(1))
                    last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                    if first >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
            length = max(0, last - first + 1)
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            if hub.honour_range:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", hub.commit(repo, revision))
            if hub.is_lfs(name):
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("ETag", f'"{sha256 if hub.is_lfs(name) else blob}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if head:
                return
            if fault == "truncate":  # promise the full length, send half, close
                length //= 2
                self.close_connection = True
            if fault == "drop":
                length = min(length, 1024)
            self._stream(path, first, length, corrupt=fault == "corrupt")
            if fault == "drop":
                self._hang_up()

        def _stream(self, path: Path, first: int, length: int, corrupt: bool) -> None:
            """Send the bytes in chunks, at most `bandwidth` bytes/s; stop quietly when the client closes
            (it may read only the head of a whole body)."""
            started = time.perf_counter()
            sent = 0
            with open(path, "rb") as handle:
                handle.seek(first)
                while sent < length:
                    chunk = handle.read(min(CHUNK, length - sent))
                    if not chunk:
                        break
                    if corrupt and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
                        break
                    sent += len(chunk)
                    with hub._lock:
                        hub.bytes_sent += len(chunk)
                    if hub.bandwidth:
                        ahead = sent / hub.bandwidth - (time.perf_counter() - started)
                        if ahead > 0:
                            time.sleep(ahead)

        def _wait(self) -> None:
            if hub.latency:
                time.sleep(hub.latency)

        def _fault(self, kind: str) -> None:
            if kind == "drop":
                self._hang_up()
                return
            self._send(500, b"internal error")

        def _hang_up(self) -> None:
            """Cut the connection now (shutdown, so the client sees it at once rather than timing out)."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, body, "application/json", {"X-Error-Code": code, "X-Error-Message": message})

        def _send(self, status: int, body: bytes, content_type: str = "text/plain",
                  headers: dict[str, str] | None = None) -> None:  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve <root>/<org>/<name>/<branch>/ as a fake Hub.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--ids", choices=ID_MODES, default="lfs")
    parser.add_argument("--ignore-range", action="store_true")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s per connection")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    hub = FakeHub(args.root, args.ids, not args.ignore_range, args.bandwidth, args.latency)
    with hub:
        print(hub.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
