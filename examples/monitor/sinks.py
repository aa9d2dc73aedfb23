"""Sinks of the monitor example: one CSV row per probe reading, and an alert log."""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import dsat


def csv_row(reading: dict[str, Any], task: dsat.Task) -> None:
    """Append the reading as `time, tick, probe, name, value` rows to the CSV file."""
    path = task.options.get("path", "metrics.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(["time", "tick", "probe", "name", "value", "task_id"])
        now = f"{time.time():.3f}"
        for name, value in reading.items():
            if name not in ("tick", "probe"):
                writer.writerow([now, reading["tick"], reading["probe"], name, value, task.task_id])


def alert(reading: dict[str, Any], task: dsat.Task) -> None:
    """Write one line per busy-CPU alert."""
    path = task.options.get("path", "alerts.log")
    with open(path, "a") as file:
        file.write(f"{time.ctime()}: cpu {reading['percent']}% (tick {reading['tick']})\n")
