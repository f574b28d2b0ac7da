"""`minifs image import`: docker/podman save archives, OCI layouts, rootfs tars.

What a file is, is decided by its content, not its name: an OCI image layout
(`index.json`, directory or tar), a `docker save` / `podman save` archive
(`manifest.json`), or else a plain root filesystem tar that becomes a one-layer
image. Any of these may be gzip'd or zstd'd as a whole.

Every blob is copied into a private staging area and checked against its
digest; every layer is then validated in full (the same first pass an apply
makes: hostile entries, diff_id, size limit) before anything is published, so
a bad archive leaves the content store and the records as they were. Names
inside the archive's JSON are confined to the archive too: a manifest pointing
at `../../etc/shadow` is refused, not read.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from minifs.errors import InvalidArgument, NotFound
from minifs.images import oci, records
from minifs.images.catalog import Catalog
from minifs.images.content import Staging, check_digest
from minifs.layers.apply import validate
from minifs.layers.compression import NONE, default_limit, open_tar, sniff
from minifs.layers.tarformat import DIR, FILE, HARDLINK, SYMLINK, BadLayer, TarReader

MAX_MEMBERS = 10_000
"""An image archive has a handful of members per layer; a tar with more than
this is taken for a root filesystem without reading it all."""


@dataclass(frozen=True)
class Imported:
    name: str
    digest: str
    layers: int

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "digest": self.digest, "layers": self.layers}


# -- archives: a directory or a tar, read by member name --------------------------


def _clean(name: str, what: str) -> str:
    """A path named by the archive's own JSON, confined to the archive."""
    normal = posixpath.normpath(name.lstrip("/")) if name else ""
    if not name or name.startswith("/") or normal == ".." or normal.startswith("../"):
        raise InvalidArgument(f"{what} names {name[:100]!r}, which is outside the archive")
    return normal


class _Layout:
    """An archive unpacked in a directory (an OCI layout dir)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def open(self, name: str, what: str) -> BinaryIO:
        path = (self.root / _clean(name, what)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"{what} {name!r} leads outside {self.root}")
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{what} {name!r} is missing from {self.root}") from None


class _Slice(io.RawIOBase):
    """`size` bytes of a file from `offset`: one member of an uncompressed tar."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed with the slice
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _TarArchive:
    """An uncompressed tar read in place: members found by name, symlinks and
    hard links resolved inside the archive."""

    def __init__(self, path: Path, members: dict[str, tuple[str, int, int, str]]) -> None:
        self.path = path
        self.members = members

    def _find(self, name: str, what: str) -> tuple[int, int]:
        for _ in range(16):
            member = self.members.get(name)
            if member is None:
                raise NotFound(f"{what} {name!r} is missing from the archive")
            kind, offset, size, link = member
            if kind == FILE:
                return offset, size
            if kind == SYMLINK:
                name = _clean(posixpath.join(posixpath.dirname(name), link), what)
            elif kind == HARDLINK:
                name = _clean(link, what)
            else:
                raise InvalidArgument(f"{what} {name!r} is a {kind}, not a file")
        raise InvalidArgument(f"{what} {name!r}: too many levels of links")

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str, what: str) -> BinaryIO:
        offset, size = self._find(_clean(name, what), what)
        return _Slice(self.path, offset, size)  # type: ignore[return-value]


def _scan(path: Path) -> dict[str, tuple[str, int, int, str]] | None:
    """The members of an image archive, or None for anything else."""
    members: dict[str, tuple[str, int, int, str]] = {}
    with open(path, "rb") as raw:
        reader = TarReader(open_tar(raw))  # type: ignore[arg-type]
        for entry in reader:
            if len(members) >= MAX_MEMBERS:
                return None
            name = posixpath.normpath(entry.name.decode("utf-8", "replace").lstrip("/"))
            if entry.type != DIR:
                link = entry.linkname.decode("utf-8", "replace")
                members[name] = (entry.type, reader.offset, entry.size, link)
    if "manifest.json" in members or "index.json" in members:
        return members
    return None


# -- the three formats ---------------------------------------------------------------


def _read(archive: _Layout | _TarArchive, name: str, what: str) -> bytes:
    with archive.open(name, what) as f:
        return f.read(4 << 20)


