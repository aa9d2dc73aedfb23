"""The SQLite status store on real files: batches land whole or not at all, queries, readers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from dsat.store import (
    Batch,
    DeadLetter,
    EventRow,
    ResultRow,
    Store,
    StoreError,
    TaskRow,
    open_store,
)
from dsat.store import sqlite as sqlite_store


def task_row(task_id: str, **changes: Any) -> TaskRow:
    row = TaskRow(
        task_id=task_id,
        job_id="job",
        origin="local",
        state="ACK",
        step="cpu",
        attempt=1,
        error="",
        created=100.0,
        updated=101.0,
        ended=None,
        events=3,
        anomalies=0,
        duplicates=0,
        deadline=0.0,
    )
    return dataclasses.replace(row, **changes)


def event_row(task_id: str, tseq: int, event: str = "ACK", **changes: Any) -> EventRow:
    row = EventRow(
        task_id=task_id,
        tseq=tseq,
        branch=1,
        seq=1,
        attempt=1,
        event=event,
        step="cpu",
        where="local",
        wid="cpu.queue",
        pid=1234,
        at=100.0 + tseq,
        detail={},
        flag="",
    )
    return dataclasses.replace(row, **changes)


def dead_letter(task_id: str, **changes: Any) -> DeadLetter:
    row = DeadLetter(
        task_id=task_id,
        job_id="job",
        origin="local",
        step="cpu",
        branch=1,
        seq=2,
        attempt=3,
        serialization="msgpack",
        payload=b"\x81\xa1n\x01",
        error="ValueError: no",
        at=200.0,
    )
    return dataclasses.replace(row, **changes)


def url(path: Path) -> str:
    return "sqlite:///" + str(path)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "dsat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    opened = open_store(url(db_path))
    yield opened
    opened.close()


def full_batch() -> Batch:
    """One tracker cycle's worth of everything."""
    return Batch(
        events=[
            event_row("t1", 1, "INIT", seq=0, step=""),
            event_row("t1", 2, "SEND", detail={"next": ["cpu"]}),
            event_row("t1", 3, "ACK"),
            event_row("t2", 1, "FAILURE", detail={"error": "boom", "elapsed": 0.25}),
        ],
        tasks={
            "t1": task_row("t1"),
            "t2": task_row("t2", state="FAILURE", error="boom", ended=150.0, events=1),
        },
        results=[
            ResultRow("t1", 7, "csv", "msgpack", b"\x01"),
            ResultRow("t1", 3, "db", "raw", b""),
        ],
        dead_letters=[dead_letter("t2")],
        flags=[("t1", 3, "duplicate")],
        producers={"local/cpu.queue": (11, 40), "local/orchester": (12, 7)},
    )


# ---------------------------------------------------------------------------
# writing


def test_a_batch_lands_whole(store: Store) -> None:
    store.write(full_batch())
    assert store.task("t1") == task_row("t1")
    assert store.task("t2") == task_row("t2", state="FAILURE", error="boom", ended=150.0, events=1)
    assert store.events("t1") == [
        event_row("t1", 1, "INIT", seq=0, step=""),
        event_row("t1", 2, "SEND", detail={"next": ["cpu"]}),
        event_row("t1", 3, "ACK", flag="duplicate"),
    ]
    assert store.events("t2") == [
        event_row("t2", 1, "FAILURE", detail={"error": "boom", "elapsed": 0.25})
    ]
    assert store.results("t1") == [
        ResultRow("t1", 3, "db", "raw", b""),
        ResultRow("t1", 7, "csv", "msgpack", b"\x01"),
    ]
    assert store.dead_letter("t2") == dead_letter("t2")
    assert store.producers() == {"local/cpu.queue": (11, 40), "local/orchester": (12, 7)}
    assert store.counts() == {"ACK": 1, "FAILURE": 1}
    assert store.live_tasks() == [task_row("t1")]


def test_an_empty_batch_writes_nothing(store: Store) -> None:
    store.write(Batch())
    assert store.counts() == {}
    assert store.producers() == {}


def test_the_last_row_of_a_task_wins(store: Store) -> None:
    store.write(Batch(tasks={"t1": task_row("t1")}))
    store.write(Batch(tasks={"t1": task_row("t1", state="HAPPY_END", ended=120.0, events=9)}))
    assert store.task("t1") == task_row("t1", state="HAPPY_END", ended=120.0, events=9)
    assert store.counts() == {"HAPPY_END": 1}


