"""Backpressure, not silent drops: a saturated pool pushes back to the client and the clock."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil
import pytest
from faultkit import log_tail, read_outcome, tally, wait_until_ended

import dsat
from conftest import Figures, RunningSatellite, print_figures, wait_for

SLOW = """
import time

def quick(p):
    return p

def slow(p):
    time.sleep(0.05)
    return p

def stuck(p):
    time.sleep(0.5)
    return p
"""

SATURATED = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"

[defaults]
max_queue = 20

[step.slow]
call = "work:stuck"
entry = true
"""


def test_a_saturated_pool_makes_submit_wait_then_raise_and_loses_nothing(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    running = satellite(SATURATED, {"work": SLOW})
    figures = Figures("saturated_submit")
    accepted: list[str] = []
    started = time.monotonic()
    refused: dsat.SaturatedError | None = None
    with running.client() as client:
        # a slot opens every 0.5 s, a submit waits 0.2 s: soon one waits in vain
        for n in range(1000):
            try:
                accepted.append(client.submit("slow", {"n": n}, job_id="sat", timeout=0.2))
            except dsat.SaturatedError as exc:
                refused = exc
                break
        waited = time.monotonic() - started
    assert refused is not None, f"{len(accepted)} submits, none refused"
    assert "submit to slow: still saturated after 0.2s" in str(refused)
    # 20 in the orchester, 20 in the queue, one running: then submit pushes back
    assert 20 <= len(accepted) <= 60, len(accepted)
    wait_until_ended(running, "sat", len(accepted), timeout=90)
    figures.time = waited
    tally(figures, read_outcome(running, accepted))
    figures.extra.update(accepted=len(accepted))
    print_figures(capsys, figures)
    assert figures.lost == 0, log_tail(running)
    assert figures.happy_end == len(accepted)


CLOCKED = """
[satellite.local]
runtime_dir = "RUNTIME"

[defaults]
max_queue = 5

[step.clock]
every = "20ms"

[step.slow]
call = "work:slow"

[[link]]
from = "clock"
to = "slow"
"""


def test_a_source_skips_the_ticks_a_saturated_pool_cannot_take_and_counts_them(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    running = satellite(CLOCKED, {"work": SLOW})
    with running.client() as client:

        def skipped() -> dsat.metrics.NodeLoad | None:
            load = client.load().get("local/clock")
            return load if load is not None and load.skipped >= 20 else None

        load = wait_for(skipped, timeout=30, interval=0.2)
        tasks = client.tasks(limit=100_000)
    figures = Figures("source_skips")
    figures.extra.update(ticks=load.ticks, sent=load.sent, skipped=load.skipped)
    print_figures(capsys, figures)
    assert load.ticks >= load.sent + load.skipped - 1  # every tick is sent or skipped
    # nothing that was sent is lost: every task the clock created is in the store
    assert len(tasks) >= load.sent - 5, (len(tasks), load.sent)


TEN_TIMES_SLOWER = """
[satellite.local]
runtime_dir = "RUNTIME"

[defaults]
max_queue = 500

[step.fast]
call = "work:quick"
entry = true

[step.slow]
call = "work:slow10"

[[link]]
from = "fast"
to = "slow"
"""

SLOWER = """
import time

def quick(p):
    time.sleep(0.001)
    return p

def slow10(p):
    time.sleep(0.01)
    return p
"""


def test_memory_stays_bounded_when_a_stage_is_ten_times_slower(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    running = satellite(TEN_TIMES_SLOWER, {"work": SLOWER})
    stop = threading.Event()
    submitted = [0]

    def feed() -> None:
        with running.client() as client:
            while not stop.is_set():
                try:
                    client.submit_many("fast", [{"blob": "x" * 1000}] * 50, timeout=1.0)
                    submitted[0] += 50
                except dsat.SaturatedError:
                    pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        time.sleep(5)  # the feeder fills every queue up to its bound meanwhile
        early = _total_rss(running)
        time.sleep(10)
        late = _total_rss(running)
    finally:
        stop.set()
        feeder.join(timeout=30)
    figures = Figures("ten_times_slower")
    figures.submitted = submitted[0]
    figures.time = 15.0
    figures.extra.update(rss_at_5s_mib=early / 2**20, rss_at_15s_mib=late / 2**20)
    print_figures(capsys, figures)
    assert not feeder.is_alive()
    assert late - early < 20 * 2**20, f"memory grew by {(late - early) / 2**20:.1f} MiB"


def _total_rss(running: RunningSatellite) -> int:
    total = 0
    for pid in running.tree():
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


PACED = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"

[defaults]
max_live = 30

[step.stuck]
call = "work:stuck"
entry = true
"""


def test_the_entry_takes_no_new_task_while_max_live_tasks_are_live_in_the_tracker(
    satellite: Callable[..., RunningSatellite], capsys: pytest.CaptureFixture[str]
) -> None:
    # max_queue (10,000) leaves room: only the tracker's count of live tasks refuses
    running = satellite(PACED, {"work": SLOW})
    accepted: list[str] = []
    refused: dsat.SaturatedError | None = None
    most_live = 0
    with running.client() as client:
        for n in range(300):
            try:
                accepted.extend(
                    client.submit_many("stuck", [{"n": n}] * 5, job_id="paced", timeout=0.3)
                )
            except dsat.SaturatedError as exc:
                refused = exc
                break
            most_live = max(most_live, client.stats()["live"])
        assert refused is not None, f"{len(accepted)} tasks accepted, none refused"
        assert "tasks are live (max_live 30)" in str(refused)
        # the entry's estimate counts what the tracker has not applied yet: no overshoot
        assert 30 <= len(accepted) <= 40, len(accepted)
        wait_until_ended(running, "paced", len(accepted), timeout=60)
        # every task has ended and the entry has nothing more to report: it still
        # learns that the tracker's live count fell (the tracker answers its load reports)
        later = client.submit_many("stuck", [{"n": -1}] * 5, job_id="later", timeout=5.0)
    figures = Figures("max_live")
    tally(figures, read_outcome(running, accepted))
    figures.extra.update(accepted=len(accepted), most_live=most_live)
    print_figures(capsys, figures)
    assert figures.lost == 0, log_tail(running)
    assert figures.happy_end == len(accepted)
    assert most_live <= 35
    assert len(later) == 5
