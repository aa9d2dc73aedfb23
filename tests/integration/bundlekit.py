"""What the bundle tests share: a one-step topology ("double"), its task messages, and
one node of it started as its own process (``python -m dsat.node``), stopped by pid."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsat.message import Envelope, dumps, encode

TOPOLOGY = """
[satellite.local]
runtime_dir = "{runtime}"

[store]
url = "sqlite:///status.db"

[step.double]
call = "steps:double"
entry = true
"""

STEPS = """
def double(n):
    if n < 0:
        raise ValueError("negative")
    return n * 2
"""


def write_topology(directory: Path, runtime: Path) -> Path:
    """The topology and its steps module in ``directory``; ipc sockets in ``runtime``."""
    (directory / "steps.py").write_text(STEPS)
    path = directory / "topology.toml"
    path.write_text(TOPOLOGY.format(runtime=runtime))
    return path


def task(n: int, value: Any = 1) -> list[bytes]:
    """The frames of task ``task{n:04d}`` for step double, with ``value`` as its payload."""
    envelope = Envelope(task_id=f"task{n:04d}", job_id="j", seq=1, step="", next="double")
    return encode(envelope, dumps(value))


@contextlib.contextmanager
def node_process(topology: Path, node: str, *, wid: str = "") -> Iterator[None]:
    """One node of the topology running as its own process while the block runs."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsat.node",
            "--topology",
            str(topology),
            "--satellite",
            "local",
            "--node",
            node,
            *(("--wid", wid) if wid else ()),
        ],
        cwd=topology.parent,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
