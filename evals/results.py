"""The run directory: per-sample rows appended as they are produced, resumable, and files written atomically.

``DIR/config.json`` holds the resolved configuration of the run; a later run into the same directory must
resolve to the same configuration (``limit`` may differ), else :class:`IncompatibleRunError`.
``DIR/results.jsonl`` holds one JSON object per (configuration, sample); a row is written only when the
sample is finished, so an interrupted run loses at most the batch in flight, and rerunning skips what is
there (a truncated last line from a kill is dropped and redone).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

RESUMABLE_DIFFERENCES = ("limit",)


class IncompatibleRunError(ValueError):
    """The directory holds results of a different configuration."""


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (``nan``, ``inf``: a metric with nothing to measure) as ``None``,
    so that ``json.dumps`` writes standard JSON (``null``) that any parser reads, not ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class RunDirectory:
    """``rows_name``: the rows file (``results.jsonl``; each process of a data-parallel run keeps its own
    ``results.rank<N>.jsonl``, merged at the end). ``write_config``: whether this process writes
    ``config.json`` (every process checks it)."""

    def __init__(self, path: str | Path, config: dict[str, Any], rows_name: str = "results.jsonl",
                 write_config: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._check_config(write_config)
        self.rows_path = self.path / rows_name
        self.rows: list[dict[str, Any]] = self._read_rows()
        self.done = {(row["configuration"], row["sample"]) for row in self.rows}

    def _check_config(self, write: bool) -> None:
        path = self.path / "config.json"
        if path.exists():
            previous = json.loads(path.read_text())
            differing = sorted(key for key in set(previous) | set(self.config)
                               if key not in RESUMABLE_DIFFERENCES and previous.get(key) != self.config.get(key))
            if differing:
                raise IncompatibleRunError(
                    f"{self.path} holds a run with a different configuration (differs in {', '.join(differing)}); "
                    "use another --out directory, or rerun with the same settings to resume")
        if write:
            write_atomic(path, json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.rows_path.exists():
            return []
        rows, good = [], []
        for line in self.rows_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
                good.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: dropped, the sample is redone
        write_atomic(self.rows_path, "".join(line + "\n" for line in good))
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        with self.rows_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.extend(rows)
        self.done.update((row["configuration"], row["sample"]) for row in rows)


def merge_rows(path: Path, names: list[str], order: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    """Gather the rows of several files (a data-parallel run's ranks) into ``results.jsonl``, each
    (configuration, sample) once, in ``order``; returns them."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ["results.jsonl", *names]:
        file = path / name
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[(row["configuration"], row["sample"])] = row
    merged = sorted(rows.values(), key=lambda row: order.get((row["configuration"], row["sample"]), len(order)))
    write_atomic(path / "results.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in merged))
    return merged
