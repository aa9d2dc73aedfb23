"""The message layer: the envelope of a task and its two ends on a socket.

Wire format
===========

A task message is a multipart ZeroMQ message of exactly three frames::

    [protocol version, header, payload]

- **protocol version**: ASCII ``X.Y.Z`` (see :mod:`dsat.version`). A receiver
  accepts it when X.Y equals its own :data:`PROTOCOL`; otherwise the message is
  refused with a :class:`MessageError` that names both versions.
- **header**: a msgpack map with these keys, all required:

  ==============  ========  ===================================================
  key             type      meaning
  ==============  ========  ===================================================
  task_id         str       unique id of the task (1..64 characters)
  job_id          str       the family the task belongs to (may be empty)
  seq             int >= 0  counts the task's messages; every send adds one
  step            str       the step the task is at (its last sender)
  next            str       the step it is going to ("" when none)
  event           str       an :class:`~dsat.fsm.Event` name
  where           str       the satellite that sent it
  origin          str       the satellite where the task was submitted (keeps its history)
  wid             str       the sending worker or router ("cpu.3")
  pid             int       the sending process id
  attempt         int >= 0  how many tries this hop has had (1 for the first)
  branch          int >= 0  the branch of a fanned-out task (the root is 1)
  deadline        float     unix time by which the next progress is due, 0 = none
  timestamps      map       str -> float unix times ("created", "sent", ...)
  serialization   str       how the payload is encoded: msgpack, json, raw, pickle
  ==============  ========  ===================================================

- **payload**: bytes, encoded by the named serializer. msgpack is the default;
  ``json`` and ``raw`` (bytes as they are) are always available; ``pickle``
  executes code when loaded and is refused unless the receiver enables it.

A message larger than the configured maximum (:data:`DEFAULT_MAX_SIZE`, 16 MiB
by default) is refused; on sockets made by dsat, ZeroMQ enforces the limit
itself (``MAXMSGSIZE``) before the message is allocated.

:func:`decode` and :func:`parse_event` never raise anything but
:class:`MessageError` for bad input, whatever the bytes: callers (routers, the
tracker) count it, log it and go on.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import pickle
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Generic, NamedTuple, TypeVar

import msgpack
import zmq

from dsat.errors import MessageError, VersionError
from dsat.fsm import Event
from dsat.version import Version, compatible

T = TypeVar("T")

PROTOCOL: Final = Version(1, 0, "0")
PROTOCOL_FRAME: Final = str(PROTOCOL).encode("ascii")
# The tracker's live stream: topic = a task id for every event of that task;
# END_TOPIC + a task id for only the event that ends it (what Client.wait listens to).
END_TOPIC: Final = b"="
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024
SERIALIZATIONS: Final = ("msgpack", "json", "raw", "pickle")
MAX_ID_LENGTH: Final = 64
MAX_NAME_LENGTH: Final = 256


@dataclass(frozen=True, slots=True)
class Envelope:
    """The header of a task message: where the task is, where it goes, and how far it got."""

    task_id: str
    job_id: str = ""
    seq: int = 0
    step: str = ""
    next: str = ""
    event: Event = Event.SEND
    where: str = ""
    origin: str = ""
    wid: str = ""
    pid: int = 0
    attempt: int = 1
    branch: int = 1
    deadline: float = 0.0
    timestamps: Mapping[str, float] = field(default_factory=dict)
    serialization: str = "msgpack"


@dataclass(frozen=True, slots=True)
class Vector:
    """A task message: its envelope, its payload bytes, and (on a ROUTER) the peer's id."""

    envelope: Envelope
    payload: bytes = b""
    peer: bytes = b""

    def value(self, *, allow_pickle: bool = False) -> Any:
        """The payload decoded by the envelope's serializer."""
        return loads(self.payload, self.envelope.serialization, allow_pickle=allow_pickle)


# ---------------------------------------------------------------------------
# serializers

