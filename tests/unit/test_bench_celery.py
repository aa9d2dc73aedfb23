"""The benchmark's Celery part goes on when a run fails: Celery sometimes never
delivers a stored result to the waiting client, and then needs a restart. The
run is reported as a failure, the next run gets a fresh Celery, and the figures
are those of the runs that completed.

Pure logic of the suite (``bench.cli.run_celery``); Celery itself is stood in for.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from bench import cli, peers
from bench.figures import Report
from bench.workload import LatencyRun, Run


class FakePeer:
    started: ClassVar[list[FakePeer]] = []

    def __init__(self) -> None:
        self.closed = False

    def start(self) -> None:
        FakePeer.started.append(self)

    def close(self) -> None:
        self.closed = True


def test_a_failed_celery_run_is_reported_and_the_next_runs_get_a_fresh_celery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakePeer.started = []
    calls = {"throughput": 0}

    def throughput(peer: Any, count: int) -> Run:
        calls["throughput"] += 1
        assert not peer.closed
        if calls["throughput"] == 1:
            raise TimeoutError("The operation timed out.")
        return Run(count, 10.0, 0)

    monkeypatch.setattr(peers, "unavailable", lambda: None)
    monkeypatch.setattr(peers, "CeleryPeer", FakePeer)
    monkeypatch.setattr(peers, "throughput", throughput)
    monkeypatch.setattr(peers, "latency", lambda peer, count: LatencyRun([0.01] * count, 0))
    plan = cli.Plan(parts={"celery"}, runs=3, celery_tasks=100, latency_tasks=10)
    report = Report()

    cli.run_celery(plan, report, throughput=True, latency=True)

    assert plan.failures == ["celery run 1: The operation timed out."]
    assert len(FakePeer.started) == 2  # the first, and a fresh one after the failure
    assert all(peer.closed for peer in FakePeer.started)
    assert report.figures["celery tasks/s"].runs == [10.0, 10.0]  # the two runs that ended
    assert len(report.figures["celery latency p50"].runs) == 2
    assert report.part("celery").checked == 2 * 100 + 2 * 10
