"""The metadata store: one sqlite database in WAL mode, one transaction per step.

Rows carry a `state` so that every operation can be written as
"record intent → do the driver's work → record the result". A crash between
the two transactions leaves a row that is not READY; `Storage.recover` finishes
or undoes it, so nothing committed is lost and nothing half-made stays.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minifs.errors import StateDirError
from minifs.model import Info, Kind, State

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    driver TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent_id TEXT REFERENCES snapshots(id),
    state TEXT NOT NULL,
    pending_name TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (driver, name)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_state ON snapshots(state) WHERE state != 'ready';
CREATE TABLE IF NOT EXISTS mounts (
    target TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
    created REAL NOT NULL
);
"""

_COLUMNS = (
    "s.id, s.driver, s.name, s.kind, s.parent_id, p.name, s.labels, s.created, s.updated, s.state"
)


def new_id() -> str:
    """A stable, random snapshot id (also the driver's directory name)."""
    return uuid.uuid4().hex


def _info(row: tuple) -> Info:
    sid, driver, name, kind, parent_id, parent, labels, created, updated, state = row
    return Info(
        id=sid,
        driver=driver,
        name=name,
        kind=Kind(kind),
        parent=parent,
        parent_id=parent_id,
        labels=json.loads(labels),
        created=created,
        updated=updated,
        state=State(state),
    )


class Store:
    """Rows of snapshots and mounts; callers serialise writers with the state lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None
        try:
            self._open()
        except sqlite3.OperationalError as exc:
            # WAL needs to write its -shm file even to read: a read-only state dir
            # fails here, before anything else.
            self.db.close()
            raise StateDirError(
                f"cannot open the metadata store {path} ({exc}); make its directory "
                "writable or pass --root DIR / set MINIFS_ROOT to a writable directory"
            ) from None
        except sqlite3.Error as exc:
            self.db.close()
            raise self._unusable(exc) from None

    def _open(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, not only a crash.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            # executescript would commit early; run the statements in our transaction.
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _unusable(self, exc: sqlite3.Error) -> StateDirError:
        """A store sqlite cannot read (overwritten, truncated, not a file). Never
        repaired or replaced here: it holds the only record of every layer."""
        return StateDirError(
            f"the metadata store {self.path} cannot be read ({exc}); restore it from a "
            "backup, or pass --root DIR / set MINIFS_ROOT to another state dir"
        )

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. `durable=False` skips the fsync at commit: the
        commit still survives a process crash (WAL), and the next durable
        commit makes it durable too. Only for rows whose loss at power failure
        leaves backend data without a row, which `gc`'s orphan sweep reclaims.
        """
        if not durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        finally:
            if not durable:
                self.db.execute("PRAGMA synchronous=FULL")

    # -- reads -------------------------------------------------------------

    def _select(self, where: str, args: tuple = ()) -> list[Info]:
        sql = (
            f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            f"WHERE {where} ORDER BY s.created, s.rowid"
        )
        return [_info(row) for row in self.db.execute(sql, args)]

    def get(self, driver: str, name: str) -> Info | None:
        rows = self._select("s.driver = ? AND s.name = ?", (driver, name))
        return rows[0] if rows else None

    def get_id(self, sid: str) -> Info | None:
        rows = self._select("s.id = ?", (sid,))
        return rows[0] if rows else None

    def name_taken(self, driver: str, name: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM snapshots WHERE driver = ? AND (name = ? OR pending_name = ?)",
            (driver, name, name),
        ).fetchone()
        return row is not None

    def list(self, driver: str | None = None) -> list[Info]:
        if driver is None:
            return self._select("1")
        return self._select("s.driver = ?", (driver,))

    def children(self, sid: str) -> list[Info]:
        return self._select("s.parent_id = ?", (sid,))

    def chain(self, sid: str | None) -> list[str]:
        """Ids from `sid` down to the root layer, nearest first."""
        if sid is None:
            return []
        rows = self.db.execute(
            "WITH RECURSIVE up(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL SELECT s.id, s.parent_id, up.depth + 1"
            " FROM snapshots s JOIN up ON s.id = up.parent_id)"
            " SELECT id FROM up ORDER BY depth",
            (sid,),
        ).fetchall()
        return [r[0] for r in rows]

    def unfinished(self, driver: str) -> list[tuple[Info, str | None]]:
        """Rows a crashed operation left behind, with their pending layer name."""
        rows = self.db.execute(
            "SELECT id, pending_name FROM snapshots WHERE driver = ? AND state != 'ready'",
            (driver,),
        ).fetchall()
        return [(info, pending) for sid, pending in rows if (info := self.get_id(sid))]

    def ids(self, driver: str) -> set[str]:
        return {
            r[0] for r in self.db.execute("SELECT id FROM snapshots WHERE driver = ?", (driver,))
        }

    # -- writes (each its own transaction) ----------------------------------

    def insert(
        self,
        driver: str,
        name: str,
        kind: Kind,
        parent_id: str | None,
        labels: dict[str, str],
    ) -> str:
        sid = new_id()
        now = time.time()
        # The intent to create need not reach the disk before the driver's work:
        # if power fails first, the new object has no row and gc sweeps it.
        with self.transaction(durable=False) as db:
            db.execute(
                "INSERT INTO snapshots (id, driver, name, kind, parent_id, state, labels,"
                " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sid,
                    driver,
                    name,
                    kind.value,
                    parent_id,
                    State.CREATING.value,
                    json.dumps(labels, sort_keys=True),
                    now,
                    now,
                ),
            )
        return sid

    def set_state(self, sid: str, state: State, pending_name: str | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE snapshots SET state = ?, pending_name = ?, updated = ? WHERE id = ?",
                (state.value, pending_name, time.time(), sid),
            )

    def finish_commit(
        self, sid: str, name: str, labels: dict[str, str], durable: bool = True
    ) -> None:
        with self.transaction(durable) as db:
            db.execute(
                "UPDATE snapshots SET kind = ?, name = ?, pending_name = NULL, state = ?,"
                " labels = ?, updated = ? WHERE id = ?",
                (
                    Kind.LAYER.value,
                    name,
                    State.READY.value,
                    json.dumps(labels, sort_keys=True),
                    time.time(),
                    sid,
                ),
            )

    def set_labels(self, sid: str, labels: dict[str, str]) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                (json.dumps(labels, sort_keys=True), time.time(), sid),
            )

    def delete(self, sid: str, durable: bool = True) -> None:
        with self.transaction(durable) as db:
            db.execute("DELETE FROM mounts WHERE snapshot_id = ?", (sid,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))

    # -- mounts --------------------------------------------------------------

    def add_mount(self, target: str, sid: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO mounts (target, snapshot_id, created) VALUES (?, ?, ?)",
                (target, sid, time.time()),
            )

    def remove_mount(self, target: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM mounts WHERE target = ?", (target,))

    def mounts_of(self, sid: str) -> list[str]:
        rows = self.db.execute("SELECT target FROM mounts WHERE snapshot_id = ?", (sid,))
        return [r[0] for r in rows]

    def mount_at(self, target: str) -> str | None:
        row = self.db.execute("SELECT snapshot_id FROM mounts WHERE target = ?", (target,))
        found = row.fetchone()
        return found[0] if found else None

    def all_mounts(self) -> list[tuple[str, str]]:
        return [(t, s) for t, s in self.db.execute("SELECT target, snapshot_id FROM mounts")]
