"""A router's journal: what is written comes back on replay, torn or garbled tails are dropped."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dsat.fsm import Event
from dsat.journal import Entry, Journal, JournalError, Key, Replay
from dsat.message import Envelope, EventRecord, encode


def key(n: int, seq: int = 1) -> Key:
    return (f"task-{n}", 1, seq)


def frames(n: int, seq: int = 1) -> list[bytes]:
    envelope = Envelope(task_id=f"task-{n}", job_id="job", seq=seq, step="clock", next="cpu")
    return encode(envelope, msgpack.packb({"n": n}))


def record(n: int, event: Event = Event.ACK) -> EventRecord:
    return EventRecord(
        task_id=f"task-{n}",
        job_id="job",
        branch=1,
        seq=1,
        attempt=1,
        event=event,
        step="cpu",
        where="local",
        origin="local",
        wid="cpu.queue",
        pid=4321,
        at=1_700_000_000.25 + n,
        detail={"next": ["csv"], "elapsed": 0.5},
    )


def opened(path: Path, epoch: int = 7) -> Journal:
    journal = Journal(str(path))
    journal.open(Replay(), epoch=epoch)
    return journal


def replay(path: Path) -> Replay:
    return Journal(str(path)).replay()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journals" / "cpu.queue.journal"


def test_a_journal_that_does_not_exist_replays_as_nothing(path: Path) -> None:
    assert replay(path) == Replay(epoch=0, tasks={}, events=[], next_eseq=1, confirmed=0)


def test_live_tasks_are_the_accepted_ones_not_done_with_their_tries_and_forwards(
    path: Path,
) -> None:
    journal = opened(path, epoch=42)
    for n in range(1, 6):
        journal.accept(key(n), frames(n))
    journal.attempt(key(1), 1)
    journal.finished(key(1), 1)
    journal.attempt(key(1), 2)
    journal.attempt(key(2), 1)
    journal.forward(key(2), [("csv", frames(2, seq=2)), ("db", frames(2, seq=2))])
    journal.done(key(3))
    journal.attempt(key(4), 1)
    journal.forward(key(4), [])  # a terminus: nothing to hand on
    journal.flush()
    found = replay(path)
    assert found.epoch == 42
    assert list(found.tasks) == [key(1), key(2), key(4), key(5)]
    assert found.tasks[key(1)] == Entry(frames(1), attempt=2, finished=1)
    assert found.tasks[key(2)] == Entry(
        frames(2), attempt=1, forwards=[("csv", frames(2, seq=2)), ("db", frames(2, seq=2))]
    )
    assert found.tasks[key(4)] == Entry(frames(4), attempt=1, forwards=[])
    assert found.tasks[key(5)] == Entry(frames(5))
    journal.close()


def test_records_of_a_task_already_done_do_not_bring_it_back(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.done(key(1))
    journal.attempt(key(1), 2)
    journal.finished(key(1), 2)
    journal.forward(key(1), [("csv", frames(1, seq=2))])
    journal.close()  # close flushes what is pending
    assert replay(path).tasks == {}


def test_a_task_accepted_again_after_done_is_live_again(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.attempt(key(1), 1)
    journal.done(key(1))
    journal.accept(key(1), frames(1))
    journal.close()
    assert replay(path).tasks == {key(1): Entry(frames(1))}


def test_events_after_the_confirmed_mark_are_pending(path: Path) -> None:
    journal = opened(path)
    journal.events([(1, record(1)), (2, record(2)), (3, record(3))])
    journal.confirm(2)
    journal.events([(4, record(4, Event.START))])
    journal.flush()
    found = replay(path)
    assert found.events == [(3, record(3)), (4, record(4, Event.START))]
    assert found.confirmed == 2
    assert found.next_eseq == 5
    journal.close()


def test_when_every_event_is_confirmed_none_is_pending_and_numbering_goes_on(path: Path) -> None:
    journal = opened(path)
    journal.events([(1, record(1)), (2, record(2)), (3, record(3))])
    journal.confirm(3)
    journal.close()
    found = replay(path)
    assert found.events == []
    assert found.confirmed == 3
    assert found.next_eseq == 4


def test_a_confirmation_never_goes_back(path: Path) -> None:
    journal = opened(path)
    journal.events([(1, record(1)), (2, record(2))])
    journal.confirm(2)
    journal.confirm(1)  # a late, older confirmation
    journal.close()
    found = replay(path)
    assert found.confirmed == 2
    assert found.events == []


def test_event_records_come_back_equal(path: Path) -> None:
    journal = opened(path)
    records = [
        record(1, Event.INIT),
        EventRecord("t", "", 7, 3, 2, Event.FAILURE, "cpu", "a", "b", "w", 1, 2.0, {}),
        EventRecord(
            "t", "j", 1, 0, 1, Event.HAPPY_END, "", "", "", "", 0, 3.5, {"result": b"\x00\xff"}
        ),
    ]
    journal.events(list(enumerate(records, start=1)))
    journal.close()
    assert replay(path).events == list(enumerate(records, start=1))


def test_nothing_reaches_the_file_before_flush(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.events([(1, record(1))])
    assert replay(path).tasks == {}
    assert replay(path).events == []
    journal.flush()
    assert list(replay(path).tasks) == [key(1)]
    assert replay(path).events == [(1, record(1))]
    journal.close()


def test_size_counts_the_bytes_in_the_file(path: Path) -> None:
    journal = opened(path)
    assert journal.size == path.stat().st_size > 0
    journal.accept(key(1), frames(1))
    journal.flush()
    assert journal.size == path.stat().st_size
    journal.close()


def test_the_file_is_length_prefixed_msgpack_records(path: Path) -> None:
    journal = opened(path, epoch=9)
    journal.accept(key(1), frames(1))
    journal.close()
    data = path.read_bytes()
    items = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        items.append(msgpack.unpackb(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    assert offset == len(data)
    assert items == [["epoch", 9], ["confirmed", 0], ["accept", list(key(1)), frames(1)]]


# ---------------------------------------------------------------------------
# a crash mid-write, garbage at the end


def framed(body: bytes) -> bytes:
    """One record as the journal writes it: a 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


