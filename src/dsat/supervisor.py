"""Supervision: one satellite's processes under circus, started and stopped in order.

``dsat run`` starts a circus arbiter as a child process (in the main thread of
its own process: circus' ``background=True`` mode fails on Python 3.11), with
one watcher per node of the satellite: the tracker, each router, each pool
(``min`` workers), each sink and source, the orchester. circus restarts what
dies. The arbiter's control endpoint is ``ipc://`` in the satellite's private
(0700) runtime directory and its multicast discovery is off.

circus is kept behind :class:`ProcessManager`, so it can be replaced.

Stopping is ordered, so that nothing accepted is dropped: sources first, then
the orchester (it hands on what it accepted), then each step from upstream to
downstream (a pool's workers finish their task and leave, then its queue hands
on the results and keeps what is still queued in its journal), the tracker last.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from dsat.errors import DsatError, SupervisorError
from dsat.metrics import Sample, desired_workers
from dsat.node import CANNOT_START, RUN_ENV, SUPERVISOR_ENV, die_with_parent
from dsat.runlock import hold_satellite, join_run, wait_for_former_run
from dsat.topology import (
    ORCHESTER,
    TRACKER,
    Kind,
    Role,
    Topology,
    ensure_private_dir,
)

log = logging.getLogger("dsat.supervisor")

CONTROL_TIMEOUT: Final = 10.0
# A node that could not start this many times (a store, a journal or keys it cannot
# use: restarting will not help) stops dsat run, which says why, instead of it
# looking up while circus restarts the node over and over.
START_FAILURES: Final = 3
LOG_CHECK_EVERY: Final = 1.0  # seconds between two looks at the nodes' logs
KEEP_RUNS: Final = 10
LOG_BACKUPS: Final = 2  # rotated files kept per node log


# ---------------------------------------------------------------------------
# what a process manager must do


@dataclass(frozen=True)
class Watch:
    """One kind of process to keep running: its command and how many of it."""

    name: str
    args: tuple[str, ...]
    count: int
    priority: int  # started from the highest
    stop_timeout: float
    log_file: str
    singleton: bool = False
    log_max_size: int = 8 * 1024 * 1024


class ProcessManager(Protocol):
    """What dsat needs from a supervisor (circus today)."""

    def start(self, watches: Sequence[Watch]) -> None: ...

    def alive(self) -> bool: ...

    def pids(self, name: str) -> list[int]: ...

    def count(self, name: str) -> int: ...

    def scale(self, name: str, count: int) -> None: ...

    def stop_watch(self, name: str) -> None: ...

    def quit(self) -> None: ...


class CircusManager:
    """A circus arbiter in a child process, driven over its ipc control endpoint."""

    def __init__(self, runtime_dir: str, run_dir: str, working_dir: str, run_id: str = "") -> None:
        self.working_dir = working_dir
        self.runtime_dir = runtime_dir
        self.run_id = run_id
        self.endpoint = f"ipc://{os.path.join(runtime_dir, 'circus.ctl')}"
        self.pubsub = f"ipc://{os.path.join(runtime_dir, 'circus.pub')}"
        self.run_dir = run_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def start(self, watches: Sequence[Watch]) -> None:
        config = {
            "endpoint": self.endpoint,
            "pubsub": self.pubsub,
            "runtime_dir": self.runtime_dir,
            "watchers": [
                {
                    "name": w.name,
                    "cmd": sys.executable,
                    "args": list(w.args),
                    "numprocesses": w.count,
                    "priority": w.priority,
                    "graceful_timeout": w.stop_timeout,
                    "singleton": w.singleton,
                    # never give up restarting: a task that kills its worker must not take
                    # the pool down (the router fails that task after its retries instead)
                    "max_retry": -1,
                    "copy_env": True,
                    "env": {"PYTHONUNBUFFERED": "1", RUN_ENV: self.run_id},
                    # relative paths (in options, files a step writes) are the topology's
                    "working_dir": self.working_dir,
                    # one NodeLog for both streams (made in arbiter_main)
                    "log_file": w.log_file,
                    "log_max_size": w.log_max_size,
                }
                for w in watches
            ],
        }
        path = os.path.join(self.run_dir, "circus.json")
        with open(path, "w") as file:
            json.dump(config, file, indent=2)
        log_file = open(os.path.join(self.run_dir, "circus.log"), "ab")  # noqa: SIM115
        parent = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dsat.supervisor", path],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # SIGKILL when we die, even by SIGKILL: every node dies with it at once (they
            # die with the arbiter); what they held is in their journals. A graceful stop
            # would let them live on for seconds beside the next run.
            preexec_fn=lambda: die_with_parent(parent, signal.SIGKILL),
            start_new_session=True,  # Ctrl-C reaches us, and we decide the order of the stop
        )
        log_file.close()
        deadline = time.monotonic() + 30
        names = {w.name for w in watches}
        while True:
            if not self.alive():
                raise SupervisorError(
                    f"the circus arbiter exited at start; see {self.run_dir}/circus.log"
                )
            try:
                status = self.call("status", timeout=2.0)
                if set(status.get("statuses", {})) >= names:
                    return
            except SupervisorError:
                pass
            if time.monotonic() > deadline:
                raise SupervisorError("circus did not come up within 30 s")
            time.sleep(0.1)

    def client(self, timeout: float) -> Any:
        from circus.client import CircusClient

        if self._client is None or self._client.timeout != timeout:
            if self._client is not None:
                self._client.stop()
            self._client = CircusClient(endpoint=self.endpoint, timeout=timeout)
        return self._client

    def call(
        self, command: str, *, timeout: float = CONTROL_TIMEOUT, **properties: Any
    ) -> dict[str, Any]:
        """One circus command; retried while circus says it is busy with another one."""
        from circus.exc import CallError

        deadline = time.monotonic() + timeout
        while True:
            try:
                answer: dict[str, Any] = self.client(timeout).call(
                    {"command": command, "properties": properties}
                )
            except CallError as exc:
                raise SupervisorError(f"circus {command}: {exc}") from exc
            if answer.get("status") == "ok":
                return answer
            reason = str(answer.get("reason", answer))
            if "already running" in reason and time.monotonic() < deadline:
                time.sleep(0.05)  # circus runs one command at a time (its ConflictError)
                continue
            raise SupervisorError(f"circus {command}: {reason}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self, name: str) -> list[int]:
        return [int(p) for p in self.call("list", name=name).get("pids", [])]

    def count(self, name: str) -> int:
        return int(self.call("numprocesses", name=name)["numprocesses"])

    def scale(self, name: str, count: int) -> None:
        current = self.count(name)
        if count > current:
            self.call("incr", name=name, nb=count - current)
        elif count < current:
            self.call("decr", name=name, nb=current - count, waiting=False)

    def stop_watch(self, name: str) -> None:
        self.call("stop", name=name, waiting=True, timeout=120.0)

    def quit(self) -> None:
        if self.alive():
            with contextlib.suppress(SupervisorError):
                self.call("quit", waiting=True, timeout=60.0)
        if self.process is not None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()  # its workers die with it (PDEATHSIG)
                self.process.wait(timeout=10)
        if self._client is not None:
            self._client.stop()
            self._client = None


class NodeLog:
    """A node's log as circus writes it: its stdout and stderr in one file, rotated past
    ``max_bytes`` (LOG_BACKUPS older files kept), so that a function that prints a lot
    cannot fill the disk. Nothing it meets stops circus: a line it cannot write (a full
    disk) is dropped and counted, and the count written once it can write again."""

    def __init__(self, filename: str, max_bytes: int) -> None:
        self.filename = filename
        self.max_bytes = max_bytes
        self.file: Any = None
        self.size = 0
        self.dropped = 0
        self.why = ""

    def __call__(self, data: dict[str, Any]) -> None:
        text = data.get("data", b"")
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        try:
            if self.file is None:
                self.file = open(self.filename, "ab")  # noqa: SIM115
                self.size = self.file.tell()
            if self.dropped:
                note = f"[dsat: {self.dropped} bytes of output dropped: {self.why}]\n".encode()
                self._write(note)
                self.dropped = 0
            if self.size + len(text) > self.max_bytes and self.size:
                self._rotate()
            self._write(text)
        except OSError as exc:
            self.dropped += len(text)
            self.why = str(exc)
            self.close()

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()
        self.size += len(data)

    def _rotate(self) -> None:
        self.close()
        for index in range(LOG_BACKUPS, 0, -1):
            older = f"{self.filename}.{index - 1}" if index > 1 else self.filename
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, f"{self.filename}.{index}")
        self.file = open(self.filename, "ab")  # noqa: SIM115
        self.size = 0

    def open(self) -> None:
        """(circus asks streams to open and close; the file opens when written to.)"""

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def arbiter_main(config_path: str) -> int:
    """The child process: a circus arbiter in its own main thread, no multicast."""
    from circus.arbiter import Arbiter
    from circus.exc import ConflictError
    from circus.watcher import Watcher

    class BusyLockNoise(logging.Filter):
        """circus' own watcher check runs into our (long) ordered stop: not an error."""

        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], ConflictError))

    logging.getLogger("tornado.application").addFilter(BusyLockNoise())
    with open(config_path) as file:
        config = json.load(file)
    join_run(config["runtime_dir"])  # the lock's fd stays open as long as we live
    os.environ[SUPERVISOR_ENV] = str(os.getpid())  # workers die with us
    watchers = []
    for spec in config["watchers"]:
        spec = dict(spec)
        spec["env"] = {**spec["env"], SUPERVISOR_ENV: str(os.getpid())}
        spec["stream_backend"] = "thread"
        node_log = NodeLog(spec.pop("log_file"), spec.pop("log_max_size"))
        spec["stdout_stream"] = {"stream": node_log}
        spec["stderr_stream"] = {"stream": node_log}
        watchers.append(Watcher.load_from_config(spec))
    arbiter = Arbiter(
        watchers,
        config["endpoint"],
        config["pubsub"],
        check_delay=0.5,
        multicast_endpoint=None,  # circus' discovery would tell anyone where to find us
    )
    arbiter.start()
    return 0


