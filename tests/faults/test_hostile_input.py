"""Malformed and hostile input on every bound socket: counted, logged, and nothing dies."""

from __future__ import annotations

import collections
import pickle
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from faultkit import (
    HEADER,
    log_tail,
    not_ended,
    peak_rss,
    read_outcome,
    rss,
    tally,
    wait_until_ended,
)
from zmq.utils.monitor import recv_monitor_message

import dsat
from conftest import Figures, RunningSatellite, print_figures, wait_for
from dsat.message import PROTOCOL_FRAME, EventRecord, control, pack_records

TOPOLOGY = (
    HEADER
    + """
[defaults]
retries = 0

[step.p]
call = "hostile:double"
entry = true
workers = 2

[step.out]
kind = "sink"
call = "hostile:keep"

[[link]]
from = "p"
to = "out"
"""
)

CODE = """
def double(p):
    return {"n": p["n"], "double": p["n"] * 2}

def keep(p):
    return p
"""

# (node, socket purpose, what it takes)
SOCKETS = (
    ("orchester", "submit", "submit"),
    ("p.queue", "in", "task"),
    ("p.queue", "work", "work"),
    ("out", "in", "task"),
    ("tracker", "events", "events"),
    ("tracker", "query", "query"),
)
ROUTERS = ("orchester", "p.queue", "out")  # the nodes that count in their load reports
NODES = ("orchester", "tracker", "p.queue", "p", "out")

GARBAGE = 10_000
VALID = 1000


# ---------------------------------------------------------------------------
# the garbage, one kind at a time


def _task_header(rng: random.Random, **changes: Any) -> dict[str, Any]:
    header = {
        "task_id": f"garbage-{rng.getrandbits(64):016x}",
        "job_id": "garbage",
        "seq": 1,
        "step": "",
        "next": "p",
        "event": "SEND",
        "where": "local",
        "origin": "local",
        "wid": "garbage",
        "pid": 1,
        "attempt": 1,
        "branch": 1,
        "deadline": 0.0,
        "timestamps": {"created": time.time()},
        "serialization": "msgpack",
    }
    header.update(changes)
    return header


def _task(rng: random.Random, payload: bytes = b"\x81\xa1n\x01", **changes: Any) -> list[bytes]:
    return [PROTOCOL_FRAME, msgpack.packb(_task_header(rng, **changes)), payload]


def _submit_body(**changes: Any) -> dict[str, Any]:
    return {"ref": 1, "targets": ["p"], "job_id": "garbage", "serialization": "msgpack", **changes}


def _record(rng: random.Random, **changes: Any) -> list[Any]:
    record = EventRecord(
        task_id=f"garbage-{rng.getrandbits(64):016x}",
        job_id="garbage",
        branch=1,
        seq=1,
        attempt=1,
        event=dsat.Event.ACK,
        step="p",
        where="local",
        origin="local",
        wid="garbage",
        pid=1,
        at=time.time(),
    ).as_list()
    names = ("task_id", "job_id", "branch", "seq", "attempt", "event", "step")
    for name, value in changes.items():
        record[names.index(name)] = value
    return record


def _events(rng: random.Random, meta: dict[str, Any] | None = None, *records: bytes) -> list[bytes]:
    meta = {"producer": "local/garbage", "epoch": 1, "first": 1} if meta is None else meta
    frames = records or (msgpack.packb([_record(rng, seq=2**64 - 1)]),)
    return control("events", meta, *frames)


def template(takes: str, rng: random.Random) -> list[bytes]:
    """A message of the kind the socket takes, as a base to damage (credit pid 0: no one)."""
    if takes == "task":
        return _task(rng)
    if takes == "submit":
        return control("submit", _submit_body(), msgpack.packb({"n": 1}))
    if takes == "work":
        return control("credit", {"free": 1, "pid": 0, "wid": "garbage"})
    if takes == "events":
        return _events(rng, None, pack_records([]))
    return control("query", {"ref": 1, "op": "hello"})


def random_bytes(takes: str, rng: random.Random, i: int) -> list[bytes]:
    return [rng.randbytes(rng.randint(8, 512)) for _ in range(rng.randint(1, 4))]


