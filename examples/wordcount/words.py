"""The word count's steps: read a file, count its words, merge the counts per job."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import dsat

WORD = re.compile(r"[a-z']+")


def read(job: dict[str, Any]) -> dict[str, Any]:
    """A file's words, lower-cased."""
    with open(job["path"], encoding="utf-8") as file:
        text = file.read()
    return {"path": job["path"], "words": WORD.findall(text.lower())}


def count(document: dict[str, Any]) -> dict[str, Any]:
    """How many times each word appears in one file."""
    return {"path": document["path"], "counts": dict(Counter(document["words"]))}


def merge(counted: dict[str, Any], task: dsat.Task) -> dict[str, Any]:
    """Add one file's counts to its job's totals (a sink: one process, so no race)."""
    directory = task.options.get("totals_dir", "totals")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{task.job_id}.json")
    totals: Counter[str] = Counter()
    if os.path.exists(path):
        with open(path) as file:
            totals.update(json.load(file))
    totals.update(counted["counts"])
    with open(path + ".new", "w") as file:
        json.dump(totals, file)
    os.replace(path + ".new", path)
    return {
        "path": counted["path"],
        "words": sum(counted["counts"].values()),
        "distinct": len(counted["counts"]),
        "counts": counted["counts"],
    }
