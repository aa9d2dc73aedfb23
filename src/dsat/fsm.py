"""The task state machine as data: which event may follow which. Pure, no I/O.

A task moves through the graph hop by hop. At each hop the same story repeats::

    SEND -> ACK -> START -> END -> SEND (next hop) ... -> HAPPY_END
                     \\-> ERROR / TIMEOUT -> START (attempt + 1) ... -> FAILURE
    ACK at a router -> PROPAGATE (to another satellite) -> ACK there ...

Events of one task come from several processes (the sender, the router, the
worker), so they may reach the tracker out of order. Each event therefore has a
*position*, ``(seq, attempt, rank)``: ``seq`` counts the task's messages (every
send increments it), ``attempt`` counts tries, and ``rank`` orders the events of
one try. Positions only grow along a task's life, which lets the tracker put
late events back in order and recognise duplicates.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Event(StrEnum):
    """One transition of a task's state machine; the store and logs hold the name."""

    INIT = "INIT"
    SEND = "SEND"
    ACK = "ACK"
    PROPAGATE = "PROPAGATE"
    START = "START"
    END = "END"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    HAPPY_END = "HAPPY_END"
    FAILURE = "FAILURE"
    RETRY = "RETRY"


# Python 3.11 finds an enum member on its class in about 0.2 µs, ten times a
# module global: the hot paths (TaskMachine.apply, the tracker's) use these.
_INIT, _SEND, _ACK, _START, _END = Event.INIT, Event.SEND, Event.ACK, Event.START, Event.END
_ERROR, _TIMEOUT, _FAILURE, _RETRY = Event.ERROR, Event.TIMEOUT, Event.FAILURE, Event.RETRY
_HAPPY_END = Event.HAPPY_END

NEXT: Final[Mapping[Event, frozenset[Event]]] = {
    # the entry router created the task and sends it to its first step(s)
    Event.INIT: frozenset({Event.SEND}),
    # a SEND is answered by the receiver's ACK, or sent again when no ACK came in time
    Event.SEND: frozenset({Event.ACK, Event.SEND}),
    # a router accepted it: it starts (on a worker, in a sink, or a router step's
    # forwarding), or it is propagated to another satellite
    Event.ACK: frozenset({Event.START, Event.PROPAGATE}),
    Event.PROPAGATE: frozenset({Event.ACK, Event.PROPAGATE}),
    Event.START: frozenset({Event.END, Event.ERROR, Event.TIMEOUT}),
    Event.END: frozenset({Event.SEND, Event.HAPPY_END}),
    Event.ERROR: frozenset({Event.START, Event.FAILURE}),
    Event.TIMEOUT: frozenset({Event.START, Event.FAILURE}),
    Event.HAPPY_END: frozenset(),
    # a dead letter may be sent again by hand (`dsat retry`)
    Event.FAILURE: frozenset({Event.RETRY}),
    Event.RETRY: frozenset({Event.SEND}),
}

TERMINAL: Final = frozenset({Event.HAPPY_END, Event.FAILURE})
NAME: Final[Mapping[Event, str]] = {event: event.value for event in Event}  # no enum lookup

# Order of the events of one try at one hop (see the module docstring).
RANK: Final[Mapping[Event, int]] = {
    Event.INIT: 0,
    Event.SEND: 0,
    Event.PROPAGATE: 0,
    Event.RETRY: 0,
    Event.ACK: 1,
    Event.START: 2,
    Event.END: 3,
    Event.ERROR: 3,
    Event.TIMEOUT: 3,
    Event.HAPPY_END: 4,
    Event.FAILURE: 4,
}

Position = tuple[int, int, int]


def allowed(prev: Event | None, event: Event) -> bool:
    """May ``event`` follow ``prev``? ``None`` is before anything: only INIT or a SEND."""
    if prev is None:
        return event is _INIT or event is _SEND
    return event in NEXT[prev]


def position(event: Event, seq: int, attempt: int) -> Position:
    """Where an event stands in its task's life; later events have larger positions."""
    return (seq, attempt, RANK[event])


# ---------------------------------------------------------------------------
# one task's life, applied event by event, in whatever order events arrive

