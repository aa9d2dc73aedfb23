"""The task state machine: the table, positions, one task's life in any order, its history check.

Histories are built the way a satellite emits them (see ``Orchester.create``/``send_on``
and ``Router.ended``/``forward``): INIT and SEND from the orchester, then at each pool
hop ACK, START, END (or ERROR/TIMEOUT and another START), a SEND to the next hop, and
HAPPY_END (or FAILURE) at the terminus.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dsat.fsm import (
    NEXT,
    RANK,
    ROOT,
    TERMINAL,
    Event,
    Outcome,
    TaskMachine,
    allowed,
    check_history,
    position,
)
from dsat.router import child_branch

INIT, SEND, ACK, PROPAGATE = Event.INIT, Event.SEND, Event.ACK, Event.PROPAGATE
START, END, ERROR, TIMEOUT = Event.START, Event.END, Event.ERROR, Event.TIMEOUT
HAPPY_END, FAILURE, RETRY = Event.HAPPY_END, Event.FAILURE, Event.RETRY

TASK_ID = "0190a1b2c3d4beef000001"


@dataclass(frozen=True)
class Ev:
    """One event as a producer reports it (what the tracker hands to ``TaskMachine.apply``)."""

    event: Event
    branch: int
    seq: int
    attempt: int
    step: str = ""
    children: tuple[int, ...] | None = None
    parent: int = 0
    error: str = ""

    def apply_to(self, machine: TaskMachine, at: float = 0.0) -> Outcome:
        return machine.apply(
            self.event,
            branch=self.branch,
            seq=self.seq,
            attempt=self.attempt,
            step=self.step,
            at=at,
            children=None if self.children is None else list(self.children),
            parent=self.parent,
            error=self.error,
        )


# a hop: the failed tries (ERROR or TIMEOUT) before the last one, and whether it gives up
Hop = tuple[tuple[Event, ...], bool]
OK: Hop = ((), False)


def journey(
    branch: int, seq: int, hops: Sequence[Hop], fork: Sequence[Sequence[Hop]] = ()
) -> list[Ev]:
    """The events of a branch from the ACK of message ``seq`` on: its hops, then its end.

    ``fork``: the last hop's function returns a value for several next steps, one
    child branch each, with their own hops.
    """
    events: list[Ev] = []
    for index, (failures, gives_up) in enumerate(hops):
        step = f"pool{seq}"
        events.append(Ev(ACK, branch, seq, 1, step))
        attempt = 1
        for failure in failures:
            events.append(Ev(START, branch, seq, attempt, step))
            events.append(Ev(failure, branch, seq, attempt, step, error=f"{failure} {attempt}"))
            attempt += 1
        if gives_up:
            events.append(Ev(FAILURE, branch, seq, attempt - 1, step, error=f"gave up at {step}"))
            return events
        events.append(Ev(START, branch, seq, attempt, step))
        if index < len(hops) - 1:  # one next step: END has no children, SEND keeps the branch
            events.append(Ev(END, branch, seq, attempt, step))
            events.append(Ev(SEND, branch, seq + 1, 1, step))
            seq += 1
        elif not fork:  # the terminus: END with no children, then HAPPY_END
            events.append(Ev(END, branch, seq, attempt, step, children=()))
            events.append(Ev(HAPPY_END, branch, seq, attempt, step))
        else:
            kids = tuple(
                child_branch(TASK_ID, branch, seq, f"next{i}", i) for i in range(len(fork))
            )
            events.append(Ev(END, branch, seq, attempt, step, children=kids))
            for kid, kid_hops in zip(kids, fork, strict=True):
                events.append(Ev(SEND, kid, seq + 1, 1, step, parent=branch, children=kids))
                events.extend(journey(kid, seq + 1, kid_hops))
    return events


def task_history(hops: Sequence[Hop], fork: Sequence[Sequence[Hop]] = ()) -> list[Ev]:
    """A task submitted to one first step: INIT and SEND from the orchester, then its hops."""
    return [Ev(INIT, ROOT, 0, 1), Ev(SEND, ROOT, 1, 1), *journey(ROOT, 1, hops, fork)]


def submitted_to_many(first_steps: Sequence[Sequence[Hop]]) -> list[Ev]:
    """A task submitted to several first steps: the orchester forks it at once."""
    kids = tuple(child_branch(TASK_ID, ROOT, 0, f"first{i}", i) for i in range(len(first_steps)))
    events = [Ev(INIT, ROOT, 0, 1)]
    for kid, hops in zip(kids, first_steps, strict=True):
        events.append(Ev(SEND, kid, 1, 1, parent=ROOT, children=kids))
        events.extend(journey(kid, 1, hops))
    return events


def run(events: Sequence[Ev]) -> tuple[TaskMachine, list[Outcome]]:
    machine = TaskMachine(TASK_ID, "job")
    outcomes = [ev.apply_to(machine, at=1000.0 + i) for i, ev in enumerate(events)]
    return machine, outcomes


def ended_on(outcomes: Sequence[Outcome]) -> list[int]:
    """The indexes of the events on which the task was reported over."""
    return [i for i, outcome in enumerate(outcomes) if outcome.over]


def final_state(events: Sequence[Ev]) -> Event:
    return FAILURE if any(ev.event is FAILURE for ev in events) else HAPPY_END


def last_of_their_branch(events: Sequence[Ev]) -> set[int]:
    """Indexes of the events that stand last, by position, in their branch."""
    last: dict[int, int] = {}
    for i, ev in enumerate(events):
        j = last.get(ev.branch)
        if j is None or position(ev.event, ev.seq, ev.attempt) > position(
            events[j].event, events[j].seq, events[j].attempt
        ):
            last[ev.branch] = i
    return set(last.values())


def snapshot(machine: TaskMachine) -> tuple[Any, ...]:
    """Everything an event can change, besides the counters of arrivals."""
    return (
        list(machine.history),
        dict(machine.heads),
        machine.state,
        machine.step,
        machine.attempt,
        machine.error,
        machine.closed,
        machine.over,
        set(machine.failed or ()),
        machine.problems(),
    )


# ---------------------------------------------------------------------------
# strategies

failure = st.sampled_from([ERROR, TIMEOUT])
good_hop: st.SearchStrategy[Hop] = st.tuples(
    st.lists(failure, max_size=2).map(tuple), st.just(False)
)
failing_hop: st.SearchStrategy[Hop] = st.tuples(
    st.lists(failure, min_size=1, max_size=3).map(tuple), st.just(True)
)


@st.composite
def hop_lists(draw: st.DrawFn, *, most: int = 3, may_fail: bool = True) -> list[Hop]:
    hops = draw(st.lists(good_hop, min_size=1, max_size=most))
    if may_fail and draw(st.booleans()):
        hops[-1] = draw(failing_hop)
    return hops


@st.composite
def linear_histories(draw: st.DrawFn) -> list[Ev]:
    return task_history(draw(hop_lists()))


@st.composite
def fan_out_histories(draw: st.DrawFn) -> list[Ev]:
    if draw(st.booleans()):
        root = draw(hop_lists(most=2, may_fail=False))
        fork = draw(st.lists(hop_lists(most=2), min_size=2, max_size=3))
        return task_history(root, fork)
    return submitted_to_many(draw(st.lists(hop_lists(most=2), min_size=2, max_size=3)))


any_history = st.one_of(linear_histories(), fan_out_histories())


def producer_of(ev: Ev) -> str:
    """Who reports an event: the router of its step (a SEND: the router that sends it)."""
    return ev.step


@st.composite
def producer_orders(draw: st.DrawFn, events: list[Ev]) -> list[Ev]:
    """An arrival order that keeps each producer's events in the order it reported them.

    That is what the tracker sees: it applies each producer's batches in ``eseq``
    order, while producers interleave freely.
    """
    queues: dict[str, list[Ev]] = {}
    for ev in events:
        queues.setdefault(producer_of(ev), []).append(ev)
    arrival: list[Ev] = []
    while queues:
        name = draw(st.sampled_from(sorted(queues)))
        arrival.append(queues[name].pop(0))
        if not queues[name]:
            del queues[name]
    return arrival


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
# shrinking a failing permutation takes hypothesis ~20 s; the explicit cases below are minimal
# already, so these properties report the first failing order as drawn
NO_SHRINK = settings(SETTINGS, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def brief(events: Sequence[Ev]) -> str:
    return ", ".join(f"{ev.event}({ev.branch % 1000},{ev.seq},{ev.attempt})" for ev in events)


# ---------------------------------------------------------------------------
# the table


def test_the_diagrams_happy_path_is_allowed_step_by_step() -> None:
    path = [INIT, SEND, ACK, START, END, SEND, ACK, START, END, HAPPY_END]
    assert allowed(None, path[0])
    for prev, event in itertools.pairwise(path):
        assert allowed(prev, event), f"{event} after {prev}"


def test_a_failed_try_is_followed_by_another_start_or_a_failure() -> None:
    for failed in (ERROR, TIMEOUT):
        assert allowed(START, failed)
        assert allowed(failed, START)
        assert allowed(failed, FAILURE)
        assert not allowed(failed, END)
        assert not allowed(failed, HAPPY_END)


def test_only_init_or_a_send_can_come_first() -> None:
    assert {e for e in Event if allowed(None, e)} == {INIT, SEND}


def test_nothing_follows_a_happy_end_and_only_retry_follows_a_failure() -> None:
    assert not any(allowed(HAPPY_END, e) for e in Event)
    assert {e for e in Event if allowed(FAILURE, e)} == {RETRY}
    assert {e for e in Event if allowed(RETRY, e)} == {SEND}
    assert frozenset({HAPPY_END, FAILURE}) == TERMINAL


def test_impossible_transitions_are_refused() -> None:
    assert not allowed(ACK, END)  # END before START
    assert not allowed(INIT, ACK)  # an ACK for a SEND never seen
    assert not allowed(START, START)
    assert not allowed(START, SEND)
    assert not allowed(END, START)
    assert not allowed(SEND, START)


def test_a_propagated_task_is_acknowledged_on_the_other_satellite() -> None:
    assert allowed(ACK, PROPAGATE)
    assert allowed(PROPAGATE, ACK)
    assert not allowed(PROPAGATE, START)


def test_every_event_has_a_row_and_a_rank() -> None:
    assert set(NEXT) == set(Event)
    assert set(RANK) == set(Event)
    assert all(following <= set(Event) for following in NEXT.values())


def test_event_names_are_what_the_store_holds() -> None:
    assert str(HAPPY_END) == "HAPPY_END"
    assert Event("TIMEOUT") is TIMEOUT


# ---------------------------------------------------------------------------
# positions


def test_positions_grow_along_a_hop_and_across_tries_and_hops() -> None:
    life = [
        position(INIT, 0, 1),
        position(SEND, 1, 1),
        position(ACK, 1, 1),
        position(START, 1, 1),
        position(ERROR, 1, 1),
        position(START, 1, 2),
        position(TIMEOUT, 1, 2),
        position(START, 1, 3),
        position(END, 1, 3),
        position(SEND, 2, 1),
        position(ACK, 2, 1),
        position(START, 2, 1),
        position(END, 2, 1),
        position(HAPPY_END, 2, 1),
    ]
    assert life == sorted(life)
    assert len(set(life)) == len(life)


def test_a_position_is_seq_attempt_and_rank() -> None:
    assert position(START, 4, 2) == (4, 2, RANK[START])
    assert position(FAILURE, 3, 3) > position(TIMEOUT, 3, 3)
    assert position(RETRY, 4, 4) > position(FAILURE, 3, 3)


def test_a_built_history_has_growing_positions_on_each_branch() -> None:
    events = task_history([OK, ((ERROR, TIMEOUT), False)], fork=[[OK], [OK, OK]])
    by_branch: dict[int, list[tuple[int, int, int]]] = {}
    for ev in events:
        by_branch.setdefault(ev.branch, []).append(position(ev.event, ev.seq, ev.attempt))
    assert len(by_branch) == 3
    for positions in by_branch.values():
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)


# ---------------------------------------------------------------------------
# check_history


def history_of(events: Sequence[Ev]) -> list[tuple[tuple[int, int, int], int, Event, int]]:
    return [
        (position(ev.event, ev.seq, ev.attempt), ev.branch, ev.event, tseq)
        for tseq, ev in enumerate(events, start=1)
    ]


def parents_of(events: Sequence[Ev]) -> dict[int, int]:
    """Each fanned-out branch's parent, as the fork events (END or SEND) tell it."""
    parents: dict[int, int] = {}
    for ev in events:
        for child in ev.children or ():
            if ev.event is END and child != ev.branch:
                parents[child] = ev.branch
            elif ev.event is SEND and ev.parent:
                parents[child] = ev.parent
    return parents


