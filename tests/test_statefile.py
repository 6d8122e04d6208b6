"""The state that outlives a worker: the inode table in its state file, the
request journal and the root-name log (workers/statefile.py, inodes.py,
journal.py), in one process and across real processes killed at random."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import pytest

from tests.mounting import wait_until
from tvix_mountd.castore.nodes import PACKED_DIRECTORY, PACKED_FILE, PACKED_SYMLINK
from tvix_mountd.workers.inodes import InodeTable
from tvix_mountd.workers.journal import CONVICTED_AFTER, RequestJournal, request_key
from tvix_mountd.workers.names import PackedNames
from tvix_mountd.workers.statefile import INLINE_TARGET, StateFile, StateFileError

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def state_fd() -> Iterator[int]:
    fd = StateFile.create()
    try:
        yield fd
    finally:
        os.close(fd)


def directory(i: int) -> bytes:
    return b"d" + i.to_bytes(32, "little") + (i * 7).to_bytes(8, "little")


def file(i: int) -> bytes:
    return b"f" + (i + 1 << 128).to_bytes(32, "little") + i.to_bytes(8, "little")


def symlink(i: int, length: int) -> bytes:
    """A target that says how long it is: a torn one shows."""
    head = f"target-{i}-{length}-".encode()
    return b"l" + (head + b"x" * length)[: max(length, len(head))]


def table(fd: int) -> InodeTable:
    return InodeTable(StateFile(fd))


def test_a_new_mapping_takes_over_numbers_nodes_counts_and_holds(state_fd: int) -> None:
    first = table(state_fd)
    nodes = [directory(1), file(2), symlink(3, 10), symlink(4, 5000), directory(5)]
    assert len(nodes[2]) - 1 <= INLINE_TARGET < len(nodes[3]) - 1
    numbers = [first.ref(node) for node in nodes]
    first.ref(nodes[1])
    first.forget(numbers[4], 1)  # freed: its number is reused
    children = (PackedNames([b"a", b"b"]), (nodes[1], nodes[2]))
    first.set_children(numbers[0], nodes[0], children)
    first.hold(numbers[0], 0, 2)
    again = table(state_fd)
    assert len(again) == 4
    for ino, node in zip(numbers[:4], nodes[:4], strict=True):
        assert again.node(ino) == node
        assert again.ref(node) == ino  # same content, same number
    assert again.lookups(numbers[1]) == 2 + 1 + 1  # two lookups, the hold, ours
    assert again.held(numbers[0]) == 2
    assert again.node(numbers[4]) is None
    assert again.ref(directory(6)) == numbers[4]  # the freed number, reused


def test_a_forgotten_directory_gives_back_what_it_held_after_a_handover(state_fd: int) -> None:
    first = table(state_fd)
    parent, child = directory(1), file(2)
    parent_ino = first.ref(parent)
    child_ino = first.ref(child)
    first.set_children(parent_ino, parent, (PackedNames([b"c"]), (child,)))
    first.hold(parent_ino, 0, 1)
    first.forget(child_ino, 1)  # the kernel forgot the entry; the listing holds it
    assert first.lookups(child_ino) == 1
    again = table(state_fd)  # its contents are not in this process
    unresolved = again.forget(parent_ino, 1)
    assert unresolved == [(parent, 1)]
    assert again.node(child_ino) == child  # still held until given back
    assert again.release_held((child,)) == []
    assert again.node(child_ino) is None
    assert len(again) == 0


@pytest.mark.parametrize("taken_over", ["no", "by a new worker", "from an older file"])
def test_a_directory_the_kernel_forgot_gives_back_what_it_held_while_its_parent_holds_it(
    state_fd: int, taken_over: str
) -> None:
    """The kernel forgets a directory (its inode evicted, and its cached
    listing with it) while its parent's cached listing still names it: the
    directory keeps its number, what its own listing held goes. Any count
    other than its parents' holds (a pin, a lookup) keeps that back. The
    parents' holds are in the file, so a new worker does the same (fetching
    the contents it lacks); a file from before they were kept says none,
    and the listing stays held until the directory goes."""
    first = table(state_fd)
    top, inner, a, b = directory(1), directory(2), symlink(3, 5), symlink(4, 5)
    top_ino = first.ref(top)
    first.set_children(top_ino, top, (PackedNames([b"inner"]), (inner,)))
    inner_ino = first.ref(inner)  # top's readdirplus
    first.hold(top_ino, 0, 1, [inner_ino])
    first.set_children(inner_ino, inner, (PackedNames([b"a", b"b"]), (a, b)))
    a_ino, b_ino = first.ref(a), first.ref(b)  # inner's readdirplus
    first.hold(inner_ino, 0, 2, [a_ino, b_ino])
    first.forget(a_ino, 1)
    first.forget(b_ino, 1)
    assert first.node(a_ino) == a  # inner's cached listing names them
    if taken_over == "from an older file":
        first.state.set_held_by(inner_ino, 0)
    again = first if taken_over == "no" else table(state_fd)
    assert again.pin(inner) == inner_ino
    assert again.forget(inner_ino, 1) == []  # the kernel's lookup: the pin is left
    assert again.node(a_ino) == a and again.held(inner_ino) == 2
    unresolved = again.forget(inner_ino, 1)  # the pin
    assert again.node(inner_ino) == inner and again.lookups(inner_ino) == 1
    if taken_over == "from an older file":
        assert unresolved == [] and again.held(inner_ino) == 2
        assert again.node(a_ino) == a
    else:
        if taken_over == "by a new worker":  # no contents here: the caller fetches them
            assert unresolved == [(inner, 2)]
            assert again.release_held((a, b)) == []
        else:
            assert unresolved == []
        assert again.held(inner_ino) == 0 and again.children(inner_ino) is None
        assert again.node(a_ino) is None and again.node(b_ino) is None
        assert len(again) == 2
    # top forgotten: everything goes, what inner still held with it.
    unresolved = again.forget(top_ino, 1)
    while unresolved:
        node, held = unresolved.pop()
        contents = {top: (inner,), inner: (a, b)}[node]
        unresolved += again.release_held(contents[:held])
    assert len(again) == 0
    if again is not first:
        again.close()
    first.close()


def test_a_file_that_is_not_a_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(StateFileError, match="bytes"):
            StateFile(fd)
    finally:
        os.close(fd)


def test_root_names_are_logged_once_and_read_back(state_fd: int) -> None:
    state = StateFile(state_fd)
    for name in (b"aaa-one", b"bbb-two", b"aaa-one"):
        state.log_root_name(name)
    again = StateFile(state_fd)
    assert again.root_names() == {b"aaa-one", b"bbb-two"}
    again.log_root_name(b"bbb-two")
    assert StateFile(state_fd).root_names() == {b"aaa-one", b"bbb-two"}


# -- the request journal -----------------------------------------------------------------


def test_requests_left_in_flight_become_suspects_then_convicted(state_fd: int) -> None:
    key = request_key(2, (5, b"name", object()))
    other = request_key(2, (5, b"other"))
    assert key != other and key == request_key(2, (5, b"name"))
    first = RequestJournal(StateFile(state_fd).journal)
    first.begin(key)
    done = first.begin(other)
    first.end(done)
    # The worker dies with `key` in flight.
    second = RequestJournal(StateFile(state_fd).journal)
    assert second.take_over(blame=True) == [key]
    assert second.suspects == {key: 1} and not second.convicted(key)
    second.begin(key)  # resent, and it kills this worker too
    third = RequestJournal(StateFile(state_fd).journal)
    third.take_over(blame=True)
    assert third.suspects[key] == CONVICTED_AFTER and third.convicted(key)
    # A suspect that completes is cleared, also for the next worker.
    third.cleared(key)
    assert RequestJournal(StateFile(state_fd).journal).suspects == {}


def test_a_worker_that_left_on_request_is_not_held_against_its_requests(state_fd: int) -> None:
    first = RequestJournal(StateFile(state_fd).journal)
    key = request_key(7, (9,))
    first.begin(key)
    second = RequestJournal(StateFile(state_fd).journal)
    assert second.take_over(blame=False) == [key]
    assert second.suspects == {}
    assert RequestJournal(StateFile(state_fd).journal).take_over(blame=True) == []


def test_request_keys_are_the_same_in_another_interpreter() -> None:
    code = (
        "from tvix_mountd.workers.journal import request_key;"
        "print(request_key(3, (17, b'some-name', 4096)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == request_key(3, (17, b"some-name", 4096))


# -- killed at random ------------------------------------------------------------------------

_MODEL = struct.Struct("<cI")  # op (r: a lookup answered, f: one forgotten), node index


def _node_of(index: int) -> bytes:
    kind = index % 3
    if kind == 0:
        return directory(index)
    if kind == 1:
        return file(index)
    # Short targets are kept in the slot, long ones on the heap: both kinds.
    return symlink(index, (index * 37) % 3000 if index % 2 else index % 30)


def _worker(state_fd: int, model_path: str, seed: int) -> None:  # pragma: no cover - a child
    """A worker's use of the table, forever: lookups answered (a count the
    kernel then holds, logged after the reply) and forgets (logged before,
    as the kernel forgets before it tells us)."""
    rng = random.Random(seed)
    inodes = table(state_fd)
    held = _held(Path(model_path))
    model = os.open(model_path, os.O_WRONLY | os.O_APPEND)
    while True:
        index = rng.randrange(200)
        if held[index] > 0 and rng.random() < 0.5:
            held[index] -= 1
            os.write(model, _MODEL.pack(b"f", index))
            ino = inodes.ref(_node_of(index))  # its number, as the kernel knows it
            inodes.forget(ino, 1)  # our lookup just now
            inodes.forget(ino, 1)  # the kernel's forget
        else:
            inodes.ref(_node_of(index))
            held[index] += 1
            os.write(model, _MODEL.pack(b"r", index))


def test_a_table_written_by_processes_killed_at_random_stays_usable_and_never_low(
    state_fd: int, tmp_path: Path
) -> None:
    model_path = tmp_path / "model"
    model_path.write_bytes(b"")
    rng = random.Random(1)
    for round_ in range(25):
        child = FORK.Process(target=_worker, args=(state_fd, str(model_path), round_))
        child.start()
        # Let it work a while, then kill it wherever it is.
        target = model_path.stat().st_size + rng.randrange(1, 400) * _MODEL.size

        def worked(child: BaseProcess = child, target: int = target) -> bool:
            return model_path.stat().st_size >= target or not child.is_alive()

        wait_until(worked, 30, "the worker to get going")
        assert child.is_alive(), child.exitcode
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        _check(state_fd, model_path)


def _held(model_path: Path) -> Counter[int]:
    """Node index -> lookups the kernel holds, as the model log says."""
    data = model_path.read_bytes()
    held: Counter[int] = Counter()
    for i in range(0, len(data) - len(data) % _MODEL.size, _MODEL.size):
        op, index = _MODEL.unpack_from(data, i)
        held[index] += 1 if op == b"r" else -1
    return held


def _check(state_fd: int, model_path: Path) -> None:
    state = StateFile(state_fd)
    live, free = state.scan()
    targets: set[bytes] = set()
    for ino, node, count in live:
        assert count > 0
        assert node[0] in (PACKED_DIRECTORY, PACKED_FILE, PACKED_SYMLINK), (ino, node[:1])
        if node[0] == PACKED_SYMLINK:
            head, _, _ = node[1:].partition(b"x")
            _, number, length = head.rstrip(b"-").split(b"-")
            assert node == symlink(int(number), int(length)), "a torn target"
            assert node not in targets, "two live slots share a target"
            targets.add(node)
        else:
            assert len(node) == 41
    assert not set(free) & {ino for ino, _, _ in live}
    # What the kernel holds (the model), the table holds at least.
    counts = {node: count for _, node, count in live}
    # The parents' holds a count includes are never said to be more than the
    # counts beyond the kernel's lookups: one too many would give a
    # directory's listing back while the kernel still keeps it. (By node: a
    # kill may leave two live numbers of one, the kernel's on either.)
    beyond = Counter({_node_of(index): -n for index, n in _held(model_path).items() if n > 0})
    said: Counter[bytes] = Counter()
    for ino, node, count in live:
        beyond[node] += count
        said[node] += state.held_by(ino)
    for node, holds in said.items():
        assert holds <= beyond[node], (node[:20], holds, beyond[node])
    for index, count in _held(model_path).items():
        if count > 0:
            node = _node_of(index)
            assert counts.get(node, 0) >= count, (
                f"node {index} ({node[:20]!r}): the model holds {count}, the table"
                f" {[(ino, n) for ino, slot_node, n in live if slot_node == node]} (number,"
                f" count); its last model records: {_history(model_path, index)}"
            )


def _history(model_path: Path, index: int, last: int = 12) -> str:
    """The last `last` model records of node `index`, for a failure's message
    (a count lost once in a full run: what led there is what to look at)."""
    data = model_path.read_bytes()
    ops = [
        op.decode()
        for op, i in (
            _MODEL.unpack_from(data, at)
            for at in range(0, len(data) - len(data) % _MODEL.size, _MODEL.size)
        )
        if i == index
    ]
    return "".join(ops[-last:]) + f" ({len(ops)} in all)"


# -- killed at every line ----------------------------------------------------------------------

_TRACED = ("workers/statefile.py", "workers/inodes.py")


def _scripted_worker(state_fd: int, model_path: str, kill_at: int) -> None:  # pragma: no cover
    """A fixed sequence of what a worker does to the table, killed (SIGKILL,
    by itself) before the `kill_at`th line of the table's code runs."""
    lines = 0

    def trace(frame: Any, event: str, arg: object) -> Any:
        nonlocal lines
        if not frame.f_code.co_filename.endswith(_TRACED):
            return None
        if event == "line":
            lines += 1
            if lines == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return trace

    model = os.open(model_path, os.O_WRONLY | os.O_APPEND)

    def replied(index: int) -> None:
        os.write(model, _MODEL.pack(b"r", index))

    def forgotten(index: int) -> None:
        os.write(model, _MODEL.pack(b"f", index))

    sys.settrace(trace)
    inodes = table(state_fd)
    numbers = {}
    for index in range(6):  # directories, files, symlinks, short and long
        numbers[index] = inodes.ref(_node_of(index))
        replied(index)

    def listed(parent: int, looked_up: list[int] | None = None) -> None:
        """A listing of `parent` that the kernel keeps (`looked_up`: the
        numbers its entries were given, as in a readdirplus)."""
        children = _HELD_CHILDREN[parent]
        names = PackedNames([b"%d" % i for i in range(len(children))])
        inodes.set_children(numbers[parent], _node_of(parent), (names, children))
        inodes.hold(numbers[parent], 0, len(children), looked_up)

    listed(0)
    listed(3)
    for index in (1, 2, 5):
        forgotten(index)
        inodes.forget(numbers[index], 1)
    numbers[6] = inodes.ref(_node_of(6))  # into a freed number, and the freed target
    replied(6)
    for index in (4, 3):  # 3, still held by 0, gives back what it held
        forgotten(index)
        inodes.forget(numbers[index], 1)
    numbers[4] = inodes.ref(_node_of(4))  # looked up again: given back once only
    replied(4)
    inodes.ref(_node_of(6))  # (kill points while 0 still holds 3)
    replied(6)
    forgotten(0)
    inodes.forget(numbers[0], 1)  # gives back what it held
    for index in (9, 7):  # 7 as an entry of a readdirplus of 9
        numbers[index] = inodes.ref(_node_of(index))
        replied(index)
    listed(9, [numbers[7]])
    forgotten(9)
    inodes.forget(numbers[9], 1)  # its hold of 7 given back, the kernel's lookup left
    sys.settrace(None)
    os._exit(0)


