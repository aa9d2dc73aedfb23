"""The tracker's live stream: a task id's topic carries every event of the task;
END_TOPIC + the id carries only the event that ends it (what ``Client.wait`` hears).

The tracker is built in this process on a real SQLite store and turns its own cycle
(``Tracker.turn``) while the test waits; a real DEALER feeds it event batches as a
router does, and real SUB sockets listen over ipc.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from trackerkit import fed_tracker, one_step_history, send_events, turn_until

from dsat.message import END_TOPIC, recv_frames
from dsat.topology import TRACKER, get_connection
from dsat.tracker import Tracker

Running = tuple[Tracker, zmq.Socket[bytes], str]


@pytest.fixture
def running(
    tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[Running]:
    """A tracker, its producer, and the address of its live stream."""
    with fed_tracker(tmp_path, ipc_dir, zctx) as (tracker, producer):
        address = get_connection(tracker.topology, TRACKER, satellite="local").socket("pub")
        yield tracker, producer, address.addresses[0]


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
    turn_until(tracker, lambda: "t-1" in tracker.awaited and "t-1" in tracker.watched)
    send_events(producer, one_step_history("t-1", result=41), first=1)

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
    turn_until(tracker, lambda: "t-2" in tracker.awaited)
    waiter.setsockopt(zmq.UNSUBSCRIBE, END_TOPIC + b"t-2")
    turn_until(tracker, lambda: "t-2" not in tracker.awaited)
    send_events(producer, one_step_history("t-2"), first=1)
    turn_until(tracker, lambda: getattr(tracker.store.task("t-2"), "ended", None))
    assert _heard(tracker, waiter) == []
    assert [topic for topic in published if b"t-2" in topic] == []  # not even encoded