def check(events: Sequence[Ev]) -> list[tuple[int, str]]:
    return check_history(history_of(events), parents_of(events))


def test_a_complete_history_has_no_problems() -> None:
    assert check(task_history([OK, ((ERROR,), False), OK])) == []
    assert check(task_history([OK], fork=[[OK], [((TIMEOUT,), True)]])) == []
    assert check(submitted_to_many([[OK], [OK, OK]])) == []


def test_history_is_checked_in_position_order_not_arrival_order() -> None:
    events = task_history([OK, OK])
    assert check(list(reversed(events))) == []


def test_an_end_without_its_start_is_named() -> None:
    events = [ev for ev in task_history([OK]) if ev.event is not START]
    end_tseq = next(i for i, ev in enumerate(events, start=1) if ev.event is END)
    expected = ", ".join(sorted(NEXT[ACK]))
    assert check(events) == [(end_tseq, f"END cannot follow ACK (expected {expected})")]


def test_a_missing_hop_is_a_gap_in_messages() -> None:
    events = [
        Ev(INIT, ROOT, 0, 1),
        Ev(SEND, ROOT, 1, 1),
        Ev(ACK, ROOT, 1, 1),
        Ev(START, ROOT, 1, 1),
        Ev(END, ROOT, 1, 1),
        # the SEND of message 2 and the whole second hop never arrived
        Ev(SEND, ROOT, 3, 1),
        Ev(ACK, ROOT, 3, 1),
    ]
    assert check(events) == [(6, "SEND of message 3 after END of message 1: a gap")]


