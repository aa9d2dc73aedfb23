"""``python -m bench``: run the benchmark suite, or one part of it, print a table, write JSON.

::

    python -m bench all [--runs 3] [--tasks N] [--json PATH] [--peers] [--million]
    python -m bench ceiling | dsat | celery | latency | sinks | tracker | memory | smoke

``dsat`` and ``latency`` run the pipeline as a user writes it first, each step a
pool of workers behind its queue; ``sinks`` runs both on the same pipeline with
each step a sink (its router runs the function), the kind docs/topology.md
advises for a function of a few microseconds.

Each timing figure is the median of ``--runs`` runs, shown with its min and max;
dsat's figures are also shown as ratios to the ceiling and to Celery measured
in the same command. Every result is checked; any mismatch (a wrong or missing
result, an anomaly in the store) makes the command exit with 1.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from bench import ceiling, pipeline, tracker
from bench.figures import Report, machine, machine_line
from bench.satellite import Satellite

if TYPE_CHECKING:
    from bench.peers import CeleryPeer

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "latest.json"
MB: Final = 2**20
PARTS: Final = ("ceiling", "dsat", "celery", "latency", "sinks", "tracker", "memory")


@dataclass
class Plan:
    """What one command runs, and how much of it."""

    parts: set[str]
    runs: int = 3
    ceiling_tasks: int = 100_000
    dsat_tasks: int = 20_000
    celery_tasks: int = 2_000
    tracker_tasks: int = 20_000  # 14 events each
    latency_tasks: int = 500
    pipeline_marks: tuple[int, ...] = (10_000, 100_000)
    tracker_marks: tuple[int, ...] = (10_000, 1_000_000)
    timed: bool = True  # False in the smoke test: correctness only
    failures: list[str] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def timed(report: Report, name: str) -> Iterator[None]:
    """Add the time spent in the block to a part's total."""
    started = time.monotonic()
    try:
        yield
    finally:
        report.part(name).seconds += time.monotonic() - started


def guarded(plan: Plan, name: str, action: Callable[[], None]) -> None:
    """Run one piece of a part; a failure is reported, counted, and the suite goes on."""
    try:
        action()
    except Exception as exc:  # the suite must report every part, whatever broke in one
        plan.failures.append(f"{name}: {exc}")
        say(f"bench: {name} failed: {exc}")
        traceback.print_exc()


# ---------------------------------------------------------------------------
# the parts, one run each


def run_ceiling(plan: Plan, report: Report, *, latency: bool, throughput: bool = True) -> None:
    part = report.part("ceiling")
    with timed(report, "ceiling"):
        if throughput:
            run = ceiling.throughput(plan.ceiling_tasks)
            part.checked += run.tasks
            part.mismatches += run.mismatches
            report.add("ceiling tasks/s", "tasks/s", run.per_second)
            report.add("ceiling CPU per task", "us", run.cpu_per_task)
            say(
                f"  ceiling: {run.per_second:,.0f} tasks/s, {run.mismatches} mismatches; "
                f"CPU per task {run.cpu_per_task:,.1f} us"
            )
        if latency:
            lat = ceiling.latency(plan.latency_tasks)
            part.checked += len(lat.samples)
            part.mismatches += lat.mismatches
            report.add("ceiling latency p50", "ms", lat.p50 * 1e3)
            report.add("ceiling latency p99", "ms", lat.p99 * 1e3)
            say(f"  ceiling latency: p50 {lat.p50 * 1e3:.3f} ms, p99 {lat.p99 * 1e3:.3f} ms")


