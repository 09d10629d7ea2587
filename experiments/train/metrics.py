"""Metrics as JSON lines: one record per line, appended and flushed as training goes.

A resumed run first drops the records its replay will write again (those of the same run
after the restored step), so the file reads as if the run had never been interrupted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _matches(record: Mapping[str, Any], tags: Mapping[str, Any]) -> bool:
    return all(record.get(key) == value for key, value in tags.items())


def _parse_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Parses JSON lines; a torn last line (a process killed mid-write) is dropped."""
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def _read_lines(path: Path) -> list[str]:
    with path.open() as f:
        return [line for line in f if line.strip()]


def read_metrics(path: str | os.PathLike, **tags: Any) -> list[dict[str, Any]]:
    """All records of ``path`` (in order) whose fields equal ``tags``; [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in _parse_lines(_read_lines(path)) if _matches(r, tags)]


class MetricsWriter:
    """Appends tagged records to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike, **tags: Any):
        self.path = Path(path)
        self.tags = tags
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({**self.tags, **record}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops this writer's records after ``step``, and its final record (atomic rewrite).

        A resumed run replays the steps after its checkpoint and writes its final record
        again, so both go before it starts.
        """
        if not self.path.exists():
            return
        lines = _read_lines(self.path)
        records = _parse_lines(lines)
        keep = [
            json.dumps(r) + "\n"
            for r in records
            if not (_matches(r, self.tags) and (r.get("step", 0) > step or r.get("final", False)))
        ]
        if len(keep) == len(lines) and lines[-1].endswith("\n"):
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics-")
        with os.fdopen(fd, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