def test_a_missing_try_is_a_gap_in_attempts() -> None:
    events = [
        Ev(INIT, ROOT, 0, 1),
        Ev(SEND, ROOT, 1, 1),
        Ev(ACK, ROOT, 1, 1),
        Ev(START, ROOT, 1, 1),
        Ev(ERROR, ROOT, 1, 1),
        # START and ERROR of try 2 are missing
        Ev(START, ROOT, 1, 3),
    ]
    assert check(events) == [(6, "START of try 3 after ERROR of try 1: a gap")]


def test_an_event_of_another_message_than_its_predecessor_is_a_gap() -> None:
    events = [Ev(INIT, ROOT, 0, 1), Ev(SEND, ROOT, 1, 1), Ev(ACK, ROOT, 2, 1)]
    assert check(events) == [(3, "ACK of message 2 after SEND of message 1: a gap")]


def test_a_resend_of_the_same_message_is_no_problem() -> None:
    events = [Ev(INIT, ROOT, 0, 1), Ev(SEND, ROOT, 1, 1), Ev(SEND, ROOT, 1, 1), Ev(ACK, ROOT, 1, 1)]
    assert check(events) == []


def test_a_child_branch_must_start_with_what_may_follow_its_parents_end() -> None:
    events = task_history([OK], fork=[[OK], [OK]])
    first_kid = events[5].branch
    assert events[5].event is SEND
    del events[5]  # the SEND to the first child never arrived; the second one forks it
    problems = check(events)
    assert len(problems) == 1, problems
    assert problems[0][1].startswith("ACK cannot follow END")
    assert events[problems[0][0] - 1] == Ev(ACK, first_kid, 2, 1, "pool2")


