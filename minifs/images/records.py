"""Image records: a name pointing at a manifest digest in the content store.

Kept in the state dir's sqlite store (their own table, created on first use)
so an image and the snapshots unpacked from it change under one lock. Names
follow Docker's habit: a name without a tag means `:latest`.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from dataclasses import dataclass

from minifs.errors import InvalidArgument, NotFound
from minifs.store import Store

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_HOST}(?:\.{_HOST})*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
"""Docker's reference grammar (distribution/reference): an optional registry
host, lowercase path components, an optional tag and an optional digest. What
docker would refuse (`App`, `a:b:c`, `x:`) is refused here too, rather than
stored under a name no other tool can use."""
MAX_NAME = 255

_TABLE = (
    "CREATE TABLE IF NOT EXISTS images ("
    " name TEXT PRIMARY KEY, digest TEXT NOT NULL, created REAL NOT NULL)"
)


@dataclass(frozen=True)
class Record:
    name: str
    digest: str
    created: float


def normalize(name: str) -> str:
    """`busybox` -> `busybox:latest`; a name with a tag or digest stays as it is."""
    match = REFERENCE_RE.fullmatch(name)
    if match is None or len(match["name"]) > MAX_NAME:
        raise InvalidArgument(
            f"invalid image name {name!r}; write it like localhost/app:1.0 (a lowercase "
            "name, then :TAG or @sha256:DIGEST if you like)"
        )
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in last else name + ":latest"


def _ensure(store: Store) -> sqlite3.Connection:
    """The store's connection, with the images table made on first use."""
    exists = store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='images'")
    if exists.fetchone() is None:
        with store.transaction() as db:
            db.execute(_TABLE)
    return store.db


def put(store: Store, name: str, digest: str) -> None:
    _ensure(store)
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO images (name, digest, created) VALUES (?, ?, ?)",
            (name, digest, time.time()),
        )


def delete(store: Store, name: str) -> None:
    _ensure(store)
    with store.transaction() as db:
        db.execute("DELETE FROM images WHERE name = ?", (name,))


def all_records(store: Store) -> list[Record]:
    db = _ensure(store)
    rows = db.execute("SELECT name, digest, created FROM images ORDER BY name")
    return [Record(*row) for row in rows]


def find(store: Store, ref: str) -> Record | None:
    """An image by name (`:latest` implied), full digest, or unique digest prefix."""
    db = _ensure(store)
    candidates = [ref]
    with contextlib.suppress(InvalidArgument):
        candidates.append(normalize(ref))
    for name in candidates:
        row = db.execute("SELECT name, digest, created FROM images WHERE name = ?", (name,))
        found = row.fetchone()
        if found:
            return Record(*found)
    hex_part = ref[7:] if ref.startswith("sha256:") else ref
    if len(hex_part) >= 12 and all(c in "0123456789abcdef" for c in hex_part):
        rows = db.execute(
            "SELECT name, digest, created FROM images WHERE digest LIKE ? ORDER BY name",
            (f"sha256:{hex_part}%",),
        ).fetchall()
        if len({r[1] for r in rows}) == 1:
            return Record(*rows[0])
    return None


def get(store: Store, ref: str) -> Record:
    record = find(store, ref)
    if record is None:
        raise NotFound(
            f"no image named {ref!r}; see 'minifs image ls', or import one with "
            "'minifs image import PATH' or 'minifs image busybox'"
        )
    return record
