"""The tracker alone: synthetic event batches, as the routers send them, into one tracker.

One tracker process (``python -m dsat.node --node tracker`` on the benchmark's
one-satellite topology, without a supervisor) is fed by four producers, one
DEALER socket each, named like the real ones: ``local/orchester`` (INIT, SEND)
and ``local/s1.queue``, ``local/s2.queue``, ``local/s3.queue`` (ACK, START,
END, SEND per stage; the last stage ends with END and HAPPY_END, which carries
the task's small result). Each task's history is the one a real run stores:
14 events, with the seq, attempt, branch, step, wid and detail fields that
:mod:`dsat.orchester` and :mod:`dsat.router` put in them.

Tasks go through in blocks, like a pipeline: at each tick the orchester reports
block k, s1's queue block k-1, s2's k-2 and s3's k-3, each producer in batches
of EVENTS_PER_BATCH events (the batching the design calls for). A producer keeps
at most WINDOW events unconfirmed, as a router's outbox would; it never resends.

events/s = events sent / (the tracker's ``confirm`` of the last one - the first send).
A confirmation means the events are applied and written to the store.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import zmq

from bench.satellite import rss, write_topology
from bench.workload import TEXT, expected_n
from dsat.fsm import Event
from dsat.message import EventRecord, control, decode_control, pack_records
from dsat.topology import TRACKER, get_connection, load_topology

SATELLITE: Final = "local"
PRODUCERS: Final = ("orchester", "s1.queue", "s2.queue", "s3.queue")
EVENTS_PER_TASK: Final = 14
EVENTS_PER_BATCH: Final = 256
BLOCK: Final = 64  # tasks per tick: 128 events from the orchester, 256 from each queue
WINDOW: Final = 64 * EVENTS_PER_BATCH  # unconfirmed events per producer
SILENCE: Final = 120.0  # no confirmation for this long: the tracker is stuck
TIMEOUT_GRACE: Final = 31.0  # a START's deadline: the step's timeout (30 s) + kill grace


# ---------------------------------------------------------------------------
# histories


class Histories:
    """Each task's events, per producer, as the orchester and the queue routers report them."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.base = int(time.time() * 1000)
        self.pids = {name: 10_000 + i for i, name in enumerate(PRODUCERS)}
        self.worker_pids = {f"s{k}": 20_000 + k for k in (1, 2, 3)}

    def task_id(self, i: int) -> str:
        """Like the orchester's ids: ms clock, instance tag, counter (22 characters)."""
        return f"{self.base + i // 1000:012x}{self.tag}{i & 0xFFFFFF:06x}"

    def orchester(self, i: int, at: float) -> list[EventRecord]:
        task_id = self.task_id(i)
        pid = self.pids["orchester"]

        def record(event: Event, seq: int) -> EventRecord:
            return EventRecord(
                task_id, task_id, 1, seq, 1, event, "", SATELLITE, SATELLITE, "orchester", pid,
                at, {"next": ["s1"]},
            )  # fmt: skip

        return [record(Event.INIT, 0), record(Event.SEND, 1)]

    def stage(self, i: int, k: int, at: float) -> list[EventRecord]:
        """The events stage ``k`` (1, 2, 3) reports for task ``i``: its queue's and worker's."""
        task_id = self.task_id(i)
        step = f"s{k}"
        queue, queue_pid = f"{step}.queue", self.pids[f"{step}.queue"]
        worker, worker_pid = f"{step}.1", self.worker_pids[step]

        def record(event: Event, wid: str, pid: int, seq: int, **detail: Any) -> EventRecord:
            return EventRecord(
                task_id, task_id, 1, seq, 1, event, step, SATELLITE, SATELLITE, wid, pid, at,
                detail,
            )  # fmt: skip

        events = [
            record(Event.ACK, queue, queue_pid, k),
            record(Event.START, worker, worker_pid, k, deadline=at + TIMEOUT_GRACE),
        ]
        if k < 3:
            events.append(record(Event.END, worker, worker_pid, k, elapsed=8e-5))
            events.append(record(Event.SEND, queue, queue_pid, k + 1, next=[f"s{k + 1}"]))
        else:
            result = msgpack.packb({"n": expected_n(i), "s": TEXT})
            events.append(record(Event.END, worker, worker_pid, k, elapsed=8e-5, children=[]))
            events.append(
                record(
                    Event.HAPPY_END, worker, worker_pid, k, serialization="msgpack", result=result
                )
            )
        return events

    def of(self, producer: int, i: int, at: float) -> list[EventRecord]:
        return self.orchester(i, at) if producer == 0 else self.stage(i, producer, at)


