"""Workers: run a user function inside the task state machine.

A user writes plain functions. A step function takes the payload, and may take
a second argument, the :class:`Task` (task_id, job_id, step, attempt,
satellite, options)::

    def add_one(n: int) -> int:
        return n + 1

    @dsat.step
    def csv_row(row: dict, task: dsat.Task) -> None: ...

What the function returns is the payload of the next step (or the task's
result at a terminus). An exception is an ERROR and the task is tried again,
up to the step's ``retries``; running past ``timeout`` is a TIMEOUT.

A worker process is one of a pool's N identical processes. It connects to its
pool's queue router and to nothing else: it announces how many tasks it can
take (credit), runs each task it is given, and sends the outcome back to the
router, which reports the events and hands the result on.

Delivery is at least once: a function may see the same task twice (after a
worker died mid-task, say). ``task.task_id`` and ``task.attempt`` let it be
idempotent.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import collections
import contextlib
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

import zmq

from dsat.errors import MessageError
from dsat.message import (
    TaskRef,
    configure,
    control,
    dumps,
    loads,
    read_checked,
    recv_frames,
    send_tracked,
)
from dsat.topology import Link, Step, Topology, get_connection, resolve_call

log = logging.getLogger("dsat.worker")

HEARTBEAT: Final = 1.0  # an idle worker re-announces its credit this often (seconds)


@dataclass(frozen=True)
class Task:
    """What a step function knows of the task it runs (its optional second argument)."""

    task_id: str
    job_id: str
    step: str
    attempt: int
    satellite: str
    options: Mapping[str, Any] = field(default_factory=dict)
    branch: int = 1


class StepTimeoutError(BaseException):
    """Raised inside a step function that runs past its timeout.

    A BaseException, so that a function's own ``except Exception`` does not swallow it.
    """


StepFunction = Callable[[Any, Task], Any]


def state_wrapper(func: Callable[..., Any]) -> StepFunction:
    """Wrap a plain function (``f(payload)`` or ``f(payload, task)``) into a step function.

    The seed's name for :func:`step`; both return a callable taking ``(payload, task)``.
    """
    if getattr(func, "__dsat_step__", False):
        return func
    takes_task = _takes_two(func)

    def wrapped(payload: Any, task: Task) -> Any:
        return func(payload, task) if takes_task else func(payload)

    wrapped.__dsat_step__ = True  # type: ignore[attr-defined]
    wrapped.__wrapped__ = func  # type: ignore[attr-defined]
    wrapped.__name__ = getattr(func, "__name__", "step")
    wrapped.__doc__ = func.__doc__
    return wrapped


step = state_wrapper


def _takes_two(func: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    return variadic or len(positional) >= 2


# ---------------------------------------------------------------------------
# one try of one task


@dataclass(frozen=True)
class Attempt:
    """How one try went: END with the value to pass on, or ERROR/TIMEOUT with the reason."""

    status: str  # "END" | "ERROR" | "TIMEOUT"
    value: Any = None
    error: str = ""
    elapsed: float = 0.0
    targets: tuple[str, ...] = ()
    traceback: str = ""  # where the function raised: file, line and function of each frame
    final: bool = False  # an error no retry can mend: the task fails at once


_armed = False  # True only while a step function runs: a late alarm must not fire outside


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _armed:
        raise StepTimeoutError()


# signal.getsignal wraps the handler in an enum when it can, and fails over to
# the function only after an exception: 2.6 us per task. _signal hands it back as is.
_current_handler: Callable[[int], Any] = getattr(_signal, "getsignal", signal.getsignal)


def own_alarm() -> None:
    """Let SIGALRM interrupt step functions in this process from now on (a worker does,
    once): :func:`run_attempt` then neither sets nor restores the handler per task."""
    signal.signal(signal.SIGALRM, _on_alarm)


def run_attempt(
    func: StepFunction,
    payload: Any,
    task: Task,
    timeout: float,
    conditions: tuple[tuple[str, StepFunction | None], ...] = (),
) -> Attempt:
    """Run a step function with a timeout, then choose the next steps by their conditions.

    The timeout interrupts Python code with SIGALRM (the main thread only); a
    function stuck where a signal cannot reach it is the router's to kill.
    """
    global _armed
    started = time.monotonic()
    previous = _current_handler(signal.SIGALRM)
    ours = previous is _on_alarm
    if not ours:  # a function may have set its own: ours again, for this try
        signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                value = func(payload, task)
            finally:
                _armed = False  # first: the alarm may fire during this very block
                signal.setitimer(signal.ITIMER_REAL, 0)
        except StepTimeoutError:
            return Attempt(
                "TIMEOUT",
                error=f"ran past its timeout of {timeout:g}s",
                elapsed=time.monotonic() - started,
            )
        except BaseException as exc:
            # the user's function failed (sys.exit and KeyboardInterrupt included): that
            # is this task's ERROR, not the worker's end
            return Attempt(
                "ERROR",
                error=_describe(exc),
                elapsed=time.monotonic() - started,
                traceback=traceback_of(exc),
            )
    finally:
        if not ours:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
    elapsed = time.monotonic() - started
    if elapsed > timeout:  # it caught StepTimeoutError itself, or the alarm came too late
        return Attempt(
            "TIMEOUT",
            error=f"ran {elapsed:.3g}s, past its timeout of {timeout:g}s",
            elapsed=elapsed,
        )
    targets: list[str] = []
    for target, condition in conditions:
        if condition is None:
            targets.append(target)
            continue
        try:
            if condition(value, task):
                targets.append(target)
        except Exception as exc:  # the user's condition failed: an ERROR of this try
            return Attempt(
                "ERROR",
                error=f"condition for {target}: {_describe(exc)}",
                elapsed=elapsed,
                traceback=traceback_of(exc),
            )
    return Attempt("END", value=value, elapsed=elapsed, targets=tuple(targets))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_OWN_FILES: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAX_TRACEBACK: Final = 16 * 1024  # characters of a traceback kept (its end: the raise)


def traceback_of(exc: BaseException) -> str:
    """The user's part of an exception's traceback (dsat's own frames before it left
    out), as Python prints it: file, line and function of each frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    while frames and frames[0].filename.startswith(_OWN_FILES):
        del frames[0]
    text = "".join(
        [
            "Traceback (most recent call last):\n",
            *traceback.format_list(frames),
            *traceback.format_exception_only(type(exc), exc),
        ]
    )
    return text if len(text) <= MAX_TRACEBACK else "...\n" + text[-MAX_TRACEBACK:]