# The children the scripted worker's directories 0, 3 and 9 hold (kept listings).
_HELD_CHILDREN: Final = {
    0: (_node_of(1), _node_of(2), _node_of(3)),
    3: (_node_of(4),),
    9: (_node_of(7),),
}


def _drain(state_fd: int, model_path: Path) -> None:
    """The next worker takes the table over, and the kernel forgets all it
    holds, directories first (what they hold is given back with them): no
    count may drop below what the kernel still holds, at any step."""
    inodes = table(state_fd)
    held = _held(model_path)

    def number(index: int) -> int:
        ino = inodes.ref(_node_of(index))  # found (or made), plus one...
        inodes.forget(ino, 1)  # ...given back
        return ino

    def check_remaining() -> None:
        for index, count in held.items():
            if count > 0:
                node = inodes.node(number(index))
                assert node == _node_of(index) and inodes.lookups(number(index)) >= count, (
                    f"node {index}: the kernel holds {count}, the table"
                    f" {inodes.lookups(number(index))}"
                )

    check_remaining()
    for index in sorted(held, key=lambda i: (_node_of(i)[0] != PACKED_DIRECTORY, i)):
        count, held[index] = held[index], 0
        if count <= 0:
            continue
        unresolved = inodes.forget(number(index), count)
        while unresolved:
            node, how_many = unresolved.pop()
            (children,) = [c for p, c in _HELD_CHILDREN.items() if _node_of(p) == node]
            assert how_many <= len(children)
            unresolved += inodes.release_held(children[:how_many])
        check_remaining()


def test_a_table_killed_before_any_line_of_its_code_stays_usable_and_never_low(
    tmp_path: Path,
) -> None:
    kill_at = 1
    while True:
        fd = StateFile.create()
        try:
            model_path = tmp_path / f"model-{kill_at}"
            model_path.write_bytes(b"")
            child = FORK.Process(target=_scripted_worker, args=(fd, str(model_path), kill_at))
            child.start()
            child.join(30)
            assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
            _check(fd, model_path)
            _drain(fd, model_path)
        finally:
            os.close(fd)
        if child.exitcode == 0:
            break  # it ran to its end: every line has been a kill point
        kill_at += 1
    assert kill_at > 50, kill_at  # the sequence was traced at all
