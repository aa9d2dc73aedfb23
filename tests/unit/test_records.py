"""Control messages and event records: round trips, every malformed case, fuzzes of decoders."""

from __future__ import annotations

import contextlib
import random
import re
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsat.errors import MessageError
from dsat.fsm import Event
from dsat.message import (
    DETAIL_TYPES,
    PROTOCOL_FRAME,
    RECORD_FIELDS,
    Control,
    Envelope,
    EventRecord,
    Outstanding,
    control,
    decode_control,
    encode,
    field_of,
    is_task,
    pack_records,
    record_from_row,
    unpack_records,
)

KINDS = frozenset(
    {
        "ack",
        "busy",
        "credit",
        "result",
        "events",
        "confirm",
        "submit",
        "accepted",
        "refused",
        "query",
        "reply",
        "load",
        "bye",
        "resend",
        "hello",
    }
)

# ---------------------------------------------------------------------------
# control messages


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("ack", [["0190a1b2c3d4beef000001", 1, 2], ["t2", 77, 3]]),
        ("credit", {"free": 4, "pid": 1234, "wid": "cpu.1"}),
        ("confirm", {"epoch": 9, "upto": 1_000_000, "gap": False}),
        ("load", {"node": "cpu.queue", "mean": 0.25, "p95": 1.5, "nested": {"a": [1, None]}}),
        ("hello", None),
        ("reply", {1: "int keys are fine", 2: b"bytes too"}),
        ("refused", "a plain string"),
    ],
)
def test_a_control_message_round_trips(kind: str, body: Any) -> None:
    frames = control(kind, body)
    assert frames[0] == PROTOCOL_FRAME
    assert frames[1] == kind.encode("ascii")
    assert len(frames) == 3
    assert decode_control(frames, KINDS) == Control(kind, body, ())


def test_payload_frames_ride_along_as_they_are() -> None:
    frames = control("submit", {"targets": ["cpu"]}, b"\x01", b"", b"\xff" * 10)
    message = decode_control(frames, frozenset({"submit"}), max_extra=3)
    assert message.extra == (b"\x01", b"", b"\xff" * 10)
    assert message.body == {"targets": ["cpu"]}
    assert message.peer == b""


def test_a_compatible_newer_patch_may_send_control_messages() -> None:
    frames = control("ack", [])
    frames[0] = b"1.0.z9"
    assert decode_control(frames, frozenset({"ack"})).kind == "ack"


@pytest.mark.parametrize(
    ("frames", "kwargs", "reason"),
    [
        ([PROTOCOL_FRAME, b"ack"], {}, "need 3..4 frames [version, kind, body, ...], got 2"),
        ([], {}, "need 3..4 frames"),
        (
            control("result", {}, b"a", b"b"),
            {},
            "need 3..4 frames [version, kind, body, ...], got 5",
        ),
        (control("submit", {}, b"a", b"b"), {"max_extra": 0}, "need 3..3 frames"),
        (control("ack", [], b"x" * 200), {"max_size": 100}, "bytes is over the 100-byte limit"),
        ([b"2.0.0", b"ack", msgpack.packb([])], {}, "protocol version 2.0.0 is not compatible"),
        ([b"1.1.0", b"ack", msgpack.packb([])], {}, "protocol version 1.1.0 is not compatible"),
        ([b"ack", b"1.0.0", msgpack.packb([])], {}, "protocol version frame b'ack'"),
        ([b"x" * 40, b"ack", msgpack.packb([])], {}, "protocol version frame: 40 bytes"),
        (control("credit", {}), {}, "unexpected kind b'credit'"),
        ([PROTOCOL_FRAME, b"\xffack", msgpack.packb([])], {}, "unexpected kind b'\\xffack'"),
        ([PROTOCOL_FRAME, b"", msgpack.packb([])], {}, "unexpected kind b''"),
        ([PROTOCOL_FRAME, b"ack", b"\xc1"], {}, "ack body: not valid msgpack"),
        ([PROTOCOL_FRAME, b"ack", b""], {}, "ack body: not valid msgpack"),
        ([PROTOCOL_FRAME, b"ack", msgpack.packb([1, 2])[:-1]], {}, "ack body: not valid msgpack"),
        ([PROTOCOL_FRAME, b"ack", b"\x01\x02"], {}, "ack body: not valid msgpack"),
        ([PROTOCOL_FRAME, b"ack", b"\x81\x90\x01"], {}, "ack body: not valid msgpack"),
        ([PROTOCOL_FRAME, b"ack", b"\xa2\xff\xfe"], {}, "ack body: not valid msgpack"),
    ],
)
def test_every_malformed_control_message_says_what_is_wrong(
    frames: list[bytes], kwargs: dict[str, Any], reason: str
) -> None:
    kinds = frozenset({"ack", "result", "submit"})
    with pytest.raises(MessageError, match=re.escape(reason)):
        decode_control(frames, kinds, **kwargs)


