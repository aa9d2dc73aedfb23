"""A dsat satellite for the benchmark: the three-stage topology, run as users run it.

The topology is written into a fresh temporary directory under /tmp together
with a copy of :mod:`bench.stages`; its ``runtime_dir`` is a short directory
under /tmp too (ipc paths are limited to about 100 bytes), and its store is
``status.db`` next to it. ``dsat run`` is a subprocess, stopped with SIGTERM by
pid and waited for, whatever happened (``with Satellite(...) as satellite:``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final, Self

import psutil

import dsat
from bench import stages

TOPOLOGY: Final = """\
[satellite.local]
runtime_dir = "{runtime}"

[store]
url = "sqlite:///status.db"

[step.s1]
call = "stages:s1"
entry = true
{kind}

[step.s2]
call = "stages:s2"
{kind}

[step.s3]
call = "stages:s3"
{kind}

[[link]]
from = "s1"
to = "s2"

[[link]]
from = "s2"
to = "s3"
"""
ENTRY: Final = "s1"
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 90.0


KINDS: Final = ("pool", "sink")


def write_topology(directory: Path, *, workers: int = 1, kind: str = "pool") -> Path:
    """Write the topology and ``stages.py`` into ``directory``; return the topology's path.

    ``kind``: each step a ``pool`` of ``workers`` processes behind its queue (the
    default kind), or a ``sink`` (its router runs the function itself).
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: need one of {KINDS}")
    runtime = directory / "rt"
    path = directory / "topology.toml"
    step = f"workers = {workers}" if kind == "pool" else 'kind = "sink"'
    path.write_text(TOPOLOGY.format(runtime=runtime, kind=step))
    shutil.copyfile(stages.__file__, directory / "stages.py")
    return path


def rss(pid: int) -> int:
    """The resident set size of a process, in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


class Started:
    """What a ``with`` starts and always stops, even when starting it failed half-way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Satellite(Started):
    """``dsat run`` on the benchmark topology, in its own temporary directory."""

    def __init__(self, *, workers: int = 1, kind: str = "pool") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dsb-", dir="/tmp"))
        self.topology = write_topology(self.directory, workers=workers, kind=kind)
        self.output = self.directory / "run.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()

    def start(self) -> None:
        """Start ``dsat run`` and wait until its orchester and tracker answer."""
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dsat", "run", str(self.topology)],
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dsat run exited at start:\n{self.log()}")
            try:
                with self.client(timeout=1.0) as client:
                    client.ping(timeout=1.0)
                break
            except dsat.DsatError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dsat run not up in {START_TIMEOUT:g}s:\n{self.log()}"
                    ) from None
                time.sleep(0.1)
        self.pids |= set(self.tree())

    def client(self, timeout: float = 60.0) -> dsat.Client:
        return dsat.connect(self.topology, timeout=timeout)

    def tree(self) -> list[int]:
        """Every process below ``dsat run``."""
        if self.process is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pid_of(self, node: str) -> int:
        """The pid of one node's process (``s1.queue``, ``tracker``...)."""
        for pid in self.tree():
            try:
                cmdline = psutil.Process(pid).cmdline()
            except psutil.NoSuchProcess:
                continue
            named = "--node" in cmdline and cmdline[cmdline.index("--node") + 1] == node
            if named and "dsat.node" in cmdline:
                return pid
        raise RuntimeError(f"no process for node {node} below dsat run")

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) each node has used so far, by role: ``tracker``,
        ``orchester``, ``queues`` and ``workers`` (summed), and ``total``. A sink step's
        router counts among the queues (it has no workers)."""
        used = dict.fromkeys(("tracker", "orchester", "queues", "workers", "total"), 0.0)
        for pid in self.tree():
            try:
                process = psutil.Process(pid)
                cmdline = process.cmdline()
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            if "dsat.node" not in cmdline or "--node" not in cmdline:
                continue  # the supervisor: not part of the pipeline's work
            node = cmdline[cmdline.index("--node") + 1]
            role = node if node in ("tracker", "orchester") else "queues"
            if "--wid" in cmdline:
                role = "workers"
            seconds = times.user + times.system
            used[role] += seconds
            used["total"] += seconds
        return used

    @property
    def store(self) -> Path:
        return self.directory / "status.db"

    def read_store(self) -> sqlite3.Connection:
        """A read-only connection to the store (WAL: it never blocks the tracker)."""
        return sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=30)

    def log(self) -> str:
        try:
            return self.output.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM to ``dsat run``, by pid, and wait; SIGKILL what is left after a timeout."""
        if self.process is None:
            return None
        self.pids |= set(self.tree())
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"bench: dsat run did not stop in {STOP_TIMEOUT:g}s; killing it", flush=True)
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL every process this satellite had, by pid."""
        self.pids |= set(self.tree())
        pids = [*self.pids, *([self.process.pid] if self.process else [])]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def close(self) -> None:
        """Stop it (always) and remove its directory."""
        try:
            self.stop()
        finally:
            survivors = [p for p in self.pids if psutil.pid_exists(p) and _alive(p)]
            if survivors:
                self.kill()
            shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