ROOT: Final = 1  # the branch id of a task as it is created

# A machine remembers every event it saw. Each one is packed into two integers of
# two arrays, its place (branch, seq, attempt, rank) and what came there (tseq,
# event), so a task keeps a handful of objects however long its history: the
# tracker holds thousands of tasks for a long time, and every small object a task
# keeps pins the allocator's memory around it (see docs/performance.md). A place
# that does not fit (a fan-out's branch ids are large) goes to a dict instead.
_EVENTS: Final = tuple(Event)
_EVENT_INDEX: Final = {event: index for index, event in enumerate(_EVENTS)}
_BRANCH_BITS, _SEQ_BITS, _ATTEMPT_BITS, _RANK_BITS = 21, 24, 16, 3


def _place_key(branch: int, seq: int, attempt: int, rank: int) -> int | None:
    """The place packed in 64 bits, or None when it does not fit."""
    if branch >> _BRANCH_BITS or seq >> _SEQ_BITS or attempt >> _ATTEMPT_BITS:
        return None
    return ((branch << _SEQ_BITS | seq) << _ATTEMPT_BITS | attempt) << _RANK_BITS | rank


def _unpack_place(key: int) -> tuple[int, int, int, int]:
    rank = key & (1 << _RANK_BITS) - 1
    key >>= _RANK_BITS
    attempt = key & (1 << _ATTEMPT_BITS) - 1
    key >>= _ATTEMPT_BITS
    return key >> _SEQ_BITS, key & (1 << _SEQ_BITS) - 1, attempt, rank


@dataclass(slots=True)
class Outcome:
    """What applying one event did: its number in the task's log, a flag, whether it ended."""

    tseq: int
    flag: str  # "" | "duplicate" | "conflict: ..."
    over: bool


@dataclass(slots=True)
class Head:
    """The most advanced event seen on one branch."""

    position: Position
    event: Event
    step: str
    attempt: int
    deadline: float = 0.0


