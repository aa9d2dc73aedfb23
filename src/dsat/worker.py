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
import inspect
import logging
import os
import signal
import time
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
    send_frames,
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
        except Exception as exc:  # the user's function failed: that is an ERROR event, not ours
            return Attempt("ERROR", error=_describe(exc), elapsed=time.monotonic() - started)
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
                "ERROR", error=f"condition for {target}: {_describe(exc)}", elapsed=elapsed
            )
    return Attempt("END", value=value, elapsed=elapsed, targets=tuple(targets))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    """One process of a pool: takes tasks from its queue router, runs them, answers."""

    def __init__(
        self,
        topology: Topology,
        step_name: str,
        *,
        satellite: str,
        wid: str,
        context: zmq.Context[zmq.Socket[bytes]],
        capacity: int | None = None,
    ) -> None:
        self.topology = topology
        self.step = topology.steps[step_name]
        self.satellite = satellite
        self.wid = wid
        self.capacity = capacity or topology.steps[step_name].prefetch
        self.func = function_of(topology, self.step)
        self.conditions = conditions_of(topology, step_name)
        self.stopping = False
        plan = get_connection(topology, step_name, satellite=satellite)
        self.socket = context.socket(zmq.DEALER)
        configure(
            self.socket, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size
        )
        self.socket.setsockopt(zmq.ROUTING_ID, f"{wid}/{os.getpid()}".encode())
        for address in plan.socket("work").addresses:
            self.socket.connect(address)

    def stop(self) -> None:
        """Finish the task at hand, then leave (the router hands back nothing else)."""
        self.stopping = True

    def run(self) -> None:
        own_alarm()
        self._announce()
        last_heard = time.monotonic()
        while not self.stopping:
            if not self.socket.poll(int(HEARTBEAT * 1000)):
                self._announce()
                continue
            frames = recv_frames(self.socket)
            last_heard = time.monotonic()
            self._run_bundle(frames)
            if time.monotonic() - last_heard > HEARTBEAT:
                self._announce()
        send_frames(self.socket, control("bye", {"pid": os.getpid(), "wid": self.wid}))

    def _run_bundle(self, frames: list[bytes]) -> None:
        """Run the tasks of one message from the router, in order: one task message (three
        frames) or several, all it gave this worker in one cycle. Each is answered as
        soon as it ends: a result finished is never held back, lost if the process dies."""
        if not frames or len(frames) % 3:
            log.warning("ignored a malformed message from the router: %d frames", len(frames))
            return
        for start in range(0, len(frames), 3):
            if self.stopping:
                return  # asked to leave: the router takes back what was not started
            try:
                ref = read_checked(frames[start : start + 3])
            except MessageError as exc:
                log.warning("ignored a malformed message from the router: %s", exc)
                continue
            self._answer(ref, frames[start + 2])

    def _announce(self) -> None:
        body = {"free": self.capacity, "pid": os.getpid(), "wid": self.wid}
        send_frames(self.socket, control("credit", body))

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
        result = b""
        serialization = self.step.serialization
        try:
            value = loads(
                payload, ref.serialization, allow_pickle=self.topology.defaults.allow_pickle
            )
        except MessageError as exc:
            outcome = Attempt("ERROR", error=f"payload: {exc}")
        else:
            outcome = run_attempt(self.func, value, task, self.step.timeout, self.conditions)
        if outcome.status == "END":
            try:
                result = dumps(
                    outcome.value, serialization, allow_pickle=self.topology.defaults.allow_pickle
                )
            except MessageError as exc:
                outcome = Attempt("ERROR", error=f"result: {exc}", elapsed=outcome.elapsed)
        body = {
            "key": [ref.task_id, ref.branch, ref.seq],
            "attempt": ref.attempt,
            "status": outcome.status,
            "targets": list(outcome.targets),
            "error": outcome.error,
            "elapsed": outcome.elapsed,
            "serialization": serialization,
        }
        send_frames(self.socket, control("result", body, result))
