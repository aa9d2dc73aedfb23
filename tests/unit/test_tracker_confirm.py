"""When the tracker confirms: a light cycle's confirmations wait CONFIRM_LINGER and
leave together; a cycle under load (CONFIRM_AT_ONCE events or more) confirms at
once; a stopping tracker sends what it held.

The tracker is built in this process on a real SQLite store and turns its cycle
while the test waits; a real DEALER feeds it event batches as a router does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from trackerkit import (
    confirmations,
    fed_tracker,
    one_step_history,
    send_events,
    turn_for,
    turn_until,
)

from dsat import tracker as tracker_module
from dsat.tracker import CONFIRM_AT_ONCE, Tracker

Fed = tuple[Tracker, zmq.Socket[bytes]]


@pytest.fixture
def fed(tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Fed]:
    with fed_tracker(tmp_path, ipc_dir, zctx) as fed:
        yield fed


def test_light_batches_are_confirmed_together_after_the_linger(
    fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "CONFIRM_LINGER", 0.5)
    send_events(producer, one_step_history("t-1"), first=1)
    turn_until(tracker, lambda: tracker.store.task("t-1") is not None)
    applied = time.monotonic()
    send_events(producer, one_step_history("t-2"), first=7)
    turn_until(tracker, lambda: tracker.store.task("t-2") is not None)
    turn_for(tracker, 0.25)
    assert confirmations(producer) == []  # written, but held: the linger has not passed
    confirms = turn_until(tracker, lambda: confirmations(producer))
    assert time.monotonic() - applied >= 0.5
    assert [c["upto"] for c in confirms] == [6, 12]  # both, together


def test_a_cycle_under_load_confirms_at_once(fed: Fed, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "CONFIRM_LINGER", 60.0)
    records = [r for n in range(CONFIRM_AT_ONCE // 6 + 1) for r in one_step_history(f"t-{n}")]
    assert len(records) >= CONFIRM_AT_ONCE
    send_events(producer, records, first=1)
    confirms = turn_until(tracker, lambda: confirmations(producer), timeout=10)
    assert [c["upto"] for c in confirms] == [len(records)]


def test_a_stopping_tracker_sends_what_it_held(fed: Fed, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, producer = fed
    monkeypatch.setattr(tracker_module, "CONFIRM_LINGER", 60.0)
    send_events(producer, one_step_history("t-1"), first=1)
    turn_until(tracker, lambda: tracker.store.task("t-1") is not None)
    assert tracker.held
    tracker.stop()
    tracker.run()  # a quiet cycle, and it returns
    assert producer.poll(5000), "the held confirmation was not sent"
    assert [c["upto"] for c in confirmations(producer)] == [6]
