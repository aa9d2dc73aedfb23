"""The store's query of dead letters by job and step, paged (what `dsat retry --job` walks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dsat.store import Batch, DeadLetter, Store, open_store


def dead_letter(task_id: str, *, job_id: str = "job", step: str = "cpu") -> DeadLetter:
    return DeadLetter(task_id, job_id, "local", step, 1, 2, 3, "msgpack", b"\xc0", "E", 200.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'dsat.db'}")
    yield opened
    opened.close()


def test_dead_letters_are_listed_by_job_and_step_in_task_id_order(store: Store) -> None:
    letters = [
        dead_letter("t3", job_id="a", step="cpu"),
        dead_letter("t1", job_id="a", step="disk"),
        dead_letter("t2", job_id="b", step="cpu"),
        dead_letter("t4", job_id="a", step="cpu"),
    ]
    store.write(Batch(dead_letters=letters))
    assert store.dead_letter_ids() == ["t1", "t2", "t3", "t4"]
    assert store.dead_letter_ids(job_id="a") == ["t1", "t3", "t4"]
    assert store.dead_letter_ids(step="cpu") == ["t2", "t3", "t4"]
    assert store.dead_letter_ids(job_id="a", step="cpu") == ["t3", "t4"]
    assert store.dead_letter_ids(job_id="c") == []


def test_dead_letters_are_paged_after_a_task_id(store: Store) -> None:
    store.write(Batch(dead_letters=[dead_letter(f"t{n}") for n in range(5)]))
    assert store.dead_letter_ids(limit=2) == ["t0", "t1"]
    assert store.dead_letter_ids(after="t1", limit=2) == ["t2", "t3"]
    assert store.dead_letter_ids(after="t3", limit=2) == ["t4"]
    store.write(Batch(retried=["t2"]))  # sent again: no longer a dead letter
    assert store.dead_letter_ids(after="t1") == ["t3", "t4"]
