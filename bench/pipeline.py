"""dsat: the three-stage pipeline through ``dsat run``, every event tracked and stored.

- throughput: N tasks submitted with ``Client.submit_many`` in chunks; done when
  the tracker counts them all ended (``Client.stats()["counts"]``, polled: never
  one query per task, which would load the tracker); N / (the last task's end, as
  the store has it - the first submit);
- latency: one task in flight, ``Client.submit`` then ``Client.wait``, 500 times;
- memory: the RSS of the queue routers and of the tracker after 10,000 and
  100,000 tasks through the pipeline.

Every result is checked in the store (its ``results`` table, msgpack) after the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

import dsat
from bench.satellite import ENTRY, Satellite, rss
from bench.workload import LatencyRun, Run, is_right, one_at_a_time, payload

CHUNK: Final = 1000  # tasks per submit_many call
POLL: Final = 0.2  # seconds between two looks at the tracker's counts
QUEUES: Final = ("s1.queue", "s2.queue", "s3.queue")


@dataclass
class Batch:
    """Tasks submitted together, under one job_id: their ids in order, and when it began."""

    job_id: str
    task_ids: list[str] = field(default_factory=list)
    first_submit: float = 0.0  # unix time, like the store's timestamps
    offset: int = 0  # task i of the batch carries payload(offset + i)


@dataclass
class Checked:
    """What the store says about a batch: ended tasks, wrong or missing results, anomalies."""

    tasks: int
    mismatches: int
    anomalies: int
    last_end: float


def submit(client: dsat.Client, job_id: str, count: int, *, offset: int = 0) -> Batch:
    """Submit ``count`` tasks in chunks of CHUNK (the client waits when the pool pushes back)."""
    batch = Batch(job_id, offset=offset)
    batch.first_submit = time.time()
    for start in range(0, count, CHUNK):
        chunk = [payload(offset + i) for i in range(start, min(count, start + CHUNK))]
        batch.task_ids.extend(client.submit_many(ENTRY, chunk, job_id=job_id))
    return batch


def wait_ended(client: dsat.Client, total: int, timeout: float) -> dict[str, int]:
    """Poll the tracker's counts until ``total`` tasks have ended (HAPPY_END or FAILURE)."""
    deadline = time.monotonic() + timeout
    while True:
        counts: dict[str, int] = client.stats()["counts"]
        if counts.get("HAPPY_END", 0) + counts.get("FAILURE", 0) >= total:
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {counts} of {total} tasks ended within {timeout:g}s")
        time.sleep(POLL)


def check(satellite: Satellite, batch: Batch) -> Checked:
    """Check every task of a batch in the store: HAPPY_END, the right result, no anomaly."""
    index = {task_id: i for i, task_id in enumerate(batch.task_ids)}
    mismatches = 0
    anomalies = 0
    last_end = 0.0
    seen = 0
    with satellite.read_store() as db:
        rows = db.execute(
            "SELECT t.task_id, t.state, t.ended, t.anomalies, r.data "
            "FROM tasks t LEFT JOIN results r ON r.task_id = t.task_id WHERE t.job_id = ?",
            (batch.job_id,),
        )
        for task_id, state, ended, task_anomalies, data in rows:
            i = index.get(task_id)
            if i is None:
                mismatches += 1  # a task we did not submit
                continue
            seen += 1
            anomalies += task_anomalies
            last_end = max(last_end, ended or 0.0)
            right = (
                state == "HAPPY_END"
                and data is not None
                and is_right(batch.offset + i, msgpack.unpackb(data))
            )
            mismatches += not right
    mismatches += len(index) - seen  # tasks the store does not have
    return Checked(seen, mismatches, anomalies, last_end)


@dataclass
class PipelineRun(Run):
    """A throughput run, and the CPU time each role spent per task, in microseconds."""

    cpu_per_task: dict[str, float] = field(default_factory=dict)


def throughput(satellite: Satellite, count: int, *, job_id: str = "throughput") -> PipelineRun:
    """``count`` tasks through a freshly started satellite."""
    with satellite.client() as client:
        before = _ended(client)
        cpu_before = satellite.cpu()
        batch = submit(client, job_id, count)
        wait_ended(client, before + count, timeout=max(120.0, count / 50))
        cpu_after = satellite.cpu()
    checked = check(satellite, batch)
    seconds = checked.last_end - batch.first_submit
    per_task = {role: (cpu_after[role] - cpu_before[role]) / count * 1e6 for role in cpu_after}
    return PipelineRun(count, seconds, checked.mismatches, checked.anomalies, per_task)


@dataclass
class PipelineLatencyRun(LatencyRun):
    """A latency run, and the CPU time each role spent per task at that light load (us)."""

    cpu_per_task: dict[str, float] = field(default_factory=dict)


def latency(satellite: Satellite, count: int) -> PipelineLatencyRun:
    """One task in flight: submit, wait for its result, ``count`` times."""
    with satellite.client() as client:

        def round_trip(i: int) -> Any:
            return client.wait(client.submit(ENTRY, payload(i), job_id="latency"), timeout=30)

        cpu_before = satellite.cpu()
        run = one_at_a_time(count, round_trip)
        cpu_after = satellite.cpu()
    per_task = {role: (cpu_after[role] - cpu_before[role]) / count * 1e6 for role in cpu_after}
    return PipelineLatencyRun(run.samples, run.mismatches, per_task)


@dataclass
class MemoryPoint:
    """RSS in bytes of the queue routers and the tracker after so many tasks."""

    tasks: int
    queues: dict[str, int]
    tracker: int


@dataclass
class MemoryRun:
    points: list[MemoryPoint]
    mismatches: int
    anomalies: int
    checked: int


def memory(satellite: Satellite, marks: Sequence[int]) -> MemoryRun:
    """Run tasks through the pipeline up to each mark (10,000, 100,000) and take RSS there."""
    points = []
    mismatches = anomalies = checked = 0
    done = 0
    with satellite.client() as client:
        for mark in marks:
            batch = submit(client, f"memory-{mark}", mark - done, offset=done)
            wait_ended(client, mark, timeout=max(120.0, (mark - done) / 50))
            result = check(satellite, batch)
            mismatches += result.mismatches
            anomalies += result.anomalies
            checked += result.tasks
            done = mark
            points.append(
                MemoryPoint(
                    mark,
                    {queue: rss(satellite.pid_of(queue)) for queue in QUEUES},
                    rss(satellite.pid_of("tracker")),
                )
            )
    return MemoryRun(points, mismatches, anomalies, checked)


def _ended(client: dsat.Client) -> int:
    counts = client.stats()["counts"]
    return int(counts.get("HAPPY_END", 0) + counts.get("FAILURE", 0))
