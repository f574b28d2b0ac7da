"""Image records: a name pointing at a manifest digest in the content store.

Kept in the state dir's sqlite store (its `images` table)
so an image and the snapshots unpacked from it change under one lock. Names
follow Docker's habit: a name without a tag means `:latest`.
"""

from __future__ import annotations

import contextlib
import re
from collections import namedtuple

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


class Record(namedtuple("Record", "name digest created")):
    """One image name, the manifest it points at, and when it was set."""

    __slots__ = ()
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


def put(store: Store, name: str, digest: str) -> None:
    store.put_image(name, digest)


def delete(store: Store, name: str) -> None:
    store.delete_image(name)


def all_records(store: Store) -> list[Record]:
    return [Record(*row) for row in store.images()]


def find(store: Store, ref: str) -> Record | None:
    """An image by name (`:latest` implied), full digest, or unique digest prefix."""
    candidates = [ref]
    with contextlib.suppress(InvalidArgument):
        candidates.append(normalize(ref))
    for name in candidates:
        found = store.images("name = ?", (name,))
        if found:
            return Record(*found[0])
    hex_part = ref[7:] if ref.startswith("sha256:") else ref
    if len(hex_part) >= 12 and all(c in "0123456789abcdef" for c in hex_part):
        rows = store.images("digest LIKE ?", (f"sha256:{hex_part}%",))
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
