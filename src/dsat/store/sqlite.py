"""The SQLite status store: one file, WAL mode, one writer (the tracker), many readers."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import msgpack

from dsat.message import packb
from dsat.store import Batch, DeadLetter, EventRow, ResultRow, StoreError, TaskRow

log = logging.getLogger("dsat.store")

SCHEMA_VERSION: Final = 2
# The WAL is copied back into the database file by a thread of the writer's process
# (_Checkpointer), at most this long after a write, instead of inside the write that
# fills it past 1,000 pages (SQLite's default): there it stalled the tracker 4 to 5 ms
# (most of it waiting on fsync) every 0.3 s at light load, and the tasks that ended then
# waited as long (docs/performance.md, "The WAL copied back off the tracker's path").
CHECKPOINT_EVERY: Final = 0.2
# Should the thread fall behind (or die), a write still copies it back past this size.
FALLBACK_CHECKPOINT_PAGES: Final = 20_000
# schema 1 kept a row per event (table ``events``); a store of it is upgraded when the
# tracker opens it (_upgrade_from_1), nothing lost

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    ended REAL,
    events INTEGER NOT NULL,
    anomalies INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    deadline REAL NOT NULL,
    at_satellite TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks (job_id, created);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, updated);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks (ended) WHERE ended IS NULL;
-- A task's events, a chunk per tracker cycle that saw some: one row per event cost
-- a B-tree entry and 13 bound values each, most of the tracker's write (see
-- docs/performance.md). ``events``: a msgpack array of [tseq, branch, seq, attempt,
-- event, step, at_satellite, wid, pid, at, detail map or nil, flag], in tseq order.
CREATE TABLE IF NOT EXISTS history (
    task_id TEXT NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    events BLOB NOT NULL,
    PRIMARY KEY (task_id, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT NOT NULL,
    branch INTEGER NOT NULL,
    step TEXT NOT NULL,
    serialization TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (task_id, branch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    task_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    step TEXT NOT NULL,
    branch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    serialization TEXT NOT NULL,
    payload BLOB NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS relay (
    dest TEXT NOT NULL,
    eseq INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (dest, eseq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS relay_marks (
    dest TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    next_eseq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producers (
    producer TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    eseq INTEGER NOT NULL
) WITHOUT ROWID;
"""

_TASK_COLUMNS: Final = (
    "task_id, job_id, origin, state, step, attempt, error, created, updated, ended, events, "
    "anomalies, duplicates, deadline, at_satellite"
)
_TSEQ, _FLAG = 0, 11  # positions in a history entry
_BY_TSEQ: Final = operator.itemgetter(_TSEQ)
_LATE_COLUMNS: Final = {"at_satellite": "at_satellite TEXT NOT NULL DEFAULT ''"}

# An upsert, not INSERT OR REPLACE: REPLACE deletes the row and inserts it again,
# rewriting every index entry; this rewrites only the columns that change (a task
# is written several times in its life, its job_id never changes).
_UPSERT_TASK: Final = (
    f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}"
        for name in _TASK_COLUMNS.replace(" ", "").split(",")
        if name not in ("task_id", "job_id")
    )
)


