"""Helpers for tests of Nix binary caches: caches made by real Nix, served over HTTP.

`build_caches` adds source trees to a chroot Nix store under a temp directory
(`nix-store --store ROOT --add`, never the real /nix/store) and copies them
into binary cache directories with `nix copy --to file://DIR?compression=...`,
signed with keys made by `nix-store --generate-binary-cache-key`.

`CacheServer` serves a cache directory over HTTP/1.1 (keep-alive) on
127.0.0.1 with the stdlib's http.server in a thread, counts the requests per
path and connections, and lets a test make a path misbehave (`Fault`): an
HTTP status, a replaced body, a body cut short or reset after N bytes, a slow
but steady body, a stall.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final

import pytest

from tvix_mountd.castore.narinfo import NarInfo, fingerprint
from tvix_mountd.castore.storepath import StorePath

NIX_FEATURES: Final = ("--extra-experimental-features", "nix-command")
COMPRESSIONS: Final = ("xz", "zstd", "bzip2", "none")
BIG_FILE_SIZE: Final = 2_621_447  # over the 1 MiB chunk: a streamed blob; not 8-aligned

requires_nix = pytest.mark.skipif(
    shutil.which("nix-store") is None or shutil.which("nix") is None,
    reason="needs Nix (nix-store, nix)",
)


# -- source trees --------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def make_tree(path: Path, seed: int = 11) -> Path:
    """A tree with every kind of entry a NAR has: an executable, a symlink (and
    a dangling one), an empty file, an empty directory, a file larger than one
    chunk, nesting, and a name that is not UTF-8."""
    rnd = random.Random(seed)
    _write(path / "bin" / "hello", b"#!/bin/sh\necho hello\n", 0o755)
    _write(path / "share" / "doc.txt", f"documentation {seed}\n".encode())
    _write(path / "share" / "empty", b"")
    (path / "share" / "empty-dir").mkdir()
    # Repetitive enough that xz and bzip2 are quick, long enough to stream.
    block = rnd.randbytes(64 * 1024)
    _write(path / "lib" / "big.bin", (block * 41)[:BIG_FILE_SIZE])
    (path / "link-to-hello").symlink_to("bin/hello")
    (path / "dangling").symlink_to("/nonexistent/target")
    _write(path / "lib" / os.fsdecode(b"\xff-not-utf8"), b"bytes\n")
    return path


def snapshot(root: Path) -> dict[str, tuple[str, bool, bytes]]:
    """Every entry below `root`: (kind, executable, contents or link target)."""
    out: dict[str, tuple[str, bool, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.fsencode(path.relative_to(root)).decode("utf-8", "backslashreplace")
            if path.is_symlink():
                out[rel] = ("symlink", False, os.fsencode(os.readlink(path)))
            elif path.is_dir():
                out[rel] = ("directory", False, b"")
            else:
                executable = bool(path.stat().st_mode & 0o100)
                out[rel] = ("file", executable, path.read_bytes())
    return out


# -- Nix ------------------------------------------------------------------------------


def _nix(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


@dataclass(frozen=True)
class Key:
    secret_file: Path
    public: str  # NAME:BASE64, as trusted-public-keys takes it

    @classmethod
    def generate(cls, name: str, directory: Path) -> Key:
        secret, public = directory / f"{name}.secret", directory / f"{name}.public"
        # No store is needed, but Nix opens the default one unless told
        # otherwise: it would create /nix/store and /nix/var/nix (racing with
        # itself in parallel tests on a fresh machine).
        _nix(
            "nix-store",
            "--store",
            "dummy://",
            "--generate-binary-cache-key",
            name,
            str(secret),
            str(public),
        )
        return cls(secret, public.read_text().strip())

    def sign(self, data: bytes) -> str:
        """A `Sig:` value over `data`, made with the secret key Nix wrote."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        name, _, encoded = self.secret_file.read_text().strip().partition(":")
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(encoded)[:32])
        return f"{name}:{base64.b64encode(key.sign(data)).decode()}"


