"""Figures: the values of every run, their median/min/max, ratios, the table and the JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

# Which way is better, per unit: tasks/s and events/s up, times and memory down.
HIGHER_IS_BETTER = frozenset({"tasks/s", "events/s"})


@dataclass
class Figure:
    """One measured quantity: a value per run, and what it is compared to."""

    name: str  # "dsat tasks/s"
    unit: str  # "tasks/s", "ms", "MB", "x", "s"
    runs: list[float] = field(default_factory=list)
    # names of the figures this one is shown as a ratio to, in the same run
    vs_ceiling: str = ""
    vs_celery: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def low(self) -> float:
        return min(self.runs)

    @property
    def high(self) -> float:
        return max(self.runs)


@dataclass
class Part:
    """One part of the suite as it ran: how long it took, what it checked, notes."""

    name: str
    seconds: float = 0.0
    checked: int = 0  # results (or tasks) checked
    mismatches: int = 0  # wrong or missing results, anomalies
    skipped: str = ""  # why it did not run
    notes: list[str] = field(default_factory=list)


class Report:
    """Everything one command measured: figures in the order they were added, and parts."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.parts: dict[str, Part] = {}
        self.started = time.time()

    def figure(self, name: str, unit: str, *, vs_ceiling: str = "", vs_celery: str = "") -> Figure:
        """The figure of this name, made on first use."""
        if name not in self.figures:
            self.figures[name] = Figure(name, unit, vs_ceiling=vs_ceiling, vs_celery=vs_celery)
        return self.figures[name]

    def add(
        self, name: str, unit: str, value: float, *, vs_ceiling: str = "", vs_celery: str = ""
    ) -> None:
        """Record one run's value of a figure."""
        self.figure(name, unit, vs_ceiling=vs_ceiling, vs_celery=vs_celery).runs.append(value)

    def part(self, name: str) -> Part:
        if name not in self.parts:
            self.parts[name] = Part(name)
        return self.parts[name]

    @property
    def mismatches(self) -> int:
        return sum(p.mismatches for p in self.parts.values())

    def ratio(self, figure: Figure, other_name: str) -> float | None:
        """The median of ``figure`` over the median of another figure, if both were measured."""
        other = self.figures.get(other_name)
        if not other_name or other is None or not other.runs or not figure.runs:
            return None
        if other.median == 0:
            return None
        return figure.median / other.median

    # -- output

    def table(self) -> str:
        """The figures as a fixed-width table."""
        shown = [f for f in self.figures.values() if f.runs]
        width = max([34, *(len(f"{f.name} ({f.unit})") for f in shown)])
        head = (
            f"{'figure':<{width}} {'median':>10} {'min':>10} {'max':>10} "
            f"{'vs ceiling':>11} {'vs celery':>10}"
        )
        lines = [head, "-" * len(head)]
        for figure in shown:
            vs_ceiling = self.ratio(figure, figure.vs_ceiling)
            vs_celery = self.ratio(figure, figure.vs_celery)
            lines.append(
                f"{figure.name + ' (' + figure.unit + ')':<{width}} {number(figure.median):>10} "
                f"{number(figure.low):>10} {number(figure.high):>10} "
                f"{ratio_text(vs_ceiling):>11} {ratio_text(vs_celery):>10}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """Per part: how long it took, what it checked, mismatches, why it was skipped."""
        lines = []
        for part in self.parts.values():
            if part.skipped:
                lines.append(f"{part.name:<9} skipped: {part.skipped}")
                continue
            lines.append(
                f"{part.name:<9} {part.seconds:7.1f} s, {part.checked} checked, "
                f"{part.mismatches} mismatches"
            )
            lines.extend(f"{'':<9} {note}" for note in part.notes)
        by_part = ", ".join(
            f"{p.name} {p.mismatches}" for p in self.parts.values() if not p.skipped
        )
        lines.append(f"mismatches: {self.mismatches} ({by_part})")
        return "\n".join(lines)

    def as_json(self, machine: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        figures = {}
        for figure in self.figures.values():
            if not figure.runs:
                continue
            figures[figure.name] = {
                "unit": figure.unit,
                "runs": figure.runs,
                "median": figure.median,
                "min": figure.low,
                "max": figure.high,
                "vs_ceiling": self.ratio(figure, figure.vs_ceiling),
                "vs_celery": self.ratio(figure, figure.vs_celery),
            }
        return {
            "started": self.started,
            "machine": machine,
            "config": config,
            "figures": figures,
            "parts": {
                p.name: {
                    "seconds": p.seconds,
                    "checked": p.checked,
                    "mismatches": p.mismatches,
                    "skipped": p.skipped,
                    "notes": p.notes,
                }
                for p in self.parts.values()
            },
            "mismatches": self.mismatches,
        }

    def write_json(self, path: Path, machine: dict[str, Any], config: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(machine, config), indent=2) + "\n")


def number(value: float) -> str:
    """A figure's value, with as many digits as it deserves."""
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}".replace(",", "")
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio_text(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}x"
    if value >= 10:
        return f"{value:.1f}x"
    if value >= 0.1:
        return f"{value:.2f}x"
    return f"{value:.3f}x"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of some values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor()
    memory = 0
    try:
        with open("/proc/meminfo") as meminfo:
            memory = int(meminfo.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"{info['os']}; Python {info['python']}, pyzmq {info['pyzmq']}, libzmq {info['libzmq']}"
    )