class SqliteStore:
    """The default store: a SQLite file in WAL mode, one transaction per batch."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                if not os.path.exists(path):
                    raise StoreError(f"store {path}: no such file")
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10
                )
                self._check_version(create=False)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self._db = sqlite3.connect(path, isolation_level=None, timeout=10)
                # WAL: readers never block the writer; NORMAL: no fsync per commit, the
                # WAL is synced at checkpoints (a power cut may lose the last commits).
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_CHECKPOINT_PAGES}")
                self._db.executescript(_SCHEMA)
                self._check_version()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        self._checkpointer = None if readonly else _Checkpointer(path)
        if self._checkpointer is not None:
            self._checkpointer.start()

    def _check_version(self, *, create: bool = True) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: not a dsat store ({exc})") from exc
        if row is None and not create:
            raise StoreError(f"store {self.path}: not a dsat store (no schema version)")
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] == "1" and create:
            self._upgrade_from_1()
        elif row[0] == "1":
            raise StoreError(
                f"store {self.path}: schema version 1, this dsat reads {SCHEMA_VERSION}; "
                "start its tracker once (dsat run) to upgrade it"
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path}: schema version {row[0]}, this dsat needs {SCHEMA_VERSION}"
            )

    def _upgrade_from_1(self) -> None:
        """Schema 1 -> 2: each task's event rows become one history chunk, in one transaction."""
        db = self._db
        try:
            db.execute("BEGIN")
            rows = db.execute(
                "SELECT task_id, tseq, branch, seq, attempt, event, step, at_satellite, wid, "
                "pid, at, detail, flag FROM events ORDER BY task_id, tseq"
            )
            chunks: list[tuple[str, int, int, bytes]] = []
            entries: list[list[Any]] = []
            current = ""
            for task_id, *entry in rows:
                if task_id != current and entries:
                    chunks.append(_chunk(current, entries))
                    entries = []
                current = task_id
                entry[10] = msgpack.unpackb(entry[10], raw=False) if entry[10] else None
                entries.append(entry)
                if len(chunks) >= 1000:
                    db.executemany(_INSERT_CHUNK, chunks)
                    chunks.clear()
            if entries:
                chunks.append(_chunk(current, entries))
            db.executemany(_INSERT_CHUNK, chunks)
            db.execute("DROP TABLE events")
            self._add_missing_columns()
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except (sqlite3.Error, ValueError, TypeError, msgpack.UnpackException) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"store {self.path}: could not upgrade schema 1 to 2: {exc}") from exc

    def _add_missing_columns(self) -> None:
        """Columns schema 1 gained without a new version (a store of an early 1 lacks them)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for column, sql in _LATE_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {sql}")

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        try:
            yield self._db
        except (sqlite3.Error, OverflowError) as exc:  # OverflowError: an int SQLite can't hold
            raise StoreError(f"store {self.path}: cannot read {what}: {exc}") from exc

    # -- writing

    def write(self, batch: Batch) -> None:
        """Write a batch in one transaction: all of it lands, or none."""
        if not batch:
            return
        try:
            # every value encoded before the transaction begins: a bad one fails alone
            chunks = _chunks(batch.events)
            tasks = [t if isinstance(t, tuple) else _task_params(t) for t in batch.tasks.values()]
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"store {self.path}: could not write {len(batch.events)} events: "
                f"cannot encode: {exc}"
            ) from exc
        db = self._db
        try:
            db.execute("BEGIN")
            if chunks:
                db.executemany(_INSERT_CHUNK, chunks)
            if tasks:
                db.executemany(_UPSERT_TASK, tasks)
            if batch.results:
                db.executemany(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                    [(r.task_id, r.branch, r.step, r.serialization, r.data) for r in batch.results],
                )
            if batch.retried:
                db.executemany(
                    "DELETE FROM dead_letters WHERE task_id = ?", [(t,) for t in batch.retried]
                )
            if batch.dead_letters:
                db.executemany(
                    "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            d.task_id,
                            d.job_id,
                            d.origin,
                            d.step,
                            d.branch,
                            d.seq,
                            d.attempt,
                            d.serialization,
                            d.payload,
                            d.error,
                            d.at,
                        )
                        for d in batch.dead_letters
                    ],
                )
            for task_id, tseq, flag in batch.flags:
                self._flag(task_id, tseq, flag)
            if batch.relay:
                db.executemany("INSERT OR REPLACE INTO relay VALUES (?, ?, ?)", batch.relay)
            if batch.relay_marks:
                db.executemany(
                    "INSERT OR REPLACE INTO relay_marks VALUES (?, ?, ?)",
                    [(dest, epoch, nxt) for dest, (epoch, nxt) in batch.relay_marks.items()],
                )
            if batch.relay_confirmed:
                db.executemany(
                    "DELETE FROM relay WHERE dest = ? AND eseq <= ?",
                    list(batch.relay_confirmed.items()),
                )
            if batch.producers:
                db.executemany(
                    "INSERT OR REPLACE INTO producers VALUES (?, ?, ?)",
                    [(name, epoch, eseq) for name, (epoch, eseq) in batch.producers.items()],
                )
            db.execute("COMMIT")
        except (sqlite3.Error, TypeError, ValueError, OverflowError) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(
                f"store {self.path}: could not write {len(batch.events)} events: {exc}"
            ) from exc

    def _flag(self, task_id: str, tseq: int, flag: str) -> None:
        """Mark an event already written (rare: an anomaly found later)."""
        found = self._db.execute(
            "SELECT first, events FROM history WHERE task_id = ? AND first <= ? AND last >= ?",
            (task_id, tseq, tseq),
        ).fetchone()
        if found is None:
            return
        first, data = found
        entries = msgpack.unpackb(data, raw=False, strict_map_key=False)
        for entry in entries:
            if entry[_TSEQ] == tseq:
                entry[_FLAG] = flag
        self._db.execute(
            "UPDATE history SET events = ? WHERE task_id = ? AND first = ?",
            (packb(entries), task_id, first),
        )

    # -- reading

    def producers(self) -> dict[str, tuple[int, int]]:
        with self._reading("producers") as db:
            rows = db.execute("SELECT producer, epoch, eseq FROM producers").fetchall()
        return {name: (epoch, eseq) for name, epoch, eseq in rows}

    def live_tasks(self) -> list[TaskRow]:
        with self._reading("live tasks") as db:
            rows = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE ended IS NULL").fetchall()
        return [TaskRow(*row) for row in rows]

    def task(self, task_id: str) -> TaskRow | None:
        with self._reading(f"task {task_id}") as db:
            row = db.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
        return TaskRow(*row) if row else None

    def known(self, task_ids: set[str]) -> set[str]:
        found: set[str] = set()
        ids = list(task_ids)
        with self._reading("task ids") as db:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = db.execute(f"SELECT task_id FROM tasks WHERE task_id IN ({marks})", chunk)
                found.update(row[0] for row in rows)
        return found

    def events(self, task_id: str, after: int = 0) -> list[EventRow]:
        with self._reading(f"events of {task_id}") as db:
            chunks = db.execute(
                "SELECT events FROM history WHERE task_id = ? AND last > ? ORDER BY first",
                (task_id, after),
            ).fetchall()
        try:
            found = [
                _event_row(task_id, entry)
                for (data,) in chunks
                for entry in msgpack.unpackb(data, raw=False, strict_map_key=False)
                if entry[_TSEQ] > after
            ]
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
            raise StoreError(
                f"store {self.path}: events of {task_id}: bad history ({exc})"
            ) from exc
        found.sort(key=lambda e: e.tseq)
        return found

    def tasks(
        self,
        *,
        job_id: str | None = None,
        step: str | None = None,
        state: str | None = None,
        live: bool | None = None,
        stale_before: float | None = None,
        limit: int = 100,
    ) -> list[TaskRow]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("job_id", job_id), ("step", step), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if live is not None:
            where.append("ended IS NULL" if live else "ended IS NOT NULL")
        if stale_before is not None:
            where.append("ended IS NULL AND updated < ?")
            params.append(stale_before)
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        params.append(max(0, int(limit)))
        with self._reading("tasks") as db:
            rows = db.execute(sql, params).fetchall()
        return [TaskRow(*row) for row in rows]

    def results(self, task_id: str) -> list[ResultRow]:
        with self._reading(f"results of {task_id}") as db:
            rows = db.execute(
                "SELECT task_id, branch, step, serialization, data FROM results "
                "WHERE task_id = ? ORDER BY branch",
                (task_id,),
            ).fetchall()
        return [ResultRow(t, b, s, z, bytes(d)) for t, b, s, z, d in rows]

    def relay_pending(self) -> dict[str, list[tuple[int, bytes]]]:
        with self._reading("relayed events") as db:
            rows = db.execute("SELECT dest, eseq, record FROM relay ORDER BY dest, eseq").fetchall()
        pending: dict[str, list[tuple[int, bytes]]] = {}
        for dest, eseq, record in rows:
            pending.setdefault(dest, []).append((eseq, bytes(record)))
        return pending

    def relay_marks(self) -> dict[str, tuple[int, int]]:
        with self._reading("relay marks") as db:
            rows = db.execute("SELECT dest, epoch, next_eseq FROM relay_marks").fetchall()
        return {dest: (epoch, nxt) for dest, epoch, nxt in rows}

    def dead_letter(self, task_id: str) -> DeadLetter | None:
        with self._reading(f"dead letter {task_id}") as db:
            row = db.execute("SELECT * FROM dead_letters WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        values = list(row)
        values[8] = bytes(values[8])
        return DeadLetter(*values)

    def dead_letter_ids(
        self,
        *,
        job_id: str | None = None,
        step: str | None = None,
        after: str = "",
        limit: int = 1000,
    ) -> list[str]:
        where = ["task_id > ?"]
        params: list[Any] = [after]
        for column, value in (("job_id", job_id), ("step", step)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        params.append(max(0, int(limit)))
        with self._reading("dead letters") as db:
            rows = db.execute(
                f"SELECT task_id FROM dead_letters WHERE {' AND '.join(where)} "
                "ORDER BY task_id LIMIT ?",
                params,
            ).fetchall()
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        with self._reading("counts") as db:
            rows = db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def prune(self, ended_before: float) -> int:
        db = self._db
        try:
            db.execute("BEGIN")
            ended = [
                row[0]
                for row in db.execute(
                    "SELECT task_id FROM tasks WHERE ended IS NOT NULL AND ended < ?",
                    (ended_before,),
                )
            ]
            for table in ("history", "results", "tasks"):
                db.executemany(f"DELETE FROM {table} WHERE task_id = ?", [(t,) for t in ended])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"store {self.path}: could not prune: {exc}") from exc
        return len(ended)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        try:
            self._db.close()  # the last connection out copies the WAL back and removes it
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: could not close: {exc}") from exc


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file, off the writer's path.

    Its own connection runs a PASSIVE checkpoint (it neither waits for the writer nor
    blocks it: the writer appends to the WAL meanwhile) every CHECKPOINT_EVERY seconds
    when the WAL changed. ``sqlite3`` lets go of the GIL while SQLite works, so the
    writer's thread runs on; the WAL starts over from its beginning at the first write
    after a checkpoint that copied all of it.
    """

    def __init__(self, path: str) -> None:
        super().__init__(name=f"checkpoint {os.path.basename(path)}", daemon=True)
        self.path = path
        self.wal = f"{path}-wal"
        self.stopping = threading.Event()

    def run(self) -> None:
        db: sqlite3.Connection | None = None
        seen: tuple[int, int] | None = None
        failing = ""  # the error of the last try, logged once until it changes
        while not self.stopping.wait(CHECKPOINT_EVERY):
            try:
                stat = os.stat(self.wal)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failing = _once(self.path, failing, f"cannot look at the WAL: {exc}")
                continue
            mark = (stat.st_size, stat.st_mtime_ns)
            if mark == seen:
                continue  # nothing written since the last checkpoint
            try:
                if db is None:
                    db = sqlite3.connect(self.path, isolation_level=None, timeout=1)
                    db.execute("PRAGMA synchronous=NORMAL")  # the WAL synced per checkpoint
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # a full disk, a lock held long: try again at the next turn, on a new
                # connection (the writer's own checkpoints cover for us meanwhile)
                failing = _once(self.path, failing, f"background checkpoint failed: {exc}")
                if db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        db.close()
                    db = None
                continue
            seen = mark
            if failing:
                log.warning("store %s: background checkpoints work again", self.path)
                failing = ""
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def _once(path: str, last: str, error: str) -> str:
    """Log an error of the checkpoint thread when it is not the one logged last."""
    if error != last:
        log.warning("store %s: %s", path, error)
    return error