_packers = threading.local()


def packb(value: Any) -> bytes:
    """``msgpack.packb(value, use_bin_type=True)`` with this thread's packer.

    msgpack.packb builds a Packer (and its buffer) per call, about half the cost of
    packing a header; one per thread is reused. A failed pack leaves it empty.
    """
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    return pack(value)  # type: ignore[no-any-return]


def dumps(value: Any, serialization: str = "msgpack", *, allow_pickle: bool = False) -> bytes:
    """Encode a payload; raise MessageError when the value cannot be encoded that way."""
    try:
        if serialization == "msgpack":
            return packb(value)
        if serialization == "json":
            return json.dumps(value, separators=(",", ":")).encode("utf-8")
        if serialization == "raw":
            if not isinstance(value, bytes | bytearray | memoryview):
                raise MessageError(f"raw payload: need bytes, got {type(value).__name__}")
            return bytes(value)
        if serialization == "pickle":
            if not allow_pickle:
                raise MessageError(_PICKLE_REFUSED)
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (TypeError, ValueError, OverflowError, pickle.PicklingError) as exc:
        raise MessageError(f"cannot encode payload as {serialization}: {exc}") from exc
    raise MessageError(f"unknown serialization {serialization!r}: use one of {SERIALIZATIONS}")


def loads(data: bytes, serialization: str = "msgpack", *, allow_pickle: bool = False) -> Any:
    """Decode a payload; raise MessageError for bad bytes, never anything else."""
    try:
        if serialization == "msgpack":
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        if serialization == "json":
            return json.loads(data)
        if serialization == "raw":
            return bytes(data)
        if serialization == "pickle":
            if not allow_pickle:
                raise MessageError(_PICKLE_REFUSED)
            return pickle.loads(data)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise MessageError(f"payload is not valid {serialization}: {exc}") from exc
    raise MessageError(f"unknown serialization {serialization!r}: use one of {SERIALIZATIONS}")


_PICKLE_REFUSED: Final = (
    "payload is pickle, which runs code when loaded, and pickle is not enabled here "
    "(set allow_pickle = true in the topology's [defaults] to accept it); not unpickled"
)


# ---------------------------------------------------------------------------
# pure codec


def encode(envelope: Envelope, payload: bytes = b"") -> list[bytes]:
    """The frames of a task message: ``[protocol version, header, payload]``."""
    header = {
        "task_id": envelope.task_id,
        "job_id": envelope.job_id,
        "seq": envelope.seq,
        "step": envelope.step,
        "next": envelope.next,
        "event": str(envelope.event),
        "where": envelope.where,
        "origin": envelope.origin,
        "wid": envelope.wid,
        "pid": envelope.pid,
        "attempt": envelope.attempt,
        "branch": envelope.branch,
        "deadline": float(envelope.deadline),
        "timestamps": dict(envelope.timestamps),
        "serialization": envelope.serialization,
    }
    return [PROTOCOL_FRAME, packb(header), bytes(payload)]


def decode(frames: Sequence[bytes], *, max_size: int = DEFAULT_MAX_SIZE) -> Vector:
    """Check and read the frames of a task message; raise MessageError saying what is wrong."""
    if type(frames) is list and len(frames) == 3:  # as received: the common case at once
        version, header, payload = frames
        if type(version) is bytes and type(header) is bytes and type(payload) is bytes:
            if len(version) + len(header) + len(payload) > max_size:
                raise MessageError(
                    f"message: {len(version) + len(header) + len(payload)} bytes is over "
                    f"the {max_size}-byte limit"
                )
            check_protocol(version)
            return Vector(read_header(header), payload)
    if not isinstance(frames, Sequence) or isinstance(frames, bytes | str):
        raise MessageError(f"message: need a list of frames, got {type(frames).__name__}")
    if len(frames) != 3:
        raise MessageError(f"message: need 3 frames [version, header, payload], got {len(frames)}")
    size = 0
    for index, frame in enumerate(frames):
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise MessageError(f"frame {index}: need bytes, got {type(frame).__name__}")
        size += len(frame)
    if size > max_size:
        raise MessageError(f"message: {size} bytes is over the {max_size}-byte limit")
    check_protocol(frames[0])
    envelope = read_header(frames[1])
    return Vector(envelope, bytes(frames[2]))


