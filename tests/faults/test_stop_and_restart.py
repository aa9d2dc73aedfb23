"""SIGTERM under load stops everything in order; `dsat run` again finishes what was left."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from faultkit import (
    STAGES,
    ended,
    log_tail,
    not_ended,
    read_outcome,
    stages_result,
    tally,
    three_stages,
    wait_until_ended,
)

from conftest import Figures, RunningSatellite, print_figures, wait_for

TASKS = 2000
STOP_WITHIN = 30.0


def test_sigterm_under_load_stops_cleanly_and_the_next_run_ends_every_task(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    job = "stopped"
    # s2 sleeps 5 ms per task: when half are done, the other half is queued or running
    running = satellite(three_stages(retries=3, pause=0.005), {"stages": STAGES})
    figures = Figures("sigterm_restart")
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n} for n in range(TASKS)], job_id=job)
    wait_for(lambda: ended(running, job) >= TASKS // 2, timeout=60, interval=0.05)
    before_stop = ended(running, job)
    stopping = time.monotonic()
    code = running.stop()
    stop_time = time.monotonic() - stopping
    survivors = running.survivors()
    after_stop = ended(running, job)

    again = RunningSatellite(running.directory, running.topology)
    try:
        again.start()
        wait_until_ended(again, job, TASKS, timeout=60)
        figures.time = time.monotonic() - started
        second_code = again.stop()
        second_survivors = again.survivors()
    finally:
        if again.process is not None and again.process.poll() is None:
            with contextlib.suppress(AssertionError):
                again.stop()
        again.kill_all()
    outcome = read_outcome(again, task_ids)
    tally(figures, outcome)
    figures.extra.update(
        ended_at_sigterm=before_stop,
        ended_at_exit=after_stop,
        stop_time=stop_time,
        exit_code=code,
        survivors=len(survivors),
    )
    print_figures(capsys, figures)

    assert code == 0, running.log()
    assert survivors == []
    assert stop_time < STOP_WITHIN, figures.line()
    assert before_stop < TASKS, "the stop came mid-run"
    assert after_stop < TASKS, "some tasks were left for the next run"
    assert second_code == 0, again.log()
    assert second_survivors == []
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(again)}"
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