# ---------------------------------------------------------------------------
# a satellite


def order_of_stop(topology: Topology, satellite: str) -> list[list[str]]:
    """Groups of watcher names, in the order they stop (upstream first, the tracker last)."""
    nodes = {n.name: n for n in topology.nodes(satellite)}
    sources = [n.name for n in nodes.values() if n.role is Role.SOURCE]
    groups: list[list[str]] = [sources, [ORCHESTER]] if sources else [[ORCHESTER]]
    seen: set[str] = set()
    frontier = [s.name for s in topology.steps.values() if s.kind is Kind.SOURCE or s.entry]
    ordered: list[str] = []
    while frontier:
        name = frontier.pop(0)
        if name in seen:
            continue
        seen.add(name)
        ordered.append(name)
        frontier.extend(link.target for link in topology.links_from(name))
    ordered.extend(name for name in topology.steps if name not in seen)
    for name in ordered:
        step = topology.steps[name]
        if step.kind is Kind.SOURCE or satellite not in step.satellites:
            continue
        if step.kind is Kind.POOL:
            groups.append([name])  # its workers finish and leave first,
            groups.append([topology.inbox(name)])  # then its queue hands on their results
        else:
            groups.append([name])
    groups.append([TRACKER])
    return [group for group in groups if group]


def watches_of(topology: Topology, satellite: str, run_dir: str) -> list[Watch]:
    """One watch per node of the satellite."""
    base = ("-m", "dsat.node", "--topology", topology.path, "--satellite", satellite)
    priorities = {
        Role.TRACKER: 50,
        Role.QUEUE: 40,
        Role.SINK: 40,
        Role.ROUTER: 40,
        Role.WORKER: 30,
        Role.ORCHESTER: 20,
        Role.SOURCE: 10,
    }
    watches = []
    for node in topology.nodes(satellite):
        args: tuple[str, ...] = (*base, "--node", node.name)
        stop_timeout = 15.0
        if node.role is Role.WORKER:
            args = (*args, "--wid", f"{node.name}.$(circus.wid)")
            stop_timeout = topology.steps[node.step].timeout + 5.0
        elif node.role is Role.SINK:
            stop_timeout = topology.steps[node.step].timeout + 15.0
        watches.append(
            Watch(
                name=node.name,
                args=args,
                count=node.min,
                priority=priorities[node.role],
                stop_timeout=stop_timeout,
                log_file=os.path.join(run_dir, f"{node.name}.log"),
                singleton=node.role is not Role.WORKER,
                log_max_size=topology.satellites[satellite].log_max_size,
            )
        )
    return watches


