"""The inode table's sharing index (workers/nodeindex.py) against a dict,
through random inserts and removals in a table small enough that runs of
colliding slots wrap around its end."""

from __future__ import annotations

import random
import struct

import pytest

from tvix_mountd.workers import nodeindex
from tvix_mountd.workers.nodeindex import NodeIndex


def _node(i: int) -> bytes:
    return b"f" + struct.pack("<I", i) * 8 + struct.pack("<Q", i)


@pytest.mark.parametrize("seed", range(5))
def test_the_index_answers_as_a_dict_would(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(nodeindex, "_MIN_SLOTS", 8)
    rnd = random.Random(seed)
    pool = [_node(i) for i in range(300)]
    nodes: list[bytes | None] = [None]
    index = NodeIndex(nodes)
    expected: dict[bytes, int] = {}
    free: list[int] = []
    for step in range(20_000):
        node = rnd.choice(pool)
        if node in expected and rnd.random() < 0.55:
            ino = expected.pop(node)
            assert index.remove(ino)
            assert not index.remove(ino)  # gone
            nodes[ino] = None
            free.append(ino)
        elif node not in expected:
            found, slot = index.probe(node)
            assert found == 0
            ino = free.pop() if free else len(nodes)
            if ino == len(nodes):
                nodes.append(None)
            nodes[ino] = node
            index.insert(ino, slot)
            expected[node] = ino
        if step % 101 == 0:
            assert len(index) == len(expected)
            for n in pool:
                assert index.get(n) == expected.get(n), (step, n)
    for n in pool:
        assert index.get(n) == expected.get(n)


def test_a_second_number_for_one_node_is_not_the_indexed_one() -> None:
    """After a kill, two live numbers may hold one node: only the first
    shares it, and removing the other leaves the first indexed."""
    node = _node(1)
    nodes: list[bytes | None] = [None, node, node]
    index = NodeIndex(nodes)
    _, slot = index.probe(node)
    index.insert(1, slot)
    assert index.probe(node)[0] == 1
    assert not index.remove(2)
    assert index.get(node) == 1 and len(index) == 1
    assert index.remove(1)
    assert index.get(node) is None and len(index) == 0
