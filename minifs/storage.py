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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from minifs import failpoints, linux, mounter
from minifs.driver import Driver
from minifs.errors import (
    AlreadyExists,
    BackendError,
    Damaged,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    TooManyLayers,
)
from minifs.filters import matches
from minifs.model import Info, Kind, Mount, State, Usage
from minifs.plugins import get_driver
from minifs.resources import owner_alive
from minifs.state import StateDir
from minifs.store import Store, disk_full, is_full, keep_reserve

TRANSIENT_LABEL = "minifs.transient"
"""A clone made and consumed inside one operation (e.g. unpacking an image
layer); its value is the owner_tag of the process using it. Recovery removes
one only when that process is gone."""

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


class GcReport:
    """What `gc` did (or, with --dry-run, would do), and what it cannot fix:
    damaged snapshots and partly applied clones wait for the user."""

    def __init__(self) -> None:
        self.recovered: list[str] = []
        self.orphans: list[str] = []
        self.stale_mounts: list[str] = []
        self.damaged: list[str] = []
        self.partial: list[str] = []

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "recovered": self.recovered,
            "orphans": self.orphans,
            "stale_mounts": self.stale_mounts,
            "damaged": self.damaged,
            "partial": self.partial,
        }

    @property
    def unresolved(self) -> bool:
        return bool(self.damaged or self.partial)


def partial_advice(info: Info) -> str:
    return (
        f"clone {info.name} is partly applied (applying layer {info.pending} was cut "
        f"short); apply that layer again to finish it, or remove it ('minifs rm {info.name}')"
    )


class CheckReport:
    """What `minifs check` finds on one driver; empty lists mean consistent.
    (Plain classes, not dataclasses: those cost ~6 ms of every start.)"""

    def __init__(self) -> None:
        self.damaged: list[str] = []
        """What is wrong with each damaged snapshot, and what stands on it."""
        self.partial: list[str] = []
        self.orphans: list[str] = []
        self.unfinished: list[str] = []
        self.stale_mounts: list[str] = []

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "damaged": self.damaged,
            "partial": self.partial,
            "orphans": self.orphans,
            "unfinished": self.unfinished,
            "stale_mounts": self.stale_mounts,
        }

    @property
    def problems(self) -> list[str]:
        return [
            *self.damaged,
            *self.partial,
            *(f"backend object {o} has no row (gc removes it)" for o in self.orphans),
            *(f"{u} (gc finishes or undoes it)" for u in self.unfinished),
            *(f"stale mount record {m} (gc forgets it)" for m in self.stale_mounts),
        ]


def _recovery_of(info: Info) -> str:
    """What recovery does to a row a dead process left unfinished, in words."""
    if info.state is State.COMMITTING and info.pending:
        return f"finish snapshot of {info.name} as layer {info.pending}"
    if info.state is State.APPLYING:
        return f"mark clone {info.name} partly applied ({info.pending})"
    verb = "finish removing" if info.state is State.REMOVING else "roll back"
    return f"{verb} {info.kind.value} {info.name} ({info.state.value})"


