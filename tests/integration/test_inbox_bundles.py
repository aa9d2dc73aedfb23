"""Task messages between routers of one satellite travel in bundles.

A router hands each local instance of a next step everything it has for it in
one cycle as one message: its task messages (three frames each) one after the
other. The receiving inbox takes each as if it had come alone. Here: the
sending side (a real ``Outbox`` and a ROUTER bound where the next step's inbox
is) and the receiving side (a real queue router process, ``python -m dsat.node``,
fed by a DEALER playing the previous step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from bundlekit import node_process, task, write_topology

from conftest import wait_for
from dsat.message import PROTOCOL_FRAME, decode, decode_control
from dsat.router import Outbox, Pending
from dsat.topology import Topology, inbox_address, load_topology

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def topology(tmp_path: Path, ipc_dir: Path) -> Topology:
    return load_topology(write_topology(tmp_path, ipc_dir))


@pytest.fixture
def context() -> Iterator[Context]:
    made: Context = zmq.Context()
    yield made
    made.destroy(linger=0)


def key(n: int) -> tuple[str, int, int]:
    return (f"task{n:04d}", 1, 1)


# ---------------------------------------------------------------------------
# sending


def test_what_a_cycle_has_for_an_inbox_leaves_as_one_message(
    topology: Topology, context: Context
) -> None:
    inbox = context.socket(zmq.ROUTER)
    inbox.setsockopt(zmq.RCVTIMEO, 5_000)
    inbox.bind(inbox_address(topology, "local", "local", "double"))
    outbox = Outbox(context, topology, "local", {"double": ("local",)}, identity=b"o", guard=None)
    try:
        for n in range(3):
            outbox.add(Pending(key(n), ("parent", 1, 0), "double", task(n)))
        instance = outbox.instances["double"][0]

        # IMMEDIATE: nothing is queued before the peer is connected; then all of it goes
        def sent() -> bool:
            outbox.flush(time.monotonic())
            return instance.in_flight == 3

        wait_for(sent)
        sender, *frames = inbox.recv_multipart()
        assert sender == b"o"
        assert len(frames) == 9
        keys = [decode(frames[i : i + 3]).envelope.task_id for i in range(0, 9, 3)]
        assert keys == ["task0000", "task0001", "task0002"]
        assert all(p.tries == 1 for p in outbox.pending.values())
        assert not inbox.poll(100)  # and nothing else
    finally:
        outbox.close()
        inbox.close(linger=0)


def test_a_bundle_that_cannot_leave_waits_whole_and_takes_no_window(
    topology: Topology, context: Context
) -> None:
    outbox = Outbox(context, topology, "local", {"double": ("local",)}, identity=b"o", guard=None)
    try:
        for n in range(3):
            outbox.add(Pending(key(n), ("parent", 1, 0), "double", task(n)))
        outbox.flush(time.monotonic())  # no inbox there: the send fails at once (IMMEDIATE)
        instance = outbox.instances["double"][0]
        assert instance.in_flight == 0
        assert all(p.tries == 0 and p.instance is None for p in outbox.pending.values())
        assert outbox.next_due() <= time.monotonic() + 0.1  # tried again soon
    finally:
        outbox.close()


# ---------------------------------------------------------------------------
# receiving


@pytest.fixture
def queue_inbox(
    tmp_path: Path, topology: Topology, context: Context
) -> Iterator[zmq.Socket[bytes]]:
    """A DEALER to the inbox of a real queue router process (stopped by pid)."""
    sender = context.socket(zmq.DEALER)
    sender.setsockopt(zmq.LINGER, 0)
    sender.setsockopt(zmq.RCVTIMEO, 10_000)
    sender.connect(inbox_address(topology, "local", "local", "double"))
    try:
        with node_process(tmp_path / "topology.toml", "double.queue"):
            yield sender
    finally:
        sender.close(linger=0)


def acked(sender: zmq.Socket[bytes], count: int) -> list[tuple[str, int, int]]:
    """The keys the inbox acknowledged, until there are ``count`` of them."""
    keys: list[tuple[str, int, int]] = []
    while len(keys) < count:
        message = decode_control(sender.recv_multipart(), frozenset({"ack", "busy", "release"}))
        assert message.kind == "ack"
        keys += [tuple(k) for k in message.body]
    return keys


def test_an_inbox_takes_each_task_message_of_a_bundle(queue_inbox: zmq.Socket[bytes]) -> None:
    sender = queue_inbox
    sender.send_multipart(task(0))  # alone, as a remote satellite sends them
    assert acked(sender, 1) == [key(0)]
    sender.send_multipart([*task(1), *task(2), *task(3)])
    assert acked(sender, 3) == [key(1), key(2), key(3)]

    # a bad task message in a bundle is refused alone; the others are taken
    bad = [PROTOCOL_FRAME, b"\xc1 not a header", b""]
    sender.send_multipart([*task(4), *bad, *task(5)])
    assert acked(sender, 2) == [key(4), key(5)]

    # frames that are not whole task messages: nothing is taken, and the inbox goes on
    sender.send_multipart([*task(6), *task(7)[:2]])
    sender.send_multipart(task(8))
    assert acked(sender, 1) == [key(8)]

    # a task message again (a resend) is acknowledged, and taken once
    sender.send_multipart([*task(2), *task(9)])
    assert sorted(acked(sender, 2)) == [key(2), key(9)]
