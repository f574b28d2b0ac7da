"""The metadata store: one sqlite database in WAL mode, one transaction per step.

Rows carry a `state` so that every operation can be written as
"record intent → do the driver's work → record the result". A crash between
the two transactions leaves a row that is not READY; `Storage.recover` finishes
or undoes it, so nothing committed is lost and nothing half-made stays.

The store is the only record of names, parents and labels, so it guards
itself against being lost or swapped:

- every store has an id (`meta.store_id`), written into each driver home it
  uses (`<home>/store-id`); a home made by another store is refused, and a
  store that is missing or empty while homes or blobs hold data is refused
  rather than started afresh (an empty store would make `gc` take every
  layer for an orphan);
- every row is also written, just before its transaction commits, as a small
  JSON record in its driver's home (`<home>/records/<id>/`), so that
  `minifs check --rebuild` can rebuild a lost store from what the drivers
  hold (`minifs.rebuild`);
- a disk too full for sqlite's WAL is a one-line error, and a small reserve
  file is given up to let deletes (which free space) still commit.
"""

from __future__ import annotations

# The sqlite3 package is _sqlite3 (connections, errors) plus the DB-API's
# date and time helpers: those import datetime and register its adapters,
# ~2 ms of every command, for columns that hold plain numbers and text.
import _sqlite3 as sqlite3
import contextlib
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from minifs.errors import StateDirError
from minifs.model import Info, Kind, State
from minifs.state import StateDir

SCHEMA_VERSION = 2
RESERVE_BYTES = 1 << 20
"""Space held back in `<root>/reserve` for when the state dir's disk fills up:
sqlite's WAL needs room to record even a delete, and `rm` is how a user makes
room. Released on the first full-disk error, made again when space allows."""

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
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mounts (
    target TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
    created REAL NOT NULL
);
"""

_COLUMNS = (
    "s.id, s.driver, s.name, s.kind, s.parent_id, p.name, s.labels, s.created, s.updated,"
    " s.state, s.pending_name"
)


def new_id() -> str:
    """A stable, random snapshot id (also the driver's directory name)."""
    return os.urandom(16).hex()


def _info(row: tuple) -> Info:
    sid, driver, name, kind, parent_id, parent, labels, created, updated, state, pending = row
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
        pending=pending,
    )


