"""Satellites on hosts of their own: scaling by load, spreading, a host cut off, and keys."""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import zmq
from netkit import Constellation, constellation_fixture  # noqa: F401

import dsat
from conftest import Figures, print_figures, wait_for
from dsat.message import Envelope, control, dumps, encode
from dsat.topology import get_connection

Make = Callable[[Sequence[str]], Constellation]

WORK = """
import time

def work(p, task):
    slow = task.options.get("slow_on") == task.satellite
    time.sleep(p.get("sleep", 0.01) * (5 if slow else 1))
    return {"n": p["n"] * 2, "on": task.satellite}

def out(p):
    return p
"""


# ---------------------------------------------------------------------------
# scaling by load


def test_a_burst_scales_a_pool_up_toward_max_and_back_to_min_losing_nothing(
    constellation: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    sky = constellation(["a"])
    sky.write(
        """
        [step.work]
        call = "work:work"
        entry = true
        satellite = "a"
        workers = { min = 1, max = 4 }
        autoscale = { up_after = "1s", idle_after = "8s", cooldown = "1s" }
        """,
        {"work": WORK},
    )
    running = sky.start("a")
    counts: list[tuple[float, int]] = []
    decisions: list[dict[str, object]] = []
    done = threading.Event()

    def watch() -> None:
        with running.client() as client:
            for decision in client.decisions(timeout=120):
                decisions.append(decision)
                if done.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with running.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("work", [{"n": n, "sleep": 0.02} for n in range(2000)])

        def workers() -> int:
            count = len(running.pids_of("work"))  # the worker processes that run
            counts.append((time.monotonic() - started, count))
            return count

        wait_for(lambda: workers() >= 3, timeout=10, interval=0.2)
        risen = time.monotonic() - started
        results = [client.wait(t, timeout=120) for t in task_ids]
        idle_from = time.monotonic()
        wait_for(lambda: workers() == 1, timeout=60, interval=0.5)
        fallen = time.monotonic() - idle_from
        states = collections.Counter(client.state(t).state for t in task_ids)
    done.set()
    figures = Figures("autoscale")
    figures.submitted = len(task_ids)
    figures.happy_end = states["HAPPY_END"]
    figures.lost = len(task_ids) - states["HAPPY_END"] - states["FAILURE"]
    figures.time = time.monotonic() - started
    figures.extra.update(
        up_to_3_in_s=risen,
        back_to_min_in_s=fallen,
        most_workers=max(c for _, c in counts),
        decisions=len(decisions),
    )
    print_figures(capsys, figures)
    assert risen <= 10.0
    assert fallen <= 60.0
    assert all(1 <= c <= 4 for _, c in counts), counts
    assert all(1 <= int(str(d["after"])) <= 4 for d in decisions), decisions
    assert any(int(str(d["after"])) < int(str(d["before"])) for d in decisions), "it scaled down"
    assert results == [{"n": 2 * n, "on": "a"} for n in range(2000)]
    assert states == {"HAPPY_END": 2000}, "0 lost while scaling down"


# ---------------------------------------------------------------------------
# several satellites

SPREAD = """
[step.work]
call = "work:work"
entry = true
satellites = ["b", "c"]
workers = 2
options = { slow_on = "b" }

[step.out]
kind = "sink"
call = "work:out"
satellite = "a"

[[link]]
from = "work"
to = "out"
"""


def test_work_spreads_across_two_satellites_and_none_idles_while_the_other_queues(
    constellation: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    sky = constellation(["a", "b", "c"])
    sky.write(SPREAD, {"work": WORK})
    for name in ("b", "c", "a"):
        sky.start(name)
    a, b, c = (sky.runs[n] for n in "abc")
    idle_while_queued = 0
    samples = 0
    with a.client(timeout=30) as client, b.client() as on_b, c.client() as on_c:
        started = time.monotonic()
        task_ids = client.submit_many("work", [{"n": n, "sleep": 0.01} for n in range(1000)])
        pending = set(task_ids)
        while pending and time.monotonic() - started < 120:
            load_b = on_b.load().get("b/work.queue")
            load_c = on_c.load().get("c/work.queue")
            if load_b and load_c and load_b.age < 2 and load_c.age < 2:
                samples += 1
                if (load_b.idle and load_c.queued > 10) or (load_c.idle and load_b.queued > 10):
                    idle_while_queued += 1
            ended = len(client.tasks(state="HAPPY_END", limit=100_000))
            pending = set() if ended >= len(task_ids) else pending
            time.sleep(0.1)
        results = {t: client.wait(t, timeout=60) for t in task_ids}
        states = collections.Counter(client.state(t).state for t in task_ids)
    share = collections.Counter(r["out"]["on"] if "out" in r else r["on"] for r in results.values())
    figures = Figures("spread")
    figures.submitted = len(task_ids)
    figures.happy_end = states["HAPPY_END"]
    figures.lost = len(task_ids) - states["HAPPY_END"] - states["FAILURE"]
    figures.time = time.monotonic() - started
    figures.extra.update(
        on_b=share["b"], on_c=share["c"], samples=samples, idle_while_queued=idle_while_queued
    )
    print_figures(capsys, figures)
    assert states == {"HAPPY_END": 1000}
    assert share["b"] >= 50, share
    assert share["c"] >= 50, share
    assert share["c"] > share["b"], "the faster satellite does more"
    assert idle_while_queued <= max(2, samples // 10), (idle_while_queued, samples)


CUT = """
[step.work]
call = "work:work"
entry = true
satellites = ["b", "c"]
workers = 2

[step.out]
kind = "sink"
call = "work:out"
satellite = "a"

[[link]]
from = "work"
to = "out"
"""


def test_a_satellite_cut_off_mid_run_loses_nothing_and_its_tasks_end_elsewhere(
    constellation: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    sky = constellation(["a", "b", "c"])
    sky.write(CUT, {"work": WORK})
    for name in ("b", "c", "a"):
        sky.start(name)
    a = sky.runs["a"]
    with a.client(timeout=30) as client:
        started = time.monotonic()
        task_ids = client.submit_many("work", [{"n": n, "sleep": 0.02} for n in range(600)])
        wait_for(lambda: sum(1 for t in task_ids[:300] if client.state(t).over) >= 100, timeout=60)
        how = sky.network.cut("b", sky.runs["b"])
        cut_at = time.monotonic()
        # meanwhile, what was last seen on b is UNKNOWN, not a stale START or ACK
        unknown = wait_for(lambda: client.tasks(state="UNKNOWN", limit=1000), timeout=30)
        results = [client.wait(t, timeout=120) for t in task_ids]
        recovered = time.monotonic() - cut_at
        states = [client.state(t) for t in task_ids]
    ended = collections.Counter(s.state for s in states)
    figures = Figures("cut_off")
    figures.submitted = len(task_ids)
    figures.happy_end = ended["HAPPY_END"]
    figures.failure = ended["FAILURE"]
    figures.lost = len(task_ids) - ended["HAPPY_END"] - ended["FAILURE"]
    figures.duplicates = sum(s.duplicates for s in states)
    figures.time = time.monotonic() - started
    figures.extra.update(how=how, unknown_during_cut=len(unknown), all_ended_after_s=recovered)
    print_figures(capsys, figures)
    assert figures.lost == 0
    assert ended == {"HAPPY_END": 600}
    assert [r["n"] for r in results] == [2 * n for n in range(600)]
    assert all(s.over and s.result["n"] == 2 * n for n, s in enumerate(states))
    assert unknown, "tasks last seen on the cut-off satellite were UNKNOWN meanwhile"


# ---------------------------------------------------------------------------
# keys


def test_a_client_with_an_unknown_key_or_no_curve_gets_nothing_accepted(
    constellation: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    sky = constellation(["a", "b"])
    sky.write(CUT.replace('satellites = ["b", "c"]', 'satellites = ["a", "b"]'), {"work": WORK})
    sky.start("a")
    a = sky.runs["a"]
    topology = dsat.load_topology(sky.topology, check_imports=False)
    submit = next(
        x
        for x in get_connection(topology, "orchester", satellite="a").socket("submit").addresses
        if x.startswith("tcp://")
    )
    inbox = next(
        x
        for x in get_connection(topology, "work.queue", satellite="a").socket("in").addresses
        if x.startswith("tcp://")
    )
    server = dsat.curve.read_key("keys/a.key", str(sky.directory))
    stranger = dsat.curve.read_key("keys/stranger.key_secret", str(sky.directory))
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sent = 0
    try:
        senders = []
        for address in (submit, inbox):
            plain = context.socket(zmq.DEALER)
            keyed = context.socket(zmq.DEALER)
            keyed.curve_secretkey = stranger
            keyed.curve_publickey = dsat.curve.public_of(stranger)
            keyed.curve_serverkey = server
            for socket in (plain, keyed):
                socket.linger = 0
                # a refused handshake leaves a DEALER with no peer, where send blocks
                socket.sndtimeo = 100
                socket.connect(address)
                senders.append((address, socket))
        task = encode(Envelope(task_id="stranger-1", step="x", next="work"), dumps({"n": 1}))
        for _ in range(50):
            for address, socket in senders:
                frames = (
                    control("submit", {"ref": 1, "targets": ["work"]}, dumps({"n": 1}))
                    if address == submit
                    else task
                )
                try:
                    socket.send_multipart(frames)  # succeeds locally: ZeroMQ queues it
                except zmq.Again:
                    continue  # this one's handshake was refused already: nowhere to queue
                sent += 1
        with a.client() as client:
            refused = wait_for(
                lambda: _refused(client) >= 4 and _refused(client), timeout=20, interval=0.2
            )
            loads = client.load()
            tasks = client.tasks(limit=1000)
    finally:
        context.destroy(linger=0)
    accepted = loads["a/orchester"].accepted + loads["a/work.queue"].accepted
    figures = Figures("strangers")
    figures.extra.update(sent=sent, accepted=accepted, refused_handshakes=refused)
    print_figures(capsys, figures)
    assert sent > 0
    assert accepted == 0
    assert tasks == []
    logged = a.log("orchester") + a.log("work.queue")
    assert re.search(r"refused a peer on (submit|in) .*not on the allow-list", logged)
    assert re.search(r"refused a peer on (submit|in) .*does not speak CURVE", logged)
    # and a client whose key the topology names gets in, over tcp
    key = str(sky.directory / "keys" / "client.key_secret")
    with dsat.connect(sky.topology, satellite="a", key=key, local=False) as remote:
        assert remote._addresses[0].startswith("tcp://")
        task_id = remote.submit("work", {"n": 21})
        assert remote.wait(task_id, timeout=30)["n"] == 42


def _refused(client: dsat.Client) -> int:
    return sum(sum(getattr(load, "refused_peers", {}).values()) for load in client.load().values())
