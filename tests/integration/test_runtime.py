"""A running satellite (`dsat run`) as users rely on it: fan-out, conditions, retries,
timeouts, the live view, restarts and signals. Real processes, sockets and SQLite."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import pytest

import dsat
from conftest import RunningSatellite, wait_for
from dsat.fsm import RANK, Event
from dsat.store import open_store

HEADER = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"
"""


def _life(events: Iterable[dsat.EventInfo]) -> list[dsat.EventInfo]:
    """Events in the order of the task's life: by message, try and rank in the try.

    The tracker numbers events (tseq) as they arrive, and they come from several
    processes (the orchester, a queue, a sink...), so tseq order is arrival order.
    """
    return sorted(events, key=lambda e: (e.seq, e.attempt, RANK[Event(e.event)], e.tseq))


def _events(state: dsat.State) -> list[tuple[str, str, int]]:
    """(event, step, attempt) of each event of a task's (one-branch) life, in order."""
    return [(e.event, e.step, e.attempt) for e in _life(state.history)]


def _names(state: dsat.State, *wanted: str) -> list[str]:
    return [e.event for e in _life(state.history) if e.event in wanted]


def _assert_clean(state: dsat.State) -> None:
    """No event of the task was flagged (duplicate, conflict, anomaly)."""
    flagged = [(e.tseq, e.event, e.flag) for e in state.history if e.flag]
    assert flagged == []
    assert (state.anomalies, state.duplicates) == (0, 0)


# ---------------------------------------------------------------------------
# 1. fan-out

FAN_OUT = (
    HEADER
    + """
[step.split]
call = "fan:split"
entry = true

[step.a]
kind = "sink"
call = "fan:to_a"

[step.b]
call = "fan:to_b"
workers = 2

[[link]]
from = "split"
to = "a"

[[link]]
from = "split"
to = "b"
"""
)

FAN = """
def split(p):
    return {"n": p["n"]}

def to_a(p):
    return {"a": p["n"] + 1}

def to_b(p):
    return {"b": p["n"] * 10}
"""