def written_in_two_parts(path: Path) -> tuple[Replay, int, int]:
    """A journal whose last flush is one record; (replay before it, size before, its size)."""
    journal = opened(path)
    for n in range(1, 4):
        journal.accept(key(n), frames(n))
    journal.attempt(key(1), 1)
    journal.events([(1, record(1)), (2, record(2))])
    journal.confirm(1)
    journal.flush()
    before = replay(path)
    size_before = path.stat().st_size
    journal.forward(key(2), [("csv", frames(2, seq=2))])
    journal.close()
    return before, size_before, path.stat().st_size - size_before


def test_a_torn_last_record_is_ignored_and_everything_before_it_is_kept(path: Path) -> None:
    before, size_before, last = written_in_two_parts(path)
    assert replay(path).tasks[key(2)].forwards is not None
    whole = path.read_bytes()
    for cut in range(1, last + 1):
        path.write_bytes(whole[: len(whole) - cut])
        assert replay(path) == before, f"cut {cut} bytes off the end"
    assert before.tasks[key(2)].forwards is None
    assert size_before == len(whole) - last


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00" * 64, id="a tail of zeroes"),
        pytest.param(b"\x00\x00", id="not even a whole length"),
        pytest.param(b"\xff\xff\xff\xff" + b"x" * 10, id="a length past the end"),
        pytest.param(framed(b"\xc1\xc1\xc1"), id="not msgpack"),
        pytest.param(framed(b"hello"), id="msgpack, with extra data"),
        pytest.param(framed(msgpack.packb(5)), id="msgpack, not an array"),
        pytest.param(framed(msgpack.packb(["nope", 1])), id="an unknown kind"),
        pytest.param(framed(msgpack.packb([])), id="an empty record"),
        pytest.param(framed(msgpack.packb({"a": 1})), id="a map, not an array"),
        pytest.param(framed(msgpack.packb(["accept"])), id="a record missing its fields"),
        pytest.param(framed(msgpack.packb(["done", [1, 2]])), id="a key of the wrong shape"),
        pytest.param(framed(msgpack.packb(["events", [[1, 2]]])), id="a bad event record"),
        pytest.param(framed(msgpack.packb(["confirmed", "x"])), id="a bad number"),
    ],
)
def test_garbage_at_the_end_is_ignored_and_everything_before_it_is_kept(
    path: Path, garbage: bytes
) -> None:
    before, _, _ = written_in_two_parts(path)
    expected = replay(path)
    assert expected != before
    with open(path, "ab") as file:
        file.write(garbage)
    assert replay(path) == expected