# (producer index, its records) per batch, in the order they are sent
Ticks = Iterator[list[tuple[int, list[EventRecord]]]]


def ticks(histories: Histories, start: int, stop: int) -> Ticks:
    """Tasks start..stop-1 in blocks: at tick t, producer p reports block t - p."""
    blocks = range(start, stop, BLOCK)
    lag = len(PRODUCERS) - 1
    for tick in range(len(blocks) + lag):
        at = time.time()
        out: list[tuple[int, list[EventRecord]]] = []
        for producer in range(len(PRODUCERS)):
            b = tick - producer
            if not 0 <= b < len(blocks):
                continue
            first = blocks[b]
            records: list[EventRecord] = []
            for i in range(first, min(stop, first + BLOCK)):
                records.extend(histories.of(producer, i, at))
            for cut in range(0, len(records), EVENTS_PER_BATCH):
                out.append((producer, records[cut : cut + EVENTS_PER_BATCH]))
        yield out


# ---------------------------------------------------------------------------
# the tracker process and its producers


class TrackerProcess:
    """One tracker, started alone on the benchmark topology in a temporary directory."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dsbt-", dir="/tmp"))
        self.topology_path = write_topology(self.directory)
        topology = load_topology(self.topology_path, check_imports=False)
        os.makedirs(topology.runtime_dir(SATELLITE), mode=0o700, exist_ok=True)
        plan = get_connection(topology, TRACKER, satellite=SATELLITE)
        self.events_address = _ipc(plan.socket("events").addresses)
        self.query_address = _ipc(plan.socket("query").addresses)
        self.log = self.directory / "tracker.log"
        env = {k: v for k, v in os.environ.items() if k != "DSAT_SUPERVISOR_PID"}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dsat.node",
                    "--topology",
                    str(self.topology_path),
                    "--satellite",
                    SATELLITE,
                    "--node",
                    TRACKER,
                ],
                cwd=self.directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, context: zmq.Context[zmq.Socket[bytes]], timeout: float = 30.0) -> None:
        """Until the tracker answers a ``hello`` query."""
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.query_address)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the tracker exited:\n{self.log_text()}")
                socket.send_multipart(control("query", {"ref": 1, "op": "hello"}))
                if socket.poll(500):
                    socket.recv_multipart()
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the tracker did not answer in {timeout:g}s")
        finally:
            socket.close(linger=0)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def check_store(self) -> tuple[int, int]:
        """(tasks HAPPY_END with a result, anomalies) in the store."""
        db = sqlite3.connect(f"file:{self.directory / 'status.db'}?mode=ro", uri=True, timeout=30)
        try:
            happy = db.execute("SELECT count(*) FROM tasks WHERE state = 'HAPPY_END'").fetchone()
            anomalies = db.execute("SELECT coalesce(sum(anomalies), 0) FROM tasks").fetchone()
            results = db.execute("SELECT count(*) FROM results").fetchone()
        finally:
            db.close()
        return min(int(happy[0]), int(results[0])), int(anomalies[0])

    def close(self) -> None:
        """SIGTERM by pid, wait; SIGKILL after a timeout; remove the directory."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _ipc(addresses: Iterable[str]) -> str:
    return next(a for a in addresses if a.startswith("ipc://"))


