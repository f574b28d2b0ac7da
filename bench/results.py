"""The results file: versioned JSON with every raw sample, the settings and the
machine, written atomically so a reader never sees half a file.

Schema `minifs-bench` version 1, top level:
  schema, schema_version, partial, interrupted, errors, command, started_at,
  finished_at, wall_seconds, source (minifs version, git commit and whether the
  checkout was dirty), settings, machine, skipped (drivers that cannot
  run here, with the reason), drivers: {name: {driver, disk, phases_seconds,
  wall_seconds, errors, metrics: {latency|amplification|lookup|footprint:
  {status, definitions, ...raw samples and summaries...}}}}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SCHEMA = "minifs-bench"
SCHEMA_VERSION = 1


def new_document(settings: dict, machine: dict, source: dict, command: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "partial": False,
        "interrupted": False,
        "errors": [],
        "command": command,
        "started_at": _iso(time.time()),
        "finished_at": None,
        "wall_seconds": None,
        "source": source,
        "settings": settings,
        "machine": machine,
        "skipped": {},
        "drivers": {},
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def finish(doc: dict, wall_seconds: float) -> None:
    doc["finished_at"] = _iso(time.time())
    doc["wall_seconds"] = wall_seconds


DIRECTORY = Path("results")
"""Where results go by default, relative to the working directory (`make bench`
runs in the checkout, so reference runs land in its results/)."""


def default_path(label: str, when: float) -> Path:
    return DIRECTORY / f"{label}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}.json"


def save(doc: dict, path: Path) -> None:
    text = json.dumps(doc, indent=1, default=_jsonable) + "\n"
    if path.exists() and not path.is_file():
        path.write_text(text)  # /dev/stdout, a fifo: write through it, never replace it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in results")


def load(path: Path) -> dict:
    """Read a results file, refusing one of another schema or a newer version."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a minifs bench result")
    if doc.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {doc['schema_version']}; upgrade minifs")
    return doc
