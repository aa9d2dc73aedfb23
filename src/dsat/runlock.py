"""One run of a satellite at a time: the locks that keep a second one out.

Both live in the satellite's private runtime directory, which is derived from the
real path of the topology file: every path to one file (a symlink included) is
the same satellite.

- ``satellite.lock``, exclusive, held by ``dsat run`` while it lives: a second
  ``dsat run`` of the same satellite refuses to start.
- ``nodes.lock``, shared, held by the supervisor and by every node of a run for
  as long as each lives. A ``dsat run`` starts its processes only once it could
  take it exclusively: no process of a former run (whose ``dsat run`` was killed)
  is left to take work from the new one, or to write its journals.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Final

from dsat.errors import SupervisorError

SATELLITE_LOCK: Final = "satellite.lock"
NODES_LOCK: Final = "nodes.lock"
FORMER_RUN_GRACE: Final = 10.0  # seconds a new run waits for a former run's processes
JOIN_TIMEOUT: Final = 5.0  # seconds a node waits while a new run checks for a former one


def hold_satellite(runtime_dir: str, name: str, topology: str) -> int:
    """Take the satellite's lock for this ``dsat run`` (its fd: keep it open)."""
    path = os.path.join(runtime_dir, SATELLITE_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pids = holders(path)
        raise SupervisorError(
            f"satellite {name} of {topology} is already running"
            + (f" (dsat run, pid {', '.join(map(str, pids))})" if pids else "")
            + f"; stop it first (lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def wait_for_former_run(runtime_dir: str, timeout: float = FORMER_RUN_GRACE) -> None:
    """Wait until no process of a former run of the satellite is alive.

    Raises:
        SupervisorError: some still live after ``timeout``; it names their pids.
    """
    path = os.path.join(runtime_dir, NODES_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pids = ", ".join(map(str, holders(path))) or "?"
                    raise SupervisorError(
                        f"processes of a former run of this satellite are still alive after "
                        f"{timeout:g}s (pids {pids}); they hold {path}: stop them (kill PID) "
                        "and start again"
                    ) from None
                time.sleep(0.05)
    finally:
        os.close(fd)  # and with it the exclusive lock: the new run's processes join


def join_run(runtime_dir: str, timeout: float = JOIN_TIMEOUT) -> int:
    """Hold the run's shared lock for the life of this process (its fd: keep it open).

    Raises:
        SupervisorError: a new run holds it (it is checking that former ones are gone).
    """
    path = os.path.join(runtime_dir, NODES_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise SupervisorError(
                    f"a new run of this satellite holds {path}: this process belongs to a "
                    "former run, and does not start"
                ) from None
            time.sleep(0.05)


def holders(path: str) -> list[int]:
    """The pids holding a lock on a file (Linux /proc/locks; [] elsewhere)."""
    try:
        info = os.stat(path)
        with open("/proc/locks") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" ("->" marks a waiter)
        if "->" in fields:
            continue
        if len(fields) >= 6 and fields[5] == wanted and fields[4].isdigit():
            pids.add(int(fields[4]))
    return sorted(pids)