def run_dsat(
    plan: Plan, report: Report, *, throughput: bool, latency: bool, kind: str = "pool"
) -> None:
    """The pipeline through ``dsat run``: each step a pool (figures "dsat ...") or a sink
    (figures "dsat sinks ...", part "sinks")."""
    name = "dsat" if kind == "pool" else "dsat sinks"
    part = report.part("dsat" if kind == "pool" else "sinks")

    def roles(cpu: dict[str, float]) -> dict[str, float]:
        if kind == "pool":
            return cpu
        # a sink's router runs the function: there are no workers, the "queues" are sinks
        return {("sinks" if r == "queues" else r): v for r, v in cpu.items() if r != "workers"}

    with timed(report, part.name), Satellite(kind=kind) as satellite:
        if throughput:
            run = pipeline.throughput(satellite, plan.dsat_tasks)
            part.checked += run.tasks
            part.mismatches += run.mismatches + run.anomalies
            report.add(
                f"{name} tasks/s",
                "tasks/s",
                run.per_second,
                vs_ceiling="ceiling tasks/s",
                vs_celery="celery tasks/s",
            )
            spent = roles(run.cpu_per_task)
            for role, micros in spent.items():
                vs = "ceiling CPU per task" if role == "total" else ""
                report.add(f"{name} CPU per task, {role}", "us", micros, vs_ceiling=vs)
            say(
                f"  {name}: {run.per_second:,.0f} tasks/s, {run.mismatches} mismatches, "
                f"{run.anomalies} anomalies; CPU per task (us): "
                + ", ".join(f"{role} {us:,.0f}" for role, us in spent.items())
            )
        if latency:
            lat = pipeline.latency(satellite, plan.latency_tasks)
            part.checked += len(lat.samples)
            part.mismatches += lat.mismatches
            for quantile, value in (("p50", lat.p50), ("p99", lat.p99)):
                report.add(
                    f"{name} latency {quantile}",
                    "ms",
                    value * 1e3,
                    vs_ceiling=f"ceiling latency {quantile}",
                    vs_celery=f"celery latency {quantile}",
                )
            spent = roles(lat.cpu_per_task)
            for role, micros in spent.items():
                report.add(f"{name} CPU per task, one in flight, {role}", "us", micros)
            say(
                f"  {name} latency: p50 {lat.p50 * 1e3:.2f} ms, p99 {lat.p99 * 1e3:.2f} ms; "
                "CPU per task (us): " + ", ".join(f"{role} {us:,.0f}" for role, us in spent.items())
            )


def run_tracker(plan: Plan, report: Report) -> None:
    part = report.part("tracker")
    with timed(report, "tracker"):
        run = tracker.throughput(plan.tracker_tasks)
        part.checked += run.tasks
        part.mismatches += run.mismatches + run.anomalies
        report.add("tracker events/s", "events/s", run.per_second)
        say(
            f"  tracker: {run.per_second:,.0f} events/s ({run.events} events), "
            f"{run.mismatches} tasks not HAPPY_END, {run.anomalies} anomalies"
        )


def run_memory(plan: Plan, report: Report) -> None:
    """Tracker alone up to the tracker marks; then the real pipeline up to the pipeline marks."""
    part = report.part("memory")

    def fed_tracker() -> None:
        with timed(report, "memory"):
            run = tracker.memory(list(plan.tracker_marks), progress=say)
        part.checked += plan.tracker_marks[-1]
        part.mismatches += run.mismatches + run.anomalies
        for tasks, rss, seconds in run.points:
            report.add(f"tracker RSS after {count_text(tasks)} tasks", "MB", rss / MB)
            part.notes.append(f"tracker fed {count_text(tasks)} tasks in {seconds:.0f} s")
        first, last = run.points[0], run.points[-1]
        report.add(
            f"tracker RSS {count_text(last[0])} / {count_text(first[0])}", "x", last[1] / first[1]
        )
        report.add(f"time to feed {count_text(last[0])} tasks", "s", last[2])

    def real_pipeline() -> None:
        with timed(report, "memory"), Satellite() as satellite:
            run = pipeline.memory(satellite, plan.pipeline_marks)
        part.checked += run.checked
        part.mismatches += run.mismatches + run.anomalies
        for point in run.points:
            count = count_text(point.tasks)
            report.add(f"pipeline s1.queue RSS after {count}", "MB", point.queues["s1.queue"] / MB)
            report.add(f"pipeline tracker RSS after {count}", "MB", point.tracker / MB)
            queues = ", ".join(f"{q} {v / MB:.1f}" for q, v in point.queues.items())
            part.notes.append(
                f"pipeline after {count} tasks: {queues}, tracker {point.tracker / MB:.1f} MB"
            )
            say(f"  pipeline after {count} tasks: {queues}, tracker {point.tracker / MB:.1f} MB")
        first, last = run.points[0], run.points[-1]
        marks = f"{count_text(last.tasks)} / {count_text(first.tasks)}"
        report.add(f"pipeline tracker RSS {marks}", "x", last.tracker / first.tracker)
        report.add(
            f"pipeline s1.queue RSS {marks}",
            "x",
            last.queues["s1.queue"] / first.queues["s1.queue"],
        )

    guarded(plan, "memory (tracker alone)", fed_tracker)
    guarded(plan, "memory (pipeline)", real_pipeline)


