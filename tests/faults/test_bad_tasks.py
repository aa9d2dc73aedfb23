"""Tasks that hurt their pool: some hang forever, one kills every worker that runs it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from faultkit import HEADER, log_tail, not_ended, read_outcome, tally, wait_until_ended

from conftest import Figures, RunningSatellite, print_figures, wait_for
from dsat.fsm import RANK, Event

# ---------------------------------------------------------------------------
# 1% of tasks hang forever

HANGING = (
    HEADER
    + """
[step.work]
call = "hang:work"
entry = true
workers = 4
timeout = "1s"
retries = 1
backoff = "20ms"
"""
)

HANG_CODE = """
import time

def work(p):
    if p["n"] % 100 == 0:
        time.sleep(10**6)
    return {"n": p["n"], "double": p["n"] * 2}
"""

HANG_TASKS = 2000
TIMEOUT = 1.0
RETRIES = 1


def test_tasks_that_hang_forever_time_out_on_time_are_retried_then_fail_and_none_is_stuck(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    job = "hanging"
    running = satellite(HANGING, {"hang": HANG_CODE})
    figures = Figures("hanging")
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("work", [{"n": n} for n in range(HANG_TASKS)], job_id=job)
        wait_until_ended(running, job, HANG_TASKS, timeout=70)
        figures.time = time.monotonic() - started
        stuck = client.tasks(stuck=True)
        in_start = client.tasks(state="START")
    assert running.stop() == 0
    outcome = read_outcome(running, task_ids)
    tally(figures, outcome)

    hanging = [t for n, t in enumerate(task_ids) if n % 100 == 0]
    delays: dict[str, list[float]] = {}  # TIMEOUT.at - START.at of each try
    for task_id in hanging:
        starts = {e["attempt"]: e["at"] for e in outcome.starts(task_id)}
        delays[task_id] = [
            e["at"] - starts.get(e["attempt"], float("inf"))
            for e in outcome.events[task_id]
            if e["event"] == "TIMEOUT" and not e["flag"]
        ]
    figures.extra["hanging"] = len(hanging)
    figures.extra["max_timeout_delay"] = max(d for ds in delays.values() for d in ds)
    print_figures(capsys, figures)

    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert stuck == []
    assert in_start == []
    assert [t for t, s in outcome.states.items() if s == "START"] == []
    assert figures.failure == len(hanging) == HANG_TASKS // 100
    assert figures.happy_end == HANG_TASKS - len(hanging)
    for n, task_id in enumerate(task_ids):
        history = outcome.history(task_id)
        if n % 100:
            assert outcome.states[task_id] == "HAPPY_END", history
            assert outcome.results[task_id] == {"n": n, "double": 2 * n}
            continue
        assert outcome.states[task_id] == "FAILURE", history
        # each try: START, then TIMEOUT within the timeout plus a second; then FAILURE
        tries = sorted(
            (e["attempt"], RANK[Event(e["event"])], e["event"])
            for e in outcome.events[task_id]
            if e["event"] in ("START", "TIMEOUT", "ERROR", "FAILURE") and not e["flag"]
        )
        assert [(event, attempt) for attempt, _, event in tries] == [
            ("START", 1),
            ("TIMEOUT", 1),
            ("START", 2),
            ("TIMEOUT", 2),
            ("FAILURE", 2),
        ], history
        assert len(delays[task_id]) == RETRIES + 1, history
        assert all(TIMEOUT - 0.05 <= d <= TIMEOUT + 1.0 for d in delays[task_id]), (
            delays[task_id],
            history,
        )
        assert "timeout" in outcome.errors[task_id], outcome.errors[task_id]
        assert task_id not in outcome.results


# ---------------------------------------------------------------------------
# a poison task: its worker dies whenever it runs it

POISON = (
    HEADER
    + """
[step.work]
call = "poison:work"
entry = true
workers = 2
retries = 2
backoff = "20ms"
"""
)

POISON_CODE = """
import os

def work(p):
    if p.get("poison"):
        os._exit(1)
    return {"n": p["n"] + 1}
"""

NORMAL_TASKS = 2000


def test_a_poison_task_that_kills_its_worker_fails_after_its_retries_and_the_pool_goes_on(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    job = "poison"
    running = satellite(POISON, {"poison": POISON_CODE})
    first_workers = set(running.pids_of("work"))
    assert len(first_workers) == 2
    figures = Figures("poison")
    payloads = [{"n": n} for n in range(NORMAL_TASKS)]
    payloads.insert(NORMAL_TASKS // 2, {"n": -1, "poison": True})
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("work", payloads, job_id=job)
        wait_until_ended(running, job, len(payloads), timeout=60)
        figures.time = time.monotonic() - started

        # the pool goes on: two workers again, and new tasks end as before
        wait_for(lambda: len(running.pids_of("work")) == 2, timeout=30)
        after = client.submit_many("work", [{"n": n} for n in range(100)], job_id="after")
        wait_until_ended(running, "after", len(after), timeout=30)
    assert running.stop() == 0
    poison = task_ids[NORMAL_TASKS // 2]
    normal = [t for t in task_ids if t != poison]
    outcome = read_outcome(running, [*task_ids, *after])
    tally(figures, read_outcome(running, task_ids))
    starts = outcome.starts(poison)
    figures.kills = len(starts)  # each try killed its worker
    print_figures(capsys, figures)

    history = outcome.history(poison)
    assert outcome.states[poison] == "FAILURE", history
    assert [e["attempt"] for e in starts] == [1, 2, 3], history
    assert len({e["pid"] for e in starts}) == 3, "each try ran in a new worker"
    # it says what the function did, not only that its worker died
    assert "os._exit(1)" in outcome.errors[poison], outcome.errors[poison]
    errors = [e for e in outcome.events[poison] if e["event"] == "ERROR" and not e["flag"]]
    assert [e["attempt"] for e in errors] == [1, 2, 3], history
    assert outcome.terminal_events(poison) == ["FAILURE"]

    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert figures.failure == 1
    assert figures.happy_end == NORMAL_TASKS
    wrong = {
        t: (outcome.states[t], outcome.results.get(t))
        for n, t in enumerate(normal)
        if (outcome.states[t], outcome.results.get(t)) != ("HAPPY_END", {"n": n + 1})
    }
    assert wrong == {}
    assert [outcome.states[t] for t in after] == ["HAPPY_END"] * len(after)
    # A worker runs a function only once what it sent before has left the process: the
    # death is the poison's alone, and no other task runs twice.
    others_again = sum(outcome.extra_starts(t) for t in normal)
    assert others_again == 0, f"{others_again} other tasks ran twice"