class StartFailures:
    """Reads what the nodes log (only what is new each time) for their start failures."""

    def __init__(self, run_dir: str, nodes: Sequence[str]) -> None:
        self.paths = {node: os.path.join(run_dir, f"{node}.log") for node in nodes}
        self.offsets: dict[str, int] = {}
        self.failures: collections.Counter[str] = collections.Counter()

    def check(self) -> None:
        """SupervisorError naming the node and why, once one failed START_FAILURES times."""
        for node, path in self.paths.items():
            offset = self.offsets.get(node, 0)
            try:
                with open(path, "rb") as log_file:
                    log_file.seek(offset)
                    data = log_file.read(1 << 20)
            except OSError:
                continue  # no log yet
            whole = data.rfind(b"\n") + 1  # a line still being written is read next time
            if not whole and len(data) == 1 << 20:
                whole = len(data)  # a megabyte without an end of line: not a start failure
            self.offsets[node] = offset + whole
            for line in data[:whole].decode("utf-8", "replace").splitlines():
                at = line.find(f"ERROR {CANNOT_START}")
                if at < 0:
                    continue
                self.failures[node] += 1
                if self.failures[node] >= START_FAILURES:
                    reason = line[at + len("ERROR ") + len(CANNOT_START) :]
                    raise SupervisorError(
                        f"{node} cannot start ({self.failures[node]} tries): {reason} (see {path})"
                    )


