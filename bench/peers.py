"""Celery with Redis, what users pick instead: installed if missing, started, measured, stopped.

The suite brings what it needs: ``pip install`` of :data:`REQUIREMENTS` into this Python
when they do not import, and ``apt-get install -y redis-server`` when
``redis-server`` is not on PATH (as root). It starts redis-server on 127.0.0.1
on a free port with no persistence, and one Celery worker (prefork,
concurrency 2) as a subprocess; both are stopped by pid. When something cannot
be installed or started, :func:`unavailable` says why and the part is skipped.

- throughput: N chains ``chain(s1.s(p), s2.s(), s3.s())`` submitted, then every
  result fetched; N / (the last result fetched - the first submit);
- latency: one chain at a time, ``apply_async().get()``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import psutil

from bench.satellite import Started
from bench.workload import LatencyRun, Run, is_right, one_at_a_time, payload

ROOT: Final = Path(__file__).resolve().parent.parent  # bench's parent: the worker imports bench
APP_MODULE: Final = "bench.celery_app"
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
INSTALL_TIMEOUT: Final = 900.0
# what the Celery part installs when missing (the same as pyproject's "bench" extra)
REQUIREMENTS: Final = ("celery[redis]>=5.3", "redis>=5.0")


def _run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit code {result.returncode}"


def ensure_celery() -> str:
    """Import celery and redis, pip-installing them first if needed; "" or why not."""
    try:
        importlib.import_module("celery")
        importlib.import_module("redis")
        return ""
    except ImportError:
        pass
    print("bench: installing celery and redis with pip...", flush=True)
    result = _run([sys.executable, "-m", "pip", "install", "--quiet", *REQUIREMENTS])
    if result.returncode != 0:
        return f"pip install {' '.join(REQUIREMENTS)} failed: {_tail(result)}"
    importlib.invalidate_caches()
    try:
        importlib.import_module("celery")
        importlib.import_module("redis")
    except ImportError as exc:
        return f"celery or redis does not import after pip install: {exc}"
    return ""


def ensure_redis_server() -> str:
    """Find redis-server, apt-get installing it first if needed (as root); "" or why not."""
    if shutil.which("redis-server"):
        return ""
    if shutil.which("apt-get") is None:
        return "redis-server is not on PATH and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "redis-server is not on PATH and installing it needs root (apt-get)"
    print("bench: installing redis-server with apt-get...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
    result = _run(install, env=env)
    if result.returncode != 0:  # perhaps an old or missing package list
        _run(["apt-get", "update"], env=env)
        result = _run(install, env=env)
    if result.returncode != 0 or not shutil.which("redis-server"):
        return f"apt-get install redis-server failed: {_tail(result)}"
    return ""


def unavailable() -> str:
    """Why Celery with Redis cannot be measured here, or "" when it can."""
    try:
        return ensure_celery() or ensure_redis_server()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot install celery/redis: {exc}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], *, first: int = signal.SIGTERM) -> None:
    """Signal a process we started, wait; SIGKILL it and its children (by pid) after a timeout."""
    if process.poll() is None:
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(first)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class CeleryPeer(Started):
    """A private redis-server and one Celery worker, for as long as the ``with`` lasts."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bench-celery-", dir="/tmp"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.redis: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.app: ModuleType | None = None

    def start(self) -> None:
        with open(self.directory / "redis.log", "ab") as out:
            self.redis = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        import redis  # installed by ensure_celery, so imported only here

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log('redis')}") from None
                time.sleep(0.05)
        client.close()
        os.environ["BENCH_REDIS_URL"] = self.url  # read by bench.celery_app, here and in the worker
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env = {**os.environ, "PYTHONPATH": path}
        with open(self.directory / "worker.log", "ab") as out:
            self.worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    APP_MODULE,
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    "2",
                    "--loglevel",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        # the app reads the URL when imported: a Celery started again (after a failed
        # run) needs the module made afresh, or it would talk to the Redis now gone
        module = sys.modules.get(APP_MODULE)
        self.app = importlib.reload(module) if module else importlib.import_module(APP_MODULE)
        try:
            result = self.chain(payload(0)).get(timeout=START_TIMEOUT)
        except Exception as exc:  # celery raises many kinds; any of them means "not up"
            raise RuntimeError(
                f"the celery worker did not answer: {exc}\n{self.log('worker')}"
            ) from exc
        if not is_right(0, result):
            raise RuntimeError(f"the celery worker answered {result!r}")

    def chain(self, item: dict[str, Any]) -> Any:
        """Submit one task through the three stages; its AsyncResult."""
        from celery import chain

        assert self.app is not None
        app = self.app
        return chain(app.s1.s(item), app.s2.s(), app.s3.s()).apply_async()

    def log(self, name: str) -> str:
        try:
            return (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the worker (warm shutdown), then redis-server, by pid; remove the directory."""
        try:
            if self.worker is not None:
                _stop(self.worker)
            if self.redis is not None:
                _stop(self.redis)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def throughput(peer: CeleryPeer, count: int) -> Run:
    """Submit ``count`` chains, then fetch every result."""
    first = time.monotonic()
    results = [peer.chain(payload(i)) for i in range(count)]
    values = [result.get(timeout=max(60.0, count / 10)) for result in results]
    seconds = time.monotonic() - first
    mismatches = sum(not is_right(i, value) for i, value in enumerate(values))
    for result in results:
        result.forget()
    return Run(count, seconds, mismatches)


def latency(peer: CeleryPeer, count: int) -> LatencyRun:
    """One chain in flight at a time: submit, get its result."""
    return one_at_a_time(count, lambda i: peer.chain(payload(i)).get(timeout=30))
