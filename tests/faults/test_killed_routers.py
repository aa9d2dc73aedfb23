"""Fixed points SIGKILLed mid-run and restarted by circus: a pool's queue, the tracker."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from faultkit import (
    STAGES,
    ended,
    kill,
    log_tail,
    new_pid,
    not_ended,
    read_outcome,
    stages_result,
    tally,
    three_stages,
    wait_until_ended,
)

import dsat
from conftest import Figures, RunningSatellite, print_figures, wait_for
from dsat.fsm import RANK, Event

TASKS = 2000


def _wait_ended(running: RunningSatellite, job: str, count: int, timeout: float = 60) -> int:
    """Wait for at least `count` ended tasks; return how many have ended."""
    wait_for(lambda: ended(running, job) >= count, timeout=timeout, interval=0.05)
    return ended(running, job)


def test_a_queue_router_killed_twice_mid_run_loses_no_task(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    job = "queue-killed"
    # s2 sleeps 2 ms per task, so the run lasts long enough for two kills mid-run
    running = satellite(three_stages(retries=3, pause=0.002), {"stages": STAGES})
    figures = Figures("queue_killed")
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n} for n in range(TASKS)], job_id=job)

        _wait_ended(running, job, TASKS // 4)
        (first,) = running.pids_of("s2.queue")
        ended_at_kills = [ended(running, job)]
        assert kill(first)
        figures.kills += 1
        second = new_pid(running, "s2.queue", first)

        # the new router works (tasks go on ending) before it is killed in turn
        _wait_ended(running, job, TASKS // 2)
        assert running.pids_of("s2.queue") == [second]
        ended_at_kills.append(ended(running, job))
        assert kill(second)
        figures.kills += 1
        third = new_pid(running, "s2.queue", second)

        wait_until_ended(running, job, TASKS, timeout=60)
        figures.time = time.monotonic() - started
    assert running.stop() == 0
    outcome = read_outcome(running, task_ids)
    tally(figures, outcome)
    figures.extra["ended_at_kills"] = "/".join(map(str, ended_at_kills))
    print_figures(capsys, figures)

    assert len({first, second, third}) == 3
    assert all(n < TASKS for n in ended_at_kills), "both kills came mid-run"
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert figures.happy_end == TASKS, figures.line()
    wrong = {
        n: outcome.results.get(t)
        for n, t in enumerate(task_ids)
        if outcome.results.get(t) != stages_result(n)
    }
    assert wrong == {}
    twice = {
        t: outcome.terminal_events(t)
        for t in task_ids
        if outcome.terminal_events(t) != ["HAPPY_END"]
    }
    assert twice == {}


def _life(state: dsat.State) -> list[tuple[str, str]]:
    """(event, step) of the task's unflagged events, in the order of its life."""
    events = sorted(
        (e for e in state.history if not e.flag),
        key=lambda e: (e.seq, e.attempt, RANK[Event(e.event)], e.tseq),
    )
    return [(e.event, e.step) for e in events]


STORY = [
    ("INIT", ""),
    ("SEND", ""),
    *[
        pair
        for step, after in (("s1", "s1"), ("s2", "s2"), ("s3", None))
        for pair in [("ACK", step), ("START", step), ("END", step)]
        + ([("SEND", after)] if after else [])
    ],
    ("HAPPY_END", "s3"),
]


def test_the_tracker_killed_mid_run_keeps_every_state_readable_right_and_whole(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    job = "tracker-killed"
    running = satellite(three_stages(retries=3, pause=0.002), {"stages": STAGES})
    figures = Figures("tracker_killed")
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n} for n in range(TASKS)], job_id=job)
        _wait_ended(running, job, TASKS // 3)
        (old,) = running.pids_of("tracker")
        ended_at_kill = ended(running, job)
        assert kill(old)
        figures.kills = 1
        new = new_pid(running, "tracker", old)
        wait_until_ended(running, job, TASKS, timeout=60)
        figures.time = time.monotonic() - started

        states: dict[str, dsat.State] = {}
        unreadable: dict[str, str] = {}
        for task_id in task_ids:
            try:
                states[task_id] = client.state(task_id)
            except dsat.DsatError as exc:
                unreadable[task_id] = str(exc)
        stuck = client.tasks(stuck=True)
    assert running.stop() == 0
    outcome = read_outcome(running, task_ids)
    tally(figures, outcome)
    anomalous = {t: s.anomalies for t, s in states.items() if s.anomalies}
    figures.extra.update(
        ended_at_kill=ended_at_kill,
        anomalies=sum(anomalous.values()),
        flagged_duplicates=sum(s.duplicates for s in states.values()),
    )
    print_figures(capsys, figures)

    assert old != new
    assert ended_at_kill < TASKS, "the kill came mid-run"
    assert unreadable == {}
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert stuck == []
    wrong_state = {t: s.state for t, s in states.items() if s.state != "HAPPY_END"}
    assert wrong_state == {}
    wrong_result = {
        n: states[t].result for n, t in enumerate(task_ids) if states[t].result != stages_result(n)
    }
    assert wrong_result == {}
    gaps = {
        t: [e.tseq for e in s.history]
        for t, s in states.items()
        if sorted(e.tseq for e in s.history) != list(range(1, len(s.history) + 1))
    }
    assert gaps == {}
    # every hop's events are there once (retries would add START/ERROR pairs: none expected)
    wrong_story = {t: _life(s) for t, s in states.items() if _life(s) != STORY}
    assert wrong_story == {}, "\n".join(
        f"{t}:\n{outcome.history(t)}" for t in list(wrong_story)[:5]
    )
    assert anomalous == {}, "\n".join(
        f"{t} ({n} anomalies):\n{outcome.history(t)}" for t, n in list(anomalous.items())[:5]
    )
