"""The autoscaling policy, on load traces: pure, no process."""

from __future__ import annotations

import itertools

from dsat.metrics import Autoscale, Sample, desired_workers

KNOBS = Autoscale(up_after=1.0, idle_after=10.0, cooldown=2.0)


def trace(*rows: tuple[float, int, int, int, int]) -> list[Sample]:
    return [Sample(at, workers, busy, idle, queued) for at, workers, busy, idle, queued in rows]


def decide(
    samples: list[Sample],
    current: int,
    low: int = 1,
    high: int = 8,
    now: float | None = None,
    last_change: float = -100.0,
) -> int:
    when = samples[-1].at if now is None else now
    return desired_workers(samples, current, low, high, KNOBS, now=when, last_change=last_change)


def test_a_saturated_pool_with_a_growing_queue_gets_more_workers() -> None:
    samples = trace((0, 1, 1, 0, 10), (1, 1, 1, 0, 30), (2, 1, 1, 0, 60))
    assert decide(samples, 1) == 2
    assert decide(samples, 4) == 6  # half again at each step
    assert decide(samples, 7) == 8  # never past max


def test_a_queue_that_shrinks_fast_enough_is_left_alone() -> None:
    samples = trace((0, 2, 2, 0, 60), (1, 2, 2, 0, 40), (2, 2, 2, 0, 20))
    assert decide(samples, 2) == 2  # empty in 1 s at this pace


def test_a_queue_that_shrinks_too_slowly_counts_as_not_shrinking() -> None:
    samples = trace((0, 1, 1, 0, 400), (1, 1, 1, 0, 390), (2, 1, 1, 0, 380))
    assert decide(samples, 1) == 2  # 38 s to empty at this pace


def test_a_pool_with_an_idle_worker_is_not_saturated() -> None:
    samples = trace((0, 2, 1, 1, 5), (1, 2, 1, 1, 9), (2, 2, 1, 1, 12))
    assert decide(samples, 2) == 2


def test_too_short_a_look_decides_nothing() -> None:
    assert decide(trace((0, 1, 1, 0, 100)), 1) == 1
    assert decide(trace((0.5, 1, 1, 0, 100), (1.0, 1, 1, 0, 200)), 1) == 1


def test_workers_idle_for_long_enough_are_removed_down_to_min() -> None:
    samples = trace(*((t, 6, 2, 4, 0) for t in range(0, 12)))
    assert decide(samples, 6, low=1) == 2  # the 4 that stayed idle all along go
    samples = trace(*((t, 6, 0, 6, 0) for t in range(0, 12)))
    assert decide(samples, 6, low=2) == 2


def test_workers_idle_for_less_than_idle_after_stay() -> None:
    samples = trace(*((t, 6, 0, 6, 0) for t in range(0, 8)))
    assert decide(samples, 6) == 6


def test_a_queue_seen_during_the_idle_window_keeps_the_workers() -> None:
    rows = [(t, 6, 0, 6, 0) for t in range(0, 12)]
    rows[7] = (7, 6, 6, 0, 3)
    assert decide(trace(*rows), 6) == 6


def test_no_decision_within_the_cooldown() -> None:
    samples = trace((0, 1, 1, 0, 10), (1, 1, 1, 0, 30), (2, 1, 1, 0, 60))
    assert decide(samples, 1, last_change=1.0) == 1
    assert decide(samples, 1, last_change=-0.1) == 2


def test_a_count_outside_the_bounds_is_brought_back_at_once() -> None:
    samples = trace((0, 9, 9, 0, 0))
    assert decide(samples, 9, high=8, last_change=0.0) == 8
    assert decide(samples, 0, low=1, last_change=0.0) == 1


def test_a_whole_burst_rises_then_falls_and_never_leaves_the_bounds() -> None:
    """Simulate a pool: 400 tasks of 0.1 s, then idle; one sample a second."""
    workers, queued, last_change = 1, 400.0, -100.0
    history: list[Sample] = []
    counts = []
    for second in range(120):
        done = workers * 10  # each worker does 10 tasks a second
        busy = min(workers, int(queued) + (1 if queued else 0))
        queued = max(0.0, queued - done)
        history.append(Sample(float(second), workers, busy, workers - busy, int(queued)))
        wanted = desired_workers(
            history, workers, 1, 8, KNOBS, now=float(second), last_change=last_change
        )
        if wanted != workers:
            workers, last_change = wanted, float(second)
        counts.append(workers)
    assert max(counts) > 1, "it scaled up during the burst"
    assert all(1 <= n <= 8 for n in counts)
    assert counts[-1] == 1, "it came back to min once idle"
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    assert changes <= 8, f"it flapped: {counts}"