def test_a_producers_mark_moves_on(store: Store) -> None:
    store.write(Batch(producers={"p": (1, 10)}))
    store.write(Batch(producers={"p": (2, 3)}))
    assert store.producers() == {"p": (2, 3)}


def test_a_retried_dead_letter_is_gone(store: Store) -> None:
    store.write(Batch(dead_letters=[dead_letter("t1"), dead_letter("t2")]))
    store.write(Batch(retried=["t1"]))
    assert store.dead_letter("t1") is None
    assert store.dead_letter("t2") == dead_letter("t2")


def test_a_flag_marks_an_event_written_earlier(store: Store) -> None:
    store.write(Batch(events=[event_row("t1", 1), event_row("t1", 2, "START")]))
    store.write(Batch(flags=[("t1", 2, "anomaly: START cannot follow nothing")]))
    assert [e.flag for e in store.events("t1")] == ["", "anomaly: START cannot follow nothing"]


def test_a_history_written_over_many_cycles_reads_back_in_order(store: Store) -> None:
    # each write is one tracker cycle: a task's events land in a chunk per cycle
    store.write(Batch(events=[event_row("t1", 1, "INIT"), event_row("t2", 1, "INIT")]))
    store.write(Batch(events=[event_row("t1", 2, "SEND"), event_row("t1", 3, "ACK")]))
    store.write(Batch(events=[event_row("t2", 2, "SEND"), event_row("t1", 4, "START")]))
    assert [e.tseq for e in store.events("t1")] == [1, 2, 3, 4]
    assert [e.event for e in store.events("t1", after=2)] == ["ACK", "START"]
    assert [e.event for e in store.events("t1", after=3)] == ["START"]
    assert store.events("t1", after=4) == []
    assert [e.event for e in store.events("t2")] == ["INIT", "SEND"]


def test_a_flag_finds_its_event_among_others_of_its_chunk(store: Store) -> None:
    store.write(Batch(events=[event_row("t1", 1), event_row("t1", 2, "START")]))
    store.write(Batch(events=[event_row("t1", n, "END") for n in (3, 4, 5)]))
    store.write(Batch(flags=[("t1", 4, "duplicate"), ("t1", 9, "anomaly: never written")]))
    assert [e.flag for e in store.events("t1")] == ["", "", "", "duplicate", ""]


def test_event_details_keep_their_types(store: Store) -> None:
    detail = {"children": [3, 4], "parent": 1, "deadline": 12.5, "reason": "x", "result": b"\xff"}
    store.write(Batch(events=[event_row("t1", 1, "END", detail=detail)]))
    assert store.events("t1")[0].detail == detail


def unbindable_event() -> Batch:
    return Batch(events=[event_row("t9", 1), event_row("t9", 2, pid=object())])


def not_null_task() -> Batch:
    return Batch(events=[event_row("t9", 1)], tasks={"t9": task_row("t9", job_id=None)})


def not_null_dead_letter() -> Batch:
    batch = full_batch()
    batch.dead_letters.append(dead_letter("t9", payload=None))
    return batch


def unbindable_producer() -> Batch:
    batch = full_batch()
    batch.producers["p"] = (1, [2])  # type: ignore[assignment]
    return batch


def unencodable_detail() -> Batch:
    batch = full_batch()
    batch.events.append(event_row("t9", 1, detail={"error": {1, 2}}))
    return batch


FAILING_BATCHES = [
    pytest.param(unbindable_event, id="an event row with a value sqlite cannot bind"),
    pytest.param(not_null_task, id="a task row with None where a value is required"),
    pytest.param(not_null_dead_letter, id="a dead letter without its payload, last in the batch"),
    pytest.param(unbindable_producer, id="a producer mark sqlite cannot bind, last of all"),
    pytest.param(unencodable_detail, id="an event detail msgpack cannot encode"),
]


