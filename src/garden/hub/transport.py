"""The wire: one repository's server, asked with retries and answered in words a garden user can act on.

Any Hub-API server is met as it is: a server (mirror, proxy) that answers a range request with the whole
body (HTTP 200) is read up to the bytes needed and closed; 4xx answers fail at once naming the
repository, step and file; connection errors, timeouts, 429/5xx and short bodies are retried with
backoff; a body that cannot be right (offsets beyond the size the server listed, another range than
asked) fails at once naming the step.

Laid out as huggingface_hub's own `utils/_http.py` is: a backoff loop (`HubTransport.call`, its
`http_backoff`) and a translation of error answers (`HubTransport.explain`, on top of its
`hf_raise_for_status`, which gives the typed errors). huggingface_hub's loop is not used as it is: it
retries status codes and connection errors but cannot see a short body, nor a server that ignores
`Range`, and it sleeps on its own clock; the loop here handles all of them, with an injectable sleep.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from garden.errors import GardenError

log = logging.getLogger("garden.hub")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request drowns the job log
T = TypeVar("T")

RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # huggingface_hub's http_backoff retries the same


class TransientError(Exception):
    """A failure worth retrying: dropped connection, 5xx, short or corrupt body."""


class RangeIgnored(GardenError):
    """The server answered a range request of a `.bin` with the whole file: reading the zip's tail would
    stream all of it anyway, so the file is downloaded whole (once, verified) instead."""


class RangeTarget(Protocol):
    """What a range read names in its errors: the file, its step, and the size the server listed."""

    @property
    def step(self) -> int: ...

    @property
    def filename(self) -> str: ...

    @property
    def size(self) -> int: ...


def offline() -> bool:
    """HF_HUB_OFFLINE, read at each use (as huggingface_hub reads it)."""
    return bool(constants.HF_HUB_OFFLINE)


class HubTransport:
    """Requests to one repository on one server: retried with backoff where a later try can succeed,
    failed at once (naming what to check) where it cannot, and counted per step."""

    def __init__(self, repo: str, endpoint: str, retries: int, backoff_seconds: float,
                 timeout_seconds: float, sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        self.repo, self.endpoint = repo, endpoint
        self.retries, self.backoff_seconds, self.timeout_seconds = retries, backoff_seconds, timeout_seconds
        self._sleep = sleep
        self._lock = threading.Lock()  # the prefetch threads share the counters and the warnings
        self._warned: set[str] = set()
        #: Bytes received from the server, per step (header, index and layout reads included).
        self.fetched: dict[int, int] = {}
        #: Set when the server answers a range request with the whole body (HTTP 200).
        self.ignores_range = False

    def count(self, step: int, received: int) -> None:
        with self._lock:
            self.fetched[step] = self.fetched.get(step, 0) + received

    def warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)

    def call(self, action: Callable[[], T], what: str) -> T:
        """Run a server call, retrying only what can succeed later (connection errors, timeouts, 429/5xx,
        short bodies) with exponential backoff; any other answer fails at once, naming `what` and what to
        check."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return action()
            except GardenError:
                raise
            except Exception as err:
                status = getattr(getattr(err, "response", None), "status_code", None)
                if status is not None and status not in RETRY_STATUS:
                    raise GardenError(f"{what}: {self.explain(err, status)}") from err
                if status is None and not _transient(err):
                    raise GardenError(f"{what}: {type(err).__name__}: {err}") from err
                last = err
            if attempt < self.retries:
                wait = self.backoff_seconds * 2**attempt
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, _first_line(last), attempt + 1,
                    self.retries, wait,
                )  # fmt: skip
                self._sleep(wait)
        raise GardenError(f"{what}: failed after {self.retries + 1} attempts: {_first_line(last)}")

    def explain(self, err: Exception, status: int) -> str:
        """What a 4xx answer means for a garden user, and what to check."""
        where = f"{self.endpoint} (HTTP {status})"
        if isinstance(err, GatedRepoError):
            return f"{self.repo} is gated on {where}: accept its conditions on the Hub, then set HF_TOKEN"
        if isinstance(err, RepositoryNotFoundError):
            return (
                f"repository {self.repo} was not found on {where}: check model.repo (model.deduped_repo for "
                "variant=deduped) and HF_ENDPOINT; a private repository also needs HF_TOKEN"
            )
        if isinstance(err, RevisionNotFoundError):
            return (
                f"{self.repo} has no such revision on {where}: check the steps setting against the "
                "repository's step branches"
            )
        if isinstance(err, RemoteEntryNotFoundError):
            return (
                f"{where} says it does not exist: check model.repo, the steps setting and HF_ENDPOINT (some "
                "mirrors answer this for a repository they do not hold)"
            )
        if status in (401, 403):
            return f"access to {self.repo} was refused by {where}: set HF_TOKEN to a token that can read it"
        if status == 416:
            return (
                f"{where} cannot serve that byte range: the file is shorter than the server listed "
                "(truncated or changed)"
            )
        return f"{where}: {_first_line(err)}"

    def read_range(self, url: str, target: RangeTarget, first: int, last: int, whole_body: bool) -> bytes:
        """Bytes [first, last] of a remote file, exactly that many, retried with backoff. A server that
        ignores `Range` (HTTP 200) is read up to the bytes needed and closed where `whole_body` allows,
        else RangeIgnored is raised for the caller to download the file whole."""
        if not 0 <= first <= last < target.size:
            raise GardenError(
                f"step {target.step}: bytes {first}-{last} of {target.filename} lie beyond its {target.size} "
                f"bytes (the size {self.endpoint} listed): the checkpoint is truncated or damaged"
            )
        expected = last - first + 1

        def fetch() -> bytes:
            with get_session().stream(
                "GET",
                url,
                headers={**build_hf_headers(), "Range": f"bytes={first}-{last}"},
                timeout=self.timeout_seconds,
                follow_redirects=True,
            ) as response:
                status = response.status_code
                if status >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if status == 206:
                    _check_content_range(response.headers.get("Content-Range"), target, first)
                    body, received = slice_of(response.iter_bytes(), 0, expected)
                elif status == 200:
                    self._note_ignored_range(target, response.headers.get("Content-Length"))
                    if not whole_body:
                        raise RangeIgnored(f"{self.endpoint} ignores Range")
                    body, received = slice_of(response.iter_bytes(), first, expected)
                else:
                    raise TransientError(f"HTTP {status} to a range request")
            self.count(target.step, received)
            if len(body) != expected:
                raise TransientError(f"short read: {len(body)} of {expected} bytes")
            return body

        return self.call(fetch, f"step {target.step}: reading bytes {first}-{last} of {target.filename}")

    def _note_ignored_range(self, target: RangeTarget, length: str | None) -> None:
        if length is not None and int(length) != target.size:
            raise GardenError(
                f"step {target.step}: {self.endpoint} sent {target.filename} as {length} bytes but listed "
                f"it as {target.size}: the file changed on the server or the server is inconsistent"
            )
        self.ignores_range = True
        self.warn_once(
            "ignored-range",
            "%s answers range requests with the whole file (HTTP 200: it ignores `Range`, as some mirrors "
            "and proxies do); garden reads a safetensors file's body only as far as it needs and closes "
            "it, and downloads a .bin whole (verified) instead of reading its parts",
            self.endpoint,
        )


