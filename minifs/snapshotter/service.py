"""The Snapshots service: each gRPC call mapped onto one minifs Storage.

Calls run one at a time on a single worker thread: the Storage (its sqlite
connection) belongs to one thread, and containerd's own snapshotters
serialise their metadata the same way. A List is read on that thread and
sent from the caller's, so a client that stops reading or goes away holds
up nobody.

Errors reach containerd as the gRPC codes its errdefs understand (NotFound,
AlreadyExists, FailedPrecondition, InvalidArgument), with one line in the
log per refused call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from minifs.errors import (
    AlreadyExists,
    Damaged,
    InUse,
    InvalidArgument,
    MinifsError,
    MissingPrerequisite,
    NotFound,
    NotSupported,
    TooManyLayers,
)
from minifs.model import Info, Kind, State
from minifs.output import shown
from minifs.snapshotter import filters, keys
from minifs.snapshotter.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from minifs.snapshotter.records import to_containerd
from minifs.storage import Storage

log = logging.getLogger("minifs.snapshotter")

T = TypeVar("T")

LIST_BATCH = 100
"""Infos per List message, as containerd's own service sends them."""

KINDS = {
    Kind.CLONE: snapshots_pb2.ACTIVE,
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.LAYER: snapshots_pb2.COMMITTED,
}
KIND_WORDS = {Kind.CLONE: "active", Kind.VIEW: "view", Kind.LAYER: "committed"}


class Refused(MinifsError):
    """A call containerd's own snapshotters refuse with FailedPrecondition
    (committing a view, mounting a committed snapshot, removing a parent)."""