@pytest.mark.parametrize("make_batch", FAILING_BATCHES)
def test_a_batch_that_fails_leaves_nothing_behind(store: Store, make_batch: Any) -> None:
    before = Batch(
        events=[event_row("t1", 1, "INIT", seq=0)],
        tasks={"t1": task_row("t1", state="INIT")},
        producers={"local/cpu.queue": (11, 1)},
    )
    store.write(before)
    with pytest.raises(StoreError, match="could not write"):
        store.write(make_batch())
    assert store.task("t1") == task_row("t1", state="INIT")
    assert store.events("t1") == [event_row("t1", 1, "INIT", seq=0)]
    assert store.task("t2") is None
    assert store.task("t9") is None
    assert store.events("t9") == []
    assert store.results("t1") == []
    assert store.dead_letter("t2") is None
    assert store.producers() == {"local/cpu.queue": (11, 1)}
    assert store.counts() == {"INIT": 1}


@pytest.mark.parametrize("make_batch", FAILING_BATCHES)
def test_the_store_takes_the_next_batch_after_one_failed(store: Store, make_batch: Any) -> None:
    with pytest.raises(StoreError):
        store.write(make_batch())
    store.write(full_batch())
    assert store.task("t1") == task_row("t1")
    assert len(store.events("t1")) == 3


# ---------------------------------------------------------------------------
# reading


def test_events_after_a_tseq_are_the_later_ones_in_order(store: Store) -> None:
    store.write(Batch(events=[event_row("t1", n) for n in (3, 1, 5, 2, 4)]))
    store.write(Batch(events=[event_row("t2", 1)]))
    assert [e.tseq for e in store.events("t1")] == [1, 2, 3, 4, 5]
    assert [e.tseq for e in store.events("t1", after=2)] == [3, 4, 5]
    assert store.events("t1", after=5) == []
    assert store.events("nobody") == []


def test_an_unknown_task_has_no_row_result_or_dead_letter(store: Store) -> None:
    assert store.task("nobody") is None
    assert store.results("nobody") == []
    assert store.dead_letter("nobody") is None


@pytest.fixture
def many(store: Store) -> Store:
    rows = [
        task_row("a", job_id="j1", step="cpu", state="START", created=1.0, updated=10.0),
        task_row("b", job_id="j1", step="csv", state="HAPPY_END", created=2.0, ended=20.0),
        task_row("c", job_id="j2", step="cpu", state="FAILURE", created=3.0, ended=30.0),
        task_row("d", job_id="j2", step="cpu", state="ACK", created=4.0, updated=40.0),
        task_row("e", job_id="j1", step="cpu", state="HAPPY_END", created=5.0, ended=50.0),
        task_row("f", job_id="j3", step="db", state="SEND", created=6.0, updated=5.0),
    ]
    store.write(Batch(tasks={row.task_id: row for row in rows}))
    return store


def ids(rows: list[TaskRow]) -> list[str]:
    return [row.task_id for row in rows]


def test_tasks_come_newest_first(many: Store) -> None:
    assert ids(many.tasks()) == ["f", "e", "d", "c", "b", "a"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"job_id": "j1"}, ["e", "b", "a"]),
        ({"step": "cpu"}, ["e", "d", "c", "a"]),
        ({"state": "HAPPY_END"}, ["e", "b"]),
        ({"live": True}, ["f", "d", "a"]),
        ({"live": False}, ["e", "c", "b"]),
        ({"stale_before": 10.5}, ["f", "a"]),
        ({"job_id": "j1", "step": "cpu"}, ["e", "a"]),
        ({"job_id": "j1", "live": True}, ["a"]),
        ({"step": "cpu", "state": "FAILURE", "live": False}, ["c"]),
        ({"job_id": "j9"}, []),
        ({"limit": 2}, ["f", "e"]),
        ({"step": "cpu", "limit": 1}, ["e"]),
        ({"limit": 0}, []),
    ],
)
def test_tasks_match_every_filter_given(
    many: Store, filters: dict[str, Any], expected: list[str]
) -> None:
    assert ids(many.tasks(**filters)) == expected


def test_counts_are_per_state(many: Store) -> None:
    assert many.counts() == {"START": 1, "HAPPY_END": 2, "FAILURE": 1, "ACK": 1, "SEND": 1}


def test_live_tasks_are_the_ones_not_ended(many: Store) -> None:
    assert sorted(ids(many.live_tasks())) == ["a", "d", "f"]


