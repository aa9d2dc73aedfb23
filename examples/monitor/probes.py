"""Probes of the monitor example: each reads one side of the machine with psutil."""

from __future__ import annotations

import time
from typing import Any

import psutil


def tick(n: int) -> dict[str, Any]:
    """The clock's payload: which tick, and when."""
    return {"tick": n, "at": time.time()}


def cpu(tick: dict[str, Any]) -> dict[str, Any]:
    """CPU use since the previous call, and the 1-minute load average."""
    return {
        "tick": tick["tick"],
        "probe": "cpu",
        "percent": psutil.cpu_percent(interval=None),
        "load1": psutil.getloadavg()[0],
    }


def net(tick: dict[str, Any]) -> dict[str, Any]:
    """Bytes sent and received by every interface since boot."""
    counters = psutil.net_io_counters()
    return {
        "tick": tick["tick"],
        "probe": "net",
        "bytes_sent": counters.bytes_sent,
        "bytes_recv": counters.bytes_recv,
    }


def processes(tick: dict[str, Any]) -> dict[str, Any]:
    """How many processes run, and how many of them are running right now."""
    running = 0
    total = 0
    for process in psutil.process_iter(["status"]):
        total += 1
        if process.info["status"] == psutil.STATUS_RUNNING:
            running += 1
    return {"tick": tick["tick"], "probe": "procs", "total": total, "running": running}
