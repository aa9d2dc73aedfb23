"""Conditions of the monitor example's links."""

from __future__ import annotations

from typing import Any


def cpu_busy(reading: dict[str, Any]) -> bool:
    """Alert when the CPU is more than 80% busy."""
    return float(reading["percent"]) > 80.0
