"""When the tracker writes: a light cycle's events wait up to WRITE_LINGER to go in one
transaction with later ones, and nothing of them is confirmed or published before;
what someone waits for, a cycle under load, a query and a stop write at once.

The tracker is built in this process on a real SQLite store and turns its cycle
while the test waits; a real DEALER feeds it event batches as a router does, a real
SUB listens to its live stream and a real DEALER asks it questions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from trackerkit import (
    confirmations,
    fed_tracker,
    next_message,
    one_step_history,
    send_events,
    turn_for,
    turn_until,
)

from dsat import tracker as tracker_module
from dsat.message import END_TOPIC, control, decode_control
from dsat.store import open_store
from dsat.topology import TRACKER, get_connection
from dsat.tracker import CONFIRM_AT_ONCE, Tracker

Fed = tuple[Tracker, zmq.Socket[bytes]]


@pytest.fixture
def fed(tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Fed]:
    with fed_tracker(tmp_path, ipc_dir, zctx) as fed:
        yield fed


def _confirmed(producer: zmq.Socket[bytes]) -> list[int]:
    """The ``upto`` of every confirmation the producer has received so far."""
    return [body["upto"] for body in confirmations(producer)]


def _socket(zctx: zmq.Context[zmq.Socket[bytes]], tracker: Tracker, kind: int, purpose: str) -> Any:
    socket = zctx.socket(kind)
    socket.connect(
        get_connection(tracker.topology, TRACKER, satellite="local").socket(purpose).addresses[0]
    )
    return socket


def test_a_light_cycle_is_written_within_the_linger_and_only_then_confirmed(
    fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "WRITE_LINGER", 0.4)
    monkeypatch.setattr(tracker_module, "CONFIRM_LINGER", 0.0)
    history = one_step_history("t-1")
    sent = time.monotonic()
    send_events(producer, history[:2], first=1)  # INIT, SEND: the task is live
    turn_until(tracker, lambda: "t-1" in tracker.live)
    send_events(producer, history[2:4], first=3)  # ACK, START, in a later cycle
    turn_until(tracker, lambda: tracker.live["t-1"].tseq == 4)
    turn_for(tracker, 0.1)
    assert tracker.store.task("t-1") is None  # applied, not written yet
    assert _confirmed(producer) == []  # and so not confirmed either
    turn_until(tracker, lambda: tracker.store.task("t-1") is not None)
    assert time.monotonic() - sent >= 0.4
    stored = tracker.store.task("t-1")
    assert stored is not None
    assert (stored.state, stored.events) == ("START", 4)
    assert [e.event for e in tracker.store.events("t-1")] == ["INIT", "SEND", "ACK", "START"]
    assert turn_until(tracker, lambda: _confirmed(producer)) == [2, 4]  # both, after the write


def test_an_awaited_end_is_written_at_once_and_published_after(
    fed: Fed, zctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "WRITE_LINGER", 60.0)
    waiter = _socket(zctx, tracker, zmq.SUB, "pub")
    waiter.setsockopt(zmq.SUBSCRIBE, END_TOPIC + b"t-1")
    try:
        turn_until(tracker, lambda: "t-1" in tracker.awaited)
        send_events(producer, one_step_history("t-2"), first=1)  # nobody waits for it
        send_events(producer, one_step_history("t-1", result=41), first=7)
        end = msgpack.unpackb(next_message(tracker, waiter)[2], raw=False)
        stored = tracker.store.task("t-1")
        assert stored is not None
        assert stored.state == "HAPPY_END"
        assert end["event"] == "HAPPY_END"
        assert end["over"] is True
        assert tracker.store.task("t-2") is not None  # written in the same transaction
    finally:
        waiter.close(linger=0)


def test_a_query_is_answered_on_what_was_written_first(
    fed: Fed, zctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "WRITE_LINGER", 60.0)
    asker = _socket(zctx, tracker, zmq.DEALER, "query")
    try:
        send_events(producer, one_step_history("t-1")[:4], first=1)
        turn_until(tracker, lambda: "t-1" in tracker.live)
        turn_for(tracker, 0.1)
        assert tracker.store.task("t-1") is None
        asker.send_multipart(control("query", {"ref": 1, "op": "state", "task_id": "t-1"}))
        answer = decode_control(next_message(tracker, asker), frozenset({"reply"})).body
        assert answer["ok"] is True
        assert answer["result"]["task"]["state"] == "START"
        assert len(answer["result"]["events"]) == 4
    finally:
        asker.close(linger=0)


def test_a_cycle_under_load_is_written_at_once(fed: Fed, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "WRITE_LINGER", 60.0)
    monkeypatch.setattr(tracker_module, "CONFIRM_LINGER", 60.0)
    tasks = CONFIRM_AT_ONCE // 6 + 1
    records = [r for n in range(tasks) for r in one_step_history(f"t-{n}")]
    send_events(producer, records, first=1)
    assert turn_until(tracker, lambda: _confirmed(producer), timeout=10) == [len(records)]
    assert all(tracker.store.task(f"t-{n}") is not None for n in range(tasks))


def test_a_stopping_tracker_writes_what_it_held(fed: Fed, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "WRITE_LINGER", 60.0)
    send_events(producer, one_step_history("t-1"), first=1)
    turn_until(tracker, lambda: "t-1" in tracker.ended)
    assert tracker.store.task("t-1") is None
    tracker.stop()
    tracker.run()  # a quiet cycle, and it returns
    assert producer.poll(5000), "the held confirmation was not sent"
    assert _confirmed(producer) == [6]
    store = open_store(tracker.topology.store_url("local"), readonly=True)  # run() closed its own
    try:
        stored = store.task("t-1")
        assert stored is not None
        assert stored.state == "HAPPY_END"
    finally:
        store.close()