class TaskMachine:
    """The live state of one task, fed by events from several processes.

    Events of a task come from different producers and may arrive out of order,
    so the machine does not insist on order as they come:

    - every branch has ended when the XOR of branch ids is 0 again: ids are XORed
      in when a branch is created (INIT, a fan-out) and again when it ends
      (HAPPY_END, FAILURE), Storm's acker trick, the same in any order;
    - the task is *over* when, besides, its history is complete: every
      transition of every branch, in position order, is one that can happen
      (:func:`check_history`). An END of an early hop may arrive after the
      HAPPY_END of the last one; the task ends when it has arrived. If it never
      does, the tracker ends the task anyway after a grace period
      (:meth:`force_end`) and flags what is missing;
    - an event already seen (same branch, seq, attempt and rank) is a duplicate:
      it is logged but changes nothing.

    The task's ``state``, ``step`` and ``attempt`` are those of its latest event,
    except that a branch's end is not the task's while another branch lives: the
    task then shows its most advanced live branch. Once over, a FAILURE shows the
    branch that failed (its step, try and error); a HAPPY_END has no error.
    ``error`` is the current error: the latest ERROR's while the task is tried
    again, the FAILURE's; a RETRY clears it.
    """

    __slots__ = (
        "_bad",
        "_big",
        "_forks",
        "_in_order",
        "_places",
        "_seen",
        "_xor",
        "anomalies",
        "attempt",
        "created",
        "deadline",
        "duplicates",
        "ended",
        "error",
        "failed",
        "forced",
        "heads",
        "job_id",
        "origin",
        "parents",
        "rooted",
        "state",
        "step",
        "task_id",
        "tseq",
        "updated",
        "where",
    )

    def __init__(self, task_id: str, job_id: str = "", origin: str = "") -> None:
        self.task_id = task_id
        self.job_id = job_id
        self.origin = origin
        self.tseq = 0
        self.state: Event | None = None
        self.step = ""
        self.where = ""  # the satellite of the latest event
        self.attempt = 0
        self.error = ""
        self.created = 0.0
        self.updated = 0.0
        self.deadline = 0.0
        self.duplicates = 0
        self.anomalies = 0
        self.rooted = False
        self.ended = False
        self.forced = False  # ended by force_end: stays ended
        # A machine lives in the tracker as long as its task (and a while after): the
        # history is one dict, and what only fan-outs and failures need is made then.
        self.failed: dict[int, str] | None = None  # branches that failed -> their error
        self.heads: dict[int, Head] = {}
        # every event seen once: its packed place (_place_key), and at the same index
        # tseq << 4 | the event's index; places too large to pack in a dict
        self._places = array("Q")
        self._seen = array("Q")
        self._big: dict[tuple[int, int, int, int], tuple[Event, int]] | None = None
        self._forks: set[int] | None = None
        self.parents: dict[int, int] | None = None  # fanned-out branch -> the branch it came from
        self._xor = 0
        # Every event so far came in position order on the root branch, each a transition
        # that can happen: the history is then whole as it stands, and the (costly) check
        # of the whole history is not needed when the task closes. Any doubt (an event
        # out of order, a problem, a fan-out) and the whole history is checked.
        self._in_order = True
        # Once the whole history was checked (when the task first closed), how many of its
        # transitions cannot happen; kept up to date as late events fill the gaps, so each
        # does not check the whole history again (events of a loaded pipeline often come
        # after the task closed: HAPPY_END before an earlier hop's END). -1: not known, or
        # a fan-out (several branches): the whole history is checked.
        self._bad = -1

    @property
    def closed(self) -> bool:
        """Every branch created has ended (the history may still miss events)."""
        return self.rooted and self._xor == 0

    @property
    def over(self) -> bool:
        """Every branch has ended and every event of the history is there."""
        return self.ended

    @property
    def history(self) -> list[tuple[Position, int, Event, int]]:
        """Every event seen once, as (position, branch, event, tseq), in arrival order."""
        events = _EVENTS
        history = []
        for key, seen in zip(self._places, self._seen, strict=True):
            branch, seq, attempt, rank = _unpack_place(key)
            history.append(((seq, attempt, rank), branch, events[seen & 15], seen >> 4))
        if self._big:
            history += [
                ((seq, attempt, rank), branch, event, tseq)
                for (branch, seq, attempt, rank), (event, tseq) in self._big.items()
            ]
            history.sort(key=lambda entry: entry[3])
        return history

    def _remember(
        self, event: Event, branch: int, seq: int, attempt: int, rank: int
    ) -> Event | None:
        """The event already seen at this place (a duplicate or a conflict), or None:
        then this one is remembered there, with its tseq."""
        key = _place_key(branch, seq, attempt, rank)
        if key is None:
            if self._big is None:
                self._big = {}
            big = (branch, seq, attempt, rank)
            seen = self._big.get(big)
            if seen is not None:
                return seen[0]
            self._big[big] = (event, self.tseq)
            return None
        places = self._places
        # in order so far, the places stand in ascending order: one past the last is new
        if not (self._in_order and (not places or key > places[-1])) and key in places:
            return _EVENTS[self._seen[places.index(key)] & 15]
        places.append(key)
        self._seen.append(self.tseq << 4 | _EVENT_INDEX[event])
        return None

    def _whole(self) -> bool:
        """Is every transition of the history one that can happen (so far)?"""
        if self._in_order:
            return True
        if self._bad >= 0:
            return self._bad == 0
        problems = self.problems()
        if self._forks is None and not self._big:
            self._bad = len(problems)
        return not problems

    def _count_bad(self, branch: int, seq: int, attempt: int, rank: int, event: Event) -> None:
        """A new event of the root branch: the transitions it breaks and makes, counted.

        In position order it comes between two events seen (or first, or last): the
        transition between those two goes, the two it makes with them come.
        """
        key = _place_key(branch, seq, attempt, rank)
        if key is None or self._big or self._forks is not None:
            self._bad = -1
            return
        places = self._places
        before = after = -1
        for index, other in enumerate(places):
            if other < key:
                if before < 0 or other > places[before]:
                    before = index
            elif other > key and (after < 0 or other < places[after]):
                after = index
        here = (seq, attempt, rank)
        prev, prev_at = self._at(before) if before >= 0 else (None, None)
        bad = 1 if _transition_problem(prev, prev_at, event, here) else 0
        if after >= 0:
            follower, at = self._at(after)
            bad += 1 if _transition_problem(event, here, follower, at) else 0
            bad -= 1 if _transition_problem(prev, prev_at, follower, at) else 0
        self._bad += bad

    def _at(self, index: int) -> tuple[Event, Position]:
        """The event seen at an index of the packed places, and its position."""
        _, seq, attempt, rank = _unpack_place(self._places[index])
        return _EVENTS[self._seen[index] & 15], (seq, attempt, rank)

    def problems(self) -> list[tuple[int, str]]:
        """Transitions of the history (so far) that cannot happen: (tseq, reason)."""
        return check_history(self.history, self.parents)

    def force_end(self) -> list[tuple[int, str]]:
        """End a closed task whose history stays incomplete; return what is wrong with it."""
        self.ended = True
        self.forced = True
        self._settle()
        return self.problems()

    def _settle(self) -> None:
        """The state of a task over: the first branch that failed, or a HAPPY_END."""
        failed = self.failed
        if failed:
            branch, error = next(iter(failed.items()))
            self.state = _FAILURE
            head = self.heads.get(branch)
            if head is not None:
                self.step, self.attempt = head.step, head.attempt
            self.error = error or self.error
        else:
            self.state = _HAPPY_END
            self.error = ""  # the errors of tries that came before are in the history
        self.deadline = 0.0

    def _live_head(self) -> Head | None:
        """The most advanced head of a branch that has not ended (nor forked into others)."""
        forks = self._forks or ()
        best: Head | None = None
        for branch, head in self.heads.items():
            if head.event in TERMINAL or branch in forks:
                continue
            if best is None or head.position > best.position:
                best = head
        return best

    def apply(
        self,
        event: Event,
        branch: int,
        seq: int,
        attempt: int,
        step: str = "",
        at: float = 0.0,
        children: list[int] | None = None,
        parent: int = 0,
        error: str = "",
        deadline: float = 0.0,
        where: str = "",
    ) -> Outcome:
        """Apply one event; every event gets a ``tseq``, duplicates included."""
        self.tseq += 1
        if not self.created or (at and at < self.created):
            self.created = at
        if at > self.updated:
            self.updated = at
        rank = RANK[event]
        before = self._remember(event, branch, seq, attempt, rank)
        if before is not None:
            self.duplicates += 1
            flag = "duplicate" if before is event else f"conflict: {event} where {before} was"
            return Outcome(self.tseq, flag, False)
        place = (seq, attempt, rank)

        head = self.heads.get(branch)
        if self._in_order and (
            branch != ROOT
            or (head is not None and place <= head.position)
            or _transition_problem(
                head.event if head else None, head.position if head else None, event, place
            )
        ):
            self._in_order = False

        if event is _INIT:
            self.rooted = True
            self._xor ^= branch
        elif event is _END:
            if children:
                self._fork(branch, children)
        elif event is _SEND:
            if parent and children:
                self._fork(parent, children)
        elif event is _HAPPY_END:
            self._xor ^= branch
        elif event is _FAILURE:
            self._xor ^= branch
            if self.failed is None:
                self.failed = {}
            self.failed[branch] = error
            self.error = error or self.error
        elif event is _RETRY:
            self._xor ^= branch
            if self.failed is not None:
                self.failed.pop(branch, None)
            # sent again: the error that failed it is no longer the task's current one
            self.error = next(iter(self.failed.values()), "") if self.failed else ""
            self.forced = False
        elif (event is _ERROR or event is _TIMEOUT) and error:
            self.error = error

        if self._bad >= 0:
            self._count_bad(branch, seq, attempt, rank, event)
        if self.rooted and self._xor == 0 and self._whole():  # closed, and whole
            self.ended = True
        elif not self.forced:
            # not closed, or a gap: a new event after the end (the first events of a
            # retry may arrive before its RETRY) reopens the task until it is whole again
            self.ended = False
        if head is None or place > head.position:
            self.heads[branch] = Head(place, event, step, attempt, deadline)
            if self.state is None or not self.ended:
                shown: Head | None = self.heads[branch]
                if (event is _HAPPY_END or event is _FAILURE) and self._xor:
                    # a branch ended while others live: the task is where the most advanced
                    # live one is (where it was, when none has an event of its own yet)
                    known = self.state is not None and self.state not in TERMINAL
                    shown = self._live_head() or (None if known else shown)
                if shown is not None:
                    self.state, self.attempt = shown.event, shown.attempt
                    self.step = shown.step or self.step
                    self.deadline = shown.deadline
                self.where = where or self.where
        if self.ended:
            self._settle()
        return Outcome(self.tseq, "", self.ended)

    def _fork(self, parent: int, children: list[int]) -> None:
        """A branch ended by splitting into children (once, whoever reports it first)."""
        if children == [parent] or (self._forks is not None and parent in self._forks):
            return
        if self._forks is None or self.parents is None:
            self._forks, self.parents = set(), {}
        self._in_order = False  # branches besides the root: the whole history is checked
        self._bad = -1
        self._forks.add(parent)
        self._xor ^= parent
        for child in children:
            self._xor ^= child
            self.parents[child] = parent