# not shrunk (that takes hypothesis seconds): the cases above are the small ones
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    st.one_of(
        st.binary(min_size=1, max_size=40),
        st.builds(
            framed,
            st.one_of(
                st.binary(max_size=30),
                st.builds(
                    msgpack.packb,
                    st.lists(
                        st.one_of(
                            st.sampled_from(["accept", "attempt", "done", "events", "epoch"]),
                            st.integers(-5, 5),
                            st.text(max_size=4),
                            st.lists(st.integers(0, 3), max_size=3),
                            st.none(),
                        ),
                        max_size=4,
                    ),
                ),
            ),
        ),
    )
)
def test_random_garbage_at_the_end_never_breaks_replay(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "garbled.journal"
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.close()
    with open(path, "ab") as file:
        file.write(garbage)
    found = replay(path)
    assert key(1) in found.tasks or garbage_is_a_record(garbage, "done")
    # garbage that happens to be a well-formed record is one: only a valid epoch replaces 7
    assert found.epoch == 7 or garbage_is_a_record(garbage, "epoch")
    assert found.epoch > 0
    path.unlink()


def garbage_is_a_record(garbage: bytes, kind: str) -> bool:
    """Does the garbage start with a well-formed record of this kind?"""
    try:
        length = int.from_bytes(garbage[:4], "big")
        item = msgpack.unpackb(garbage[4 : 4 + length], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return False
    return len(garbage) >= 4 + length and type(item) is list and item[:1] == [kind]


# ---------------------------------------------------------------------------
# compaction


def test_rewrite_compacts_the_file_and_replays_the_same(path: Path) -> None:
    journal = opened(path)
    for n in range(100):
        journal.accept(key(n), frames(n))
        journal.attempt(key(n), 1)
        journal.events([(n + 1, record(n))])
        if n % 10:
            journal.done(key(n))
    journal.confirm(95)
    journal.flush()
    found = replay(path)
    size = path.stat().st_size
    journal.rewrite(found.epoch, found.tasks.items(), found.events, found.confirmed)
    assert path.stat().st_size < size / 4
    assert journal.size == path.stat().st_size
    again = replay(path)
    assert again == found
    assert list(again.tasks) == list(found.tasks)
    assert len(again.tasks) == 10
    assert [e for e, _ in again.events] == [96, 97, 98, 99, 100]
    assert not os.path.exists(str(path) + ".new")
    journal.close()


def test_appends_after_a_rewrite_go_to_the_new_file(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.done(key(1))
    journal.flush()
    found = replay(path)
    journal.rewrite(found.epoch, found.tasks.items(), found.events, found.confirmed)
    journal.accept(key(2), frames(2))
    journal.close()
    assert list(replay(path).tasks) == [key(2)]


def test_opening_a_journal_again_keeps_its_tasks_and_starts_a_new_epoch(path: Path) -> None:
    journal = opened(path, epoch=5)
    journal.accept(key(1), frames(1))
    journal.attempt(key(1), 3)
    journal.finished(key(1), 2)
    journal.events([(1, record(1)), (2, record(2)), (3, record(3))])
    journal.confirm(1)
    journal.close()
    found = replay(path)
    assert found.events == [(2, record(2)), (3, record(3))]
    restarted = Journal(str(path))
    now = restarted.open(found)
    restarted.close()
    assert replay(path) == now
    assert now.tasks == {key(1): Entry(frames(1), attempt=3, finished=2)}
    # the events not confirmed, numbered anew under an epoch of their own: a number
    # the tracker saw under the old epoch is never given to another event
    assert now.epoch not in (0, 5)
    assert now.events == [(1, record(2)), (2, record(3))]
    assert (now.next_eseq, now.confirmed) == (3, 0)


def test_every_open_is_a_new_epoch(path: Path) -> None:
    epochs = set()
    for _ in range(5):
        journal = Journal(str(path))
        epochs.add(journal.open(journal.replay()).epoch)
        journal.close()
    assert len(epochs) == 5


def test_an_accept_written_with_its_forwards_replays_with_them(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1), [("csv", frames(1, seq=2))])
    journal.accept(key(2), frames(2), [])
    journal.close()
    found = replay(path)
    assert found.tasks[key(1)].forwards == [("csv", frames(1, seq=2))]
    assert found.tasks[key(2)].forwards == []


def test_pending_records_are_dropped_by_a_rewrite(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))  # never flushed
    journal.rewrite(7, [], [], 0)
    journal.close()
    assert replay(path).tasks == {}


# ---------------------------------------------------------------------------
# errors


def test_a_journal_that_cannot_be_read_raises_journal_error(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(JournalError, match="cannot read journal"):
        Journal(str(directory)).replay()


def test_a_journal_that_cannot_be_created_raises_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(JournalError):
        Journal(str(blocker / "cpu.journal")).open(Replay(epoch=1))


def test_a_failed_write_keeps_its_records_and_leaves_nothing_torn(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.flush()
    size = path.stat().st_size
    journal.accept(key(2), frames(2))
    journal.attempt(key(2), 1)
    fd = journal._fd
    journal._fd = os.open(os.devnull, os.O_RDONLY)  # every write fails
    with pytest.raises(JournalError, match="cannot append to journal"):
        journal.flush()
    os.close(journal._fd)
    journal._fd = fd
    assert journal.pending
    assert path.stat().st_size == size == journal.size
    assert list(replay(path).tasks) == [key(1)]
    journal.flush()  # the disk has room again: all of it lands
    assert not journal.pending
    assert replay(path).tasks == {key(1): Entry(frames(1)), key(2): Entry(frames(2), attempt=1)}
    journal.close()


def test_a_discarded_record_is_never_written(path: Path) -> None:
    journal = opened(path)
    journal.accept(key(1), frames(1))
    journal.discard()
    journal.close()
    assert replay(path).tasks == {}


def test_with_no_room_for_a_copy_the_new_epoch_is_appended(path: Path) -> None:
    journal = opened(path, epoch=3)
    journal.accept(key(1), frames(1))
    journal.events([(1, record(1)), (2, record(2))])
    journal.confirm(1)
    journal.close()
    with open(path, "ab") as file:
        file.write(b"\x00\x00\x01")  # a torn tail, cut back before the append
    (path.parent / "cpu.queue.journal.new").mkdir()  # the copy cannot be made
    found = replay(path)
    restarted = Journal(str(path))
    original = restarted.rewrite

    def no_room(*args: object, **kwargs: object) -> None:
        raise JournalError("cannot write journal: [Errno 28] No space left", disk_full=True)

    restarted.rewrite = no_room  # type: ignore[method-assign]
    now = restarted.open(found, epoch=4)
    restarted.rewrite = original  # type: ignore[method-assign]
    restarted.accept(key(2), frames(2))
    restarted.close()
    again = replay(path)
    assert list(now.tasks) == [key(1)]
    assert list(again.tasks) == [key(1), key(2)]
    assert again.epoch == 4
    assert again.events == [(1, record(2))]