def run_celery(plan: Plan, report: Report, *, throughput: bool, latency: bool) -> None:
    from bench import peers

    part = report.part("celery")
    with timed(report, "celery"):
        reason = peers.unavailable()
    if reason:
        part.skipped = reason
        say(f"bench: Celery skipped: {reason}")
        return
    with timed(report, "celery"):
        peer = peers.CeleryPeer()
        try:
            peer.start()
            for number in range(plan.runs):
                say(f"celery run {number + 1}/{plan.runs}")
                try:
                    celery_run(plan, report, peer, throughput=throughput, latency=latency)
                except Exception as exc:  # Celery's own failure: count it, go on afresh
                    # a result that never reaches the waiting client leaves the app unusable
                    # ("The Celery application must be restarted"): the next run gets a new one
                    plan.failures.append(f"celery run {number + 1}: {exc}")
                    say(f"bench: celery run {number + 1} failed: {exc}; restarting Celery")
                    traceback.print_exc()
                    peer.close()
                    peer = peers.CeleryPeer()
                    peer.start()
        finally:
            peer.close()


def celery_run(
    plan: Plan, report: Report, peer: CeleryPeer, *, throughput: bool, latency: bool
) -> None:
    """One run of the Celery part; each figure goes to the report once it was measured."""
    from bench import peers

    part = report.part("celery")
    if throughput:
        run = peers.throughput(peer, plan.celery_tasks)
        part.checked += run.tasks
        part.mismatches += run.mismatches
        report.add("celery tasks/s", "tasks/s", run.per_second)
        say(f"  celery: {run.per_second:,.0f} tasks/s, {run.mismatches} mismatches")
    if latency:
        lat = peers.latency(peer, plan.latency_tasks)
        part.checked += len(lat.samples)
        part.mismatches += lat.mismatches
        report.add("celery latency p50", "ms", lat.p50 * 1e3)
        report.add("celery latency p99", "ms", lat.p99 * 1e3)
        say(f"  celery latency: p50 {lat.p50 * 1e3:.2f} ms, p99 {lat.p99 * 1e3:.2f} ms")


def count_text(count: int) -> str:
    """10000 -> "10k", 1000000 -> "1M"."""
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return str(count)


# ---------------------------------------------------------------------------
# commands


def execute(plan: Plan, report: Report, *, peers: bool) -> None:
    """Run the plan's parts: timing rounds first (one of each part per round), then memory."""
    parts = plan.parts
    throughput = bool(parts & {"ceiling", "dsat", "sinks"})
    latency = bool(parts & {"latency", "sinks"})
    for number in range(plan.runs):
        say(f"run {number + 1}/{plan.runs}")
        if throughput or latency:
            guarded(
                plan,
                "ceiling",
                lambda: run_ceiling(plan, report, latency=latency, throughput=throughput),
            )
        if "dsat" in parts or "latency" in parts:
            guarded(
                plan,
                "dsat",
                lambda: run_dsat(
                    plan, report, throughput="dsat" in parts, latency="latency" in parts
                ),
            )
        if "sinks" in parts:
            guarded(
                plan,
                "sinks",
                lambda: run_dsat(plan, report, throughput=True, latency=True, kind="sink"),
            )
        if "tracker" in parts:
            guarded(plan, "tracker", lambda: run_tracker(plan, report))
    if "celery" in parts or (peers and (throughput or latency)):
        celery_throughput = bool(parts & {"celery", "dsat", "sinks"})
        celery_latency = "celery" in parts or latency
        guarded(
            plan,
            "celery",
            lambda: run_celery(plan, report, throughput=celery_throughput, latency=celery_latency),
        )
    if "memory" in parts:
        say("memory")
        run_memory(plan, report)


