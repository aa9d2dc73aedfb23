"""The message codec: round trips, every kind of bad input, and a fuzz of decode."""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsat.errors import MessageError
from dsat.fsm import Event
from dsat.message import (
    PROTOCOL_FRAME,
    Envelope,
    decode,
    dumps,
    encode,
    loads,
    packb,
    read_checked,
)

ENVELOPE = Envelope(
    task_id="t-1",
    job_id="job",
    seq=3,
    step="cpu",
    next="csv",
    event=Event.SEND,
    where="local",
    wid="cpu.1",
    pid=1234,
    attempt=2,
    branch=77,
    deadline=1700000000.5,
    timestamps={"created": 1.5, "sent": 2.5},
    serialization="json",
)


def header_of(envelope: Envelope = ENVELOPE, **changes: Any) -> bytes:
    header = msgpack.unpackb(encode(envelope)[1])
    header.update(changes)
    return msgpack.packb(header)


def test_encode_then_decode_gives_back_every_field() -> None:
    frames = encode(ENVELOPE, b'{"x":1}')
    assert len(frames) == 3
    assert frames[0] == PROTOCOL_FRAME
    vector = decode(frames)
    assert vector.envelope == ENVELOPE
    assert vector.payload == b'{"x":1}'
    assert vector.value() == {"x": 1}


def test_a_worker_reads_back_the_fields_it_needs_of_a_checked_message() -> None:
    frames = encode(ENVELOPE, b"payload")
    ref = read_checked(frames)
    envelope = decode(frames).envelope
    assert ref == (
        envelope.task_id,
        envelope.job_id,
        envelope.seq,
        envelope.attempt,
        envelope.branch,
        envelope.serialization,
    )
    assert (ref.task_id, ref.seq, ref.branch, ref.serialization) == ("t-1", 3, 77, "json")


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        ([PROTOCOL_FRAME, header_of()], "need 3 frames"),
        ([b"0.1.0", header_of(), b""], "protocol version"),
        ([PROTOCOL_FRAME, b"\xc1", b""], "not one of a task message"),
        ([PROTOCOL_FRAME, packb([1, 2]), b""], "not one of a task message"),
        ([PROTOCOL_FRAME, packb({"task_id": "t"}), b""], "not one of a task message"),
    ],
    ids=["two frames", "another protocol", "not msgpack", "not a map", "fields missing"],
)
def test_what_is_not_a_task_message_at_all_is_refused_by_the_worker_reader(
    frames: list[bytes], problem: str
) -> None:
    with pytest.raises(MessageError, match=problem):
        read_checked(frames)


@pytest.mark.parametrize("serialization", ["msgpack", "json"])
def test_structured_serializers_round_trip(serialization: str) -> None:
    value = {"a": [1, 2.5, "x"], "b": None, "c": True}
    assert loads(dumps(value, serialization), serialization) == value


def test_raw_payloads_are_bytes_as_they_are() -> None:
    assert loads(dumps(b"\x00\xff", "raw"), "raw") == b"\x00\xff"
    with pytest.raises(MessageError, match="raw payload: need bytes"):
        dumps("text", "raw")


def test_pickle_is_refused_unless_enabled() -> None:
    data = pickle.dumps({"x": 1})
    with pytest.raises(MessageError, match="pickle is not enabled"):
        loads(data, "pickle")
    with pytest.raises(MessageError, match="pickle is not enabled"):
        dumps({"x": 1}, "pickle")
    assert loads(dumps({"x": 1}, "pickle", allow_pickle=True), "pickle", allow_pickle=True) == {
        "x": 1
    }


def test_a_pickle_payload_is_never_unpickled_when_disabled() -> None:
    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (pytest.fail, ("unpickled!",))

    with pytest.raises(MessageError):
        loads(pickle.dumps(Boom()), "pickle")


def test_the_reused_packer_packs_as_msgpack_does_even_after_a_failure() -> None:
    values: list[Any] = [{"a": [1, 2.5, b"x", None]}, "t" * 70_000, [True, -1, 2**63 - 1]]
    for value in values:
        assert packb(value) == msgpack.packb(value, use_bin_type=True)
    with pytest.raises(TypeError):
        packb([1, 2, object()])  # fails half-way through the array
    assert packb([3]) == msgpack.packb([3])  # nothing of the failed one is left over


