"""The static view of a task: its State, its branches, its history in the order things
happened, as derived from what the tracker stores. Pure, no I/O (the Client asks).

A fan-out makes several branches; a task is over only when every branch has ended
(the store's ``ended``, which the tracker sets then). A branch that forks ends
there: its life goes on in the branches it forked into.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from dsat.errors import DsatError
from dsat.fsm import RANK
from dsat.message import loads

TERMINAL_STATES: Final = frozenset({"HAPPY_END", "FAILURE"})
# what a router puts in the detail of a HAPPY_END whose result it did not keep
_NOT_KEPT: Final = re.compile(r"result of (\d+) bytes not kept \(limit (\d+)\)")


class TaskFailedError(DsatError):
    """The task ended in FAILURE: ``step``, ``branch``, ``attempt``, ``error`` and
    ``traceback`` say where and why; ``state`` is its whole State."""

    def __init__(self, state: State) -> None:
        failed = state.failed_branch
        self.state = state
        self.task_id = state.task_id
        self.step = failed.step if failed else state.step
        self.branch = failed.branch if failed else 0
        self.attempt = failed.attempt if failed else state.attempt
        self.error = state.error or (failed.error if failed else "")
        self.traceback = state.traceback
        super().__init__(
            f"task {state.task_id} failed at step {self.step} (branch {self.branch}) after "
            f"{self.attempt} attempt(s): {self.error or 'no error message'}"
        )


class ResultNotKeptError(DsatError):
    """The task ended well, but a result was over the store's ``max_result_size``: it
    was not kept, so there is nothing to return."""

    def __init__(self, task_id: str, step: str, branch: int, size: int, limit: int) -> None:
        super().__init__(
            f"task {task_id}: the result of step {step} (branch {branch}) was not kept: "
            f"{size} bytes, over the store's limit of {limit} bytes ([store] "
            "max_result_size); return less (where the data is), or raise the limit"
        )
        self.task_id = task_id
        self.step = step
        self.branch = branch
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class EventInfo:
    """One event of a task, as the tracker stored and published it."""

    task_id: str
    tseq: int  # its number in the task's log
    event: str
    step: str
    branch: int
    seq: int
    attempt: int
    where: str
    wid: str
    pid: int
    at: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    flag: str = ""  # "" | "duplicate" | "anomaly: ..."
    state: str = ""  # the task's state after it (live events only)
    over: bool = False  # did it end the task


_EVENT_FIELDS: Final = {f.name for f in fields(EventInfo)}


def event_from_row(raw: Mapping[str, Any]) -> EventInfo:
    """An EventInfo from a stored or published event (unknown keys left out)."""
    values = {k: v for k, v in raw.items() if k in _EVENT_FIELDS}
    return EventInfo(**values)


@dataclass(frozen=True)
class BranchState:
    """One branch of a task (a fan-out makes several), as its history tells it."""

    branch: int  # its id; the root, a task as submitted, is 1
    parent: int  # the branch it was forked from; 0 for the root
    state: str  # its latest event; "" while none of its own has arrived
    step: str  # the step of its latest event that names one
    attempt: int
    error: str  # its current error: its FAILURE's, or its latest ERROR's while retried
    traceback: str | None = None  # the traceback of that error, when the function raised

    @property
    def over(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class State:
    """The static view of one task: where it is, how it went, its whole history.

    ``state``, ``step``, ``attempt`` and ``error`` are the task's: while it runs, those
    of its most advanced live branch (a branch that ended does not end the task);
    once over, a FAILURE's are those of the branch that failed, and a HAPPY_END has
    no error. ``branches`` shows every branch; ``history`` is in the order things
    happened (``arrivals`` in the order the tracker got them).
    """

    task_id: str
    job_id: str
    state: str  # an event name, or UNKNOWN when its fate is not known
    step: str
    attempt: int
    error: str  # the current error (see TaskMachine): "" once it ended well
    created: float
    updated: float
    ended: float | None  # set when every branch has ended, and only then
    anomalies: int = 0
    duplicates: int = 0
    last_known: str = ""  # what it last said, when state is UNKNOWN
    history: tuple[EventInfo, ...] = ()  # in the order things happened
    results: Mapping[str, Any] = field(default_factory=dict)  # terminus step -> value
    branches: tuple[BranchState, ...] = ()  # those that did not fork: where its life goes on
    traceback: str | None = None  # the traceback of ``error``, when the function raised

    @property
    def over(self) -> bool:
        """Every branch has ended (the store's ``ended`` is set), as ``wait`` decides."""
        return self.ended is not None

    @property
    def arrivals(self) -> tuple[EventInfo, ...]:
        """The history in the order the tracker got it (``tseq``)."""
        return tuple(sorted(self.history, key=lambda e: e.tseq))

    def timeline(self) -> list[EventInfo]:
        """The history in the order things happened (what ``history`` is)."""
        return list(self.history)

    @property
    def failed_branch(self) -> BranchState | None:
        """The branch whose FAILURE failed the task (the one its step and error name)."""
        failed = [b for b in self.branches if b.state == "FAILURE"]
        for branch in failed:
            if branch.step == self.step and branch.error == self.error:
                return branch
        return failed[0] if failed else None

    @property
    def result(self) -> Any:
        """What ``wait`` returns: a task that did not fan out, its terminus' result; a
        fanned-out task, {terminus step: result}, a list of results (in branch order)
        at a step where several branches ended. None while no result is there.

        Raises:
            ResultNotKeptError: a result was over ``max_result_size``.
        """
        for event in self.history:
            if event.event == "HAPPY_END" and not event.flag.startswith(_IGNORED_FLAGS):
                dropped = _not_kept(event.detail)
                if dropped is not None:
                    raise ResultNotKeptError(self.task_id, event.step, event.branch, *dropped)
        if len(self.branches) > 1:
            return dict(self.results)
        return next(iter(self.results.values())) if self.results else None


# an event with one of these flags changed nothing (another one was in its place)
_IGNORED_FLAGS: Final = ("duplicate", "conflict")


def _not_kept(detail: Mapping[str, Any]) -> tuple[int, int] | None:
    """(size, limit) of a result a HAPPY_END's detail says was not kept, or None."""
    size, limit = detail.get("result_size"), detail.get("result_limit")
    if type(size) is int and type(limit) is int:
        return size, limit
    reason = detail.get("reason")
    found = _NOT_KEPT.search(reason) if isinstance(reason, str) else None
    return (int(found[1]), int(found[2])) if found else None


_RANKS: Final = {event.value: rank for event, rank in RANK.items()}


def _place(event: EventInfo) -> tuple[int, int, int, int]:
    """Where an event stands in its branch's life (see dsat.fsm), then its arrival."""
    return (event.seq, event.attempt, _RANKS.get(event.event, 9), event.tseq)


def _parents(events: Iterable[EventInfo]) -> dict[int, int]:
    """Fanned-out branch -> the branch it came from, as the events that forked it say."""
    parents: dict[int, int] = {}
    for event in events:
        children = event.detail.get("children")
        if not isinstance(children, list) or children == [event.branch]:
            continue
        parent = event.detail.get("parent", event.branch if event.event == "END" else 0)
        if type(parent) is int and parent:
            for child in children:
                if type(child) is int and child != parent:
                    parents.setdefault(child, parent)
    return parents


def _happened(events: Iterable[EventInfo], parents: Mapping[int, int]) -> tuple[EventInfo, ...]:
    """Events in the order things happened.

    Within a branch, by place in its life (message, try, rank in the try), which
    holds whatever the clocks; a fanned-out branch after its parent's events (the
    fork comes first); branches side by side interleaved by their events' times.
    """
    by_branch: dict[int, list[EventInfo]] = {}
    for event in events:
        by_branch.setdefault(event.branch, []).append(event)
    for branch_events in by_branch.values():
        branch_events.sort(key=_place)
    children: dict[int, list[int]] = {}
    heap: list[tuple[float, int, int, int]] = []  # at, branch, tseq, index in its branch
    for branch, branch_events in by_branch.items():
        parent = parents.get(branch)
        if parent is not None and parent in by_branch:
            children.setdefault(parent, []).append(branch)
        else:
            heap.append((branch_events[0].at, branch, branch_events[0].tseq, 0))
    heapq.heapify(heap)
    ordered: list[EventInfo] = []
    while heap:
        _, branch, _, index = heapq.heappop(heap)
        branch_events = by_branch[branch]
        ordered.append(branch_events[index])
        if index + 1 < len(branch_events):
            after = branch_events[index + 1]
            heapq.heappush(heap, (after.at, branch, after.tseq, index + 1))
        else:  # the branch is done: the ones it forked into go on
            for child in children.pop(branch, ()):
                first = by_branch[child][0]
                heapq.heappush(heap, (first.at, child, first.tseq, 0))
    if len(ordered) < sum(len(b) for b in by_branch.values()):  # parents in a loop: bad data
        seen = {id(e) for e in ordered}
        ordered += sorted(
            (e for b in by_branch.values() for e in b if id(e) not in seen),
            key=lambda e: (e.at, e.branch, _place(e)),
        )
    return tuple(ordered)


def _branches(history: Iterable[EventInfo], parents: Mapping[int, int]) -> tuple[BranchState, ...]:
    """Each branch that did not fork, from its events: its latest one, its current error."""
    by_branch: dict[int, list[EventInfo]] = {}
    for event in history:
        if not event.flag.startswith(_IGNORED_FLAGS):
            by_branch.setdefault(event.branch, []).append(event)
    forked = set(parents.values())
    known = dict.fromkeys([*by_branch, *parents])  # a branch forked may have no event yet
    found = []
    for branch in known:
        if branch in forked:
            continue  # its life goes on in the branches it forked into
        events = sorted(by_branch.get(branch, ()), key=_place)
        error, traceback = "", None
        step = ""
        for event in events:
            step = event.step or step
            if event.event in ("ERROR", "TIMEOUT", "FAILURE"):
                text = event.detail.get("error", "")
                shown = event.detail.get("traceback")
                if not isinstance(shown, str) and event.event == "FAILURE" and text == error:
                    shown = traceback  # the try that failed last raised it
                error, traceback = text, shown if isinstance(shown, str) else None
            elif event.event in ("RETRY", "HAPPY_END"):
                error, traceback = "", None
        last = events[-1] if events else None
        found.append(
            BranchState(
                branch=branch,
                parent=parents.get(branch, 0),
                state=last.event if last else "",
                step=step,
                attempt=last.attempt if last else 0,
                error=error,
                traceback=traceback,
            )
        )
    return tuple(found)


def _results(raw: Iterable[Mapping[str, Any]], *, allow_pickle: bool) -> dict[str, Any]:
    """Stored results (one per branch that ended) as {terminus step: value}, a list of
    values (in branch order) at a step where several branches ended."""
    results: dict[str, Any] = {}
    several: set[str] = set()
    for result in sorted(raw, key=lambda r: int(r["branch"])):
        value = loads(result["data"], result["serialization"], allow_pickle=allow_pickle)
        step = result["step"]
        if step in several:
            results[step].append(value)
        elif step in results:  # two branches ended at the same step
            results[step] = [results[step], value]
            several.add(step)
        else:
            results[step] = value
    return results


def state_from_reply(raw: Mapping[str, Any], *, allow_pickle: bool) -> State:
    """A State from the tracker's ``state`` reply: the task's row, its events, its results."""
    task = raw["task"]
    events = [event_from_row(e) for e in raw["events"]]
    parents = _parents(events)
    history = _happened(events, parents)
    branches = _branches(history, parents)
    results = _results(raw.get("results", []), allow_pickle=allow_pickle)
    unknown = bool(task.get("unknown"))
    error = task["error"]
    return State(
        task_id=task["task_id"],
        job_id=task["job_id"],
        state="UNKNOWN" if unknown else task["state"],
        step=task["step"],
        attempt=task["attempt"],
        error=error,
        created=task["created"],
        updated=task["updated"],
        ended=task["ended"],
        anomalies=task["anomalies"],
        duplicates=task["duplicates"],
        last_known=task["state"] if unknown else "",
        history=history,
        results=results,
        branches=branches,
        traceback=_traceback_of(error, task["state"], task["step"], branches),
    )


def _traceback_of(error: str, state: str, step: str, branches: Iterable[BranchState]) -> str | None:
    """The traceback of the task's current error: that of the branch whose error it is."""
    if not error:
        return None
    candidates = [b for b in branches if b.error == error]
    if state == "FAILURE":
        candidates = [b for b in candidates if b.state == "FAILURE"] or candidates
    candidates.sort(key=lambda b: b.step != step)  # the task's step first
    return next((b.traceback for b in candidates if b.traceback is not None), None)


@dataclass(frozen=True)
class TaskSummary:
    """One line of ``Client.tasks()``."""

    task_id: str
    job_id: str
    state: str
    step: str
    attempt: int
    error: str
    created: float
    updated: float
    ended: float | None


def summary_from_row(raw: Mapping[str, Any]) -> TaskSummary:
    return TaskSummary(
        task_id=raw["task_id"],
        job_id=raw["job_id"],
        state="UNKNOWN" if raw.get("unknown") else raw["state"],
        step=raw["step"],
        attempt=raw["attempt"],
        error=raw["error"],
        created=raw["created"],
        updated=raw["updated"],
        ended=raw["ended"],
    )