@dataclass
class Caches:
    """Binary caches of the same trees, made by Nix."""

    base: Path
    nix_root: Path  # the chroot store the trees were added to
    trusted: Key
    untrusted: Key
    sources: dict[str, Path]  # tree name -> source directory
    paths: dict[str, StorePath]  # tree name -> its store path
    dirs: dict[str, Path] = field(default_factory=dict)  # cache name -> directory

    def narinfo_path(self, cache: str, tree: str) -> Path:
        return self.dirs[cache] / f"{self.paths[tree].basename[:32]}.narinfo"

    def narinfo(self, cache: str, tree: str) -> NarInfo:
        return NarInfo.parse(self.narinfo_path(cache, tree).read_text())

    def copy(self, cache: str, into: Path) -> Path:
        """A private copy of cache `cache` (for a test to damage)."""
        shutil.copytree(self.dirs[cache], into, symlinks=True)
        return into


def nix_copy(nix_root: Path, paths: list[StorePath], to: str) -> None:
    _nix(
        "nix",
        *NIX_FEATURES,
        "copy",
        "--store",
        str(nix_root),
        "--to",
        to,
        *[p.absolute for p in paths],
    )


def build_caches(base: Path) -> Caches:
    """Caches "xz", "zstd", "bzip2", "none" signed by the trusted key,
    "unsigned", and "untrusted" (signed by another key), of trees "tree" and
    "other"."""
    base.mkdir(parents=True, exist_ok=True)
    nix_root = base / "nix-root"
    trusted = Key.generate("trusted-cache-1", base)
    untrusted = Key.generate("untrusted-cache-1", base)
    sources = {
        "tree": make_tree(base / "src" / "tree", 11),
        "other": make_tree(base / "src" / "other", 12),
    }
    paths = {
        name: StorePath.parse_absolute(
            _nix("nix-store", "--store", str(nix_root), "--add", str(src))
        )
        for name, src in sources.items()
    }
    caches = Caches(base, nix_root, trusted, untrusted, sources, paths)
    everything = list(paths.values())
    variants: list[tuple[str, str, Key | None]] = [(c, c, trusted) for c in COMPRESSIONS]
    variants += [("unsigned", "xz", None), ("untrusted", "zstd", untrusted)]
    for name, compression, key in variants:
        directory = base / f"cache-{name}"
        url = f"file://{directory}?compression={compression}"
        if key is not None:
            url += f"&secret-key={key.secret_file}"
        nix_copy(nix_root, everything, url)
        caches.dirs[name] = directory
    return caches


