"""A tracker built in the test's process on a real SQLite store, fed by a real DEALER over
ipc as a router feeds it (the unit tests of the tracker share it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

from conftest import wait_for
from dsat.fsm import Event
from dsat.message import EventRecord, control, decode_control, pack_records, recv_frames
from dsat.store import Batch, TaskRow, open_store
from dsat.topology import TRACKER, get_connection, load_topology
from dsat.tracker import Tracker

TOPOLOGY = """\
[satellite.local]
runtime_dir = "{runtime}"

[store]
url = "sqlite:///{store}"

[step.s1]
call = "math:sqrt"
entry = true
"""


def tracker_and_producer(
    tmp_path: Path,
    ipc_dir: Path,
    zctx: zmq.Context[zmq.Socket[bytes]],
    stored: Iterable[TaskRow] = (),
) -> tuple[Tracker, zmq.Socket[bytes]]:
    """A tracker on a store already holding ``stored``, and a producer socket connected to it.

    The caller closes both."""
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY.format(runtime=ipc_dir / "rt", store=tmp_path / "status.db"))
    topology = load_topology(path)
    (ipc_dir / "rt").mkdir(mode=0o700)  # dsat run makes it; here the test does
    url = topology.store_url("local")
    rows = {row.task_id: row for row in stored}
    if rows:
        store = open_store(url)
        store.write(Batch(tasks=dict(rows)))
        store.close()
    tracker = Tracker(topology, satellite="local", context=zctx, store=open_store(url))
    producer = zctx.socket(zmq.DEALER)
    producer.connect(
        get_connection(topology, TRACKER, satellite="local").socket("events").addresses[0]
    )
    return tracker, producer


@contextlib.contextmanager
def fed_tracker(
    tmp_path: Path,
    ipc_dir: Path,
    zctx: zmq.Context[zmq.Socket[bytes]],
    stored: Iterable[TaskRow] = (),
) -> Iterator[tuple[Tracker, zmq.Socket[bytes]]]:
    """tracker_and_producer, both closed when the block ends."""
    tracker, producer = tracker_and_producer(tmp_path, ipc_dir, zctx, stored)
    try:
        yield tracker, producer
    finally:
        producer.close(linger=0)
        tracker.close()


def send_events(
    producer: zmq.Socket[bytes], records: list[EventRecord], first: int, behind: int = 0
) -> None:
    """One events batch from s1's queue, numbered from ``first``; ``behind``: how many
    more events it says it holds."""
    meta = {"producer": "local/s1.queue", "epoch": 1, "first": first, "behind": behind}
    producer.send_multipart(control("events", meta, pack_records(records)))


def one_step_history(
    task_id: str, *, with_s1_hop: bool = True, result: Any = 1
) -> list[EventRecord]:
    """A one-step task's events, ending in HAPPY_END with ``result``; without the s1 hop
    (ACK, START), its history has a hole."""
    now = time.time()

    def record(event: Event, seq: int, step: str, **detail: Any) -> EventRecord:
        return EventRecord(
            task_id, task_id, 1, seq, 1, event, step, "local", "local", "w", 1, now, detail
        )

    events = [record(Event.INIT, 0, "", next=["s1"]), record(Event.SEND, 1, "", next=["s1"])]
    if with_s1_hop:
        events += [record(Event.ACK, 1, "s1"), record(Event.START, 1, "s1")]
    events += [
        record(Event.END, 1, "s1", elapsed=0.001),
        record(Event.HAPPY_END, 1, "s1", serialization="msgpack", result=msgpack.packb(result)),
    ]
    return events


def turn_until(tracker: Tracker, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Let the tracker turn its cycle until ``predicate()`` holds; return its value."""

    def turned() -> Any:
        tracker.turn(dict(tracker.poller.poll(20)))
        return predicate()

    return wait_for(turned, timeout=timeout, interval=0)


def turn_for(tracker: Tracker, seconds: float) -> None:
    """Let the tracker turn its cycle for ``seconds``, whatever happens."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        tracker.turn(dict(tracker.poller.poll(10)))


def confirmations(producer: zmq.Socket[bytes]) -> list[dict[str, Any]]:
    """The bodies of the confirmations the producer has received so far."""
    bodies = []
    while producer.poll(0):
        bodies.append(decode_control(producer.recv_multipart(), frozenset({"confirm"})).body)
    return bodies


def next_message(tracker: Tracker, socket: zmq.Socket[bytes]) -> list[bytes]:
    """Let the tracker turn until a message arrives on ``socket``; its frames."""
    frames: list[bytes] = turn_until(tracker, lambda: socket.poll(0) and recv_frames(socket))
    return frames