def test_an_oversized_kind_is_cut_short_in_the_error() -> None:
    with pytest.raises(MessageError) as caught:
        decode_control([PROTOCOL_FRAME, b"k" * 10_000, msgpack.packb(1)], frozenset({"ack"}))
    assert len(str(caught.value)) < 100


def test_a_field_of_the_right_type_is_returned() -> None:
    body = {"task_id": "t", "seq": 3, "elapsed": 0.5, "keys": [[1]]}
    assert field_of(body, "task_id", str, "resend") == "t"
    assert field_of(body, "seq", int, "resend") == 3
    assert field_of(body, "elapsed", (float, int), "result") == 0.5
    assert field_of({"elapsed": 2}, "elapsed", (float, int), "result") == 2
    assert field_of(body, "keys", list, "result") == [[1]]


@pytest.mark.parametrize(
    ("body", "name", "kind", "reason"),
    [
        ([1, 2], "seq", int, "resend: need a map, got list"),
        (None, "seq", int, "resend: need a map, got NoneType"),
        ({}, "seq", int, "resend field seq: need int, got NoneType"),
        ({"seq": "3"}, "seq", int, "resend field seq: need int, got str"),
        ({"seq": True}, "seq", int, "resend field seq: need int, got bool"),
        ({"seq": 3.0}, "seq", int, "resend field seq: need int, got float"),
        ({"at": "now"}, "at", (float, int), "resend field at: need float or int, got str"),
        ({"task_id": b"t"}, "task_id", str, "resend field task_id: need str, got bytes"),
    ],
)
def test_a_missing_or_mistyped_field_is_named(
    body: Any, name: str, kind: type | tuple[type, ...], reason: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)):
        field_of(body, name, kind, "resend")


def test_a_task_message_is_told_from_a_control_message() -> None:
    task = encode(Envelope(task_id="t", step="a", next="b"), b"payload")
    assert is_task(task)
    assert not is_task(control("ack", [["t", 1, 1]]))
    assert not is_task(control("credit", {"free": 1}))  # a map body is the third frame
    assert not is_task(control("result", {}, b"\x80"))
    assert not is_task(task[:2])
    assert not is_task([PROTOCOL_FRAME, b"", b""])
    assert is_task([PROTOCOL_FRAME, msgpack.packb({str(i): i for i in range(20)}), b""])


# ---------------------------------------------------------------------------
# event records


def a_record(**changes: Any) -> EventRecord:
    fields: dict[str, Any] = {
        "task_id": "0190a1b2c3d4beef000001",
        "job_id": "job",
        "branch": 1,
        "seq": 2,
        "attempt": 1,
        "event": Event.END,
        "step": "cpu",
        "where": "local",
        "origin": "local",
        "wid": "cpu.3",
        "pid": 4321,
        "at": 1_700_000_000.125,
        "detail": {"elapsed": 0.5},
    }
    fields.update(changes)
    return EventRecord(**fields)