def targets(report: Report) -> list[str]:
    """The project's targets, and whether this run met them."""
    figures = report.figures

    def median(name: str) -> float | None:
        figure = figures.get(name)
        return figure.median if figure and figure.runs else None

    dsat = figures.get("dsat tasks/s")
    vs_ceiling = report.ratio(dsat, "ceiling tasks/s") if dsat else None
    vs_celery = report.ratio(dsat, "celery tasks/s") if dsat else None
    sinks = figures.get("dsat sinks tasks/s")
    sinks_vs_ceiling = report.ratio(sinks, "ceiling tasks/s") if sinks else None
    sinks_vs_celery = report.ratio(sinks, "celery tasks/s") if sinks else None
    growth = next((n for n in figures if n.startswith("tracker RSS 1M")), "")
    # (what, the value measured, its unit, the limit, whether the value must reach or stay below)
    rows: list[tuple[str, float | None, str, float, bool]] = [
        ("dsat >= 0.5x the ceiling", vs_ceiling, "ratio", 0.5, True),
        ("dsat >= 100x Celery+Redis", vs_celery, "ratio", 100, True),
        ("dsat latency p50 <= 1 ms", median("dsat latency p50"), "ms", 1.0, False),
        ("dsat latency p99 <= 5 ms", median("dsat latency p99"), "ms", 5.0, False),
        ("tracker >= 200,000 events/s", median("tracker events/s"), "events/s", 200_000, True),
        ("tracker RSS after 1M tasks <= 1.2x after 10k", median(growth) if growth else None,
         "ratio", 1.2, False),
        # the same targets for the pipeline of sink steps, shown apart
        ("dsat sinks >= 0.5x the ceiling", sinks_vs_ceiling, "ratio", 0.5, True),
        ("dsat sinks >= 100x Celery+Redis", sinks_vs_celery, "ratio", 100, True),
        ("dsat sinks latency p50 <= 1 ms", median("dsat sinks latency p50"), "ms", 1.0, False),
        ("dsat sinks latency p99 <= 5 ms", median("dsat sinks latency p99"), "ms", 5.0, False),
    ]  # fmt: skip
    lines = []
    for text, value, unit, limit, at_least in rows:
        if value is None:
            continue
        met = value >= limit if at_least else value <= limit
        lines.append(f"{'met    ' if met else 'NOT met'}  {text}: {unit} {value:.3g}")
    return lines


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="dsat's benchmark suite: throughput and latency against raw pyzmq "
        "(the ceiling) and Celery+Redis, the tracker alone, memory.",
    )
    parser.add_argument(
        "part",
        choices=("all", *PARTS, "smoke"),
        help="all: every part (Celery with --peers); smoke: a few hundred tasks, correctness only",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument(
        "--tasks",
        type=int,
        help="tasks per run for every part run (defaults: ceiling 100000, dsat 20000, "
        "celery 2000, tracker 20000)",
    )
    parser.add_argument("--latency-tasks", type=int, default=500, help="default 500")
    parser.add_argument(
        "--json",
        type=Path,
        help=f"where to write every run's values (default {DEFAULT_JSON}; smoke: none)",
    )
    parser.add_argument("--peers", action="store_true", help="measure Celery+Redis too")
    parser.add_argument(
        "--million",
        action="store_true",
        help="memory: take the tracker alone and the pipeline to 1,000,000 tasks "
        "(default: 100,000; about 20 minutes more)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or (args.tasks is not None and args.tasks < 1) or args.latency_tasks < 1:
        parser.error("--runs, --tasks and --latency-tasks must be at least 1")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    if args.part == "smoke":
        return Plan(
            parts={"ceiling", "dsat", "latency", "sinks", "tracker"},
            runs=1,
            ceiling_tasks=300,
            dsat_tasks=300,
            tracker_tasks=300,  # 4,200 events
            latency_tasks=20,
            timed=False,
        )
    parts = set(PARTS) - {"celery"} if args.part == "all" else {args.part}
    if args.part == "all" and args.peers:
        parts.add("celery")
    plan = Plan(parts=parts, runs=args.runs, latency_tasks=args.latency_tasks)
    if args.tasks is not None:
        plan.ceiling_tasks = plan.dsat_tasks = plan.celery_tasks = args.tasks
        plan.tracker_tasks = args.tasks
    if args.million:
        plan.pipeline_marks = (10_000, 1_000_000)
    else:
        plan.tracker_marks = (10_000, 100_000)
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    plan = plan_of(args)
    info = machine()
    say(machine_line(info))
    report = Report()
    started = time.monotonic()
    execute(plan, report, peers=args.peers)
    elapsed = time.monotonic() - started
    say("")
    if plan.timed:
        say(report.table())
        say("")
        lines = targets(report)
        if lines:
            say("targets:")
            for line in lines:
                say(f"  {line}")
            say("")
    say(report.summary())
    say(f"total {elapsed:.0f} s")
    path = args.json or (None if args.part == "smoke" else DEFAULT_JSON)
    if path is not None:
        config = {
            "command": args.part,
            "runs": plan.runs,
            "ceiling_tasks": plan.ceiling_tasks,
            "dsat_tasks": plan.dsat_tasks,
            "celery_tasks": plan.celery_tasks,
            "tracker_tasks": plan.tracker_tasks,
            "latency_tasks": plan.latency_tasks,
            "pipeline_marks": list(plan.pipeline_marks),
            "tracker_marks": list(plan.tracker_marks),
            "seconds": elapsed,
            "failures": plan.failures,
        }
        report.write_json(path, info, config)
        say(f"wrote {path}")
    for failure in plan.failures:
        say(f"FAILED {failure}")
    return 1 if plan.failures or report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