def test_prune_forgets_tasks_ended_before_a_time(many: Store) -> None:
    many.write(
        Batch(
            events=[event_row(t, 1) for t in "abcde"],
            results=[ResultRow(t, 1, "csv", "raw", t.encode()) for t in "be"],
        )
    )
    assert many.prune(ended_before=40.0) == 2
    assert sorted(ids(many.tasks())) == ["a", "d", "e", "f"]
    assert many.events("b") == many.events("c") == []
    assert many.results("b") == []
    assert [e.task_id for e in many.events("e")] == ["e"]
    assert many.results("e") == [ResultRow("e", 1, "csv", "raw", b"e")]
    assert [e.task_id for e in many.events("a")] == ["a"]  # live: never pruned
    assert many.prune(ended_before=40.0) == 0


# ---------------------------------------------------------------------------
# the file


def test_the_file_is_in_wal_mode(store: Store, db_path: Path) -> None:
    store.write(full_batch())
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


def _in_main_file(db_path: Path, task_id: str) -> bool:
    """Whether the database file itself, without its WAL, holds a task's row yet."""
    copy = db_path.parent / "main-only" / "copy.db"
    copy.parent.mkdir(exist_ok=True)
    for stale in copy.parent.iterdir():
        stale.unlink()
    shutil.copyfile(db_path, copy)
    raw = sqlite3.connect(copy)
    try:
        if not raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'tasks'").fetchone():
            return False  # not even the schema is there yet
        found = raw.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    finally:
        raw.close()
    return found is not None


def test_the_wal_is_copied_back_in_the_background(store: Store, db_path: Path) -> None:
    store.write(full_batch())  # a few pages: far from SQLite's own checkpoint at 1,000
    deadline = time.monotonic() + 10
    while not _in_main_file(db_path, "t1"):
        assert time.monotonic() < deadline, "the WAL was never copied back"
        time.sleep(0.05)


def test_a_write_never_copies_the_wal_back_itself(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 3600.0)  # the thread stays asleep
    writer = open_store(url(db_path))
    try:
        for n in range(12):  # 12 MB: past 1,000 pages of 4 KB, where SQLite would copy
            writer.write(
                Batch(
                    tasks={f"big{n}": task_row(f"big{n}")},
                    results=[ResultRow(f"big{n}", 1, "cpu", "raw", bytes(1 << 20))],
                )
            )
        assert os.path.getsize(f"{db_path}-wal") > 8 << 20
        assert not _in_main_file(db_path, "big0")
    finally:
        writer.close()
    assert not any(t.name.startswith("checkpoint ") for t in threading.enumerate())
    assert not os.path.exists(f"{db_path}-wal")  # copied back at close
    assert _in_main_file(db_path, "big11")


def test_a_reader_sees_what_the_writer_wrote(store: Store, db_path: Path) -> None:
    store.write(full_batch())
    reader = open_store(url(db_path), readonly=True)
    try:
        assert reader.task("t1") == task_row("t1")
        assert len(reader.events("t1")) == 3
        store.write(Batch(tasks={"t1": task_row("t1", state="END")}))
        assert reader.task("t1") == task_row("t1", state="END")  # the writer's commit, now
        assert reader.counts() == {"END": 1, "FAILURE": 1}
    finally:
        reader.close()


def test_a_reader_cannot_write(store: Store, db_path: Path) -> None:
    store.write(full_batch())
    reader = open_store(url(db_path), readonly=True)
    try:
        with pytest.raises(StoreError):
            reader.write(Batch(tasks={"x": task_row("x")}))
    finally:
        reader.close()
    assert store.task("x") is None


def test_a_reader_of_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        open_store(url(tmp_path / "none.db"), readonly=True)
    assert not (tmp_path / "none.db").exists()


def test_reopening_the_file_keeps_everything(db_path: Path) -> None:
    first = open_store(url(db_path))
    first.write(full_batch())
    first.close()
    again = open_store(url(db_path))
    try:
        assert again.task("t1") == task_row("t1")
        assert len(again.events("t1")) == 3
        assert len(again.results("t1")) == 2
        assert again.dead_letter("t2") == dead_letter("t2")
        assert again.producers() == full_batch().producers
    finally:
        again.close()


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
def test_a_file_of_another_schema_version_is_refused(db_path: Path, readonly: bool) -> None:
    open_store(url(db_path)).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    raw.close()
    with pytest.raises(StoreError, match="schema version 3"):
        open_store(url(db_path), readonly=readonly).close()


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the tables you are looking for" * 100)
    with pytest.raises(StoreError, match=r"notes\.db"):
        open_store(url(path))