def test_event_records_round_trip() -> None:
    records = [
        a_record(),
        a_record(event=Event.INIT, seq=0, step="", detail={"next": ["cpu", "db"]}),
        a_record(event=Event.SEND, branch=2**62, detail={"parent": 1, "children": [5, 2**62]}),
        a_record(event=Event.ERROR, attempt=3, detail={"error": "ValueError: x", "elapsed": 1}),
        a_record(event=Event.START, detail={"deadline": 1_700_000_005.0}),
        a_record(event=Event.HAPPY_END, detail={"result": b"\x00", "serialization": "raw"}),
        a_record(event=Event.FAILURE, detail={"payload": b"p", "reason": "gave up"}),
        a_record(event=Event.RETRY, job_id="", detail={}),
    ]
    assert unpack_records(pack_records(records)) == records
    assert unpack_records(pack_records([])) == []


def test_a_record_lists_its_fields_in_the_documented_order() -> None:
    record = a_record()
    row = record.as_list()
    assert len(row) == len(RECORD_FIELDS)
    for name, value in zip(RECORD_FIELDS, row, strict=True):
        assert value == getattr(record, name)
    assert type(row[RECORD_FIELDS.index("event")]) is str


def test_an_integer_time_comes_back_as_a_float() -> None:
    (record,) = unpack_records(pack_records([a_record(at=17)]))
    assert record.at == 17.0
    assert type(record.at) is float
    assert record.event is Event.END


def row(**changes: Any) -> list[Any]:
    values = dict(zip(RECORD_FIELDS, a_record().as_list(), strict=True))
    values.update(changes)
    return [values[name] for name in RECORD_FIELDS]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", "events: not valid msgpack"),
        (b"", "events: not valid msgpack"),
        (msgpack.packb([row()])[:-2], "events: not valid msgpack"),
        (b"\x91\x81\x90\x01", "events: not valid msgpack"),
        (msgpack.packb({"a": 1}), "events: need an array of at most"),
        (msgpack.packb(5), "events: need an array of at most"),
        (msgpack.packb([5]), "event record 0: need an array of 13 fields"),
        (msgpack.packb([row()[:-1]]), "event record 0: need an array of 13 fields"),
        (msgpack.packb([[*row(), 1]]), "event record 0: need an array of 13 fields"),
        (msgpack.packb([row(), row(task_id=7)]), "event record 1: task_id: need a short string"),
        (msgpack.packb([row(step="s" * 257)]), "event record 0: step: need a short string"),
        (msgpack.packb([row(wid=None)]), "event record 0: wid: need a short string"),
        (msgpack.packb([row(task_id="")]), "event record 0: task_id: need 1..64 characters"),
        (msgpack.packb([row(task_id="t" * 65)]), "event record 0: task_id: need 1..64"),
        (msgpack.packb([row(seq=-1)]), "event record 0: seq: need an integer in 0..2**63-1"),
        (msgpack.packb([row(branch=2**63)]), "event record 0: branch: need an integer"),
        (msgpack.packb([row(attempt=True)]), "event record 0: attempt: need an integer"),
        (msgpack.packb([row(pid=1.5)]), "event record 0: pid: need an integer"),
        (msgpack.packb([row(event="EXPLODE")]), "event record 0: unknown event 'EXPLODE'"),
        (msgpack.packb([row(event=3)]), "event record 0: unknown event 3"),
        (msgpack.packb([row(event="end")]), "event record 0: unknown event 'end'"),
        (msgpack.packb([row(at="now")]), "event record 0: at: need a number"),
        (msgpack.packb([row(at=None)]), "event record 0: at: need a number"),
        (msgpack.packb([row(detail=[])]), "event record 0: detail: need a map"),
        (msgpack.packb([row(detail={"colour": 1})]), "detail: unknown key 'colour'"),
        (msgpack.packb([row(detail={1: 2})]), "detail: unknown key 1"),
        (msgpack.packb([row(detail={"error": 5})]), "event record 0: detail error: wrong type"),
        (msgpack.packb([row(detail={"deadline": True})]), "detail deadline: wrong type"),
        (msgpack.packb([row(detail={"result": "text"})]), "detail result: wrong type"),
        (msgpack.packb([row(detail={"children": [1, "x"]})]), "detail children: need a list"),
        (msgpack.packb([row(detail={"children": [True]})]), "detail children: need a list"),
        (msgpack.packb([row(detail={"next": [1]})]), "detail next: need a list of str"),
        (
            msgpack.packb([row(detail={"children": list(range(5000))})]),
            "detail children: need a list of int",
        ),
    ],
)
def test_every_malformed_events_batch_names_the_problem(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)):
        unpack_records(data)


