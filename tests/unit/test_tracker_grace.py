"""A closed task missing events waits END_GRACE, but only while no producer is behind.

The tracker is built in this process on a real SQLite store and fed event
batches as the routers send them (``events`` control messages on its socket),
through a real DEALER socket over ipc.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from trackerkit import fed_tracker, one_step_history, send_events

from conftest import wait_for
from dsat import tracker as tracker_module
from dsat.fsm import Event
from dsat.message import EventRecord
from dsat.store import Batch
from dsat.tracker import Tracker


@pytest.fixture
def fed(
    tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[tuple[Tracker, zmq.Socket[bytes]]]:
    with fed_tracker(tmp_path, ipc_dir, zctx) as fed:
        yield fed


def _cycle(tracker: Tracker) -> None:
    """What the tracker's loop does with events: read, end what is overdue, write."""
    batch = Batch()
    for socket in tracker.events:
        while socket.poll(50):
            tracker.read_events(socket, batch)
    if tracker.closing:
        tracker.end_overdue(batch)
    if tracker.touched:
        batch.tasks = {t: tracker._row(m) for t, m in tracker.touched.items()}
        tracker.touched = {}
    tracker.store.write(batch)


def _closing_while_behind(
    tracker: Tracker,
    producer: zmq.Socket[bytes],
    task_id: str,
    records: list[EventRecord],
    behind: int,
) -> None:
    """Send a task's events from a producer that says ``behind`` more are coming; wait
    until the tracker holds the task as closing (its history incomplete)."""
    send_events(producer, records, first=1, behind=behind)
    wait_for(lambda: (_cycle(tracker), task_id in tracker.closing)[1], timeout=5)


def _short_grace(monkeypatch: pytest.MonkeyPatch, behind_for: float) -> None:
    monkeypatch.setattr(tracker_module, "END_GRACE", 0.3)
    monkeypatch.setattr(tracker_module, "BEHIND_FOR", behind_for)


def test_a_task_missing_events_waits_while_a_producer_is_behind(
    fed: tuple[Tracker, zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    _short_grace(monkeypatch, behind_for=3.0)
    task_id = "0" * 22
    events = one_step_history(task_id, with_s1_hop=False)
    _closing_while_behind(tracker, producer, task_id, events, behind=5000)  # more coming
    time.sleep(0.4)  # past the grace, but the producer is behind: no forced end
    _cycle(tracker)
    machine = tracker.live[task_id]
    assert not machine.over
    assert machine.anomalies == 0

    # the producer caught up (its next batch says nothing is left): the grace runs again
    send_events(producer, [], first=len(events) + 1, behind=0)
    _cycle(tracker)
    time.sleep(0.1)
    _cycle(tracker)
    assert not tracker.live[task_id].over  # the grace restarted: not over yet
    wait_for(lambda: (_cycle(tracker), task_id not in tracker.live)[1], timeout=5)
    row = tracker.store.task(task_id)
    assert row is not None
    assert row.ended is not None
    assert row.anomalies > 0


def test_the_missing_events_arriving_late_end_the_task_without_anomaly(
    fed: tuple[Tracker, zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    _short_grace(monkeypatch, behind_for=5.0)
    task_id = "1" * 22
    whole = one_step_history(task_id, with_s1_hop=True)
    hop = [e for e in whole if e.event in (Event.ACK, Event.START)]
    rest = [e for e in whole if e not in hop]
    _closing_while_behind(tracker, producer, task_id, rest, behind=2)
    time.sleep(0.5)  # longer than the grace: only the producer's backlog holds it
    _cycle(tracker)
    send_events(producer, hop, first=len(rest) + 1, behind=0)
    wait_for(lambda: (_cycle(tracker), task_id not in tracker.live)[1], timeout=5)
    row = tracker.store.task(task_id)
    assert row is not None
    assert row.state == "HAPPY_END"
    assert row.anomalies == 0
