"""The client: submit tasks, follow them live, query their states, get their results.

::

    client = dsat.connect("topology.toml")
    task_id = client.submit("cpu", {"host": "a"})
    for event in client.status_for(task_id):     # live, ends with the task
        print(event.event, event.step)
    client.state(task_id)                         # a State: its branches, history...
    client.wait(task_id, timeout=10)              # the result, once every branch ended
    client.retry_many(job_id="batch-1")           # its dead letters, sent again

A client is not thread-safe: give each thread its own (they are cheap).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Final

import msgpack
import zmq

from dsat import curve
from dsat.errors import DsatError, MessageError
from dsat.fsm import ROOT
from dsat.message import (
    DEFAULT_MAX_SIZE,
    END_TOPIC,
    check_protocol,
    configure,
    control,
    decode_control,
    dumps,
    loads,
    recv_frames,
    send_frames,
)
from dsat.metrics import NodeLoad
from dsat.state import (
    EventInfo,
    State,
    TaskFailedError,
    TaskSummary,
    event_from_row,
    state_from_reply,
    summary_from_row,
)
from dsat.topology import ORCHESTER, TRACKER, Topology, get_connection, load_topology

SUBMIT_CHUNK: Final = 1000  # payloads in one submit message at most
# bytes of a message besides its payloads: the protocol frame, a task's header (ids,
# step names, timestamps) or a submit's body; a payload must leave this much room
HEADER_ROOM: Final = 4096
KNOWN_WITHIN: Final = 2.0  # seconds a task just submitted may take to appear in the tracker
_PAGE: Final = 1000  # dead letters listed per query


class SubmitError(DsatError):
    """A submission was refused: the step is unknown or not an entry, the payload bad, the
    pool saturated."""


class SaturatedError(SubmitError):
    """The pool stayed saturated (it pushed back) for longer than the submit timeout."""


class PayloadTooLargeError(SubmitError):
    """A payload is too large to travel in a task message; nothing of the submit was sent."""

    def __init__(self, step: str, index: int, size: int, limit: int) -> None:
        super().__init__(
            f"submit to {step}: payload #{index} is {size} bytes encoded, over the limit of "
            f"{limit} bytes (max_message_size less {HEADER_ROOM} for the task's header); "
            "send where the data is (a path, a URL) instead, or raise [defaults] "
            "max_message_size"
        )
        self.step = step
        self.index = index  # its place among the payloads given
        self.size = size
        self.limit = limit


class UnreachableError(DsatError):
    """The satellite did not answer in time: is ``dsat run`` running?"""


class WaitTimeoutError(DsatError, TimeoutError):
    """The task did not end within the time given."""


def _only_result(raw: list[Any], *, allow_pickle: bool) -> tuple[bool, Any]:
    """(True, value) when the results are those of a task that did not fan out: one
    result, of the root branch; else (False, None)."""
    if len(raw) != 1 or raw[0]["branch"] != ROOT:
        return False, None
    result = raw[0]
    return True, loads(result["data"], result["serialization"], allow_pickle=allow_pickle)


def _ended_as(raw: Mapping[str, Any] | None, last: int) -> str:
    """The final state if the task of a ``state`` reply ended with ``last`` its latest event."""
    if raw is None:
        return ""
    task = raw["task"]
    ended = task["ended"] is not None and task["events"] <= last
    return str(task["state"]) if ended else ""


class Client:
    """A connection to one satellite: its orchester (submit) and tracker (queries, live)."""

    def __init__(
        self,
        *,
        orchester: str,
        tracker_query: str,
        tracker_pub: str,
        topology: Topology | None = None,
        satellite: str = "",
        timeout: float = 10.0,
        curve_keys: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """Usually made by :func:`connect`. ``curve_keys``: (public, secret, server's public)."""
        self.topology = topology
        self._curve = curve_keys
        self.satellite = satellite
        self.timeout = timeout
        self.allow_pickle = bool(topology and topology.defaults.allow_pickle)
        # what the satellite's sockets take: a bigger message is dropped without a word
        self.max_message_size = topology.defaults.max_message_size if topology else DEFAULT_MAX_SIZE
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._refs = itertools.count(1)
        self._addresses = (orchester, tracker_query, tracker_pub)
        self._submit = self._dealer(orchester)
        self._query = self._dealer(tracker_query)
        self._sub: zmq.Socket[bytes] | None = None

    def _dealer(self, address: str, kind: int = zmq.DEALER) -> zmq.Socket[bytes]:
        socket = self._context.socket(kind)
        hwm = 10_000 if kind == zmq.DEALER else 100_000
        configure(socket, hwm=hwm, max_size=self.max_message_size)
        if address.startswith("tcp://") and self._curve is not None:
            public, secret, server = self._curve
            socket.curve_publickey = public
            socket.curve_secretkey = secret
            socket.curve_serverkey = server
        socket.connect(address)
        return socket

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets; the client cannot be used after."""
        self._context.destroy(linger=0)

    # -- request/reply

    def _request(
        self,
        socket: zmq.Socket[bytes],
        kind: str,
        body: dict[str, Any],
        extra: Iterable[bytes] = (),
        *,
        timeout: float | None = None,
        replies: frozenset[str],
    ) -> Any:
        ref = next(self._refs)
        body = {**body, "ref": ref}
        send_frames(socket, control(kind, body, *extra))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not socket.poll(int(left * 1000) + 1):
                target = "orchester" if socket is self._submit else "tracker"
                raise UnreachableError(
                    f"no answer from the {target} of satellite {self.satellite or '?'} "
                    f"within {self.timeout:g}s: is `dsat run` running?"
                )
            try:
                reply = decode_control(recv_frames(socket), replies, max_extra=0)
            except MessageError as exc:
                raise DsatError(f"bad answer from the satellite: {exc}") from exc
            if type(reply.body) is dict and reply.body.get("ref") == ref:
                return reply

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the orchester and the tracker who they are; UnreachableError if either is silent."""
        welcome = self._request(
            self._submit, "hello", {}, timeout=timeout, replies=frozenset({"welcome"})
        )
        reply = self._request(
            self._query, "query", {"op": "hello"}, timeout=timeout, replies=frozenset({"reply"})
        )
        return {"orchester": welcome.body, "tracker": reply.body.get("result")}

    def _query_op(self, op: str, **args: Any) -> Any:
        reply = self._request(
            self._query, "query", {"op": op, **args}, replies=frozenset({"reply"})
        )
        if not reply.body.get("ok"):
            raise DsatError(f"tracker: {reply.body.get('error')}")
        return reply.body.get("result")

    # -- submitting

    def submit(
        self,
        step: str,
        payload: Any,
        *,
        job_id: str | None = None,
        serialization: str = "msgpack",
        timeout: float | None = None,
    ) -> str:
        """Submit one task to a step; return its task_id once the satellite has it for sure.

        Raises:
            SaturatedError: the step pushed back for longer than ``timeout``.
            PayloadTooLargeError: the encoded payload is over the satellite's
                max_message_size (less HEADER_ROOM); nothing was sent.
            SubmitError: the step is unknown or not an entry, or the payload cannot be sent.
        """
        return self.submit_many(
            step, [payload], job_id=job_id, serialization=serialization, timeout=timeout
        )[0]

    def submit_many(
        self,
        step: str,
        payloads: Iterable[Any],
        *,
        job_id: str | None = None,
        serialization: str = "msgpack",
        timeout: float | None = None,
    ) -> list[str]:
        """Submit many tasks to a step, in chunks; return their task_ids in order.

        Raises:
            PayloadTooLargeError: a payload is over the limit (before anything is sent).
            SaturatedError, SubmitError: as :meth:`submit`.
        """
        encoded = [dumps(p, serialization, allow_pickle=self.allow_pickle) for p in payloads]
        limit = self.max_message_size - HEADER_ROOM
        for index, data in enumerate(encoded):
            if len(data) > limit:
                raise PayloadTooLargeError(step, index, len(data), limit)
        task_ids: list[str] = []
        for chunk in submit_chunks(encoded, SUBMIT_CHUNK, limit):
            task_ids.extend(self._submit_chunk(step, chunk, job_id, serialization, timeout))
        return task_ids

    def _submit_chunk(
        self,
        step: str,
        chunk: list[bytes],
        job_id: str | None,
        serialization: str,
        timeout: float | None,
    ) -> list[str]:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pause = 0.01
        body = {"targets": [step], "job_id": job_id or "", "serialization": serialization}
        while True:
            left = max(0.1, deadline - time.monotonic())
            reply = self._request(
                self._submit,
                "submit",
                body,
                chunk,
                timeout=left,
                replies=frozenset({"accepted", "refused"}),
            )
            if reply.kind == "accepted":
                return list(reply.body["task_ids"])
            reason = reply.body.get("reason", "refused")
            if not reply.body.get("busy"):
                raise SubmitError(f"submit to {step}: {reason}")
            if time.monotonic() + pause > deadline:
                raise SaturatedError(
                    f"submit to {step}: still saturated after {limit:g}s ({reason})"
                )
            time.sleep(pause)  # backpressure: wait for room, a little longer each time
            pause = min(0.1, pause * 2)

    def retry(self, task_id: str) -> str:
        """Send a failed task (a dead letter) again, from the step where it failed."""
        letter = self._query_op("dead_letter", task_id=task_id)
        if letter is None:
            raise SubmitError(f"task {task_id} is not a dead letter (it did not fail, or is gone)")
        self._resend(letter)
        return task_id

    def retry_many(
        self,
        task_ids: Iterable[str] = (),
        *,
        job_id: str | None = None,
        step: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Send dead letters again: those named, or every one of ``job_id`` and ``step``
        (both filters when both are given), at most ``limit``; return the task ids sent.

        Named tasks and filters combine: the named tasks that match the filters.

        Raises:
            SubmitError: a named task is not a dead letter (then none is sent), or the
                orchester refused one.
        """
        named = list(dict.fromkeys(task_ids))
        letters: list[Mapping[str, Any]] = []
        for task_id in named:
            letter = self._query_op("dead_letter", task_id=task_id)
            if letter is None:
                raise SubmitError(
                    f"task {task_id} is not a dead letter (it did not fail, or is gone)"
                )
            if (job_id is None or letter["job_id"] == job_id) and (
                step is None or letter["step"] == step
            ):
                letters.append(letter)
        sent: list[str] = []
        for letter in letters[:limit]:
            self._resend(letter)
            sent.append(letter["task_id"])
        if named:
            return sent
        after = ""
        while limit is None or len(sent) < limit:
            page = min(_PAGE, limit - len(sent)) if limit is not None else _PAGE
            found = self._query_op(
                "dead_letters", job_id=job_id, step=step, after=after, limit=page
            )
            for task_id in found:
                letter = self._query_op("dead_letter", task_id=task_id)
                if letter is not None:  # None: sent again by someone else meanwhile
                    self._resend(letter)
                    sent.append(task_id)
            if len(found) < page:
                break
            after = found[-1]
        return sent

    def _resend(self, letter: Mapping[str, Any]) -> None:
        body = {
            k: letter[k]
            for k in (
                "task_id",
                "job_id",
                "origin",
                "step",
                "branch",
                "seq",
                "attempt",
                "serialization",
            )
        }
        reply = self._request(
            self._submit,
            "resend",
            body,
            [letter["payload"]],
            replies=frozenset({"accepted", "refused"}),
        )
        if reply.kind != "accepted":
            raise SubmitError(f"retry {letter['task_id']}: {reply.body.get('reason')}")

    # -- the static view

    def state(self, task_id: str) -> State:
        """The task's State: current state, step, attempts, error, timestamps, history.

        Raises:
            DsatError: no such task.
        """
        raw = self._known(task_id)
        return state_from_reply(raw, allow_pickle=self.allow_pickle)

    def _known(self, task_id: str, patience: float = KNOWN_WITHIN) -> dict[str, Any]:
        """The tracker's view of a task; a task just submitted may need a moment to appear."""
        deadline = time.monotonic() + patience
        pause = 0.01
        while True:
            raw = self._query_op("state", task_id=task_id)
            if raw is not None:
                return dict(raw)
            if time.monotonic() + pause > deadline:
                raise DsatError(f"no task {task_id} on satellite {self.satellite or '?'}")
            time.sleep(pause)
            pause = min(0.2, pause * 2)

    def tasks(
        self,
        *,
        job_id: str | None = None,
        step: str | None = None,
        state: str | None = None,
        stuck: bool = False,
        limit: int = 100,
    ) -> list[TaskSummary]:
        """Tasks matching every given filter, newest first. ``stuck``: no progress past due."""
        rows = self._query_op(
            "tasks", job_id=job_id, step=step, state=state, stuck=stuck, limit=limit
        )
        return [summary_from_row(row) for row in rows]

    def load(self) -> dict[str, NodeLoad]:
        """The live load of every node ("SATELLITE/NODE"): queued, busy, idle, done/s..."""
        return {
            name: NodeLoad.from_report(report) for name, report in self._query_op("load").items()
        }

    def pools(self) -> dict[str, dict[str, Any]]:
        """Every pool ("SATELLITE/POOL"): its bounds, its queue's load, its last scalings."""
        return dict(self._query_op("pools"))

    def decisions(self, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Autoscaling decisions, live, as they are made (forever, or until ``timeout``)."""
        sub = self._subscriber()
        sub.setsockopt(zmq.SUBSCRIBE, b"@pools")
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            while deadline is None or time.monotonic() < deadline:
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if not sub.poll(int(max(0.0, left) * 1000) + 1):
                    continue
                frames = recv_frames(sub)
                if len(frames) != 3 or frames[0] != b"@pools":
                    continue
                try:
                    check_protocol(frames[1])
                    decision = msgpack.unpackb(frames[2], raw=False)
                except (MessageError, ValueError, TypeError, msgpack.UnpackException):
                    continue
                if type(decision) is dict:
                    yield decision
        finally:
            if not self._context.closed:
                sub.setsockopt(zmq.UNSUBSCRIBE, b"@pools")

    def stats(self) -> dict[str, Any]:
        """The tracker's own figures: live tasks, events applied, malformed, anomalies."""
        return dict(self._query_op("stats"))

    # -- the dynamic view

    def _subscriber(self) -> zmq.Socket[bytes]:
        if self._sub is None:
            self._sub = self._dealer(self._addresses[2], zmq.SUB)
        return self._sub

    def status_for(self, task_id: str, *, timeout: float | None = None) -> Iterator[EventInfo]:
        """The task's events, live, in order, each once, ending with the one that ends it.

        Events from before the call come from the store; later ones from the live
        stream; a gap in the stream (PUB drops under load) is filled from the store.

        Raises:
            WaitTimeoutError: ``timeout`` seconds passed before the task ended.
        """
        for event, _ in self._follow(task_id, timeout):
            yield event

    def _follow(
        self, task_id: str, timeout: float | None, *, ends_only: bool = False
    ) -> Iterator[tuple[EventInfo, list[Any] | None]]:
        """status_for's events, each with the task's results if it came live and ended it.

        ``ends_only``: listen only for the event that ends the task (the tracker then
        publishes that one alone, not every event); the events before it may be skipped.
        """
        sub = self._subscriber()
        topic = (END_TOPIC if ends_only else b"") + task_id.encode()
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        deadline = time.monotonic() + timeout if timeout is not None else None
        last = 0
        poll_every = 0.05
        try:
            # One query gives the task, its events so far and whether it ended. A task
            # just submitted may not be in the tracker yet: listen (its live events say
            # it is) and ask again soon, rather than sleep; a task still unknown after
            # KNOWN_WITHIN is an error, not an endless wait.
            raw: Mapping[str, Any] | None = self._query_op("state", task_id=task_id)
            unknown_until = time.monotonic() + KNOWN_WITHIN
            if raw is None:
                poll_every = 0.005
            while True:
                if raw is None and last == 0 and time.monotonic() > unknown_until:
                    raise DsatError(f"no task {task_id} on satellite {self.satellite or '?'}")
                # What the store has (at first, and whenever the stream is quiet: the
                # subscription takes a moment to start, and PUB drops under load).
                stored = (
                    [event_from_row(e) for e in raw["events"] if e["tseq"] > last] if raw else []
                )
                ended = _ended_as(raw, stored[-1].tseq if stored else last)
                if ended and stored:  # the store's last event is the one that ended it
                    stored[-1] = replace(stored[-1], over=True, state=ended)
                # the reply that shows the end holds the results: wait needs no other query
                results = raw.get("results") if ended and raw is not None else None
                for event in stored:
                    last = event.tseq
                    yield event, results if event is stored[-1] else None
                if ended:
                    return
                quiet_until = time.monotonic() + poll_every
                while True:
                    left = quiet_until - time.monotonic()
                    if deadline is not None:
                        if deadline - time.monotonic() <= 0:
                            raise WaitTimeoutError(
                                f"task {task_id} did not end within {timeout:g}s"
                            )
                        left = min(left, deadline - time.monotonic())
                    if left <= 0 or not sub.poll(int(left * 1000) + 1):
                        break
                    received = self._read_live(sub)
                    if received is None:
                        continue
                    live, results = received
                    if live.task_id != task_id or live.tseq <= last:
                        continue
                    if live.tseq > last + 1 and not ends_only:  # missed some: from the store
                        for missed in self._stored_events(task_id, last):
                            if missed.tseq >= live.tseq:
                                break
                            last = missed.tseq
                            yield missed, None
                    last = live.tseq
                    yield live, results
                    if live.over:
                        return
                    poll_every = 0.05
                poll_every = min(1.0, poll_every * 2)
                raw = self._query_op("state", task_id=task_id, after=last)
        finally:
            if self._sub is not None and not self._context.closed:
                sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    def _stored_events(self, task_id: str, after: int) -> list[EventInfo]:
        return [event_from_row(e) for e in self._query_op("events", task_id=task_id, after=after)]

    def _read_live(self, sub: zmq.Socket[bytes]) -> tuple[EventInfo, list[Any] | None] | None:
        """A live event, and the task's results if it ended the task (None: not sent)."""
        frames = recv_frames(sub)
        if len(frames) != 3:
            return None
        try:
            check_protocol(frames[1])
            raw = msgpack.unpackb(frames[2], raw=False)
            results = raw.get("results")
            return event_from_row(raw), results if type(results) is list else None
        except (MessageError, ValueError, TypeError, AttributeError, msgpack.UnpackException):
            return None

    def wait(self, task_id: str, timeout: float = 10.0) -> Any:
        """Wait for the task to end (every branch); return its result.

        A task that did not fan out: the terminus' result. A fanned-out task: a dict
        {terminus step: result}, whose value is a list of the results, in branch
        order, at a step where several branches ended. (``State.result``, the same.)

        Raises:
            TaskFailedError: it ended in FAILURE (a branch failed).
            ResultNotKeptError: it ended well, but a result was over max_result_size.
            WaitTimeoutError: it did not end within ``timeout`` seconds.
        """
        for event, results in self._follow(task_id, timeout, ends_only=True):
            if event.over:
                if event.state == "HAPPY_END" and results is not None:
                    # it ended, and the end brought the results: when they are those of
                    # a task that did not fan out, no other query is needed
                    with contextlib.suppress(KeyError, TypeError):
                        alone, value = _only_result(results, allow_pickle=self.allow_pickle)
                        if alone:
                            return value
                break
        state = self.state(task_id)
        if not state.over:
            # it ended per the stream, but the store lags? poll it until the deadline
            deadline = time.monotonic() + 1.0
            while not state.over and time.monotonic() < deadline:
                time.sleep(0.01)
                state = self.state(task_id)
        if state.state == "FAILURE":
            raise TaskFailedError(state)
        return state.result


def submit_chunks(encoded: list[bytes], most: int, size: int) -> Iterator[list[bytes]]:
    """The payloads in order, in chunks of at most ``most`` payloads and ``size`` bytes
    (a payload larger than ``size`` alone in its chunk)."""
    chunk: list[bytes] = []
    total = 0
    for data in encoded:
        if chunk and (len(chunk) >= most or total + len(data) > size):
            yield chunk
            chunk, total = [], 0
        chunk.append(data)
        total += len(data)
    if chunk:
        yield chunk


def connect(
    target: str | os.PathLike[str] | Topology,
    *,
    satellite: str = "",
    timeout: float = 10.0,
    key: str | None = None,
    local: bool | None = None,
) -> Client:
    """A Client for a satellite, from its topology file (or a loaded Topology).

    The satellite defaults to the topology's first one. Its sockets are reached
    over ipc when its runtime directory is on this machine, else over tcp; then,
    unless the satellite runs insecure, ``key`` (or $DSAT_KEY) names this
    client's secret key file, whose public key the topology lists under
    ``[client.NAME]``. ``local`` forces one or the other.
    """
    topology = (
        target if isinstance(target, Topology) else load_topology(target, check_imports=False)
    )
    satellite = satellite or next(iter(topology.satellites))
    if satellite not in topology.satellites:
        known = ", ".join(topology.satellites)
        raise DsatError(f"{topology.path}: no satellite {satellite!r} (defined: {known})")
    orchester = get_connection(topology, ORCHESTER, satellite=satellite)
    tracker = get_connection(topology, TRACKER, satellite=satellite)
    if local is None:
        local = os.path.isdir(topology.runtime_dir(satellite))

    def pick(addresses: tuple[str, ...]) -> str:
        wanted = "ipc://" if local else "tcp://"
        return next((a for a in addresses if a.startswith(wanted)), addresses[0])

    submit = pick(orchester.socket("submit").addresses)
    keys = None
    server = curve.server_key(topology, satellite)
    if submit.startswith("tcp://") and server is not None:
        key = key or os.environ.get("DSAT_KEY")
        if not key:
            raise DsatError(
                f"satellite {satellite} is reached over tcp with CURVE: give this client a "
                "key (key=... or $DSAT_KEY: a secret key file from `dsat keys generate NAME`, "
                "its public key listed under [client.NAME] in the topology)"
            )
        secret = curve.read_key(key)
        keys = (curve.public_of(secret), secret, server)
    return Client(
        orchester=submit,
        tracker_query=pick(tracker.socket("query").addresses),
        tracker_pub=pick(tracker.socket("pub").addresses),
        topology=topology,
        satellite=satellite,
        timeout=timeout,
        curve_keys=keys,
    )
