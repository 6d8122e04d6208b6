"""Log records of forked children reach the supervisor's handler, tagged."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from queue import Empty
from typing import Any

import pytest

from tvix_mountd import logs

_FORK = multiprocessing.get_context("fork")
log = logging.getLogger("tvix_mountd.test")

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) \[(?P<mount>[^]]+)\]"
    r" (?P<logger>\S+): (?P<msg>.*)$"
)


class Capture(io.StringIO):
    """A stream that wakes up waiters whenever a record is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def write(self, s: str) -> int:
        with self.changed:
            n = super().write(s)
            self.changed.notify_all()
        return n

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20) -> str:
        with self.changed:
            arrived = self.changed.wait_for(lambda: predicate(self.getvalue()), timeout)
            text = self.getvalue()
        assert arrived, f"records did not arrive; got:\n{text}"
        return text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved, level, tag = list(root.handlers), root.level, logs._process_tag
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
        logs._process_tag = tag


def start(target: Callable[[], None]) -> BaseProcess:
    process = _FORK.Process(target=target)
    process.start()
    return process


def finish(process: BaseProcess) -> None:
    if process.is_alive():
        process.kill()
    process.join(30)


def child_alpha() -> None:
    logs.tag_process("alpha")
    log.info("hello %s", "from the child")
    log.debug("below the level")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("it broke")


@pytest.mark.usefixtures("restore_logging")
def test_text_records_of_a_child_arrive_tagged() -> None:
    out = Capture()
    logs.setup_logging("info", "text", stream=out)
    log.info("the supervisor speaks")
    child = start(child_alpha)
    try:
        child.join(30)
        assert child.exitcode == 0
    finally:
        finish(child)
    text = out.wait_for(lambda t: "ZeroDivisionError" in t and "supervisor speaks" in t)
    lines = text.splitlines()
    parsed = [TEXT_LINE.match(line) for line in lines]
    records = [p.groupdict() for p in parsed if p]
    assert {"level": "INFO", "mount": "supervisor", "logger": "tvix_mountd.test",
            "msg": "the supervisor speaks"} in records  # fmt: skip
    assert {"level": "INFO", "mount": "alpha", "logger": "tvix_mountd.test",
            "msg": "hello from the child"} in records  # fmt: skip
    assert {"level": "ERROR", "mount": "alpha", "logger": "tvix_mountd.test",
            "msg": "it broke"} in records  # fmt: skip
    assert "below the level" not in text
    # The traceback follows its record, formatted in the child.
    broke = next(i for i, line in enumerate(lines) if line.endswith("it broke"))
    assert lines[broke + 1] == "Traceback (most recent call last):"
    assert "1 / 0" in text
    assert lines[broke + 1 :].index("ZeroDivisionError: division by zero") > 0


@pytest.mark.usefixtures("restore_logging")
def test_json_records_of_a_child_arrive_tagged() -> None:
    out = Capture()
    logs.setup_logging("debug", "json", stream=out)
    log.warning("from the supervisor", extra={"mount": "beta"})
    child = start(child_alpha)
    try:
        child.join(30)
        assert child.exitcode == 0
    finally:
        finish(child)
    text = out.wait_for(lambda t: t.count("\n") >= 4)
    records = [json.loads(line) for line in text.splitlines()]
    by_msg = {r["msg"]: r for r in records}
    assert set(by_msg) == {"from the supervisor", "hello from the child", "below the level",
                           "it broke"}  # fmt: skip
    assert by_msg["from the supervisor"]["mount"] == "beta"  # extra={"mount": ...} wins
    assert by_msg["from the supervisor"]["process"] == os.getpid()
    hello = by_msg["hello from the child"]
    assert set(hello) == {"ts", "level", "process", "mount", "logger", "msg"}
    assert (hello["level"], hello["mount"], hello["logger"]) == ("INFO", "alpha", log.name)
    assert hello["process"] == child.pid
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", hello["ts"])
    broke = by_msg["it broke"]
    assert broke["level"] == "ERROR"
    assert broke["exc"].startswith("Traceback (most recent call last):")
    assert broke["exc"].endswith("ZeroDivisionError: division by zero")


BIG = "x" * 20_000  # several PIPE_BUF chunks


def chatty_child() -> None:
    logs.tag_process("chatty")
    while True:
        log.info("big %s", BIG)


def quiet_child() -> None:
    logs.tag_process("quiet")
    log.info("still heard")


