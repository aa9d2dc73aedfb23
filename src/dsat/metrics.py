"""Load: frozen snapshots of each node's load, and the autoscaling policy. Pure, no I/O.

Every router reports its load to its satellite's tracker once a second (queued,
busy and idle workers, done and errors counters, task durations). The tracker
turns the counters into rates; :class:`NodeLoad` is what clients, ``dsat top``
and the autoscaler read.

The autoscaler's policy is :func:`desired_workers`: from a pool's recent load
samples, how many workers it should have, always within ``[min, max]``:

- **up** when the pool is saturated: for ``up_after`` seconds, no idle worker
  and a queue that is not shrinking, i.e. that at its current pace would not be
  empty within ``drain_within`` seconds (a queue that does not shrink at all
  never would). It adds half the current count (at least one), so a pool of 1
  reaches 8 in five steps;
- **down** when workers stayed idle, with an empty queue, for ``idle_after``
  seconds: it removes the ones that stayed idle all along;
- never twice within ``cooldown`` seconds, so it does not flap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeLoad:
    """The latest load of one node (a pool's queue, a sink, the orchester...)."""

    node: str
    step: str = ""
    role: str = ""
    satellite: str = ""
    pid: int = 0
    queued: int = 0  # tasks waiting (including those waiting for a retry)
    held: int = 0  # tasks being run
    workers: int = 0  # workers connected (pools only)
    busy: int = 0
    idle: int = 0
    forwarding: int = 0  # results waiting for the next step to take them
    accepted: int = 0  # counters since the node started
    done: int = 0
    errors: int = 0
    failed: int = 0
    refused: int = 0
    duplicates: int = 0
    malformed: Mapping[str, int] = field(default_factory=dict)  # per socket
    refused_peers: Mapping[str, int] = field(default_factory=dict)  # CURVE handshakes refused
    ticks: int = 0  # sources: ticks seen, tasks sent, ticks skipped (pushed back)
    sent: int = 0
    skipped: int = 0
    done_per_s: float = 0.0
    errors_per_s: float = 0.0
    mean: float = 0.0  # seconds per task, recent tasks
    p95: float = 0.0
    age: float = 0.0  # seconds since this report

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> NodeLoad:
        """A snapshot from a load report as the tracker keeps it (unknown keys ignored)."""
        known = cls.__dataclass_fields__
        values = {k: v for k, v in report.items() if k in known}
        values["malformed"] = dict(report.get("malformed") or {})
        values["refused_peers"] = dict(report.get("refused_peers") or {})
        return cls(**values)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


@dataclass(frozen=True)
class Sample:
    """One look at a pool: when (monotonic seconds), and its workers and queue then."""

    at: float
    workers: int
    busy: int
    idle: int
    queued: int


@dataclass(frozen=True)
class Autoscale:
    """A pool's autoscaling knobs (the topology's ``autoscale`` table), in seconds."""

    up_after: float = 1.0
    idle_after: float = 30.0
    cooldown: float = 2.0
    drain_within: float = 5.0


def desired_workers(
    samples: Sequence[Sample],
    current: int,
    low: int,
    high: int,
    knobs: Autoscale,
    *,
    now: float,
    last_change: float,
) -> int:
    """How many workers a pool should have, given its recent samples (oldest first)."""
    clamped = max(low, min(high, current))
    if clamped != current:
        return clamped
    if now - last_change < knobs.cooldown:
        return current
    if current < high:
        window = _window(samples, now, knobs.up_after)
        if (
            window
            and all(s.idle == 0 and s.queued > 0 for s in window)
            and drain_time(window) > knobs.drain_within
        ):
            return min(high, current + max(1, current // 2))
    if current > low:
        window = _window(samples, now, knobs.idle_after)
        if window and all(s.queued == 0 for s in window):
            spare = min(s.idle for s in window)
            if spare > 0:
                return max(low, current - spare)
    return current


def drain_time(window: Sequence[Sample]) -> float:
    """Seconds until the queue is empty at the pace it shrank over the window (inf: never)."""
    first, last = window[0], window[-1]
    span = last.at - first.at
    shrunk = first.queued - last.queued
    if span <= 0 or shrunk <= 0:
        return float("inf")
    return last.queued / (shrunk / span)


def _window(samples: Sequence[Sample], now: float, span: float) -> list[Sample]:
    """The samples of the last ``span`` seconds, if they cover it (else none)."""
    recent = [s for s in samples if now - s.at <= span]
    older = [s for s in samples if now - s.at > span]
    if not recent or not older:
        return []  # not watched for long enough to decide
    return recent
