"""The benchmark's table: every row in the same columns, however long a figure's name."""

from __future__ import annotations

from bench.cli import targets
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


def test_targets_judge_the_pools_and_show_the_sinks_apart() -> None:
    report = Report()
    report.add("ceiling tasks/s", "tasks/s", 100_000.0)
    report.add("celery tasks/s", "tasks/s", 20.0)
    report.add("dsat tasks/s", "tasks/s", 1_500.0)
    report.add("dsat latency p99", "ms", 6.2)
    report.add("dsat sinks tasks/s", "tasks/s", 3_000.0)
    report.add("dsat sinks latency p50", "ms", 2.9)
    report.add("dsat sinks latency p99", "ms", 4.6)
    assert targets(report) == [
        "NOT met  dsat >= 0.5x the ceiling: ratio 0.015",
        "NOT met  dsat >= 100x Celery+Redis: ratio 75",
        "NOT met  dsat latency p99 <= 5 ms: ms 6.2",
        "NOT met  dsat sinks >= 0.5x the ceiling: ratio 0.03",
        "met      dsat sinks >= 100x Celery+Redis: ratio 150",
        "NOT met  dsat sinks latency p50 <= 1 ms: ms 2.9",
        "met      dsat sinks latency p99 <= 5 ms: ms 4.6",
    ]


def test_targets_leave_out_what_was_not_measured() -> None:
    report = Report()
    report.add("tracker events/s", "events/s", 250_000.0)
    assert targets(report) == ["met      tracker >= 200,000 events/s: events/s 2.5e+05"]
