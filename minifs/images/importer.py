"""`minifs image import`: docker/podman save archives, OCI layouts, rootfs tars.

What a file is, is decided by its content, not its name: an OCI image layout
(`oci-layout` and `index.json`, directory or tar; Docker 25+ saves are one), a
`docker save` / `podman save` archive (`manifest.json`, with `<id>/layer.tar`
possibly a symlink to another layer's, resolved inside the archive), or else
a plain root filesystem tar that becomes a one-layer image. Any of these may
be gzip'd or zstd'd as a whole. An image index (multi-platform) gives the
image for linux on this host's architecture, or a one-line error listing what
it has. A member named by a digest (`<hex>.json`, `blobs/sha256/<hex>`) must
hash to it.

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
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from minifs import failpoints
from minifs.errors import InvalidArgument, MinifsError, NotFound
from minifs.images import oci, records
from minifs.images.catalog import Catalog
from minifs.images.content import MAX_JSON, Staging, check_digest
from minifs.layers.apply import validate
from minifs.layers.compression import NONE, default_limit, open_tar, sniff
from minifs.layers.safefs import Root
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
        # The resolved path has no symlinks left; opening it component by component
        # without following any means a link swapped in after `resolve` is refused,
        # not followed out of the layout.
        parts = [os.fsencode(p) for p in path.relative_to(self.root).parts]
        try:
            with Root(self.root) as root:
                parent = root.dir(parts[:-1])
                if parent is None:
                    raise FileNotFoundError
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(parts[-1], flags, dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(f"{what} {name!r} is missing from {self.root}") from None
        except OSError as exc:
            raise InvalidArgument(
                f"{what} {name!r} cannot be opened in {self.root} ({exc.strerror})"
            ) from None
        return os.fdopen(fd, "rb")


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
    """The members of a tar by normalised name, or None past MAX_MEMBERS (a
    root filesystem, not an image archive: it is not read further)."""
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
    return members


# -- the three formats ---------------------------------------------------------------


def _read(archive: _Layout | _TarArchive, name: str, what: str) -> bytes:
    with archive.open(name, what) as f:
        return _bounded(f.read(MAX_JSON + 1), what)


def _bounded(data: bytes, what: str) -> bytes:
    """JSON documents are small: a big one is refused, not parsed (or cut and
    then misread)."""
    if len(data) > MAX_JSON:
        raise InvalidArgument(f"{what} is larger than {MAX_JSON} bytes; it is not image metadata")
    return data


def _read_staged(staging: Staging, digest: str, what: str) -> bytes:
    with open(staging.path(digest), "rb") as f:
        return _bounded(f.read(MAX_JSON + 1), what)


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


MAX_NESTING = 4
"""An OCI layout's index.json may point at an image index (multi-platform),
which points at manifests; deeper nesting is refused, not recursed into."""


def _from_oci(archive: _Layout | _TarArchive, staging: Staging, stem: str) -> Iterator[_Candidate]:
    index = oci.parse_json(_read(archive, "index.json", "index.json"), "index.json")
    found = list(_walk_index(archive, staging, index, stem, "index.json", [], 0))
    if not found:
        raise NotFound(
            f"index.json has no image for {oci.host_platform()} "
            f"(it has {', '.join(_platforms(index)) or 'no manifests'})"
        )
    yield from found


def _platforms(index: dict) -> list[str]:
    return sorted({oci.platform_name(d.get("platform")) for d in index.get("manifests") or [] if d})


def _names(desc: dict, stem: str) -> list[str]:
    """The image's names from a descriptor's annotations: containerd's full image
    name, else the OCI ref name (a bare tag like `1.0` is taken as `STEM:1.0`)."""
    annotations = desc.get("annotations") or {}
    ref = annotations.get("io.containerd.image.name") or annotations.get(
        "org.opencontainers.image.ref.name"
    )
    if not isinstance(ref, str) or not ref:
        return []
    return [ref if ("/" in ref or ":" in ref) else f"{stem}:{ref}"]


def _walk_index(
    archive: _Layout | _TarArchive,
    staging: Staging,
    index: dict,
    stem: str,
    what: str,
    names: list[str],
    depth: int,
) -> Iterator[_Candidate]:
    """The images an index lists. Top level (depth 0): every descriptor is an
    image of its own. In a nested image index the descriptors are one image's
    platforms: only the first one for this host is taken, and none is an error."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what} has no manifests list")
    if depth > MAX_NESTING:
        raise InvalidArgument(f"{what}: image indexes nested more than {MAX_NESTING} deep")
    taken = 0
    for desc in manifests:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise InvalidArgument(f"{what} has a manifest descriptor without a digest")
        if not oci.platform_matches(desc.get("platform")):
            continue
        if depth and taken:
            break  # one platform per image
        digest = desc["digest"]
        media_type = desc.get("mediaType", oci.OCI_MANIFEST)
        _stage_blob(staging, archive, digest, f"blob {digest}")
        blob = _read_staged(staging, digest, f"blob {digest}")
        own = names or _names(desc, stem)
        if media_type in oci.INDEX_TYPES:
            nested = oci.parse_json(blob, f"index {digest}")
            found = list(
                _walk_index(archive, staging, nested, stem, f"index {digest}", own, depth + 1)
            )
            if not found:
                raise NotFound(
                    f"image index {digest[:19]} has no image for {oci.host_platform()} "
                    f"(it has {', '.join(_platforms(nested)) or 'no manifests'})"
                )
            taken += 1
            yield from found
            continue
        manifest = oci.parse_json(blob, f"manifest {digest}")
        config_desc, layer_descs = oci.check_manifest(manifest, f"manifest {digest}")
        _stage_blob(staging, archive, config_desc["digest"], "config blob")
        config = oci.parse_json(_read_staged(staging, config_desc["digest"], "config"), "config")
        for layer in layer_descs:
            _stage_blob(staging, archive, layer["digest"], "layer blob")
        taken += 1
        yield _Candidate(
            own,
            digest,
            config_desc["digest"],
            [d["digest"] for d in layer_descs],
            oci.diff_ids_of(config, len(layer_descs), f"manifest {digest}"),
        )


