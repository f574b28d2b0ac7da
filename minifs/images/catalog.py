"""The images of one state dir: records, content store, unpacking, removal.

Unpacking is lazy and per driver, as in containerd: the first clone of an
image on a driver turns each missing layer into a layer of that driver named
by its chain id, through a transient clone (labelled so that recovery drops it
after a crash) that the layer tar is applied to and that is then snapshotted.
A layer already there, from this image or another sharing its base, is reused.
"""

from __future__ import annotations

import os
from pathlib import Path

from minifs import failpoints
from minifs.errors import InUse, InvalidArgument, MinifsError
from minifs.images import records
from minifs.images.content import ContentStore, Staging
from minifs.images.oci import Image, Layer, check_manifest, load, parse_json
from minifs.model import Info, Kind
from minifs.resources import owner_tag
from minifs.state import StateDir
from minifs.storage import TRANSIENT_LABEL, Storage
from minifs.store import Store

LAYER_LABEL = "minifs.image.diff_id"
"""Set on every layer unpacked from an image; its value is the layer's diff_id."""


class Catalog:
    """Image records and blobs, sharing a state dir's lock and store."""

    def __init__(self, state: StateDir, store: Store, owned: bool = False) -> None:
        self.state = state
        self.store = store
        self.content = ContentStore(state.root)
        self._owned = owned

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None) -> Catalog:
        state = StateDir(root)
        state.ensure()
        return cls(state, Store(state), owned=True)

    @classmethod
    def of(cls, storage: Storage) -> Catalog:
        """The catalog of `storage`'s state dir, under the same lock (no deadlock
        when called inside `storage.changing()`)."""
        return cls(storage.state, storage.store)

    def close(self) -> None:
        if self._owned:
            self.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scratch(self) -> Path:
        return self.state.root / "tmp"

    # -- reading --------------------------------------------------------------------

    def find(self, ref: str) -> tuple[records.Record, Image] | None:
        record = records.find(self.store, ref)
        return None if record is None else (record, load(self.content, record.digest))

    def get(self, ref: str) -> tuple[records.Record, Image]:
        record = records.get(self.store, ref)
        return record, load(self.content, record.digest)

    def list(self) -> list[tuple[records.Record, Image | None, str | None]]:
        """Every image with its manifest and config, or, for one whose blobs are
        lost or overwritten, None and why: one damaged image must not hide the
        others, nor itself from `image rm`."""
        found: list[tuple[records.Record, Image | None, str | None]] = []
        for record in records.all_records(self.store):
            try:
                found.append((record, load(self.content, record.digest), None))
            except MinifsError as exc:
                found.append((record, None, str(exc)))
        return found

    def unpacked_on(self, image: Image) -> list[str]:
        """Drivers holding the image's whole stack."""
        if image.top is None:
            return []
        return self.store.drivers_of([image.top], Kind.LAYER)

    # -- adding ------------------------------------------------------------------------

    def add(self, staging: Staging, names: list[str], digest: str, needed: set[str]) -> None:
        """Publish a staged image under `names`, atomically with its blobs."""
        self.add_all(staging, [(names, digest, needed)])

    def add_all(self, staging: Staging, images: list[tuple[list[str], str, set[str]]]) -> None:
        """Publish staged images (names, manifest digest, blobs): every blob first,
        then every record, so a failure part-way publishes no image at all (blobs
        without a record are what `image rm`'s garbage collection removes)."""
        with self.state.locked():
            staging.commit(set().union(*({digest, *needed} for _, digest, needed in images)))
            for names, digest, _ in images:
                for name in names:
                    records.put(self.store, name, digest)

    # -- removing ----------------------------------------------------------------------

    def untag_or_claim(self, ref: str) -> RemoveReport:
        """Remove the record `ref`, refusing while a snapshot depends on its
        layers; returns what is left to clean (layers per driver, blobs)."""
        with self.state.locked():
            record = records.get(self.store, ref)
            report = RemoveReport(name=record.name, digest=record.digest)
            others = [r for r in records.all_records(self.store) if r.name != record.name]
            if any(r.digest == record.digest for r in others):
                records.delete(self.store, record.name)
                return report  # another name keeps the image: only the name goes
            try:
                image = load(self.content, record.digest)
            except MinifsError:
                # Damaged: without its manifest its layers cannot be told from
                # others', so only the name goes; what was unpacked from it
                # stays for 'minifs rm', and no clone loses its parent.
                records.delete(self.store, record.name)
                return report
            user = self._dependent(image)
            if user is not None:
                raise InUse(
                    f"image {record.name} is in use by {user.kind.value} {user.name} on "
                    f"{user.driver}; remove it first ('minifs rm -d {user.driver} {user.name}')"
                )
            records.delete(self.store, record.name)
            kept: set[str] = set()
            for _, other, _ in self.list():
                if other is not None:
                    kept |= {layer.chain_id for layer in other.layers}
            report.layers = [
                c for c in (x.chain_id for x in reversed(image.layers)) if c not in kept
            ]
            return report

    def _dependent(self, image: Image) -> Info | None:
        """A snapshot not made by unpacking that sits on the image's top layer."""
        if image.top is None:
            return None
        for driver in self.store.drivers_of():
            top = self.store.get(driver, image.top)
            stack = [top.id] if top else []
            while stack:
                for child in self.store.children(stack.pop()):
                    if LAYER_LABEL not in child.labels or child.kind is not Kind.LAYER:
                        return child
                    stack.append(child.id)
        return None

    def _blobs(self, digest: str, image: Image | None) -> set[str]:
        """The blobs an image needs; of a damaged one, those its manifest still
        names: kept, so that repairing the one lost blob is enough."""
        if image is not None:
            return {digest, image.config_digest, *(x.digest for x in image.layers)}
        try:
            manifest = parse_json(self.content.read(digest), f"manifest {digest}")
            config, layers = check_manifest(manifest, f"manifest {digest}")
        except MinifsError:
            return {digest}
        return {digest, config["digest"], *(d["digest"] for d in layers)}

    def collect_garbage(self) -> list[str]:
        """Remove blobs no image references; returns their digests."""
        with self.state.locked():
            used: set[str] = set()
            for record, image, _ in self.list():
                used |= self._blobs(record.digest, image)
            unused = sorted(self.content.digests() - used)
            for digest in unused:
                self.content.remove(digest)
            return unused


