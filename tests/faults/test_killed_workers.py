"""Workers SIGKILLed at random, every half second, while a three-stage pipeline runs."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from faultkit import (
    STAGES,
    ended,
    kill_workers_until,
    log_tail,
    not_ended,
    read_outcome,
    stages_result,
    tally,
    three_stages,
)

from conftest import Figures, RunningSatellite, print_figures

TASKS = 5000
JOB = "killed-workers"


def test_workers_killed_every_half_second_lose_no_task_and_rerun_at_most_once_per_kill(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    running = satellite(three_stages(retries=3, backoff="20ms"), {"stages": STAGES})
    figures = Figures("killed_workers", extra={"seed": seed})
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n} for n in range(TASKS)], job_id=JOB)
        figures.kills = kill_workers_until(
            running,
            ("s1", "s2", "s3"),
            lambda: ended(running, JOB) >= TASKS,
            every=0.5,
            timeout=75,
            rng=rng,
        )
        figures.time = time.monotonic() - started
    assert running.stop() == 0
    outcome = read_outcome(running, task_ids)
    tally(figures, outcome)
    print_figures(capsys, figures)

    assert figures.kills > 0
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert figures.happy_end == TASKS, figures.line()
    wrong_ends = {t: outcome.terminal_events(t) for t in task_ids}
    wrong_ends = {t: ends for t, ends in wrong_ends.items() if ends != [outcome.states[t]]}
    assert wrong_ends == {}, "\n".join(
        f"{t}: terminal events {ends}, state {outcome.states[t]}\n{outcome.history(t)}"
        for t, ends in list(wrong_ends.items())[:5]
    )
    wrong = {
        n: outcome.results.get(t)
        for n, t in enumerate(task_ids)
        if outcome.results.get(t) != stages_result(n)
    }
    assert wrong == {}
    partial = {t: sorted(outcome.hops(t)) for t in task_ids if len(outcome.hops(t)) != 3}
    assert partial == {}, "every task starts at s1, s2 and s3"
    assert figures.duplicates <= figures.kills, f"{figures.line()}\n" + "\n".join(
        f"{t}:\n{outcome.history(t)}" for t in [t for t in task_ids if outcome.extra_starts(t)][:5]
    )
