"""containerd's snapshot keys as minifs names, and back.

containerd's metadata layer sends keys like `"default/7/extract-170 sha256:ab…"`:
namespace, sequence number and the client's key, with slashes, spaces and
colons, of any length. They are never used as paths or as minifs names: each
becomes the name `ctrd-<sha256 of the key>`, and the key itself is kept in a
label of that snapshot (`KEY_LABEL`), so the mapping lives in minifs's own
crash-safe store (and its rebuild records) with no second table to keep in
step. The label also tells containerd's snapshots apart from a user's own
minifs snapshots in the same state dir: List shows, and containerd's garbage
collector can remove, only the former.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from minifs.errors import InvalidArgument
from minifs.model import Info
from minifs.storage import MAX_LABEL_BYTES

NAME_PREFIX = "ctrd-"
KEY_LABEL = "minifs.containerd.key"
"""The containerd key (active, view) or name (committed) of a snapshot."""
INTERNAL_PREFIX = "minifs."
"""Labels minifs keeps for itself; containerd never sees or sets them."""
MAX_KEY_BYTES = MAX_LABEL_BYTES - len(KEY_LABEL)
"""A key must fit its label; containerd's own keys are a few hundred bytes."""


def name_of(key: str) -> str:
    """The minifs name of containerd key `key` (checked first)."""
    check_key(key)
    return NAME_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def check_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidArgument(f"empty snapshot {what}; give a key")
    if "\0" in key:
        raise InvalidArgument(f"snapshot {what} {key[:80]!r} contains a NUL byte; remove it")
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"snapshot {what} {key[:40]!r}… is {size} bytes; keep keys under {MAX_KEY_BYTES} bytes"
        )


def key_of(info: Info) -> str | None:
    """The containerd key of a minifs snapshot, or None for one containerd did not make."""
    return info.labels.get(KEY_LABEL)


def client_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels from a request, refused when they would reach minifs's own."""
    for key in labels:
        if key.startswith(INTERNAL_PREFIX):
            raise InvalidArgument(
                f"label {key[:80]!r} is reserved for minifs; use another label name"
            )
    return dict(labels)


def public_labels(info: Info) -> dict[str, str]:
    """What containerd sees of a snapshot's labels: minifs's own left out."""
    return {k: v for k, v in info.labels.items() if not k.startswith(INTERNAL_PREFIX)}
