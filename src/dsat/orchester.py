"""The orchester (a satellite's entry router) and sources (steps that create tasks).

The orchester takes submissions from clients and sources, gives each task its
``task_id``, journals it, answers at once, and hands the task to its first
step(s) like any router: until they acknowledge it, it is the orchester's.

Conversation on its ``submit`` socket (control messages):

- ``submit`` ``{"ref", "targets", "job_id", "serialization", "source"}`` + one
  payload frame per task -> ``accepted {"ref", "task_ids"}`` or
  ``refused {"ref", "reason", "busy"}``;
- ``resend`` (a dead letter sent again by ``dsat retry``) -> ``accepted``;
- ``hello`` -> ``welcome {"satellite", "protocol", "steps"}``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import secrets
import time
from typing import Any, Final

import zmq

from dsat import curve
from dsat.curve import Guard
from dsat.errors import MessageError
from dsat.fsm import ROOT, Event
from dsat.journal import Entry, JournalError, Key
from dsat.message import (
    NOBLOCK,
    PROTOCOL,
    SERIALIZATIONS,
    Envelope,
    configure,
    control,
    decode,
    decode_control,
    drain,
    dumps,
    encode,
    field_of,
    send_frames,
)
from dsat.router import STALL_RETRY, Context, FixedPoint, Pending, child_branch
from dsat.topology import ORCHESTER, Kind, Topology, get_connection, resolve_call
from dsat.worker import Task, conditions_of, state_wrapper

log = logging.getLogger("dsat.orchester")

MAX_SUBMIT: Final = 10_000  # tasks in one submit message
MAX_REPLIES: Final = 1_000  # replies a source reads between two ticks
REQUESTS: Final = frozenset({"submit", "resend", "hello"})


def _refusal(exc: JournalError) -> tuple[str, dict[str, Any]]:
    """What a client is told while the entry's journal cannot be written."""
    return "refused", {
        "reason": f"the entry cannot keep new tasks: {exc}",
        "busy": True,
        "disk_full": exc.disk_full,
    }