SENDS: Final = frozenset({Event.SEND, Event.PROPAGATE, Event.RETRY})


def check_history(
    history: list[tuple[Position, int, Event, int]], parents: Mapping[int, int] | None = None
) -> list[tuple[int, str]]:
    """Transitions that cannot happen, as (tseq, reason), checking each branch in position order.

    Besides the event names (:data:`NEXT`), a transition must keep its place: a
    send starts the next message (seq + 1; a resend keeps it), every other event
    stays on the message it follows (same seq); a START after an ERROR or a
    TIMEOUT is the next try (attempt + 1), and the events of one try share its
    attempt. So a hop whose events never arrived is seen as a gap.

    A branch other than the root (a fan-out) goes on from its parent's last
    event (``parents`` maps it to its parent): the parent must have got there.
    """
    problems: list[tuple[int, str]] = []
    by_branch: dict[int, list[tuple[Position, Event, int]]] = {}
    for where, branch, event, tseq in history:
        by_branch.setdefault(branch, []).append((where, event, tseq))
    for events in by_branch.values():
        events.sort()
    for branch, events in by_branch.items():
        prev: Event | None = None
        prev_at: Position | None = None
        if branch != ROOT:
            parent = (parents or {}).get(branch)
            if parent is None or parent not in by_branch:
                problems.append(
                    (events[0][2], f"branch {branch} came from a branch with no events seen")
                )
                continue
            prev_at, prev, _ = by_branch[parent][-1]
        for at, event, tseq in events:
            reason = _transition_problem(prev, prev_at, event, at)
            if reason:
                problems.append((tseq, reason))
            prev, prev_at = event, at
    return problems


def _transition_problem(
    prev: Event | None, prev_at: Position | None, event: Event, at: Position
) -> str:
    if not allowed(prev, event):
        expected = ", ".join(sorted(NEXT[prev])) if prev is not None else "INIT or SEND"
        return f"{event} cannot follow {prev or 'nothing'} (expected {expected})"
    if prev is None or prev_at is None:
        return ""  # the first event of a branch: nothing to keep up with
    (prev_seq, prev_attempt, _), (seq, attempt, _) = prev_at, at
    if event in SENDS:
        # a resend (SEND after SEND) is the same message again; any other send is the next
        wanted = prev_seq if event is prev else prev_seq + 1
        if seq != wanted:
            return f"{event} of message {seq} after {prev} of message {prev_seq}: a gap"
        return ""
    if seq != prev_seq:
        return f"{event} of message {seq} after {prev} of message {prev_seq}: a gap"
    if prev in SENDS:
        return ""  # the first event at a hop: its attempt is the message's
    wanted = prev_attempt + 1 if event is _START and prev is not _ACK else prev_attempt
    if attempt != wanted:
        return f"{event} of try {attempt} after {prev} of try {prev_attempt}: a gap"
    return ""
