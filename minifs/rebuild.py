"""Rebuild a lost or damaged metadata store from what the drivers hold.

The store writes every row a second time, as a JSON record in its driver's
home (`<home>/records/<id>/`), and image names beside the blobs
(`content/names.json`). `minifs check --rebuild` reads those back, keeps the
rows whose backend object still exists, and writes a new store that takes the
old one's id (so the homes stay its own). The damaged store is moved aside,
never deleted: it may still be worth a look.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from minifs.errors import MinifsError, StateDirError
from minifs.plugins import get_driver
from minifs.state import StateDir
from minifs.store import (
    IMAGE_NAMES_FILE,
    RECORD_FIELDS,
    RECORDS_DIR,
    STORE_ID_FILE,
    Store,
    read_record,
)


@dataclass
class RebuildReport:
    restored: dict[str, int] = field(default_factory=dict)
    """Rows restored per driver."""
    skipped: list[str] = field(default_factory=list)
    """Records left out, with why."""
    images: int = 0
    moved_aside: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "restored": self.restored,
            "skipped": self.skipped,
            "images": self.images,
            "moved_aside": self.moved_aside,
        }


def rebuild(root: str | os.PathLike[str] | None) -> RebuildReport:
    """Write a new metadata store from the drivers' records; see the module doc."""
    state = StateDir(root)
    if not state.drivers_dir.is_dir():
        raise StateDirError(f"{state.root} has no driver homes; there is nothing to rebuild from")
    report = RebuildReport()
    with state.locked():
        homes = sorted(h for h in state.drivers_dir.iterdir() if h.is_dir())
        store_id = _one_owner(homes)
        rows: list[dict] = []
        for home in homes:
            rows += _rows_of(home, report)
        partial = state.root / f".metadata.db.rebuild-{os.getpid()}"
        for leftover in _db_files(partial):
            leftover.unlink(missing_ok=True)
        try:
            fresh = Store(state, path=partial)
            try:
                fresh.adopt_id(store_id)
                fresh.restore(_parents_first(rows, report))
                images = _image_names(state)
                fresh.restore_images(images)
                report.images = len(images)
            finally:
                fresh.close()
            report.moved_aside = _move_aside(state.db_path)
            os.replace(partial, state.db_path)
        finally:
            for leftover in _db_files(partial):
                leftover.unlink(missing_ok=True)
    for row in rows:
        report.restored[row["driver"]] = report.restored.get(row["driver"], 0) + 1
    return report


def _one_owner(homes: list[Path]) -> str:
    """The store id every home carries; homes of two stores cannot be one store."""
    owners = {}
    for home in homes:
        try:
            owners[home.name] = (home / STORE_ID_FILE).read_text().strip()
        except FileNotFoundError:
            continue
    if len(set(owners.values())) > 1:
        raise StateDirError(
            "the driver homes belong to different stores ("
            + ", ".join(f"{h}: {o[:12]}" for h, o in sorted(owners.items()))
            + "); move the ones that do not belong here aside, then rebuild again"
        )
    if not owners:
        raise StateDirError(
            "no driver home carries a store id: they were made before minifs kept "
            "records, so there is nothing to rebuild from; restore metadata.db from a backup"
        )
    return next(iter(owners.values()))


def _rows_of(home: Path, report: RebuildReport) -> list[dict]:
    """The records of one home whose backend object still exists."""
    try:
        names = sorted(os.listdir(home / RECORDS_DIR))
    except FileNotFoundError:
        return []
    try:
        driver = get_driver(home.name)(home)
        driver.start()
        present = driver.ids()
    except (MinifsError, OSError) as exc:
        report.skipped.append(f"{home.name}: every record (the driver cannot start: {exc})")
        return []
    rows = []
    for sid in names:
        row = read_record(home / RECORDS_DIR / sid)
        if row is None or set(row) != set(RECORD_FIELDS) or row["driver"] != home.name:
            report.skipped.append(f"{home.name} record {sid}: unreadable")
            continue
        if row["id"] not in present:
            report.skipped.append(f"{home.name} {row['kind']} {row['name']}: object is gone")
            continue
        rows.append(row)
    return rows


def _parents_first(rows: list[dict], report: RebuildReport) -> list[dict]:
    """Rows ordered so every parent comes before its children; a row whose
    parent is not there cannot be restored (its chain would be wrong)."""
    by_id = {row["id"]: row for row in rows}
    ordered: list[dict] = []
    placed: set[str] = set()

    def place(row: dict, depth: int = 0) -> bool:
        if row["id"] in placed:
            return True
        parent = row["parent_id"]
        if parent is not None and (
            parent not in by_id or depth > len(by_id) or not place(by_id[parent], depth + 1)
        ):
            return False
        ordered.append(row)
        placed.add(row["id"])
        return True

    for row in sorted(rows, key=lambda r: r["created"]):
        if not place(row):
            report.skipped.append(
                f"{row['driver']} {row['kind']} {row['name']}: its parent's record is missing"
            )
    rows[:] = ordered
    return ordered


def _image_names(state: StateDir) -> list[tuple[str, str, float]]:
    try:
        names = json.loads((state.root / "content" / IMAGE_NAMES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [tuple(row) for row in names if isinstance(row, list) and len(row) == 3]  # type: ignore[misc]


def _db_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _move_aside(db: Path) -> str | None:
    """Keep the damaged store (and its WAL) under a dated name."""
    if not db.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = db.with_name(f"{db.name}.damaged-{stamp}")
    for source, target in zip(_db_files(db), _db_files(aside), strict=True):
        if source.exists():
            os.replace(source, target)
    return str(aside)