def test_an_unknown_store_url_is_refused() -> None:
    with pytest.raises(StoreError, match="sqlite:///PATH"):
        open_store("mysql://localhost/dsat")


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
CREATE TABLE events (
    task_id TEXT NOT NULL, tseq INTEGER NOT NULL, branch INTEGER NOT NULL,
    seq INTEGER NOT NULL, attempt INTEGER NOT NULL, event TEXT NOT NULL, step TEXT NOT NULL,
    at_satellite TEXT NOT NULL, wid TEXT NOT NULL, pid INTEGER NOT NULL, at REAL NOT NULL,
    detail BLOB, flag TEXT NOT NULL, PRIMARY KEY (task_id, tseq)
) WITHOUT ROWID;
"""


def schema_1_store(path: Path, events: list[EventRow]) -> None:
    """A store as the first schema kept it: a row per event."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(path)
    with raw:
        raw.executescript(SCHEMA_1)
        raw.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    *dataclasses.astuple(e)[:11],
                    msgpack.packb(e.detail) if e.detail else None,
                    e.flag,
                )
                for e in events
            ],
        )
    raw.close()


def test_a_schema_1_store_is_upgraded_with_every_event(db_path: Path) -> None:
    events = [
        event_row("t1", 1, "INIT", seq=0, step=""),
        event_row("t1", 2, "SEND", detail={"next": ["cpu"]}),
        event_row("t1", 3, "ACK", flag="duplicate"),
        event_row("t2", 1, "FAILURE", detail={"error": "boom", "result": b"\xff"}),
    ]
    schema_1_store(db_path, events)
    store = open_store(url(db_path))
    try:
        assert store.events("t1") == events[:3]
        assert store.events("t2") == events[3:]
        store.write(Batch(events=[event_row("t1", 4, "START")]))
        assert [e.event for e in store.events("t1", after=2)] == ["ACK", "START"]
    finally:
        store.close()
    raw = sqlite3.connect(db_path)
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    version = raw.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    raw.close()
    assert "events" not in tables
    assert version == ("2",)
    reader = open_store(url(db_path), readonly=True)
    try:
        assert reader.events("t1", after=3) == [event_row("t1", 4, "START")]
    finally:
        reader.close()


EARLY_TASKS = """
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, origin TEXT NOT NULL,
    state TEXT NOT NULL, step TEXT NOT NULL, attempt INTEGER NOT NULL, error TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, ended REAL, events INTEGER NOT NULL,
    anomalies INTEGER NOT NULL, duplicates INTEGER NOT NULL, deadline REAL NOT NULL
);
INSERT INTO tasks VALUES ('t1', 'job', 'local', 'ACK', 'cpu', 1, '', 100.0, 101.0, NULL,
                          3, 0, 0, 0.0);
"""


def test_an_early_schema_1_store_gains_the_columns_it_lacks(db_path: Path) -> None:
    # the first stores of schema 1 had no at_satellite column in their tasks table
    schema_1_store(db_path, [event_row("t1", 1, "INIT")])
    raw = sqlite3.connect(db_path)
    with raw:
        raw.executescript(EARLY_TASKS)
    raw.close()
    store = open_store(url(db_path))
    try:
        assert store.task("t1") == task_row("t1", state="ACK", events=3, at_satellite="")
        store.write(Batch(tasks={"t1": task_row("t1")}))
        assert store.task("t1") == task_row("t1")
        assert store.events("t1") == [event_row("t1", 1, "INIT")]
    finally:
        store.close()


def test_a_schema_1_store_opened_to_read_says_how_to_upgrade_it(db_path: Path) -> None:
    schema_1_store(db_path, [event_row("t1", 1, "INIT")])
    with pytest.raises(StoreError, match=r"schema version 1.*dsat run"):
        open_store(url(db_path), readonly=True)
    store = open_store(url(db_path))  # nothing was changed: the writer still upgrades it
    try:
        assert store.events("t1") == [event_row("t1", 1, "INIT")]
    finally:
        store.close()