def test_a_history_that_starts_with_something_else_than_init_or_send_is_named() -> None:
    assert check([Ev(ACK, ROOT, 1, 1)]) == [
        (1, "ACK cannot follow nothing (expected INIT or SEND)")
    ]


def test_a_propagated_hop_and_a_router_step_make_a_valid_history() -> None:
    events = [
        Ev(INIT, ROOT, 0, 1),
        Ev(SEND, ROOT, 1, 1),
        Ev(ACK, ROOT, 1, 1, "split"),  # a router step's forwarding is its START..END
        Ev(START, ROOT, 1, 1, "split"),
        Ev(END, ROOT, 1, 1, "split"),
        Ev(SEND, ROOT, 2, 1, "split"),
        Ev(ACK, ROOT, 2, 1, "cpu.queue"),  # a full pool propagates to another satellite
        Ev(PROPAGATE, ROOT, 3, 1, "cpu.queue"),
        Ev(ACK, ROOT, 3, 1, "cpu.queue"),
        Ev(START, ROOT, 3, 1, "cpu"),
        Ev(END, ROOT, 3, 1, "cpu", children=()),
        Ev(HAPPY_END, ROOT, 3, 1, "cpu"),
    ]
    assert check(events) == []
    machine, outcomes = run(events)
    assert ended_on(outcomes) == [len(events) - 1]
    assert machine.state is HAPPY_END


def test_a_condition_that_fails_at_a_router_step_is_a_valid_failure() -> None:
    events = [
        Ev(INIT, ROOT, 0, 1),
        Ev(SEND, ROOT, 1, 1),
        Ev(ACK, ROOT, 1, 1, "split"),
        Ev(START, ROOT, 1, 1, "split"),
        Ev(ERROR, ROOT, 1, 1, "split", error="condition: KeyError: 'x'"),
        Ev(FAILURE, ROOT, 1, 1, "split", error="condition: KeyError: 'x'"),
    ]
    machine, outcomes = run(events)
    assert machine.problems() == []
    assert ended_on(outcomes) == [5]
    assert machine.state is FAILURE
    assert machine.error == "condition: KeyError: 'x'"


# ---------------------------------------------------------------------------
# one task's life in the machine


def test_a_task_applied_in_order_moves_through_its_states() -> None:
    events = task_history([OK, ((ERROR,), False)])
    machine = TaskMachine(TASK_ID, "job")
    states = []
    errors = []
    for ev in events:
        outcome = ev.apply_to(machine)
        states.append((machine.state, outcome.over))
        errors.append(machine.error)
    assert [s for s, _ in states] == [ev.event for ev in events]
    assert [over for _, over in states] == [False] * (len(events) - 1) + [True]
    assert machine.step == "pool2"
    assert machine.attempt == 2
    # the error of try 1 is the current one while the hop is tried again, not after the end
    assert errors[-2] == "ERROR 1"
    assert machine.error == ""
    assert machine.tseq == len(events)
    assert [tseq for *_, tseq in machine.history] == list(range(1, len(events) + 1))


def test_a_task_that_is_never_created_never_ends() -> None:
    events = [ev for ev in task_history([OK]) if ev.event is not INIT]
    machine, outcomes = run(events)
    assert not machine.rooted
    assert not machine.closed
    assert ended_on(outcomes) == []