class TaskIds:
    """Task ids that sort by creation time and never repeat: ms clock, instance tag, counter."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.counter = itertools.count(secrets.randbelow(1 << 20))

    def __call__(self) -> str:
        return f"{int(time.time() * 1000):012x}{self.tag}{next(self.counter) & 0xFFFFFF:06x}"


class Orchester(FixedPoint):
    """The entry router: gives tasks their ids and sends them to their first steps."""

    role = "orchester"

    def __init__(
        self,
        topology: Topology,
        *,
        satellite: str,
        context: Context,
        journal_dir: str,
        guard: Guard | None = None,
        run: str = "",
    ) -> None:
        super().__init__(
            topology,
            ORCHESTER,
            satellite=satellite,
            context=context,
            journal_dir=journal_dir,
            guard=guard,
            run=run,
        )

        def setup(socket: zmq.Socket[bytes]) -> None:
            configure(
                socket, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size
            )

        self.submits = curve.bind(
            context,
            zmq.ROUTER,
            self.plan.socket("submit").addresses,
            guard=self.guard,
            purpose="submit",
            setup=setup,
        )
        for socket in self.submits:
            self.poller.register(socket, zmq.POLLIN)
        self.new_id = TaskIds()
        self.capacity = topology.defaults.max_queue
        self.max_live = topology.defaults.max_live
        self.tracked_live = 0  # tasks live in the tracker, as its last answer said
        # tasks created whose INIT the tracker has not confirmed: (last event's number, count)
        self.unseen: collections.deque[tuple[int, int]] = collections.deque()
        self.forwarding: dict[Key, list[bytes]] = {}  # task key -> its INIT frames
        for key, entry in self.replayed.tasks.items():
            self.forwarding[key] = entry.frames
            forwards = entry.forwards
            if forwards is None:  # a journal of an older dsat, torn between two records
                init = decode(entry.frames)
                forwards = self.send_on(init.envelope, init.payload, key, [init.envelope.next])
                self.journal.forward(key, forwards)
                continue
            for target, frames in forwards:
                envelope = decode(frames).envelope
                child = (envelope.task_id, envelope.branch, envelope.seq)
                self.outbox.add(Pending(child, key, target, frames))
            if not forwards:
                self.forwarded(key)
        self.replayed.tasks.clear()

    def live_entries(self) -> list[tuple[Key, Entry]]:
        return [
            (
                key,
                Entry(
                    frames,
                    forwards=[
                        (p.target, p.frames)
                        for p in self.outbox.pending.values()
                        if p.parent == key
                    ],
                ),
            )
            for key, frames in self.forwarding.items()
        ]

    def forwarded(self, key: Key) -> None:
        if self.forwarding.pop(key, None) is not None:
            self.journal.done(key)
            self.counters.done += 1

    # -- requests

    def read_submit(self, submit: zmq.Socket[bytes]) -> None:
        for frames in drain(submit, 1000):
            peer, frames = frames[0], frames[1:]
            ref: Any = None
            try:
                message = decode_control(
                    frames,
                    REQUESTS,
                    max_extra=MAX_SUBMIT,
                    max_size=self.topology.defaults.max_message_size,
                )
                ref = message.body.get("ref") if type(message.body) is dict else None
                if message.kind == "submit":
                    reply = self.on_submit(message.body, message.extra)
                elif message.kind == "resend":
                    reply = self.on_resend(message.body, message.extra)
                else:
                    reply = self.hello()
            except MessageError as exc:
                self.malformed("submit", exc)
                reply = ("refused", {"reason": str(exc), "busy": False})
            kind, body = reply
            body["ref"] = ref if type(ref) in (int, str) else None
            # at once, not after the cycle's write: what it accepted is written already
            # (see durably), and a refusal promises nothing
            with contextlib.suppress(zmq.Again):  # a client gone: it asks again
                send_frames(submit, [peer, *control(kind, body)], NOBLOCK)

    def on_submit(self, body: Any, payloads: tuple[bytes, ...]) -> tuple[str, dict[str, Any]]:
        targets = field_of(body, "targets", list, "submit")
        source = body.get("source") or ""
        job_id = body.get("job_id") or ""
        serialization = body.get("serialization") or "msgpack"
        if type(source) is not str or type(job_id) is not str or len(job_id) > 128:
            raise MessageError("submit: source and job_id must be short strings")
        if serialization not in SERIALIZATIONS:
            raise MessageError(f"submit: unknown serialization {serialization!r:.20}")
        if serialization == "pickle" and not self.topology.defaults.allow_pickle:
            raise MessageError("submit: pickle payloads are not enabled on this satellite")
        if not targets or not all(type(t) is str for t in targets):
            raise MessageError("submit: need the name of at least one step")
        for target in targets:
            if target not in self.outbox.targets:
                known = ", ".join(sorted(self.outbox.targets))
                raise MessageError(f"submit: no step {target!r:.40} to submit to (steps: {known})")
        if source:
            linked = {link.target for link in self.topology.links_from(source)}
            if source not in self.topology.steps or not set(targets) <= linked:
                raise MessageError(f"submit: {source!r:.40} is not a source linked to {targets}")
        else:
            # a client submits to entries only: a step inside the graph expects what the
            # step before it makes, not what a client sends
            closed = [t for t in targets if not self.topology.steps[t].entry]
            if closed:
                entries = sorted(s.name for s in self.topology.steps.values() if s.entry)
                raise MessageError(
                    f"submit: step {closed[0]!r:.40} is not an entry (entry steps: "
                    f"{', '.join(entries) or 'none'}); set entry = true on it to submit to it"
                )
        if not payloads:
            raise MessageError("submit: no payload")
        if self.stopping:
            return "refused", {"reason": "the satellite is stopping", "busy": True}
        cannot = self.cannot_write()
        if cannot is not None:
            return cannot
        if len(self.forwarding) + len(payloads) > self.capacity:
            self.counters.refused += len(payloads)
            return "refused", {
                "reason": f"saturated: {len(self.forwarding)} tasks wait for their first step",
                "busy": True,
            }
        live = self.tracked_live + sum(count for _, count in self.unseen)
        if live >= self.max_live:
            # admission control: the tracker follows enough tasks; a flood goes at its pace
            self.counters.refused += len(payloads)
            return "refused", {
                "reason": f"saturated: {live} tasks are live (max_live {self.max_live})",
                "busy": True,
            }
        task_ids = [
            self.create(payload, targets, job_id, serialization, source) for payload in payloads
        ]
        cannot = self.write_request([(task_id, ROOT, 0) for task_id in task_ids])
        if cannot is not None:
            return cannot
        self.unseen.append((self.reporter.next_eseq - 1, len(task_ids)))
        return "accepted", {"task_ids": task_ids}

    # -- nothing is accepted before it is written

    def cannot_write(self) -> tuple[str, dict[str, Any]] | None:
        """Write what earlier work left in the journal; the refusal to give when it fails.

        A request's own records then are the journal's only ones (see write_request)."""
        self.reporter.journal_fresh()
        if self.write_journal(time.monotonic()):
            return None
        assert self.stall_error is not None
        return _refusal(self.stall_error)

    def write_request(self, keys: list[Key]) -> tuple[str, dict[str, Any]] | None:
        """Write a request's tasks before it is answered; if they cannot be written, undo
        them (nothing of them was sent) and return the refusal to give instead."""
        count = self.reporter.journal_request()
        if self.write_journal(time.monotonic()):
            return None
        self.journal.discard()
        self.reporter.take_back(count)
        for key in keys:
            self.forwarding.pop(key, None)
            for child in list(self.outbox.by_parent.get(key, ())):
                self.outbox.remove(child)
        self.counters.accepted -= len(keys)
        assert self.stall_error is not None
        return _refusal(self.stall_error)

    def create(
        self, payload: bytes, targets: list[str], job_id: str, serialization: str, source: str
    ) -> str:
        task_id = self.new_id()
        now = time.time()
        envelope = Envelope(
            task_id=task_id,
            job_id=job_id or task_id,
            seq=0,
            step=source,
            next=targets[0],
            event=Event.INIT,
            where=self.satellite,
            origin=self.satellite,
            wid=self.wid,
            pid=self.pid,
            attempt=1,
            branch=ROOT,
            timestamps={"created": now},
            serialization=serialization,
        )
        frames = encode(envelope, payload)
        key = (task_id, ROOT, 0)
        self.counters.accepted += 1
        self.event(envelope, Event.INIT, next=list(targets))
        self.forwarding[key] = frames
        forwards = self.send_on(envelope, payload, key, list(targets))
        self.journal.accept(key, frames, forwards)  # one record: never found without them
        return task_id

    def send_on(
        self, envelope: Envelope, payload: bytes, key: Key, targets: list[str]
    ) -> list[tuple[str, list[bytes]]]:
        """SEND to each first step (a fan-out when there are several)."""
        if len(targets) == 1:
            branches = [envelope.branch]
        else:
            branches = [
                child_branch(envelope.task_id, envelope.branch, envelope.seq, target, i)
                for i, target in enumerate(targets)
            ]
        forwards = []
        for target, branch in zip(targets, branches, strict=True):
            child = Envelope(
                task_id=envelope.task_id,
                job_id=envelope.job_id,
                seq=envelope.seq + 1,
                step=envelope.step,
                next=target,
                event=Event.SEND,
                where=self.satellite,
                origin=envelope.origin,
                wid=self.wid,
                pid=self.pid,
                attempt=1,
                branch=branch,
                timestamps={
                    "created": envelope.timestamps.get("created", time.time()),
                    "sent": time.time(),
                },
                serialization=envelope.serialization,
            )
            frames = encode(child, payload)
            detail: dict[str, Any] = {"next": [target]}
            if len(targets) > 1:
                detail.update(parent=envelope.branch, children=branches)
            self.event(child, Event.SEND, **detail)
            self.outbox.add(Pending((child.task_id, child.branch, child.seq), key, target, frames))
            forwards.append((target, frames))
        return forwards

    def on_resend(self, body: Any, extra: tuple[bytes, ...]) -> tuple[str, dict[str, Any]]:
        """Send a dead letter again: RETRY, then SEND to the step where it failed."""
        task_id = field_of(body, "task_id", str, "resend")
        step = field_of(body, "step", str, "resend")
        if step not in self.outbox.targets or len(extra) != 1:
            raise MessageError(f"resend: no step {step!r:.40}, or not exactly one payload")
        envelope = Envelope(
            task_id=task_id,
            job_id=field_of(body, "job_id", str, "resend"),
            seq=field_of(body, "seq", int, "resend") + 1,
            step=step,
            next=step,
            event=Event.RETRY,
            where=self.satellite,
            origin=field_of(body, "origin", str, "resend") or self.satellite,
            wid=self.wid,
            pid=self.pid,
            attempt=field_of(body, "attempt", int, "resend") + 1,
            branch=field_of(body, "branch", int, "resend"),
            timestamps={"created": time.time()},
            serialization=field_of(body, "serialization", str, "resend"),
        )
        key = (task_id, envelope.branch, envelope.seq)
        if key in self.forwarding:
            return "accepted", {"task_ids": [task_id]}
        cannot = self.cannot_write()
        if cannot is not None:
            return cannot
        frames = encode(envelope, extra[0])
        self.event(envelope, Event.RETRY, next=[step])
        self.forwarding[key] = frames
        forwards = self.send_on(envelope, extra[0], key, [step])
        self.journal.accept(key, frames, forwards)
        cannot = self.write_request([key])
        if cannot is not None:
            return cannot
        return "accepted", {"task_ids": [task_id]}

    def hello(self) -> tuple[str, dict[str, Any]]:
        steps = {name: str(step.kind) for name, step in self.topology.steps.items()}
        return "welcome", {"satellite": self.satellite, "protocol": str(PROTOCOL), "steps": steps}

    # -- the loop

    def run(self) -> None:
        self.watch_monitors()
        try:
            while not (self.stopping and self.drained()):
                if self.stalled and self.stopping:
                    break  # nothing unwritten ever left: the journal is the whole truth
                now = time.monotonic()
                # stalled (its journal cannot be written): only submissions are heard,
                # to be told why they are refused
                wait = STALL_RETRY if self.stalled else self.next_timeout(now)
                ready = dict(self.poller.poll(math.ceil(wait * 1000)))
                if not self.stalled:
                    self.read_common(ready)
                for socket in self.submits:
                    if socket in ready:
                        self.read_submit(socket)
                self.report_load(time.monotonic())
                self.commit()
        finally:
            self.commit()
            self.close()

    def heard_live(self, live: int, upto: int | None) -> None:
        self.tracked_live = live
        if upto is not None:  # the tracker counts those tasks among the live ones now
            while self.unseen and self.unseen[0][0] <= upto:
                self.unseen.popleft()

    def drained(self) -> bool:
        if self.stop_overdue():
            return True  # what it still hands on is in its journal, for the next run
        return not self.forwarding and (
            not self.reporter.unconfirmed or time.monotonic() - self.reporter.sent_at > 3.0
        )

    def load(self) -> dict[str, Any]:
        report = super().load()
        report.update(queued=len(self.forwarding), held=0)
        return report

    def close(self) -> None:
        super().close()
        for socket in self.submits:
            socket.close(linger=0)


# ---------------------------------------------------------------------------
# sources


class Source:
    """A step that creates a task every ``every`` seconds, on a clock that does not drift."""

    def __init__(
        self, topology: Topology, step_name: str, *, satellite: str, context: Context
    ) -> None:
        self.topology = topology
        self.step = topology.steps[step_name]
        assert self.step.kind is Kind.SOURCE
        self.satellite = satellite
        self.func = (
            state_wrapper(resolve_call(self.step.call, topology.python_path))
            if self.step.call
            else None
        )
        self.conditions = conditions_of(topology, step_name)
        plan = get_connection(topology, step_name, satellite=satellite)
        self.socket = context.socket(zmq.DEALER)
        configure(self.socket, hwm=16, max_size=topology.defaults.max_message_size)
        for address in plan.socket("submit").addresses:
            self.socket.connect(address)
        self.events = context.socket(zmq.DEALER)
        configure(self.events, hwm=16)
        for address in plan.socket("events").addresses:
            self.events.connect(address)
        self.stopping = False
        self.ticks = 0
        self.sent = 0
        self.skipped = 0
        self.errors = 0

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        start = time.monotonic()
        tick = 0
        while not self.stopping:
            due = start + tick * self.step.every
            now = time.monotonic()
            if now < due:
                self._wait_replies(due)
                continue
            missed = int((now - due) // self.step.every)
            if missed:  # the machine stalled: skip the ticks that passed, do not burst
                self.skipped += missed
                tick += missed
            self.emit(tick)
            tick += 1
            self.report()
        self.socket.close(linger=0)
        self.events.close(linger=0)

    def emit(self, tick: int) -> None:
        self.ticks += 1
        task = Task(
            task_id="",
            job_id=self.step.name,
            step=self.step.name,
            attempt=1,
            satellite=self.satellite,
            options=self.step.options,
        )
        try:
            value = self.func(tick, task) if self.func else {"tick": tick, "at": time.time()}
            if value is None:
                return
            payload = dumps(
                value, self.step.serialization, allow_pickle=self.topology.defaults.allow_pickle
            )
            targets = [
                target
                for target, condition in self.conditions
                if condition is None or condition(value, task)
            ]
        except Exception as exc:  # the user's source function failed: skip this tick
            self.errors += 1
            log.warning("%s: tick %d failed: %s: %s", self.step.name, tick, type(exc).__name__, exc)
            return
        if not targets:
            return
        body = {
            "ref": tick,
            "targets": targets,
            "job_id": self.step.name,
            "serialization": self.step.serialization,
            "source": self.step.name,
        }
        try:
            send_frames(self.socket, control("submit", body, payload), NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.skipped += 1  # the orchester is not taking anything: skip, count

    def _wait_replies(self, until: float) -> None:
        timeout = max(0.0, until - time.monotonic())
        if not self.socket.poll(int(timeout * 1000) + 1):
            return
        for frames in drain(self.socket, MAX_REPLIES):  # bounded: the tick stays on time
            try:
                reply = decode_control(frames, frozenset({"accepted", "refused"}))
            except MessageError as exc:
                log.warning("%s: bad reply from the orchester: %s", self.step.name, exc)
                continue
            if reply.kind == "refused":
                self.skipped += 1
                self.sent -= 1
                log.warning(
                    "%s: tick refused: %s",
                    self.step.name,
                    reply.body.get("reason") if type(reply.body) is dict else reply.body,
                )

    def report(self) -> None:
        body = {
            "node": self.step.name,
            "step": self.step.name,
            "role": "source",
            "satellite": self.satellite,
            "pid": os.getpid(),
            "ticks": self.ticks,
            "sent": self.sent,
            "skipped": self.skipped,
            "errors": self.errors,
            "at": time.time(),
        }
        with contextlib.suppress(zmq.Again):  # the next report says the same, and more
            send_frames(self.events, control("load", body), NOBLOCK)