# Room a task message takes besides its payload (the version and a header), with margin.
HEADER_ROOM: Final = 4096


def encode_result(outcome: Attempt, topology: Topology, step_def: Step) -> tuple[Attempt, bytes]:
    """A try's outcome with its value encoded; an END whose value cannot be encoded, or
    does not fit in a message, becomes an ERROR no retry can mend (``final``)."""
    if outcome.status != "END":
        return outcome, b""
    try:
        data = dumps(
            outcome.value, step_def.serialization, allow_pickle=topology.defaults.allow_pickle
        )
    except MessageError as exc:
        return Attempt("ERROR", error=f"result: {exc}", elapsed=outcome.elapsed, final=True), b""
    limit = topology.defaults.max_message_size - HEADER_ROOM
    if len(data) > limit:
        return Attempt(
            "ERROR",
            error=f"result: {len(data)} bytes encoded, over the limit of {limit} bytes a "
            f"message can carry (max_message_size {topology.defaults.max_message_size})",
            elapsed=outcome.elapsed,
            final=True,
        ), b""
    return outcome, data


def conditions_of(
    topology: Topology, step_name: str
) -> tuple[tuple[str, StepFunction | None], ...]:
    """Each link out of a step, with its ``when`` condition wrapped (None: always)."""
    return tuple(
        (link.target, _condition(topology, link)) for link in topology.links_from(step_name)
    )


def _condition(topology: Topology, link: Link) -> StepFunction | None:
    if not link.when:
        return None
    return state_wrapper(resolve_call(link.when, topology.python_path))


def function_of(topology: Topology, step_def: Step) -> StepFunction:
    return state_wrapper(resolve_call(step_def.call, topology.python_path))


# ---------------------------------------------------------------------------
# the worker process


