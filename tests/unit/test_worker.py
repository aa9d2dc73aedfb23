"""Running a user's function inside the state machine: its signature, its outcome, its timeout."""

from __future__ import annotations

import functools
import operator
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dsat.worker import (
    Attempt,
    StepFunction,
    StepTimeoutError,
    Task,
    run_attempt,
    state_wrapper,
    step,
)

TASK = Task(
    task_id="0190a1b2c3d4beef000001",
    job_id="job",
    step="cpu",
    attempt=2,
    satellite="local",
    options={"unit": "ms"},
    branch=1,
)


@pytest.fixture(autouse=True)
def no_alarm_left() -> Iterator[None]:
    """Every test leaves SIGALRM as it found it: no handler of ours, no timer running."""
    before = signal.getsignal(signal.SIGALRM)
    yield
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


# ---------------------------------------------------------------------------
# the signatures a step function may have


def one(payload: Any) -> Any:
    """Takes the payload only."""
    return ("one", payload)


def two(payload: Any, task: Task) -> Any:
    return ("two", payload, task.attempt)


def three(base: int, payload: Any, task: Task) -> Any:
    return ("three", base, payload, task.step)


def variadic(*args: Any) -> Any:
    return ("variadic", len(args))


def keyword_only(payload: Any, *, scale: int = 10) -> Any:
    return ("keyword_only", payload * scale)


class PayloadOnly:
    def __call__(self, payload: Any) -> Any:
        return ("object", payload)


class WithTask:
    def __call__(self, payload: Any, task: Task) -> Any:
        return ("object+task", payload, task.task_id)


class Holder:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def method(self, payload: Any) -> Any:
        return (self.tag, payload)

    def method_with_task(self, payload: Any, task: Task) -> Any:
        return (self.tag, payload, task.options["unit"])


@pytest.mark.parametrize(
    ("func", "payload", "expected"),
    [
        pytest.param(one, 5, ("one", 5), id="f(payload)"),
        pytest.param(two, 5, ("two", 5, 2), id="f(payload, task)"),
        pytest.param(lambda x: x + 1, 5, 6, id="a lambda of the payload"),
        pytest.param(lambda x, t: (x, t.job_id), 5, (5, "job"), id="a lambda with the task"),
        pytest.param(len, [1, 2, 3], 3, id="builtin len"),
        pytest.param(abs, -4, 4, id="builtin abs"),
        pytest.param(sorted, [3, 1], [1, 3], id="builtin sorted"),
        pytest.param(str.upper, "ab", "AB", id="a method descriptor"),
        pytest.param(operator.neg, 2, -2, id="an operator"),
        pytest.param(functools.partial(operator.mul, 3), 4, 12, id="partial with one left"),
        pytest.param(functools.partial(pow, exp=2), 5, 25, id="partial with a keyword"),
        pytest.param(functools.partial(three, 7), 5, ("three", 7, 5, "cpu"), id="partial + task"),
        pytest.param(PayloadOnly(), 5, ("object", 5), id="a callable object"),
        pytest.param(
            WithTask(), 5, ("object+task", 5, TASK.task_id), id="a callable object with the task"
        ),
        pytest.param(Holder("h").method, 5, ("h", 5), id="a bound method"),
        pytest.param(Holder("h").method_with_task, 5, ("h", 5, "ms"), id="a bound method + task"),
        pytest.param(variadic, 5, ("variadic", 2), id="f(*args) gets both"),
        pytest.param(keyword_only, 5, ("keyword_only", 50), id="keyword-only options are kept"),
        pytest.param(str, 5, "5", id="a type"),
    ],
)
def test_a_step_function_is_called_with_what_its_signature_takes(
    func: Any, payload: Any, expected: Any
) -> None:
    assert state_wrapper(func)(payload, TASK) == expected


def test_the_wrapper_keeps_the_functions_name_and_doc() -> None:
    wrapped = state_wrapper(one)
    assert wrapped.__name__ == "one"
    assert wrapped.__doc__ == "Takes the payload only."
    assert wrapped.__wrapped__ is one  # type: ignore[attr-defined]