def _descendants(info: Info, by_parent: Mapping[str, list[Info]]) -> list[str]:
    """Names of every snapshot stacked on `info`, nearest first."""
    found, queue = [], list(by_parent.get(info.id, []))
    while queue:
        child = queue.pop(0)
        found.append(child.name)
        queue.extend(by_parent.get(child.id, []))
    return found


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
        self.store = Store(self.state)
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

    def up(self) -> None:
        """Bring the backend up and recover what crashed, then let go of the
        lock: for work that reads, or that takes the lock step by step."""
        with self.changing():
            pass

    @contextmanager
    def changing(self, recover: bool = True) -> Iterator[None]:
        """Hold the lock with the backend up and earlier crashes recovered."""
        with self.state.locked():
            if not self._started:
                self.driver.start()
                self.store.claim(self.name)
                keep_reserve(self.state)
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
        self._refuse_if_busy(info)
        return info

    def _refuse_if_busy(self, info: Info) -> None:
        """A snapshot another operation is still making, committing, applying
        to or removing is left to it (a crashed one was recovered already).
        Checked under the state dir's lock, where every snapshot lock is
        taken: what is free here is taken without waiting."""
        if info.state not in (State.READY, State.PARTIAL):
            doing = f"is {info.state.value}"
        elif self.state.busy(info.id):
            doing = "is in use"  # a layer being applied to it, before the first write
        else:
            return
        raise InUse(
            f"{info.name} {doing} by another minifs command; try again when it has finished"
        )

    def _free(self, name: str) -> None:
        check_name(name)
        if self.store.name_taken(self.name, name):
            raise AlreadyExists(
                f"name {name!r} is taken on driver {self.name}; pick another name "
                f"or remove it with 'minifs rm {name}'"
            )

    # -- changes -----------------------------------------------------------

    def clone(
        self,
        name: str,
        parent: str | None = None,
        labels: Mapping[str, str] | None = None,
        size: int | None = None,
    ) -> Info:
        """A writable clone of layer `parent` (empty without one), capped at
        `size` bytes when given (drivers with a `size_limit` only)."""
        if size is not None:
            self.check_size(size)
        return self._create(name, parent, Kind.CLONE, labels, size)

    def check_size(self, size: int) -> None:
        """Refuse a size cap this driver cannot keep, rather than ignore it."""
        if self.driver.size_limit is None:
            raise NotSupported(
                f"--size: the {self.name} driver cannot cap one clone's size "
                f"({self.driver.size_refusal}); drop --size, or use a driver that can "
                "('minifs drivers --json' shows size_limit)"
            )
        if size <= 0:
            raise InvalidArgument(f"--size {size} is not a size; give one like 100M or 10G")

    def view(self, name: str, parent: str | None, labels: Mapping[str, str] | None = None) -> Info:
        """A read-only view of layer `parent`."""
        return self._create(name, parent, Kind.VIEW, labels)

    def _create(
        self,
        name: str,
        parent: str | None,
        kind: Kind,
        labels: Mapping[str, str] | None,
        size: int | None = None,
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
            with self.state.working_on(sid):
                failpoints.hit(f"{kind.value}:after-intent")
                try:
                    with self.state.unlocked(), self._diagnosed(chain):
                        failpoints.hit(f"{kind.value}:working")
                        if kind is Kind.VIEW:
                            self.driver.view(sid, chain)
                        elif size is not None:
                            self.driver.prepare(sid, chain, size=size)
                        else:
                            self.driver.prepare(sid, chain)
                    failpoints.hit(f"{kind.value}:after-driver")
                    self.store.set_state(sid, State.READY)  # its record may meet a full disk
                except BaseException:
                    self.driver.remove(sid)
                    self.store.delete(sid)
                    raise
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
            if info.state is not State.READY:
                raise InUse(
                    partial_advice(info)
                    if info.state is State.PARTIAL
                    else f"{clone} is {info.state.value}; run 'minifs gc' first"
                )
            self._free(layer)
            self._refuse_if_mounted(info, "snapshot")
            self.store.set_state(info.id, State.COMMITTING, pending_name=layer)
            with self.state.working_on(info.id):
                failpoints.hit("snapshot:after-intent")
                chain = self.store.chain(info.parent_id)
                with self.state.unlocked():
                    failpoints.hit("snapshot:working")
                    self.driver.commit(info.id, chain)
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
            self._refuse_if_busy(info)
            children = self.store.children(info.id)
            if children:
                names = ", ".join(c.name for c in children[:5])
                raise InUse(
                    f"{name} has {len(children)} child snapshot(s) ({names}); remove them first"
                )
            self._refuse_if_mounted(info, "remove")
            self.store.set_state(info.id, State.REMOVING)
            with self.state.working_on(info.id):
                failpoints.hit("remove:after-intent")
                with self.state.unlocked():
                    failpoints.hit("remove:working")
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

    def mounted_at(self, info: Info) -> list[str]:
        """Where `info` is mounted now (records whose mount is gone are left out)."""
        return [t for t in self.store.mounts_of(info.id) if linux.is_mountpoint(t)]

    def _refuse_if_mounted(self, info: Info, action: str, twice: bool = False) -> None:
        live = self.mounted_at(info)
        if live:
            what = f"{info.name} again" if twice else info.name
            raise InUse(
                f"cannot {action} {what}: it is mounted at {live[0]}; "
                f"run 'minifs umount {live[0]}' first"
            )

    @contextmanager
    def applying(self, name: str) -> Iterator[tuple[Info, Callable[[str], None]]]:
        """Hold clone `name` for a layer apply: yields it and `start(diff_id)`,
        which the apply calls just before it changes the clone. From then until
        the block ends the row says APPLYING, so a crash is known afterwards
        (recovery marks the clone PARTIAL, `snapshot` refuses it, `ls` shows
        it); a failure part-way marks it PARTIAL at once. Applying the same
        layer again finishes a PARTIAL clone."""
        with self.changing():
            info = self.stat(name)
            if info.kind is not Kind.CLONE:
                raise InvalidArgument(
                    f"{name} is a {info.kind.value}; layers can only be applied to a clone"
                )
            self._refuse_if_busy(info)
            self._refuse_if_mounted(info, "apply a layer to")
            started: list[str] = []

            def start(diff_id: str) -> None:
                if info.state is State.PARTIAL and info.pending != diff_id:
                    raise InUse(partial_advice(info))
                with self.state.locked():
                    self.store.set_state(info.id, State.APPLYING, pending_name=diff_id)
                started.append(diff_id)
                failpoints.hit("apply:after-intent")

            # Held from here: the clone is this apply's even while the row still
            # says READY (the first pass only reads the archive).
            with self.state.working_on(info.id):
                try:
                    with self.state.unlocked():
                        yield info, start
                except BaseException:
                    if started:
                        self.store.set_state(info.id, State.PARTIAL, pending_name=started[0])
                    raise
                if started:
                    self.store.set_state(info.id, State.READY)

    # -- mounting ----------------------------------------------------------

    def mounts(self, name: str) -> list[Mount]:
        info = self.stat(name)
        with self.changing():
            return self.records(info)

    def records(self, info: Info) -> list[Mount]:
        """`info`'s mount records; a failure on a damaged chain names the layer."""
        chain = self.store.chain(info.parent_id)
        with self._diagnosed([info.id, *chain]):
            return self.driver.mounts(info.id, info.kind, chain)

    @contextmanager
    def _diagnosed(self, ids: Sequence[str]) -> Iterator[None]:
        """Turn a backend failure on a chain with a damaged snapshot in it into
        one line naming that snapshot, instead of a raw 'No such file'; a
        driver's home that ran out of space or inodes into the same line the
        store gives for its own disk."""
        try:
            yield
        except (OSError, BackendError) as exc:
            present = self.driver.ids()
            for sid in ids:
                why = self._what_is_wrong(sid, present)
                if why is not None:
                    raise self._damaged(sid, why) from None
            if is_full(exc):
                raise disk_full(self.driver.home) from None
            raise exc

    def _what_is_wrong(self, sid: str, present: set[str]) -> str | None:
        """The driver's own account first (it names the missing part)."""
        why = self.driver.damage(sid)
        if why is None and sid not in present:
            return "its backend object is missing"
        return why

    def _damaged(self, sid: str, why: str) -> Damaged:
        info = self.store.get_id(sid)
        name = info.name if info else sid
        kind = info.kind.value if info else "snapshot"
        return Damaged(
            f"{kind} {name} on {self.name} is damaged ({why}); 'minifs check' lists what "
            f"depends on it: remove those and it with 'minifs rm', then make it again"
        )

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
            self._refuse_if_busy(info)
            if info.kind is Kind.CLONE:
                # Two overlay mounts on one upper dir are undefined behaviour in
                # the kernel, and two writers of one tree lose each other's work.
                self._refuse_if_mounted(info, "mount", twice=True)
            records = self.records(info)
            self.store.add_mount(str(where), info.id)
            try:
                with self._diagnosed([info.id, *self.store.chain(info.parent_id)]):
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
        """Counted without the state dir's lock (a vfs clone is walked whole):
        the backend up is all it needs."""
        info = self.stat(name)
        self.up()
        return self.driver.usage(info.id)

    # -- what other modules read -------------------------------------------

    def find(self, name: str) -> Info | None:
        return self.store.get(self.name, name)

    def name_taken(self, name: str) -> bool:
        """Whether `name` is a snapshot's, or promised to one being committed."""
        return self.store.name_taken(self.name, name)

    def get_id(self, sid: str) -> Info | None:
        return self.store.get_id(sid)

    def children(self, info: Info) -> list[Info]:
        return self.store.children(info.id)

    def chain(self, info: Info) -> list[str]:
        """`info`'s parents' ids, nearest first."""
        return self.store.chain(info.parent_id)

    def diff_dirs(self, info: Info) -> tuple[Path | None, list[Path]]:
        """`info`'s overlay diff dir and its parents' (see Driver.diff_dir), or
        (None, []) for a driver that holds full trees."""
        own = self.driver.diff_dir(info.id)
        if own is None:
            return None, []
        lowers = [self.driver.diff_dir(p) for p in self.chain(info)]
        return own, [p for p in lowers if p is not None]

    # -- recovery ----------------------------------------------------------

    def recover(self, dry_run: bool = False) -> list[str]:
        """Finish or undo what crashed operations left; returns what it did.
        A row whose snapshot lock is held belongs to a command still at work,
        and a transient clone to a process still alive: both are left alone."""
        done = []
        for info in self.list():
            owner = info.labels.get(TRANSIENT_LABEL)
            if owner is None or owner_alive(owner) or self.state.busy(info.id):
                continue  # the process using it is still at work
            done.append(f"remove transient {info.kind.value} {info.name}")
            if not dry_run:
                with self.state.working_on(info.id):
                    self.driver.remove(info.id)
                    self.store.delete(info.id)
        for info in self.store.unfinished(self.name):
            if self.state.busy(info.id):
                continue  # not crashed: another command is at work on it now
            if dry_run:
                done.append(_recovery_of(info))
                continue
            with self.state.working_on(info.id):
                done.append(self._recover_one(info))
        return done

    def _recover_one(self, info: Info) -> str:
        """Finish or undo the operation a dead process left on `info`."""
        if info.state is State.COMMITTING and info.pending:
            self.driver.commit(info.id, self.store.chain(info.parent_id))
            self.store.finish_commit(info.id, info.pending, info.labels)
        elif info.state is State.APPLYING:
            # The clone holds the user's own changes too: never rolled back.
            self.store.set_state(info.id, State.PARTIAL, pending_name=info.pending)
        else:
            self.driver.remove(info.id)
            self.store.delete(info.id)
        return _recovery_of(info)

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
            present = self.driver.ids()
            if not self.store.owns(self.name):
                raise Damaged(
                    f"{self.state.home(self.name)} does not carry this store's id; gc will "
                    "not remove anything from it: run 'minifs check'"
                )
            for sid in sorted(present - known):
                report.orphans.append(sid)
                if not dry_run:
                    self.driver.remove(sid)
                    self.store.drop_record(self.name, sid)
            if not dry_run:
                for sid in self.store.record_ids(self.name) - known - present:
                    self.store.drop_record(self.name, sid)
            found = self.check_snapshots(present)
            report.damaged = found.damaged
            report.partial = found.partial
        return report

    def check_snapshots(self, present: set[str] | None = None) -> CheckReport:
        """Read-only: every row has a whole backend object, and which rows
        wait for the user (partly applied clones)."""
        report = CheckReport()
        with self.changing(recover=False):
            present = self.driver.ids() if present is None else present
            rows = self.store.list(self.name)
            by_parent: dict[str, list[Info]] = {}
            for info in rows:
                if info.parent_id:
                    by_parent.setdefault(info.parent_id, []).append(info)
            for info in rows:
                if info.state is State.PARTIAL:
                    report.partial.append(partial_advice(info))
                if info.state is not State.READY and info.state is not State.PARTIAL:
                    continue  # recovery's business, and half-made by definition
                why = self._what_is_wrong(info.id, present)
                if why is None:
                    continue
                users = _descendants(info, by_parent)
                needed = f"; needed by {', '.join(users[:8])}" if users else ""
                report.damaged.append(f"{info.kind.value} {info.name} is damaged: {why}{needed}")
            report.orphans = sorted(present - {i.id for i in rows})
            report.unfinished = [
                f"{i.kind.value} {i.name} is {i.state.value}"
                for i in self.store.unfinished(self.name)
                if not self.state.busy(i.id)  # at work in another command, not crashed
            ]
            report.stale_mounts = [
                t for t, sid in self.store.all_mounts()
                if (i := self.store.get_id(sid)) and i.driver == self.name
                and not linux.is_mountpoint(t)
            ]  # fmt: skip
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
