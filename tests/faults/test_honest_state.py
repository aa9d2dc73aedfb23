"""An honest state: a task whose fate is unknown says UNKNOWN, and SIGKILL loses nothing."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable

import pytest
from faultkit import (
    STAGES,
    ended,
    kill,
    log_tail,
    not_ended,
    read_outcome,
    tally,
    three_stages,
    wait_until_ended,
)

from conftest import Figures, RunningSatellite, print_figures, wait_for

HELD = """
[satellite.local]
runtime_dir = "RUNTIME"

[step.work]
call = "work:nap"
entry = true
timeout = "1s"
"""

NAP = """
import time

def nap(p):
    time.sleep(0.3)
    return p
"""


def test_a_task_whose_router_is_frozen_says_unknown_then_ends_when_it_thaws(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    running = satellite(HELD, {"work": NAP})
    (queue,) = running.pids_of("work.queue")
    with running.client() as client:
        task_id = client.submit("work", {"n": 1})
        wait_for(lambda: client.state(task_id).state == "START", timeout=10, interval=0.01)
        # the router that holds the task stops answering: nobody can say how it goes
        kill(queue, signal.SIGSTOP)
        try:
            frozen = wait_for(
                lambda: (s := client.state(task_id)).state == "UNKNOWN" and s, timeout=10
            )
            stuck = client.tasks(stuck=True)
            unknown = client.tasks(state="UNKNOWN")
        finally:
            kill(queue, signal.SIGCONT)
        result = client.wait(task_id, timeout=20)
        after = client.state(task_id)
    figures = Figures("frozen_router")
    figures.extra.update(unknown_after_s=frozen.updated and time.time() - frozen.updated)
    print_figures(capsys, figures)
    assert frozen.last_known == "START"
    assert [t.task_id for t in stuck] == [task_id]
    assert [t.task_id for t in unknown] == [task_id]
    assert result == {"n": 1}
    assert after.state == "HAPPY_END"
    assert after.anomalies == 0


def test_sigkill_to_dsat_run_under_load_leaves_nothing_and_the_next_run_ends_every_task(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = 2000
    running = satellite(three_stages(retries=3, pause=0.005), {"stages": STAGES})
    figures = Figures("sigkill_restart")
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n} for n in range(tasks)], job_id="killed")
    wait_for(lambda: ended(running, "killed") >= tasks // 3, timeout=60, interval=0.05)
    at_kill = ended(running, "killed")
    running.stop(signal.SIGKILL)
    wait_for(lambda: running.survivors() == [], timeout=30, interval=0.1)

    again = RunningSatellite(running.directory, running.topology)
    try:
        again.start()
        wait_until_ended(again, "killed", tasks, timeout=90)
        figures.time = time.monotonic() - started
        again.stop()
    finally:
        if again.process is not None and again.process.poll() is None:
            with contextlib.suppress(AssertionError):
                again.stop()
        again.kill_all()
    outcome = read_outcome(again, task_ids)
    tally(figures, outcome)
    figures.extra.update(ended_at_kill=at_kill)
    print_figures(capsys, figures)
    assert at_kill < tasks
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(again)}"
    assert figures.happy_end == tasks