def test_a_batch_over_the_record_limit_is_refused() -> None:
    data = pack_records([a_record()] * 3)
    assert len(unpack_records(data, max_count=3)) == 3
    with pytest.raises(MessageError, match="at most 2 records"):
        unpack_records(data, max_count=2)


# ---------------------------------------------------------------------------
# fuzz: nothing but MessageError, whatever the bytes

scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
messy = (
    scalar | st.lists(scalar, max_size=3) | st.dictionaries(st.text(max_size=4), scalar, max_size=3)
)

control_frame = st.one_of(
    st.binary(max_size=48),
    st.just(PROTOCOL_FRAME),
    st.sampled_from([b"1.0", b"1.0.0", b"1.1.0", b"0.9", b"1.0.zz9", b"", b"1.0.-1"]),
    st.sampled_from(sorted(k.encode() for k in KINDS)),
    st.builds(msgpack.packb, messy),
)


# 100 examples of 30 frame lists each: 3,000 random control messages, drawn in batches
# because hypothesis spends far more time per example than decode_control does.
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(control_frame, max_size=5), min_size=30, max_size=30))
def test_decode_control_of_random_frames_raises_nothing_but_message_error(
    batch: list[list[bytes]],
) -> None:
    for frames in batch:
        with contextlib.suppress(MessageError):
            message = decode_control(frames, KINDS, max_extra=2, max_size=256)
            assert message.kind in KINDS
            assert len(message.extra) == len(frames) - 3


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=80), min_size=30, max_size=30))
def test_unpack_records_of_random_bytes_raises_nothing_but_message_error(
    batch: list[bytes],
) -> None:
    for data in batch:
        with contextlib.suppress(MessageError):
            records = unpack_records(data)
            assert all(type(r) is EventRecord for r in records)


VALID = a_record(detail={"elapsed": 0.5, "next": ["csv"]}).as_list()
# values that are wrong somewhere (or right elsewhere), for any field
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.0, -0.5, 1e300,
    float("nan"), float("inf"), "", "x", "t" * 64, "t" * 65, "s" * 257, "END", "HAPPY_END",
    "end", b"", b"\xff", b"bytes", [], [1], ["a"], [[1]], {}, {"a": 1}, {1: 2},
]  # fmt: skip
ODD_DETAILS: list[Any] = [
    {"error": "e"}, {"error": 1}, {"children": [1, 2]}, {"children": [1, "x"]},
    {"children": [True]}, {"children": "12"}, {"next": ["a"]}, {"next": [1]}, {"next": None},
    {"parent": 1}, {"parent": 1.0}, {"result": b"r"}, {"result": "r"}, {"payload": b""},
    {"serialization": "raw"}, {"deadline": 1}, {"deadline": True}, {"elapsed": 0.5},
    {"reason": None}, {"colour": 1}, {1: 2}, {b"error": "e"}, {None: 1},
    {"children": list(range(4097))},
]  # fmt: skip


def near_valid_row(rng: random.Random) -> list[Any]:
    """The valid row with one to three fields replaced, or a list of odd values."""
    if rng.random() < 0.1:
        return rng.choices(ODD_VALUES, k=rng.randrange(15))
    values = list(VALID)
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(RECORD_FIELDS))
        if RECORD_FIELDS[index] == "detail" and rng.random() < 0.7:
            values[index] = {**rng.choice(ODD_DETAILS), **rng.choice(ODD_DETAILS)}
        else:
            values[index] = rng.choice(ODD_VALUES)
    return values