@SETTINGS
@given(any_history, st.data())
def test_any_order_in_which_producers_report_ends_the_task_once_on_its_last_event(
    events: list[Ev], data: st.DataObject
) -> None:
    arrival = data.draw(producer_orders(events))
    machine, outcomes = run(arrival)
    assert ended_on(outcomes) == [len(arrival) - 1]
    assert all(outcome.flag == "" for outcome in outcomes)
    assert machine.problems() == []
    assert machine.closed
    assert machine.state is final_state(events)


@NO_SHRINK
@given(any_history, st.data())
def test_any_order_at_all_of_a_complete_history_ends_the_task_once_on_its_last_event(
    events: list[Ev], data: st.DataObject
) -> None:
    arrival = data.draw(st.permutations(events))
    machine, outcomes = run(arrival)
    ends = ended_on(outcomes)
    assert ends == [len(arrival) - 1], (
        f"over after {brief(arrival[: ends[0] + 1])} (before {brief(arrival[ends[0] + 1 :])})"
        if ends
        else f"never over: {brief(arrival)}"
    )
    assert all(outcome.flag == "" for outcome in outcomes)
    assert machine.problems() == []
    assert machine.state is final_state(events)


@pytest.mark.parametrize(
    "fork_kind", ["a pool's END", "a router step's END", "the orchester's INIT"]
)
def test_a_fan_out_does_not_end_before_the_event_that_forked_it(fork_kind: str) -> None:
    if fork_kind == "a pool's END":
        events = task_history([OK], fork=[[OK], [OK]])
        forking = next(ev for ev in events if ev.event is END and ev.children)
    elif fork_kind == "a router step's END":
        kids = (child_branch(TASK_ID, ROOT, 1, "a", 0), child_branch(TASK_ID, ROOT, 1, "b", 1))
        events = [
            Ev(INIT, ROOT, 0, 1),
            Ev(SEND, ROOT, 1, 1),
            Ev(ACK, ROOT, 1, 1, "split"),
            Ev(START, ROOT, 1, 1, "split"),
            Ev(END, ROOT, 1, 1, "split", children=kids),
        ]
        for kid in kids:
            events.append(Ev(SEND, kid, 2, 1, "split", parent=ROOT, children=kids))
            events.extend(journey(kid, 2, [OK]))
        forking = events[4]
    else:
        events = submitted_to_many([[OK], [OK]])
        forking = events[0]
    late = [ev for ev in events if ev != forking] + [forking]
    _, outcomes = run(late)
    assert ended_on(outcomes[:-1]) == [], f"the task ended before {fork_kind} arrived"
    assert ended_on(outcomes) == [len(late) - 1]


@pytest.mark.parametrize(
    ("case", "hops", "late"),
    [
        ("a terminus whose START and END come last", [OK], {(START, 1, 1), (END, 1, 1)}),
        ("a hop whose START and END come last", [OK, OK], {(START, 1, 1), (END, 1, 1)}),
        ("a failed try whose START comes last", [((ERROR,), True)], {(START, 1, 1)}),
        ("a timed out try whose START comes last", [((TIMEOUT,), False)], {(START, 1, 1)}),
    ],
)
def test_a_pool_hop_whose_start_comes_late_is_not_taken_for_a_router_step(
    case: str, hops: list[Hop], late: set[tuple[Event, int, int]]
) -> None:
    events = task_history(hops)
    arrival = [ev for ev in events if (ev.event, ev.seq, ev.attempt) not in late]
    arrival += [ev for ev in events if (ev.event, ev.seq, ev.attempt) in late]
    _, outcomes = run(arrival)
    assert ended_on(outcomes) == [len(arrival) - 1], f"{case}: the task ended before it came"


@SETTINGS
@given(st.integers(1, 4).map(lambda n: task_history([OK] * n)), st.data())
def test_a_task_without_retries_or_fan_out_missing_any_one_event_never_ends_by_itself(
    events: list[Ev], data: st.DataObject
) -> None:
    missing = data.draw(st.integers(0, len(events) - 1))
    rest = events[:missing] + events[missing + 1 :]
    machine, outcomes = run(data.draw(producer_orders(rest)))
    assert ended_on(outcomes) == []
    assert not machine.over
    if events[missing].event is not INIT and missing not in last_of_their_branch(events):
        assert machine.problems(), f"no problem without {events[missing]}"


@NO_SHRINK
@given(any_history, st.data())
def test_a_task_missing_any_one_event_never_ends_by_itself(
    events: list[Ev], data: st.DataObject
) -> None:
    missing = data.draw(st.integers(0, len(events) - 1))
    rest = events[:missing] + events[missing + 1 :]
    machine, outcomes = run(data.draw(producer_orders(rest)))
    gone = events[missing]
    assert ended_on(outcomes) == [], f"over without {brief([gone])}, after {brief(rest)}"
    if gone.event is not INIT and missing not in last_of_their_branch(events):
        assert machine.problems(), f"no problem without {gone}"