class Feeder:
    """The four producers: number events, send batches, count the tracker's confirmations."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.sockets: list[zmq.Socket[bytes]] = []
        self.names = [f"{SATELLITE}/{name}" for name in PRODUCERS]
        self.epochs = [secrets.randbelow(2**31) + 1 for _ in PRODUCERS]
        self.next = [1] * len(PRODUCERS)  # the next event number of each producer
        self.sent_upto = [0] * len(PRODUCERS)  # the last event number sent (batches in order)
        self.confirmed = [0] * len(PRODUCERS)
        self.poller = zmq.Poller()
        for _ in PRODUCERS:
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.SNDHWM, 100_000)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
            self.poller.register(socket, zmq.POLLIN)
            self.sockets.append(socket)
        self.sent = 0
        self.first_send = 0.0
        self.last_confirm = 0.0

    def pack(self, producer: int, records: list[EventRecord]) -> list[bytes]:
        """The frames of one events batch; numbers its events."""
        first = self.next[producer]
        self.next[producer] += len(records)
        meta = {"producer": self.names[producer], "epoch": self.epochs[producer], "first": first}
        return control("events", meta, pack_records(records))

    def send(self, producer: int, frames: list[bytes], count: int) -> None:
        """Send one packed batch of ``count`` events, once the producer's window has room."""
        while self.unconfirmed(producer) > WINDOW:
            self.read(timeout=SILENCE)
        if not self.first_send:
            self.first_send = time.monotonic()
        self.sockets[producer].send_multipart(frames)
        self.sent_upto[producer] += count
        self.sent += count

    def unconfirmed(self, producer: int) -> int:
        return self.sent_upto[producer] - self.confirmed[producer]

    def read(self, timeout: float) -> None:
        """Take the confirmations that came (waiting up to ``timeout`` for the first)."""
        ready = dict(self.poller.poll(int(timeout * 1000)))
        if not ready:
            raise RuntimeError(f"the tracker confirmed nothing for {timeout:g}s")
        for producer, socket in enumerate(self.sockets):
            if socket not in ready:
                continue
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                body = decode_control(frames, frozenset({"confirm"}), max_extra=0).body
                if body.get("gap"):
                    raise RuntimeError(f"the tracker saw a gap from {self.names[producer]}")
                if (
                    body["epoch"] == self.epochs[producer]
                    and body["upto"] > self.confirmed[producer]
                ):
                    self.confirmed[producer] = body["upto"]
                    self.last_confirm = time.monotonic()

    def drain(self) -> None:
        """Until the tracker confirmed every event sent."""
        while any(self.unconfirmed(p) for p in range(len(PRODUCERS))):
            self.read(timeout=SILENCE)

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)

    @property
    def seconds(self) -> float:
        return self.last_confirm - self.first_send


# ---------------------------------------------------------------------------
# the benchmarks


@dataclass
class TrackerRun:
    events: int
    seconds: float
    tasks: int
    mismatches: int  # tasks not HAPPY_END with their result
    anomalies: int

    @property
    def per_second(self) -> float:
        return self.events / self.seconds


def throughput(tasks: int) -> TrackerRun:
    """Feed ``tasks`` tasks' histories, packed beforehand, as fast as the tracker confirms."""
    histories = Histories()
    packed: list[tuple[int, list[bytes], int]] = []
    tracker = TrackerProcess()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        tracker.wait_ready(context)
        feeder = Feeder(context, tracker.events_address)
        for batches in ticks(histories, 0, tasks):
            for producer, records in batches:
                packed.append((producer, feeder.pack(producer, records), len(records)))
        for producer, frames, count in packed:
            feeder.send(producer, frames, count)
        feeder.drain()
        seconds = feeder.seconds
        events = feeder.sent
        feeder.close()
        happy, anomalies = tracker.check_store()
        return TrackerRun(events, seconds, tasks, tasks - happy, anomalies)
    finally:
        context.destroy(linger=0)
        tracker.close()


@dataclass
class MemoryRun:
    """The tracker's RSS (bytes) after each mark of finished tasks, and the time to get there."""

    points: list[tuple[int, int, float]]  # tasks, rss, seconds since the first send
    mismatches: int
    anomalies: int


def memory(marks: list[int], progress: Callable[[str], None] = print) -> MemoryRun:
    """Feed tasks up to each mark (generated as they go), let the tracker confirm, take its RSS."""
    histories = Histories()
    tracker = TrackerProcess()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    points: list[tuple[int, int, float]] = []
    try:
        tracker.wait_ready(context)
        feeder = Feeder(context, tracker.events_address)
        started = time.monotonic()
        done = 0
        for mark in marks:
            for batches in ticks(histories, done, mark):
                for producer, records in batches:
                    feeder.send(producer, feeder.pack(producer, records), len(records))
            feeder.drain()
            done = mark
            points.append((mark, rss(tracker.pid), time.monotonic() - started))
            progress(
                f"  tracker: {mark} tasks fed in {points[-1][2]:.0f} s, "
                f"RSS {points[-1][1] / 2**20:.1f} MB"
            )
        feeder.close()
        happy, anomalies = tracker.check_store()
        return MemoryRun(points, done - happy, anomalies)
    finally:
        context.destroy(linger=0)
        tracker.close()
