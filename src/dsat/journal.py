"""A router's journal: what it accepted and what it reported, kept until it is safe to forget.

Every router (a pool's queue, a sink, a router step, the orchester) appends to
its journal, in one write per cycle and *before* anything of that cycle leaves
the process (acks upstream, tasks downstream, events to the tracker):

- ``accept``: a task it acknowledged, with its frames;
- ``attempt``: it started try N of a task (handed it to a worker, or ran it);
- ``finished``: try N ended in ERROR or TIMEOUT, and the task waits for try N + 1;
- ``forward``: the task's function returned; here is what goes to which next step;
- ``done``: a task it has handed on (downstream acknowledged) or ended;
- ``events``: event records it will report, numbered by ``eseq``;
- ``confirmed``: the tracker stored every event up to an ``eseq``.

A router restarted after a crash (SIGKILL included: written bytes are in the
page cache) replays its journal: accepted tasks not done go back to its queue,
and events not confirmed are sent again. Every start is a new *epoch*: the
events not confirmed are numbered again from 1 under it, so a number the tracker
has seen is never used for another event. The journal is rewritten compactly at
every start and whenever it grows past a bound; when the disk has no room for
the copy, the new epoch is appended to the file as it is instead.

A write that fails (a full disk) leaves nothing half-written behind (the file
is cut back to its last whole record) and keeps what it could not write, to be
written again: the router sends nothing of that cycle until it is written.

Not covered: the machine itself crashing before the page cache reaches the
disk (no fsync on the hot path; see docs/reliability.md).

File format: a sequence of records, each a 4-byte big-endian length followed by
a msgpack array ``[kind, ...]``. A truncated last record (a crash mid-write) is
ignored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from dsat.errors import DsatError, MessageError
from dsat.message import EventRecord, packb, record_from_row

Key = tuple[str, int, int]  # task_id, branch, seq: one task at one hop
_LENGTH: Final = struct.Struct(">I")
COMPACT_BYTES: Final = 64 * 1024 * 1024


NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class JournalError(DsatError):
    """The journal cannot be read or written (disk full, permissions...).

    ``disk_full``: it failed for lack of space, which comes back by itself (wait, do
    not give up).
    """

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def _error(what: str, path: str, exc: OSError) -> JournalError:
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
    return JournalError(f"{what} {path}: {reason}", disk_full=exc.errno in NO_ROOM)


def new_epoch(previous: int = 0) -> int:
    """A random positive epoch, never the previous one."""
    while True:
        epoch = secrets.randbelow(2**31) + 1
        if epoch != previous:
            return epoch


Forward = tuple[str, list[bytes]]  # target step, frames of the task message


@dataclass
class Entry:
    """One live task as the journal knows it."""

    frames: list[bytes]
    attempt: int = 0  # last try started (0: never)
    finished: int = 0  # last try that ended in ERROR/TIMEOUT
    forwards: list[Forward] | None = None  # set once its function returned


@dataclass
class Replay:
    """What a journal held: the epoch, live tasks, events not yet confirmed."""

    epoch: int = 0
    tasks: dict[Key, Entry] = field(default_factory=dict)  # in accept order
    events: list[tuple[int, EventRecord]] = field(default_factory=list)  # (eseq, record)
    next_eseq: int = 1
    confirmed: int = 0
    size: int = field(default=0, compare=False)  # bytes up to the end of the last whole record


class Journal:
    """Append-only log of one router, replayed at start."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: list[bytes] = []
        self._fd = -1
        self.size = 0

    # -- reading

    def replay(self) -> Replay:
        """Read the journal (if any) into what must survive; tolerate a torn last record."""
        found = Replay()
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise _error("cannot read journal", self.path, exc) from exc
        offset = 0
        while offset + 4 <= len(data):
            (length,) = _LENGTH.unpack_from(data, offset)
            if offset + 4 + length > len(data):
                break  # torn write at the end: the process died mid-append
            try:
                item = msgpack.unpackb(data[offset + 4 : offset + 4 + length], raw=False)
                if type(item) is not list or not item:
                    break
                _apply(found, item)
            except (ValueError, TypeError, LookupError, MessageError, msgpack.UnpackException):
                break  # garbage from here on: keep what came before
            offset += 4 + length
        found.size = offset
        return found

    # -- writing

    def open(self, replay: Replay, *, epoch: int = 0) -> Replay:
        """Start a new epoch (``epoch``, or a random one): a fresh compact file holding
        only what ``replay`` still needs, its unconfirmed events numbered anew from 1;
        then append to it. Returns what the journal now holds.

        With no room for the compact copy, the new epoch is appended to the file as it
        is (what it already holds stays valid); JournalError when even that fails.
        """
        renumbered = Replay(
            epoch=epoch or new_epoch(replay.epoch),
            tasks=replay.tasks,
            events=[(n, record) for n, (_, record) in enumerate(replay.events, start=1)],
            next_eseq=len(replay.events) + 1,
            confirmed=0,
        )
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise _error("cannot create the directory of journal", self.path, exc) from exc
        try:
            self.rewrite(
                renumbered.epoch, renumbered.tasks.items(), renumbered.events, renumbered.confirmed
            )
        except JournalError as exc:
            if not exc.disk_full or not os.path.exists(self.path):
                raise
            self._append_epoch(renumbered, replay.size)
        return renumbered

    def _append_epoch(self, replay: Replay, valid: int) -> None:
        """Open the file as it is, cut back to its last whole record, and append the new
        epoch and its events (on replay, an epoch record drops the events before it)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise _error("cannot open journal", self.path, exc) from exc
        try:
            os.ftruncate(fd, valid)
        except OSError as exc:
            os.close(fd)
            raise _error("cannot cut back journal", self.path, exc) from exc
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.size = valid
        self._pending.clear()
        self.mark_epoch(replay.epoch)
        self.confirm(replay.confirmed)
        self.events(replay.events)
        try:
            self.flush()
        except JournalError:
            os.close(self._fd)
            self._fd = -1
            raise

    def rewrite(
        self,
        epoch: int,
        tasks: Iterable[tuple[Key, Entry]],
        events: Iterable[tuple[int, EventRecord | list[Any]]],
        confirmed: int,
    ) -> None:
        """Replace the file atomically by a compact one (live tasks and pending events only)."""
        self._pending.clear()
        self.mark_epoch(epoch)
        self.confirm(confirmed)
        for key, entry in tasks:
            self.accept(key, entry.frames, entry.forwards)
            if entry.attempt:
                self.attempt(key, entry.attempt)
            if entry.finished:
                self.finished(key, entry.finished)
        self.events(list(events))
        temporary = self.path + ".new"
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, self.path)
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)  # a partial copy only takes the room that is missing
            raise _error("cannot write journal", self.path, exc) from exc
        self.size = len(data)

    def mark_epoch(self, epoch: int) -> None:
        self._append(["epoch", epoch])

    def accept(
        self, key: Key, frames: Sequence[bytes], forwards: Sequence[Forward] | None = None
    ) -> None:
        """A task acknowledged; with ``forwards``, what it goes on as, in the same record
        (the entry's: a task it creates is never found without where it goes)."""
        record: list[Any] = ["accept", list(key), [bytes(f) for f in frames]]
        if forwards is not None:
            record.append(_forwards(forwards))
        self._append(record)

    def attempt(self, key: Key, attempt: int) -> None:
        self._append(["attempt", list(key), attempt])

    def finished(self, key: Key, attempt: int) -> None:
        self._append(["finished", list(key), attempt])

    def requeued(self, key: Key) -> None:
        """What was being handed on came back (a peer had no room): it waits here again."""
        self._append(["requeued", list(key)])

    def forward(self, key: Key, forwards: Sequence[Forward]) -> None:
        self._append(["forward", list(key), _forwards(forwards)])

    def done(self, key: Key) -> None:
        self._append(["done", list(key)])

    def events(self, numbered: Sequence[tuple[int, EventRecord | list[Any]]]) -> None:
        """Events to report, numbered (records, or rows in RECORD_FIELDS order)."""
        if numbered:
            self._append(
                [
                    "events",
                    [
                        [eseq, *(r.as_list() if isinstance(r, EventRecord) else r)]
                        for eseq, r in numbered
                    ],
                ]
            )

    def confirm(self, eseq: int) -> None:
        self._append(["confirmed", eseq])

    def _append(self, item: list[Any]) -> None:
        packed = packb(item)
        self._pending.append(_LENGTH.pack(len(packed)) + packed)

    @property
    def pending(self) -> bool:
        """Records appended and not yet written."""
        return bool(self._pending)

    def flush(self) -> None:
        """Write what was appended, in one system call, before anything is sent.

        On failure nothing of it stays in the file (a partial write is cut off) and all
        of it stays here, to be written by the next flush; JournalError says why.
        """
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            if len(view) < len(data):
                with contextlib.suppress(OSError):  # shrinking a file needs no room
                    os.ftruncate(self._fd, self.size)
            self._pending = [data]
            raise _error("cannot append to journal", self.path, exc) from exc
        self._pending.clear()
        self.size += len(data)

    def discard(self) -> None:
        """Forget what was appended and not written (its cause was undone)."""
        self._pending.clear()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(JournalError):
                self.flush()
            os.close(self._fd)
            self._fd = -1


def _forwards(forwards: Sequence[Forward]) -> list[list[Any]]:
    return [[t, [bytes(f) for f in fr]] for t, fr in forwards]


def _forwards_of(raw: Any) -> list[Forward]:
    return [(str(t), [bytes(f) for f in fr]) for t, fr in raw]


_SHAPES: Final[dict[str, tuple[int, type[Any]]]] = {  # kind -> (length, type of item 1)
    "epoch": (2, int),
    "accept": (3, list),  # or 4: with its forwards
    "attempt": (3, list),
    "finished": (3, list),
    "forward": (3, list),
    "done": (2, list),
    "requeued": (2, list),
    "events": (2, list),
    "confirmed": (2, int),
}


def _apply(found: Replay, item: Any) -> None:
    kind = item[0]
    shape = _SHAPES.get(kind) if type(kind) is str else None
    length = len(item) - 1 if kind == "accept" and len(item) == 4 else len(item)
    if shape is None or length != shape[0] or type(item[1]) is not shape[1]:
        raise ValueError(f"not a journal record: {item!r:.60}")
    if kind == "epoch":
        if item[1] <= 0:
            raise ValueError("epoch must be positive")
        # a new epoch: the events it carries on follow, numbered anew
        found.epoch = int(item[1])
        found.events = []
        found.next_eseq = 1
        found.confirmed = 0
    elif kind == "accept":
        forwards = _forwards_of(item[3]) if len(item) == 4 else None
        found.tasks[_key(item[1])] = Entry([bytes(f) for f in item[2]], forwards=forwards)
    elif kind in ("attempt", "finished", "forward"):
        entry = found.tasks.get(_key(item[1]))
        if entry is None:
            return  # a record of a task already done
        if kind == "attempt":
            entry.attempt = int(item[2])
        elif kind == "finished":
            entry.finished = int(item[2])
        else:
            entry.forwards = _forwards_of(item[2])
    elif kind == "done":
        found.tasks.pop(_key(item[1]), None)
    elif kind == "requeued":
        entry = found.tasks.get(_key(item[1]))
        if entry is not None:
            entry.forwards = None
    elif kind == "events":
        for row in item[1]:
            eseq = int(row[0])
            found.events.append((eseq, record_from_row(0, list(row[1:]))))
            found.next_eseq = max(found.next_eseq, eseq + 1)
    elif kind == "confirmed":
        found.confirmed = max(found.confirmed, int(item[1]))
        found.events = [(e, r) for e, r in found.events if e > found.confirmed]
        found.next_eseq = max(found.next_eseq, found.confirmed + 1)
    else:
        raise ValueError(f"unknown journal record {kind!r}")


def _key(raw: Any) -> Key:
    task_id, branch, seq = raw
    return (str(task_id), int(branch), int(seq))