class Satellite:
    """``dsat run``: start a satellite, keep it running, stop it in order."""

    def __init__(self, topology: Topology, satellite: str) -> None:
        if satellite not in topology.satellites:
            raise SupervisorError(
                f"{topology.path}: no satellite {satellite!r} "
                f"(defined: {', '.join(topology.satellites)})"
            )
        self.topology = topology
        self.name = satellite
        self.runtime_dir = ensure_private_dir(topology.runtime_dir(satellite))
        # a second dsat run of this satellite stops here, before it touches anything
        self._lock = hold_satellite(self.runtime_dir, satellite, topology.path)
        try:
            for directory in (topology.state_dir(satellite), topology.log_dir(satellite)):
                os.makedirs(directory, exist_ok=True)
            self.run_dir = _new_run_dir(topology.log_dir(satellite))
        except OSError as exc:
            os.close(self._lock)
            raise SupervisorError(
                f"satellite {satellite}: cannot make the directory of its logs: {exc}"
            ) from exc
        self.run_id = secrets.token_hex(6)
        self.manager: ProcessManager = CircusManager(
            self.runtime_dir, self.run_dir, topology.directory, self.run_id
        )
        self.stop_requested = 0

    def wait_for_former_run(self) -> None:
        """Wait (a few seconds at most) until no process of a former run is left."""
        try:
            wait_for_former_run(self.runtime_dir)
        except SupervisorError:
            os.close(self._lock)
            raise

    def start(self) -> None:
        if self.topology.networked and self.topology.satellites[self.name].insecure:
            log.warning(
                "satellite %s links to other satellites WITHOUT encryption or keys "
                "(insecure = true): anyone who reaches its tcp ports can submit and read",
                self.name,
            )
        self.wait_for_former_run()
        watches = watches_of(self.topology, self.name, self.run_dir)
        self.manager.start(watches)

    def request_stop(self, signum: int = 0, frame: Any = None) -> None:
        self.stop_requested += 1

    def wait(self, duration: float | None = None) -> None:
        """Keep running (and scaling) until a stop is asked for, ``duration`` passes, or
        circus dies."""
        deadline = time.monotonic() + duration if duration else None
        scaler = Autoscaler(self.topology, self.name, self.manager)
        starts = StartFailures(self.run_dir, [node.name for node in self.topology.nodes(self.name)])
        last_check = 0.0
        try:
            while not self.stop_requested:
                if not self.manager.alive():
                    raise SupervisorError(f"the circus arbiter died; see {self.run_dir}/circus.log")
                now = time.monotonic()
                if deadline and now >= deadline:
                    return
                if now - last_check >= LOG_CHECK_EVERY:
                    starts.check()
                    last_check = now
                scaler.tick(now)
                time.sleep(0.2)
        finally:
            scaler.close()

    def stop(self) -> None:
        """Stop in order: nothing accepted is dropped; queued tasks stay in journals."""
        try:
            for group in order_of_stop(self.topology, self.name):
                for name in group:
                    if not self.manager.alive():
                        return
                    log.info("stopping %s", name)
                    self.manager.stop_watch(name)
        finally:
            self.manager.quit()
            os.close(self._lock)