def write_narinfo(path: Path, info: NarInfo, signatures: list[str], *, ca: bool = False) -> None:
    """A narinfo as Nix writes one (for tests that make their own)."""
    from tvix_mountd.castore import nixbase32

    lines = [
        f"StorePath: {info.store_path.absolute}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_sha256 is not None:
        lines.append(f"FileHash: sha256:{nixbase32.encode(info.file_sha256)}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines += [
        f"NarHash: sha256:{nixbase32.encode(info.nar_sha256)}",
        f"NarSize: {info.nar_size}",
        "References: " + " ".join(r.basename for r in info.references),
        *(f"Sig: {s}" for s in signatures),
    ]
    if ca and info.ca is not None:
        lines.append(f"CA: fixed:r:sha256:{nixbase32.encode(info.ca.digest)}")
    path.write_text("\n".join(lines) + "\n")


def resign_with_references(
    caches: Caches, cache_dir: Path, tree: str, references: list[str]
) -> NarInfo:
    """Rewrite `tree`'s narinfo in `cache_dir` to name `references` (trees) and
    sign it anew with the trusted key, without its CA line: Nix then insists on
    the signature, which makes it a check of our fingerprint."""
    path = cache_dir / f"{caches.paths[tree].basename[:32]}.narinfo"
    return resign_narinfo(path, [caches.paths[r] for r in references], caches.trusted)


def resign_narinfo(path: Path, references: list[StorePath], key: Key) -> NarInfo:
    """Rewrite the narinfo at `path` to name `references` and sign it anew
    with `key`, without its CA line (so that Nix checks the signature)."""
    info = NarInfo.parse(path.read_text())
    refs = tuple(sorted(references, key=lambda p: p.basename))
    signed = fingerprint(info.store_path, info.nar_sha256, info.nar_size, refs)
    rewritten = NarInfo(
        store_path=info.store_path,
        url=info.url,
        compression=info.compression,
        nar_sha256=info.nar_sha256,
        nar_size=info.nar_size,
        references=refs,
        file_sha256=info.file_sha256,
        file_size=info.file_size,
    )
    write_narinfo(path, rewritten, [key.sign(signed)])
    return NarInfo.parse(path.read_text())


# -- the HTTP server -----------------------------------------------------------------


@dataclass
class Fault:
    """How one path misbehaves, for its next `times` requests (None: always)."""

    status: int | None = None  # answer this status (no body)
    body: bytes | None = None  # serve these bytes instead of the file
    cut_after: int | None = None  # declare the full length, send this many bytes, close
    reset_after: int | None = None  # send this many bytes, then reset the connection
    rate: tuple[int, float] | None = None  # (bytes, seconds): send that much per interval
    stall_after: int | None = None  # send this many bytes, then nothing for `stall` seconds
    stall: float = 0.0
    times: int | None = None


class CacheServer:
    """A cache directory over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: Path, prefix: str = "/cache") -> None:
        self.root = root
        self.prefix = prefix
        self.requests: Counter[str] = Counter()
        self.connections = 0
        self.faults: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        port: int = self._httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def address(self, keys: list[str] | None = None) -> str:
        """The nix+http:// address of this cache (with trusted-public-keys)."""
        addr = "nix+" + self.url
        if keys is not None:
            addr += "?trusted-public-keys=" + "%20".join(keys)
        return addr

    def count(self, suffix: str) -> int:
        """Requests so far of paths ending in `suffix` (".narinfo", ".nar.xz", ...)."""
        with self._lock:
            return sum(n for path, n in self.requests.items() if path.endswith(suffix))

    def nar_requests(self) -> int:
        with self._lock:
            return sum(n for path, n in self.requests.items() if "/nar/" in path)

    def fault(self, name_suffix: str, fault: Fault) -> None:
        """Make every path ending in `name_suffix` misbehave as `fault` says."""
        with self._lock:
            self.faults[name_suffix] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for suffix, fault in list(self.faults.items()):
                if path.endswith(suffix):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            del self.faults[suffix]
                    return fault
        return None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests[path] += 1
        fault = self._take_fault(path)
        if fault is not None and fault.status is not None:
            handler.send_response(fault.status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body = fault.body if fault is not None and fault.body is not None else None
        if body is None:
            rel = path.removeprefix(self.prefix + "/")
            file = self.root / rel
            if (
                not path.startswith(self.prefix + "/")
                or ".." in rel.split("/")
                or not file.is_file()
            ):
                handler.send_response(404)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            body = file.read_bytes()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        self._send_body(handler, body, fault)

    def _send_body(self, handler: BaseHTTPRequestHandler, body: bytes, fault: Fault | None) -> None:
        out = handler.wfile
        if fault is None:
            out.write(body)
            return
        if fault.cut_after is not None:
            out.write(body[: fault.cut_after])
            out.flush()
            handler.close_connection = True
            return
        if fault.reset_after is not None:
            out.write(body[: fault.reset_after])
            out.flush()
            # SO_LINGER 0: close() sends RST instead of FIN.
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.close_connection = True
            return
        if fault.stall_after is not None:
            out.write(body[: fault.stall_after])
            out.flush()
            self._stopping.wait(fault.stall)
            handler.close_connection = True
            return
        if fault.rate is not None:
            step, interval = fault.rate
            for start in range(0, len(body), step):
                out.write(body[start : start + step])
                out.flush()
                if self._stopping.wait(interval):
                    return
            return
        out.write(body)

    def __enter__(self) -> CacheServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving: new connections are refused (the port stays ours until then)."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