def test_a_history_that_came_in_order_is_not_checked_whole_again_when_it_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks: list[int] = []

    def counted(*args: Any) -> list[tuple[int, str]]:
        checks.append(1)
        return check_history(*args)

    monkeypatch.setattr("dsat.fsm.check_history", counted)
    events = task_history([OK, ((ERROR,), False), OK])
    _, outcomes = run(events)
    assert ended_on(outcomes) == [len(events) - 1]
    assert checks == []  # each event was checked against the one before it, as it came

    # the END of the first hop after the ACK of the second: checked whole when it closes
    end = next(i for i, ev in enumerate(events) if ev.event is END)
    late = events[:end] + events[end + 2 : end + 3] + events[end : end + 2] + events[end + 3 :]
    _, outcomes = run(late)
    assert ended_on(outcomes) == [len(late) - 1]
    assert checks


def told(events: Sequence[Ev], *, whole: bool) -> list[tuple[bool, Event | None, str]]:
    """What a machine says after each event: over, state, flag. ``whole``: it checks the
    whole history at every close, as if no event had come in order and no count of its
    bad transitions were kept."""
    machine = TaskMachine(TASK_ID, "job")
    said = []
    for i, ev in enumerate(events):
        if whole:
            machine._in_order, machine._bad = False, -1
        outcome = ev.apply_to(machine, at=1000.0 + i)
        said.append((outcome.over, machine.state, outcome.flag))
    return said


@NO_SHRINK
@given(any_history, st.data())
def test_checking_as_events_come_says_what_checking_the_whole_history_says(
    events: list[Ev], data: st.DataObject
) -> None:
    change = data.draw(st.sampled_from(["whole", "one missing", "one twice"]))
    index = data.draw(st.integers(0, len(events) - 1))
    if change == "one missing":
        events = events[:index] + events[index + 1 :]
    elif change == "one twice":
        events = events[: index + 1] + events[index:]
    arrival = data.draw(st.one_of(producer_orders(events), st.permutations(events)))
    assert told(arrival, whole=False) == told(arrival, whole=True), brief(arrival)


@settings(SETTINGS, max_examples=50)
@given(any_history, st.data())
def test_a_duplicate_is_flagged_and_changes_nothing(events: list[Ev], data: st.DataObject) -> None:
    arrival = data.draw(producer_orders(events))
    machine = TaskMachine(TASK_ID, "job")
    seen: list[Ev] = []
    firsts: list[Outcome] = []
    for ev in arrival:
        outcome = ev.apply_to(machine)
        assert outcome.flag == ""
        firsts.append(outcome)
        seen.append(ev)
        for again in data.draw(st.lists(st.sampled_from(seen), max_size=2)):
            before = snapshot(machine)
            duplicates = machine.duplicates
            outcome = again.apply_to(machine)
            assert outcome.flag == "duplicate"
            assert not outcome.over
            assert snapshot(machine) == before
            assert machine.duplicates == duplicates + 1
    assert ended_on(firsts) == [len(arrival) - 1]
    assert machine.problems() == []
    assert machine.state is final_state(events)


def test_every_arrival_gets_a_tseq_duplicates_included() -> None:
    events = task_history([OK])
    machine = TaskMachine(TASK_ID)
    tseqs = [events[0].apply_to(machine).tseq, events[0].apply_to(machine).tseq]
    tseqs.append(events[1].apply_to(machine).tseq)
    assert tseqs == [1, 2, 3]
    assert [tseq for *_, tseq in machine.history] == [1, 3]


def test_two_different_events_in_one_place_are_a_conflict_that_changes_nothing() -> None:
    events = task_history([OK])
    machine, _ = run(events[:4])  # INIT, SEND, ACK, START
    end = Ev(END, ROOT, 1, 1, "pool1")
    end.apply_to(machine)
    before = snapshot(machine)
    outcome = Ev(ERROR, ROOT, 1, 1, "pool1", error="boom").apply_to(machine)
    assert outcome.flag == "conflict: ERROR where END was"
    assert not outcome.over
    assert snapshot(machine) == before
    assert machine.error == ""


def test_a_fan_out_with_one_failed_branch_ends_in_failure() -> None:
    events = task_history([OK], fork=[[OK, OK], [((ERROR, TIMEOUT), True)], [OK]])
    machine, outcomes = run(events)
    failed_branch = next(ev.branch for ev in events if ev.event is FAILURE)
    assert ended_on(outcomes) == [len(events) - 1]
    assert machine.state is FAILURE
    assert set(machine.failed or ()) == {failed_branch}
    assert machine.error == "gave up at pool2"


def test_the_task_is_not_over_while_one_branch_still_runs() -> None:
    events = task_history([OK], fork=[[OK], [OK]])
    kid = events[-1].branch
    running = [ev for ev in events if not (ev.branch == kid and ev.event is HAPPY_END)]
    machine, outcomes = run(running)
    assert ended_on(outcomes) == []
    assert not machine.closed
    assert machine.problems() == []


