"""One log stream for the supervisor and every process it forks.

setup_logging() gives the root logger one stderr handler (text or JSON lines)
and wraps it with multiprocessing-logging, so that records of processes forked
afterwards travel to the supervisor and are written by one thread there.
tag_process() names a child; every record carries the name as `mount`.

The transport under multiprocessing-logging's handler is replaced. Its
multiprocessing.Queue serialises writers with a lock shared by all processes;
a child killed while its feeder thread holds that lock (SIGKILL, a segfault in
libfuse) never releases it. From then on every other process's records stay
in its feeder buffer: the supervisor's own lines stop, memory grows, and
children hang at exit joining their feeder thread. Here each record is written
with one write() of at most PIPE_BUF bytes to a non-blocking pipe, which the
kernel keeps whole without any lock, so a writer that dies at any instant
leaves nothing half-written and nothing locked. A record that would block (the
supervisor is not keeping up) is dropped and counted instead of stalling a
FUSE request; the count is logged with the next record that gets through. The
supervisor's own records skip the pipe, so a flood from a child cannot crowd
them out.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import pickle
import select
import struct
import sys
import time
from collections import deque
from queue import Empty
from typing import Any, Final, TextIO

import multiprocessing_logging

SUPERVISOR: Final = "supervisor"
LEVELS: Final = ("debug", "info", "warning", "error")

_process_tag = SUPERVISOR


def tag_process(name: str) -> None:
    """Name this process in every record it logs from now on (call first thing in a child)."""
    global _process_tag
    _process_tag = name
    for handler in logging.getLogger().handlers:
        queue = getattr(handler, "queue", None)
        if isinstance(queue, _PipeQueue):
            queue.forked()


class _Tag(logging.Filter):
    # Runs in the process that logs, before the record is pickled; a record
    # that already names a mount (logged with extra={"mount": ...}) keeps it.
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "mount"):
            record.mount = _process_tag
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    # In a child, multiprocessing-logging formats the traceback into exc_text
    # and drops exc_info before pickling; here either may be set.
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class TextFormatter(logging.Formatter):
    """2026-11-22T01:02:03.456Z INFO [mount] logger: message"""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {record.levelname} [{getattr(record, 'mount', '-')}]"
            f" {record.name}: {record.getMessage()}"
        )
        exc = _exception_text(self, record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, process, mount, logger, msg[, exc, stack]."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "process": record.process,
            "mount": getattr(record, "mount", "-"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        exc = _exception_text(self, record)
        if exc:
            doc["exc"] = exc
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc)


# Frame: payload length, writer's pid, record number in that process, flags.
_HEADER: Final = struct.Struct("<HIIB")
_FIRST: Final = 1
_LAST: Final = 2
_CHUNK: Final = select.PIPE_BUF - _HEADER.size
_MAX_RECORD: Final = 64 * _CHUNK
_MAX_PARTIAL: Final = 64
# The supervisor's own records wait in memory, up to this many.
_MAX_LOCAL: Final = 10_000
_F_SETPIPE_SZ: Final = 1031  # fcntl.F_SETPIPE_SZ, Linux; not in Python 3.11's fcntl
_PIPE_SIZE: Final = 1 << 20


class _PipeWriter:
    """Writes records into the log pipe: one write() of at most PIPE_BUF
    bytes per frame, non-blocking, a record dropped (and counted) rather
    than a FUSE request stalled."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._numbers = itertools.count()
        self.dropped = 0

    def put(self, record: logging.LogRecord) -> None:
        if self.dropped and self._send(_dropped_notice(self.dropped)):
            self.dropped = 0
        if not self._send(record):
            self.dropped += 1

    def _send(self, record: logging.LogRecord) -> bool:
        data = _pickle(record)
        pid, number = os.getpid(), next(self._numbers)
        for start in range(0, max(len(data), 1), _CHUNK):
            chunk = data[start : start + _CHUNK]
            flags = (_FIRST if start == 0 else 0) | (_LAST if start + _CHUNK >= len(data) else 0)
            try:
                # At most PIPE_BUF bytes: the kernel writes all or nothing, and
                # never interleaves them with another writer's.
                os.write(self.fd, _HEADER.pack(len(chunk), pid, number, flags) + chunk)
            except BlockingIOError:
                return False
            except OSError:
                return True  # the supervisor is gone: nobody to tell
        return True