def truncated(takes: str, rng: random.Random, i: int) -> list[bytes]:
    """A message cut short: its header (or a control message's body, or its records)."""
    frames = template(takes, rng)
    index = 1 if takes == "task" else 2
    if takes == "events" and i % 2:
        frames[3] = msgpack.packb([_record(rng)])
        index = 3
    frames[index] = frames[index][: len(frames[index]) // 2 if i % 3 else 1]
    return frames


def wrong_version(takes: str, rng: random.Random, i: int) -> list[bytes]:
    frames = template(takes, rng)
    frames[0] = (b"9.9.9", b"1.1.0", b"0.9.0", b"one.two")[i % 4]
    return frames


def wrong_types(takes: str, rng: random.Random, i: int) -> list[bytes]:
    if takes == "task":
        change = (
            {"task_id": 123},
            {"seq": "1"},
            {"deadline": "soon"},
            {"timestamps": [1.0]},
            {"event": 3},
            {"branch": 1.5},
        )[i % 6]
        return _task(rng, **change)
    if takes == "submit":
        body = (
            _submit_body(targets="p"),
            _submit_body(job_id=5),
            _submit_body(serialization=7),
            ["submit", "p"],
        )[i % 4]
        return control("submit", body, msgpack.packb({"n": 1}))
    if takes == "work":
        return (
            control("credit", {"free": "1", "pid": 0, "wid": "garbage"}),
            control("credit", {"free": 1, "pid": "1", "wid": "garbage"}),
            control("credit", {"free": 1, "pid": 0, "wid": 1}),
            control("result", {"key": "k", "attempt": 1, "status": "END"}, b""),
            control("result", [1, 2, 3], b""),
        )[i % 5]
    if takes == "events":
        return (
            _events(rng, {"producer": 1, "epoch": 1, "first": 1}),
            _events(rng, {"producer": "local/garbage", "epoch": "1", "first": 1}),
            _events(rng, None, msgpack.packb([_record(rng, task_id=1)])),
            _events(rng, None, msgpack.packb({"not": "a list"})),
            control("load", {"node": 5}),
            control("load", ["p.queue"]),
        )[i % 6]
    body = ({"ref": 1, "op": 5}, {"ref": 1, "op": "state", "task_id": 5}, ["hello"])[i % 3]
    return control("query", body)


def out_of_range(takes: str, rng: random.Random, i: int) -> list[bytes]:
    """The right types, values no sender may use: huge or negative numbers, long strings."""
    if takes == "task":
        change = (
            {"seq": 2**64 - 1},
            {"attempt": -1},
            {"task_id": "t" * 65},
            {"step": "s" * 300},
        )[i % 4]
        return _task(rng, **change)
    if takes == "submit":
        body = (_submit_body(job_id="j" * 200), _submit_body(targets=["x" * 300]))[i % 2]
        return control("submit", body, msgpack.packb({"n": 1}))
    if takes == "work":
        pid = (2**31, 2**63 - 1, -5)[i % 3]
        return control("credit", {"free": 1, "pid": pid, "wid": "garbage"})
    if takes == "events":
        change = ({"seq": 2**64 - 1}, {"attempt": -1}, {"task_id": ""})[i % 3]
        return _events(rng, None, msgpack.packb([_record(rng, **change)]))
    body = (
        {"ref": 1, "op": "tasks", "limit": 2**64 - 1},
        {"ref": 1, "op": "events", "task_id": "x", "after": 2**63 + 5},
    )[i % 2]
    return control("query", body)


def pickled(takes: str, rng: random.Random, i: int) -> list[bytes]:
    """A pickle payload where pickle is not enabled; a pickled body where msgpack is due."""
    payload = pickle.dumps({"n": 1})
    if takes == "task":
        return _task(rng, payload, serialization="pickle")
    if takes == "submit":
        return control("submit", _submit_body(serialization="pickle"), payload)
    frames = template(takes, rng)
    frames[2] = pickle.dumps(msgpack.unpackb(frames[2]))
    return frames


def single_frame(takes: str, rng: random.Random, i: int) -> list[bytes]:
    frames = template(takes, rng)
    return [(PROTOCOL_FRAME, frames[1], frames[-1], b"x")[i % 4]]


def empty_frames(takes: str, rng: random.Random, i: int) -> list[bytes]:
    return ([b""], [b"", b""], [b"", b"", b""], [b""] * 5, [PROTOCOL_FRAME, b"", b""])[i % 5]


def wrong_kind(takes: str, rng: random.Random, i: int) -> list[bytes]:
    """A well-formed message that this socket does not take."""
    others = [
        _task(rng),
        control("ack", [["t", 1, 1]]),
        control("submit", _submit_body(), b"\x01"),
        control("credit", {"free": 1, "pid": 0, "wid": "garbage"}),
        control("confirm", {"epoch": 1, "upto": 1}),
        control("query", {"ref": 1, "op": "hello"}),
        control("reply", {"ref": 1, "ok": True}),
    ]
    takes_kind = {"task": 0, "submit": 2, "work": 3, "events": 4, "query": 5}[takes]
    choices = [o for n, o in enumerate(others) if n != takes_kind]
    return choices[i % len(choices)]


def wrong_frame_count(takes: str, rng: random.Random, i: int) -> list[bytes]:
    frames = template(takes, rng)
    if takes == "task":
        return (frames[:2], [*frames, b"extra"])[i % 2]
    if takes == "submit":
        return (frames[:2], frames[:3])[i % 2]  # no body; no payload
    if takes == "events":
        return (frames[:2], frames[:3], [*frames, b"x"])[i % 3]
    return (frames[:2], [*frames, b"x", b"y"])[i % 2]  # work, query: no body; 2 extra


KINDS: dict[str, Callable[[str, random.Random, int], list[bytes]]] = {
    "random_bytes": random_bytes,
    "truncated": truncated,
    "wrong_version": wrong_version,
    "wrong_types": wrong_types,
    "pickle": pickled,
    "single_frame": single_frame,
    "empty_frames": empty_frames,
    "wrong_kind": wrong_kind,
    "wrong_frame_count": wrong_frame_count,
    "out_of_range": out_of_range,  # last: it is the kind most likely to hurt
}


# ---------------------------------------------------------------------------
# sending it, counting what the satellite counted


class Garbage:
    """One DEALER per bound socket of the satellite (linger 0), sending what it is given."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], topology: dsat.Topology) -> None:
        self.sockets: list[zmq.Socket[bytes]] = []
        for node, purpose, _ in SOCKETS:
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 100_000)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            plan = dsat.get_connection(topology, node, satellite="local")
            (address,) = [a for a in plan.socket(purpose).addresses if a.startswith("ipc://")]
            socket.connect(address)
            self.sockets.append(socket)

    def send(self, index: int, frames: list[bytes]) -> None:
        self.sockets[index].send_multipart(frames, zmq.NOBLOCK)

    def drain(self) -> None:
        """Throw away the answers (refusals, replies, acks) so no queue fills."""
        for socket in self.sockets:
            while socket.poll(0):
                socket.recv_multipart()


Counts = dict[tuple[str, str], int]


def counted(client: dsat.Client) -> tuple[Counts, dict[str, float]]:
    """Malformed messages per (node, socket), and when each router made its latest report."""
    counts: Counts = collections.Counter()
    reported: dict[str, float] = {}
    now = time.time()
    for name, report in client.load().items():
        node = name.split("/", 1)[1]
        reported[node] = now - report.age
        for purpose, n in report.malformed.items():
            counts[(node, purpose)] += n
    for purpose, n in client.stats()["malformed"].items():
        counts[("tracker", purpose)] += n
    return counts, reported


def settle(topology: dsat.Topology, previous: Counts, expected: int, sent_at: float) -> Counts:
    """The counts once every router reported well after `sent_at` and `expected` were counted.

    Gives up after 8 s (a kind that is not counted never reaches `expected`), then returns
    the latest reading that had every router's report, or `previous` when there was none
    (the tracker was dead, or had just restarted and heard from no router yet).
    """
    deadline = time.monotonic() + 8.0
    best = previous
    # a short timeout: a query lost with a tracker that died must not hold us for long
    with dsat.connect(topology, timeout=1.0) as client:
        while True:
            try:
                counts, reported = counted(client)
            except dsat.DsatError:  # the tracker is restarting
                counts, reported = {}, {}
            if all(n in reported for n in ROUTERS):
                best = counts
            fresh = all(reported.get(n, 0.0) > sent_at + 1.2 for n in ROUTERS)
            if fresh and sum(counts.values()) >= expected:
                return counts
            if time.monotonic() > deadline:
                return best
            time.sleep(0.1)


def _pids(running: RunningSatellite) -> dict[str, list[int]]:
    return {node: sorted(running.pids_of(node)) for node in NODES}


def test_ten_thousand_malformed_messages_are_each_counted_once_and_kill_nothing(
    satellite: Callable[..., RunningSatellite],
    capsys: pytest.CaptureFixture[str],
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    running = satellite(TOPOLOGY, {"hostile": CODE})
    pids_before = _pids(running)
    tree_before = sorted(running.tree())
    figures = Figures("malformed", extra={"seed": seed})
    per_kind = GARBAGE // len(KINDS)
    valid_per_round = VALID // len(KINDS) // 10

    with running.client(timeout=30) as client:
        topology = client.topology
        assert topology is not None
        garbage = Garbage(zctx, topology)
        wait_for(lambda: all(n in counted(client)[1] for n in ROUTERS), timeout=10)
        baseline, _ = counted(client)
        assert sum(baseline.values()) == 0, baseline
        started = time.monotonic()
        valid_ids: list[str] = []
        expected: dict[str, Counts] = {}
        seen: dict[str, Counts] = {}
        restarted: dict[str, list[str]] = {}
        previous, pids = baseline, pids_before
        for kind, make in KINDS.items():
            plan: Counts = collections.Counter()
            for i in range(per_kind):
                node, purpose, takes = SOCKETS[i % len(SOCKETS)]
                garbage.send(i % len(SOCKETS), make(takes, rng, i // len(SOCKETS)))
                plan[(node, purpose)] += 1
                if i % (per_kind // 10) == per_kind // 10 - 1:  # valid tasks in between
                    first = len(valid_ids)
                    payloads = [{"n": n} for n in range(first, first + valid_per_round)]
                    valid_ids += client.submit_many("p", payloads, job_id="valid")
                    garbage.drain()
            now = settle(topology, previous, sum(previous.values()) + per_kind, time.time())
            garbage.drain()
            expected[kind] = plan
            # a node that restarted counts from 0 again: its new count is all of this kind
            pids_now = _pids(running)
            restarted[kind] = [n for n in NODES if pids_now[n] != pids[n]]
            seen[kind] = {
                key: now.get(key, 0) - (0 if key[0] in restarted[kind] else previous.get(key, 0))
                for key in {*now, *plan}
            }
            previous, pids = now, pids_now
        counts = previous
        wait_until_ended(running, "valid", len(valid_ids), timeout=60)
        figures.time = time.monotonic() - started
    pids_after = _pids(running)
    tree_after = sorted(running.tree())
    assert running.stop() == 0
    outcome = read_outcome(running, valid_ids)
    tally(figures, outcome)

    missed: dict[str, dict[str, tuple[int, int]]] = {}  # kind -> socket -> (counted, sent)
    for kind in KINDS:
        for key in sorted({*seen[kind], *expected[kind]}):
            got, sent = seen[kind].get(key, 0), expected[kind].get(key, 0)
            if got != sent:
                missed.setdefault(kind, {})[".".join(key)] = (got, sent)
    figures.extra.update(
        garbage=GARBAGE,
        counted=sum(sum(s.values()) for s in seen.values()),
        restarts=sum(len(r) for r in restarted.values()),
        wrong="none" if not missed else ",".join(sorted(missed)),
    )
    print_figures(capsys, figures)
    detail = "\n".join(
        f"  {kind}: "
        + ", ".join(f"{s} counted {c} of {n}" for s, (c, n) in m.items())
        + (f"; restarted: {restarted[kind]}" if restarted[kind] else "")
        for kind, m in missed.items()
    )

    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert figures.happy_end == VALID, figures.line()
    wrong = [
        n for n, t in enumerate(valid_ids) if outcome.results.get(t) != {"n": n, "double": 2 * n}
    ]
    assert wrong == []
    assert pids_after == pids_before, f"{detail}\n{log_tail(running)}"
    assert tree_after == tree_before
    assert missed == {}, f"per kind, socket: counted of sent\n{detail}"
    assert sum(counts.values()) == GARBAGE, counts


# ---------------------------------------------------------------------------
# a frame over the size limit


def _monitor_events(socket: zmq.Socket[bytes]) -> Iterator[int]:
    while socket.poll(0):
        yield int(recv_monitor_message(socket)["event"])


def test_a_64_mib_frame_is_dropped_before_the_router_allocates_it(
    satellite: Callable[..., RunningSatellite],
    capsys: pytest.CaptureFixture[str],
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    running = satellite(TOPOLOGY, {"hostile": CODE})
    figures = Figures("oversized")
    (router,) = running.pids_of("p.queue")
    with running.client(timeout=30) as client:
        warm = client.submit_many("p", [{"n": n} for n in range(50)], job_id="warm")
        wait_until_ended(running, "warm", len(warm), timeout=30)
        assert client.topology is not None
        limit = client.topology.defaults.max_message_size
        assert limit == 16 * 1024 * 1024  # the default

        before, peak_before = rss(router), peak_rss(router)
        sender = zctx.socket(zmq.DEALER)
        sender.setsockopt(zmq.LINGER, 0)
        monitor = sender.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        plan = dsat.get_connection(client.topology, "p.queue", satellite="local")
        (address,) = [a for a in plan.socket("in").addresses if a.startswith("ipc://")]
        sender.connect(address)
        started = time.monotonic()
        big = _task(random.Random(7), b"\0" * (64 * 1024 * 1024))
        sender.send_multipart(big)
        del big
        seen: list[int] = []
        peak = before
        deadline = time.monotonic() + 30
        while zmq.EVENT_DISCONNECTED not in seen:
            assert time.monotonic() < deadline, f"the router did not drop the sender: {seen}"
            peak = max(peak, rss(router))
            monitor.poll(10)
            seen += _monitor_events(monitor)
        sender.disconnect(address)
        peak = max(peak, rss(router), peak_rss(router))
        after = rss(router)
        dropped_in = time.monotonic() - started

        valid = client.submit_many("p", [{"n": n} for n in range(200)], job_id="after")
        wait_until_ended(running, "after", len(valid), timeout=30)
        figures.time = time.monotonic() - started

        # the router's load report says what it accepted: the 50 and the 200, not the big one
        def accepted_so_far() -> int:
            return client.load()["local/p.queue"].accepted

        wait_for(lambda: accepted_so_far() >= len(warm) + len(valid), timeout=10)
        accepted = accepted_so_far()
    assert running.pids_of("p.queue") == [router]
    assert running.stop() == 0
    outcome = read_outcome(running, valid)
    tally(figures, outcome)
    growth = (peak - before) / 2**20
    figures.extra.update(
        frame_mib=64,
        limit_mib=limit // 2**20,
        rss_before_mib=before / 2**20,
        hwm_before_mib=peak_before / 2**20,
        rss_peak_mib=peak / 2**20,
        rss_after_mib=after / 2**20,
        growth_mib=growth,
        dropped_in=dropped_in,
    )
    print_figures(capsys, figures)

    assert seen[0] == zmq.EVENT_CONNECTED
    assert growth < 20, figures.line()
    assert accepted == len(warm) + len(valid), "the big one was never accepted"
    assert figures.lost == 0, f"{figures.line()}\n{not_ended(outcome)}\n{log_tail(running)}"
    assert figures.happy_end == len(valid)
    assert [outcome.results[t] for t in valid] == [{"n": n, "double": 2 * n} for n in range(200)]
