"""The status store: where task states, event logs, results and dead letters live.

One interface, :class:`Store`, with SQLite as the default backend (embedded, no
server). The tracker is the only writer; it writes one :class:`Batch` per
transaction, so a batch lands whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dsat.errors import DsatError


class StoreError(DsatError):
    """The store cannot be opened, read or written; the text says which and why."""


@dataclass(frozen=True, slots=True)
class TaskRow:
    """The latest state of one task."""

    task_id: str
    job_id: str
    origin: str
    state: str  # an Event name; HAPPY_END and FAILURE are final
    step: str
    attempt: int
    error: str
    created: float
    updated: float
    ended: float | None
    events: int  # how many events it has (its latest tseq)
    anomalies: int
    duplicates: int
    deadline: float  # by when the next progress is due; 0 = none
    at_satellite: str = ""  # where its latest event happened


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event in a task's log; ``tseq`` numbers the task's events as the tracker got them."""

    task_id: str
    tseq: int
    branch: int
    seq: int
    attempt: int
    event: str
    step: str
    where: str
    wid: str
    pid: int
    at: float
    detail: dict[str, Any]
    flag: str  # "" | "duplicate" | "conflict: ..." | "anomaly: ..."


@dataclass(frozen=True, slots=True)
class ResultRow:
    """What a terminus step returned for one branch of a task."""

    task_id: str
    branch: int
    step: str
    serialization: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A task that failed for good: enough to send it again (``dsat retry``)."""

    task_id: str
    job_id: str
    origin: str
    step: str
    branch: int
    seq: int
    attempt: int
    serialization: str
    payload: bytes
    error: str
    at: float


@dataclass
class Batch:
    """Everything one tracker cycle writes, in one transaction."""

    # EventRows, or already their fields (the tracker's fast path): task_id, tseq,
    # branch, seq, attempt, event, step, where, wid, pid, at, detail (a dict) or None, flag
    events: list[EventRow | tuple[Any, ...]] = field(default_factory=list)
    # upserts, last one wins: TaskRows, or their fields as a tuple (the tracker's fast path)
    tasks: dict[str, TaskRow | tuple[Any, ...]] = field(default_factory=dict)
    results: list[ResultRow] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # dead letters sent again
    flags: list[tuple[str, int, str]] = field(default_factory=list)  # task_id, tseq, flag
    producers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> epoch, eseq
    # events of other satellites' tasks, kept until their own tracker confirms them
    relay: list[tuple[str, int, bytes]] = field(default_factory=list)  # dest, eseq, record
    relay_marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # dest -> epoch, next
    relay_confirmed: dict[str, int] = field(default_factory=dict)  # dest -> eseq confirmed

    def __bool__(self) -> bool:
        return bool(
            self.events
            or self.tasks
            or self.results
            or self.dead_letters
            or self.retried
            or self.flags
            or self.producers
            or self.relay
            or self.relay_marks
            or self.relay_confirmed
        )


class Store(Protocol):
    """What the tracker and the clients need from a status store."""

    def write(self, batch: Batch) -> None:
        """Write a batch in one transaction: all of it lands, or none (StoreError)."""

    def producers(self) -> dict[str, tuple[int, int]]:
        """The last (epoch, eseq) stored for each producer."""

    def live_tasks(self) -> list[TaskRow]:
        """Tasks that have not ended."""

    def task(self, task_id: str) -> TaskRow | None: ...

    def known(self, task_ids: set[str]) -> set[str]:
        """Which of these tasks the store has (one query, not one per task)."""

    def events(self, task_id: str, after: int = 0) -> list[EventRow]:
        """A task's events with ``tseq > after``, in tseq order."""

    def tasks(
        self,
        *,
        job_id: str | None = None,
        step: str | None = None,
        state: str | None = None,
        live: bool | None = None,
        stale_before: float | None = None,
        limit: int = 100,
    ) -> list[TaskRow]:
        """Tasks matching every given filter, newest first."""

    def results(self, task_id: str) -> list[ResultRow]: ...

    def relay_pending(self) -> dict[str, list[tuple[int, bytes]]]:
        """Relayed events not yet confirmed, per destination satellite, in eseq order."""

    def relay_marks(self) -> dict[str, tuple[int, int]]:
        """Per destination satellite: the relay's epoch and its next eseq."""

    def dead_letter(self, task_id: str) -> DeadLetter | None: ...

    def dead_letter_ids(
        self,
        *,
        job_id: str | None = None,
        step: str | None = None,
        after: str = "",
        limit: int = 1000,
    ) -> list[str]:
        """Task ids of dead letters matching every given filter, above ``after``, in order."""

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state."""

    def prune(self, ended_before: float) -> int:
        """Forget tasks that ended before a time (events, results, rows); return how many."""

    def close(self) -> None: ...


def open_store(url: str, *, readonly: bool = False) -> Store:
    """Open the store a URL names: ``sqlite:///PATH``, or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        from dsat.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), readonly=readonly)
    raise StoreError(f"store url {url!r}: this dsat supports sqlite:///PATH")
