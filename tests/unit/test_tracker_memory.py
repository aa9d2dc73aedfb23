"""What the tracker keeps of a task: the names in it are the tracker's own strings,
shared by every task, never a copy from an event row (a string kept from a row
stays behind when the row is freed and pins the memory around it).

The tracker is built in this process on a real SQLite store and fed through a
real DEALER socket over ipc, as a router feeds it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from trackerkit import fed_tracker, one_step_history, send_events, turn_until

from dsat import tracker as tracker_module
from dsat.fsm import Event


def test_a_task_keeps_the_trackers_names_not_the_rows(
    tmp_path: Path, ipc_dir: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    with fed_tracker(tmp_path, ipc_dir, zctx) as (tracker, producer):
        # one task whose job is itself, and one in a job of its own name
        history = one_step_history("t-1") + [
            replace(record, task_id="t-2", job_id="nightly") for record in one_step_history("t-2")
        ]
        send_events(producer, history, first=1)
        turn_until(tracker, lambda: {"t-1", "t-2"} <= set(tracker.ended))
        for task_id in ("t-1", "t-2"):
            machine = tracker.ended[task_id]
            assert machine.step is tracker.names["s1"]
            assert machine.where is tracker.names["local"]
            assert machine.origin is tracker.names["local"]
            assert all(head.step is tracker.names["s1"] for head in machine.heads.values())
        one, two = tracker.ended["t-1"], tracker.ended["t-2"]
        assert one.job_id is one.task_id
        assert two.job_id == "nightly"


def test_a_late_event_of_a_task_no_longer_cached_is_judged_on_its_stored_history(
    tmp_path: Path,
    ipc_dir: Path,
    zctx: zmq.Context[zmq.Socket[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracker_module, "ENDED_CACHE", 1)
    with fed_tracker(tmp_path, ipc_dir, zctx) as (tracker, producer):
        first, second = one_step_history("t-1"), one_step_history("t-2")
        send_events(producer, first + second, first=1)
        turn_until(tracker, lambda: "t-2" in tracker.ended)
        assert "t-1" not in tracker.ended  # the cache keeps one: t-1 is only in the store
        again = first[4]  # t-1's END, delivered twice
        assert again.event is Event.END
        send_events(producer, [again], first=len(first + second) + 1)
        turn_until(tracker, lambda: getattr(tracker.store.task("t-1"), "duplicates", 0) == 1)
        task = tracker.store.task("t-1")
        assert task is not None
        assert (task.state, task.anomalies, task.events) == ("HAPPY_END", 0, 7)
        flags = [e.flag for e in tracker.store.events("t-1")]
        assert flags == [""] * 6 + ["duplicate"]