_ACCEPTED_PROTOCOLS: dict[bytes, Version] = {PROTOCOL_FRAME: PROTOCOL}


def check_protocol(frame: bytes) -> Version:
    """The protocol version a peer speaks, when compatible with ours; MessageError otherwise."""
    frame = bytes(frame)
    known = _ACCEPTED_PROTOCOLS.get(frame)
    if known is not None:
        return known
    if len(frame) > 32:
        raise MessageError(f"protocol version frame: {len(frame)} bytes, not a version")
    try:
        version = Version.parse(frame.decode("ascii"))
    except (UnicodeDecodeError, VersionError) as exc:
        raise MessageError(f"protocol version frame {frame[:32]!r}: {exc}") from exc
    if not compatible(version, PROTOCOL):
        raise MessageError(
            f"protocol version {version} is not compatible with {PROTOCOL} "
            f"(X.Y must match; upgrade the older peer)"
        )
    if len(_ACCEPTED_PROTOCOLS) < 64:
        _ACCEPTED_PROTOCOLS[frame] = version
    return version


_STR_FIELDS: Final = (
    "task_id",
    "job_id",
    "step",
    "next",
    "where",
    "origin",
    "wid",
    "serialization",
)
_INT_FIELDS: Final = ("seq", "pid", "attempt", "branch")
_FIELDS: Final = frozenset((*_STR_FIELDS, *_INT_FIELDS, "event", "deadline", "timestamps"))
_EVENTS: Final = {str(e): e for e in Event}
_MAX_INT: Final = 2**63 - 1


