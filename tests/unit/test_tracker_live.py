"""The tracker's live stream: a task id's topic carries every event of the task;
END_TOPIC + the id carries only the event that ends it (what ``Client.wait`` hears).

The tracker is built in this process on a real SQLite store and turns its own cycle
(``Tracker.turn``) while the test waits; a real DEALER feeds it event batches as a
router does, and real SUB sockets listen over ipc.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from trackerkit import tracker_and_producer

from conftest import wait_for
from dsat.fsm import Event
from dsat.message import END_TOPIC, EventRecord, control, pack_records, recv_frames
from dsat.topology import TRACKER, get_connection
from dsat.tracker import Tracker

Running = tuple[Tracker, zmq.Socket[bytes], str]


@pytest.fixture
def running(
    tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[Running]:
    """A tracker, its producer, and the address of its live stream."""
    tracker, producer = tracker_and_producer(tmp_path, ipc_dir, zctx)
    address = get_connection(tracker.topology, TRACKER, satellite="local").socket("pub")
    try:
        yield tracker, producer, address.addresses[0]
    finally:
        producer.close(linger=0)
        tracker.close()


def _turning(tracker: Tracker, predicate: Callable[[], Any]) -> None:
    """Let the tracker turn its cycle until ``predicate()`` holds (at most 5 s)."""

    def turned() -> Any:
        tracker.turn(dict(tracker.poller.poll(20)))
        return predicate()

    wait_for(turned, interval=0)


def _history(task_id: str) -> list[EventRecord]:
    """A one-step task's whole history, ending in HAPPY_END with its result (41)."""
    now = time.time()

    def record(event: Event, seq: int, step: str, **detail: Any) -> EventRecord:
        return EventRecord(
            task_id, task_id, 1, seq, 1, event, step, "local", "local", "w", 1, now, detail
        )

    return [
        record(Event.INIT, 0, "", next=["s1"]),
        record(Event.SEND, 1, "", next=["s1"]),
        record(Event.ACK, 1, "s1"),
        record(Event.START, 1, "s1"),
        record(Event.END, 1, "s1", elapsed=0.001),
        record(Event.HAPPY_END, 1, "s1", serialization="msgpack", result=msgpack.packb(41)),
    ]


def _listener(
    zctx: zmq.Context[zmq.Socket[bytes]], address: str, topic: bytes
) -> zmq.Socket[bytes]:
    sub = zctx.socket(zmq.SUB)
    sub.connect(address)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return sub


def _heard(
    tracker: Tracker, sub: zmq.Socket[bytes], quiet: float = 0.3
) -> list[tuple[bytes, dict[str, Any]]]:
    """What came on a listener until it was quiet for ``quiet`` seconds: (topic, body)."""
    heard = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet:
        tracker.turn(dict(tracker.poller.poll(10)))
        while sub.poll(0):
            topic, _, body = recv_frames(sub)
            heard.append((topic, msgpack.unpackb(body, raw=False)))
            quiet_since = time.monotonic()
    return heard


def test_a_waiter_hears_only_the_end_a_watcher_hears_every_event(
    running: Running, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    tracker, producer, address = running
    waiter = _listener(zctx, address, END_TOPIC + b"t-1")
    watcher = _listener(zctx, address, b"t-1")
    _turning(tracker, lambda: "t-1" in tracker.awaited and "t-1" in tracker.watched)
    meta = {"producer": "local/s1.queue", "epoch": 1, "first": 1}
    producer.send_multipart(control("events", meta, pack_records(_history("t-1"))))

    watched = _heard(tracker, watcher)
    assert [body["event"] for _, body in watched] == [
        "INIT",
        "SEND",
        "ACK",
        "START",
        "END",
        "HAPPY_END",
    ]
    awaited = _heard(tracker, waiter)
    assert len(awaited) == 1, awaited
    topic, end = awaited[0]
    assert topic == END_TOPIC + b"t-1"
    assert (end["event"], end["over"], end["state"]) == ("HAPPY_END", True, "HAPPY_END")
    assert [msgpack.unpackb(r["data"]) for r in end["results"]] == [41]
    assert end == watched[-1][1]  # the same message, under its own topic


def test_a_task_nobody_waits_for_any_more_is_not_published(
    running: Running, zctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer, address = running
    published: list[bytes] = []
    publish = tracker.publish

    def counted(frames: list[bytes]) -> None:
        published.append(frames[0])
        publish(frames)

    monkeypatch.setattr(tracker, "publish", counted)
    waiter = _listener(zctx, address, END_TOPIC + b"t-2")
    _turning(tracker, lambda: "t-2" in tracker.awaited)
    waiter.setsockopt(zmq.UNSUBSCRIBE, END_TOPIC + b"t-2")
    _turning(tracker, lambda: "t-2" not in tracker.awaited)
    meta = {"producer": "local/s1.queue", "epoch": 1, "first": 1}
    producer.send_multipart(control("events", meta, pack_records(_history("t-2"))))
    _turning(tracker, lambda: getattr(tracker.store.task("t-2"), "ended", None))
    assert _heard(tracker, waiter) == []
    assert [topic for topic in published if b"t-2" in topic] == []  # not even encoded