class Worker:
    """One process of a pool: takes tasks from its queue router, runs them, answers.

    It tells its router when a task starts: in the answer of the task before it
    (``next``), or, when it was idle, with a ``start``; so the router records START
    only for what really runs. Before it runs a function, what it sent has left the
    process: a function that kills it (``os._exit``, a crash) cannot take the answer
    of the task before along, and the router charges the death to that function's
    task alone.
    """

    def __init__(
        self,
        topology: Topology,
        step_name: str,
        *,
        satellite: str,
        wid: str,
        context: zmq.Context[zmq.Socket[bytes]],
        capacity: int | None = None,
        run: str = "",
    ) -> None:
        self.topology = topology
        self.step = topology.steps[step_name]
        self.satellite = satellite
        self.wid = wid
        self.run_id = run
        self.capacity = capacity or topology.steps[step_name].prefetch
        self.func = function_of(topology, self.step)
        self.conditions = conditions_of(topology, step_name)
        self.stopping = False
        self.inbox: collections.deque[tuple[TaskRef, bytes]] = collections.deque()
        self.sent: zmq.MessageTracker | None = None  # the last message, until it left
        self.running: TaskRef | None = None
        plan = get_connection(topology, step_name, satellite=satellite)
        self.socket = context.socket(zmq.DEALER)
        configure(
            self.socket, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size
        )
        self.socket.copy_threshold = 0  # every frame sent is tracked (see send_tracked)
        self.socket.setsockopt(zmq.ROUTING_ID, f"{wid}/{os.getpid()}".encode())
        for address in plan.socket("work").addresses:
            self.socket.connect(address)

    def stop(self) -> None:
        """Finish the task at hand, then leave; what it was given and did not start goes
        back to the router untouched."""
        self.stopping = True

    def run(self) -> None:
        own_alarm()
        os._exit = self._exit  # type: ignore[assignment]
        self._announce()
        last_heard = time.monotonic()
        idle = True  # the router knows of no task this worker runs
        while not self.stopping:
            if not self.inbox:
                if not self.socket.poll(int(HEARTBEAT * 1000)):
                    self._announce()
                    continue
                self._receive()
                last_heard = time.monotonic()
                continue
            ref, payload = self.inbox.popleft()
            if idle:
                self._send(self._control("start", {"key": _key(ref), "attempt": ref.attempt}))
            self._answer(ref, payload)
            idle = not self.inbox
            if time.monotonic() - last_heard > HEARTBEAT:
                self._announce()
                last_heard = time.monotonic()
        self._send(self._control("bye", {"pid": os.getpid(), "wid": self.wid}))

    def _receive(self) -> None:
        """Take every message the router sent (one task message, or several in a row)."""
        while True:
            try:
                frames = recv_frames(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return
            if not frames or len(frames) % 3:
                log.warning("ignored a malformed message from the router: %d frames", len(frames))
                continue
            for start in range(0, len(frames), 3):
                try:
                    ref = read_checked(frames[start : start + 3])
                except MessageError as exc:
                    log.warning("ignored a malformed message from the router: %s", exc)
                    continue
                self.inbox.append((ref, frames[start + 2]))

    def _control(self, kind: str, body: dict[str, Any], *extra: bytes) -> list[bytes]:
        body["run"] = self.run_id
        return control(kind, body, *extra)

    def _send(self, frames: list[bytes]) -> None:
        self.sent = send_tracked(self.socket, frames)

    def _flushed(self) -> None:
        """Wait until what was sent has left the process (at most a few seconds)."""
        if self.sent is not None and not self.sent.done:
            with contextlib.suppress(zmq.NotDone):
                self.sent.wait(FLUSH_TIMEOUT)
        self.sent = None

    def _announce(self) -> None:
        body = {"free": self.capacity, "pid": os.getpid(), "wid": self.wid}
        self._send(self._control("credit", body))

    def _answer(self, ref: TaskRef, payload: bytes) -> None:
        task = Task(
            task_id=ref.task_id,
            job_id=ref.job_id,
            step=self.step.name,
            attempt=ref.attempt,
            satellite=self.satellite,
            options=self.step.options,
            branch=ref.branch,
        )
        try:
            value = loads(
                payload, ref.serialization, allow_pickle=self.topology.defaults.allow_pickle
            )
        except MessageError as exc:
            outcome = Attempt("ERROR", error=f"payload: {exc}", final=True)
        else:
            self._flushed()  # the function may kill this process: the answers before go first
            self.running = ref
            outcome = run_attempt(self.func, value, task, self.step.timeout, self.conditions)
            self.running = None
        outcome, result = encode_result(outcome, self.topology, self.step)
        if outcome.status != "END":
            log.warning(
                "task %s try %d: %s: %s%s",
                ref.task_id,
                ref.attempt,
                outcome.status,
                outcome.error,
                "\n" + outcome.traceback if outcome.traceback else "",
            )
        self._receive()  # what came meanwhile: the next task may start at once
        following = self.inbox[0][0] if self.inbox and not self.stopping else None
        if self.stopping and self.inbox:
            self.inbox.clear()  # not started: the router takes them back at our bye
        self._send(
            self._control("result", _result_body(ref, outcome, self.step, following), result)
        )

    def _exit(self, code: int) -> None:
        """``os._exit`` in this process: a function that calls it ends its task with an
        ERROR that says so (where it was called from), then the process exits."""
        ref = self.running
        if ref is not None:
            stack = "".join(traceback.format_stack(sys._getframe(1)))
            outcome = Attempt(
                "ERROR",
                error=f"the function called os._exit({code}): its worker exited",
                traceback="Stack (most recent call last):\n" + stack[-MAX_TRACEBACK:],
            )
            log.error(
                "task %s try %d: %s\n%s", ref.task_id, ref.attempt, outcome.error, outcome.traceback
            )
            with contextlib.suppress(zmq.ZMQError):
                self._send(self._control("result", _result_body(ref, outcome, self.step, None)))
                self._flushed()
        _real_exit(code)


_real_exit: Final = os._exit
FLUSH_TIMEOUT: Final = 5.0


def _key(ref: TaskRef) -> list[Any]:
    return [ref.task_id, ref.branch, ref.seq]


def _result_body(
    ref: TaskRef, outcome: Attempt, step_def: Step, following: TaskRef | None
) -> dict[str, Any]:
    """What a worker answers for one try (``next``: the task it starts now, if any)."""
    body: dict[str, Any] = {
        "key": _key(ref),
        "attempt": ref.attempt,
        "status": outcome.status,
        "targets": list(outcome.targets),
        "error": outcome.error,
        "elapsed": outcome.elapsed,
        "serialization": step_def.serialization,
        "next": _key(following) if following is not None else None,
    }
    if outcome.traceback:
        body["traceback"] = outcome.traceback
    if outcome.final:
        body["final"] = True
    return body