def read_header(data: bytes) -> Envelope:
    """Read a msgpack header into an Envelope; MessageError names the first bad field."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise MessageError(f"header: not valid msgpack ({exc})") from exc
    if type(header) is not dict:
        raise MessageError(f"header: need a map, got {type(header).__name__}")
    missing = _FIELDS - header.keys()
    if missing:
        raise MessageError(f"header: missing field(s) {', '.join(sorted(missing))}")
    for name in _STR_FIELDS:
        value = header[name]
        if type(value) is not str:
            raise MessageError(f"header field {name}: need a string, got {type(value).__name__}")
        if len(value) > MAX_NAME_LENGTH:
            raise MessageError(f"header field {name}: {len(value)} characters is too long")
    for name in _INT_FIELDS:
        value = header[name]
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise MessageError(
                f"header field {name}: need an integer in 0..2**63-1, got {value!r:.40}"
            )
    task_id = header["task_id"]
    if not 0 < len(task_id) <= MAX_ID_LENGTH:
        raise MessageError(f"header field task_id: need 1..{MAX_ID_LENGTH} characters")
    event = _EVENTS.get(header["event"]) if type(header["event"]) is str else None
    if event is None:
        raise MessageError(f"header field event: unknown event {header['event']!r:.40}")
    if header["serialization"] not in SERIALIZATIONS:
        raise MessageError(
            f"header field serialization: unknown serializer {header['serialization']!r:.40}"
        )
    deadline = header["deadline"]
    if type(deadline) not in (float, int):
        raise MessageError(f"header field deadline: need a number, got {type(deadline).__name__}")
    timestamps = header["timestamps"]
    if type(timestamps) is not dict or len(timestamps) > 32:
        raise MessageError("header field timestamps: need a map of at most 32 names to times")
    for key, value in timestamps.items():
        if type(key) is not str or type(value) not in (float, int):
            raise MessageError(
                f"header field timestamps: need name -> number, got {key!r:.40} -> {value!r:.40}"
            )
    return Envelope(
        task_id=task_id,
        job_id=header["job_id"],
        seq=header["seq"],
        step=header["step"],
        next=header["next"],
        event=event,
        where=header["where"],
        origin=header["origin"],
        wid=header["wid"],
        pid=header["pid"],
        attempt=header["attempt"],
        branch=header["branch"],
        deadline=float(deadline),
        timestamps=timestamps,
        serialization=header["serialization"],
    )


class TaskRef(NamedTuple):
    """What a worker needs of a task message (see :func:`read_checked`)."""

    task_id: str
    job_id: str
    seq: int
    attempt: int
    branch: int
    serialization: str


def read_checked(frames: Sequence[bytes]) -> TaskRef:
    """The fields a worker needs of a task message its own queue already read in full
    (:func:`decode`, every field checked, before it journaled the task): read again
    without checking each field or building an Envelope, a quarter of the cost.
    MessageError if it is not a task message at all."""
    if len(frames) != 3:
        raise MessageError(f"message: need 3 frames [version, header, payload], got {len(frames)}")
    check_protocol(frames[0])
    try:
        header = msgpack.unpackb(frames[1], raw=False)
        return TaskRef(
            header["task_id"],
            header["job_id"],
            header["seq"],
            header["attempt"],
            header["branch"],
            header["serialization"],
        )
    except (KeyError, TypeError, ValueError, RecursionError, msgpack.UnpackException) as exc:
        raise MessageError(f"header: not one of a task message ({exc!r:.80})") from exc


# ---------------------------------------------------------------------------
# at the socket


# pyzmq's send_multipart and recv_multipart check each frame's type and combine
# enum flags per frame in Python: about 5 us of a 4-frame message's 7 us. The hot
# paths send frames they made themselves (bytes), so they call the socket's
# compiled send and recv directly, with plain int flags.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_SNDMORE: Final = int(zmq.SNDMORE)
NOBLOCK: Final = int(zmq.NOBLOCK)


def send_frames(socket: zmq.Socket[Any], frames: Sequence[bytes], flags: int = 0) -> None:
    """Send frames (bytes) as one message; ``NOBLOCK`` raises ``zmq.Again`` when full.

    ZeroMQ delivers a multipart message whole or not at all; only its first frame
    can meet a full queue.
    """
    last = len(frames) - 1
    more = flags | _SNDMORE
    for index, frame in enumerate(frames):
        _send(socket, frame, more if index < last else flags)


def send_tracked(socket: zmq.Socket[Any], frames: Sequence[bytes]) -> zmq.MessageTracker:
    """Send frames as one message; the tracker it returns is done once ZeroMQ has
    passed the message on (to the kernel's socket: a process that dies after that does
    not take it along). The socket needs ``copy_threshold = 0`` (else small frames are
    copied, and their tracker is done at once)."""
    last = len(frames) - 1
    for frame in frames[:last]:
        _send(socket, frame, _SNDMORE)
    tracker: zmq.MessageTracker = _send(socket, frames[last], 0, False, True)
    return tracker


def recv_frames(socket: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """Receive one message's frames as bytes (``NOBLOCK``: ``zmq.Again`` when none).

    A frame says itself whether more follow; asking the socket (RCVMORE) costs an
    enum conversion per frame.
    """
    frame = _recv(socket, flags, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(socket, 0, False)
        frames.append(frame.bytes)
    return frames


def drain(socket: zmq.Socket[bytes], limit: int) -> Iterator[list[bytes]]:
    """The messages waiting on a socket, without blocking, at most ``limit`` of them."""
    for _ in range(limit):
        try:
            yield recv_frames(socket, NOBLOCK)
        except zmq.Again:
            return


def configure(
    socket: zmq.Socket[Any],
    *,
    hwm: int = 1000,
    max_size: int = DEFAULT_MAX_SIZE,
    linger: float = 0.0,
) -> None:
    """Give a socket dsat's explicit limits: high-water marks, max message size, linger."""
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    # ZeroMQ drops a peer that sends a bigger frame before allocating it.
    socket.setsockopt(zmq.MAXMSGSIZE, max_size)
    socket.setsockopt(zmq.LINGER, int(linger * 1000))