CODES: list[tuple[type[MinifsError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (TooManyLayers, grpc.StatusCode.FAILED_PRECONDITION),
    (NotSupported, grpc.StatusCode.FAILED_PRECONDITION),
    (Damaged, grpc.StatusCode.FAILED_PRECONDITION),
    (MissingPrerequisite, grpc.StatusCode.UNAVAILABLE),
]


def code_of(exc: MinifsError) -> grpc.StatusCode:
    for kind, code in CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL  # a backend that failed: containerd's "unknown"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class SnapshotService(snapshots_pb2_grpc.SnapshotsServicer):
    """containerd's Snapshots API over one driver's Storage."""

    def __init__(self, open_storage: Callable[[], Storage]) -> None:
        """Opens the storage on the worker thread, whose own it then is, and
        brings its backend up (recovering what a crash left) before serving."""
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minifs-storage")

        def opened() -> Storage:
            storage = open_storage()
            try:
                storage.up()
            except BaseException:
                storage.close()
                raise
            return storage

        try:
            self.storage = self.worker.submit(opened).result()
        except BaseException:
            self.worker.shutdown()
            raise

    def close(self) -> None:
        self.worker.submit(self.storage.close).result()
        self.worker.shutdown(wait=True)

    # -- plumbing ------------------------------------------------------------

    def _run(self, context: grpc.ServicerContext, call: str, key: str, work: Callable[[], T]) -> T:
        """`work()` on the storage thread; a refusal becomes its gRPC code and
        one log line, and nothing else it raises takes the server down."""
        try:
            return self.worker.submit(work).result()
        except MinifsError as exc:
            self._abort(context, call, key, code_of(exc), str(exc))
        except Exception as exc:  # a bug must cost one call, not the server
            why = f"{type(exc).__name__}: {exc}"
            self._abort(context, call, key, grpc.StatusCode.INTERNAL, why)

    @staticmethod
    def _abort(
        context: grpc.ServicerContext, call: str, key: str, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        log.warning("%s %s: %s: %s", call, shown(repr(key[:200])), code.name, shown(message))
        context.abort(code, message)
        raise AssertionError("context.abort returns only by raising")

    def _find(self, key: str, what: str = "snapshot") -> Info:
        info = self.storage.find(keys.name_of(key))
        if info is None or info.state is not State.READY:
            raise NotFound(f"{what} {key[:200]!r} does not exist")
        return info

    def _absent(self, key: str) -> str:
        name = keys.name_of(key)
        if self.storage.name_taken(name):
            raise AlreadyExists(f"snapshot {key[:200]!r} already exists")
        return name

    def _layer(self, parent: str) -> str | None:
        """The minifs name of `parent`, a committed snapshot; None for no parent."""
        if not parent:
            return None
        info = self._find(parent, "parent")
        if info.kind is not Kind.LAYER:
            raise InvalidArgument(f"parent {parent[:200]!r} is not a committed snapshot")
        return info.name

    def _mounts(self, info: Info) -> list[mount_pb2.Mount]:
        return [
            mount_pb2.Mount(type=t, source=s, options=o)
            for t, s, o in to_containerd(self.storage.records(info))
        ]

    def _info(self, info: Info, parent_key: str | None = None) -> snapshots_pb2.Info:
        if parent_key is None and info.parent_id:
            parent = self.storage.get_id(info.parent_id)
            parent_key = (keys.key_of(parent) if parent else None) or ""
        return snapshots_pb2.Info(
            name=keys.key_of(info) or "",
            parent=parent_key or "",
            kind=KINDS[info.kind],
            created_at=_timestamp(info.created),
            updated_at=_timestamp(info.updated),
            labels=keys.public_labels(info),
        )

    # -- the API ---------------------------------------------------------------

    def _create(self, request: Any, kind: Kind) -> list[mount_pb2.Mount]:
        name = self._absent(request.key)
        parent = self._layer(request.parent)
        labels = {**keys.client_labels(request.labels), keys.KEY_LABEL: request.key}
        if kind is Kind.CLONE:
            info = self.storage.clone(name, parent, labels)
        else:
            info = self.storage.view(name, parent, labels)
        return self._mounts(info)

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        create = functools.partial(self._create, request, Kind.CLONE)
        mounts = self._run(context, "Prepare", request.key, create)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts)

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._run(context, "View", request.key, lambda: self._create(request, Kind.VIEW))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts)

    def _active_mounts(self, key: str) -> list[mount_pb2.Mount]:
        info = self._find(key)
        if info.kind is Kind.LAYER:
            raise Refused(f"snapshot {key[:200]!r} is committed, not active or view")
        return self._mounts(info)

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._run(context, "Mounts", request.key, lambda: self._active_mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=mounts)

    def _commit(self, request: Any) -> None:
        info = self._find(request.key)
        if info.kind is not Kind.CLONE:
            raise Refused(f"snapshot {request.key[:200]!r} is not active")
        if self.storage.name_taken(keys.name_of(request.name)):
            raise AlreadyExists(f"committed snapshot {request.name[:200]!r} already exists")
        # The layer gets the labels of the Commit only, as in containerd.
        labels = {k: "" for k in info.labels}
        labels.update(keys.client_labels(request.labels))
        labels[keys.KEY_LABEL] = request.name
        self.storage.snapshot(info.name, keys.name_of(request.name), labels)

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._run(context, "Commit", request.key, lambda: self._commit(request))
        return empty_pb2.Empty()

    def _remove(self, key: str) -> None:
        info = self._find(key)
        children = self.storage.children(info)
        if children:
            raise Refused(
                f"cannot remove snapshot {key[:200]!r}: {len(children)} snapshot(s) stand on it; "
                "remove them first"
            )
        self.storage.remove(info.name)

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._run(context, "Remove", request.key, lambda: self._remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "Stat", request.key, lambda: self._info(self._find(request.key)))
        return snapshots_pb2.StatSnapshotResponse(info=info)

    def _update(self, request: Any) -> snapshots_pb2.Info:
        key = request.info.name
        info = self._find(key)
        given = keys.client_labels(request.info.labels)
        current = keys.public_labels(info)
        changes: dict[str, str] = {}
        for path in request.update_mask.paths or ["labels"]:
            if path == "labels":
                changes.update({k: "" for k in current})
                changes.update(given)
            elif path.startswith("labels."):
                label = path[len("labels.") :]
                keys.client_labels({label: ""})
                changes[label] = given.get(label, "")
            else:
                raise InvalidArgument(
                    f"cannot update {path[:80]!r} field on snapshot {key[:200]!r}: only labels "
                    "and labels.KEY can change"
                )
        return self._info(self.storage.set_labels(info.name, changes))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "Update", request.info.name, lambda: self._update(request))
        return snapshots_pb2.UpdateSnapshotResponse(info=info)

    def _list(self, wanted: list[str]) -> list[snapshots_pb2.Info]:
        parsed = filters.parse(wanted)
        ours = [i for i in self.storage.list() if keys.key_of(i) and i.state is State.READY]
        key_by_id = {i.id: keys.key_of(i) for i in ours}
        found = []
        for info in ours:
            parent = key_by_id.get(info.parent_id or "", "") or ""
            fields = _fields(info, parent)
            if filters.matches(parsed, fields):
                found.append(self._info(info, parent))
        return found

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        wanted = list(request.filters)
        infos = self._run(context, "List", ",".join(wanted), lambda: self._list(wanted))
        for start in range(0, len(infos), LIST_BATCH):
            if not context.is_active():
                log.info("List: the client went away after %d of %d snapshots", start, len(infos))
                return
            yield snapshots_pb2.ListSnapshotsResponse(info=infos[start : start + LIST_BATCH])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        def usage() -> Any:
            return self.storage.usage(self._find(request.key).name)

        used = self._run(context, "Usage", request.key, usage)
        return snapshots_pb2.UsageResponse(size=used.size, inodes=used.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Space of removed snapshots is given back at Remove already; what is
        left is what crashes left behind, which minifs's gc finishes or drops."""
        report = self._run(context, "Cleanup", "", self.storage.gc)
        for line in [*report.recovered, *(f"removed orphan {o}" for o in report.orphans)]:
            log.info("Cleanup: %s", line)
        return empty_pb2.Empty()


def _fields(info: Info, parent: str) -> filters.Fields:
    """A snapshot as containerd's filters see it (adaptSnapshot)."""
    labels = keys.public_labels(info)

    def field(path: list[str]) -> tuple[str, bool]:
        head = path[0] if path else ""
        if head == "kind":
            return KIND_WORDS[info.kind], True
        if head == "name":
            return keys.key_of(info) or "", True
        if head == "parent":
            return parent, True
        if head == "labels" and labels:
            value = labels.get(".".join(path[1:]))
            return (value or "", value is not None)
        return "", False

    return field