@pytest.mark.usefixtures("restore_logging")
def test_a_child_killed_while_logging_wedges_nobody() -> None:
    """With multiprocessing.Queue this hangs: a writer killed holding the queue's
    lock blocks every other writer, and children at exit."""
    out = Capture()
    logs.setup_logging("info", "text", stream=out)
    chatty = start(chatty_child)
    quiet: BaseProcess | None = None
    try:
        out.wait_for(lambda t: t.count("[chatty]") >= 3)
        assert chatty.pid is not None
        os.kill(chatty.pid, signal.SIGKILL)
        chatty.join(30)
        assert chatty.exitcode == -signal.SIGKILL
        log.info("the supervisor carries on")
        # Let the reader catch up, so that the pipe has room for `quiet`.
        wrapper: Any = logging.getLogger().handlers[0]
        out.wait_for(lambda _: wrapper.queue.qsize() == 0)
        quiet = start(quiet_child)
        quiet.join(30)
        assert quiet.exitcode == 0  # did not hang at exit
        text = out.wait_for(lambda t: "still heard" in t and "carries on" in t)
    finally:
        finish(chatty)
        if quiet is not None:
            finish(quiet)
    chatty_lines = [line for line in text.splitlines() if "[chatty]" in line]
    # Whatever was cut by the kill (or dropped, when the child outran the
    # reader) is left out; every record shown is whole.
    big = [line for line in chatty_lines if " big " in line]
    assert big and all(line.endswith(f"big {BIG}") for line in big)
    assert all(
        line.endswith("log records dropped: the supervisor did not keep up")
        for line in chatty_lines
        if " big " not in line
    )


def fill_the_pipe(queue: logs._PipeQueue, puts: Any, filled: Any, drained: Any) -> None:
    record = logging.makeLogRecord({"msg": "y" * 3000, "mount": "m"})
    while queue._writer.dropped == 0:  # non-blocking: this ends when the pipe is full
        queue.put_nowait(record)
        puts.value += 1
    for _ in range(5):
        queue.put_nowait(record)
        puts.value += 1
    filled.set()
    drained.wait()
    queue.put_nowait(logging.makeLogRecord({"msg": "after", "mount": "m"}))


def test_a_full_pipe_drops_a_childs_records_and_says_so() -> None:
    queue = logs._PipeQueue()
    puts, filled, drained = _FORK.Value("i", 0), _FORK.Event(), _FORK.Event()
    child = _FORK.Process(target=fill_the_pipe, args=(queue, puts, filled, drained))
    child.start()
    try:
        assert filled.wait(20)
        received, reported = 0, 0
        messages: list[str] = []
        while queue.qsize():
            messages.append(queue.get(timeout=20).getMessage())
        drained.set()  # the last notice goes out with the child's next record
        while "after" not in messages:
            messages.append(queue.get(timeout=20).getMessage())
        child.join(30)
        assert child.exitcode == 0
        for message in messages:
            if message == "y" * 3000:
                received += 1
            elif message != "after":
                notice = re.fullmatch(
                    r"(\d+) log records dropped: the supervisor did not keep up", message
                )
                assert notice is not None, message
                reported += int(notice[1])
        assert messages[-1] == "after"
        assert messages[-2].endswith("log records dropped: the supervisor did not keep up")
        assert received < puts.value
        assert received + reported == puts.value  # nothing lost without a word
    finally:
        finish(child)
        queue.close()


def send_odd_records(queue: logs._PipeQueue) -> None:
    queue.put_nowait(logging.makeLogRecord({"msg": "odd", "thing": threading.Lock()}))
    queue.put_nowait(logging.makeLogRecord({"msg": "z" * 1_000_000}))


def test_unpicklable_extras_and_huge_records_still_travel() -> None:
    queue = logs._PipeQueue()
    child = _FORK.Process(target=send_odd_records, args=(queue,))
    child.start()
    try:
        odd = queue.get(timeout=20)
        assert odd.msg == "odd"
        assert getattr(odd, "thing").startswith("<unlocked _thread.lock")  # noqa: B009
        huge = queue.get(timeout=20)
        assert huge.msg.startswith("zzz")
        assert huge.msg.endswith("characters cut]")
        assert len(huge.msg) < 300_000
        child.join(30)
        assert child.exitcode == 0
    finally:
        finish(child)
        queue.close()


def test_the_supervisors_own_records_skip_the_pipe() -> None:
    queue = logs._PipeQueue()
    try:
        record = logging.makeLogRecord({"msg": "mine"})
        queue.put_nowait(record)
        assert queue.qsize() == 1
        assert queue.get(timeout=1) is record  # not pickled: nothing to lose
        with pytest.raises(Empty):
            queue.get(timeout=0)
    finally:
        queue.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log format"):
        logs.setup_logging("info", "xml")
    with pytest.raises(ValueError, match="log level"):
        logs.setup_logging("loud", "text")