def test_wrapping_twice_is_wrapping_once() -> None:
    wrapped = state_wrapper(two)
    assert state_wrapper(wrapped) is wrapped
    assert state_wrapper(wrapped)(1, TASK) == ("two", 1, 2)


def test_step_is_the_decorator_spelling_of_state_wrapper() -> None:
    @step
    def double(n: int) -> int:
        return n * 2

    assert step is state_wrapper
    assert double(21, TASK) == 42


# ---------------------------------------------------------------------------
# one try: END, ERROR, the next steps


def test_a_function_that_returns_ends_with_its_value() -> None:
    outcome = run_attempt(state_wrapper(lambda x: {"sum": sum(x)}), [1, 2], TASK, 1.0)
    assert outcome.status == "END"
    assert outcome.value == {"sum": 3}
    assert outcome.error == ""
    assert outcome.targets == ()
    assert 0.0 <= outcome.elapsed < 1.0


def test_the_next_steps_are_those_whose_condition_holds() -> None:
    conditions = (
        ("always", None),
        ("big", state_wrapper(lambda v: v > 10)),
        ("small", state_wrapper(lambda v: v <= 10)),
        ("retried", state_wrapper(lambda v, t: t.attempt > 1)),
    )
    outcome = run_attempt(state_wrapper(lambda x: x * 2), 3, TASK, 1.0, conditions)
    assert outcome == Attempt(
        "END", value=6, elapsed=outcome.elapsed, targets=("always", "small", "retried")
    )


def test_a_condition_that_raises_is_an_error_naming_its_target() -> None:
    def broken(value: Any) -> bool:
        return bool(value["missing"])

    conditions = (("csv", None), ("db", state_wrapper(broken)))
    outcome = run_attempt(state_wrapper(lambda x: {"n": x}), 1, TASK, 1.0, conditions)
    assert outcome.status == "ERROR"
    assert outcome.error == "condition for db: KeyError: 'missing'"
    assert outcome.targets == ()


def test_an_exception_is_an_error_with_its_type_and_message() -> None:
    def fails(payload: Any) -> Any:
        raise ValueError(f"cannot parse {payload!r}")

    outcome = run_attempt(state_wrapper(fails), "x", TASK, 1.0)
    assert outcome.status == "ERROR"
    assert outcome.error == "ValueError: cannot parse 'x'"
    assert outcome.value is None


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    def fails(payload: Any) -> Any:
        raise LookupError

    assert run_attempt(state_wrapper(fails), 1, TASK, 1.0).error == "LookupError"


def test_conditions_are_not_asked_when_the_function_failed() -> None:
    asked = []

    def condition(value: Any) -> bool:
        asked.append(value)
        return True

    outcome = run_attempt(
        state_wrapper(lambda x: 1 / 0), 1, TASK, 1.0, (("csv", state_wrapper(condition)),)
    )
    assert outcome.status == "ERROR"
    assert outcome.error == "ZeroDivisionError: division by zero"
    assert asked == []


# ---------------------------------------------------------------------------
# the timeout

TIMEOUT = 0.2


def test_a_function_sleeping_past_its_timeout_is_interrupted_promptly() -> None:
    started = time.monotonic()
    outcome = run_attempt(state_wrapper(lambda x: time.sleep(5)), 1, TASK, TIMEOUT)
    took = time.monotonic() - started
    assert outcome.status == "TIMEOUT"
    assert outcome.error == "ran past its timeout of 0.2s"
    assert TIMEOUT <= outcome.elapsed < 1.0
    assert took < 1.0


def test_a_busy_loop_past_its_timeout_is_interrupted_promptly() -> None:
    def spin(payload: Any) -> int:
        deadline = time.monotonic() + 3.0  # bounded, should the alarm never come
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return n

    started = time.monotonic()
    outcome = run_attempt(state_wrapper(spin), 1, TASK, TIMEOUT)
    assert outcome.status == "TIMEOUT"
    assert time.monotonic() - started < 1.0


def test_except_exception_in_user_code_does_not_swallow_the_timeout() -> None:
    def careless(payload: Any) -> str:
        try:
            time.sleep(5)
        except Exception:
            return "swallowed"
        return "slept"

    started = time.monotonic()
    outcome = run_attempt(state_wrapper(careless), 1, TASK, TIMEOUT)
    assert outcome.status == "TIMEOUT"
    assert outcome.value is None
    assert time.monotonic() - started < 1.0


