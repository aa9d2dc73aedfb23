"""What a State says, derived from the tracker's reply: branches, order, errors, results.

Replies are crafted as the tracker sends them (``Tracker._state``): the task's row, its
events in tseq order, its results; events are those a satellite emits (see test_fsm).
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest

import dsat
from dsat.client import Client, submit_chunks
from dsat.state import State, state_from_reply

TASK = "01a2b3c4d5e6f7a8b9c0d1"
FAST, SLOW = 4_000_000_000_000_000_001, 5_000_000_000_000_000_002


def event(
    tseq: int,
    name: str,
    step: str,
    branch: int = 1,
    seq: int = 1,
    attempt: int = 1,
    at: float = 0.0,
    flag: str = "",
    **detail: Any,
) -> dict[str, Any]:
    return {
        "task_id": TASK,
        "tseq": tseq,
        "event": name,
        "step": step,
        "branch": branch,
        "seq": seq,
        "attempt": attempt,
        "where": "local",
        "wid": step,
        "pid": 1,
        "at": at or 1000.0 + tseq,
        "detail": detail,
        "flag": flag,
    }


def reply(
    events: list[dict[str, Any]],
    *,
    state: str = "HAPPY_END",
    step: str = "",
    error: str = "",
    ended: float | None = 2000.0,
    results: list[tuple[int, str, Any]] = (),  # type: ignore[assignment]
) -> State:
    task = {
        "task_id": TASK,
        "job_id": TASK,
        "state": state,
        "step": step,
        "attempt": 1,
        "error": error,
        "created": 1000.0,
        "updated": 1001.0,
        "ended": ended,
        "events": len(events),
        "anomalies": 0,
        "duplicates": 0,
        "unknown": False,
    }
    stored = [
        {
            "task_id": TASK,
            "branch": b,
            "step": s,
            "serialization": "msgpack",
            "data": msgpack.packb(v),
        }
        for b, s, v in results
    ]
    return state_from_reply({"task": task, "events": events, "results": stored}, allow_pickle=False)


def hop(first: int, step: str, branch: int, seq: int, at: float = 0.0) -> list[dict[str, Any]]:
    """ACK, START, END of a hop, numbered from ``first``."""
    return [
        event(first + i, name, step, branch, seq, at=at + i * 0.001 if at else 0.0)
        for i, name in enumerate(("ACK", "START", "END"))
    ]


def fan_out(*, slow_end: str = "HAPPY_END", slow_error: str = "") -> list[dict[str, Any]]:
    """split forks into fast and slow, in the order a tracker may get them."""
    kids = [FAST, SLOW]
    split_end = event(5, "END", "split", 1, 1, at=1.003, children=kids)
    fast = [
        event(6, "SEND", "split", FAST, 2, at=1.004, parent=1, children=kids),
        *hop(8, "fast", FAST, 2, at=1.005),
        event(11, "HAPPY_END", "fast", FAST, 2, at=1.009),
    ]
    slow = [
        event(7, "SEND", "split", SLOW, 2, at=1.004, parent=1, children=kids),
        event(12, "ACK", "slow", SLOW, 2, at=1.0055),
        event(13, "START", "slow", SLOW, 2, at=1.0065),
    ]
    if slow_end == "FAILURE":
        slow += [
            event(14, "ERROR", "slow", SLOW, 2, at=3.0, error=slow_error, traceback="tb slow"),
            event(15, "FAILURE", "slow", SLOW, 2, at=3.001, error=slow_error),
        ]
    elif slow_end:
        slow += [
            event(14, "END", "slow", SLOW, 2, at=3.0, children=[]),
            event(15, "HAPPY_END", "slow", SLOW, 2, at=3.001),
        ]
    root = [
        event(1, "INIT", "", 1, 0, at=1.0),
        event(2, "SEND", "", 1, 1, at=1.0005),
        *hop(3, "split", 1, 1, at=1.001)[:2],
        split_end,
    ]
    # the tracker got them out of order: the slow queue's first, the root's late
    arrived = [*slow, *fast, *root]
    return sorted(arrived, key=lambda e: e["tseq"])


# ---------------------------------------------------------------------------
# over, branches


def test_a_task_is_over_only_when_the_store_says_every_branch_ended() -> None:
    running = reply(fan_out(slow_end=""), state="START", step="slow", ended=None)
    assert not running.over
    branches = {b.step: b for b in running.branches}
    assert (branches["fast"].state, branches["fast"].over) == ("HAPPY_END", True)
    assert (branches["slow"].state, branches["slow"].over) == ("START", False)
    assert {b.branch for b in running.branches} == {FAST, SLOW}
    assert {b.parent for b in running.branches} == {1}  # the root forked: not a branch shown
    assert reply(fan_out()).over


def test_a_branch_forked_but_with_no_event_yet_is_shown() -> None:
    events = [e for e in fan_out(slow_end="") if e["branch"] != SLOW]
    state = reply(events, state="HAPPY_END", ended=None)
    (waiting,) = [b for b in state.branches if b.branch == SLOW]
    assert (waiting.state, waiting.step, waiting.over) == ("", "", False)


def test_a_task_that_did_not_fan_out_has_one_branch() -> None:
    events = [
        event(1, "INIT", "", 1, 0),
        event(2, "SEND", "", 1, 1),
        *hop(3, "work", 1, 1),
        event(6, "HAPPY_END", "work", 1, 1),
    ]
    state = reply(events, step="work", results=[(1, "work", {"n": 2})])
    assert [(b.branch, b.parent, b.state, b.step) for b in state.branches] == [
        (1, 0, "HAPPY_END", "work")
    ]
    assert state.result == {"n": 2}


# ---------------------------------------------------------------------------
# the order things happened


def test_the_history_is_each_branch_in_order_the_fork_first_branches_by_time() -> None:
    state = reply(fan_out())
    assert [e["tseq"] for e in fan_out()] == [e.tseq for e in state.arrivals]
    assert [(e.tseq, e.event, e.step) for e in state.history] == [
        (1, "INIT", ""),
        (2, "SEND", ""),
        (3, "ACK", "split"),
        (4, "START", "split"),
        (5, "END", "split"),
        (6, "SEND", "split"),
        (7, "SEND", "split"),
        (8, "ACK", "fast"),
        (12, "ACK", "slow"),
        (9, "START", "fast"),
        (13, "START", "slow"),
        (10, "END", "fast"),
        (11, "HAPPY_END", "fast"),
        (14, "END", "slow"),
        (15, "HAPPY_END", "slow"),
    ]
    assert state.timeline() == list(state.history)


def test_a_branch_keeps_its_own_order_whatever_its_clocks_say() -> None:
    events = [
        event(1, "INIT", "", 1, 0, at=5.0),
        event(2, "SEND", "", 1, 1, at=5.0),
        event(3, "ACK", "work", 1, 1, at=4.0),  # a clock behind the orchester's
        event(4, "START", "work", 1, 1, at=4.1),
    ]
    state = reply(events, state="START", ended=None)
    assert [e.event for e in state.history] == ["INIT", "SEND", "ACK", "START"]


# ---------------------------------------------------------------------------
# errors and tracebacks


def test_a_failure_names_the_branch_step_and_error_that_failed_it() -> None:
    error = "ValueError: slow failed"
    events = fan_out(slow_end="FAILURE", slow_error=error)
    state = reply(events, state="FAILURE", step="slow", error=error)
    failed = dsat.TaskFailedError(state)
    assert state.failed_branch is not None
    assert state.failed_branch.branch == SLOW
    assert (failed.step, failed.branch, failed.attempt, failed.error) == ("slow", SLOW, 1, error)
    assert str(failed) == (
        f"task {TASK} failed at step slow (branch {SLOW}) after 1 attempt(s): {error}"
    )
    # the FAILURE brought no traceback of its own: the try that failed last raised it
    assert state.traceback == failed.traceback == "tb slow"


def test_the_traceback_is_that_of_the_current_error() -> None:
    events = [
        event(1, "INIT", "", 1, 0),
        event(2, "SEND", "", 1, 1),
        event(3, "ACK", "work", 1, 1),
        event(4, "START", "work", 1, 1),
        event(5, "ERROR", "work", 1, 1, error="E: one", traceback="tb one"),
        event(6, "START", "work", 1, 1, attempt=2),
        event(7, "TIMEOUT", "work", 1, 1, attempt=2, error="ran past", traceback="tb two"),
        event(8, "START", "work", 1, 1, attempt=3),
    ]
    state = reply(events, state="START", step="work", error="ran past", ended=None)
    assert state.traceback == "tb two"
    assert state.branches[0].error == "ran past"
    failed = [
        *events,
        event(9, "ERROR", "work", 1, 1, attempt=3, error="E: three", traceback="tb three"),
        event(10, "FAILURE", "work", 1, 1, attempt=3, error="E: three", traceback="tb fail"),
    ]
    assert reply(failed, state="FAILURE", step="work", error="E: three").traceback == "tb fail"
    assert reply(failed, state="FAILURE", step="work", error="").traceback is None


def test_a_retried_task_that_ended_well_has_no_error_nor_traceback() -> None:
    events = [
        event(1, "INIT", "", 1, 0),
        event(2, "SEND", "", 1, 1),
        event(3, "ACK", "work", 1, 1),
        event(4, "START", "work", 1, 1),
        event(5, "ERROR", "work", 1, 1, error="E", traceback="tb"),
        event(6, "FAILURE", "work", 1, 1, error="E"),
        event(7, "RETRY", "work", 1, 2, attempt=2),
    ]
    retried = reply(events, state="RETRY", step="work", ended=None)
    assert (retried.branches[0].error, retried.traceback) == ("", None)
    ended = [*events, *hop(8, "work", 1, 3), event(11, "HAPPY_END", "work", 1, 3)]
    state = reply(ended, step="work")
    assert [(b.state, b.error, b.traceback) for b in state.branches] == [("HAPPY_END", "", None)]
    assert state.traceback is None


def test_a_duplicate_changes_no_branch() -> None:
    events = [
        *fan_out(slow_end=""),
        event(16, "HAPPY_END", "slow", SLOW, 2, flag="conflict: HAPPY_END where START was"),
    ]
    state = reply(events, state="START", ended=None)
    assert {b.step: b.state for b in state.branches} == {"fast": "HAPPY_END", "slow": "START"}


# ---------------------------------------------------------------------------
# results: one shape per rule


def test_a_fan_out_gives_a_mapping_of_terminus_steps() -> None:
    state = reply(fan_out(), results=[(FAST, "fast", {"f": 1}), (SLOW, "slow", {"s": 2})])
    assert state.result == {"fast": {"f": 1}, "slow": {"s": 2}}


def test_branches_that_end_at_one_step_give_a_list_there_in_branch_order() -> None:
    events = fan_out()
    for e in events:
        if e["step"] in ("fast", "slow"):
            e["step"] = "join"
    state = reply(events, results=[(SLOW, "join", "second"), (FAST, "join", "first")])
    assert state.result == {"join": ["first", "second"]}


@pytest.mark.parametrize(
    "detail",
    [
        {"reason": "result of 5000 bytes not kept (limit 1000)"},
        {"reason": "result of 5000 bytes not kept (limit 1000)", "result_size": 5000},
        {"reason": "too big", "result_size": 5000, "result_limit": 1000},
    ],
    ids=["reason", "reason-and-size", "size-and-limit"],
)
def test_a_result_not_kept_raises_naming_the_task_step_size_and_limit(
    detail: dict[str, Any],
) -> None:
    events = [
        event(1, "INIT", "", 1, 0),
        event(2, "SEND", "", 1, 1),
        *hop(3, "big", 1, 1),
        event(6, "HAPPY_END", "big", 1, 1, serialization="msgpack", **detail),
    ]
    state = reply(events, step="big")
    with pytest.raises(dsat.ResultNotKeptError) as caught:
        _ = state.result
    error = caught.value
    assert (error.task_id, error.step, error.branch, error.size, error.limit) == (
        TASK,
        "big",
        1,
        5000,
        1000,
    )
    assert str(error).startswith(f"task {TASK}: the result of step big (branch 1) was not kept")
    assert "5000 bytes" in str(error)
    assert "1000 bytes" in str(error)


# ---------------------------------------------------------------------------
# submitting past the limits


def test_chunks_hold_at_most_so_many_payloads_and_bytes() -> None:
    payloads = [b"x" * 10] * 7
    assert [len(c) for c in submit_chunks(payloads, 3, 1000)] == [3, 3, 1]
    assert [len(c) for c in submit_chunks(payloads, 100, 25)] == [2, 2, 2, 1]
    assert [len(c) for c in submit_chunks([b"x" * 50, b"y"], 100, 25)] == [1, 1]
    assert list(submit_chunks([], 3, 10)) == []
    assert [p for c in submit_chunks(payloads, 2, 25) for p in c] == payloads


def test_a_payload_over_the_default_limit_is_refused_before_anything_is_sent() -> None:
    # no satellite at these addresses: a refusal must not wait for one
    with Client(
        orchester="ipc:///tmp/dsat-nowhere-o",
        tracker_query="ipc:///tmp/dsat-nowhere-q",
        tracker_pub="ipc:///tmp/dsat-nowhere-p",
        timeout=5.0,
    ) as client:
        started = time.monotonic()
        with pytest.raises(dsat.PayloadTooLargeError) as caught:
            client.submit("work", b"x" * (20 * 1024 * 1024), serialization="raw")
        assert time.monotonic() - started < 1.0
    error = caught.value
    assert (error.step, error.index, error.size) == ("work", 0, 20 * 1024 * 1024)
    assert error.limit == 16 * 1024 * 1024 - 4096
    assert str(error).startswith(
        f"submit to work: payload #0 is {20 * 1024 * 1024} bytes encoded, over the limit of "
        f"{error.limit} bytes"
    )
