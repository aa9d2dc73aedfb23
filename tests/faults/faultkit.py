"""What every fault scenario shares: topologies, reading the store, figures, paced killing.

Not a conftest.py: the root `tests/conftest.py` is imported as the module `conftest`
(`from conftest import RunningSatellite`), and a second conftest.py would take its name.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil

from conftest import Figures, RunningSatellite, wait_for
from dsat.store import open_store

TERMINAL = ("HAPPY_END", "FAILURE")

HEADER = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"
"""

# three pools of two workers: s1 -> s2 -> s3
THREE_STAGES = (
    HEADER
    + """
[step.s1]
call = "stages:one"
entry = true
workers = 2
retries = {retries}
backoff = "{backoff}"

[step.s2]
call = "stages:two"
workers = 2
retries = {retries}
backoff = "{backoff}"
options = {{ pause = {pause} }}

[step.s3]
call = "stages:three"
workers = 2
retries = {retries}
backoff = "{backoff}"

[[link]]
from = "s1"
to = "s2"

[[link]]
from = "s2"
to = "s3"
"""
)

STAGES = """
import time

def one(p):
    return {"n": p["n"], "a": p["n"] + 1}

def two(p, task):
    time.sleep(task.options["pause"])
    return {**p, "b": p["a"] * 2}

def three(p):
    return {**p, "c": p["b"] + 3}
"""


def three_stages(*, retries: int = 3, backoff: str = "20ms", pause: float = 0.0) -> str:
    """The pipeline's topology; s2 sleeps `pause` seconds per task."""
    return THREE_STAGES.format(retries=retries, backoff=backoff, pause=pause)


def stages_result(n: int) -> dict[str, int]:
    """What s1 -> s2 -> s3 make of {"n": n}."""
    return {"n": n, "a": n + 1, "b": (n + 1) * 2, "c": (n + 1) * 2 + 3}


# ---------------------------------------------------------------------------
# the store, read as a file (the tracker may be dead, or the satellite stopped)


def store_path(running: RunningSatellite) -> Path:
    return running.directory / "status.db"


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


def state_counts(running: RunningSatellite, job_id: str) -> collections.Counter[str]:
    """How many tasks of a job are in each state, per the store (while it runs, too)."""
    path = store_path(running)
    if not path.exists():
        return collections.Counter()
    try:
        with _read_only(path) as db:
            rows = db.execute(
                "SELECT state, count(*) FROM tasks WHERE job_id = ? GROUP BY state", (job_id,)
            ).fetchall()
    except sqlite3.OperationalError:  # the tracker is creating it, or checkpointing
        return collections.Counter()
    return collections.Counter({state: n for state, n in rows})


def ended(running: RunningSatellite, job_id: str) -> int:
    counts = state_counts(running, job_id)
    return sum(counts[s] for s in TERMINAL)


def wait_until_ended(
    running: RunningSatellite, job_id: str, count: int, timeout: float
) -> collections.Counter[str]:
    """Poll the store until `count` tasks of the job are HAPPY_END or FAILURE."""
    deadline = time.monotonic() + timeout
    while True:
        counts = state_counts(running, job_id)
        if sum(counts[s] for s in TERMINAL) >= count:
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{job_id}: {sum(counts[s] for s in TERMINAL)} of {count} tasks ended within "
                f"{timeout:g}s; states: {dict(counts)}\n{log_tail(running)}"
            )
        time.sleep(0.1)


@dataclass
class Outcome:
    """Everything the store says about a set of tasks."""

    states: dict[str, str]  # task_id -> state in the tasks table ("" when absent)
    anomalies: dict[str, int]
    errors: dict[str, str]
    results: dict[str, Any]
    events: dict[str, list[dict[str, Any]]]  # task_id -> its events, by tseq

    def terminal_events(self, task_id: str) -> list[str]:
        """The task's unflagged HAPPY_END / FAILURE events."""
        return [
            e["event"] for e in self.events[task_id] if e["event"] in TERMINAL and not e["flag"]
        ]

    def starts(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events[task_id] if e["event"] == "START" and not e["flag"]]

    def hops(self, task_id: str) -> set[tuple[int, int]]:
        """The (branch, seq) of each hop the task started at."""
        return {(e["branch"], e["seq"]) for e in self.starts(task_id)}

    def extra_starts(self, task_id: str) -> int:
        """START events beyond one per hop: how often a function ran again."""
        return len(self.starts(task_id)) - len(self.hops(task_id))

    def history(self, task_id: str) -> str:
        """One line per event, for failure messages."""
        return "\n".join(
            f"    {e['tseq']:>3} {e['event']:<9} {e['step']:<4} b={e['branch']} seq={e['seq']} "
            f"att={e['attempt']} pid={e['pid']} at={e['at']:.3f} {e['flag']} "
            f"{e['detail'].get('error', '')}"
            for e in self.events[task_id]
        )


