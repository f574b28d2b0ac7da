"""The Storage facade: named snapshots on one driver, crash-safe.

Every change follows one order, under the state dir's lock:

1. record the intent in the store (a row that is not READY),
2. do the driver's work (idempotent),
3. record the result.

A crash after 1 leaves a row that recovery finishes (commit rolls forward) or
undoes (clone and remove), so nothing committed is lost and nothing half-made
stays. Recovery runs whenever the lock is next taken for a change, and from
`minifs gc`, which also sweeps backend objects that have no row at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from minifs import failpoints, linux, mounter
from minifs.driver import Driver
from minifs.errors import (
    AlreadyExists,
    InUse,
    InvalidArgument,
    NotFound,
    TooManyLayers,
)
from minifs.model import Info, Kind, Mount, State, Usage
from minifs.plugins import get_driver
from minifs.state import StateDir
from minifs.store import Store

TRANSIENT_LABEL = "minifs.transient"
"""A clone made and consumed inside one locked operation (e.g. unpacking an
image layer). Seen by recovery, it can only be left over from a crash."""

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,254}")


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid name {name!r}; use letters, digits and _.:@+- (not first), "
            "at most 255 characters"
        )


MAX_LABEL_BYTES = 4096
"""Most bytes of one label's key and value together, containerd's limit: labels
live in every listing, and a megabyte one would be copied into each."""


def check_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label {key[:40]!r} is {size} bytes with its value; keep each label "
                f"under {MAX_LABEL_BYTES} bytes"
            )


def parse_filters(filters: Sequence[str]) -> dict[str, str]:
    """`kind=layer`, `parent=NAME`, `label.KEY=VALUE`, `name=NAME` (all must hold).

    A kind that cannot exist is refused, as `docker ps --filter status=bogus`
    is: matching nothing would pass for "there are none".
    """
    parsed = {}
    kinds = "|".join(k.value for k in Kind)
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not (key in ("kind", "parent", "name") or key.startswith("label.")):
            raise InvalidArgument(
                f"bad filter {item!r}; use kind={kinds}, parent=NAME, name=NAME or label.KEY=VALUE"
            )
        if key == "kind" and value not in {k.value for k in Kind}:
            raise InvalidArgument(f"bad filter {item!r}; a kind is one of {kinds}")
        if key == "label.":
            raise InvalidArgument(f"bad filter {item!r}; name the label: label.KEY=VALUE")
        parsed[key] = value
    return parsed


def matches(info: Info, filters: Mapping[str, str]) -> bool:
    for key, value in filters.items():
        if key == "kind" and info.kind.value != value:
            return False
        if key == "parent" and info.parent != value:
            return False
        if key == "name" and info.name != value:
            return False
        if key.startswith("label.") and info.labels.get(key[6:]) != value:
            return False
    return True


@dataclass
class GcReport:
    """What `gc` did (or, with --dry-run, would do)."""

    recovered: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale_mounts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "recovered": self.recovered,
            "orphans": self.orphans,
            "stale_mounts": self.stale_mounts,
        }


class Storage:
    """Snapshots of one driver in one state dir."""

    def __init__(
        self,
        driver: str = "overlay2",
        root: str | os.PathLike[str] | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        cls = get_driver(driver)
        cls.probe()
        self.state = StateDir(root)
        # The driver checks its options before anything is created on disk.
        self.driver: Driver = cls(self.state.home(driver), options)
        self.state.ensure()
        self.store = Store(self.state.db_path)
        self._started = False

    @property
    def name(self) -> str:
        return self.driver.name

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def changing(self, recover: bool = True) -> Iterator[None]:
        """Hold the lock with the backend up and earlier crashes recovered."""
        with self.state.locked():
            if not self._started:
                self.driver.start()
                self._started = True
                if recover:
                    self.recover()
            yield

    # -- lookups -----------------------------------------------------------

    def stat(self, name: str) -> Info:
        info = self.store.get(self.name, name)
        if info is None:
            raise NotFound(
                f"no snapshot named {name!r} on driver {self.name}; "
                "see 'minifs ls' (or pass --driver)"
            )
        return info

    def list(self, filters: Mapping[str, str] | None = None) -> list[Info]:
        return [i for i in self.store.list(self.name) if matches(i, filters or {})]

    def _layer(self, name: str) -> Info:
        info = self.stat(name)
        if info.kind is not Kind.LAYER:
            raise InvalidArgument(
                f"{name} is a {info.kind.value}, not a layer; commit it first with "
                f"'minifs snapshot {name} LAYER'"
            )
        return info

    def _free(self, name: str) -> None:
        check_name(name)
        if self.store.name_taken(self.name, name):
            raise AlreadyExists(
                f"name {name!r} is taken on driver {self.name}; pick another name "
                f"or remove it with 'minifs rm {name}'"
            )

    # -- changes -----------------------------------------------------------

    def clone(
        self, name: str, parent: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Info:
        """A writable clone of layer `parent` (empty without one)."""
        return self._create(name, parent, Kind.CLONE, labels)

    def view(self, name: str, parent: str | None, labels: Mapping[str, str] | None = None) -> Info:
        """A read-only view of layer `parent`."""
        return self._create(name, parent, Kind.VIEW, labels)

    def _create(
        self, name: str, parent: str | None, kind: Kind, labels: Mapping[str, str] | None
    ) -> Info:
        check_labels(labels or {})
        with self.changing():
            self._free(name)
            chain = self.store.chain(self._layer(parent).id) if parent else []
            limit = self.driver.max_depth
            if limit is not None and len(chain) > limit:
                raise TooManyLayers(
                    f"{parent} stacks {len(chain)} layers but {self.name} mounts at most "
                    f"{limit} (the kernel's limit); flatten the image or use another driver"
                )
            sid = self.store.insert(
                self.name, name, kind, chain[0] if chain else None, dict(labels or {})
            )
            failpoints.hit(f"{kind.value}:after-intent")
            try:
                if kind is Kind.VIEW:
                    self.driver.view(sid, chain)
                else:
                    self.driver.prepare(sid, chain)
                failpoints.hit(f"{kind.value}:after-driver")
            except BaseException:
                self.driver.remove(sid)
                self.store.delete(sid)
                raise
            self.store.set_state(sid, State.READY)
            return self.stat(name)

    def snapshot(
        self,
        clone: str,
        layer: str,
        labels: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> Info:
        """Commit `clone` as layer `layer`; with `keep`, a fresh clone of the
        same name continues on top of it (the clone itself is consumed, as in
        containerd's Commit)."""
        check_labels(labels or {})
        with self.changing():
            info = self.stat(clone)
            if info.kind is not Kind.CLONE:
                raise InvalidArgument(
                    f"{clone} is a {info.kind.value}; only clones can be snapshot"
                )
            self._free(layer)
            self._refuse_if_mounted(info, "snapshot")
            self.store.set_state(info.id, State.COMMITTING, pending_name=layer)
            failpoints.hit("snapshot:after-intent")
            self.driver.commit(info.id, self.store.chain(info.parent_id))
            failpoints.hit("snapshot:after-driver")
            merged = {**info.labels, **(labels or {})}
            merged.pop(TRANSIENT_LABEL, None)  # the layer outlives the operation
            # Lost at power failure, the row is back in COMMITTING and recovery
            # rolls it forward: no fsync needed here.
            self.store.finish_commit(
                info.id, layer, {k: v for k, v in merged.items() if v}, durable=False
            )
            if keep:
                self.clone(clone, layer, info.labels)
            return self.stat(layer)

    def remove(self, name: str) -> None:
        with self.changing():
            info = self.stat(name)
            children = self.store.children(info.id)
            if children:
                names = ", ".join(c.name for c in children[:5])
                raise InUse(
                    f"{name} has {len(children)} child snapshot(s) ({names}); remove them first"
                )
            self._refuse_if_mounted(info, "remove")
            self.store.set_state(info.id, State.REMOVING)
            failpoints.hit("remove:after-intent")
            self.driver.remove(info.id)
            failpoints.hit("remove:after-driver")
            # Lost at power failure, the row is back in REMOVING and recovery finishes it.
            self.store.delete(info.id, durable=False)

    def set_labels(self, name: str, labels: Mapping[str, str]) -> Info:
        """Add or (with an empty value) delete labels."""
        check_labels(labels)
        with self.changing():
            info = self.stat(name)
            merged = {**info.labels, **labels}
            self.store.set_labels(info.id, {k: v for k, v in merged.items() if v != ""})
            return self.stat(name)

    def _refuse_if_mounted(self, info: Info, action: str) -> None:
        live = [t for t in self.store.mounts_of(info.id) if linux.is_mountpoint(t)]
        if live:
            raise InUse(
                f"cannot {action} {info.name}: it is mounted at {live[0]}; "
                f"run 'minifs umount {live[0]}' first"
            )

    # -- mounting ----------------------------------------------------------

    def mounts(self, name: str) -> list[Mount]:
        info = self.stat(name)
        with self.changing():
            return self.driver.mounts(info.id, info.kind, self.store.chain(info.parent_id))

    def _check_mount_point(self, target: str | os.PathLike[str]) -> Path:
        """An empty directory that is no mount point and that neither holds nor
        lies inside the state dir: a mount over the state dir (or any directory
        above it) would hide the store from every later command, which would
        then start an empty one; a mount over files hides them (zfs refuses a
        non-empty mount point for the same reason)."""
        where = Path(target).resolve()
        if not where.exists():
            raise NotFound(f"mount point {target} does not exist; create it first (mkdir -p)")
        if not where.is_dir():
            raise InvalidArgument(f"mount point {target} is not a directory; give a directory")
        if linux.is_mountpoint(where):
            raise InUse(f"{where} is already a mount point; pick an empty directory")
        root = self.state.root.resolve()
        if where == root or where.is_relative_to(root) or root.is_relative_to(where):
            raise InvalidArgument(
                f"{where} would {'cover' if root.is_relative_to(where) else 'be inside'} the "
                f"state dir {root}; pick a directory outside it"
            )
        with os.scandir(where) as entries:
            if next(entries, None) is not None:
                raise InvalidArgument(
                    f"mount point {where} is not empty; its files would be hidden, so "
                    "pick an empty directory"
                )
        return where

    def mount(self, name: str, target: str | os.PathLike[str]) -> Path:
        self.stat(name)  # the name first: a typo there is the likelier mistake
        where = self._check_mount_point(target)
        with self.changing():
            info = self.stat(name)
            records = self.driver.mounts(info.id, info.kind, self.store.chain(info.parent_id))
            self.store.add_mount(str(where), info.id)
            try:
                mounter.mount_all(records, where)
            except BaseException:
                self.store.remove_mount(str(where))
                raise
        return where

    def umount(self, target: str | os.PathLike[str]) -> None:
        where = str(Path(target).resolve())
        with self.changing():
            if self.store.mount_at(where) is None:
                raise NotFound(
                    f"{target} is not mounted by minifs; 'minifs inspect NAME' shows where "
                    "NAME is mounted"
                )
            if linux.is_mountpoint(where):
                mounter.unmount(where)
            self.store.remove_mount(where)

    def usage(self, name: str) -> Usage:
        info = self.stat(name)
        with self.changing():
            return self.driver.usage(info.id)

    # -- recovery ----------------------------------------------------------

    def recover(self, dry_run: bool = False) -> list[str]:
        """Finish or undo what crashed operations left; returns what it did."""
        done = []
        for info in self.list({f"label.{TRANSIENT_LABEL}": "1"}):
            done.append(f"remove transient {info.kind.value} {info.name}")
            if not dry_run:
                self.driver.remove(info.id)
                self.store.delete(info.id)
        for info, pending in self.store.unfinished(self.name):
            if info.state is State.COMMITTING and pending:
                done.append(f"finish snapshot of {info.name} as layer {pending}")
                if not dry_run:
                    self.driver.commit(info.id, self.store.chain(info.parent_id))
                    self.store.finish_commit(info.id, pending, info.labels)
            else:
                verb = "finish removing" if info.state is State.REMOVING else "roll back"
                done.append(f"{verb} {info.kind.value} {info.name} ({info.state.value})")
                if not dry_run:
                    self.driver.remove(info.id)
                    self.store.delete(info.id)
        return done

    def gc(self, dry_run: bool = False) -> GcReport:
        report = GcReport()
        with self.changing(recover=False):
            report.recovered = self.recover(dry_run)
            for target, sid in self.store.all_mounts():
                info = self.store.get_id(sid)
                if info and info.driver == self.name and not linux.is_mountpoint(target):
                    report.stale_mounts.append(target)
                    if not dry_run:
                        self.store.remove_mount(target)
            known = self.store.ids(self.name)
            for sid in sorted(self.driver.ids() - known):
                report.orphans.append(sid)
                if not dry_run:
                    self.driver.remove(sid)
        return report

    def down(self) -> list[str]:
        """Stop the backend, refusing while a snapshot of it is still mounted:
        unmounting the backend's own mount would succeed under a clone's mount
        and leave its device to be attached a second time on the next start."""
        with self.state.locked():
            live = [
                target
                for target, sid in self.store.all_mounts()
                if (info := self.store.get_id(sid))
                and info.driver == self.name
                and linux.is_mountpoint(target)
            ]
            if live:
                raise InUse(
                    f"{self.name} still has a snapshot mounted at {live[0]}; "
                    f"run 'minifs umount {live[0]}', then 'minifs down' again"
                )
            self._started = False
            return self.driver.stop()
