"""Routers: the fixed points of a satellite.

A router binds its inbox, accepts tasks from upstream, and is responsible for
each task it accepted until the next step has accepted it in turn:

- the **queue** in front of a pool hands each task to a worker that announced
  credit, round robin, knows which worker holds which task, and gives a task to
  another worker when the first one dies or runs past its timeout;
- a **sink** runs its function itself, in its single process;
- a **router step** forwards each task along its links.

Every cycle, a router reads what arrived, decides, appends its decisions to its
journal in one write, and only then sends anything (acks upstream, tasks to
workers and downstream, events to the tracker). A router killed at any point
therefore restarts with every task it had acknowledged, and every event it had
not yet seen confirmed (see :mod:`dsat.journal`).

Conversations (control messages, see :mod:`dsat.message`):

- inbox: a task message in; ``ack`` (its keys) or ``busy`` (its keys) back;
- work: ``credit`` / ``result`` / ``bye`` from workers; task messages to them;
- out: task messages to the next step's inbox; ``ack`` / ``busy`` back;
- events: ``events`` batches and ``load`` reports to the tracker; ``confirm`` back.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import zmq

from dsat import curve
from dsat.curve import Guard
from dsat.errors import MessageError
from dsat.fsm import NAME, Event
from dsat.journal import COMPACT_BYTES, Entry, Forward, Journal, JournalError, Key
from dsat.message import (
    NOBLOCK,
    Control,
    Envelope,
    Outstanding,
    Vector,
    configure,
    control,
    decode,
    decode_control,
    drain,
    encode,
    field_of,
    loads,
    packb,
    send_frames,
)
from dsat.topology import ORCHESTER, Kind, Step, Topology, get_connection, inbox_address
from dsat.worker import (
    Attempt,
    Task,
    conditions_of,
    encode_result,
    function_of,
    run_attempt,
)

log = logging.getLogger("dsat.router")

Context = zmq.Context[zmq.Socket[bytes]]

ACK_TIMEOUT: Final = 5.0  # a forward not acknowledged by then is sent again
CUSTODY_CHECK: Final = 10.0  # ask a satellite holding our task this often if it still does
DOWN_FOR: Final = 10.0  # an instance that did not answer is passed over this long
BUSY_BACKOFF: Final = 0.2  # at most this long between offers of a task nobody has room for
WINDOW: Final = 256  # messages sent to one instance and not yet answered
CONFIRM_TIMEOUT: Final = 2.0  # events not confirmed by then are sent again
KILL_GRACE: Final = 1.0  # a worker past its task's timeout by this much is killed
LOAD_EVERY: Final = 1.0  # seconds between load reports
MAX_BATCH: Final = 2000  # events per batch, messages read per socket per cycle
# events sent to the tracker and not yet confirmed: more wait in the router, not in
# the tracker's socket (a tracker behind would otherwise hold every router's backlog)
BUNDLE_MAX: Final = 256  # task messages sent to one inbox in one message, at most
ANSWERS: Final = frozenset({"ack", "busy", "release"})  # what a sender hears back
WORKER_MESSAGES: Final = frozenset({"credit", "start", "result", "bye"})
EVENTS_IN_FLIGHT: Final = 2 * MAX_BATCH
# events not yet confirmed by the tracker past which a router takes no new task: a
# tracker that falls behind slows the pipeline down instead of filling its memory
EVENT_BACKLOG: Final = 50 * MAX_BATCH
RECENT: Final = 100_000  # keys of finished tasks remembered, to refuse duplicates
MAX_BACKOFF: Final = 60.0
PROPAGATE_WINDOW: Final = 8  # tasks offered to peer satellites at a time
BACKLOG_PER_WORKER: Final = 4  # queued tasks per worker a multi-satellite step keeps
PREFETCH: Final = 0.02  # seconds of work a worker may have waiting in hand (short tasks)
PREFETCH_MAX: Final = 64
INLINE_FOR: Final = 0.02  # seconds a sink runs tasks before it turns to its sockets
INLINE_MAX: Final = 256  # tasks a sink runs in one cycle, at most
DEPTH_EVERY: Final = 32  # tasks ended between two looks at the typical duration
DEATH_GRACE: Final = 0.1  # seconds a dead worker's last messages get to arrive
STALL_RETRY: Final = 0.25  # seconds between two tries of a journal write that failed
STALL_LOG_EVERY: Final = 10.0
# A stopping router that still hands tasks on exits after this long anyway: what it
# holds is in its journal, and its next run hands it on.
STOP_GRACE: Final = 5.0


def child_branch(task_id: str, parent: int, seq: int, target: str, index: int) -> int:
    """A fanned-out branch's id: the same for the same fork, so a redone fork is recognised."""
    digest = hashlib.blake2b(
        f"{task_id}\0{parent}\0{seq}\0{target}\0{index}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") >> 1 or 2