def _task_params(t: TaskRow) -> tuple[Any, ...]:
    return (
        t.task_id,
        t.job_id,
        t.origin,
        t.state,
        t.step,
        t.attempt,
        t.error,
        t.created,
        t.updated,
        t.ended,
        t.events,
        t.anomalies,
        t.duplicates,
        t.deadline,
        t.at_satellite,
    )


_INSERT_CHUNK: Final = "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)"


def _chunks(events: list[EventRow | tuple[Any, ...]]) -> list[tuple[str, int, int, bytes]]:
    """A batch's events as history chunks: one per task, its events in tseq order."""
    by_task: dict[str, list[Any]] = {}
    for event in events:
        if not isinstance(event, tuple):
            event = _event_params(event)
        entries = by_task.get(event[0])
        if entries is None:
            by_task[event[0]] = [event[1:]]
        else:
            entries.append(event[1:])
    return [_chunk(task_id, entries) for task_id, entries in by_task.items()]


def _chunk(task_id: str, entries: list[Any]) -> tuple[str, int, int, bytes]:
    if len(entries) > 1:
        entries.sort(key=_BY_TSEQ)
    return (task_id, entries[0][_TSEQ], entries[-1][_TSEQ], packb(entries))


def _event_params(e: EventRow) -> tuple[Any, ...]:
    """An EventRow as the tracker's fast path gives its events (the tracker checked those)."""
    ints = (e.tseq, e.branch, e.seq, e.attempt, e.pid)
    texts = (e.task_id, e.event, e.step, e.where, e.wid, e.flag)
    if not all(type(v) is int for v in ints) or not all(type(v) is str for v in texts):
        raise TypeError(f"event {e.task_id!r:.40}/{e.tseq!r:.20}: a field of the wrong type")
    if type(e.at) not in (float, int) or not isinstance(e.detail, dict):
        raise TypeError(f"event {e.task_id!r:.40}/{e.tseq!r:.20}: a field of the wrong type")
    return (
        e.task_id,
        e.tseq,
        e.branch,
        e.seq,
        e.attempt,
        e.event,
        e.step,
        e.where,
        e.wid,
        e.pid,
        e.at,
        e.detail or None,
        e.flag,
    )


def _event_row(task_id: str, entry: list[Any]) -> EventRow:
    tseq, branch, seq, attempt, event, step, where, wid, pid, at, detail, flag = entry
    return EventRow(
        task_id, tseq, branch, seq, attempt, event, step, where, wid, pid, at, detail or {}, flag
    )
