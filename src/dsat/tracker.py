"""The tracker: one per satellite; every event of every task goes through it.

Each cycle the tracker reads the event batches that arrived, applies each event
to its task's :class:`~dsat.fsm.TaskMachine`, writes the cycle's events and
task rows to the store in one transaction, only then confirms the batches to
their producers (who keep them until then) and publishes the events live, on a
PUB socket whose topic is the task id. A light cycle's write waits up to
WRITE_LINGER to share its transaction with the next cycles' (what someone
follows or waits for, a query, a cycle under load write at once).

Its memory holds live tasks only: a task that ends is written, checked (every
transition of its history, in order) and forgotten. After a restart, it
rebuilds live tasks from their stored events.

It also answers queries (a task's state and history, tasks by job, step or
state, dead letters, the load of every pool) on its ``query`` socket:
``query {"ref", "op", ...}`` -> ``reply {"ref", "ok", "result" | "error"}``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final

import msgpack
import zmq

from dsat import curve
from dsat.curve import Guard
from dsat.errors import MessageError
from dsat.fsm import NAME, Event, TaskMachine
from dsat.message import (
    END_TOPIC,
    EVENT,
    JOB_ID,
    NOBLOCK,
    ORIGIN,
    PROTOCOL,
    PROTOCOL_FRAME,
    TASK_ID,
    Outstanding,
    configure,
    control,
    decode_control,
    drain,
    field_of,
    packb,
    send_frames,
    unpack_rows,
)
from dsat.store import Batch, DeadLetter, EventRow, ResultRow, Store, StoreError, TaskRow
from dsat.topology import TRACKER, Topology, get_connection

log = logging.getLogger("dsat.tracker")

Context = zmq.Context[zmq.Socket[bytes]]

MAX_BATCHES: Final = 64  # event batches read per cycle
_MAX_INT: Final = 2**63 - 1
# Ended tasks kept in memory, for their late events (rare: a task ends once its whole
# history is in); an older one's late event rebuilds it from the store. Each machine
# kept pins the allocator's memory it was made among: 10,000 kept a flooded pipeline's
# tracker at 1.23 x its RSS after 10,000 tasks, 2,000 at 1.09 x (docs/performance.md).
ENDED_CACHE: Final = 2_000
END_GRACE: Final = 5.0  # seconds a closed task may wait for missing events before it ends
BEHIND_FOR: Final = 2.0  # a producer that said it was behind is deemed so this long after
LOAD_TOPIC: Final = b"@load"
POOLS_TOPIC: Final = b"@pools"  # autoscaling decisions, live
DECISIONS_KEPT: Final = 200
PEER_SILENT: Final = 5.0  # a satellite not heard from for this long: its tasks are UNKNOWN
RELAY_CONFIRM_TIMEOUT: Final = 2.0
# Confirmations of a light cycle wait this long to leave together with later ones: at
# light load every batch is a few events, and each confirmation on its own woke its
# router for a whole cycle. A cycle that applied CONFIRM_AT_ONCE events or more (load)
# sends them at once, so a producer's window keeps moving.
CONFIRM_LINGER: Final = 0.02
CONFIRM_AT_ONCE: Final = 256
# A light cycle's writes wait this long (at most) to go in one transaction with later
# ones: at light load each cycle is a few events of one task, and its transaction cost
# the tracker more than applying them. What someone follows live or waits for, a cycle
# of CONFIRM_AT_ONCE events or more, a query and a stop write at once; nothing is
# confirmed or published before it is written.
WRITE_LINGER: Final = 0.01
PRUNE_EVERY: Final = 600.0
STORE_RETRY: Final = 0.5  # seconds between two tries of a write that failed
STORE_LOG_EVERY: Final = 10.0
LOAD_WINDOW: Final = 10.0  # seconds of load reports kept, for rates
# an enum member looked up on its class costs about 0.2 µs (see dsat.fsm): the hot path
_RETRY, _HAPPY_END, _FAILURE = Event.RETRY, Event.HAPPY_END, Event.FAILURE


class Tracker:
    """Applies events, stores them in batches, publishes them, answers queries."""

    def __init__(
        self,
        topology: Topology,
        *,
        satellite: str,
        context: Context,
        store: Store,
        guard: Guard | None = None,
        run: str = "",
    ) -> None:
        self.topology = topology
        self.satellite = satellite
        self.run_id = run  # this run of the satellite: its routers take confirmations of it only
        self.store = store
        self.guard = guard
        self.stopping = False
        plan = get_connection(topology, TRACKER, satellite=satellite)
        max_size = topology.defaults.max_message_size

        def setup(hwm: int) -> Callable[[zmq.Socket[bytes]], None]:
            return lambda socket: configure(socket, hwm=hwm, max_size=max_size)

        def bound(kind: int, purpose: str, hwm: int) -> list[zmq.Socket[bytes]]:
            return curve.bind(
                context,
                kind,
                plan.socket(purpose).addresses,
                guard=guard,
                purpose=f"tracker.{purpose}",
                setup=setup(hwm),
            )

        self.events = bound(zmq.ROUTER, "events", 100_000)
        self.query = bound(zmq.ROUTER, "query", 10_000)
        # XPUB: it tells us what is subscribed, so events nobody follows are not sent
        self.pubs = bound(zmq.XPUB, "pub", 100_000)
        self.poller = zmq.Poller()
        for socket in (*self.events, *self.query, *self.pubs):
            self.poller.register(socket, zmq.POLLIN)
        for monitor in guard.monitors if guard else ():
            self.poller.register(monitor, zmq.POLLIN)
        self.relays = {
            name: Relay(self, context, name, store)
            for name in topology.satellites
            if name != satellite
        }
        for relay in self.relays.values():
            self.poller.register(relay.socket, zmq.POLLIN)

        self.live: dict[str, TaskMachine] = {}
        self.ended: collections.OrderedDict[str, TaskMachine] = collections.OrderedDict()
        self.closing: dict[str, float] = {}  # closed tasks waiting for missing events
        # producers that said they hold more events than they sent: when last heard so
        self.behind: dict[str, float] = {}
        self.grace_from = 0.0  # graces count from here at the earliest
        self.absent: set[str] = set()  # tasks of the batch at hand the store does not have
        self.touched: dict[str, TaskMachine] = {}  # tasks this cycle changed: one row each
        self.watched: set[str] = set()  # task ids someone follows live (XPUB subscriptions)
        self.awaited: set[str] = set()  # task ids someone waits for the end of
        self.watch_all = False
        self.producers: dict[str, tuple[int, int]] = store.producers()
        self.loads: dict[str, collections.deque[dict[str, Any]]] = {}
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=DECISIONS_KEPT)
        self.node_names = {
            node.name for name in topology.satellites for node in topology.nodes(name)
        }
        # One string per step and satellite name for every machine to share: a name a
        # machine keeps from an event row would stay behind when the row is freed, and
        # pin the memory around it (see docs/performance.md, memory under a flood).
        self.names = {
            name: name for name in ("", *topology.steps, *topology.satellites, *self.node_names)
        }
        self.malformed: collections.Counter[str] = collections.Counter()  # per socket
        self.anomalies = 0
        self.applied = 0
        self.last_prune = 0.0
        self.last_load_published = 0.0
        # confirmations held back (CONFIRM_LINGER), and since when the oldest waits
        self.held: list[tuple[zmq.Socket[bytes], list[bytes]]] = []
        self.held_since = 0.0
        # what the cycles since the last write applied (WRITE_LINGER): the batch, the
        # confirmations and live messages that wait for it, since when the oldest waits
        self.pending = Batch()
        self.unwritten: list[tuple[zmq.Socket[bytes], list[bytes]]] = []
        self.unpublished: list[list[bytes]] = []
        self.pending_since = 0.0
        self.last_malformed_log = 0.0
        # the last write failed at (monotonic), the first of the failures since, logged at
        self.write_failed = self.write_failed_since = self.write_failed_logged = 0.0
        self._rebuild()
        # Tasks back from the store that nothing has reported on since: they count as
        # live for the entry's admission only once an event shows they still move (a
        # store may keep tasks whose journals are gone; they must not shut the entry).
        self.silent: set[str] = set(self.live)

    # -- start

    def _rebuild(self) -> None:
        """Live tasks back into memory from their stored events."""
        rows = self.store.live_tasks()
        for row in rows:
            self.live[row.task_id] = self._machine_from_store(row)
        if rows:
            log.info("tracker: rebuilt %d live task(s) from the store", len(rows))

    def _machine_from_store(self, row: TaskRow) -> TaskMachine:
        machine = TaskMachine(row.task_id, row.job_id, row.origin)
        for event in self.store.events(row.task_id):
            machine.tseq = event.tseq - 1
            _apply_row(machine, event)
        machine.tseq = max(machine.tseq, row.events)
        machine.anomalies = row.anomalies
        return machine

    # -- events

    def read_events(
        self, socket: zmq.Socket[bytes], batch: Batch
    ) -> tuple[list[list[bytes]], list[list[bytes]]]:
        """Apply what arrived; return confirmations and live messages, sent after the write."""
        confirms: dict[tuple[bytes, str], tuple[int, int, bool]] = {}
        tracked: set[bytes] = set()
        published: list[list[bytes]] = []
        for frames in drain(socket, MAX_BATCHES):
            peer, frames = frames[0], frames[1:]
            try:
                message = decode_control(
                    frames,
                    frozenset({"events", "load", "scale"}),
                    max_size=self.topology.defaults.max_message_size,
                )
                if message.kind == "load":
                    self._load(message.body)
                    if message.body.get("role") == "orchester":
                        tracked.add(peer)  # it paces new tasks to how many are live here
                    continue
                if message.kind == "scale":
                    published.append(self._scale(message.body))
                    continue
                producer = field_of(message.body, "producer", str, "events")
                epoch = field_of(message.body, "epoch", int, "events")
                first = field_of(message.body, "first", int, "events")
                behind = message.body.get("behind", 0)
                if len(message.extra) != 1:
                    raise MessageError("events: need one frame of records")
                records = unpack_rows(message.extra[0])
            except MessageError as exc:
                self._malformed("events", exc)
                continue
            if type(behind) is int and behind > 0:
                self.behind[producer] = time.monotonic()
            else:
                self.behind.pop(producer, None)
            known_epoch, last = self.producers.get(producer, (epoch, first - 1))
            if known_epoch != epoch:
                last = first - 1  # a new journal: its numbering starts afresh
            if first > last + 1:
                confirms[(peer, producer)] = (epoch, last, True)  # a gap: ask for the rest again
                continue
            fresh = records[max(0, last + 1 - first) :]
            self._prefetch(fresh)
            for record in fresh:
                published.extend(self._apply(record, batch))
            last = max(last, first + len(records) - 1)
            self.producers[producer] = (epoch, last)
            batch.producers[producer] = (epoch, last)
            confirms[(peer, producer)] = (epoch, last, False)
        # every answer says how many tasks are live here: the entry's admission control
        live = self.live_count()
        replies = [
            [
                peer,
                *control(
                    "confirm",
                    {"epoch": epoch, "upto": upto, "gap": gap, "live": live, "run": self.run_id},
                ),
            ]
            for (peer, _), (epoch, upto, gap) in confirms.items()
        ]
        replies.extend(
            [peer, *control("tracked", {"live": live, "run": self.run_id})] for peer in tracked
        )
        return replies, published

    def live_count(self) -> int:
        """Tasks followed here, but not those back from the store that nobody reported on."""
        return len(self.live) - len(self.silent)

    def _apply(self, row: list[Any], batch: Batch) -> list[list[bytes]]:
        """Apply one event row (see dsat.message.unpack_rows); the hot path of the tracker."""
        # its fields at once: one unpacking instead of an index lookup at each use
        task_id, job_id, branch, seq, attempt, event, step, where, origin, wid, pid, at, detail = (
            row
        )
        relay = self.relays.get(origin) if self.relays else None
        if relay is not None:
            # a task submitted on another satellite: its tracker keeps its history
            relay.add(row, batch)
            return []
        if self.silent:
            self.silent.discard(task_id)
        machine = self.live.get(task_id)
        was_live = machine is not None
        if machine is None:
            machine = self._machine_for(row)
        was_over = machine.ended
        names = self.names
        step_name = names.get(step, step)
        where_name = names.get(where, where)
        if detail:
            outcome = machine.apply(
                event,
                branch,
                seq,
                attempt,
                step_name,
                at,
                detail.get("children"),
                detail.get("parent", 0),
                detail.get("error", ""),
                float(detail.get("deadline", 0.0)),
                where_name,
            )
        else:
            outcome = machine.apply(event, branch, seq, attempt, step_name, at, where=where_name)
        flag = outcome.flag
        if was_over and machine.ended and not flag and event is not _RETRY:
            flag = "anomaly: after the task ended"
            machine.anomalies += 1
            self.anomalies += 1
        self.applied += 1
        stored = detail
        if "result" in detail or "payload" in detail:
            stored = {k: v for k, v in detail.items() if k not in ("result", "payload")}
        batch.events.append(
            (
                task_id,
                outcome.tseq,
                branch,
                seq,
                attempt,
                NAME[event],
                step,
                where,
                wid,
                pid,
                at,
                stored or None,
                flag,
            )
        )
        if not flag and detail:
            if event is _HAPPY_END and "result" in detail:
                batch.results.append(
                    ResultRow(
                        task_id,
                        branch,
                        step,
                        detail.get("serialization", "msgpack"),
                        detail["result"],
                    )
                )
            elif event is _FAILURE and "payload" in detail:
                batch.dead_letters.append(
                    DeadLetter(
                        task_id,
                        job_id,
                        origin,
                        step,
                        branch,
                        seq,
                        attempt,
                        detail.get("serialization", "msgpack"),
                        detail["payload"],
                        detail.get("error", ""),
                        at,
                    )
                )
        if event is _RETRY and not flag:
            batch.retried.append(task_id)
        if not machine.ended and machine.closed:
            self.closing.setdefault(task_id, time.monotonic())
        self.touched[task_id] = machine
        if machine.ended or not was_live:
            self._file(machine)  # it ended, or it (re)starts being live
        watched = self.watch_all or task_id in self.watched
        awaited = machine.ended and task_id in self.awaited
        if not watched and not awaited:
            return []  # nobody follows it live, or waits for this: do not even encode it
        live = {
            "task_id": task_id,
            "tseq": outcome.tseq,
            "branch": branch,
            "seq": seq,
            "attempt": attempt,
            "event": NAME[event],
            "step": step,
            "where": where,
            "wid": wid,
            "pid": pid,
            "at": at,
            "detail": stored,
            "flag": flag,
            "state": str(machine.state),
            "over": machine.ended,
        }
        if machine.ended:  # the end carries the results: a waiting client needs no query
            with contextlib.suppress(StoreError):  # without them, it asks
                live["results"] = self._results_for(task_id, batch)
        body = packb(live)
        topic = task_id.encode()
        published = [[topic, PROTOCOL_FRAME, body]] if watched else []
        if awaited:
            published.append([END_TOPIC + topic, PROTOCOL_FRAME, body])
        return published

    def _results_for(self, task_id: str, batch: Batch) -> list[dict[str, Any]]:
        """A task's results: those stored, and those this cycle is about to store."""
        by_branch = {r.branch: r for r in self.store.results(task_id)}
        for result in batch.results:
            if result.task_id == task_id:
                by_branch[result.branch] = result
        return [_as_dict(by_branch[branch]) for branch in sorted(by_branch)]

    def _file(self, machine: TaskMachine) -> None:
        """Keep a live task live, move an ended one to the (bounded) cache of ended tasks."""
        task_id = machine.task_id
        if machine.over:
            self.live.pop(task_id, None)
            self.silent.discard(task_id)
            self.closing.pop(task_id, None)
            self.ended[task_id] = machine
            self.ended.move_to_end(task_id)
            if len(self.ended) > ENDED_CACHE:
                self.ended.popitem(last=False)
        else:
            self.ended.pop(task_id, None)
            self.live[task_id] = machine

    def _prefetch(self, rows: list[list[Any]]) -> None:
        """Learn in one query which tasks of these events the store does not have."""
        live, ended, touched, relays = self.live, self.ended, self.touched, self.relays
        unknown = {
            row[TASK_ID]
            for row in rows
            if row[TASK_ID] not in live
            and row[TASK_ID] not in ended
            and row[TASK_ID] not in touched
            and row[ORIGIN] not in relays
        }
        if unknown:
            self.absent = unknown - self.store.known(unknown)

    def _machine_for(self, row: list[Any]) -> TaskMachine:
        """A machine for a task not live: one that ended (cached or rebuilt), or a new one."""
        task_id = row[TASK_ID]
        # an ended one still cached, or one that left the cache since the last write
        machine = self.ended.get(task_id)
        if machine is None:
            machine = self.touched.get(task_id)
        if machine is not None:
            return machine
        if task_id not in self.absent:
            stored = self.store.task(task_id)
            if stored is not None:
                return self._machine_from_store(stored)
        self.absent.discard(task_id)  # from now on, it is live
        job_id = task_id if row[JOB_ID] == task_id else row[JOB_ID]
        return TaskMachine(task_id, job_id, self.names.get(row[ORIGIN], row[ORIGIN]))

    def end_overdue(self, batch: Batch) -> None:
        """End tasks that closed but still miss events after END_GRACE; flag what is missing.

        The grace counts only while no producer is behind: one that still holds
        events (the tracker could not keep up) may hold the missing ones.
        """
        now = time.monotonic()
        if any(now - heard < BEHIND_FOR for heard in self.behind.values()):
            self.grace_from = now  # every grace starts again once all have caught up
            return
        start = self.grace_from
        overdue = [t for t, since in self.closing.items() if now - max(since, start) > END_GRACE]
        for task_id in overdue:
            self.closing.pop(task_id)
            machine = self.live.get(task_id)
            if machine is None or machine.over:
                continue
            for tseq, reason in machine.force_end():
                batch.flags.append((task_id, tseq, f"anomaly: {reason}"))
                machine.anomalies += 1
                self.anomalies += 1
            log.warning(
                "tracker: task %s ended with missing events (%d anomalies)",
                task_id,
                machine.anomalies,
            )
            self.touched[task_id] = machine
            self._file(machine)  # readers of the live stream see it end in the store

    @staticmethod
    def _row(machine: TaskMachine) -> tuple[Any, ...]:
        """The task's row for the store, as its parameters (the fields of a TaskRow)."""
        return (
            machine.task_id,
            machine.job_id,
            machine.origin,
            str(machine.state),
            machine.step,
            machine.attempt,
            machine.error,
            machine.created,
            machine.updated,
            machine.updated if machine.ended else None,
            machine.tseq,
            machine.anomalies,
            machine.duplicates,
            machine.deadline,
            machine.where,
        )

    # -- loads

    def _load(self, body: Any) -> None:
        node = field_of(body, "node", str, "load")
        satellite = body.get("satellite", self.satellite)
        if satellite not in self.topology.satellites or node not in self.node_names:
            raise MessageError(f"load: no node {node!r:.40} on satellite {satellite!r:.40}")
        history = self.loads.setdefault(f"{satellite}/{node}", collections.deque(maxlen=64))
        body["received"] = time.time()
        history.append(body)
        now = time.time()
        while history and now - history[0]["received"] > LOAD_WINDOW:
            history.popleft()

    def _scale(self, body: Any) -> list[bytes]:
        """An autoscaling decision: keep it (the latest ones) and publish it."""
        pool = field_of(body, "pool", str, "scale")
        satellite = field_of(body, "satellite", str, "scale")
        before = field_of(body, "before", int, "scale")
        after = field_of(body, "after", int, "scale")
        reason = field_of(body, "reason", str, "scale")
        step = self.topology.steps.get(pool)
        if step is None or satellite not in step.satellites or not 0 <= after <= 1024:
            raise MessageError(f"scale: no pool {pool!r:.40} on satellite {satellite!r:.40}")
        decision = {
            "pool": pool,
            "satellite": satellite,
            "before": before,
            "after": after,
            "reason": reason[:200],
            "at": time.time(),
        }
        self.decisions.append(decision)
        log.info("autoscale %s/%s: %d -> %d workers (%s)", satellite, pool, before, after, reason)
        return [POOLS_TOPIC, PROTOCOL_FRAME, packb(decision)]

    def pools_view(self) -> dict[str, Any]:
        """Every pool of the topology: bounds, workers now, its queue's load, last decisions."""
        loads = self.load_view()
        pools: dict[str, Any] = {}
        for name, step in self.topology.steps.items():
            if str(step.kind) != "pool":
                continue
            for satellite in step.satellites:
                queue = loads.get(f"{satellite}/{name}.queue", {})
                last = [
                    d for d in self.decisions if d["pool"] == name and d["satellite"] == satellite
                ]
                pools[f"{satellite}/{name}"] = {
                    "pool": name,
                    "satellite": satellite,
                    "min": step.workers.min,
                    "max": step.workers.max,
                    "load": queue,
                    "decisions": last[-5:],
                }
        return pools

    def load_view(self) -> dict[str, Any]:
        """The latest load of every node, with done/s and errors/s over the last seconds."""
        view: dict[str, Any] = {}
        now = time.time()
        for name, history in self.loads.items():
            if not history:
                continue
            latest = dict(history[-1])
            oldest = history[0]
            span = latest["received"] - oldest["received"]
            for counter in ("done", "errors"):
                delta = latest.get(counter, 0) - oldest.get(counter, 0)
                latest[f"{counter}_per_s"] = delta / span if span > 0 else 0.0
            latest["age"] = now - latest["received"]
            view[name] = latest
        return view

    def _malformed(self, where: str, exc: MessageError) -> None:
        """Count a bad message per socket and log it, at most once a second."""
        self.malformed[where] += 1
        now = time.monotonic()
        if now - self.last_malformed_log > 1.0:
            self.last_malformed_log = now
            log.warning(
                "tracker: malformed message on %s (%d so far): %s",
                where,
                sum(self.malformed.values()),
                exc,
            )

    # -- queries

    def answer_queries(self, socket: zmq.Socket[bytes]) -> None:
        for frames in drain(socket, 256):
            peer, frames = frames[0], frames[1:]
            ref: Any = None
            try:
                message = decode_control(frames, frozenset({"query"}))
                ref = message.body.get("ref") if type(message.body) is dict else None
                result = self._query(message.body)
                reply = {"ref": ref, "ok": True, "result": result}
            except MessageError as exc:
                self._malformed("query", exc)
                reply = {"ref": ref, "ok": False, "error": str(exc)}
            except StoreError as exc:
                reply = {"ref": ref, "ok": False, "error": str(exc)}
            send_frames(socket, [peer, *control("reply", reply)])

    def _query(self, body: Any) -> Any:
        op = field_of(body, "op", str, "query")
        if op == "hello":
            return {"satellite": self.satellite, "protocol": str(PROTOCOL)}
        if op == "state":
            return self._state(field_of(body, "task_id", str, "query"), _after(body, op))
        if op == "events":
            task_id = field_of(body, "task_id", str, "query")
            return [_as_dict(e) for e in self.store.events(task_id, _after(body, op))]
        if op == "tasks":
            return self._tasks(body)
        if op == "load":
            return self.load_view()
        if op == "pools":
            return self.pools_view()
        if op == "dead_letter":
            letter = self.store.dead_letter(field_of(body, "task_id", str, "query"))
            return _as_dict(letter) if letter else None
        if op == "dead_letters":
            return self._dead_letters(body)
        if op == "stats":
            return {
                "live": len(self.live),
                "applied": self.applied,
                "malformed": dict(self.malformed),
                "anomalies": self.anomalies,
                "counts": self.store.counts(),
            }
        raise MessageError(f"query: unknown op {op!r:.40}")

    def _state(self, task_id: str, after: int = 0) -> dict[str, Any] | None:
        """A task, its events (those after ``after`` only: a follower has the rest), results."""
        row = self.store.task(task_id)
        if row is None:
            return None
        task = _as_dict(row)
        task["unknown"] = self.is_unknown(row, time.time())
        return {
            "task": task,
            "events": [_as_dict(e) for e in self.store.events(task_id, after)],
            "results": [_as_dict(r) for r in self.store.results(task_id)],
        }

    def _dead_letters(self, body: dict[str, Any]) -> list[str]:
        """Task ids of the dead letters of a job and/or a step, in order, after ``after``."""
        filters: dict[str, Any] = {}
        for name in ("job_id", "step", "after"):
            value = body.get(name)
            if value is not None:
                if type(value) is not str:
                    raise MessageError(f"query dead_letters: {name} must be a string")
                filters[name] = value
        limit = body.get("limit", 1000)
        if type(limit) is not int or not 0 <= limit <= 10_000:
            raise MessageError("query dead_letters: limit must be an integer in 0..10000")
        return self.store.dead_letter_ids(limit=limit, **filters)

    def _tasks(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        filters: dict[str, Any] = {}
        for name in ("job_id", "step", "state"):
            value = body.get(name)
            if value is not None:
                if type(value) is not str:
                    raise MessageError(f"query tasks: {name} must be a string")
                filters[name] = value
        limit = body.get("limit", 100)
        if type(limit) is not int or not 0 <= limit <= _MAX_INT:
            raise MessageError("query tasks: limit must be an integer in 0..2**63-1")
        now = time.time()
        if body.get("stuck") or filters.get("state") == "UNKNOWN":
            live = self.store.tasks(live=True, limit=1_000_000)
            rows = [r for r in live if self.is_unknown(r, now)][:limit]
        else:
            rows = self.store.tasks(limit=limit, **filters)
        found = []
        for row in rows:
            task = _as_dict(row)
            task["unknown"] = self.is_unknown(row, now)
            found.append(task)
        return found

    # -- the loop

    def run(self) -> None:
        try:
            while True:
                timeout = 100
                now = time.monotonic()
                if self.held:
                    left = self.held_since + CONFIRM_LINGER - now
                    timeout = max(0, min(timeout, math.ceil(left * 1000)))
                if self.pending_since:
                    left = self.pending_since + WRITE_LINGER - now
                    timeout = max(0, min(timeout, math.ceil(left * 1000)))
                ready = dict(self.poller.poll(timeout))
                self.turn(ready)
                if self.stopping and not ready:
                    self.write_pending()
                    self.send_held(force=True)
                    return
        finally:
            self.close()

    def turn(self, ready: dict[Any, int]) -> None:
        """One cycle: apply what arrived, write it, then confirm and publish; answer queries.

        A light cycle's write may wait for later ones (WRITE_LINGER), and what it
        confirms and publishes with it."""
        batch = self.pending
        if self.write_failed:
            # the store cannot be written (a full disk): apply nothing more until it can;
            # producers keep every event unconfirmed meanwhile, and send it again
            if time.monotonic() - self.write_failed >= STORE_RETRY:
                self.write_pending()
            ready = {s: e for s, e in ready.items() if s not in self.events}
        else:
            for socket in self.events:
                if socket in ready:
                    confirms, live = self.read_events(socket, batch)
                    self.unwritten.extend((socket, frames) for frames in confirms)
                    self.unpublished.extend(live)
            for relay in self.relays.values():
                if relay.socket in ready:
                    relay.read(batch)
            if self.closing:
                self.end_overdue(batch)
        if (batch or self.touched or self.unwritten) and not self.pending_since:
            self.pending_since = time.monotonic()
        if (
            self.pending_since
            and not self.write_failed
            and (
                self.unpublished
                or len(batch.events) >= CONFIRM_AT_ONCE
                or batch.relay
                or batch.relay_confirmed
                or any(socket in ready for socket in self.query)
                or time.monotonic() - self.pending_since >= WRITE_LINGER
            )
        ):
            self.write_pending()
        self.send_held()
        now = time.monotonic()
        for relay in self.relays.values():
            relay.send(now)
        for socket in self.query:
            if socket in ready:
                self.answer_queries(socket)
        for socket in self.pubs:
            if socket in ready:
                self.read_subscriptions(socket)
        if self.guard is not None:
            self.guard.read_ready(ready)
        self.publish_load()
        self.prune()

    def write_pending(self) -> None:
        """Write what the cycles since the last write applied; only then confirm and publish."""
        if not self.pending_since:
            return
        batch = self.pending
        if self.touched:
            batch.tasks.update((t, self._row(m)) for t, m in self.touched.items())
            self.touched = {}
        if batch:
            try:
                self.store.write(batch)
            except StoreError as exc:
                self.cannot_write(exc)
                return  # all of it stays pending: nothing is confirmed nor published
        if self.write_failed:
            log.warning(
                "tracker: the store is written again after %.1fs; going on",
                time.monotonic() - self.write_failed_since,
            )
            self.write_failed = self.write_failed_since = 0.0
        self.pending = Batch()
        self.pending_since = 0.0
        if self.unwritten and not self.held:
            self.held_since = time.monotonic()
        self.held += self.unwritten
        self.unwritten = []
        self.send_held(force=len(batch.events) >= CONFIRM_AT_ONCE)
        published, self.unpublished = self.unpublished, []
        for frames in published:
            self.publish(frames)

    def cannot_write(self, exc: StoreError) -> None:
        """A batch could not be written: keep it, say why (now and then), try again."""
        now = time.monotonic()
        if not self.write_failed:
            self.write_failed_since = now
            log.error("tracker: %s; holding back confirmations until it is written", exc)
            self.write_failed_logged = now
        elif now - self.write_failed_logged >= STORE_LOG_EVERY:
            self.write_failed_logged = now
            log.error(
                "tracker: the store still cannot be written (%.0fs): %s",
                now - self.write_failed_since,
                exc,
            )
        self.write_failed = now

    def send_held(self, *, force: bool = False) -> None:
        """Send the held confirmations when the oldest waited CONFIRM_LINGER (or ``force``)."""
        if not self.held:
            return
        if not force and time.monotonic() - self.held_since < CONFIRM_LINGER:
            return
        for socket, frames in self.held:
            send_frames(socket, frames)
        self.held = []

    def read_subscriptions(self, socket: zmq.Socket[bytes]) -> None:
        """Subscriptions from clients: to task ids (every event of the task, live), to
        "=" + a task id (only the event that ends it), to ``@pools``..."""
        for _ in range(10_000):
            try:
                message = socket.recv(NOBLOCK)
            except zmq.Again:
                return
            if not message or message[0] not in (0, 1):
                continue
            topic = message[1:].decode(errors="replace")
            if topic == "":
                self.watch_all = message[0] == 1
            elif message[1:].startswith(END_TOPIC):
                task_id = topic[len(END_TOPIC) :]
                if message[0] == 1:
                    self.awaited.add(task_id)
                else:
                    self.awaited.discard(task_id)
            elif message[0] == 1:
                self.watched.add(topic)
            else:
                self.watched.discard(topic)

    def publish(self, frames: list[bytes]) -> None:
        for socket in self.pubs:
            send_frames(socket, frames)

    def publish_load(self) -> None:
        now = time.monotonic()
        if now - self.last_load_published < 1.0:
            return
        self.last_load_published = now
        body = packb(self.load_view())
        self.publish([LOAD_TOPIC, PROTOCOL_FRAME, body])

    def prune(self) -> None:
        now = time.time()
        if now - self.last_prune < PRUNE_EVERY:
            return
        self.last_prune = now
        try:
            pruned = self.store.prune(now - self.topology.store.retention)
        except StoreError as exc:
            log.warning("tracker: %s (pruned at the next turn)", exc)
            return
        if pruned:
            log.info("tracker: pruned %d task(s) that ended over the retention", pruned)

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        for socket in (*self.events, *self.query, *self.pubs):
            socket.close(linger=0)
        for relay in self.relays.values():
            relay.socket.close(linger=0)
        if self.guard is not None:
            self.guard.close()
        self.store.close()

    def is_unknown(self, row: TaskRow, now: float) -> bool:
        """A live task whose next progress was due, or whose satellite went silent."""
        if row.ended is not None:
            return False
        if row.deadline > 0 and now > row.deadline:
            return True
        if row.at_satellite and row.at_satellite != self.satellite:
            heard = self.last_heard(row.at_satellite)
            return heard is None or now - heard > PEER_SILENT
        return False

    def last_heard(self, satellite: str) -> float | None:
        """When this tracker last heard from another satellite (its tracker's heartbeat)."""
        history = self.loads.get(f"{satellite}/{TRACKER}")
        return history[-1]["received"] if history else None


def _after(body: dict[str, Any], op: str) -> int:
    """A query's ``after``: events numbered above it (default 0, all of them)."""
    after = body.get("after", 0)
    if type(after) is not int or not 0 <= after <= _MAX_INT:
        raise MessageError(f"query {op}: after must be an integer in 0..2**63-1")
    return after


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(kind: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(kind))
    return names


def _as_dict(row: Any) -> dict[str, Any]:
    """A store row as a dict for a reply: shallow (``dataclasses.asdict`` deep-copies, slowly)."""
    return {name: getattr(row, name) for name in _field_names(type(row))}


def _apply_row(machine: TaskMachine, row: EventRow) -> None:
    detail = row.detail
    machine.apply(
        Event(row.event),
        branch=row.branch,
        seq=row.seq,
        attempt=row.attempt,
        step=row.step,
        at=row.at,
        children=detail.get("children"),
        parent=detail.get("parent", 0),
        error=detail.get("error", ""),
        deadline=float(detail.get("deadline", 0.0)),
    )


class Relay:
    """Events of another satellite's tasks, on their way to its tracker.

    Kept in the store until that tracker confirms them (so a restart, or a link
    down for a while, loses none), sent in batches like a router's, with a
    heartbeat every second so that tracker knows this satellite is alive.
    """

    def __init__(self, tracker: Tracker, context: Context, dest: str, store: Store) -> None:
        self.tracker = tracker
        self.dest = dest
        self.producer = f"{tracker.satellite}/{TRACKER}"
        epoch, self.next_eseq = store.relay_marks().get(dest, (0, 1))
        self.epoch = epoch or secrets.randbelow(2**31) + 1
        self.outstanding: Outstanding[bytes] = Outstanding(
            store.relay_pending().get(dest, []), timeout=RELAY_CONFIRM_TIMEOUT
        )
        self.last_beat = 0.0
        topology = tracker.topology
        plan = get_connection(topology, TRACKER, satellite=dest)
        address = next(a for a in plan.socket("events").addresses if a.startswith("tcp://"))

        def setup(socket: zmq.Socket[bytes]) -> None:
            configure(socket, hwm=10_000, max_size=topology.defaults.max_message_size)
            socket.setsockopt(zmq.IMMEDIATE, 1)

        self.socket = curve.connect(
            context,
            zmq.DEALER,
            address,
            guard=tracker.guard,
            server=curve.server_key(topology, dest),
            setup=setup,
        )

    def add(self, row: list[Any], batch: Batch) -> None:
        """Keep an event for the other tracker (written in this cycle's transaction)."""
        packed = packb([*row[:EVENT], row[EVENT].value, *row[EVENT + 1 :]])
        batch.relay.append((self.dest, self.next_eseq, packed))
        self.outstanding.extend([(self.next_eseq, packed)])
        self.next_eseq += 1
        batch.relay_marks[self.dest] = (self.epoch, self.next_eseq)

    def send(self, now: float) -> None:
        if now - self.last_beat >= 1.0:
            self.last_beat = now
            beat = {
                "node": TRACKER,
                "satellite": self.tracker.satellite,
                "role": "tracker",
                "relayed": len(self.outstanding),
            }
            with contextlib.suppress(zmq.Again):
                send_frames(self.socket, control("load", beat), NOBLOCK)
        batch = self.outstanding.batch(now, 2000)
        if not batch:
            return
        meta = {"producer": self.producer, "epoch": self.epoch, "first": batch[0][0]}
        records = packb([msgpack.unpackb(r, raw=False) for _, r in batch])
        try:
            send_frames(self.socket, control("events", meta, records), NOBLOCK)
        except zmq.Again:
            self.outstanding.unsend(batch)
            return
        self.outstanding.sent(now)

    def read(self, batch: Batch) -> None:
        """Confirmations from the other tracker: forget what it has stored."""
        for frames in drain(self.socket, MAX_BATCHES):
            try:
                message = decode_control(frames, frozenset({"confirm"}))
                upto = field_of(message.body, "upto", int, "confirm")
                epoch = field_of(message.body, "epoch", int, "confirm")
            except MessageError as exc:
                self.tracker._malformed("relay", exc)
                continue
            if epoch != self.epoch:
                continue
            gap = bool(message.body.get("gap"))
            if self.outstanding.confirmed(upto, time.monotonic(), gap=gap):
                batch.relay_confirmed[self.dest] = upto