def retried(events: list[Ev]) -> list[Ev]:
    """What ``Orchester.on_resend`` emits for a dead letter, then the new run to a HAPPY_END."""
    failed = next(ev for ev in events if ev.event is FAILURE)
    branch, seq, attempt = failed.branch, failed.seq, failed.attempt
    return [
        Ev(RETRY, branch, seq + 1, attempt + 1),  # the orchester reports both
        Ev(SEND, branch, seq + 2, 1),
        *journey(branch, seq + 2, [OK]),
    ]


def test_a_retry_after_failure_reopens_the_task_until_the_new_run_ends() -> None:
    failing = task_history([OK, ((ERROR, ERROR), True)])
    machine, _ = run(failing)
    assert machine.over
    assert machine.state is FAILURE
    again = retried(failing)
    outcome = again[0].apply_to(machine)
    assert outcome.flag == ""
    assert not outcome.over
    assert not machine.over
    assert machine.state is RETRY
    assert not machine.failed
    later = [ev.apply_to(machine) for ev in again[1:]]
    assert ended_on(later) == [len(later) - 1]
    assert machine.state is HAPPY_END
    assert machine.problems() == []


@SETTINGS
@given(hop_lists(), st.data())
def test_a_retried_task_ends_once_whatever_the_order_of_both_runs(
    hops: list[Hop], data: st.DataObject
) -> None:
    hops[-1] = data.draw(failing_hop)
    failing = task_history(hops)
    machine, outcomes = run(data.draw(producer_orders(failing)))
    assert ended_on(outcomes) == [len(failing) - 1]
    assert machine.state is FAILURE
    again = retried(failing)
    later = [again[0].apply_to(machine)]
    later += [ev.apply_to(machine) for ev in data.draw(producer_orders(again[1:]))]
    assert ended_on(later) == [len(later) - 1]
    assert machine.state is HAPPY_END
    assert machine.problems() == []


# ---------------------------------------------------------------------------
# force_end


def test_force_end_ends_a_closed_task_with_missing_events_and_names_them() -> None:
    events = task_history([OK, OK, OK])
    missing = next(ev for ev in events if ev.event is ACK and ev.seq == 2)
    machine, outcomes = run([ev for ev in events if ev != missing])
    assert machine.closed
    assert not machine.over
    assert ended_on(outcomes) == []
    problems = machine.force_end()
    assert problems == machine.problems()
    assert [reason for _, reason in problems] == ["START cannot follow SEND (expected ACK, SEND)"]
    assert machine.over
    assert machine.state is HAPPY_END
    assert machine.deadline == 0.0


def test_force_end_of_a_failed_branch_ends_in_failure() -> None:
    events = task_history([OK, ((TIMEOUT,), True)])
    missing = next(ev for ev in events if ev.event is END)
    machine, _ = run([ev for ev in events if ev != missing])
    assert machine.closed
    assert not machine.over
    problems = machine.force_end()
    assert len(problems) == 1
    assert machine.state is FAILURE


def test_the_late_event_after_force_end_leaves_the_task_ended_without_problems() -> None:
    events = task_history([OK, OK])
    missing = next(ev for ev in events if ev.event is START and ev.seq == 1)
    machine, _ = run([ev for ev in events if ev != missing])
    assert machine.force_end()
    outcome = missing.apply_to(machine)
    assert outcome.flag == ""
    assert outcome.over
    assert machine.state is HAPPY_END
    assert machine.problems() == []


# ---------------------------------------------------------------------------
# what a machine keeps: every event once, packed


def test_the_history_is_every_event_once_in_arrival_order_packed_or_not() -> None:
    # the root's places pack into integers; a fan-out's branch ids are too large to
    events = task_history([OK], fork=[[OK], [OK]])
    assert any(ev.branch >= 2**21 for ev in events)
    arrival = events[::2] + events[1::2]
    machine, outcomes = run(arrival)
    assert ended_on(outcomes) == [len(arrival) - 1]
    assert [(place, branch, event) for place, branch, event, _ in machine.history] == [
        (position(ev.event, ev.seq, ev.attempt), ev.branch, ev.event) for ev in arrival
    ]
    assert [tseq for *_, tseq in machine.history] == list(range(1, len(arrival) + 1))


@pytest.mark.parametrize(
    ("seq", "attempt"), [(1, 1), (2**24, 1), (1, 2**16), (2**40, 2**20)], ids=str
)
def test_a_duplicate_or_a_conflict_is_found_wherever_the_place_is_kept(
    seq: int, attempt: int
) -> None:
    machine = TaskMachine(TASK_ID)
    machine.apply(START, ROOT, seq, attempt, "pool1")
    assert machine.apply(START, ROOT, seq, attempt, "pool1").flag == "duplicate"
    assert machine.apply(END, ROOT, seq, attempt, "pool1").flag == ""
    assert machine.apply(ERROR, ROOT, seq, attempt, "pool1").flag == "conflict: ERROR where END was"
    assert [(place, event) for place, _, event, _ in machine.history] == [
        ((seq, attempt, RANK[START]), START),
        ((seq, attempt, RANK[END]), END),
    ]