class _PipeQueue:
    """Stands in for the multiprocessing.Queue of a MultiProcessingHandler.

    Writers use put_nowait: children through the pipe, the supervisor (the
    process that made the queue) straight into memory, so that a flood from a
    child cannot crowd out the supervisor's own lines. The supervisor's
    receive thread uses get, qsize, close and join_thread, as
    multiprocessing-logging does.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write_fd, False)
        # Room for bursts (a crash's tracebacks from several workers); above
        # /proc/sys/fs/pipe-max-size this fails and the default 64 KiB stays.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        # Wakes the receive thread for the supervisor's own records.
        self._wake_read_fd, self._wake_write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._owner = os.getpid()
        self._reader_open = True
        self._writer = _PipeWriter(self._write_fd)
        self._dropped = 0  # the supervisor's own, kept in memory
        self._local: deque[logging.LogRecord] = deque()
        # Reader side, in the supervisor's receive thread only.
        self._poll = select.poll()
        self._poll.register(self._read_fd, select.POLLIN)
        self._poll.register(self._wake_read_fd, select.POLLIN)
        self._buffer = bytearray()
        self._records: deque[logging.LogRecord] = deque()
        self._partial: dict[tuple[int, int], bytearray] = {}

    # -- writers -----------------------------------------------------------

    @property
    def write_fd(self) -> int:
        return self._write_fd

    def put_nowait(self, record: logging.LogRecord) -> None:
        if os.getpid() == self._owner:
            self._keep(record)
        else:
            self._writer.put(record)

    def _keep(self, record: logging.LogRecord) -> None:
        # Any thread of the supervisor; deque appends are atomic.
        if len(self._local) >= _MAX_LOCAL:
            self._dropped += 1
            return
        if self._dropped:
            self._local.append(_dropped_notice(self._dropped))
            self._dropped = 0
        self._local.append(record)
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_write_fd, b"\0")

    def forked(self) -> None:
        """In a child: drop the parent's count and the descriptors only it reads.

        Without a reader left once the supervisor dies, writes fail at once
        (EPIPE) rather than filling the pipe first.
        """
        self._dropped = 0
        self._writer.dropped = 0
        self._local.clear()
        # Once only (a grandchild must not close a reused descriptor number),
        # and never in the supervisor, whose receive thread reads them.
        if self._reader_open and os.getpid() != self._owner:
            self._reader_open = False
            for fd in (self._read_fd, self._wake_read_fd, self._wake_write_fd):
                os.close(fd)

    # -- the supervisor's receive thread ---------------------------------------

    def get(self, timeout: float) -> logging.LogRecord:
        deadline = time.monotonic() + timeout
        while not self._records and not self._local:
            remaining = deadline - time.monotonic()
            ready = self._poll.poll(max(remaining, 0) * 1000)
            if not ready and remaining <= 0:
                raise Empty
            for fd, _ in ready:
                if fd == self._wake_read_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read_fd, 4096)
                else:
                    data = os.read(self._read_fd, _PIPE_SIZE)
                    if not data:
                        raise EOFError
                    self._buffer += data
                    self._parse()
        if self._records:
            return self._records.popleft()
        return self._local.popleft()

    def qsize(self) -> int:
        pending = len(self._records) + len(self._local)
        # select, not the shared poll object: that one refuses a second thread.
        if select.select([self._read_fd], [], [], 0)[0]:
            pending += 1
        return pending

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd, self._wake_read_fd, self._wake_write_fd):
            os.close(fd)

    def join_thread(self) -> None:
        pass

    def _parse(self) -> None:
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= _HEADER.size:
            length, pid, number, flags = _HEADER.unpack_from(buffer, offset)
            end = offset + _HEADER.size + length
            if end > len(buffer):
                break  # the read ended inside a frame; the rest is still in the pipe
            chunk = bytes(buffer[offset + _HEADER.size : end])
            offset = end
            key = (pid, number)
            if flags & _FIRST:
                payload = bytearray(chunk)
            elif key in self._partial:
                payload = self._partial.pop(key)
                payload += chunk
            else:
                continue  # the start of this record was given up on
            if not flags & _LAST:
                if len(self._partial) >= _MAX_PARTIAL:
                    # Left by writers that died, or gave up, between chunks.
                    del self._partial[next(iter(self._partial))]
                self._partial[key] = payload
                continue
            try:
                record = pickle.loads(payload)
            except Exception as e:
                record = logging.makeLogRecord(
                    {
                        "name": __name__,
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                        "msg": f"an unreadable log record from process {pid}: {e!r}",
                        "mount": SUPERVISOR,
                    }
                )
            if isinstance(record, logging.LogRecord):
                self._records.append(record)
        del buffer[:offset]


def _pickle(record: logging.LogRecord) -> bytes:
    try:
        data = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
    except Exception:
        # An `extra` value that does not pickle: send everything as text.
        data = pickle.dumps(_plain(record), pickle.HIGHEST_PROTOCOL)
    if len(data) <= _MAX_RECORD:
        return data
    plain = _plain(record)
    half = _MAX_RECORD // 4
    for field in ("msg", "exc_text", "stack_info"):
        text = getattr(plain, field)
        if isinstance(text, str) and len(text) > half:
            setattr(plain, field, f"{text[:half]}... [{len(text) - half} characters cut]")
    return pickle.dumps(plain, pickle.HIGHEST_PROTOCOL)


def _plain(record: logging.LogRecord) -> logging.LogRecord:
    fields = {
        k: v if v is None or isinstance(v, str | int | float | bool) else repr(v)
        for k, v in record.__dict__.items()
    }
    fields["msg"], fields["args"], fields["exc_info"] = record.getMessage(), None, None
    return logging.makeLogRecord(fields)


def _dropped_notice(count: int) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {
            "name": __name__,
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": f"{count} log records dropped: the supervisor did not keep up",
        }
    )
    _Tag().filter(record)
    return record


def setup_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) from this process and every child forked later.

    `level` is one of LEVELS, `fmt` "text" or "json". Call again to replace
    the setup: the root logger's handlers are removed (ours closed).
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, multiprocessing_logging.MultiProcessingHandler):
            old.close()  # ends its receive thread once the pipe is drained
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Before wrapping: the wrapper shares the handler's filter list.
    handler.addFilter(_Tag())
    root.addHandler(handler)
    root.setLevel(level.upper())
    multiprocessing_logging.install_mp_handler(root)
    for wrapper in root.handlers:
        if isinstance(wrapper, multiprocessing_logging.MultiProcessingHandler):
            # Nothing was sent on the original queue yet; the receive thread
            # reads `self.queue` afresh on each turn (at most 0.2 s from now).
            wrapper.queue = _PipeQueue()


def log_pipe_fd() -> int | None:
    """The write end of the log pipe that children's records travel in, to
    pass to a process that is exec'd rather than forked (None: no pipe)."""
    for handler in logging.getLogger().handlers:
        queue = getattr(handler, "queue", None)
        if isinstance(queue, _PipeQueue):
            return queue.write_fd
    return None


class _ExecChildHandler(logging.Handler):
    """A record's way to the supervisor from a process that was exec'd (a
    fresh interpreter: no multiprocessing-logging wrapper inherited), through
    the log pipe's descriptor it was given."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._writer = _PipeWriter(fd)
        self._formatter = TextFormatter()
        self.addFilter(_Tag())

    def emit(self, record: logging.LogRecord) -> None:
        # As multiprocessing-logging prepares a record: arguments and the
        # traceback as text, so that nothing unpicklable travels.
        try:
            if record.args:
                record.msg = record.getMessage()
                record.args = None
            if record.exc_info:
                record.exc_text = self._formatter.formatException(record.exc_info)
                record.exc_info = None
            self._writer.put(record)
        except Exception:
            self.handleError(record)


def setup_exec_child_logging(fd: int, level: str, name: str) -> None:
    """In an exec'd child: log into the supervisor's stream through `fd`,
    tagged `name`, at `level` (one of LEVELS)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    os.set_blocking(fd, False)
    root.addHandler(_ExecChildHandler(fd))
    root.setLevel(level.upper())
    tag_process(name)
