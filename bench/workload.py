"""The workload every part shares: payloads, the expected results, and the check.

Task ``i`` carries ``{"n": i, "s": TEXT}``; after ``s1`` (n + 1), ``s2`` (n * 2)
and ``s3`` (n - 3) its result must be ``{"n": (i + 1) * 2 - 3, "s": TEXT}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bench.figures import percentile
from bench.stages import Payload

TEXT: Final = "".join(chr(ord("a") + (i * 7) % 26) for i in range(100))  # 100 characters


def payload(i: int) -> Payload:
    """The payload of task ``i``."""
    return {"n": i, "s": TEXT}


def expected_n(i: int) -> int:
    """What ``n`` becomes after the three stages."""
    return (i + 1) * 2 - 3


def is_right(i: int, result: Any) -> bool:
    """Is ``result`` the right result of task ``i``?"""
    return (
        isinstance(result, dict)
        and result.get("n") == expected_n(i)
        and result.get("s") == TEXT
        and len(result) == 2
    )


class Tally:
    """Results of tasks 0..count-1 that arrive in any order, each checked once.

    A wrong value, a result for no task, a task's second result and a task with
    no result at the end are all mismatches.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = bytearray(count)
        self.received = 0
        self.wrong = 0

    def add(self, result: Any) -> None:
        """Check one result; the task it belongs to is worked out from its ``n``."""
        self.received += 1
        n = result.get("n") if isinstance(result, dict) else None
        if type(n) is not int or (n + 3) % 2:
            self.wrong += 1
            return
        i = (n + 3) // 2 - 1
        if not 0 <= i < self.count or self.seen[i] or not is_right(i, result):
            self.wrong += 1
            return
        self.seen[i] = 1

    @property
    def missing(self) -> int:
        return self.count - sum(self.seen)

    @property
    def mismatches(self) -> int:
        return self.wrong + self.missing


@dataclass
class Run:
    """One throughput run: tasks through, in how long, and what was wrong."""

    tasks: int
    seconds: float
    mismatches: int
    anomalies: int = 0  # transitions the tracker found impossible (dsat only)

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds


@dataclass
class LatencyRun:
    """One task in flight at a time: each one's time from submit to result, in seconds."""

    samples: list[float]
    mismatches: int

    @property
    def p50(self) -> float:
        return percentile(self.samples, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)


def one_at_a_time(count: int, round_trip: Callable[[int], Any]) -> LatencyRun:
    """Time ``round_trip(i)`` (submit task i, return its result) for i in 0..count-1."""
    samples: list[float] = []
    mismatches = 0
    for i in range(count):
        started = time.perf_counter()
        result = round_trip(i)
        samples.append(time.perf_counter() - started)
        mismatches += not is_right(i, result)
    return LatencyRun(samples, mismatches)
