"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the tests and `make bench` (not shipped).

It serves the endpoints huggingface_hub uses to read a model repository (`refs`, `paths-info`,
`resolve` with HEAD and byte ranges) from folders on disk laid out as `<root>/<org>/<name>/<branch>/`,
reports the LFS sha256 of weight files as the real Hub does, counts the body bytes it sends, and can
inject faults (5xx answers, dropped connections, truncated bodies) to test retries. Point the real client
at it with `HF_ENDPOINT=<server.url>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Fault:
    """Answer the next `times` requests whose path contains `match` with `kind`:
    500 | drop (close mid-body) | truncate (send half the promised body) | corrupt (flip a byte)."""

    match: str
    kind: str
    times: int = 1


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.faults: list[Fault] = []
        self.bytes_sent = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
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
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/(.+)", self.path)
            if not match:
                return self._send(404, b"{}")
            repo, revision = match.group(1), unquote(match.group(2))
            fault = hub.take_fault(self.path)
            if fault:
                return self._fault(fault, b"[]")
            branch = hub.root / repo / revision
            if not branch.is_dir():
                return self._send(404, json.dumps({"error": "Revision not found"}).encode())
            form = parse_qs(body)
            paths = form.get("paths", [])
            if not paths and body.startswith("{"):
                paths = json.loads(body).get("paths", [])
            infos = []
            for name in paths:
                path = branch / name
                if path.is_file():
                    sha256, blob = hub.hashes(path)
                    info = {"type": "file", "path": name, "size": path.stat().st_size, "oid": blob}
                    if name.endswith(LFS_SUFFIXES):
                        info["lfs"] = {"oid": sha256, "size": path.stat().st_size, "pointerSize": 134}
                    infos.append(info)
            self._send(200, json.dumps(infos).encode(), "application/json")

        def _route(self, head: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            refs = re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs(\?.*)?", self.path)
            if refs:
                fault = hub.take_fault(self.path)
                if fault:
                    return self._fault(fault, b"{}")
                repo = refs.group(1)
                folder = hub.root / repo
                if not folder.is_dir():
                    return self._send(404, json.dumps({"error": "Repository not found"}).encode())
                branches = [
                    {"name": b.name, "ref": f"refs/heads/{b.name}", "targetCommit": hub.commit(repo, b.name)}
                    for b in sorted(folder.iterdir())
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

        # -------------------------------------------------------------- files
        def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
            path = hub.root / repo / revision / name
            if not path.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fault = None if head else hub.take_fault(self.path)
            if fault == "500":
                return self._send(500, b"internal error")
            size = path.stat().st_size
            sha256, blob = hub.hashes(path)
            first, last, status = 0, size - 1, 200
            wanted = self.headers.get("Range")
            if wanted:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                if match:
                    first = int(match.group(1))
                    last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                    status = 206
            length = max(0, last - first + 1)
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", hub.commit(repo, revision))
            if name.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("ETag", f'"{sha256 if name.endswith(LFS_SUFFIXES) else blob}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if head:
                return
            with open(path, "rb") as handle:
                handle.seek(first)
                body = handle.read(length)
            if fault == "corrupt" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            if fault == "truncate":  # promise the full length, send half, close
                body = body[: len(body) // 2]
                self.close_connection = True
            if fault == "drop":
                self.wfile.write(body[: min(len(body), 1024)])
                self.wfile.flush()
                self._hang_up()
                return
            self.wfile.write(body)
            with hub._lock:
                hub.bytes_sent += len(body)

        def _fault(self, kind: str, empty: bytes) -> None:
            if kind == "drop":
                self._hang_up()
                return
            self._send(500, b"internal error")

        def _hang_up(self) -> None:
            """Cut the connection now (shutdown, so the client sees it at once rather than timing out)."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