def _named_digest(name: str) -> str | None:
    """The digest a member's name claims (`<hex>.json`, `blobs/sha256/<hex>`), if any."""
    match = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?", name)
    return f"sha256:{match.group(1)}" if match else None


def _add_member(staging: Staging, archive: _TarArchive | _Layout, name: str, what: str) -> str:
    """Stage a member named by manifest.json; a name that is a digest must match."""
    expected = _named_digest(_clean(name, what))
    with archive.open(name, what) as f:
        return staging.add_stream(f, expected=expected)


def _from_docker(archive: _TarArchive | _Layout, staging: Staging) -> Iterator[_Candidate]:
    for number, item in enumerate(_json_list(_read(archive, "manifest.json", "manifest.json"))):
        what = f"manifest.json entry {number}"
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
            raise InvalidArgument(f"{what} has no Config")
        layers = item.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise InvalidArgument(f"{what} has no Layers list")
        config_digest = _add_member(staging, archive, item["Config"], f"{what} Config")
        config_bytes = _read_staged(staging, config_digest, f"{what} config")
        config = oci.parse_json(config_bytes, f"{what} config")
        descriptors = []
        for layer in layers:
            digest = _add_member(staging, archive, layer, f"{what} layer")
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
    name = re.sub(r"[^a-z0-9._-]+", "-", name)
    # Separators as image names allow them: one '.' or '_', '__', or dashes.
    return re.sub(r"[._-]{2,}", "-", name).strip(".-_") or "image"


# -- entry point ------------------------------------------------------------------------


def import_path(
    root: str | os.PathLike[str] | None,
    path: str | os.PathLike[str],
    name: str | None = None,
    allow_devices: bool = True,
) -> list[Imported]:
    """Import every image in `path`; all or nothing."""
    source = Path(path)
    _check_source(source)
    wanted = records.normalize(name) if name is not None else None
    stem = _stem(source)
    with Catalog.open(root) as catalog, catalog.content.staging(catalog.scratch) as staging:
        try:
            candidates = _candidates(source, staging, stem, allow_devices)
            failpoints.hit("import:after-staging")
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
            # An image without layers (umoci new, a config-only artifact) is kept:
            # cloning it says there is nothing to clone.
        # Every name is checked before the first image is published.
        named = [
            ([wanted] if wanted else [records.normalize(n) for n in c.names])
            or [records.normalize(stem)]
            for c in candidates
        ]
        catalog.add_all(
            staging,
            [
                (names, c.manifest_digest, {c.config_digest, *c.layer_digests})
                for c, names in zip(candidates, named, strict=True)
            ],
        )
        return [
            Imported(n, c.manifest_digest, len(c.layer_digests))
            for c, names in zip(candidates, named, strict=True)
            for n in names
        ]


def _check_source(source: Path) -> None:
    """A regular file or a directory. Anything else is read more than once
    (sniffed, scanned, copied), which a pipe cannot be, and a device may never
    end: /dev/zero would be copied into the state dir until its disk filled."""
    what = (
        "give a docker/podman save archive, an OCI layout (directory or tar) "
        "or a root filesystem tar"
    )
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        hint = (
            " (reading from stdin is not supported; save it to a file)"
            if str(source) == "-"
            else ""
        )
        raise NotFound(f"{source} does not exist{hint}; {what}") from None
    except OSError as exc:
        raise InvalidArgument(f"{source} cannot be read ({exc.strerror}); {what}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidArgument(
            f"{source} is not a regular file or directory (a device or a pipe); save the "
            "archive to a file and import that"
        )


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
    archive = _TarArchive(tar_path, members or {})
    if archive.has("index.json") and archive.has("oci-layout"):
        return list(_from_oci(archive, staging, stem))  # OCI, and Docker 25+ saves
    if archive.has("manifest.json") and _looks_like_docker(archive):
        return list(_from_docker(archive, staging))
    if compressed:
        tar_path.unlink()
    return [_from_rootfs(source, staging, allow_devices)]


def _looks_like_docker(archive: _TarArchive) -> bool:
    """A `docker save` archive, as opposed to a root filesystem that happens to
    hold a /manifest.json: its manifest is a JSON list, or it has the legacy
    `repositories` file or `<id>/layer.tar` members (then a broken manifest is
    an error, not a root filesystem)."""
    import json

    if archive.has("repositories") or any(n.endswith("/layer.tar") for n in archive.members):
        return True
    try:
        return isinstance(json.loads(_read(archive, "manifest.json", "manifest.json")), list)
    except (ValueError, MinifsError):
        return False
