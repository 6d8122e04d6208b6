"""The files of a Nix binary cache: narinfos and NARs, over HTTP(S) or from a directory.

Blocking code, run in worker threads (as sqlite and grpcio calls are). The
HTTP client is urllib3: a thread-safe pool of keep-alive connections, and a
streamed response that is a file object, which the decompressors read from
with bounded output per read (the stdlib's `lzma` and `bz2` decompressors
take an output limit; zstandard's `stream_reader`). (An incremental
decompressor fed from an async stream would have to hold whatever one
network chunk expands to: zstandard's has no output limit, and a hostile
cache could send a decompression bomb.)

Its timeouts are per socket operation (connect, each read), which is the
"no progress for backend_timeout" rule of the store: a download that keeps
arriving is never cut, one that stalls is.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import IO, Final, Protocol, cast

import urllib3
import zstandard

from tvix_mountd.castore.errors import BackendUnavailable, IntegrityError, StoreError

# urllib3 logs a warning per retried connection; the cache service logs each
# failure once, saying which path it was for.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

# A narinfo is a few hundred bytes; even thousands of references fit here.
MAX_NARINFO_SIZE: Final = 1 << 20
_USER_AGENT: Final = "tvix-mountd"
# What the decompressors raise on data they cannot decode (gzip and bz2:
# OSError; a stream cut short: EOFError).
DECOMPRESSION_ERRORS: Final = (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError)
# Compressed bytes handed to a decompressor at once. The stdlib's LZMAFile and
# BZ2File read 8 KiB at a time, and each read, hash and decompress call gives
# the GIL up and must take it back from the ingest's thread: thousands of
# waits per NAR (RESULTS.md, eleventh session).
INPUT_CHUNK: Final = 1 << 20


class ByteSource(Protocol):
    """A file opened for reading: `read(n)` returns at most n bytes, b"" at the end."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class CacheFiles(ABC):
    """Where a cache's files come from. Every method blocks."""

    def __init__(self, base: str) -> None:
        self.base = base

    @abstractmethod
    def read_small(self, path: str, limit: int) -> bytes | None:
        """The whole file at `path` (below the cache), None if the cache does not
        have it; StoreError if it is larger than `limit` or cannot be read."""

    @abstractmethod
    def open(self, path: str) -> ByteSource:
        """The file at `path`, to stream; StoreError if it is missing or unreadable."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class DirectoryCacheFiles(CacheFiles):
    """nix+file://: a binary cache directory, as `nix copy --to file://DIR` writes it."""

    def _path(self, path: str) -> str:
        return os.path.join(self.base, path)

    def read_small(self, path: str, limit: int) -> bytes | None:
        try:
            with open(self._path(path), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{self._path(path)}: {e.strerror}") from e
        if len(data) > limit:
            raise IntegrityError(f"{self._path(path)}: larger than {limit} bytes")
        return data

    def open(self, path: str) -> ByteSource:
        try:
            return open(self._path(path), "rb")
        except OSError as e:
            raise StoreError(f"{self._path(path)}: {e.strerror}") from e


class HttpCacheFiles(CacheFiles):
    """nix+http:// and nix+https://: a cache behind an HTTP server or CDN."""

    def __init__(self, base: str, *, timeout: float) -> None:
        super().__init__(base)
        self._pool = urllib3.PoolManager(
            # Downloads of one cache share its connections; more than this many
            # at once open extra connections rather than wait for one.
            maxsize=16,
            headers={"User-Agent": _USER_AGENT},
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            # A GET may be sent again on a fresh connection when a kept-alive
            # one turns out closed; HTTP errors are answers, not retried.
            retries=urllib3.Retry(
                total=3, connect=2, read=1, redirect=5, status=0, other=0, raise_on_status=False
            ),
        )

    def _get(self, path: str) -> urllib3.BaseHTTPResponse:
        url = self.base + path
        try:
            return self._pool.request("GET", url, preload_content=False, decode_content=True)
        except urllib3.exceptions.HTTPError as e:
            raise BackendUnavailable(f"GET {url}: {_reason(e)}") from e

    def read_small(self, path: str, limit: int) -> bytes | None:
        response = self._get(path)
        try:
            # Nix treats 403 as missing too (S3 answers it for absent keys).
            if response.status in (403, 404):
                return None
            _check_status(response, self.base + path)
            data: bytes = response.read(limit + 1)
            if len(data) > limit:
                raise IntegrityError(f"GET {self.base + path}: larger than {limit} bytes")
            return data
        except urllib3.exceptions.HTTPError as e:
            raise BackendUnavailable(f"GET {self.base + path}: {_reason(e)}") from e
        finally:
            response.release_conn()

    def open(self, path: str) -> ByteSource:
        response = self._get(path)
        try:
            _check_status(response, self.base + path)
        except BaseException:
            response.release_conn()
            raise
        return _HttpBody(response, self.base + path)

    def close(self) -> None:
        self._pool.clear()


def _reason(e: Exception) -> str:
    # urllib3 wraps the interesting part (a reset, a timeout) a level or two down.
    reason = getattr(e, "reason", None)
    return str(reason or e)


def _check_status(response: urllib3.BaseHTTPResponse, url: str) -> None:
    if response.status == 200:
        return
    error = BackendUnavailable if response.status >= 500 else StoreError
    raise error(f"GET {url}: HTTP {response.status} {response.reason or ''}".rstrip())


class _HttpBody(io.RawIOBase):
    """A response body as a file: urllib3's errors become StoreErrors, and
    closing hands the connection back to the pool (or drops it when the body
    was not read to its end)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, url: str) -> None:
        self._response = response
        self._url = url
        self._complete = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._response.read1(len(buffer))
        except urllib3.exceptions.HTTPError as e:
            raise BackendUnavailable(f"GET {self._url}: {_reason(e)}") from e
        if not data:
            self._complete = True
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if not self._complete:
                self._response.close()  # a connection mid-body cannot be reused
            self._response.release_conn()
        super().close()


def cache_files(url: str, *, timeout: float) -> CacheFiles:
    """The CacheFiles of a base URL from a nix+ address (a directory for nix+file)."""
    if url.startswith(("http://", "https://")):
        return HttpCacheFiles(url, timeout=timeout)
    return DirectoryCacheFiles(url)


class CountingReader(io.RawIOBase):
    """The compressed file as it arrives: counts and hashes every byte, for
    FileSize and FileHash, and tells `progressed` after each read."""

    def __init__(self, raw: ByteSource, progressed: Callable[[int], None]) -> None:
        self._raw = raw
        self._progressed = progressed
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buffer))
        self.sha256.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        self._progressed(len(data))
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Decompressor(Protocol):
    """lzma.LZMADecompressor and bz2.BZ2Decompressor."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class StreamDecompressor:
    """`raw` decompressed, INPUT_CHUNK of it at a time, each read returning
    at most what was asked for. Concatenated streams decompress as one, and
    anything after the last one that is not a stream ends the data, as the
    stdlib's LZMAFile and BZ2File do (and Nix's xz reader)."""

    def __init__(
        self,
        raw: ByteSource,
        new: Callable[[], _Decompressor],
        trailing_error: type[Exception] | tuple[type[Exception], ...],
    ) -> None:
        self._raw = raw
        self._new = new
        self._trailing_error = trailing_error
        self._decompressor = new()
        self._ended = False

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(INPUT_CHUNK), b""))
        while not self._ended and n:
            decompressor = self._decompressor
            fresh = False
            if decompressor.eof:
                data = decompressor.unused_data or self._raw.read(INPUT_CHUNK)
                if not data:
                    self._ended = True
                    break
                self._decompressor = decompressor = self._new()
                fresh = True
            elif decompressor.needs_input:
                data = self._raw.read(INPUT_CHUNK)
                if not data:
                    raise EOFError("compressed data ended before its end-of-stream marker")
            else:
                data = b""
            try:
                out = decompressor.decompress(data, n)
            except self._trailing_error:
                if not fresh:
                    raise
                self._ended = True  # not another stream: trailing bytes
                break
            if out:
                return out
        return b""

    def close(self) -> None:
        self._raw.close()


def decompressing(raw: ByteSource, compression: str) -> ByteSource:
    """A reader of `raw`'s decompressed bytes; each read returns at most what
    was asked for, whatever the compression ratio."""
    if compression == "none":
        return raw
    if compression == "xz":
        return StreamDecompressor(raw, lzma.LZMADecompressor, lzma.LZMAError)
    if compression == "bzip2":
        return StreamDecompressor(raw, bz2.BZ2Decompressor, OSError)
    # The stubs want a full IO; these readers only ever call read() and close().
    source = cast("IO[bytes]", raw)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=source)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            source, read_size=INPUT_CHUNK, read_across_frames=True, closefd=True
        )
    raise StoreError(f"unsupported compression {compression!r}")
