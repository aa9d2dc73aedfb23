"""The ceiling: the same three-stage graph in raw pyzmq, with no tracking at all.

Five processes, source -> s1 -> s2 -> s3 -> sink, joined by PUSH/PULL over
``ipc://`` in a private temporary directory; each message is the msgpack
payload and nothing else. The source is this process; the stages and the sink
are children. The sink checks every result and, at the end, reports to the
source the time of its last receive (``time.monotonic``: one clock for every
process of the machine on Linux).

- throughput: N tasks sent as fast as PUSH takes them; N / (last receive -
  first send);
- latency: the sink sends each result back to the source; one message in
  flight at a time, p50 and p99 of the round trip.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import psutil
import zmq

from bench import stages
from bench.workload import LatencyRun, Run, Tally, one_at_a_time, payload

PING: Final = b"!ping"  # goes through the chain untouched: every process is up
STOP: Final = b"!stop"  # goes through the chain, each process stops after passing it on
STAGES: Final = {"s1": stages.s1, "s2": stages.s2, "s3": stages.s3}
RECEIVE_TIMEOUT: Final = 60.0  # no process of the chain may wait longer than this


def _socket(context: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.RCVTIMEO, int(RECEIVE_TIMEOUT * 1000))
    return socket


def _stage(name: str, inbound: str, outbound: str) -> None:
    """One stage: receive, decode, compute, encode, send; control frames pass as they are."""
    function = STAGES[name]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = _socket(context, zmq.PULL)
    pull.connect(inbound)
    push = _socket(context, zmq.PUSH)
    push.bind(outbound)
    try:
        while True:
            frame = pull.recv()
            if frame[:1] == b"!":
                push.send(frame)
                if frame == STOP:
                    return
                continue
            push.send(msgpack.packb(function(msgpack.unpackb(frame))))
    finally:
        context.destroy(linger=1000)


def _sink(inbound: str, back: str, count: int, echo: bool) -> None:
    """The sink: echo every result back (latency), or check them all and report (throughput)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = _socket(context, zmq.PULL)
    pull.connect(inbound)
    push = _socket(context, zmq.PUSH)
    push.connect(back)
    tally = Tally(count)
    try:
        while True:
            frame = pull.recv()
            if frame == STOP:
                return
            if echo or frame == PING:
                push.send(frame)
                continue
            tally.add(msgpack.unpackb(frame))
            if tally.received == count:
                last = time.monotonic()
                push.send(msgpack.packb({"last": last, "mismatches": tally.mismatches}))
    finally:
        context.destroy(linger=1000)


class Chain:
    """The five processes, started in a private ipc directory; stopped by ``close``."""

    def __init__(self, count: int, *, echo: bool) -> None:
        self.directory = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
        addresses = [f"ipc://{self.directory}/{i}" for i in range(5)]
        spawn = multiprocessing.get_context("spawn")
        self.processes: list[Any] = [
            spawn.Process(
                target=_stage, args=(name, addresses[i], addresses[i + 1]), name=f"ceiling-{name}"
            )
            for i, name in enumerate(STAGES)
        ]
        self.processes.append(
            spawn.Process(
                target=_sink, args=(addresses[3], addresses[4], count, echo), name="ceiling-sink"
            )
        )
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.push = _socket(self.context, zmq.PUSH)
        self.push.bind(addresses[0])
        self.back = _socket(self.context, zmq.PULL)
        self.back.bind(addresses[4])
        for process in self.processes:
            process.start()
        self.push.send(PING)
        self._await_ping()

    def _await_ping(self) -> None:
        """Wait for the ping to come back: every process is up and connected."""
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while not self.back.poll(200):
            dead = [p.name for p in self.processes if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the ceiling chain did not start (dead: {dead or 'none'})")
        if self.back.recv() != PING:
            self.close()
            raise RuntimeError("the ceiling chain answered its ping with something else")

    def close(self) -> None:
        """Stop the chain: STOP goes through it; a process that lingers is killed, by pid."""
        with contextlib.suppress(zmq.ZMQError):  # full or closed: the kills below do it
            self.push.send(STOP, zmq.NOBLOCK)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self.context.destroy(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def cpu(self) -> float:
        """CPU seconds (user + system) the stages and the sink have used so far."""
        used = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(process.pid).cpu_times()
                used += times.user + times.system
        return used


@dataclass
class CeilingRun(Run):
    """A throughput run, and the CPU time its stages and sink spent per task (µs)."""

    cpu_per_task: float = 0.0


def throughput(count: int) -> CeilingRun:
    """Send ``count`` tasks through the chain as fast as it takes them."""
    chain = Chain(count, echo=False)
    try:
        text_payloads = (payload(i) for i in range(count))
        cpu_before = chain.cpu()
        first = time.monotonic()
        for item in text_payloads:
            chain.push.send(msgpack.packb(item))
        report = msgpack.unpackb(chain.back.recv())
        cpu = (chain.cpu() - cpu_before) / count * 1e6
        return CeilingRun(count, report["last"] - first, report["mismatches"], cpu_per_task=cpu)
    finally:
        chain.close()


def latency(count: int) -> LatencyRun:
    """One task at a time, source to sink and back: the round trip of each."""
    chain = Chain(count, echo=True)
    try:

        def round_trip(i: int) -> Any:
            chain.push.send(msgpack.packb(payload(i)))
            return msgpack.unpackb(chain.back.recv())

        return one_at_a_time(count, round_trip)
    finally:
        chain.close()