class RemoveReport:
    """What `minifs image rm` untagged, and the layers and blobs that went with it."""

    def __init__(self, name: str, digest: str) -> None:
        self.name = name
        self.digest = digest
        self.layers: list[str] = []
        self.removed_layers: dict[str, list[str]] = {}
        self.removed_blobs: list[str] = []

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "digest": self.digest,
            "removed_layers": self.removed_layers,
            "removed_blobs": self.removed_blobs,
        }


def remove_image(root: str | os.PathLike[str] | None, ref: str) -> RemoveReport:
    """`minifs image rm`: drop the record, then its layers no other image or
    snapshot needs on every driver, then unreferenced blobs."""
    with Catalog.open(root) as catalog:
        report = catalog.untag_or_claim(ref)
        if report.layers:
            for driver in catalog.store.drivers_of(report.layers):
                try:
                    storage = Storage(driver, catalog.state.root)
                except MinifsError:
                    continue  # driver not available here: its layers stay until 'minifs rm'
                with storage:
                    report.removed_layers[driver] = _remove_layers(storage, report.layers)
        report.removed_blobs = catalog.collect_garbage()
        return report


def _remove_layers(storage: Storage, chain_ids: list[str]) -> list[str]:
    """Remove unpacked layers top-down, stopping at the first one still needed."""
    removed = []
    with storage.changing():
        for chain_id in chain_ids:
            info = storage.find(chain_id)
            if info is None:
                continue
            if info.kind is not Kind.LAYER or LAYER_LABEL not in info.labels:
                break
            if storage.children(info):
                break
            storage.remove(chain_id)
            removed.append(chain_id)
    return removed


# -- unpacking -----------------------------------------------------------------------


def unpack(storage: Storage, catalog: Catalog, image: Image, allow_devices: bool = True) -> str:
    """The name of the layer holding `image` on `storage`'s driver, unpacking
    the layers that are missing."""
    if image.top is None:
        raise InvalidArgument(f"image {image.digest} has no layers; there is nothing to clone")
    parent: str | None = None
    for layer in image.layers:
        if not _unpacked(storage, layer.chain_id):
            # One unpack of a layer at a time per driver; other layers and
            # other commands go on meanwhile (the state dir's lock is only
            # taken by each step inside).
            with storage.state.working_on(f"unpack-{storage.name}-{layer.chain_id[7:]}"):
                if not _unpacked(storage, layer.chain_id):  # not by whoever held it before
                    _unpack_layer(storage, catalog, layer, parent, allow_devices)
        parent = layer.chain_id
    assert parent is not None
    return parent


def _unpacked(storage: Storage, chain_id: str) -> bool:
    info = storage.find(chain_id)
    if info is not None and info.kind is not Kind.LAYER:
        raise InvalidArgument(
            f"{chain_id} on {storage.name} is a {info.kind.value}, not an "
            f"unpacked layer; remove it with 'minifs rm {chain_id}'"
        )
    return info is not None


def _unpack_layer(
    storage: Storage, catalog: Catalog, layer: Layer, parent: str | None, allow_devices: bool
) -> None:
    """Apply one layer into a transient clone of `parent` and commit it under
    the layer's chain id. The clone is labelled with this process: recovery
    removes it only once this process is gone."""
    from minifs.layers.snapshots import apply_to  # only when something to unpack

    work = f"unpack-{layer.chain_id[7:19]}-{os.urandom(4).hex()}"
    storage.clone(work, parent, {TRANSIENT_LABEL: owner_tag()})
    try:
        apply_to(
            storage,
            work,
            catalog.content.path(layer.digest),
            expected_diff_id=layer.diff_id,
            allow_devices=allow_devices,
        )
        failpoints.hit("unpack:after-apply")
        storage.snapshot(work, layer.chain_id, {LAYER_LABEL: layer.diff_id})
    except BaseException as exc:
        storage.remove(work)
        if isinstance(exc, MinifsError):
            raise type(exc)(f"cannot unpack layer {layer.digest}: {exc}") from None
        raise