def _json_list(data: bytes) -> list[Any]:
    import json

    try:
        document = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(document, list):
        raise InvalidArgument("manifest.json is not a list of images")
    return document


@dataclass
class _Candidate:
    names: list[str]
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    validated: bool = False


def _stage_blob(staging: Staging, archive: _Layout | _TarArchive, digest: str, what: str) -> None:
    check_digest(digest)
    if staging.has(digest):
        return
    with archive.open(f"blobs/sha256/{digest[7:]}", what) as f:
        staging.add_stream(f, expected=digest)


def _from_oci(archive: _Layout | _TarArchive, staging: Staging, stem: str) -> Iterator[_Candidate]:
    index = oci.parse_json(_read(archive, "index.json", "index.json"), "index.json")
    yield from _walk_index(archive, staging, index, stem, "index.json")


def _walk_index(
    archive: _Layout | _TarArchive, staging: Staging, index: dict, stem: str, what: str
) -> Iterator[_Candidate]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what} has no manifests list")
    for desc in manifests:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise InvalidArgument(f"{what} has a manifest descriptor without a digest")
        digest = desc["digest"]
        media_type = desc.get("mediaType", oci.OCI_MANIFEST)
        platform = desc.get("platform") or {}
        if platform and (
            platform.get("os") != "linux" or platform.get("architecture") != oci.host_arch()
        ):
            continue
        _stage_blob(staging, archive, digest, f"blob {digest}")
        blob = staging.path(digest).read_bytes()
        if media_type in oci.INDEX_TYPES:
            nested = oci.parse_json(blob, f"index {digest}")
            yield from _walk_index(archive, staging, nested, stem, f"index {digest}")
            continue
        manifest = oci.parse_json(blob, f"manifest {digest}")
        config_desc, layer_descs = oci.check_manifest(manifest, f"manifest {digest}")
        _stage_blob(staging, archive, config_desc["digest"], "config blob")
        config = oci.parse_json(staging.path(config_desc["digest"]).read_bytes(), "config")
        for layer in layer_descs:
            _stage_blob(staging, archive, layer["digest"], "layer blob")
        annotations = desc.get("annotations") or {}
        ref = annotations.get("io.containerd.image.name") or annotations.get(
            "org.opencontainers.image.ref.name"
        )
        names = []
        if isinstance(ref, str) and ref:
            names.append(ref if ("/" in ref or ":" in ref) else f"{stem}:{ref}")
        yield _Candidate(
            names,
            digest,
            config_desc["digest"],
            [d["digest"] for d in layer_descs],
            oci.diff_ids_of(config, len(layer_descs), f"manifest {digest}"),
        )


def _from_docker(archive: _TarArchive | _Layout, staging: Staging) -> Iterator[_Candidate]:
    for number, item in enumerate(_json_list(_read(archive, "manifest.json", "manifest.json"))):
        what = f"manifest.json entry {number}"
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
            raise InvalidArgument(f"{what} has no Config")
        layers = item.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise InvalidArgument(f"{what} has no Layers list")
        with archive.open(item["Config"], f"{what} Config") as f:
            config_digest = staging.add_stream(f)
        config_bytes = staging.path(config_digest).read_bytes()
        config = oci.parse_json(config_bytes, f"{what} config")
        descriptors = []
        for layer in layers:
            with archive.open(layer, f"{what} layer") as f:
                digest = staging.add_stream(f)
            with open(staging.path(digest), "rb") as f:
                kind = sniff(f.read(8))
            descriptors.append(
                oci.descriptor(oci.LAYER_TYPES[kind], digest, staging.path(digest).stat().st_size)
            )
        manifest = oci.manifest_for(
            oci.descriptor(oci.OCI_CONFIG, config_digest, len(config_bytes)), descriptors
        )
        tags = item.get("RepoTags") or []
        yield _Candidate(
            [t for t in tags if isinstance(t, str)],
            staging.add_bytes(oci.dumps(manifest)),
            config_digest,
            [d["digest"] for d in descriptors],
            oci.diff_ids_of(config, len(descriptors), what),
        )