def test_threads_pack_with_their_own_packer() -> None:
    wrong: list[Any] = []

    def pack_many(n: int) -> None:
        for i in range(2_000):
            value = {"thread": n, "i": i, "text": "x" * (i % 300)}
            if msgpack.unpackb(packb(value)) != value:
                wrong.append(value)

    threads = [threading.Thread(target=pack_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert wrong == []


def test_unencodable_values_raise_message_error() -> None:
    with pytest.raises(MessageError, match="cannot encode payload as json"):
        dumps({1, 2}, "json")
    with pytest.raises(MessageError, match="cannot encode payload as msgpack"):
        dumps(object(), "msgpack")
    with pytest.raises(MessageError, match="unknown serialization"):
        dumps(1, "yaml")


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([PROTOCOL_FRAME, header_of()], "need 3 frames"),
        ([PROTOCOL_FRAME, header_of(), b"", b""], "need 3 frames"),
        ([], "need 3 frames"),
        ([b"1.0.0", b"\xc1", b""], "header: not valid msgpack"),
        ([b"1.0.0", header_of()[:-3], b""], "header: not valid msgpack"),
        ([b"1.0.0", msgpack.packb([1, 2]), b""], "header: need a map, got list"),
        ([b"1.0.0", header_of(seq="3"), b""], "header field seq: need an integer"),
        ([b"1.0.0", header_of(seq=-1), b""], "header field seq: need an integer"),
        ([b"1.0.0", header_of(pid=True), b""], "header field pid: need an integer"),
        ([b"1.0.0", header_of(task_id=5), b""], "header field task_id: need a string"),
        ([b"1.0.0", header_of(task_id=""), b""], "header field task_id: need 1..64"),
        ([b"1.0.0", header_of(event="EXPLODE"), b""], "unknown event 'EXPLODE'"),
        ([b"1.0.0", header_of(event=3), b""], "unknown event 3"),
        ([b"1.0.0", header_of(serialization="yaml"), b""], "unknown serializer 'yaml'"),
        ([b"1.0.0", header_of(deadline="soon"), b""], "deadline: need a number"),
        ([b"1.0.0", header_of(timestamps=[1]), b""], "timestamps: need a map"),
        ([b"1.0.0", header_of(timestamps={"a": "b"}), b""], "timestamps: need name -> number"),
        ([b"2.0.0", header_of(), b""], "protocol version 2.0.0 is not compatible with 1.0.0"),
        ([b"1.1", header_of(), b""], "protocol version 1.1.0 is not compatible"),
        ([b"one", header_of(), b""], "protocol version frame b'one'"),
        ([b"\xff\xfe", header_of(), b""], "protocol version frame"),
        ([b"1.0.0", "text", b""], "frame 1: need bytes"),
    ],
)
def test_every_malformed_message_says_what_is_wrong(frames: list[Any], reason: str) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)):
        decode(frames)


def test_a_missing_field_is_named() -> None:
    header = msgpack.unpackb(encode(ENVELOPE)[1])
    del header["attempt"]
    with pytest.raises(MessageError, match=r"missing field.*attempt"):
        decode([PROTOCOL_FRAME, msgpack.packb(header), b""])


def test_a_compatible_newer_patch_is_accepted() -> None:
    frames = encode(ENVELOPE)
    frames[0] = b"1.0.z3"
    assert decode(frames).envelope == ENVELOPE


def test_a_payload_over_the_limit_is_refused() -> None:
    frames = encode(ENVELOPE, b"x" * 2000)
    with pytest.raises(MessageError, match="over the 1024-byte limit"):
        decode(frames, max_size=1024)


def test_a_payload_that_is_not_its_serialization_raises_message_error() -> None:
    for serialization, data in [("msgpack", b"\xc1"), ("json", b"{"), ("json", b"\xff")]:
        with pytest.raises(MessageError, match=f"not valid {serialization}"):
            loads(data, serialization)


def test_deeply_nested_json_raises_message_error() -> None:
    with pytest.raises(MessageError):
        loads(b"[" * 100_000, "json")


frame = st.one_of(
    st.binary(max_size=64),
    st.just(PROTOCOL_FRAME),
    st.sampled_from([b"1.0", b"1.0.0", b"1.1.0", b"0.9", b"1.0.zz9"]),
    st.builds(
        lambda d: msgpack.packb(d),
        st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)),
    ),
)
messy = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=6,
)
FIELDS = list(msgpack.unpackb(encode(ENVELOPE)[1]))


# 250 examples of 40 frame lists each: 10,000 random frame lists, drawn in batches
# because hypothesis spends far more time per example than decode does.
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(frame, max_size=5), min_size=40, max_size=40))
def test_decode_of_random_frames_raises_nothing_but_message_error(
    batch: list[list[bytes]],
) -> None:
    for frames in batch:
        with contextlib.suppress(MessageError):
            decode(frames)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), messy, max_size=len(FIELDS)))
def test_valid_looking_headers_with_wrong_types_raise_message_error(fields: dict[str, Any]) -> None:
    header = msgpack.unpackb(encode(ENVELOPE)[1])
    header.update(fields)
    try:
        vector = decode([PROTOCOL_FRAME, msgpack.packb(header), b""])
    except MessageError:
        return
    assert vector.envelope.task_id


@settings(max_examples=2_000, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["msgpack", "json", "raw", "pickle"]))
def test_loads_of_random_bytes_raises_nothing_but_message_error(data: bytes, how: str) -> None:
    with contextlib.suppress(MessageError):
        loads(data, how)