class Autoscaler:
    """Each second, reads every pool's load from the tracker and applies desired_workers."""

    def __init__(self, topology: Topology, satellite: str, manager: ProcessManager) -> None:
        import zmq

        from dsat.client import connect
        from dsat.topology import TRACKER, get_connection

        self.topology = topology
        self.satellite = satellite
        self.manager = manager
        self.pools = [
            s
            for s in topology.hosted(satellite)
            if s.kind is Kind.POOL and s.workers.min < s.workers.max
        ]
        self.counts = {s.name: s.workers.min for s in self.pools}
        self.last_change = {s.name: -1e9 for s in self.pools}
        self.history: dict[str, collections.deque[Sample]] = {
            s.name: collections.deque(maxlen=int(s.autoscale.idle_after) + 30) for s in self.pools
        }
        self.next_look = 0.0
        self.client = (
            connect(topology, satellite=satellite, timeout=1.0, local=True) if self.pools else None
        )
        self._context = zmq.Context() if self.pools else None
        self.report: Any = None
        if self._context is not None:
            self.report = self._context.socket(zmq.DEALER)
            self.report.setsockopt(zmq.LINGER, 0)
            plan = get_connection(topology, TRACKER, satellite=satellite)
            self.report.connect(plan.socket("events").addresses[0])

    def tick(self, now: float) -> None:
        if not self.pools or now < self.next_look or self.client is None:
            return
        self.next_look = now + 1.0
        try:
            loads = self.client.load()
        except DsatError:
            return  # the tracker is restarting: look again next second
        for step in self.pools:
            load = loads.get(f"{self.satellite}/{step.name}.queue")
            if load is None or load.age > 3.0:
                continue
            history = self.history[step.name]
            history.append(Sample(now, load.workers, load.busy, load.idle, load.queued))
            current = self.counts[step.name]
            wanted = desired_workers(
                history,
                current,
                step.workers.min,
                step.workers.max,
                step.autoscale,
                now=now,
                last_change=self.last_change[step.name],
            )
            if wanted == current:
                continue
            reason = (
                f"busy {load.busy}, idle {load.idle}, queued {load.queued}, "
                f"{load.done_per_s:.1f} done/s"
            )
            try:
                self.manager.scale(step.name, wanted)
            except SupervisorError as exc:
                log.warning("autoscale %s: %d -> %d failed: %s", step.name, current, wanted, exc)
                continue
            log.info("autoscale %s: %d -> %d workers (%s)", step.name, current, wanted, reason)
            self.counts[step.name] = wanted
            self.last_change[step.name] = now
            self._publish(step.name, current, wanted, reason)

    def _publish(self, pool: str, before: int, after: int, reason: str) -> None:
        import zmq

        from dsat.message import NOBLOCK, control, send_frames

        body = {
            "pool": pool,
            "satellite": self.satellite,
            "before": before,
            "after": after,
            "reason": reason,
        }
        with contextlib.suppress(zmq.Again):
            send_frames(self.report, control("scale", body), NOBLOCK)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._context is not None:
            self.report.close(linger=0)
            self._context.term()


def _new_run_dir(state_dir: str) -> str:
    runs = os.path.join(state_dir, "runs")
    os.makedirs(runs, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(runs, stamp)
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(runs, f"{stamp}-{suffix}")
    os.makedirs(path)
    latest = os.path.join(runs, "latest")
    with contextlib.suppress(OSError):
        if os.path.islink(latest):
            os.unlink(latest)
        os.symlink(os.path.basename(path), latest)
    old = sorted(p for p in os.listdir(runs) if p != "latest")[:-KEEP_RUNS]
    for name in old:
        directory = os.path.join(runs, name)
        for entry in os.listdir(directory):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return path


if __name__ == "__main__":
    sys.exit(arbiter_main(sys.argv[1]))