def _from_rootfs(path: Path, staging: Staging, allow_devices: bool) -> _Candidate:
    with open(path, "rb") as f:
        layer_digest = staging.add_stream(f)
    stats = validate(staging.path(layer_digest), allow_devices=allow_devices)
    with open(staging.path(layer_digest), "rb") as f:
        kind = sniff(f.read(8))
    config = oci.config_for(
        [stats.diff_id], {"Env": [oci.DEFAULT_PATH]}, f"minifs image import {path.name}"
    )
    config_bytes = oci.dumps(config)
    config_digest = staging.add_bytes(config_bytes)
    layer_size = staging.path(layer_digest).stat().st_size
    manifest = oci.manifest_for(
        oci.descriptor(oci.OCI_CONFIG, config_digest, len(config_bytes)),
        [oci.descriptor(oci.LAYER_TYPES[kind], layer_digest, layer_size)],
    )
    manifest_digest = staging.add_bytes(oci.dumps(manifest))
    return _Candidate([], manifest_digest, config_digest, [layer_digest], [stats.diff_id], True)


def _stem(path: Path) -> str:
    name = path.name.lower()
    name = re.sub(r"(\.tar)?(\.gz|\.tgz|\.zst|\.zstd)?$", "", name) or "image"
    name = re.sub(r"\.(tar|oci)$", "", name) or "image"
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip(".-_") or "image"


# -- entry point ------------------------------------------------------------------------


def import_path(
    root: str | os.PathLike[str] | None,
    path: str | os.PathLike[str],
    name: str | None = None,
    allow_devices: bool = True,
) -> list[Imported]:
    """Import every image in `path`; all or nothing."""
    source = Path(path)
    if not source.exists():
        raise NotFound(
            f"{source} does not exist; give a docker/podman save archive, an OCI "
            "layout (directory or tar) or a root filesystem tar"
        )
    wanted = records.normalize(name) if name else None
    stem = _stem(source)
    with Catalog.open(root) as catalog, catalog.content.staging(catalog.scratch) as staging:
        try:
            candidates = _candidates(source, staging, stem, allow_devices)
        except BadLayer as exc:
            raise BadLayer(f"{source} is not a readable archive: {exc}") from None
        if wanted and len(candidates) > 1:
            raise InvalidArgument(
                f"{source} holds {len(candidates)} images; --name names only one, so leave it out"
            )
        validated: set[str] = set()
        for candidate in candidates:
            for digest, diff_id in zip(candidate.layer_digests, candidate.diff_ids, strict=True):
                if digest in validated or candidate.validated:
                    continue
                try:
                    validate(
                        staging.path(digest),
                        expected_diff_id=diff_id,
                        allow_devices=allow_devices,
                    )
                except BadLayer as exc:
                    raise BadLayer(f"{source}: layer {digest[:19]} refused: {exc}") from None
                validated.add(digest)
            if not candidate.layer_digests:
                raise InvalidArgument(f"{source}: image {candidate.manifest_digest} has no layers")
        done = []
        for candidate in candidates:
            names = [wanted] if wanted else [records.normalize(n) for n in candidate.names]
            if not names:
                names = [records.normalize(stem)]
            needed = {candidate.config_digest, *candidate.layer_digests}
            catalog.add(staging, names, candidate.manifest_digest, needed)
            count = len(candidate.layer_digests)
            done += [Imported(n, candidate.manifest_digest, count) for n in names]
        return done


def _candidates(source: Path, staging: Staging, stem: str, allow_devices: bool) -> list[_Candidate]:
    if source.is_dir():
        layout = _Layout(source)
        if not layout.has("index.json"):
            raise InvalidArgument(f"{source} is a directory but not an OCI layout (no index.json)")
        return list(_from_oci(layout, staging, stem))
    with open(source, "rb") as f:
        compressed = sniff(f.read(8)) != NONE
    tar_path = source
    if compressed:
        tar_path = staging.where / "outer.tar"
        with open(source, "rb") as raw, open(tar_path, "wb") as out:
            stream = open_tar(raw, default_limit())
            while chunk := stream.read(1 << 20):
                out.write(chunk)
    members = _scan(tar_path)
    if members is None:
        if compressed:
            tar_path.unlink()
        return [_from_rootfs(source, staging, allow_devices)]
    archive = _TarArchive(tar_path, members)
    if archive.has("index.json") and archive.has("oci-layout"):
        return list(_from_oci(archive, staging, stem))
    return list(_from_docker(archive, staging))