def backoff_delay(step: Step, attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1``: doubled at each try, at most a minute."""
    return float(min(MAX_BACKOFF, step.backoff * 2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------
# reporting events to the tracker


class Reporter:
    """Numbers events, has them journaled, sends them in batches until the tracker confirms."""

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        journal: Journal,
        producer: str,
        epoch: int,
        next_eseq: int,
        pending: list[tuple[int, list[Any]]],
    ) -> None:
        self.socket = socket
        self.journal = journal
        self.producer = producer
        self.epoch = epoch
        self.next_eseq = next_eseq
        self.outstanding: Outstanding[list[Any]] = Outstanding(
            pending, timeout=CONFIRM_TIMEOUT, window=EVENTS_IN_FLIGHT
        )
        self.fresh: list[tuple[int, list[Any]]] = []

    def add(self, row: list[Any]) -> None:
        """An event row (RECORD_FIELDS order), numbered here."""
        self.fresh.append((self.next_eseq, row))
        self.next_eseq += 1

    def journal_fresh(self) -> None:
        """Append this cycle's events to the journal (before the cycle's sends)."""
        if self.fresh:
            self.journal.events(self.fresh)
            self.outstanding.extend(self.fresh)
            self.fresh = []

    def journal_request(self) -> int:
        """Journal the events made since the last call (one request's), and return how
        many, for :meth:`take_back`."""
        count = len(self.fresh)
        self.journal_fresh()
        return count

    def take_back(self, count: int) -> None:
        """Forget the last ``count`` events journaled and not sent: what made them was
        undone (their journal write failed)."""
        for _ in range(count):
            self.outstanding.unconfirmed.pop()
            self.outstanding.unsent.pop()
        self.next_eseq -= count

    def send(self, now: float) -> None:
        """Send what was not sent yet (everything unconfirmed again after a silence)."""
        batch = self.outstanding.batch(now, MAX_BATCH)
        if not batch:
            return
        # "behind": how many more wait here; the tracker holds its grace for tasks
        # missing events while some producer is behind (their events are coming)
        meta = {
            "producer": self.producer,
            "epoch": self.epoch,
            "first": batch[0][0],
            "behind": len(self.outstanding.unsent),
        }
        try:
            send_frames(self.socket, control("events", meta, packb([r for _, r in batch])), NOBLOCK)
        except zmq.Again:
            self.outstanding.unsend(batch)  # the tracker is not keeping up: next cycle
            return
        self.outstanding.sent(now)

    def confirmed(self, upto: int, now: float, *, gap: bool = False) -> None:
        if self.outstanding.confirmed(upto, now, gap=gap):
            self.journal.confirm(upto)

    @property
    def unconfirmed(self) -> collections.deque[tuple[int, list[Any]]]:
        return self.outstanding.unconfirmed

    @property
    def sent_at(self) -> float:
        return self.outstanding.sent_at

    @property
    def backlog(self) -> int:
        return len(self.outstanding) + len(self.fresh)


# ---------------------------------------------------------------------------
# handing tasks on to the next steps


@dataclass(slots=True)
class Instance:
    """One satellite's copy of a next step, and the socket that reaches its inbox."""

    target: str
    satellite: str
    socket: zmq.Socket[bytes]
    remote: bool  # on another satellite: custody until it releases what it took
    down_until: float = 0.0  # it did not answer: try the others until then
    in_flight: int = 0  # sent, not yet answered (the window)
    busy_until: float = 0.0  # it said busy: send it nothing new until then
    refusals: int = 0  # "busy" answers in a row: each doubles the pause
    window: int = 16  # unanswered messages allowed: +1 per ack, back to 1 on busy (AIMD)


@dataclass(slots=True)
class Pending:
    """A task message sent to a next step and not yet off our hands."""

    key: Key  # the child's key (task_id, branch, seq)
    parent: Key  # the task of this router it came from
    target: str  # "step", or "step@satellite" for a copy meant for one instance (pub)
    frames: list[bytes]
    due: float = 0.0  # when to (re)send, or (in custody) to ask again
    tries: int = 0
    refusals: int = 0  # "busy" answers so far: each makes the next try wait a bit longer
    instance: Instance | None = None  # where it was last sent
    custody: bool = False  # another satellite acknowledged it; we wait for its release


def _window(instance: Instance) -> int:
    """How many unanswered messages an instance may have now."""
    return instance.window


class Outbox:
    """Sends tasks to the next steps' inboxes until they are safely taken.

    Each next step may run on several satellites: one DEALER per instance,
    round robin over the instances that answer (one that says busy, or does not
    answer in ACK_TIMEOUT, is passed over: work goes where there is room).
    A copy for one instance (a ``pub`` link) goes to that instance only.

    An instance on this satellite has the task once it acknowledges it (it is
    journaled there). An instance on another satellite keeps it *in custody*
    until it releases it (it handed it on, or ended it): if it goes silent, the
    task goes to another instance, so a satellite cut off loses nothing.
    """

    def __init__(
        self,
        context: Context,
        topology: Topology,
        satellite: str,
        targets: dict[str, tuple[str, ...]],
        *,
        identity: bytes,
        guard: Guard | None,
    ) -> None:
        self.instances: dict[str, list[Instance]] = {}
        self.by_socket: dict[zmq.Socket[bytes], Instance] = {}
        self.pending: dict[Key, Pending] = {}
        self.by_parent: dict[Key, set[Key]] = {}
        self._turn: dict[str, int] = {}
        self._timers: list[tuple[float, int, Key]] = []  # (due, order, key); stale ones skipped
        self._order = 0
        self.ready: dict[str, collections.deque[Key]] = {}  # per target, in order
        # called for a message whose receiver did not answer in time; True: it dealt with it
        self.on_silence: Callable[[Pending], bool] | None = None

        def setup(socket: zmq.Socket[bytes]) -> None:
            configure(
                socket, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size
            )
            socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a peer that is connected
            socket.setsockopt(zmq.ROUTING_ID, identity)  # the same after a restart

        for target, satellites in targets.items():
            found = []
            for there in satellites:
                address = inbox_address(topology, satellite, there, target)
                socket = curve.connect(
                    context,
                    zmq.DEALER,
                    address,
                    guard=guard,
                    server=None if there == satellite else curve.server_key(topology, there),
                    setup=setup,
                )
                instance = Instance(target, there, socket, remote=there != satellite)
                found.append(instance)
                self.by_socket[socket] = instance
            self.instances[target] = found

    @property
    def sockets(self) -> list[zmq.Socket[bytes]]:
        return list(self.by_socket)

    @property
    def targets(self) -> set[str]:
        return set(self.instances)

    def add(self, pending: Pending) -> None:
        self.pending[pending.key] = pending
        self.by_parent.setdefault(pending.parent, set()).add(pending.key)
        self._ready(pending)

    # -- when to send what

    def _ready(self, item: Pending) -> None:
        """It wants to go now (or as soon as an instance of its target has room)."""
        self.ready.setdefault(item.target, collections.deque()).append(item.key)

    def _schedule(self, item: Pending, due: float) -> None:
        item.due = due
        self._order += 1
        heapq.heappush(self._timers, (due, self._order, item.key))

    def _free(self, item: Pending) -> None:
        """It is no longer in flight: its place in its instance's window is free."""
        if item.instance is not None and item.tries and not item.custody:
            item.instance.in_flight -= 1
        item.tries = 0

    def _choose(self, target: str, now: float) -> Instance | None:
        step, _, pinned = target.partition("@")
        instances = self.instances.get(step, [])
        if pinned:
            chosen = next((i for i in instances if i.satellite == pinned), None)
            if chosen is None or chosen.in_flight >= _window(chosen) or chosen.busy_until > now:
                return None
            return chosen
        up = [i for i in instances if i.down_until <= now] or instances
        room = [i for i in up if i.in_flight < _window(i) and i.busy_until <= now]
        if not room:
            return None
        turn = self._turn.get(step, 0)
        self._turn[step] = turn + 1
        return room[turn % len(room)]

    def flush(self, now: float) -> None:
        """Send what is due: new messages, resends, custody checks."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, _, key = heapq.heappop(timers)
            item = self.pending.get(key)
            if item is None or item.due != due:
                continue  # answered, or rescheduled since
            if item.custody and item.tries == 0:
                self._send(item, item.instance, now)  # is it still there? ask it
                continue
            if item.tries and item.instance is not None:
                # no answer in time, to a send or to a custody check
                if self.on_silence is not None and self.on_silence(item):
                    continue
                item.instance.down_until = now + DOWN_FOR  # pass it over for a while
                self._free(item)
                item.custody = False
                if "@" not in item.target:
                    item.instance = None
            self._ready(item)
        # What goes to one instance of this satellite this cycle leaves as one message,
        # its task messages one after the other (the inbox takes each as if alone).
        bundles: dict[zmq.Socket[bytes], list[Pending]] = {}
        for target, keys in self.ready.items():
            while keys:
                item = self.pending.get(keys[0])
                if item is None or item.tries or item.custody:
                    keys.popleft()  # gone, or already on its way
                    continue
                instance = self._choose(target, now)
                if instance is None:
                    break  # every instance's window is full: wait for answers
                keys.popleft()
                if instance.remote:
                    self._send(item, instance, now)  # one at a time: custody, per message
                    continue
                self._sent(item, instance, now)  # its place in the window, taken now
                bundle = bundles.setdefault(instance.socket, [])
                bundle.append(item)
                if len(bundle) >= BUNDLE_MAX:
                    self._send_bundle(instance, bundles.pop(instance.socket), now)
        for socket, items in bundles.items():
            self._send_bundle(self.by_socket[socket], items, now)

    def _send(self, item: Pending, instance: Instance | None, now: float) -> None:
        if instance is None:
            self._schedule(item, now + 1.0)
            return
        try:
            send_frames(instance.socket, item.frames, NOBLOCK)
        except zmq.Again:
            if not item.custody:
                item.instance = None  # not connected, or its pipe is full: later, elsewhere
            self._schedule(item, now + 0.05)
            return
        self._sent(item, instance, now)

    def _sent(self, item: Pending, instance: Instance, now: float) -> None:
        item.instance = instance
        if not item.custody:
            instance.in_flight += 1
        item.tries += 1
        self._schedule(item, now + ACK_TIMEOUT)

    def _send_bundle(self, instance: Instance, items: list[Pending], now: float) -> None:
        frames = items[0].frames if len(items) == 1 else [f for i in items for f in i.frames]
        try:
            send_frames(instance.socket, frames, NOBLOCK)
        except zmq.Again:
            for item in items:  # not connected, or its pipe is full: later, elsewhere
                self._free(item)
                item.instance = None
                self._schedule(item, now + 0.05)

    # -- answers

    def acked(self, key: Key, socket: zmq.Socket[bytes], now: float) -> Key | None:
        """An instance has the message; return its parent when that was its last child."""
        item = self.pending.get(key)
        instance = self.by_socket.get(socket)
        if item is None or instance is None:
            return None
        instance.down_until = 0.0
        instance.refusals = 0
        instance.window = min(WINDOW, instance.window + 1)
        self._free(item)
        if instance.remote:
            item.instance, item.custody = instance, True
            self._schedule(item, now + CUSTODY_CHECK)
            return None
        return self._done(key)

    def released(self, key: Key) -> Key | None:
        """Another satellite is done with a message it had in custody."""
        item = self.pending.get(key)
        if item is None:
            return None
        self._free(item)
        return self._done(key)

    def _done(self, key: Key) -> Key | None:
        item = self.pending.pop(key)
        children = self.by_parent.get(item.parent)
        if children is not None:
            children.discard(key)
            if not children:
                del self.by_parent[item.parent]
                return item.parent
        return None

    def busy(self, key: Key, socket: zmq.Socket[bytes], now: float) -> None:
        """The instance is full: leave it alone a while (longer each time), offer it elsewhere."""
        item = self.pending.get(key)
        instance = self.by_socket.get(socket)
        if instance is not None and instance.busy_until <= now:
            instance.busy_until = now + min(BUSY_BACKOFF, 0.002 * 2 ** min(instance.refusals, 7))
            instance.refusals += 1
        if instance is not None:
            instance.window = 1  # a full receiver: one probe at a time until it takes again
        if item is not None and not item.custody:
            self._free(item)
            if "@" not in item.target:
                item.instance = None  # a peer with room may take it
            self._ready(item)

    def remove(self, key: Key) -> Pending | None:
        """Take a message back (it will not be sent)."""
        item = self.pending.pop(key, None)
        if item is not None:
            self._free(item)
            children = self.by_parent.get(item.parent)
            if children is not None:
                children.discard(key)
                if not children:
                    del self.by_parent[item.parent]
        return item

    def next_due(self) -> float:
        soonest = float("inf")  # waiting for a busy instance's pause to end (a full
        for target, keys in self.ready.items():  # window waits for an answer instead)
            if keys:
                for instance in self.instances.get(target.partition("@")[0], []):
                    if instance.in_flight < _window(instance):
                        soonest = min(soonest, instance.busy_until)
        timers = self._timers
        while timers:
            due, _, key = timers[0]
            item = self.pending.get(key)
            if item is not None and item.due == due:
                return min(due, soonest)
            heapq.heappop(timers)  # a stale timer: drop it
        return soonest

    @property
    def in_flight(self) -> int:
        return sum(1 for p in self.pending.values() if not p.custody)

    def close(self) -> None:
        for socket in self.by_socket:
            socket.close(linger=0)


# ---------------------------------------------------------------------------
# the common part of every router


@dataclass(slots=True)
class Item:
    """A task this router accepted and is responsible for."""

    key: Key
    envelope: Envelope
    payload: bytes
    frames: list[bytes]
    attempt: int = 1
    state: str = "queued"  # queued | held | waiting (retry) | forwarding
    worker: bytes = b""
    since: float = 0.0  # monotonic time it was handed to a worker
    sender: tuple[zmq.Socket[bytes], bytes] | None = None  # another satellite's router
    recorded: int = 0  # the try whose START is journaled (a sink's, waiting for the disk)
    started: bool = False  # its worker said it runs it (a queue's)
    traceback: str = ""  # of the last try that raised: the FAILURE keeps it


@dataclass
class Counters:
    """What a router counts for its load report."""

    accepted: int = 0
    done: int = 0
    errors: int = 0
    failed: int = 0
    duplicates: int = 0
    refused: int = 0
    malformed: collections.Counter[str] = field(default_factory=collections.Counter)
    durations: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=512)
    )


class FixedPoint:
    """The machinery every router shares: journal, events, outbox, the cycle."""

    role = "router"

    def __init__(
        self,
        topology: Topology,
        node: str,
        *,
        satellite: str,
        context: Context,
        journal_dir: str,
        guard: Guard | None = None,
        run: str = "",
    ) -> None:
        self.topology = topology
        self.guard = guard
        self.run_id = run  # this run of the satellite: its processes' messages carry it
        self.node = node
        # "cpu" of "cpu.queue"; the orchester's events belong to no step
        self.step_name = "" if node == ORCHESTER else node.split(".", 1)[0]
        self.satellite = satellite
        self.context = context
        self.plan = get_connection(topology, node, satellite=satellite)
        self.wid = node
        self.pid = os.getpid()
        self.stopping = False
        self.stop_asked = 0.0
        self.stall_error: JournalError | None = None
        self.counters = Counters()
        self.poller = zmq.Poller()
        self.outgoing: list[tuple[zmq.Socket[bytes], list[bytes]]] = []
        self.timers: list[tuple[float, int, Key]] = []  # (due, order, key): retries
        self._order = 0
        self.recent: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self.last_load = 0.0
        self.malformed_logged = 0.0

        self.journal = Journal(os.path.join(journal_dir, f"{node}.journal"))
        replay = self.journal.open(self.journal.replay())  # a new epoch at every start
        epoch = replay.epoch
        self.replayed = replay
        # the journal could not be written since then (a full disk): nothing of the
        # cycles since leaves the process until it is
        self.stalled_since = 0.0
        self.stall_logged = 0.0
        self.compact_at = COMPACT_BYTES

        events = context.socket(zmq.DEALER)
        configure(events, hwm=100_000, max_size=topology.defaults.max_message_size)
        for address in self.plan.socket("events").addresses:
            events.connect(address)
        self.events_socket = events
        self.reporter = Reporter(
            events,
            self.journal,
            f"{satellite}/{node}",
            epoch,
            replay.next_eseq,
            [(eseq, record.as_list()) for eseq, record in replay.events],
        )
        self.poller.register(events, zmq.POLLIN)
        targets = {
            out.purpose.removeprefix("out:"): topology.steps[
                out.purpose.removeprefix("out:")
            ].satellites
            for out in self.plan.outputs()
        }
        self.peers: Outbox | None = None  # queues: the same step on other satellites
        self.outbox = Outbox(
            context,
            topology,
            satellite,
            targets,
            identity=f"{satellite}/{node}".encode(),
            guard=guard,
        )
        for socket in self.outbox.sockets:
            self.poller.register(socket, zmq.POLLIN)

    # -- events

    def event(
        self,
        envelope: Envelope,
        event: Event,
        *,
        seq: int | None = None,
        attempt: int | None = None,
        branch: int | None = None,
        wid: str = "",
        pid: int = 0,
        **detail: Any,
    ) -> None:
        # a row in RECORD_FIELDS order (see dsat.message), built once, packed as it is
        self.reporter.add(
            [
                envelope.task_id,
                envelope.job_id,
                envelope.branch if branch is None else branch,
                envelope.seq if seq is None else seq,
                envelope.attempt if attempt is None else attempt,
                NAME[event],
                self.step_name,
                self.satellite,
                envelope.origin,
                wid or self.wid,
                pid or self.pid,
                time.time(),
                detail,
            ]
        )

    def malformed(self, where: str, exc: MessageError) -> None:
        """Count a bad message per socket and log it, at most once a second."""
        self.counters.malformed[where] += 1
        now = time.monotonic()
        if now - self.malformed_logged > 1.0:
            self.malformed_logged = now
            log.warning(
                "%s: malformed message on %s (%d so far): %s",
                self.node,
                where,
                sum(self.counters.malformed.values()),
                exc,
            )

    # -- the cycle

    def send(self, socket: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """Queue a message; it leaves after this cycle's journal write."""
        self.outgoing.append((socket, frames))

    def commit(self) -> None:
        """Journal first, then send: nothing leaves that a restart would not remember.

        A write that fails (a full disk) stops the cycle's sends: they wait, with what
        the journal could not write, for the next try (see :meth:`stalled`)."""
        now = time.monotonic()
        self.reporter.journal_fresh()
        if not self.write_journal(now):
            return
        for socket, frames in self.outgoing:
            try:
                send_frames(socket, frames, NOBLOCK)
            except zmq.Again:
                pass  # an ack or busy a peer will ask for again; tasks are resent by timers
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
        self.outgoing.clear()
        self.outbox.flush(now)
        if self.peers is not None:
            self.peers.flush(now)
        self.reporter.send(now)
        if self.journal.size > self.compact_at:
            self.compact()

    def write_journal(self, now: float) -> bool:
        """Write what the journal holds; False (and the router stalls) when it cannot."""
        try:
            self.journal.flush()
        except JournalError as exc:
            if not self.stalled_since:
                self.stalled_since = now
                log.error("%s: %s; nothing leaves until it is written", self.node, exc)
                self.stall_logged = now
            elif now - self.stall_logged >= STALL_LOG_EVERY:
                self.stall_logged = now
                log.error(
                    "%s: still stalled for %.0fs: %s", self.node, now - self.stalled_since, exc
                )
            self.stall_error = exc
            return False
        if self.stalled_since:
            log.warning(
                "%s: journal written again after %.1fs; going on",
                self.node,
                now - self.stalled_since,
            )
            self.stalled_since = 0.0
        return True

    @property
    def stalled(self) -> bool:
        """The last journal write failed: the router takes nothing new and sends nothing."""
        return bool(self.stalled_since)

    def wait_for_journal(self) -> None:
        """One turn of a stalled router: pause, then try the write (and the sends) again."""
        time.sleep(STALL_RETRY)  # nothing to read until the journal can take it
        self.commit()

    def compact(self) -> None:
        """Rewrite the journal with only what is still live (later, if there is no room)."""
        entries = self.live_entries()
        try:
            self.journal.rewrite(
                self.reporter.epoch,
                entries,
                list(self.reporter.unconfirmed),
                self.reporter.unconfirmed[0][0] - 1
                if self.reporter.unconfirmed
                else self.reporter.next_eseq - 1,
            )
        except JournalError as exc:
            self.compact_at = self.journal.size + COMPACT_BYTES // 4
            log.warning(
                "%s: journal not compacted (again past %d bytes): %s",
                self.node,
                self.compact_at,
                exc,
            )
            return
        self.compact_at = COMPACT_BYTES

    def live_entries(self) -> list[tuple[Key, Entry]]:
        return []

    def remember(self, key: Key) -> None:
        self.recent[key] = None
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def read_events_socket(self) -> None:
        for frames in drain(self.events_socket, MAX_BATCH):
            try:
                message = decode_control(frames, frozenset({"confirm", "tracked"}))
                if type(message.body) is not dict:
                    raise MessageError(f"{message.kind}: need a map")
                if message.body.get("run", self.run_id) != self.run_id:
                    continue  # a tracker of another run (a former one, still going away)
                live = message.body.get("live")
                if message.kind == "tracked":
                    if type(live) is int and live >= 0:
                        self.heard_live(live, None)
                    continue
                upto = field_of(message.body, "upto", int, "confirm")
                epoch = field_of(message.body, "epoch", int, "confirm")
                gap = bool(message.body.get("gap", False))
            except MessageError as exc:
                self.malformed("events", exc)
                continue
            if type(live) is int and live >= 0:
                self.heard_live(live, upto if epoch == self.reporter.epoch else None)
            if epoch == self.reporter.epoch:
                self.reporter.confirmed(upto, time.monotonic(), gap=gap)

    def heard_live(self, live: int, upto: int | None) -> None:
        """The tracker follows ``live`` tasks, having applied our events up to ``upto``
        (only the entry, which paces new tasks to it, does anything with that)."""

    def answers(self, socket: zmq.Socket[bytes], where: str) -> Iterator[tuple[Control, list[Key]]]:
        """The answers (ack, busy, release) waiting on a socket, with their keys."""
        for frames in drain(socket, MAX_BATCH):
            try:
                message = decode_control(frames, ANSWERS)
                keys = _keys(message.body)
            except MessageError as exc:
                self.malformed(where, exc)
                continue
            yield message, keys

    def read_outbox(self, socket: zmq.Socket[bytes]) -> None:
        now = time.monotonic()
        for message, keys in self.answers(socket, "out"):
            for key in keys:
                if message.kind == "busy":
                    self.outbox.busy(key, socket, now)
                    continue
                if message.kind == "ack":
                    parent = self.outbox.acked(key, socket, now)
                else:
                    parent = self.outbox.released(key)
                if parent is not None:
                    self.forwarded(parent)

    def watch_monitors(self) -> None:
        """Poll the CURVE monitors of every tcp socket (made by subclasses after us)."""
        for monitor in self.guard.monitors if self.guard else ():
            self.poller.register(monitor, zmq.POLLIN)

    def read_common(self, ready: dict[Any, int]) -> None:
        """The sockets every router has: events, the outbox, CURVE monitors."""
        if self.events_socket in ready:
            self.read_events_socket()
        for socket in self.outbox.sockets:
            if socket in ready:
                self.read_outbox(socket)
        if self.guard is not None:
            self.guard.read_ready(ready)

    def forwarded(self, key: Key) -> None:
        """Every next step acknowledged what this task became: it is off our hands."""

    def load(self) -> dict[str, Any]:
        c = self.counters
        durations = sorted(c.durations)
        return {
            "node": self.node,
            "step": self.step_name,
            "role": self.role,
            "satellite": self.satellite,
            "pid": self.pid,
            "accepted": c.accepted,
            "done": c.done,
            "errors": c.errors,
            "failed": c.failed,
            "duplicates": c.duplicates,
            "refused": c.refused,
            "malformed": dict(c.malformed),  # per socket: in, work, out, events, submit
            "forwarding": len(self.outbox.pending),
            "refused_peers": dict(self.guard.refused) if self.guard else {},
            "events_backlog": self.reporter.backlog,
            "mean": sum(durations) / len(durations) if durations else 0.0,
            "p95": durations[int(len(durations) * 0.95)] if durations else 0.0,
            "at": time.time(),
        }

    def report_load(self, now: float) -> None:
        if now - self.last_load < LOAD_EVERY:
            return
        self.last_load = now
        # a busy tracker misses this one; the next report carries the same counters
        with contextlib.suppress(zmq.Again):
            send_frames(self.events_socket, control("load", self.load()), NOBLOCK)

    def next_timeout(self, now: float) -> float:
        due = min(
            self.outbox.next_due(),
            self.peers.next_due() if self.peers is not None else float("inf"),
            self.timers[0][0] if self.timers else float("inf"),
            self.last_load + LOAD_EVERY,
            self.reporter.sent_at + CONFIRM_TIMEOUT if self.reporter.unconfirmed else float("inf"),
        )
        return max(0.0, min(0.25, due - now))

    def schedule(self, due: float, key: Key) -> None:
        self._order += 1
        heapq.heappush(self.timers, (due, self._order, key))

    def due_timers(self, now: float) -> list[Key]:
        ready = []
        while self.timers and self.timers[0][0] <= now:
            ready.append(heapq.heappop(self.timers)[2])
        return ready

    def stop(self) -> None:
        if not self.stopping:
            self.stop_asked = time.monotonic()
        self.stopping = True

    def stop_overdue(self) -> bool:
        """Stopping for longer than STOP_GRACE: go, what is left is in the journal."""
        return self.stopping and time.monotonic() - self.stop_asked > STOP_GRACE

    def close(self) -> None:
        self.journal.close()
        self.outbox.close()
        self.events_socket.close(linger=0)
        if self.guard is not None:
            self.guard.close()


def _keys(body: Any) -> list[Key]:
    if type(body) is not list or len(body) > 100_000:
        raise MessageError("keys: need a list")
    keys = []
    for raw in body:
        if (
            type(raw) is not list
            or len(raw) != 3
            or type(raw[0]) is not str
            or type(raw[1]) is not int
            or type(raw[2]) is not int
        ):
            raise MessageError("keys: need [task_id, branch, seq] items")
        keys.append((raw[0], raw[1], raw[2]))
    return keys


# ---------------------------------------------------------------------------
# routers with an inbox: queues, sinks, router steps


class Router(FixedPoint):
    """A router with an inbox: accepts tasks, runs them (somehow), forwards what they become."""

    def __init__(self, topology: Topology, node: str, **kwargs: Any) -> None:
        super().__init__(topology, node, **kwargs)
        self.step_def = topology.steps[self.step_name]
        self.items: dict[Key, Item] = {}
        self.queue: collections.deque[Key] = collections.deque()

        def setup(socket: zmq.Socket[bytes]) -> None:
            configure(
                socket, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size
            )
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a sender back after a restart

        addresses = self.plan.socket("in").addresses
        self.inboxes = curve.bind(
            self.context, zmq.ROUTER, addresses, guard=self.guard, purpose="in", setup=setup
        )
        # tasks from another satellite: it keeps them in custody until we release them
        self.remote_inboxes = {
            s for s, a in zip(self.inboxes, addresses, strict=True) if a.startswith("tcp://")
        }
        for socket in self.inboxes:
            self.poller.register(socket, zmq.POLLIN)
        self.replies: dict[tuple[zmq.Socket[bytes], bytes, str], list[list[Any]]] = {}
        self.prepare()
        self._restore()

    def prepare(self) -> None:
        """What a router kind needs before its journal is replayed."""

    # -- start after a crash

    def _restore(self) -> None:
        """Put back every task the journal says we still had."""
        for key, entry in self.replayed.tasks.items():
            try:
                vector = decode(entry.frames)
            except MessageError:
                continue
            item = Item(key, vector.envelope, vector.payload, entry.frames)
            self.items[key] = item
            if entry.forwards is not None:
                item.state = "forwarding"
                self._resend(item, entry.forwards)
            elif entry.attempt and entry.finished < entry.attempt:
                item.attempt = entry.attempt
                self.try_failed(
                    item, Event.ERROR, f"lost: {self.node} restarted while try {entry.attempt} ran"
                )
            else:
                item.attempt = max(1, entry.finished + 1) if entry.finished else 1
                self.queue.append(key)
        if self.replayed.tasks:
            log.info("%s: resumed %d task(s) from its journal", self.node, len(self.items))
        self.replayed.tasks.clear()

    def _resend(self, item: Item, forwards: list[Forward]) -> None:
        if not forwards:
            self.forwarded(item.key)
            return
        for target, frames in forwards:
            envelope = decode(frames).envelope
            child = (envelope.task_id, envelope.branch, envelope.seq)
            pending = Pending(child, item.key, target, frames)
            if target == self.step_name and self.peers is not None:
                self.peers.add(pending)  # it had been propagated to a peer satellite
            else:
                self.outbox.add(pending)

    def live_entries(self) -> list[tuple[Key, Entry]]:
        entries = []
        for key, item in self.items.items():
            entry = Entry(item.frames, attempt=item.attempt if item.state == "held" else 0)
            if item.state == "waiting":
                entry.attempt = entry.finished = item.attempt - 1
            elif item.state == "forwarding":
                handed = [
                    *self.outbox.pending.values(),
                    *(self.peers.pending.values() if self.peers else ()),
                ]
                entry.forwards = [(p.target, p.frames) for p in handed if p.parent == key]
            entries.append((key, entry))
        return entries

    # -- the inbox

    @property
    def full(self) -> bool:
        return (
            len(self.items) >= self.step_def.max_queue
            or self.stopping
            or self.reporter.backlog >= EVENT_BACKLOG
        )

    def reply(self, socket: zmq.Socket[bytes], peer: bytes, kind: str, key: Key) -> None:
        """Answer a sender (ack, busy, release), batched per sender for this cycle."""
        self.replies.setdefault((socket, peer, kind), []).append(list(key))

    def read_inbox(self, inbox: zmq.Socket[bytes]) -> None:
        remote = inbox in self.remote_inboxes
        for message in drain(inbox, MAX_BATCH):
            peer = message[0]
            for frames, decoded in _task_messages(message, self.topology):
                if isinstance(decoded, MessageError):
                    self.malformed("in", decoded)
                    continue
                self.take(inbox, remote, peer, frames, decoded)
        self.send_replies()

    def take(
        self,
        inbox: zmq.Socket[bytes],
        remote: bool,
        peer: bytes,
        frames: list[bytes],
        vector: Vector,
    ) -> None:
        """One task message from an inbox: accept it (journal, ACK) or refuse it."""
        envelope = vector.envelope
        if envelope.serialization == "pickle" and not self.topology.defaults.allow_pickle:
            # never unpickled, never passed on: unpickling runs code
            self.malformed("in", MessageError("a pickle payload, and pickle is not enabled"))
            return
        key = (envelope.task_id, envelope.branch, envelope.seq)
        if key in self.items or key in self.recent:
            # again (a resend, or a custody check): we have it, or had it and are done
            self.counters.duplicates += 1
            self.reply(inbox, peer, "ack", key)
            if remote and key in self.recent:
                self.reply(inbox, peer, "release", key)
            return
        if self.full or (envelope.event is Event.PROPAGATE and not self.has_room()):
            self.counters.refused += 1
            self.reply(inbox, peer, "busy", key)
            return
        self.counters.accepted += 1
        item = Item(key, envelope, vector.payload, frames, attempt=envelope.attempt or 1)
        if remote:
            item.sender = (inbox, peer)
        self.items[key] = item
        self.journal.accept(key, frames)
        self.event(envelope, Event.ACK, attempt=1)
        self.reply(inbox, peer, "ack", key)
        self.accepted(item)

    def send_replies(self) -> None:
        for (socket, peer, kind), keys in self.replies.items():
            self.send(socket, [peer, *control(kind, keys)])
        self.replies.clear()

    def has_room(self) -> bool:
        """May a peer satellite propagate a task to us now? (It only does when we are idle.)"""
        return not self.full

    def accepted(self, item: Item) -> None:
        """A new task: queue it for a worker (queues, sinks); router steps forward it at once."""
        self.queue.append(item.key)

    # -- outcomes

    def ended(
        self,
        item: Item,
        value: bytes,
        serialization: str,
        targets: tuple[str, ...],
        elapsed: float,
        *,
        wid: str = "",
        pid: int = 0,
    ) -> None:
        """The function returned: END, then hand its value to each chosen next step."""
        envelope = item.envelope
        self.counters.durations.append(elapsed)
        children = self.children(item, targets)
        detail: dict[str, Any] = {"elapsed": elapsed}
        if len(children) > 1 or not children:
            detail["children"] = [branch for _, branch in children]
        self.event(envelope, Event.END, attempt=item.attempt, wid=wid, pid=pid, **detail)
        if not children:
            self.happy_end(item, value, serialization, wid=wid, pid=pid)
            return
        forwards = self.forward(item, value, serialization, children)
        self.journal.forward(item.key, forwards)

    def children(self, item: Item, targets: tuple[str, ...]) -> list[tuple[str, int]]:
        """(target, branch) per next step: the same branch, or new ones for a fan-out."""
        if len(targets) == 1:
            return [(targets[0], item.envelope.branch)]
        envelope = item.envelope
        return [
            (target, child_branch(envelope.task_id, envelope.branch, envelope.seq, target, i))
            for i, target in enumerate(targets)
        ]

    def forward(
        self, item: Item, value: bytes, serialization: str, children: list[tuple[str, int]]
    ) -> list[Forward]:
        envelope = item.envelope
        item.state = "forwarding"
        forwards: list[Forward] = []
        fork = [branch for _, branch in children] if len(children) > 1 else []
        created = envelope.timestamps.get("created", 0.0)
        for target, branch in children:
            child = Envelope(
                task_id=envelope.task_id,
                job_id=envelope.job_id,
                seq=envelope.seq + 1,
                step=self.step_name,
                next=target,
                event=Event.SEND,
                where=self.satellite,
                origin=envelope.origin,
                wid=self.wid,
                pid=self.pid,
                attempt=1,
                branch=branch,
                timestamps={"created": created, "sent": time.time()},
                serialization=serialization,
            )
            frames = encode(child, value)
            forwards.append((target, frames))
            detail: dict[str, Any] = {"next": [target]}
            if fork:
                detail.update(parent=envelope.branch, children=fork)
            self.event(child, Event.SEND, **detail)
            self.outbox.add(
                Pending((child.task_id, child.branch, child.seq), item.key, target, frames)
            )
        return forwards

    def forwarded(self, key: Key) -> None:
        self.finish(key)

    def happy_end(
        self, item: Item, value: bytes, serialization: str, *, wid: str = "", pid: int = 0
    ) -> None:
        detail: dict[str, Any] = {"serialization": serialization}
        limit = self.topology.store.max_result_size
        if len(value) <= limit:
            detail["result"] = value
        else:
            detail.update(
                reason=f"result of {len(value)} bytes not kept (limit {limit})",
                result_size=len(value),
                result_limit=limit,
            )
        self.event(item.envelope, Event.HAPPY_END, attempt=item.attempt, wid=wid, pid=pid, **detail)
        self.finish(item.key)

    def try_failed(
        self,
        item: Item,
        event: Event,
        error: str,
        *,
        elapsed: float = 0.0,
        traceback: str = "",
        final: bool = False,
        wid: str = "",
        pid: int = 0,
    ) -> None:
        """A try ended in ERROR or TIMEOUT: report it, then try again later or give up
        (at once when ``final``: an error no retry can mend)."""
        self.counters.errors += 1
        detail: dict[str, Any] = {"error": error, "elapsed": elapsed}
        if traceback:
            detail["traceback"] = traceback
            item.traceback = traceback
        self.event(item.envelope, event, attempt=item.attempt, wid=wid, pid=pid, **detail)
        if final:
            self.give_up(item, f"{error} (not retried: a retry cannot mend it)")
        else:
            self.failed_attempt(item, error)

    def failed_attempt(self, item: Item, error: str) -> None:
        """A try ended in ERROR or TIMEOUT (already reported): try again later, or give up."""
        if item.attempt <= self.step_def.retries:
            item.state = "waiting"
            self.journal.finished(item.key, item.attempt)
            item.attempt += 1
            self.schedule(
                time.monotonic() + backoff_delay(self.step_def, item.attempt - 1), item.key
            )
            return
        self.give_up(item, error)

    def give_up(self, item: Item, error: str) -> None:
        """FAILURE: the task ends here, kept as a dead letter (payload and last error)."""
        self.counters.failed += 1
        detail: dict[str, Any] = {}
        if item.traceback:
            detail["traceback"] = item.traceback
        self.event(
            item.envelope,
            Event.FAILURE,
            attempt=item.attempt,
            error=error,
            payload=item.payload,
            serialization=item.envelope.serialization,
            **detail,
        )
        self.finish(item.key)

    def finish(self, key: Key) -> None:
        item = self.items.pop(key, None)
        if item is None:
            return
        self.counters.done += 1
        self.journal.done(key)
        self.remember(key)
        if item.sender is not None:  # the satellite that sent it may let go of it now
            socket, peer = item.sender
            self.reply(socket, peer, "release", key)

    def retry_due(self, now: float) -> None:
        for key in self.due_timers(now):
            item = self.items.get(key)
            if item is not None and item.state == "waiting":
                item.state = "queued"
                self.queue.appendleft(key)

    # -- the loop

    def run(self) -> None:
        self.watch_monitors()
        try:
            while not (self.stopping and self.drained()):
                if self.stalled:
                    if self.stopping:
                        break  # nothing unwritten ever left: the journal is the whole truth
                    self.wait_for_journal()
                    continue
                now = time.monotonic()
                ready = dict(self.poller.poll(math.ceil(self.next_timeout(now) * 1000)))
                self.read(ready)
                now = time.monotonic()
                self.retry_due(now)
                self.tick(now)
                self.dispatch()
                self.report_load(now)
                self.commit()
        finally:
            self.commit()
            self.close()

    def read(self, ready: dict[Any, int]) -> None:
        self.read_common(ready)
        for socket in self.inboxes:
            if socket in ready:
                self.read_inbox(socket)

    def tick(self, now: float) -> None:
        """Time-driven work of a router kind (timeouts of held tasks...)."""

    def dispatch(self) -> None:
        """Start queued tasks (on workers, inline...)."""

    def drained(self) -> bool:
        """May a stopping router exit? When what it started is handed on (or it waited
        STOP_GRACE for it: its journal keeps the rest for the next run)."""
        if self.stop_overdue():
            return True
        return not any(i.state == "forwarding" for i in self.items.values()) and (
            not self.reporter.unconfirmed or time.monotonic() - self.reporter.sent_at > 3.0
        )

    def load(self) -> dict[str, Any]:
        report = super().load()
        states = collections.Counter(item.state for item in self.items.values())
        report.update(queued=states["queued"] + states["waiting"], held=states["held"])
        return report

    def close(self) -> None:
        super().close()
        for socket in self.inboxes:
            socket.close(linger=0)


# ---------------------------------------------------------------------------
# the queue in front of a pool


@dataclass
class WorkerInfo:
    """A worker of the pool, as its queue knows it."""

    identity: bytes
    pid: int
    wid: str
    pidfd: int = -1
    capacity: int = 1  # tasks it may hold at once (it runs them one after the other)
    held: dict[Key, None] = field(default_factory=dict)  # in order: the first one runs
    leaving: bool = False
    handed: float = 0.0  # since then it holds tasks and has started none (0: not so)
    killed: bool = False  # we sent it SIGKILL

    @property
    def running(self) -> Key | None:
        return next(iter(self.held), None)


class QueueRouter(Router):
    """The implicit router in front of a pool: round robin over workers that have credit."""

    role = "queue"

    def __init__(self, topology: Topology, node: str, **kwargs: Any) -> None:
        super().__init__(topology, node, **kwargs)
        self._depth: tuple[int, int] | None = None  # (tasks done when taken, depth)
        self.work = self.context.socket(zmq.ROUTER)
        configure(self.work, hwm=topology.defaults.hwm, max_size=topology.defaults.max_message_size)
        self.work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker is an error, not a drop
        for address in self.plan.socket("work").addresses:
            self.work.bind(address)
        self.poller.register(self.work, zmq.POLLIN)
        self.workers: dict[bytes, WorkerInfo] = {}
        self.by_pidfd: dict[int, bytes] = {}
        self.dying: dict[bytes, float] = {}  # dead workers, heard out until then

    def prepare(self) -> None:
        others = tuple(s for s in self.step_def.satellites if s != self.satellite)
        if not others:
            return
        self.peers = Outbox(
            self.context,
            self.topology,
            self.satellite,
            {self.step_name: others},
            identity=f"{self.satellite}/{self.node}/peers".encode(),
            guard=self.guard,
        )
        for socket in self.peers.sockets:
            self.poller.register(socket, zmq.POLLIN)
        self.peers.on_silence = self.peer_silent

    def read(self, ready: dict[Any, int]) -> None:
        super().read(ready)
        if self.work in ready:
            self.read_work()
        for fd, identity in list(self.by_pidfd.items()):
            if fd in ready and identity not in self.dying:
                # it is gone, but what it sent before dying may still be on its way:
                # hear it out for a moment before taking its tasks back
                self.poller.unregister(fd)
                self.dying[identity] = time.monotonic() + DEATH_GRACE
        if self.peers is not None:
            for socket in self.peers.sockets:
                if socket in ready:
                    self.read_peers(socket)

    def has_room(self) -> bool:
        return not self.full and len(self.queue) < len(self.ready)

    @property
    def full(self) -> bool:
        if super().full:
            return True
        # a step that also runs elsewhere keeps only a short backlog: its senders keep
        # the rest and offer each task to whichever satellite has room (least busy)
        return self.peers is not None and len(self.queue) >= BACKLOG_PER_WORKER * max(
            1, len(self.workers)
        )

    # -- propagation: a saturated pool hands work to the same step on a peer satellite

    def propagate(self, now: float) -> None:
        """Hand the newest queued tasks to peer satellites while no worker here is free."""
        peers = self.peers
        if peers is None or self.ready or len(self.queue) <= len(self.workers):
            return
        if all(i.down_until > now for i in peers.instances[self.step_name]):
            return  # every peer is silent: keep the work here
        in_flight = peers.in_flight
        while in_flight < PROPAGATE_WINDOW and len(self.queue) > len(self.workers):
            item = self.items.get(self.queue.pop())
            if item is None or item.state != "queued":
                continue
            envelope = replace(
                item.envelope,
                seq=item.envelope.seq + 1,
                step=self.step_name,
                next=self.step_name,
                event=Event.PROPAGATE,
                where=self.satellite,
                wid=self.wid,
                pid=self.pid,
                attempt=item.attempt,
                timestamps={**item.envelope.timestamps, "sent": time.time()},
            )
            frames = encode(envelope, item.payload)
            item.state = "forwarding"
            self.journal.forward(item.key, [(self.step_name, frames)])
            peers.add(
                Pending(
                    (envelope.task_id, envelope.branch, envelope.seq),
                    item.key,
                    self.step_name,
                    frames,
                )
            )
            in_flight += 1

    def read_peers(self, socket: zmq.Socket[bytes]) -> None:
        assert self.peers is not None
        now = time.monotonic()
        for message, keys in self.answers(socket, "peers"):
            for key in keys:
                pending = self.peers.pending.get(key)
                if pending is None:
                    continue
                if message.kind == "busy" and not pending.custody:
                    self.take_back(pending)  # the peer has no room either: keep it here
                elif message.kind == "ack":
                    if not pending.custody:
                        self.event(
                            decode(pending.frames).envelope, Event.PROPAGATE, next=[self.step_name]
                        )
                    self.peers.acked(key, socket, now)
                elif message.kind == "release":
                    parent = self.peers.released(key)
                    if parent is not None:
                        self.finish(parent)

    def take_back(self, pending: Pending) -> None:
        """A peer had no room (or did not answer): the task waits here again."""
        assert self.peers is not None
        self.peers.remove(pending.key)
        item = self.items.get(pending.parent)
        if item is not None and item.state == "forwarding":
            item.state = "queued"
            self.queue.appendleft(item.key)
            self.journal.requeued(item.key)

    def reclaim(self, pending: Pending) -> None:
        """A peer took a task, then went silent: take it back as the message we propagated.

        The peer may come back and run it too (at least once); the history stays
        whole: ACK, PROPAGATE, then our own ACK of the propagated message.
        """
        assert self.peers is not None
        self.take_back(pending)
        parent = self.items.pop(pending.parent, None)
        if parent is None:
            return
        with contextlib.suppress(ValueError):
            self.queue.remove(parent.key)
        vector = decode(pending.frames)
        item = Item(
            pending.key,
            vector.envelope,
            vector.payload,
            pending.frames,
            attempt=vector.envelope.attempt or 1,
        )
        self.items[item.key] = item
        self.journal.accept(item.key, pending.frames)
        self.journal.done(parent.key)
        self.remember(parent.key)
        self.event(item.envelope, Event.ACK, attempt=item.attempt)
        self.queue.append(item.key)
        log.warning("%s: took back task %s from a silent peer", self.node, item.key[0])

    def peer_silent(self, pending: Pending) -> bool:
        """A peer did not answer a propagation (take it back) or a custody check (reclaim)."""
        if pending.instance is not None:
            pending.instance.down_until = time.monotonic() + DOWN_FOR
        if pending.custody:
            self.reclaim(pending)
        else:
            self.take_back(pending)
        return True

    def read_work(self) -> None:
        for frames in drain(self.work, MAX_BATCH):
            identity, frames = frames[0], frames[1:]
            try:
                message = decode_control(
                    frames,
                    WORKER_MESSAGES,
                    max_size=self.topology.defaults.max_message_size,
                )
                if type(message.body) is not dict:
                    raise MessageError(f"{message.kind}: need a map")
                if message.body.get("run", self.run_id) != self.run_id:
                    raise MessageError(
                        f"{message.kind} from a worker of another run of this satellite"
                    )
                if message.kind == "result":
                    self.result(identity, message.body, message.extra)
                elif message.kind == "start":
                    self.started(identity, message.body)
                elif message.kind == "credit":
                    self.credit(identity, message.body)
                else:
                    self.bye(identity)
            except MessageError as exc:
                self.malformed("work", exc)

    def credit(self, identity: bytes, body: Any) -> None:
        free = field_of(body, "free", int, "credit")
        pid = field_of(body, "pid", int, "credit")
        wid = field_of(body, "wid", str, "credit")
        worker = self.workers.get(identity)
        if worker is None:
            if parent_of(pid) != os.getppid():
                # only our pool's processes (circus starts them beside us) may take tasks:
                # we kill a worker past its timeout, and that must never be a stranger
                raise MessageError(f"credit from pid {pid}, which is not a worker of this pool")
            worker = WorkerInfo(identity, pid, wid)
            try:
                worker.pidfd = os.pidfd_open(pid)
            except OSError as exc:
                raise MessageError(f"credit from pid {pid}, which is not running: {exc}") from exc
            self.workers[identity] = worker
            self.by_pidfd[worker.pidfd] = identity
            self.poller.register(worker.pidfd, zmq.POLLIN)
            log.info("%s: worker %s (pid %d) joined", self.node, wid, pid)
        worker.capacity = max(1, min(free, 1024))

    def depth(self) -> int:
        """Tasks a worker may hold: enough to cover PREFETCH seconds of work, one if slow.

        The typical duration is the median of the last ones, taken again after every
        DEPTH_EVERY that ended (sorting them at every dispatch cost more than a task).
        """
        durations = self.counters.durations
        if len(durations) < 8:
            return 1
        done = self.counters.done
        if self._depth is None or done - self._depth[0] >= DEPTH_EVERY:
            typical = sorted(durations)[len(durations) // 2]
            depth = max(1, min(PREFETCH_MAX, int(PREFETCH / max(typical, 1e-6))))
            self._depth = (done, depth)
        return self._depth[1]

    def start(self, worker: WorkerInfo, item: Item, now: float) -> None:
        """Its worker runs the task now (it said so): START."""
        worker.handed = 0.0
        item.since = now
        item.started = True
        self.journal.attempt(item.key, item.attempt)
        self.event(
            item.envelope,
            Event.START,
            attempt=item.attempt,
            wid=worker.wid,
            pid=worker.pid,
            deadline=time.time() + self.step_def.timeout + KILL_GRACE,
        )

    def _held(self, worker: WorkerInfo, key: Key, attempt: int) -> Item | None:
        """The task a worker speaks of, if it holds this try of it."""
        item = self.items.get(key)
        if (
            key not in worker.held
            or item is None
            or item.state != "held"
            or item.attempt != attempt
            or item.worker != worker.identity
        ):
            return None
        return item

    def started(self, identity: bytes, body: Any) -> None:
        """A worker that was idle starts a task (later ones it names in its answers)."""
        (key,) = _keys([field_of(body, "key", list, "start")])
        attempt = field_of(body, "attempt", int, "start")
        worker = self.workers.get(identity)
        item = self._held(worker, key, attempt) if worker is not None else None
        if worker is not None and item is not None and not item.started:
            self.start(worker, item, time.monotonic())

    def result(self, identity: bytes, body: Any, extra: tuple[bytes, ...]) -> None:
        raw_key = field_of(body, "key", list, "result")
        (key,) = _keys([raw_key])
        attempt = field_of(body, "attempt", int, "result")
        status = field_of(body, "status", str, "result")
        error = field_of(body, "error", str, "result")
        elapsed = float(field_of(body, "elapsed", (float, int), "result"))
        serialization = field_of(body, "serialization", str, "result")
        targets = tuple(field_of(body, "targets", list, "result"))
        raw_next = body.get("next")
        following = _keys([raw_next])[0] if raw_next is not None else None
        traceback = body.get("traceback", "")
        if status not in ("END", "ERROR", "TIMEOUT") or not all(type(t) is str for t in targets):
            raise MessageError(f"result: bad status {status!r:.20} or targets")
        if set(targets) - self.outbox.targets:
            raise MessageError(f"result: unknown next step in {targets!r:.80}")
        if type(traceback) is not str:
            raise MessageError("result: traceback must be a string")
        worker = self.workers.get(identity)
        if worker is None:
            # not (or no longer) one of our workers: a worker of the router we replaced
            # after a crash; its task went back to the queue when we replayed the journal
            self.counters.duplicates += 1
            return
        now = time.monotonic()
        item = self._held(worker, key, attempt)
        if item is None:
            worker.held.pop(key, None)
            self.counters.duplicates += 1  # a stale answer (the task went to another worker)
        else:
            if not item.started:  # its start is in this answer's place: it ran
                self.start(worker, item, now)
            del worker.held[key]
        if following is not None:
            # what it runs now, named in the same message: START only for what runs
            nxt = self.items.get(following)
            if nxt is not None and following in worker.held and not nxt.started:
                self.start(worker, nxt, now)
        if worker.held and not worker.handed and not self._runs(worker):
            worker.handed = now  # what it holds reaches it: it will say when it starts
        if item is None:
            return
        wid, pid = worker.wid, worker.pid
        item.worker = b""
        item.started = False
        if status == "END":
            self.ended(
                item, extra[0] if extra else b"", serialization, targets, elapsed, wid=wid, pid=pid
            )
            return
        self.try_failed(
            item,
            Event.ERROR if status == "ERROR" else Event.TIMEOUT,
            error,
            elapsed=elapsed,
            traceback=traceback,
            final=body.get("final") is True,
            wid=wid,
            pid=pid,
        )

    def _runs(self, worker: WorkerInfo) -> Item | None:
        """The task a worker runs (it said it started it), if any."""
        key = worker.running
        item = self.items.get(key) if key is not None else None
        return item if item is not None and item.started else None

    def bye(self, identity: bytes) -> None:
        """A worker leaves (scaled down, or stopped) after answering the task it ran:
        everything it still holds it never started, and comes back untouched."""
        worker = self.workers.get(identity)
        if worker is None:
            return
        worker.leaving = True
        self.hand_back(worker)

    def hand_back(self, worker: WorkerInfo) -> None:
        """The tasks a worker held and never started go back to the front of the queue,
        as they were (no try is charged); a started one stays, for worker_died."""
        for key in reversed(list(worker.held)):
            item = self.items.get(key)
            if item is not None and item.started and item.state == "held":
                continue
            del worker.held[key]
            if item is None or item.state != "held":
                continue
            item.state = "queued"
            item.worker = b""
            self.queue.appendleft(key)
        if not worker.held:
            worker.handed = 0.0

    def worker_died(self, identity: bytes) -> None:
        """A worker is gone: only the task it was running (if it had started one) is
        charged with its death; the others come back untouched."""
        self.dying.pop(identity, None)
        worker = self.workers.pop(identity)
        del self.by_pidfd[worker.pidfd]
        os.close(worker.pidfd)
        if not worker.leaving:
            log.warning("%s: worker %s (pid %d) died", self.node, worker.wid, worker.pid)
        self.hand_back(worker)
        running = [self.items[k] for k in worker.held if k in self.items]
        worker.held.clear()
        for item in running:
            if item.state != "held":
                continue
            item.worker = b""
            item.started = False
            elapsed = time.monotonic() - item.since
            if elapsed >= self.step_def.timeout:
                error = f"ran past its timeout of {self.step_def.timeout:g}s; worker killed"
                event = Event.TIMEOUT
            else:
                error = f"worker {worker.wid} (pid {worker.pid}) died during the task"
                event = Event.ERROR
            self.try_failed(item, event, error, elapsed=elapsed, wid=worker.wid, pid=worker.pid)

    def dispatch(self) -> None:
        if not self.queue or len(self.outbox.pending) >= self.step_def.max_queue:
            return  # nothing to start, or downstream is full: push back upstream
        depth = self.depth()
        workers = [w for w in self.workers.values() if not w.leaving]
        # what each worker gets this cycle goes in one message: its task messages, in order
        bundles: dict[bytes, list[Item]] = {}
        while self.queue and workers:
            # round robin: the next worker with room, the least loaded first
            worker = min(workers, key=lambda w: len(w.held))
            if len(worker.held) >= min(depth, worker.capacity):
                break
            key = self.queue.popleft()
            item = self.items.get(key)
            if item is None or item.state != "queued":
                continue
            envelope = item.envelope
            if item.attempt != envelope.attempt:
                envelope = _with_attempt(envelope, item.attempt)
                item.envelope = envelope
                item.frames = encode(envelope, item.payload)
            worker.held[key] = None
            item.state = "held"
            item.worker = worker.identity
            bundles.setdefault(worker.identity, []).append(item)
        now = time.monotonic()
        for identity, items in bundles.items():
            worker = self.workers[identity]
            frames = [identity]
            for item in items:
                frames += item.frames
            try:
                send_frames(self.work, frames, NOBLOCK)
            except zmq.ZMQError:
                # it left meanwhile (its pidfd will tell): the tasks go back, in order
                for item in reversed(items):
                    worker.held.pop(item.key, None)
                    item.state = "queued"
                    item.worker = b""
                    self.queue.appendleft(item.key)
                continue
            if not worker.handed:
                worker.handed = now  # it says which it starts (it may be frozen: see tick)
        self.propagate(now)

    @property
    def ready(self) -> list[WorkerInfo]:
        """Workers that hold nothing (idle)."""
        return [w for w in self.workers.values() if not w.held and not w.leaving]

    def tick(self, now: float) -> None:
        if self.dying and min(self.dying.values()) <= now:
            self.read_work()  # the last words of the dead
            for identity, due in list(self.dying.items()):
                if due <= now:
                    self.worker_died(identity)
        limit = self.step_def.timeout + KILL_GRACE
        for worker in self.workers.values():
            if worker.killed:
                continue
            item = self._runs(worker)
            if item is not None and now - item.since > limit:
                reason = f"is {now - item.since:.1f}s past the timeout"
            elif item is None and worker.handed and now - worker.handed > limit:
                # it was given tasks and started none: frozen; nothing of it is charged
                reason = f"started none of the tasks it was given {now - worker.handed:.1f}s ago"
            else:
                continue
            worker.killed = True
            log.warning(
                "%s: worker %s (pid %d) %s; killing it", self.node, worker.wid, worker.pid, reason
            )
            with contextlib.suppress(ProcessLookupError):  # gone: its pidfd tells
                os.kill(worker.pid, signal.SIGKILL)

    def drained(self) -> bool:
        return self.stop_overdue() or (
            super().drained() and not any(w.held for w in self.workers.values())
        )

    def load(self) -> dict[str, Any]:
        report = super().load()
        alive = [w for w in self.workers.values() if not w.leaving]
        report.update(
            workers=len(alive),
            busy=sum(1 for w in alive if w.held),
            idle=sum(1 for w in alive if not w.held),
        )
        return report

    def close(self) -> None:
        super().close()
        for worker in self.workers.values():
            os.close(worker.pidfd)
        self.work.close(linger=0)


def _task_messages(
    message: list[bytes], topology: Topology
) -> Iterator[tuple[list[bytes], Vector | MessageError]]:
    """The task messages of what an inbox received (after the sender's identity): one, or
    several one after the other (a bundle); each decoded, or the error that it is not."""
    max_size = topology.defaults.max_message_size
    count = len(message) - 1
    if count % 3 or not count:
        yield [], MessageError(f"message: need 3 frames per task message, got {count}")
        return
    for start in range(1, len(message), 3):
        frames = message[start : start + 3]
        try:
            yield frames, decode(frames, max_size=max_size)
        except MessageError as exc:
            yield frames, exc


def parent_of(pid: int) -> int:
    """The parent pid of a process (Linux /proc), or -1 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _with_attempt(envelope: Envelope, attempt: int) -> Envelope:
    return replace(envelope, attempt=attempt)


# ---------------------------------------------------------------------------
# a sink: one process that runs its function itself


class SinkRouter(Router):
    """A single-process step: its router runs the function inline, one task at a time."""

    role = "sink"

    def __init__(self, topology: Topology, node: str, **kwargs: Any) -> None:
        super().__init__(topology, node, **kwargs)
        self.func = function_of(topology, self.step_def)
        self.conditions = conditions_of(topology, self.step_name)

    def dispatch(self) -> None:
        if len(self.outbox.pending) >= self.step_def.max_queue:
            return
        # For up to INLINE_FOR seconds: a slow function lets acks and events flow between
        # its tasks; a fast one runs many, handed on and reported in large batches.
        until = time.monotonic() + INLINE_FOR
        for _ in range(INLINE_MAX):
            if not self.queue or time.monotonic() > until or self.stalled:
                return
            item = self.items.get(self.queue.popleft())
            if item is None or item.state != "queued":
                continue
            self.run_inline(item)

    def run_inline(self, item: Item) -> None:
        if item.recorded != item.attempt:
            self.journal.attempt(item.key, item.attempt)
            self.event(
                item.envelope,
                Event.START,
                attempt=item.attempt,
                deadline=time.time() + self.step_def.timeout + KILL_GRACE,
            )
            item.recorded = item.attempt
        self.reporter.journal_fresh()
        # a crash inside the function must find this try journaled: without room for
        # it, the task waits at the front of the queue (its START written with the rest)
        if not self.write_journal(time.monotonic()):
            self.queue.appendleft(item.key)
            return
        item.state = "held"
        envelope = item.envelope
        task = _task_of(self, item)
        try:
            value = loads(
                item.payload,
                envelope.serialization,
                allow_pickle=self.topology.defaults.allow_pickle,
            )
        except MessageError as exc:
            outcome = Attempt("ERROR", error=f"payload: {exc}", final=True)
        else:
            outcome = run_attempt(self.func, value, task, self.step_def.timeout, self.conditions)
        outcome, data = encode_result(outcome, self.topology, self.step_def)
        if outcome.status == "END":
            self.ended(item, data, self.step_def.serialization, outcome.targets, outcome.elapsed)
            return
        if outcome.traceback:
            log.warning(
                "%s: task %s try %d: %s\n%s",
                self.node,
                item.key[0],
                item.attempt,
                outcome.error,
                outcome.traceback,
            )
        self.try_failed(
            item,
            Event.ERROR if outcome.status == "ERROR" else Event.TIMEOUT,
            outcome.error,
            elapsed=outcome.elapsed,
            traceback=outcome.traceback,
            final=outcome.final,
        )


def _task_of(router: Router, item: Item) -> Task:
    envelope = item.envelope
    return Task(
        task_id=envelope.task_id,
        job_id=envelope.job_id,
        step=router.step_name,
        attempt=item.attempt,
        satellite=router.satellite,
        options=router.step_def.options,
        branch=envelope.branch,
    )


# ---------------------------------------------------------------------------
# a router step: forwards along its links


class ForwardRouter(Router):
    """A router step: no function; each task goes on along every link whose condition holds."""

    role = "router"

    def __init__(self, topology: Topology, node: str, **kwargs: Any) -> None:
        super().__init__(topology, node, **kwargs)
        self.conditions = conditions_of(topology, self.step_name)

    def dispatch(self) -> None:
        while self.queue:
            item = self.items.get(self.queue.popleft())
            if item is None or item.state != "queued":
                continue
            item.state = "held"
            self.event(item.envelope, Event.START, attempt=item.attempt)
            started = time.monotonic()
            targets: list[str] = []
            error = ""
            try:
                value = loads(
                    item.payload,
                    item.envelope.serialization,
                    allow_pickle=self.topology.defaults.allow_pickle,
                )
                task = _task_of(self, item)
                for target, condition in self.conditions:
                    if condition is None or condition(value, task):
                        targets.append(target)
            except MessageError as exc:
                error = f"payload: {exc}"
            except Exception as exc:  # a user's condition failed: the task fails here
                error = f"condition: {type(exc).__name__}: {exc}"
            if error:  # a condition will not change its mind: no retry
                self.try_failed(item, Event.ERROR, error, final=True)
                continue
            self.ended(
                item,
                item.payload,
                item.envelope.serialization,
                tuple(targets),
                time.monotonic() - started,
            )


ROUTERS: Final[dict[Kind, type[Router]]] = {
    Kind.POOL: QueueRouter,
    Kind.SINK: SinkRouter,
    Kind.ROUTER: ForwardRouter,
}


def make_router(topology: Topology, node: str, **kwargs: Any) -> Router:
    """The router a node needs: ``<pool>.queue``, a sink, or a router step."""
    step_name = node.split(".", 1)[0]
    kind = topology.steps[step_name].kind
    return ROUTERS[kind](topology, node, **kwargs)