def send_vector(
    socket: zmq.Socket[Any],
    vector: Vector,
    event: Event | None = None,
    *,
    peer: bytes | None = None,
    flags: int = 0,
) -> Vector:
    """Send a task message, one seq further (and with ``event`` when given); return what was sent.

    ``peer`` prefixes the routing id a ROUTER socket needs. ``flags`` go to pyzmq
    (``zmq.NOBLOCK`` raises ``zmq.Again`` when the high-water mark is reached).
    """
    envelope = vector.envelope
    stamps = dict(envelope.timestamps)
    stamps["sent"] = time.time()
    envelope = replace(
        envelope,
        seq=envelope.seq + 1,
        event=envelope.event if event is None else event,
        pid=os.getpid(),
        timestamps=stamps,
    )
    frames = encode(envelope, vector.payload)
    if peer is not None:
        frames.insert(0, peer)
    socket.send_multipart(frames, flags=flags)
    return Vector(envelope, vector.payload, peer or b"")


def parse_event(
    socket: zmq.Socket[Any], *, max_size: int = DEFAULT_MAX_SIZE, flags: int = 0
) -> Vector:
    """Receive and check one task message; MessageError for anything malformed.

    On a ROUTER socket the first frame (the sender's routing id) is kept in
    ``Vector.peer``. ``zmq.Again`` comes through when nothing arrived in time.
    """
    frames = socket.recv_multipart(flags=flags)
    peer = b""
    if socket.type == zmq.ROUTER:
        peer = frames.pop(0)
    vector = decode(frames, max_size=max_size)
    return Vector(vector.envelope, vector.payload, peer)


# ---------------------------------------------------------------------------
# control messages: everything on the wire that is not a task
#
# ``[protocol version, kind, body, *extra]``: kind is a short ASCII word (b"ack",
# b"busy", b"credit", b"result", b"events", b"confirm", b"submit", b"accepted",
# b"refused", b"query", b"reply", b"load", b"bye", b"resend", b"hello"), body is a
# msgpack value, extra frames are payloads carried as they are.


@dataclass(frozen=True, slots=True)
class Control:
    """A control message: its kind, its msgpack body, any payload frames, the ROUTER peer."""

    kind: str
    body: Any
    extra: tuple[bytes, ...] = ()
    peer: bytes = b""


def control(kind: str, body: Any, *extra: bytes) -> list[bytes]:
    """The frames of a control message."""
    return [PROTOCOL_FRAME, kind.encode("ascii"), packb(body), *extra]


def is_task(frames: Sequence[bytes]) -> bool:
    """Does this frame list look like a task message (a msgpack map header), not a control?"""
    return len(frames) == 3 and len(frames[1]) > 0 and _is_map_byte(frames[1][0])


