"""send_vector and parse_event over real ZeroMQ sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from dsat.errors import MessageError
from dsat.fsm import Event
from dsat.message import Envelope, Vector, configure, dumps, parse_event, send_vector

Context = zmq.Context[zmq.Socket[bytes]]


def pair(
    zctx: Context, ipc_dir: Path, kinds: tuple[int, int], identity: bytes = b""
) -> tuple[zmq.Socket[bytes], ...]:
    address = f"ipc://{ipc_dir}/pair"
    receiver = zctx.socket(kinds[1])
    configure(receiver, max_size=1 << 20)
    receiver.bind(address)
    receiver.rcvtimeo = 5000
    sender = zctx.socket(kinds[0])
    configure(sender)
    if identity:
        sender.setsockopt(zmq.ROUTING_ID, identity)
    sender.connect(address)
    return sender, receiver


def test_a_vector_crosses_a_push_pull_pair_with_seq_incremented(
    zctx: Context, ipc_dir: Path
) -> None:
    sender, receiver = pair(zctx, ipc_dir, (zmq.PUSH, zmq.PULL))
    vector = Vector(
        Envelope(task_id="t1", job_id="j", seq=4, step="a", next="b", where="local"),
        dumps({"n": 1}),
    )
    sent = send_vector(sender, vector, Event.SEND)
    got = parse_event(receiver)
    assert got.envelope == sent.envelope
    assert got.envelope.seq == 5
    assert got.envelope.event is Event.SEND
    assert got.envelope.timestamps["sent"] > 0
    assert (got.envelope.task_id, got.envelope.job_id, got.envelope.step) == ("t1", "j", "a")
    assert got.value() == {"n": 1}


def test_a_router_keeps_the_peer_id(zctx: Context, ipc_dir: Path) -> None:
    sender, receiver = pair(zctx, ipc_dir, (zmq.DEALER, zmq.ROUTER), b"worker-1")
    send_vector(sender, Vector(Envelope(task_id="t2"), b"\x01"))
    got = parse_event(receiver)
    assert got.peer == b"worker-1"
    send_vector(receiver, got, Event.ACK, peer=got.peer)
    sender.rcvtimeo = 5000
    back = parse_event(sender)
    assert back.envelope.event is Event.ACK
    assert back.envelope.seq == 2


def test_garbage_on_the_wire_raises_message_error_and_the_socket_goes_on(
    zctx: Context, ipc_dir: Path
) -> None:
    sender, receiver = pair(zctx, ipc_dir, (zmq.PUSH, zmq.PULL))
    sender.send_multipart([b"garbage", b"\x00\x01"])
    with pytest.raises(MessageError, match="need 3 frames"):
        parse_event(receiver)
    send_vector(sender, Vector(Envelope(task_id="t3"), b""))
    assert parse_event(receiver).envelope.task_id == "t3"


def test_zeromq_drops_a_frame_over_the_socket_limit(zctx: Context, ipc_dir: Path) -> None:
    sender, receiver = pair(zctx, ipc_dir, (zmq.PUSH, zmq.PULL))
    sender.send_multipart([b"1.0.0", b"x" * (2 << 20), b""])
    receiver.rcvtimeo = 300
    with pytest.raises(zmq.Again):
        receiver.recv_multipart()
