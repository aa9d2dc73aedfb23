"""Fixtures shared by every test: real ZeroMQ contexts, short ipc dirs, waits that end."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq


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
