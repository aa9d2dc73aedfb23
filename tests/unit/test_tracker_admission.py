"""How many tasks the tracker tells the entry it follows (the entry's admission control).

The tracker is built in this process on a real SQLite store and fed through a
real DEALER socket over ipc, as a router feeds it; its confirmations carry the
count (``live``).
"""

from __future__ import annotations

import time
from pathlib import Path

import zmq
from trackerkit import tracker_and_producer

from dsat.fsm import Event
from dsat.message import EventRecord, control, decode_control, pack_records
from dsat.store import Batch, TaskRow
from dsat.tracker import Tracker


def _left_live(task_id: str) -> TaskRow:
    """A task a former run left live in the store (its journals are gone: nothing comes)."""
    now = time.time()
    return TaskRow(task_id, "old", "local", "ACK", "s1", 1, "", now, now, None, 3, 0, 0, 0.0)


def _init(task_id: str) -> list[EventRecord]:
    now = time.time()
    return [
        EventRecord(
            task_id, task_id, 1, 0, 1, Event.INIT, "", "local", "local", "o", 1, now,
            {"next": ["s1"]},
        ),
    ]  # fmt: skip


def _confirmed_live(
    tracker: Tracker, producer: zmq.Socket[bytes], records: list[EventRecord], first: int
) -> int:
    """Send a batch, let the tracker apply it, return the live count its confirm carries."""
    meta = {"producer": "local/orchester", "epoch": 1, "first": first}
    producer.send_multipart(control("events", meta, pack_records(records)))
    for socket in tracker.events:
        assert socket.poll(5000), "the batch did not reach the tracker"
        batch = Batch()
        replies, _ = tracker.read_events(socket, batch)
        tracker.store.write(batch)
        for frames in replies:
            socket.send_multipart(frames)
    assert producer.poll(5000), "no confirmation"
    reply = decode_control(producer.recv_multipart(), frozenset({"confirm"}))
    live: int = reply.body["live"]
    return live


def test_tasks_left_live_in_the_store_count_only_once_something_reports_on_them(
    tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    old = [f"{n:022d}" for n in range(5)]
    tracker, producer = tracker_and_producer(
        tmp_path, ipc_dir, zctx, stored=[_left_live(task_id) for task_id in old]
    )
    try:
        assert sorted(tracker.live) == old  # rebuilt: queries still see them
        assert tracker.live_count() == 0  # but they do not hold the entry's door
        # a new task counts at once; an old one as soon as an event shows it moves
        assert _confirmed_live(tracker, producer, _init("n" * 22), first=1) == 1
        resumed = EventRecord(
            old[0], old[0], 1, 1, 1, Event.START, "s1", "local", "local", "w", 1, time.time(),
            {"deadline": time.time() + 30},
        )  # fmt: skip
        assert _confirmed_live(tracker, producer, [resumed], first=2) == 2
        assert tracker.live_count() == 2
        assert len(tracker.live) == 6
    finally:
        producer.close(linger=0)
        tracker.close()