def unsupported(err: HfHubHTTPError) -> bool:
    """A 404/405/501 without the Hub's error code: the server has no such API (not a missing repo,
    revision or file, which the Hub and its mirrors name in X-Error-Code)."""
    response = getattr(err, "response", None)
    if response is None or response.status_code not in (404, 405, 501):
        return False
    return not response.headers.get("X-Error-Code")


def slice_of(chunks: Iterator[bytes], first: int, length: int) -> tuple[bytearray, int]:
    """Bytes [first, first + length) of a streamed body, copied once into one buffer (a tensor is built
    on it without another copy), reading no further; and how many bytes were received."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    position = received = taken = 0
    for chunk in chunks:
        received += len(chunk)
        end = position + len(chunk)
        if end > first and taken < length:
            piece = memoryview(chunk)[max(0, first - position) : first + length - position]
            view[taken : taken + len(piece)] = piece
            taken += len(piece)
        position = end
        if taken >= length:
            break
    del view
    return (buffer if taken == length else buffer[:taken]), received


def _check_content_range(value: str | None, target: RangeTarget, first: int) -> None:
    """A 206 must be the asked range of a file of the listed size; anything else cannot become right."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if match is None:
        return  # a proxy that drops the header: the body length is still checked
    start, total = int(match.group(1)), match.group(3)
    if start != first or (total != "*" and int(total) != target.size):
        raise GardenError(
            f"step {target.step}: the server answered bytes {value} of {target.filename}, asked from byte "
            f"{first} of {target.size}: the file changed on the server or the server is inconsistent"
        )


def _transient(err: Exception) -> bool:
    """Connection errors and timeouts (httpx's transport errors, huggingface_hub's offline fallbacks, OS
    socket errors) and garden's own short-body errors."""
    import httpx2

    return isinstance(err, (TransientError, httpx2.TransportError, OSError))


def _first_line(err: Exception | None) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
