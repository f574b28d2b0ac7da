"""The snapshot model, after containerd's Snapshotter.

A *layer* is committed, immutable state with at most one parent; a *clone* is a
writable filesystem on a layer (or on nothing); a *view* is a read-only one; a
*snapshot* commits a clone into a new layer. Drivers describe how to mount any
of them as a list of `Mount` records and never mount on the caller's behalf.
"""

from __future__ import annotations

import enum
from collections import namedtuple


class Kind(enum.StrEnum):
    """What a snapshot row is: containerd's active/view/committed, in minifs words."""

    CLONE = "clone"
    VIEW = "view"
    LAYER = "layer"


class State(enum.StrEnum):
    """Where a row is in its life. CREATING, COMMITTING, REMOVING and APPLYING
    are operations under way (after a crash: to recover); PARTIAL is a clone
    whose layer apply was cut short, kept for the user to finish or remove."""

    CREATING = "creating"
    READY = "ready"
    COMMITTING = "committing"
    REMOVING = "removing"
    APPLYING = "applying"
    PARTIAL = "partial"


class DriverKind(enum.StrEnum):
    """How a driver shares data between a layer and its clones."""

    COPY = "copy"
    COW = "cow"
    ROW = "row"


class Mount(namedtuple("Mount", "type source options target", defaults=((), ""))):
    """One mount record: what `mount -t TYPE -o OPTIONS SOURCE TARGET` would do.

    `target` is a path inside the mount root ("" for the root itself), as in
    containerd. Overlay records list their lower directories with absolute
    paths; the mounter decides whether they fit `mount(2)` or need the new
    mount API, so the same record works for the CLI, the launcher and the bench.

    The model's records are named tuples, not dataclasses: dataclasses loads
    `inspect`, ~6 ms of every `minifs ls` (whose floor, Python itself, is ~16).
    """

    __slots__ = ()
    type: str
    source: str
    options: tuple[str, ...]
    target: str

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.type,
            "source": self.source,
            "target": self.target,
            "options": list(self.options),
        }


class Usage(namedtuple("Usage", "size inodes")):
    """Bytes on disk and inodes of one snapshot itself, parents excluded."""

    __slots__ = ()
    size: int
    inodes: int

    def to_dict(self) -> dict[str, int]:
        return {"size": self.size, "inodes": self.inodes}


_INFO_FIELDS = "id driver name kind parent parent_id labels created updated state pending"


class Info(namedtuple("Info", _INFO_FIELDS, defaults=(None, 0.0, 0.0, State.READY, None))):
    """What the store knows about one snapshot. `labels` is a dict (None when
    built without any); `pending` is the layer name a COMMITTING row becomes,
    or the diff_id an APPLYING or PARTIAL clone was being given."""

    __slots__ = ()
    id: str
    driver: str
    name: str
    kind: Kind
    parent: str | None
    parent_id: str | None
    labels: dict[str, str]
    created: float
    updated: float
    state: State
    pending: str | None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "driver": self.driver,
            "name": self.name,
            "kind": self.kind.value,
            "parent": self.parent,
            "parent_id": self.parent_id,
            "labels": dict(self.labels or {}),
            "created": self.created,
            "updated": self.updated,
            "state": self.state.value,
            **({"pending": self.pending} if self.pending else {}),
        }
