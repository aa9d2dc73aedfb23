"""Fixtures shared by every test: real ZeroMQ contexts, short ipc dirs, waits that end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

import dsat

# ---------------------------------------------------------------------------
# no test runs for ever: one that hangs fails, and the suite goes on

TEST_LIMIT = 240.0  # seconds; the longest test takes well under a minute


class TestTimeout(Exception):
    """A test ran past its limit (raised in the main thread, wherever it was blocked)."""

    __test__ = False  # not a test class, for pytest


@contextlib.contextmanager
def hard_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TestTimeout in the main thread once ``seconds`` have passed.

    A watchdog thread signals the main thread (SIGUSR1); the signal interrupts
    a blocking call (a ZeroMQ send or receive, a sleep, a wait) and the handler
    raises, so the test fails and its fixtures still clean up what it started.
    """
    main = threading.main_thread().ident
    assert main is not None
    assert threading.get_ident() == main, "signals reach the main thread only"

    def on_signal(signum: int, frame: object) -> None:
        raise TestTimeout(f"{what} ran past its limit of {seconds:g}s")

    previous = signal.signal(signal.SIGUSR1, on_signal)
    watchdog = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGUSR1))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    with hard_limit(TEST_LIMIT, request.node.nodeid):
        yield


class _ClosingContext(zmq.Context[zmq.Socket[bytes]]):
    """A context that remembers its sockets, so the fixture closes every one."""

    made: list[zmq.Socket[bytes]]  # declared here: pyzmq treats unknown attributes as options

    def __init__(self) -> None:
        super().__init__()
        self.made = []

    def socket(self, socket_type: int, **kwargs: Any) -> zmq.Socket[bytes]:  # type: ignore[override]
        made = super().socket(socket_type, **kwargs)
        self.made.append(made)
        return made


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx = _ClosingContext()
    yield ctx
    for socket in ctx.made:
        socket.close(linger=0)  # linger=0: a test's unsent messages must not block teardown
    ctx.term()


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short private directory for ipc:// sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dsat-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        time.sleep(interval)


# ---------------------------------------------------------------------------
# a real satellite, run as users run it: `python -m dsat run topology.toml`


class RunningSatellite:
    """A `dsat run` subprocess on a topology written in a temporary directory."""

    def __init__(
        self,
        directory: Path,
        topology: Path,
        args: tuple[str, ...] = (),
        *,
        satellite: str = "",
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.topology = topology
        self.satellite = satellite
        self.prefix = prefix  # e.g. ("ip", "netns", "exec", NAME): run it in a namespace
        self.output = directory / (f"run-{satellite}.out" if satellite else "run.out")
        self.args = (*args, "--satellite", satellite) if satellite else args
        self.process: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()

    def launch(self) -> subprocess.Popen[bytes]:
        """Start `dsat run`, its output to `self.output`, without waiting for anything."""
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "dsat", "run", str(self.topology), *self.args],
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self.process

    def start(self, timeout: float = 30.0) -> RunningSatellite:
        """Start `dsat run` and wait until its tracker answers."""
        self.process = self.launch()
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"dsat run exited:\n{self.output.read_text()}"
            try:
                with self.client(timeout=1.0) as client:
                    client.ping(timeout=1.0)
                break
            except dsat.DsatError:
                assert time.monotonic() < deadline, f"not up in {timeout}s:\n{self.log()}"
                time.sleep(0.1)
        self.known_pids |= set(self.tree())
        return self

    def client(self, timeout: float = 10.0) -> dsat.Client:
        return dsat.connect(self.topology, satellite=self.satellite, timeout=timeout)

    def tree(self) -> list[int]:
        """Every process below `dsat run` (the arbiter, routers, workers, tracker)."""
        if self.process is None:
            return []
        try:
            parent = psutil.Process(self.process.pid)
            return [p.pid for p in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids_of(self, node: str) -> list[int]:
        """The pids of one node's processes (`s1`, `s1.queue`, `tracker`...)."""
        found = []
        for pid in self.tree():
            try:
                cmdline = psutil.Process(pid).cmdline()
            except psutil.NoSuchProcess:
                continue
            if "dsat.node" in cmdline and cmdline[cmdline.index("--node") + 1] == node:
                found.append(pid)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        """Signal `dsat run` and wait for it; return its exit code."""
        assert self.process is not None
        self.known_pids |= set(self.tree())
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"dsat run did not stop in {timeout}s:\n{self.log()}") from None

    def survivors(self) -> list[int]:
        """Processes this satellite ever had that still run (zombies do not count)."""
        alive = []
        for pid in self.known_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_all(self) -> None:
        """Last resort of a fixture: SIGKILL every process we know, by pid."""
        self.known_pids |= set(self.tree())
        for pid in [*self.known_pids, *([self.process.pid] if self.process else [])]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def log(self, node: str | None = None) -> str:
        if node is None:
            return self.output.read_text(errors="replace") if self.output.exists() else ""
        runs = self.topology.parent / ".dsat"
        logs = sorted(runs.glob(f"{self.satellite or '*'}/runs/latest/{node}.log"))
        return logs[-1].read_text(errors="replace") if logs else ""


@pytest.fixture
def satellite(tmp_path: Path) -> Iterator[Callable[..., RunningSatellite]]:
    """Write a topology (and its modules) and start `dsat run` on it; stopped at teardown.

    `satellite(topology_text, modules={"fns": "def f(x): ..."}, start=True)`; the text
    may use RUNTIME for a short private ipc directory.
    """
    started: list[RunningSatellite] = []
    runtime_dirs: list[str] = []

    def make(
        text: str,
        modules: dict[str, str] | None = None,
        *,
        start: bool = True,
        args: tuple[str, ...] = (),
    ) -> RunningSatellite:
        runtime = tempfile.mkdtemp(prefix="dsat-", dir="/tmp")
        runtime_dirs.append(runtime)
        for name, code in (modules or {}).items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
        path = tmp_path / "topology.toml"
        path.write_text(textwrap.dedent(text).replace("RUNTIME", runtime))
        running = RunningSatellite(tmp_path, path, args)
        started.append(running)
        return running.start() if start else running

    yield make
    for running in started:
        if running.process is not None and running.process.poll() is None:
            with contextlib.suppress(AssertionError):
                running.stop()
        running.kill_all()
    for runtime in runtime_dirs:
        shutil.rmtree(runtime, ignore_errors=True)


# ---------------------------------------------------------------------------
# figures: what a scenario measured, on one line the CI log keeps


@dataclass
class Figures:
    """The figures of one scenario, printed on one line that the CI log keeps."""

    name: str
    submitted: int = 0
    happy_end: int = 0
    failure: int = 0
    lost: int = 0
    duplicates: int = 0
    kills: int = 0
    time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        text = (
            f"FIGURES {self.name}: submitted={self.submitted} happy_end={self.happy_end} "
            f"failure={self.failure} lost={self.lost} duplicates={self.duplicates} "
            f"kills={self.kills} time={self.time:.1f}s"
        )
        for key, value in self.extra.items():
            text += f" {key}={value:.1f}" if isinstance(value, float) else f" {key}={value}"
        return text


def print_figures(capsys: pytest.CaptureFixture[str], figures: Figures) -> None:
    """Print past pytest's capture, so the line is in the log of a run that passes."""
    with capsys.disabled():
        print(f"\n{figures.line()}", flush=True)