def test_a_function_that_catches_the_timeout_and_returns_late_still_timed_out() -> None:
    def stubborn(payload: Any) -> str:
        try:
            time.sleep(5)
        except StepTimeoutError:
            time.sleep(0.05)
            return "late"
        return "slept"

    started = time.monotonic()
    outcome = run_attempt(state_wrapper(stubborn), 1, TASK, TIMEOUT, (("csv", None),))
    assert outcome.status == "TIMEOUT"
    assert outcome.error.startswith("ran 0.2")
    assert outcome.error.endswith("past its timeout of 0.2s")
    assert outcome.elapsed > TIMEOUT
    assert outcome.targets == ()
    assert time.monotonic() - started < 1.0


def test_the_timeout_is_a_base_exception_so_except_exception_misses_it() -> None:
    assert issubclass(StepTimeoutError, BaseException)
    assert not issubclass(StepTimeoutError, Exception)


def test_a_function_done_in_time_is_not_interrupted_afterwards() -> None:
    outcome = run_attempt(state_wrapper(lambda x: x), 1, TASK, TIMEOUT)
    assert outcome.status == "END"
    time.sleep(TIMEOUT + 0.1)  # the alarm, had it stayed armed, would fire here


def test_a_previous_alarm_handler_is_put_back() -> None:
    calls: list[int] = []

    def mine(signum: int, frame: Any) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        run_attempt(state_wrapper(lambda x: time.sleep(1)), 1, TASK, 0.05)
        assert signal.getsignal(signal.SIGALRM) is mine
        assert calls == []
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_a_worker_owns_the_alarm_and_each_try_still_times_out() -> None:
    # a worker sets the handler once (own_alarm); its tries then leave it in place, and a
    # function that sets its own handler gets ours back for the next try. In a child
    # process: this one keeps its SIGALRM as it was.
    script = textwrap.dedent(
        """
        import signal, time
        from dsat.worker import Task, _on_alarm, own_alarm, run_attempt, state_wrapper

        task = Task("t", "j", "s", 1, "local")
        own_alarm()
        assert run_attempt(state_wrapper(lambda x: x + 1), 1, task, 1.0).value == 2
        assert signal.getsignal(signal.SIGALRM) is _on_alarm
        slow = run_attempt(state_wrapper(lambda x: time.sleep(5)), 1, task, 0.05)
        assert slow.status == "TIMEOUT", slow
        assert signal.getsignal(signal.SIGALRM) is _on_alarm

        def rude(x):
            signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the function takes it over
            return x

        run_attempt(state_wrapper(rude), 1, task, 1.0)
        again = run_attempt(state_wrapper(lambda x: time.sleep(5)), 1, task, 0.05)
        assert again.status == "TIMEOUT", again
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok", run.stdout + run.stderr


def busy_for(seconds: float) -> StepFunction:
    def busy(payload: Any) -> Any:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return payload

    return state_wrapper(busy)


def test_an_alarm_right_as_the_function_returns_never_escapes_run_attempt() -> None:
    # Functions ending within +-50 us of a 2 ms timeout: the alarm comes before, during or
    # just after their return; whichever, the try is END or TIMEOUT and nothing escapes.
    handler = signal.getsignal(signal.SIGALRM)
    escaped = left_armed = 0
    statuses = set()
    for i in range(600):
        seconds = 0.002 + (i % 41 - 20) * 2.5e-6
        try:
            outcome = run_attempt(busy_for(seconds), i, TASK, 0.002)
        except StepTimeoutError:
            escaped += 1
        else:
            statuses.add(outcome.status)
        if signal.getsignal(signal.SIGALRM) is not handler:
            left_armed += 1
            signal.signal(signal.SIGALRM, handler)  # so that the next tries start clean
    assert (escaped, left_armed) == (0, 0), (
        f"StepTimeoutError escaped run_attempt in {escaped} of 600 tries, "
        f"and its SIGALRM handler stayed installed after {left_armed}"
    )
    assert statuses <= {"END", "TIMEOUT"}