def read_outcome(running: RunningSatellite, task_ids: Sequence[str]) -> Outcome:
    """The tasks' rows, events and results from the store file."""
    wanted = set(task_ids)
    states: dict[str, str] = dict.fromkeys(task_ids, "")
    anomalies: dict[str, int] = dict.fromkeys(task_ids, 0)
    errors: dict[str, str] = dict.fromkeys(task_ids, "")
    results: dict[str, Any] = {}
    events: dict[str, list[dict[str, Any]]] = {t: [] for t in task_ids}
    with _read_only(store_path(running)) as db:
        for task_id, state, anomaly, error in db.execute(
            "SELECT task_id, state, anomalies, error FROM tasks"
        ):
            if task_id in wanted:
                states[task_id] = state
                anomalies[task_id] = anomaly
                errors[task_id] = error
        for task_id, serialization, data in db.execute(
            "SELECT task_id, serialization, data FROM results"
        ):
            if task_id in wanted:
                assert serialization == "msgpack"
                results[task_id] = msgpack.unpackb(data, raw=False)
    store = open_store(f"sqlite:///{store_path(running)}", readonly=True)
    try:
        for task_id in task_ids:
            events[task_id] = [
                {
                    "tseq": e.tseq,
                    "branch": e.branch,
                    "seq": e.seq,
                    "attempt": e.attempt,
                    "event": e.event,
                    "step": e.step,
                    "pid": e.pid,
                    "at": e.at,
                    "detail": e.detail,
                    "flag": e.flag,
                }
                for e in store.events(task_id)
            ]
    finally:
        store.close()
    return Outcome(states, anomalies, errors, results, events)


# ---------------------------------------------------------------------------
# figures


def tally(figures: Figures, outcome: Outcome) -> None:
    """Fill happy_end, failure, lost and duplicates from what the store says."""
    states = collections.Counter(outcome.states.values())
    figures.submitted = len(outcome.states)
    figures.happy_end = states["HAPPY_END"]
    figures.failure = states["FAILURE"]
    figures.lost = figures.submitted - figures.happy_end - figures.failure
    figures.duplicates = sum(outcome.extra_starts(t) for t in outcome.states)


def not_ended(outcome: Outcome, limit: int = 5) -> str:
    """The first tasks that did not end, with their histories: for failure messages."""
    stuck = [t for t, s in outcome.states.items() if s not in TERMINAL][:limit]
    return "\n".join(f"  {t}: state={outcome.states[t]!r}\n{outcome.history(t)}" for t in stuck)


# ---------------------------------------------------------------------------
# processes


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal one process, by pid; False when it was already gone."""
    if not alive(pid):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def new_pid(running: RunningSatellite, node: str, old: int, timeout: float = 30.0) -> int:
    """Wait for circus to replace a node's process; return the new pid."""

    def replaced() -> int:
        pids = [p for p in running.pids_of(node) if p != old and alive(p)]
        return pids[0] if len(pids) == 1 else 0

    return int(wait_for(replaced, timeout=timeout, interval=0.05))


def kill_workers_until(
    running: RunningSatellite,
    steps: Sequence[str],
    done: Callable[[], bool],
    *,
    every: float,
    timeout: float,
    rng: random.Random,
) -> int:
    """SIGKILL a worker of `steps` picked at random every `every` seconds until `done()`.

    Returns how many workers were killed (signals sent to a live worker).
    """
    kills = 0
    started = time.monotonic()
    next_kill = started + every
    next_check = started
    while True:
        now = time.monotonic()
        if now >= next_check:
            if done():
                return kills
            next_check = now + 0.2
        assert now - started < timeout, f"not done within {timeout:g}s ({kills} kills)"
        if now >= next_kill:
            pids = [pid for step in steps for pid in running.pids_of(step) if alive(pid)]
            if pids and kill(rng.choice(pids)):
                kills += 1
            next_kill += every
        # pacing the kills, not waiting for things to settle
        time.sleep(max(0.0, min(next_kill, next_check) - time.monotonic()))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def peak_rss(pid: int) -> int:
    """The most resident memory the process ever had (VmHWM): a spike between polls shows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


# ---------------------------------------------------------------------------
# logs


_NOTEWORTHY = re.compile(r"WARNING|ERROR|Traceback|Error|exited|died|killing|restarted")


def log_tail(running: RunningSatellite, lines: int = 40) -> str:
    """The noteworthy lines of every node's log of the latest run, for failure messages."""
    runs = sorted(running.directory.glob(".dsat/*/runs/latest"))
    found: list[str] = []
    for run in runs:
        for path in sorted(run.glob("*.log")):
            picked = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if _NOTEWORTHY.search(line)
            ]
            found.extend(f"{path.name}: {line}" for line in picked[-lines:])
    return "\n".join(found[-lines * 3 :])