# 150 seeds of 20 batches each: 3,000 batches of records that are nearly right. The rows
# come from a Random seeded by hypothesis: it is far slower at drawing them one by one.
# A batch of six rows or more is checked a column at a time (a C loop per check), and
# row by row only when it fails: whatever it lets through must pass the thorough check
# of one record, and the record it names must be the first that fails alone.
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32))
def test_unpack_records_of_nearly_valid_rows_raises_nothing_but_message_error(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        rows = [
            near_valid_row(rng) if rng.random() < 0.3 else list(VALID)
            for _ in range(rng.randint(1, 12))  # a batch of 6 or more: checked by column
        ]
        alone = [_unpacked_alone(row) for row in rows]
        data = msgpack.packb(rows)
        bad = [i for i, one in enumerate(alone) if isinstance(one, MessageError)]
        if bad:
            with pytest.raises(MessageError, match=f"^event record {bad[0]}:"):
                unpack_records(data)
            continue
        records = unpack_records(data)
        assert pack_records(records) == pack_records(alone)  # packed: a NaN equals itself
        for record in records:
            assert 0 < len(record.task_id) <= 64
            assert type(record.event) is Event
            assert type(record.at) is float
            assert set(record.detail) <= set(DETAIL_TYPES)
            packed = pack_records([record])  # bytes, so that a NaN compares equal to itself
            assert pack_records([record_from_row(0, record.as_list())]) == packed  # it agrees
            assert pack_records(unpack_records(packed)) == packed


def _unpacked_alone(row: list[Any]) -> EventRecord | MessageError:
    try:
        (record,) = unpack_records(msgpack.packb([row]))
    except MessageError as exc:
        return exc
    return record


# ---------------------------------------------------------------------------
# Outstanding: events kept until confirmed, sent within a window


def _numbered(first: int, count: int) -> list[tuple[int, str]]:
    return [(n, f"e{n}") for n in range(first, first + count)]


def test_outstanding_window_holds_back_what_is_not_confirmed() -> None:
    out: Outstanding[str] = Outstanding(timeout=2.0, window=5)
    out.extend(_numbered(1, 12))
    first = out.batch(0.0, limit=4)
    out.sent(0.0)
    assert [n for n, _ in first] == [1, 2, 3, 4]
    second = out.batch(0.1, limit=4)  # only one more fits in the window
    out.sent(0.1)
    assert [n for n, _ in second] == [5]
    assert out.batch(0.2, limit=4) == []
    out.confirmed(3, 0.3)  # three confirmed: three more may go
    assert [n for n, _ in out.batch(0.3, limit=10)] == [6, 7, 8]
    assert len(out) == 9  # 4..12 still unconfirmed


def test_outstanding_window_resends_after_silence() -> None:
    """A full window and no word from the receiver (it restarted): everything again."""
    out: Outstanding[str] = Outstanding(timeout=2.0, window=3)
    out.extend(_numbered(1, 6))
    assert [n for n, _ in out.batch(0.0, limit=10)] == [1, 2, 3]
    out.sent(0.0)
    assert out.batch(1.0, limit=10) == []  # window full, not yet timed out
    assert [n for n, _ in out.batch(2.5, limit=10)] == [1, 2, 3]


def test_outstanding_gap_sends_from_the_first_missing() -> None:
    out: Outstanding[str] = Outstanding(timeout=2.0, window=10)
    out.extend(_numbered(1, 6))
    out.batch(0.0, limit=10)
    out.sent(0.0)
    out.confirmed(2, 0.1, gap=True)
    assert [n for n, _ in out.batch(0.1, limit=10)] == [3, 4, 5, 6]


def test_outstanding_without_window_sends_everything() -> None:
    out: Outstanding[str] = Outstanding(timeout=2.0)
    out.extend(_numbered(1, 50))
    assert len(out.batch(0.0, limit=100)) == 50
