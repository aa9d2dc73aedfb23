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

from collections.abc import Mapping
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


NEXT: Final[Mapping[Event, frozenset[Event]]] = {
    # the entry router created the task: send it on, or end it when no link accepts it
    Event.INIT: frozenset({Event.SEND, Event.HAPPY_END}),
    # a SEND is answered by the receiver's ACK, or sent again when no ACK came in time
    Event.SEND: frozenset({Event.ACK, Event.SEND}),
    # a router accepted it: a worker starts it, or it is forwarded (router steps),
    # propagated to another satellite, or the router saw its worker die before START
    Event.ACK: frozenset(
        {Event.START, Event.SEND, Event.PROPAGATE, Event.HAPPY_END, Event.ERROR, Event.TIMEOUT}
    ),
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
        return event in (Event.INIT, Event.SEND)
    return event in NEXT[prev]


def position(event: Event, seq: int, attempt: int) -> Position:
    """Where an event stands in its task's life; later events have larger positions."""
    return (seq, attempt, RANK[event])