def _is_map_byte(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def decode_control(
    frames: Sequence[bytes],
    kinds: frozenset[str],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_extra: int = 1,
) -> Control:
    """Check and read a control message of one of ``kinds``; MessageError otherwise."""
    if not 3 <= len(frames) <= 3 + max_extra:
        raise MessageError(
            f"control message: need 3..{3 + max_extra} frames [version, kind, body, ...], "
            f"got {len(frames)}"
        )
    size = sum(len(frame) for frame in frames)
    if size > max_size:
        raise MessageError(f"message: {size} bytes is over the {max_size}-byte limit")
    check_protocol(frames[0])
    raw_kind = bytes(frames[1])
    kind = raw_kind.decode("ascii", errors="replace")
    if kind not in kinds:
        raise MessageError(f"control message: unexpected kind {raw_kind[:32]!r}")
    try:
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise MessageError(f"{kind} body: not valid msgpack ({exc})") from exc
    return Control(kind, body, tuple(bytes(f) for f in frames[3:]))


def field_of(body: Any, name: str, kind: type | tuple[type, ...], message: str) -> Any:
    """A typed field of a control body (a map); MessageError naming it otherwise."""
    if type(body) is not dict:
        raise MessageError(f"{message}: need a map, got {type(body).__name__}")
    value = body.get(name)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise MessageError(f"{message} field {name}: need {names}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------
# event records: what producers report to the tracker
#
# A batch of events is the control message ``[version, b"events", meta, records]``
# where meta is ``{"producer": str, "epoch": int, "first": int}`` and records is
# a msgpack array of arrays, one per event, in the order of RECORD_FIELDS.


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One transition of one task, as a producer saw it."""

    task_id: str
    job_id: str
    branch: int
    seq: int
    attempt: int
    event: Event
    step: str
    where: str
    origin: str
    wid: str
    pid: int
    at: float
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_list(self) -> list[Any]:
        return [
            self.task_id,
            self.job_id,
            self.branch,
            self.seq,
            self.attempt,
            str(self.event),
            self.step,
            self.where,
            self.origin,
            self.wid,
            self.pid,
            self.at,
            dict(self.detail),
        ]


RECORD_FIELDS: Final = (
    "task_id",
    "job_id",
    "branch",
    "seq",
    "attempt",
    "event",
    "step",
    "where",
    "origin",
    "wid",
    "pid",
    "at",
    "detail",
)
# detail keys the tracker reads, and their types
DETAIL_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "error": (str,),
    "children": (list,),
    "parent": (int,),
    "next": (list,),
    "result": (bytes,),
    "payload": (bytes,),
    "serialization": (str,),
    "deadline": (float, int),
    "elapsed": (float, int),
    "reason": (str,),
    "traceback": (str,),  # where a function raised (ERROR, TIMEOUT, FAILURE)
    "result_size": (int,),  # a result not kept: its size and the limit it passed
    "result_limit": (int,),
}


def pack_records(records: Sequence[EventRecord]) -> bytes:
    """Encode event records for an events batch."""
    return packb([r.as_list() for r in records])


def unpack_records(data: bytes, *, max_count: int = 1_000_000) -> list[EventRecord]:
    """Decode and check an events batch; MessageError names the first bad record."""
    return [EventRecord(*row) for row in unpack_rows(data, max_count=max_count)]


# positions in an event row (the order of RECORD_FIELDS)
TASK_ID, JOB_ID, BRANCH, SEQ, ATTEMPT, EVENT, STEP, WHERE, ORIGIN, WID, PID, AT, DETAIL = range(13)
_ROW_TYPES: Final = (str, str, int, int, int, str, str, str, str, str, int, float, dict)
# every (key, type of its value) a detail may hold
_DETAIL_KINDS: Final = frozenset(
    (key, kind) for key, kinds in DETAIL_TYPES.items() for kind in kinds
)
# detail lists, and the type of their items
_DETAIL_LISTS: Final = (("children", int), ("next", str))


def unpack_rows(data: bytes, *, max_count: int = 1_000_000) -> list[list[Any]]:
    """Decode and check an events batch into rows (lists in RECORD_FIELDS order, the event
    an :class:`Event`): the tracker's fast path. MessageError names the first bad record."""
    try:
        rows = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise MessageError(f"events: not valid msgpack ({exc})") from exc
    if type(rows) is not list or len(rows) > max_count:
        raise MessageError(f"events: need an array of at most {max_count} records")
    if len(rows) < _BY_COLUMNS_FROM or not _rows_ok(rows):
        for index, row in enumerate(rows):
            if not _row_ok(row):
                rows[index] = record_from_row(index, row).as_list()  # raises, or repairs an int
    events = _EVENTS
    for row in rows:
        row[EVENT] = events[row[EVENT]]
    return rows


# a batch this long or longer is checked a column at a time (a few rows: row by row is
# cheaper, the column checks cost about 20 µs whatever the length)
_BY_COLUMNS_FROM: Final = 6


def _rows_ok(rows: list[Any]) -> bool:
    """Does every row of a batch pass :func:`_row_ok`? Checked a column at a time, each
    check one loop in C over the whole batch: 1.4 µs per row instead of 3.4."""
    if not rows:
        return True
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {len(RECORD_FIELDS)}:
        return False
    columns = list(zip(*rows, strict=True))
    for column, kind in zip(columns, _ROW_TYPES, strict=True):
        if set(map(type, column)) != {kind}:
            return False
    ids = list(map(len, columns[TASK_ID]))
    if min(ids) < 1 or max(ids) > MAX_ID_LENGTH:
        return False
    for name in (JOB_ID, STEP, WHERE, ORIGIN, WID):
        if max(map(len, columns[name])) > MAX_NAME_LENGTH:
            return False
    for number in (BRANCH, SEQ, ATTEMPT, PID):
        if min(columns[number]) < 0 or max(columns[number]) > _MAX_INT:
            return False
    if not set(columns[EVENT]) <= _EVENTS.keys():
        return False
    return _details_ok([detail for detail in columns[DETAIL] if detail])


def _row_ok(row: Any) -> bool:
    """One row in the shape the tracker takes as it is (else :func:`record_from_row`)."""
    return (
        type(row) is list
        and tuple(map(type, row)) == _ROW_TYPES
        and 0 < len(row[TASK_ID]) <= MAX_ID_LENGTH
        and max(len(row[JOB_ID]), len(row[STEP]), len(row[WHERE]), len(row[ORIGIN]), len(row[WID]))
        <= MAX_NAME_LENGTH
        and min(row[BRANCH], row[SEQ], row[ATTEMPT], row[PID]) >= 0
        and max(row[BRANCH], row[SEQ], row[ATTEMPT], row[PID]) <= _MAX_INT
        and row[EVENT] in _EVENTS
        and (not row[DETAIL] or _detail_ok(row[DETAIL]))
    )


def _detail_ok(detail: dict[Any, Any]) -> bool:
    return _details_ok([detail])


def _details_ok(details: list[dict[Any, Any]]) -> bool:
    """Does every detail hold only known keys, each with a value of its type? The pairs
    (key, type) of all of them are gathered in C loops (a dict's keys and values iterate in
    the same order), then compared with those allowed in one set operation."""
    chain = itertools.chain.from_iterable
    keys = chain(map(dict.keys, details))
    kinds = map(type, chain(map(dict.values, details)))
    if not set(zip(keys, kinds, strict=True)) <= _DETAIL_KINDS:
        return False
    for key, kind in _DETAIL_LISTS:
        lists = [detail[key] for detail in details if key in detail]
        if lists and (max(map(len, lists)) > 4096 or set(map(type, chain(lists))) - {kind}):
            return False
    return True


def record_from_row(index: int, row: Any) -> EventRecord:
    if type(row) is not list or len(row) != len(RECORD_FIELDS):
        raise MessageError(f"event record {index}: need an array of {len(RECORD_FIELDS)} fields")
    (
        task_id,
        job_id,
        branch,
        seq,
        attempt,
        event_name,
        step,
        where,
        origin,
        wid,
        pid,
        at,
        detail,
    ) = row
    for name, value in (
        ("task_id", task_id),
        ("job_id", job_id),
        ("step", step),
        ("where", where),
        ("origin", origin),
        ("wid", wid),
    ):
        if type(value) is not str or len(value) > MAX_NAME_LENGTH:
            raise MessageError(f"event record {index}: {name}: need a short string")
    if not 0 < len(task_id) <= MAX_ID_LENGTH:
        raise MessageError(f"event record {index}: task_id: need 1..{MAX_ID_LENGTH} characters")
    for name, value in (("branch", branch), ("seq", seq), ("attempt", attempt), ("pid", pid)):
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise MessageError(f"event record {index}: {name}: need an integer in 0..2**63-1")
    event = _EVENTS.get(event_name) if type(event_name) is str else None
    if event is None:
        raise MessageError(f"event record {index}: unknown event {event_name!r:.40}")
    if type(at) not in (float, int):
        raise MessageError(f"event record {index}: at: need a number")
    if type(detail) is not dict:
        raise MessageError(f"event record {index}: detail: need a map")
    for key, value in detail.items():
        expected = DETAIL_TYPES.get(key) if type(key) is str else None
        if expected is None:
            raise MessageError(f"event record {index}: detail: unknown key {key!r:.40}")
        if type(value) not in expected:
            raise MessageError(f"event record {index}: detail {key}: wrong type")
    for key in ("children", "next"):
        items = detail.get(key, ())
        kind = int if key == "children" else str
        if not all(type(item) is kind for item in items) or len(items) > 4096:
            raise MessageError(
                f"event record {index}: detail {key}: need a list of {kind.__name__}"
            )
    return EventRecord(
        task_id,
        job_id,
        branch,
        seq,
        attempt,
        event,
        step,
        where,
        origin,
        wid,
        pid,
        float(at),
        detail,
    )


class Outstanding(Generic[T]):
    """Numbered items (events) sent in batches until the receiver confirms them.

    Go-back-N: the receiver confirms the highest number it has stored; a batch
    after a gap is refused (``confirm`` with ``gap``) and everything from the
    first missing one is sent again; so is everything unconfirmed when no
    confirmation came for ``timeout`` seconds (the receiver may have restarted).
    With a ``window``, at most that many items are sent and not yet confirmed:
    the rest wait here rather than pile up in the receiver's socket.
    """

    def __init__(
        self,
        pending: Iterable[tuple[int, T]] = (),
        *,
        timeout: float = 2.0,
        window: int | None = None,
    ) -> None:
        self.unconfirmed: collections.deque[tuple[int, T]] = collections.deque(pending)
        self.unsent: collections.deque[tuple[int, T]] = collections.deque(self.unconfirmed)
        self.timeout = timeout
        self.window = window
        self.sent_at = 0.0

    def extend(self, items: Iterable[tuple[int, T]]) -> None:
        for item in items:
            self.unconfirmed.append(item)
            self.unsent.append(item)

    def batch(self, now: float, limit: int) -> list[tuple[int, T]]:
        """The next items to send (taken off the unsent list), or [] when none is due."""
        in_flight = len(self.unconfirmed) - len(self.unsent)
        if in_flight and now - self.sent_at > self.timeout:
            self.unsent = collections.deque(self.unconfirmed)  # no word from the receiver
            in_flight = 0
        count = min(limit, len(self.unsent))
        if self.window is not None:
            count = min(count, max(0, self.window - in_flight))
        return [self.unsent.popleft() for _ in range(count)]

    def sent(self, now: float) -> None:
        self.sent_at = now

    def unsend(self, batch: list[tuple[int, T]]) -> None:
        """A batch that could not leave goes back to the front."""
        self.unsent.extendleft(reversed(batch))

    def confirmed(self, upto: int, now: float, *, gap: bool = False) -> bool:
        """The receiver stored everything up to ``upto``; True if that confirmed anything."""
        dropped = False
        while self.unconfirmed and self.unconfirmed[0][0] <= upto:
            self.unconfirmed.popleft()
            dropped = True
        while self.unsent and self.unsent[0][0] <= upto:
            self.unsent.popleft()
        if gap:  # it refused a batch after a gap: everything after what it has, again
            self.unsent = collections.deque(self.unconfirmed)
        self.sent_at = now
        return dropped

    def __len__(self) -> int:
        return len(self.unconfirmed)
