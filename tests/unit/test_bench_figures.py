"""The benchmark's table: every row in the same columns, however long a figure's name."""

from __future__ import annotations

from bench.figures import Report


def test_the_table_widens_its_name_column_for_the_longest_name() -> None:
    report = Report()
    report.add("ceiling tasks/s", "tasks/s", 70_000.0)
    report.add("dsat tasks/s", "tasks/s", 2_000.0, vs_ceiling="ceiling tasks/s")
    report.add("dsat CPU per task, one in flight, orchester", "us", 760.0)
    rows = report.table().splitlines()
    assert len(rows) == 5  # the head, its rule, three figures
    assert len({len(row) for row in rows}) == 1, rows
    assert rows[4].startswith("dsat CPU per task, one in flight, orchester (us)  ")
    assert rows[3].split()[-1] == "0.029x"  # the ratio still in its column


def test_short_names_keep_the_usual_width() -> None:
    report = Report()
    report.add("dsat tasks/s", "tasks/s", 2_000.0)
    head = report.table().splitlines()[0]
    assert head.startswith("figure" + " " * 28 + " ")