def test_a_machine_keeps_a_handful_of_objects_however_long_its_history() -> None:
    """The tracker holds thousands of machines; each small object one keeps pins the
    allocator's memory around it (docs/performance.md). A 3-hop task: 14 events."""
    histories = [task_history([OK, OK, OK]) for _ in range(200)]
    assert len(histories[0]) == 14
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        machines = [run(history)[0] for history in histories]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = [s for s in after.compare_to(before, "filename") if "dsat/fsm.py" in str(s.traceback)]
    objects = sum(s.count_diff for s in kept) / len(machines)
    size = sum(s.size_diff for s in kept) / len(machines)
    assert all(m.over for m in machines)
    assert objects <= 12, f"{objects:.1f} objects per machine"
    assert size <= 1200, f"{size:.0f} bytes per machine"


# ---------------------------------------------------------------------------
# what the task shows while branches live, and once over


def test_a_branch_that_ends_does_not_end_the_task_while_another_runs() -> None:
    events = task_history([OK], fork=[[OK], [OK, OK]])
    second = next(ev.branch for ev in events if ev.seq == 3)  # the branch with two hops
    first = next(ev.branch for ev in events if ev.parent and ev.branch != second)
    done = next(ev for ev in events if ev.branch == first and ev.event is HAPPY_END)
    started = position(START, 3, 1)
    running = [
        ev
        for ev in events
        if ev != done and (ev.branch != second or position(ev.event, ev.seq, ev.attempt) <= started)
    ]
    machine, outcomes = run([*running, done])  # the first branch's end comes last
    assert ended_on(outcomes) == []
    assert (running[-1].event, running[-1].step) == (START, "pool3")
    assert (machine.state, machine.step) == (START, "pool3")  # the live branch's


def test_a_branch_that_ends_before_the_others_start_leaves_the_task_where_it_was() -> None:
    events = task_history([OK], fork=[[OK], [OK]])
    first = next(ev.branch for ev in events if ev.parent)
    fork = next(ev for ev in events if ev.children and ev.event is END)
    machine, _ = run(events[: events.index(fork) + 1])
    for ev in events:
        if ev.branch == first:
            ev.apply_to(machine)
    assert machine.state is not HAPPY_END  # the other branch has no event of its own yet
    assert not machine.over


@SETTINGS
@given(fan_out_histories(), st.data())
def test_a_fan_out_shows_no_end_while_a_branch_is_live(
    events: list[Ev], data: st.DataObject
) -> None:
    forked = {ev.parent for ev in events if ev.parent} | {
        ev.branch for ev in events if ev.event is END and ev.children
    }
    machine = TaskMachine(TASK_ID, "job")
    heads: dict[int, Ev] = {}
    for ev in data.draw(producer_orders(events)):
        outcome = ev.apply_to(machine)
        head = heads.get(ev.branch)
        if head is None or position(ev.event, ev.seq, ev.attempt) > position(
            head.event, head.seq, head.attempt
        ):
            heads[ev.branch] = ev
        live = [h for b, h in heads.items() if b not in forked and h.event not in TERMINAL]
        if not outcome.over and live:
            assert machine.state not in TERMINAL, brief(events)


def test_a_failed_fan_out_names_the_branch_that_failed_even_when_another_ends_last() -> None:
    events = task_history([OK], fork=[[((ERROR, ERROR), True)], [OK, OK]])
    failed = next(ev for ev in events if ev.event is FAILURE)
    machine, outcomes = run(events)  # the failing branch's events first, the other's last
    assert events[-1].event is HAPPY_END
    assert events[-1].branch != failed.branch
    assert ended_on(outcomes) == [len(events) - 1]
    assert machine.state is FAILURE
    assert (machine.step, machine.attempt) == (failed.step, failed.attempt)
    assert machine.error == "gave up at pool2"


def test_a_retry_clears_the_error_that_failed_the_task() -> None:
    failing = task_history([OK, ((ERROR, ERROR), True)])
    machine, _ = run(failing)
    assert machine.error == "gave up at pool2"
    again = retried(failing)
    again[0].apply_to(machine)
    assert machine.error == ""
    for ev in again[1:]:
        ev.apply_to(machine)
    assert (machine.state, machine.error) == (HAPPY_END, "")


def test_an_error_is_the_current_one_until_the_task_ends_well() -> None:
    events = task_history([((ERROR, TIMEOUT), False)])
    machine = TaskMachine(TASK_ID, "job")
    for ev in events[:-3]:  # up to the TIMEOUT of try 2
        ev.apply_to(machine)
    assert machine.error == "TIMEOUT 2"
    for ev in events[-3:]:
        ev.apply_to(machine)
    assert (machine.state, machine.error) == (HAPPY_END, "")
