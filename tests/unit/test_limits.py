"""The suite's own safety net: a test that blocks is stopped, its fixtures still run."""

from __future__ import annotations

import time

import pytest
import zmq

from conftest import TestTimeout, hard_limit


def test_a_blocked_zeromq_receive_is_interrupted(zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull = zctx.socket(zmq.PULL)
    pull.bind("inproc://nobody-sends")
    started = time.monotonic()
    with (
        pytest.raises(TestTimeout, match=r"ran past its limit of 0\.3s"),
        hard_limit(0.3, "the blocked receive"),
    ):
        pull.recv()  # nobody sends: blocks until the limit
    assert 0.25 < time.monotonic() - started < 5


def test_a_blocked_send_with_no_peer_is_interrupted(zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    dealer = zctx.socket(zmq.DEALER)  # no peer at all: send blocks
    with pytest.raises(TestTimeout), hard_limit(0.3, "the blocked send"):
        dealer.send(b"x")


def test_nothing_fires_when_the_block_ends_in_time() -> None:
    with hard_limit(0.3, "a short block"):
        time.sleep(0.05)
    time.sleep(0.4)  # the watchdog was cancelled: no TestTimeout here
