"""Count the words of every text file in a folder with the word-count satellite.

    python examples/wordcount/count.py examples/wordcount/texts

It submits one task per file (all in one job), waits for every result, merges
the counts and prints the most frequent words. The satellite must be running:
``dsat run examples/wordcount/topology.toml``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import dsat

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder of .txt files")
    parser.add_argument("--top", type=int, default=10, help="how many words to print")
    args = parser.parse_args()
    files = sorted(
        os.path.abspath(os.path.join(args.folder, name))
        for name in os.listdir(args.folder)
        if name.endswith(".txt")
    )
    if not files:
        print(f"no .txt file in {args.folder}", file=sys.stderr)
        return 1
    job = f"wordcount-{int(time.time())}"
    with dsat.connect(os.path.join(HERE, "topology.toml")) as client:
        task_ids = client.submit_many("read", [{"path": path} for path in files], job_id=job)
        print(f"submitted {len(task_ids)} files as job {job}")
        totals: Counter[str] = Counter()
        for path, task_id in zip(files, task_ids, strict=True):
            try:
                result = client.wait(task_id, timeout=60)
            except dsat.TaskFailedError as exc:
                print(f"  {os.path.basename(path)}: FAILED: {exc.state.error}")
                continue
            totals.update(result["counts"])
            state = client.state(task_id)
            print(
                f"  {os.path.basename(path):24} {result['words']:6} words "
                f"{result['distinct']:5} distinct   {state.state} in {len(state.history)} events"
            )
        done = client.tasks(job_id=job, limit=len(files))
        ended = sum(1 for t in done if t.state == "HAPPY_END")
    print(f"{ended}/{len(files)} tasks HAPPY_END; {sum(totals.values())} words in all")
    for word, n in totals.most_common(args.top):
        print(f"  {n:6}  {word}")
    return 0 if ended == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