class Store:
    """Rows of snapshots, mounts and image names; callers serialise writers with
    the state lock. The one place that reads or writes the metadata store."""

    def __init__(self, state: StateDir, path: Path | None = None) -> None:
        """The store of `state`; with `path`, a new store being rebuilt there
        (`minifs.rebuild`), which skips the checks against the homes."""
        self.state = state
        self.path = path or state.db_path
        self.id = ""
        self._claimed: set[str] = set()
        self._pending: dict[str, str] = {}
        rebuilding = path is not None
        if _is_empty(self.path) and not rebuilding:
            _refuse_if_claimed(state, "missing" if not self.path.exists() else "empty")
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None
        try:
            self._open(rebuilding)
        except StateDirError:
            self.db.close()
            raise
        except sqlite3.OperationalError as exc:
            self.db.close()
            if is_full(exc):
                raise disk_full(self.path.parent) from None
            # WAL needs to write its -shm file even to read: a read-only state dir
            # fails here, before anything else.
            raise StateDirError(
                f"cannot open the metadata store {self.path} ({exc}); make its directory "
                "writable or pass --root DIR / set MINIFS_ROOT to a writable directory"
            ) from None
        except sqlite3.Error as exc:
            self.db.close()
            raise self._unusable(exc) from None
        if not rebuilding:
            self._check_homes()

    @classmethod
    def existing(cls, state: StateDir) -> Store | None:
        """The store of a state dir for reading, or None when there is none yet
        and nothing in the state dir says there should be one."""
        if _is_empty(state.db_path):
            _refuse_if_claimed(state, "missing" if not state.db_path.exists() else "empty")
            return None
        return cls(state)

    def _open(self, rebuilding: bool) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, not only a crash.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise self._unusable(sqlite3.DatabaseError("it has tables but no minifs schema"))
        if version < SCHEMA_VERSION:
            if version == 0 and not rebuilding:
                _refuse_if_claimed(self.state, "empty")
            self._write(_make_schema)
        elif version > SCHEMA_VERSION:
            raise StateDirError(
                f"the metadata store {self.path} was written by a newer minifs (schema "
                f"{version}, this one knows {SCHEMA_VERSION}); upgrade minifs"
            )
        row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is None:
            raise self._unusable(sqlite3.DatabaseError("its store id is missing"))
        self.id = row[0]

    def _check_homes(self) -> None:
        """Refuse driver homes that another store made: this store was replaced."""
        for home, owner in _home_owners(self.state).items():
            if owner != self.id:
                raise StateDirError(
                    f"{home} belongs to another metadata store (id {owner[:12]}, but "
                    f"{self.path} is {self.id[:12]}): the store was replaced; put the "
                    "right metadata.db back, or run 'minifs check --rebuild' to rebuild "
                    "it from what the drivers hold"
                )
            self._claimed.add(home.name)

    def claim(self, driver: str) -> None:
        """Mark `driver`'s home as this store's (see `_check_homes`)."""
        if driver in self._claimed:
            return
        home = self.state.home(driver)
        home.mkdir(parents=True, exist_ok=True)
        marker = home / STORE_ID_FILE
        try:
            owner = marker.read_text().strip()
        except FileNotFoundError:
            _write_atomic(marker, self.id + "\n")
            owner = self.id
        if owner != self.id:
            self._check_homes()  # raises with the full story
        self._claimed.add(driver)

    def owns(self, driver: str) -> bool:
        """Whether `driver`'s home carries this store's id: only then may `gc`
        take a backend object without a row for an orphan."""
        try:
            marker = self.state.home(driver) / STORE_ID_FILE
            return marker.read_text().strip() == self.id
        except OSError:
            return False

    def _unusable(self, exc: sqlite3.Error) -> StateDirError:
        """A store sqlite cannot read (overwritten, truncated, not a file). Never
        repaired or replaced here: it holds the only record of every layer."""
        return StateDirError(
            f"the metadata store {self.path} cannot be read ({exc}); run 'minifs check "
            "--rebuild' to rebuild it from what the drivers hold, restore it from a "
            "backup, or pass --root DIR / set MINIFS_ROOT to another state dir"
        )

    def close(self) -> None:
        self.db.close()

    def _write(self, body: Callable[[sqlite3.Connection], object], durable: bool = True) -> None:
        """Run `body` in one transaction. `durable=False` skips the fsync at
        commit: the commit still survives a process crash (WAL), and the next
        durable commit makes it durable too. Only for rows whose loss at power
        failure leaves backend data without a row, which `gc` reclaims, or a
        row that recovery finishes.

        A full disk becomes a one-line StateDirError, after one more try with
        the reserve released (so `rm`, which frees space, still gets through).
        """
        for attempt in (1, 2):
            try:
                self._attempt(body, durable)
                return
            except (sqlite3.OperationalError, OSError) as exc:
                if not is_full(exc):
                    if isinstance(exc, OSError):
                        raise
                    raise StateDirError(f"the metadata store {self.path} failed: {exc}") from None
                if attempt == 2 or not _release_reserve(self.state):
                    raise disk_full(self.path.parent) from None

    def _attempt(self, body: Callable[[sqlite3.Connection], object], durable: bool) -> None:
        if not durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                body(self.db)
                self._flush_records()
                self.db.execute("COMMIT")
            except BaseException:
                self._pending.clear()
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
        finally:
            if not durable:
                self.db.execute("PRAGMA synchronous=FULL")

    def _touched(self, sid: str) -> None:
        """Queue `sid`'s record to be rewritten just before the commit (called
        before a DELETE, so the row's driver is still known)."""
        row = self.db.execute("SELECT driver FROM snapshots WHERE id = ?", (sid,)).fetchone()
        if row is not None:
            self._pending[sid] = row[0]

    def _flush_records(self) -> None:
        """Write the record of every row this transaction touched, before COMMIT:
        a crash between the two leaves the record one step ahead of the row,
        which recovery handles as it handles the row itself."""
        pending, self._pending = self._pending, {}
        for sid, driver in pending.items():
            row = self.db.execute(
                f"SELECT {', '.join(RECORD_FIELDS)} FROM snapshots WHERE id = ?", (sid,)
            ).fetchone()
            if row is None or row[RECORD_FIELDS.index("state")] == State.REMOVING.value:
                # Going: a rebuild must not bring it back, and dropping the
                # record frees space where writing one would need it (rm on a
                # full disk).
                self.drop_record(driver, sid)
                continue
            record = dict(zip(RECORD_FIELDS, row, strict=True))
            self.claim(driver)
            _write_record(self.state.home(driver) / RECORDS_DIR / sid, json.dumps(record))

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

    def unfinished(self, driver: str) -> list[Info]:
        """Rows a crashed operation left behind (PARTIAL clones are settled: they
        wait for the user, not for recovery)."""
        return self._select("s.driver = ? AND s.state NOT IN ('ready', 'partial')", (driver,))

    def record_ids(self, driver: str) -> set[str]:
        """Ids that have a record in `driver`'s home."""
        try:
            return set(os.listdir(self.state.home(driver) / RECORDS_DIR))
        except FileNotFoundError:
            return set()

    def drop_record(self, driver: str, sid: str) -> None:
        """Forget the record of `sid` (deleted, or an orphan without a row)."""
        where = self.state.home(driver) / RECORDS_DIR / sid
        for name in _listdir(where):
            (where / name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            where.rmdir()

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
        row = (sid, driver, name, kind.value, parent_id, State.CREATING.value,
               json.dumps(labels, sort_keys=True), now, now)  # fmt: skip

        def body(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO snapshots (id, driver, name, kind, parent_id, state, labels,"
                " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            self._touched(sid)

        # The intent to create need not reach the disk before the driver's work:
        # if power fails first, the new object has no row and gc sweeps it.
        self._write(body, durable=False)
        return sid

    def _update(self, sid: str, sql: str, args: tuple, durable: bool = True) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE snapshots SET {sql}, updated = ? WHERE id = ?", (*args, time.time(), sid)
            )
            self._touched(sid)

        self._write(body, durable)

    def set_state(self, sid: str, state: State, pending_name: str | None = None) -> None:
        self._update(sid, "state = ?, pending_name = ?", (state.value, pending_name))

    def finish_commit(
        self, sid: str, name: str, labels: dict[str, str], durable: bool = True
    ) -> None:
        self._update(
            sid,
            "kind = ?, name = ?, pending_name = NULL, state = ?, labels = ?",
            (Kind.LAYER.value, name, State.READY.value, json.dumps(labels, sort_keys=True)),
            durable,
        )

    def set_labels(self, sid: str, labels: dict[str, str]) -> None:
        self._update(sid, "labels = ?", (json.dumps(labels, sort_keys=True),))

    def delete(self, sid: str, durable: bool = True) -> None:
        def body(db: sqlite3.Connection) -> None:
            self._touched(sid)
            db.execute("DELETE FROM mounts WHERE snapshot_id = ?", (sid,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))

        self._write(body, durable)

    def restore(self, records: list[dict]) -> None:
        """Insert rows read back from driver records (`minifs.rebuild`), parents
        first so the foreign keys hold."""

        def body(db: sqlite3.Connection) -> None:
            for record in records:
                db.execute(
                    f"INSERT INTO snapshots ({', '.join(RECORD_FIELDS)})"
                    f" VALUES ({', '.join('?' * len(RECORD_FIELDS))})",
                    tuple(record[f] for f in RECORD_FIELDS),
                )
                self._touched(record["id"])

        self._write(body)

    def adopt_id(self, store_id: str) -> None:
        """Take the id of the store being rebuilt, so its homes are this one's."""
        self._write(
            lambda db: db.execute("UPDATE meta SET value = ? WHERE key = 'store_id'", (store_id,))
        )
        self.id = store_id

    # -- mounts --------------------------------------------------------------

    def add_mount(self, target: str, sid: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO mounts (target, snapshot_id, created) VALUES (?, ?, ?)",
                (target, sid, time.time()),
            )
        )

    def remove_mount(self, target: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM mounts WHERE target = ?", (target,)))

    def mounts_of(self, sid: str) -> list[str]:
        rows = self.db.execute("SELECT target FROM mounts WHERE snapshot_id = ?", (sid,))
        return [r[0] for r in rows]

    def mount_at(self, target: str) -> str | None:
        row = self.db.execute("SELECT snapshot_id FROM mounts WHERE target = ?", (target,))
        found = row.fetchone()
        return found[0] if found else None

    def all_mounts(self) -> list[tuple[str, str]]:
        return [(t, s) for t, s in self.db.execute("SELECT target, snapshot_id FROM mounts")]

    # -- image names -----------------------------------------------------------

    def put_image(self, name: str, digest: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO images (name, digest, created) VALUES (?, ?, ?)",
                (name, digest, time.time()),
            )
        )
        self._save_image_names()

    def delete_image(self, name: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM images WHERE name = ?", (name,)))
        self._save_image_names()

    def images(self, where: str = "1", args: tuple = ()) -> list[tuple[str, str, float]]:
        sql = f"SELECT name, digest, created FROM images WHERE {where} ORDER BY name"
        return [tuple(row) for row in self.db.execute(sql, args)]  # type: ignore[misc]

    def _save_image_names(self) -> None:
        """Image names beside the blobs they name, for `minifs check --rebuild`."""
        names = self.state.root / "content" / IMAGE_NAMES_FILE
        names.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(names, json.dumps(self.images()))

    def restore_images(self, rows: list[tuple[str, str, float]]) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.executemany("INSERT INTO images (name, digest, created) VALUES (?, ?, ?)", rows)

        self._write(body)

    # -- queries other modules need -------------------------------------------

    def drivers_of(self, names: list[str] | None = None, kind: Kind | None = None) -> list[str]:
        """Drivers holding a snapshot named one of `names` (of `kind`), or any."""
        where, args = ["1"], []
        if names is not None:
            where.append(f"name IN ({', '.join('?' * len(names))})")
            args += names
        if kind is not None:
            where.append("kind = ?")
            args.append(kind.value)
        sql = f"SELECT DISTINCT driver FROM snapshots WHERE {' AND '.join(where)} ORDER BY driver"
        return [r[0] for r in self.db.execute(sql, args)]


STORE_ID_FILE = "store-id"
RECORDS_DIR = "records"
IMAGE_NAMES_FILE = "names.json"
RECORD_FIELDS = ("id", "driver", "name", "kind", "parent_id", "state", "pending_name", "labels",
                 "created", "updated")  # fmt: skip


def _make_schema(db: sqlite3.Connection) -> None:
    # executescript would commit early; run the statements in our transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (os.urandom(16).hex(),)
    )
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _write_record(where: Path, text: str) -> None:
    """Write a row's record as a new file in its own directory, then drop the
    older ones: never a rename over an existing file nor a truncation, which
    make ext4 (auto_da_alloc) flush the data at once, ~3 ms a row here. The
    newest name wins in `read_record`, so a crash between the steps is fine."""
    where.mkdir(parents=True, exist_ok=True)
    older = _listdir(where)
    name = f"{time.time_ns():020d}-{os.getpid()}.json"
    try:
        (where / name).write_text(text)
    except OSError:  # a full disk: leave no torn record, nor an empty directory
        (where / name).unlink(missing_ok=True)
        if not older:
            with contextlib.suppress(OSError):
                where.rmdir()
        raise
    for stale in older:
        if stale != name:
            (where / stale).unlink(missing_ok=True)


def read_record(where: Path) -> dict | None:
    """The newest record in `where` (see `_write_record`), or None."""
    names = sorted(n for n in _listdir(where) if n.endswith(".json"))
    for name in reversed(names):
        try:
            return json.loads((where / name).read_text())
        except (OSError, ValueError):
            continue  # torn by a crash: the one before it still holds
    return None


def _listdir(where: Path) -> list[str]:
    try:
        return os.listdir(where)
    except FileNotFoundError:
        return []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def _home_owners(state: StateDir) -> dict[Path, str]:
    """Each driver home that carries a store id, with that id."""
    owners = {}
    try:
        homes = list(state.drivers_dir.iterdir())
    except OSError:
        return {}
    for home in homes:
        try:
            owners[home] = (home / STORE_ID_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
    return owners


def holders(state: StateDir) -> list[str]:
    """What in the state dir holds data a store must account for: driver homes
    that a store has claimed (a store id, or records), and image blobs. A home
    holding only what a driver's start makes (config.json, a mounted disk's
    lost+found) is not data."""
    found = []
    try:
        homes = sorted(state.drivers_dir.iterdir())
    except OSError:
        homes = []
    for home in homes:
        if (home / STORE_ID_FILE).exists() or _listdir(home / RECORDS_DIR):
            found.append(f"drivers/{home.name}")
    blobs = state.root / "content" / "blobs" / "sha256"
    if _listdir(blobs):
        found.append("content")
    return found


def _refuse_if_claimed(state: StateDir, how: str) -> None:
    """A missing or empty store over data is a lost store, not a new one."""
    found = holders(state)
    if found:
        raise StateDirError(
            f"the metadata store {state.db_path} is {how}, but data it recorded is still "
            f"in {', '.join(found)}; run 'minifs check --rebuild' to rebuild it from what the "
            "drivers hold, or restore metadata.db from a backup"
        )


def is_full(exc: BaseException) -> bool:
    """Whether `exc` says a disk ran out of space or inodes (sqlite's own
    word for it, or ENOSPC/EDQUOT)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(where: Path) -> StateDirError:
    """The one message for a full disk, the store's own or a driver's."""
    return StateDirError(
        f"the disk holding {where} is full; free space there (for example "
        "'minifs rm' snapshots you no longer need), then try again"
    )


def _release_reserve(state: StateDir) -> bool:
    """Give up the reserve so that one more transaction fits; False if none was held."""
    try:
        (state.root / RESERVE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


RESERVE_FILE = "reserve"


def keep_reserve(state: StateDir) -> None:
    """Make the reserve if it is missing and the disk has room for it (cheap
    when it exists: one stat)."""
    reserve = state.root / RESERVE_FILE
    if reserve.exists():
        return
    try:
        fd = os.open(reserve.with_name(".reserve.tmp"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
        os.replace(reserve.with_name(".reserve.tmp"), reserve)
    except OSError:
        reserve.with_name(".reserve.tmp").unlink(missing_ok=True)
