"""A worker process and its queue's side of the work socket: bundles of tasks.

A queue router gives a worker everything it has for it in one cycle as one
message (several task messages of three frames each, one after the other). Here
the test plays the queue router: a real ROUTER socket where the worker's queue
binds it, and a real worker process (``python -m dsat.node``) started beside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from bundlekit import node_process, task, write_topology

from dsat.message import decode_control, recv_frames
from dsat.topology import get_connection, load_topology


@pytest.fixture
def worker_socket(tmp_path: Path, ipc_dir: Path) -> Iterator[zmq.Socket[bytes]]:
    """The queue's work socket, bound; a worker process connected to it (stopped by pid)."""
    path = write_topology(tmp_path, ipc_dir)
    topology = load_topology(path)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    work = context.socket(zmq.ROUTER)
    work.setsockopt(zmq.LINGER, 0)
    work.setsockopt(zmq.RCVTIMEO, 10_000)
    for address in get_connection(topology, "double", satellite="local").socket("work").addresses:
        work.bind(address)
    try:
        with node_process(path, "double", wid="double.1"):
            yield work
    finally:
        context.destroy(linger=0)


def answer(work: zmq.Socket[bytes]) -> tuple[bytes, str, Any, tuple[bytes, ...]]:
    identity, *frames = recv_frames(work)
    message = decode_control(frames, frozenset({"credit", "start", "result", "bye"}))
    return identity, message.kind, message.body, message.extra


def test_a_worker_runs_every_task_of_a_bundle_in_order_and_answers_each(
    worker_socket: zmq.Socket[bytes],
) -> None:
    work = worker_socket
    identity, kind, body, _ = answer(work)
    assert kind == "credit"
    assert body["free"] >= 1
    values = [1, 2, -1, 4]  # the third fails: an ERROR, and the bundle goes on
    bundle = [identity]
    for n, value in enumerate(values):
        bundle += task(n, value)
    work.send_multipart(bundle)
    results = []
    starts = []
    nexts = []
    while len(results) < len(values):
        _, kind, body, extra = answer(work)
        if kind == "result":
            results.append((body["key"][0], body["status"], extra))
            nexts.append(body["next"][0] if body["next"] else None)
        elif kind == "start":
            starts.append(body["key"][0])
    assert [r[0] for r in results] == [f"task{n:04d}" for n in range(len(values))]
    # it says when it starts a task: the first on its own (it was idle), each next one
    # in the answer of the one before, so its router records START only for what runs
    assert starts == ["task0000"]
    assert nexts == ["task0001", "task0002", "task0003", None]
    assert [r[1] for r in results] == ["END", "END", "ERROR", "END"]
    assert [msgpack.unpackb(r[2][0]) for r in results if r[1] == "END"] == [2, 4, 8]

    # a message that is not whole task messages is refused alone: the worker goes on
    work.send_multipart([identity, *task(9, 1)[:2]])
    work.send_multipart([identity, *task(10, 21)])
    deadline = time.monotonic() + 10
    while True:
        _, kind, body, extra = answer(work)
        if kind == "result":
            break
        assert time.monotonic() < deadline
    assert body["key"][0] == "task0010"
    assert msgpack.unpackb(extra[0]) == 42