def test_fan_out_to_two_branches_ends_the_task_once(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(FAN_OUT, {"fan": FAN})
    with running.client() as client:
        followed = client.submit("split", {"n": 100})
        live = list(client.status_for(followed, timeout=30))
        task_ids = client.submit_many("split", [{"n": n} for n in range(20)], job_id="fan")
        results = [client.wait(task_id, timeout=30) for task_id in task_ids]
        states = [client.state(task_id) for task_id in task_ids]
        ended = client.tasks(job_id="fan", state="HAPPY_END")

    # live, one event ends the task: the last one, though two branches ended
    assert [e.over for e in live].count(True) == 1
    assert live[-1].over
    assert [e.event for e in live].count("HAPPY_END") == 2
    assert sorted(t.task_id for t in ended) == sorted(task_ids)

    assert results == [{"a": {"a": n + 1}, "b": {"b": n * 10}} for n in range(20)]
    for n, state in enumerate(states):
        assert state.state == "HAPPY_END"
        assert state.over
        assert state.ended is not None
        _assert_clean(state)
        ends = [e for e in state.history if e.event == "HAPPY_END"]
        assert sorted(e.step for e in ends) == ["a", "b"]
        assert len({e.branch for e in ends}) == 2  # one per branch
        assert 1 not in {e.branch for e in ends}  # both are children of the root branch
        assert dict(state.results) == {"a": {"a": n + 1}, "b": {"b": n * 10}}
        assert [e.tseq for e in sorted(state.history, key=lambda e: e.tseq)] == list(
            range(1, len(state.history) + 1)
        )
        # the split's END names the two branches it forked into
        (split_end,) = [e for e in state.history if e.event == "END" and e.step == "split"]
        assert sorted(split_end.detail.get("children", [])) == sorted(e.branch for e in ends)


# ---------------------------------------------------------------------------
# 2. a conditional link

CONDITIONAL = (
    HEADER
    + """
[step.first]
call = "rules:first"
entry = true

[step.even]
call = "rules:half"

[[link]]
from = "first"
to = "even"
when = "rules:is_even"
"""
)

RULES = """
def first(p):
    return {"n": p["n"], "seen": ["first"]}

def half(p):
    return {"n": p["n"] // 2, "seen": p["seen"] + ["even"]}

def is_even(value):
    return value["n"] % 2 == 0
"""


def test_a_conditional_link_routes_only_what_its_condition_accepts(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(CONDITIONAL, {"rules": RULES})
    with running.client() as client:
        task_ids = client.submit_many("first", [{"n": n} for n in range(10)])
        results = [client.wait(task_id, timeout=30) for task_id in task_ids]
        states = [client.state(task_id) for task_id in task_ids]

    assert results == [
        {"n": n // 2, "seen": ["first", "even"]} if n % 2 == 0 else {"n": n, "seen": ["first"]}
        for n in range(10)
    ]
    for n, state in enumerate(states):
        assert state.state == "HAPPY_END"
        _assert_clean(state)
        steps = {e.step for e in state.history}
        ends = [e.step for e in state.history if e.event == "HAPPY_END"]
        if n % 2 == 0:
            assert dict(state.results) == {"even": {"n": n // 2, "seen": ["first", "even"]}}
            assert "even" in steps
            assert ends == ["even"]
        else:
            assert dict(state.results) == {"first": {"n": n, "seen": ["first"]}}
            assert "even" not in steps
            assert ends == ["first"]
            assert _events(state)[-2:] == [("END", "first", 1), ("HAPPY_END", "first", 1)]


# ---------------------------------------------------------------------------
# 3. errors, retries, FAILURE, `dsat retry`

FLAKY = (
    HEADER
    + """
[step.flaky]
call = "flaky:work"
entry = true
retries = 2
backoff = "50ms"
"""
)

FLAKY_CODE = """
import os

MARKER = "broken.marker"  # relative: nodes run in the topology's directory

def work(p, task):
    if os.path.exists(MARKER):
        raise ValueError(f"marker present on attempt {task.attempt}")
    return {"n": p["n"], "attempt": task.attempt}
"""


def test_a_function_that_raises_is_retried_then_fails_then_dsat_retry_sends_it_again(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(FLAKY, {"flaky": FLAKY_CODE})
    marker = running.directory / "broken.marker"
    marker.write_text("")
    with running.client() as client:
        task_id = client.submit("flaky", {"n": 7})
        with pytest.raises(dsat.TaskFailedError) as failed:
            client.wait(task_id, timeout=30)
        assert failed.value.state.state == "FAILURE"
        assert "ValueError: marker present on attempt 3" in str(failed.value)

        state = client.state(task_id)
        assert state.state == "FAILURE"
        assert state.step == "flaky"
        assert state.attempt == 3
        assert "ValueError" in state.error
        assert "marker present on attempt 3" in state.error
        _assert_clean(state)
        assert _names(state, "START", "ERROR", "FAILURE", "HAPPY_END") == [
            "START",
            "ERROR",
            "START",
            "ERROR",
            "START",
            "ERROR",
            "FAILURE",
        ]
        errors = [e for e in state.history if e.event == "ERROR"]
        assert [e.attempt for e in errors] == [1, 2, 3]
        assert [e.detail.get("error") for e in errors] == [
            f"ValueError: marker present on attempt {attempt}" for attempt in (1, 2, 3)
        ]
        assert _events(state)[-1] == ("FAILURE", "flaky", 3)
        assert state.results == {}

        marker.unlink()
        retry = subprocess.run(
            [sys.executable, "-m", "dsat", "retry", task_id, "-t", str(running.topology)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retry.returncode == 0, retry.stderr
        assert retry.stdout.splitlines() == [f"{task_id}: sent again", "1 task sent again"]

        # the RETRY reaches the tracker asynchronously: until then the task is still FAILED
        wait_for(lambda: _names(client.state(task_id), "RETRY") == ["RETRY"], timeout=10)
        result = client.wait(task_id, timeout=30)
        assert result["n"] == 7
        after = client.state(task_id)

    assert after.state == "HAPPY_END"
    assert after.results == {"flaky": result}
    _assert_clean(after)
    names = _names(after, "START", "ERROR", "FAILURE", "RETRY", "END", "HAPPY_END")
    assert names == [
        *["START", "ERROR"] * 3,
        "FAILURE",
        "RETRY",
        "START",
        "END",
        "HAPPY_END",
    ]
    # the dead letter is sent again as a new message from the orchester to the step
    (retry_event,) = [e for e in after.history if e.event == "RETRY"]
    assert retry_event.attempt == 4  # the try after the three that failed
    assert retry_event.detail.get("next") == ["flaky"]
    since_retry = _life(e for e in after.history if e.seq > retry_event.seq)
    assert [(e.event, e.step) for e in since_retry] == [
        ("SEND", ""),
        ("ACK", "flaky"),
        ("START", "flaky"),
        ("END", "flaky"),
        ("HAPPY_END", "flaky"),
    ]
    assert {e.seq for e in since_retry} == {retry_event.seq + 1}
    (start,) = [e for e in since_retry if e.event == "START"]
    assert result == {"n": 7, "attempt": start.attempt}
    assert _events(after)[-1] == ("HAPPY_END", "flaky", start.attempt)


def test_every_retried_dead_letter_ends_happily_with_its_result_and_no_anomaly(
    satellite: Callable[..., RunningSatellite],
) -> None:
    # The events of a retried task come from the orchester (RETRY, SEND) and from the
    # step's queue (ACK, START, END, HAPPY_END): the tracker may get the latter first.
    running = satellite(FLAKY, {"flaky": FLAKY_CODE})
    marker = running.directory / "broken.marker"
    marker.write_text("")
    with running.client() as client:
        task_ids = client.submit_many("flaky", [{"n": n} for n in range(50)])
        for task_id in task_ids:
            with pytest.raises(dsat.TaskFailedError):
                client.wait(task_id, timeout=30)
        marker.unlink()
        for task_id in task_ids:
            assert client.retry(task_id) == task_id
        for task_id in task_ids:
            wait_for(lambda t=task_id: _names(client.state(t), "RETRY") == ["RETRY"], timeout=10)
            client.wait(task_id, timeout=30)
        states = [client.state(task_id) for task_id in task_ids]

    summary = [
        (
            s.state,
            s.anomalies,
            [e.event for e in s.history if e.flag],
            sorted(s.results),
            s.results.get("flaky", {}).get("n"),
        )
        for s in states
    ]
    assert summary == [("HAPPY_END", 0, [], ["flaky"], n) for n in range(50)]


# ---------------------------------------------------------------------------
# 4. timeouts: SIGALRM, and the router's SIGKILL when SIGALRM cannot help

SLOW = (
    HEADER
    + """
[step.slow]
call = "slow:work"
entry = true
timeout = "300ms"
retries = 2
backoff = "50ms"
"""
)

SLOW_CODE = """
import time

def work(p, task):
    if task.attempt == 1:
        time.sleep(5)
    return {"n": p["n"], "attempt": task.attempt}
"""


def test_a_function_that_sleeps_past_its_timeout_gets_timeout_then_the_next_try_succeeds(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(SLOW, {"slow": SLOW_CODE})
    worker_pids = running.pids_of("slow")
    assert len(worker_pids) == 1
    with running.client() as client:
        started = time.monotonic()
        task_id = client.submit("slow", {"n": 3})
        result = client.wait(task_id, timeout=30)
        elapsed = time.monotonic() - started
        state = client.state(task_id)

    assert result == {"n": 3, "attempt": 2}
    assert elapsed < 4.0  # SIGALRM cut the 5 s sleep short
    assert state.state == "HAPPY_END"
    _assert_clean(state)
    assert _names(state, "START", "TIMEOUT", "ERROR", "END", "HAPPY_END") == [
        "START",
        "TIMEOUT",
        "START",
        "END",
        "HAPPY_END",
    ]
    (timeout,) = [e for e in state.history if e.event == "TIMEOUT"]
    assert timeout.attempt == 1
    assert "timeout of 0.3s" in timeout.detail.get("error", "")
    starts = [e for e in state.history if e.event == "START"]
    assert [e.attempt for e in starts] == [1, 2]
    # SIGALRM was enough: the same worker ran both tries, nobody was killed
    assert {e.pid for e in starts} == set(worker_pids)
    assert running.pids_of("slow") == worker_pids


SLOW_SINK = (
    HEADER
    + """
[step.slow]
kind = "sink"
call = "slow:work"
entry = true

[step.after]
call = "slow:after"

[[link]]
from = "slow"
to = "after"
"""
)

SLOW_SINK_CODE = """
import time

def work(p):
    time.sleep(0.06)
    return p

def after(p):
    return {"n": p["n"]}
"""


def test_a_sink_of_a_slow_function_hands_on_each_task_as_it_ends(
    satellite: Callable[..., RunningSatellite],
) -> None:
    """A sink runs its queue in short turns (about 20 ms), not a fixed number of tasks:
    of 80 tasks of 60 ms that arrive together, each goes on to the next step as it
    ends, not when the tasks that came with it have run too."""
    running = satellite(SLOW_SINK, {"slow": SLOW_SINK_CODE})
    with running.client() as client:
        task_ids = client.submit_many("slow", [{"n": n} for n in range(80)])
        results = [client.wait(task_id, timeout=60) for task_id in task_ids]
        states = [client.state(task_id) for task_id in task_ids]

    assert results == [{"n": n} for n in range(80)]
    waits = []
    for state in states:
        assert state.state == "HAPPY_END"
        _assert_clean(state)
        (end,) = [e for e in state.history if e.step == "slow" and e.event == "END"]
        (ack,) = [e for e in state.history if e.step == "after" and e.event == "ACK"]
        waits.append(ack.at - end.at)
    assert max(waits) < 0.5, f"a task waited {max(waits):.2f}s in the sink after it ended"


STUCK = (
    HEADER
    + """
[step.stuck]
call = "stuck:work"
entry = true
timeout = "300ms"
retries = 2
backoff = "50ms"
"""
)

STUCK_CODE = """
import signal
import time

def work(p, task):
    if task.attempt == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    return {"n": p["n"], "attempt": task.attempt}
"""


def test_a_function_deaf_to_sigalrm_is_killed_by_its_router_and_replaced(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(STUCK, {"stuck": STUCK_CODE})
    (old_pid,) = running.pids_of("stuck")
    with running.client() as client:
        started = time.monotonic()
        task_id = client.submit("stuck", {"n": 5})
        result = client.wait(task_id, timeout=30)
        elapsed = time.monotonic() - started
        state = client.state(task_id)

    assert result == {"n": 5, "attempt": 2}
    assert elapsed < 10.0  # killed at timeout + ~1 s, not after the 30 s sleep
    assert state.state == "HAPPY_END"
    _assert_clean(state)
    assert _names(state, "START", "TIMEOUT", "ERROR", "END", "HAPPY_END") == [
        "START",
        "TIMEOUT",
        "START",
        "END",
        "HAPPY_END",
    ]
    (timeout,) = [e for e in state.history if e.event == "TIMEOUT"]
    assert timeout.attempt == 1
    assert timeout.pid == old_pid
    assert "worker killed" in timeout.detail.get("error", "")
    assert timeout.detail.get("elapsed", 0) >= 1.3  # timeout 0.3 s + the 1 s grace

    # circus replaced the killed worker; the new one ran the second try
    new_pids = wait_for(lambda: running.pids_of("stuck"), timeout=10)
    assert old_pid not in new_pids
    assert not psutil.pid_exists(old_pid) or (
        psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    )
    (second,) = [e for e in state.history if e.event == "START" and e.attempt == 2]
    assert second.pid in new_pids
    assert "killing it" in running.log("stuck.queue")


# ---------------------------------------------------------------------------
# 5. status_for before, during and after the task's life

NAP = (
    HEADER
    + """
[step.nap]
call = "nap:work"
entry = true
timeout = "10s"

[step.done]
kind = "sink"
call = "nap:done"

[[link]]
from = "nap"
to = "done"
"""
)

NAP_CODE = """
import time

def work(p):
    time.sleep(p["sleep"])
    return p

def done(p):
    return {"done": p["n"]}
"""


def _comparable(event: dsat.EventInfo) -> dsat.EventInfo:
    """An event without what only live events carry (the task's state after it)."""
    return dataclasses.replace(event, state="", over=False)


def _has_started(client: dsat.Client, task_id: str) -> bool:
    try:
        state = client.state(task_id)
    except dsat.DsatError:  # its first events have not reached the tracker yet
        return False
    return "START" in _names(state, "START")


def _check_status_for(client: dsat.Client, task_id: str, events: list[dsat.EventInfo]) -> None:
    tseqs = [e.tseq for e in events]
    assert tseqs == list(range(1, len(events) + 1))
    last = _life(events)[-1]
    assert (last.event, last.step) == ("HAPPY_END", "done")
    assert all(e.task_id == task_id for e in events)
    state = client.state(task_id)
    assert state.state == "HAPPY_END"
    history = sorted(state.history, key=lambda e: e.tseq)
    assert [_comparable(e) for e in events] == [_comparable(e) for e in history]


def test_status_for_yields_every_event_once_in_order_before_during_and_after_the_task(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(NAP, {"nap": NAP_CODE})
    with running.client() as client:
        # before: iterate right after submitting
        before_id = client.submit("nap", {"n": 1, "sleep": 1.0})
        before = list(client.status_for(before_id, timeout=30))
        _check_status_for(client, before_id, before)
        assert before[-1].over  # the last one came live, flagged as ending the task
        assert [e.over for e in before].count(True) == 1

        # during: iterate once the task has started its 1 s sleep
        during_id = client.submit("nap", {"n": 2, "sleep": 1.0})
        wait_for(lambda: _has_started(client, during_id), timeout=10)
        during = list(client.status_for(during_id, timeout=30))
        _check_status_for(client, during_id, during)
        assert during[-1].over
        assert [e.over for e in during].count(True) == 1

        # after: iterate once the task is over (all from the store)
        after_id = client.submit("nap", {"n": 3, "sleep": 0.0})
        assert client.wait(after_id, timeout=30) == {"done": 3}
        after = list(client.status_for(after_id, timeout=30))
        _check_status_for(client, after_id, after)

    # the three tasks took the same path: the same events (the tracker numbers them in the
    # order they arrive from several processes, so compare them in the order of the task's life)
    def story(events: list[dsat.EventInfo]) -> list[tuple[int, int, str, str]]:
        return sorted((e.seq, e.attempt, e.event, e.step) for e in events)

    assert story(during) == story(before)
    assert story(after) == story(before)
    assert sorted(e.event for e in before) == sorted(
        ["INIT", *["SEND", "ACK", "START", "END"] * 2, "HAPPY_END"]
    )


def test_wait_takes_the_result_from_the_live_end_without_asking_again(
    satellite: Callable[..., RunningSatellite], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that ends while a client waits: its last live event brings the results."""
    running = satellite(NAP, {"nap": NAP_CODE})
    with running.client() as client:
        task_id = client.submit("nap", {"n": 5, "sleep": 0.5})

        def no_state(task_id: str) -> dsat.State:
            raise AssertionError("wait asked for the state")

        monkeypatch.setattr(client, "state", no_state)
        assert client.wait(task_id, timeout=30) == {"done": 5}
        monkeypatch.undo()
        assert client.state(task_id).result == {"done": 5}


def test_wait_on_a_task_that_already_ended_asks_the_tracker_once(
    satellite: Callable[..., RunningSatellite], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply that shows the end holds the results too: no second query for them."""
    running = satellite(NAP, {"nap": NAP_CODE})
    with running.client() as client:
        task_id = client.submit("nap", {"n": 7, "sleep": 0.0})
        assert client.wait(task_id, timeout=30) == {"done": 7}
        asked: list[str] = []
        query_op = client._query_op

        def counted(op: str, **args: Any) -> Any:
            asked.append(op)
            return query_op(op, **args)

        monkeypatch.setattr(client, "_query_op", counted)
        assert client.wait(task_id, timeout=30) == {"done": 7}
        assert asked == ["state"]


def test_following_a_task_the_tracker_never_heard_of_fails_after_a_moment(
    satellite: Callable[..., RunningSatellite],
) -> None:
    """An unknown id is an error (after the moment a task just submitted may take)."""
    running = satellite(NAP, {"nap": NAP_CODE})
    with running.client() as client:
        started = time.monotonic()
        with pytest.raises(dsat.DsatError, match="no task 0123456789abcdef on satellite"):
            client.wait("0123456789abcdef", timeout=30)
        with pytest.raises(dsat.DsatError, match="no task 0123456789abcdef on satellite"):
            list(client.status_for("0123456789abcdef", timeout=30))
        waited = time.monotonic() - started
        # and a real task, followed at once, is known and ends
        task_id = client.submit("nap", {"n": 6, "sleep": 0.0})
        assert client.wait(task_id, timeout=30) == {"done": 6}
    assert 2 * dsat.client.KNOWN_WITHIN <= waited < 2 * dsat.client.KNOWN_WITHIN + 10


def test_a_state_query_can_ask_only_for_the_events_a_follower_lacks(
    satellite: Callable[..., RunningSatellite],
) -> None:
    """status_for polls with ``after``: the task row and results, and only newer events."""
    running = satellite(NAP, {"nap": NAP_CODE})
    with running.client() as client:
        task_id = client.submit("nap", {"n": 4, "sleep": 0.0})
        assert client.wait(task_id, timeout=30) == {"done": 4}
        whole = client._query_op("state", task_id=task_id)
        count = len(whole["events"])
        assert [e["tseq"] for e in whole["events"]] == list(range(1, count + 1))
        tail = client._query_op("state", task_id=task_id, after=count - 2)
        assert [e["tseq"] for e in tail["events"]] == [count - 1, count]
        assert tail["task"] == {**whole["task"], "unknown": tail["task"]["unknown"]}
        assert tail["results"] == whole["results"]
        assert client._query_op("state", task_id=task_id, after=count)["events"] == []
        with pytest.raises(dsat.DsatError, match="after must be an integer"):
            client._query_op("state", task_id=task_id, after=-1)


# ---------------------------------------------------------------------------
# 6. states survive a restart

RESTART = (
    HEADER
    + """
[step.split]
call = "restart:split"
entry = true
retries = 0

[step.a]
kind = "sink"
call = "restart:to_a"

[step.b]
call = "restart:to_b"

[[link]]
from = "split"
to = "a"

[[link]]
from = "split"
to = "b"
"""
)

RESTART_CODE = """
def split(p):
    if p.get("fail"):
        raise RuntimeError("asked to fail")
    return p

def to_a(p):
    return {"a": p["n"]}

def to_b(p):
    return {"b": p["n"]}
"""


def test_states_of_finished_tasks_are_unchanged_after_a_restart(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(RESTART, {"restart": RESTART_CODE})
    with running.client() as client:
        happy = client.submit_many("split", [{"n": n} for n in range(5)], job_id="before")
        failed = client.submit("split", {"n": 99, "fail": True}, job_id="before")
        for task_id in happy:
            client.wait(task_id, timeout=30)
        with pytest.raises(dsat.TaskFailedError):
            client.wait(failed, timeout=30)
        task_ids = [*happy, failed]
        before = {task_id: client.state(task_id) for task_id in task_ids}
        listed = {t.task_id: t for t in client.tasks(job_id="before")}
    assert running.stop() == 0
    assert running.survivors() == []

    again = RunningSatellite(running.directory, running.topology)
    try:
        again.start()
        with again.client() as client:
            after = {task_id: client.state(task_id) for task_id in task_ids}
            listed_after = {t.task_id: t for t in client.tasks(job_id="before")}
        assert again.stop() == 0
    finally:
        if again.process is not None and again.process.poll() is None:
            with contextlib.suppress(AssertionError):
                again.stop()
        again.kill_all()

    assert [before[t].state for t in task_ids] == ["HAPPY_END"] * 5 + ["FAILURE"]
    assert len(listed) == 6
    for task_id in task_ids:
        old, new = before[task_id], after[task_id]
        for field in dataclasses.fields(dsat.State):
            assert getattr(new, field.name) == getattr(old, field.name), (task_id, field.name)
        assert new == old
    assert listed_after == listed
    assert again.survivors() == []


# ---------------------------------------------------------------------------
# 7. signals: nothing is left behind

SIMPLE = (
    HEADER
    + """
[step.work]
call = "simple:work"
entry = true
workers = 3

[step.out]
kind = "sink"
call = "simple:out"

[[link]]
from = "work"
to = "out"
"""
)

SIMPLE_CODE = """
def work(p):
    return p

def out(p):
    return p
"""


def _warm(running: RunningSatellite) -> None:
    """Run a few tasks through, so every process has done something, and check the tree."""
    with running.client() as client:
        task_ids = client.submit_many("work", [{"n": n} for n in range(10)])
        assert [client.wait(t, timeout=30) for t in task_ids] == [{"n": n} for n in range(10)]
    assert len(running.pids_of("work")) == 3
    assert len(running.pids_of("out")) == 1
    # the arbiter, tracker, orchester, the pool's queue, 3 workers, the sink
    assert len(running.tree()) >= 8


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dsat_run_stopped_by_a_signal_exits_0_and_leaves_no_process_behind(
    satellite: Callable[..., RunningSatellite], sig: int
) -> None:
    running = satellite(SIMPLE, {"simple": SIMPLE_CODE})
    _warm(running)

    assert running.stop(sig) == 0
    assert running.survivors() == []
    assert "dsat: stopped" in running.log()


def test_sigkill_to_dsat_run_leaves_no_orphan_behind(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(SIMPLE, {"simple": SIMPLE_CODE})
    _warm(running)
    workers = running.pids_of("work")

    assert running.stop(signal.SIGKILL) == -signal.SIGKILL
    assert running.known_pids >= set(workers)
    deadline = time.monotonic() + 30
    while running.survivors():
        if time.monotonic() > deadline:
            left = {}
            for pid in running.survivors():
                with contextlib.suppress(psutil.NoSuchProcess):
                    left[pid] = psutil.Process(pid).cmdline()
            raise AssertionError(f"still running 30 s after SIGKILL to dsat run: {left}")
        time.sleep(0.1)


def test_a_node_that_cannot_start_stops_dsat_run_with_why(
    satellite: Callable[..., RunningSatellite],
) -> None:
    # the tracker's store is of a newer layout than this dsat reads: restarting the
    # tracker cannot help, so dsat run must say so and stop, not look up meanwhile
    running = satellite(
        """
        [satellite.local]
        runtime_dir = "RUNTIME"

        [store]
        url = "sqlite:///future.db"

        [step.double]
        call = "fns:double"
        entry = true
        """,
        {"fns": "def double(n):\n    return n * 2\n"},
        start=False,
    )
    store = running.directory / "future.db"
    open_store(f"sqlite:///{store}").close()
    raw = sqlite3.connect(store)
    with raw:
        raw.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    raw.close()
    started = time.monotonic()
    process = running.launch()

    def exited() -> bool:
        running.known_pids |= set(running.tree())  # to check none is left behind
        return process.poll() is not None

    wait_for(exited, timeout=60)
    assert process.returncode == 1
    assert time.monotonic() - started < 30
    output = running.log()
    assert "tracker cannot start (3 tries)" in output
    assert "schema version 9" in output
    assert "tracker.log" in output
    assert running.survivors() == []
