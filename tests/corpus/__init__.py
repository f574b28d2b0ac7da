"""Layer tars for tests, made at test time: well-formed ones and a hostile corpus.

Archives are written with Python's `tarfile` (an implementation independent
of minifs's own reader and writer), then bent where a case needs bytes no
honest writer produces (truncation, a bad checksum, trailing data). Each
hostile case names the entry its error must mention; `outside` is a host
directory the cases try to reach, which the tests check stays untouched.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

Member = tuple[tarfile.TarInfo, bytes]


def member(name: str, kind: str = "file", data: bytes = b"", **attrs: Any) -> Member:
    """A TarInfo: kind is file, dir, symlink, hardlink, char, block or fifo."""
    info = tarfile.TarInfo(name)
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "char": tarfile.CHRTYPE,
        "block": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    info.mode = attrs.pop("mode", 0o755 if kind == "dir" else 0o644)
    info.mtime = attrs.pop("mtime", 1_600_000_000)
    info.size = len(data) if kind == "file" else 0
    xattrs = attrs.pop("xattrs", {})
    # tarfile takes str values; surrogateescape carries binary ones (it then
    # writes them raw with hdrcharset=BINARY).
    info.pax_headers = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
        for k, v in xattrs.items()
    }
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(members: Sequence[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def gzip_bomb(decompressed: int) -> bytes:
    """A gzip stream of `decompressed` zero bytes, made of repeated members so
    building it costs a few milliseconds: each 16 MiB member is about 16 KiB."""
    chunk = 16 << 20
    one = zlib.compressobj(9, zlib.DEFLATED, 31)
    member_bytes = one.compress(bytes(chunk)) + one.flush()
    return member_bytes * (decompressed // chunk)


@dataclass
class Case:
    """One hostile archive and the entry (or phrase) its refusal must name."""

    name: str
    data: bytes
    mentions: str
    options: dict[str, Any] = field(default_factory=dict)


def _truncate_in_data() -> bytes:
    whole = tar_bytes([member("big", data=b"x" * 5000)])
    return whole[: 512 + 1000]


def _truncate_at_boundary() -> bytes:
    whole = tar_bytes([member("a", data=b"1"), member("b", data=b"2")])
    return whole[: 2 * 512]  # a's header and data, then nothing: no end-of-archive marker


def _bad_checksum() -> bytes:
    data = bytearray(tar_bytes([member("good", data=b"ok"), member("evil", data=b"no")]))
    data[1024 + 10] ^= 0x20  # flip a bit in the second header's name
    return bytes(data)


def _trailing() -> bytes:
    return tar_bytes([member("a", data=b"1")]) + tar_bytes([member("hidden", data=b"2")])


def _sparse() -> bytes:
    data = bytearray(tar_bytes([member("holes", data=b"")]))
    data[156] = ord("S")
    header = data[:512]
    header[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(header)
    return bytes(data)


def _patched(data: bytes, header: int, offset: int, field_: bytes) -> bytes:
    """`data` with bytes at `offset` of the header block `header` replaced, and
    that header's checksum made right again (so only the field is hostile)."""
    out = bytearray(data)
    start = header * 512
    out[start + offset : start + offset + len(field_)] = field_
    block = out[start : start + 512]
    block[148:156] = b" " * 8
    out[start + 148 : start + 156] = b"%06o\0 " % sum(block)
    return bytes(out)


def _ustar(members: Sequence[Member]) -> bytes:
    """Plain ustar (no PAX headers), so header N is block N for one-block entries."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _pax_raw(records: bytes, then: Sequence[Member]) -> bytes:
    """A hand-made PAX header (any bytes) followed by `then`."""
    head = tarfile.TarInfo("././@PaxHeader")
    head.type = tarfile.XHDTYPE
    head.size = len(records)
    block = head.tobuf(tarfile.USTAR_FORMAT)
    return block + records + bytes(-len(records) % 512) + _ustar(then)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return b"%d%s" % (length, body)


def _global_flood() -> bytes:
    """120 global headers of 10 distinct 1 KB keys: 1.2 MB kept for the whole archive."""
    blocks = []
    for n in range(120):
        chunk = b"".join(_record(b"c%04d.%d" % (n, i), b"v" * 1000) for i in range(10))
        head = tarfile.TarInfo("pax_global_header")
        head.type = tarfile.XGLTYPE
        head.size = len(chunk)
        blocks.append(head.tobuf(tarfile.USTAR_FORMAT) + chunk + bytes(-len(chunk) % 512))
    return b"".join(blocks) + _ustar([member("f", data=b"x")])


def _long_name_bomb() -> bytes:
    head = tarfile.TarInfo("././@LongLink")
    head.type = tarfile.GNUTYPE_LONGNAME
    head.size = 4 << 20
    return head.tobuf(tarfile.GNU_FORMAT) + b"a" * (4 << 20) + _ustar([member("f", data=b"x")])


def _zstd_bomb(size: int) -> bytes:
    """`size` zero bytes as zstd, fed in 1 MiB pieces so building it stays small."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as writer:
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            writer.write(zeros)
    return out.getvalue()


def hostile(outside: Path) -> list[Case]:
    """Every hostile case; `outside` is a directory on the host to aim at."""
    target = str(outside)
    good = [member("ok", "dir"), member("ok/file", data=b"fine")]
    cases = [
        Case("dotdot", tar_bytes([*good, member("../escape", data=b"x")]), "../escape"),
        Case(
            "dotdot-deep",
            tar_bytes([member("a", "dir"), member("a/../../escape", data=b"x")]),
            "a/../../escape",
        ),
        Case("absolute", tar_bytes([member(f"{target}/abs", data=b"x")]), f"{target}/abs"),
        Case(
            "symlink-then-through",
            tar_bytes(
                [member("link", "symlink", linkname=target), member("link/pwned", data=b"x")]
            ),
            "link/pwned",
        ),
        Case(
            "relative-symlink-through",
            tar_bytes(
                [member("up", "symlink", linkname="../../../../.."), member("up/pwned", data=b"x")]
            ),
            "up/pwned",
        ),
        Case(
            "symlink-dir-then-file",
            tar_bytes(
                [
                    member("d", "symlink", linkname=target),
                    member("d/sub", "dir"),
                    member("d/sub/f", data=b"x"),
                ]
            ),
            "d/sub",
        ),
        Case(
            "hardlink-outside",
            tar_bytes([member("hl", "hardlink", linkname=f"../{outside.name}/secret")]),
            "hl",
        ),
        Case(
            "hardlink-absolute",
            tar_bytes([member("hl", "hardlink", linkname=f"{target}/secret")]),
            "hl",
        ),
        Case(
            "hardlink-to-symlink",
            tar_bytes(
                [
                    member("s", "symlink", linkname=f"{target}/secret"),
                    member("hl", "hardlink", linkname="s"),
                ]
            ),
            "hl",
        ),
        Case(
            "hardlink-not-in-layer",
            tar_bytes([member("hl", "hardlink", linkname="etc/passwd")]),
            "hl",
        ),
        Case(
            "hardlink-later-entry",
            tar_bytes([member("hl", "hardlink", linkname="f"), member("f", data=b"x")]),
            "hl",
        ),
        Case("whiteout-dotdot", tar_bytes([member(".wh...", data=b"")]), ".wh..."),
        Case(
            "whiteout-dotdot-deep",
            tar_bytes([member("ok", "dir"), member("ok/.wh..", data=b"")]),
            "ok/.wh..",
        ),
        Case("whiteout-empty", tar_bytes([member(".wh.", data=b"")]), ".wh."),
        Case(
            "whiteout-meta",
            tar_bytes([member(".wh..wh.plnk", "dir")]),
            ".wh..wh.plnk",
        ),
        Case(
            "device-forbidden",
            tar_bytes([*good, member("dev/sda", "char", devmajor=8, devminor=0)]),
            "dev/sda",
            {"allow_devices": False},
        ),
        Case(
            "block-forbidden",
            tar_bytes([member("disk", "block", devmajor=7, devminor=0)]),
            "disk",
            {"allow_devices": False},
        ),
        Case(
            "duplicate",
            tar_bytes([member("twice", data=b"1"), member("twice", data=b"2")]),
            "twice",
        ),
        Case(
            "duplicate-dir",
            tar_bytes([member("d", "dir"), member("d/", "dir")]),
            "d",
        ),
        Case(
            "file-below-file",
            tar_bytes([member("f", data=b"x"), member("f/x", data=b"y")]),
            "f/x",
        ),
        Case(
            "trusted-xattr",
            tar_bytes([member("d", "dir", xattrs={"trusted.overlay.opaque": "y"})]),
            "trusted.overlay.opaque",
        ),
        Case(
            "user-xattr-on-symlink",
            tar_bytes([*good, member("ok/s", "symlink", linkname="file", xattrs={"user.x": "1"})]),
            "ok/s",
        ),
        Case("truncated-data", _truncate_in_data(), "truncated"),
        Case("truncated-boundary", _truncate_at_boundary(), "truncated"),
        Case("bad-checksum", _bad_checksum(), "checksum"),
        Case("trailing-archive", _trailing(), "after the end-of-archive"),
        Case("gnu-sparse", _sparse(), "holes"),
        Case(
            "gzip-bomb",
            gzip_bomb(256 << 20),
            "decompression bomb",
            {"limit": 32 << 20},
        ),
        Case("gzip-corrupt", gzip_bytes(tar_bytes(good))[:-12] + b"\0" * 12, "corrupt"),
        Case("gzip-truncated", gzip_bytes(tar_bytes(good))[:60], "corrupt"),
        Case(
            "diff-id-mismatch",
            tar_bytes(good),
            "diff_id",
            {"expected_diff_id": "sha256:" + "0" * 64},
        ),
        Case("not-a-tar", b"this is not a tar archive\n" * 40, "header"),
        # numeric fields
        Case(
            "negative-base256-uid",
            _patched(_ustar([member("neg", data=b"x")]), 0, 108, b"\xff" * 8),
            "neg",
        ),
        Case(
            "mtime-overflow",
            _patched(_ustar([member("late", data=b"x")]), 0, 136, b"\x80" + b"\x7f" * 11),
            "late",
        ),
        Case(
            "pax-mtime-overflow",
            tar_bytes([member("late", data=b"x", pax_headers={"mtime": "1" * 30})]),
            "late",
        ),
        Case(
            "device-number-overflow",
            _patched(_ustar([member("dev", "char", devmajor=1, devminor=3)]), 0, 329, b"\x80" * 8),
            "dev",
        ),
        Case(
            "size-beyond-stream",
            _patched(_ustar([member("huge", data=b"x")]), 0, 124, b"77777777777\0"),
            "huge",
        ),
        Case(
            "pax-size-beyond-stream",
            tar_bytes([member("huge", data=b"x", pax_headers={"size": "9" * 25})]),
            "huge",
        ),
        Case(
            "size-not-octal",
            _patched(_ustar([member("eight", data=b"x")]), 0, 124, b"00000000089\0"),
            "eight",
        ),
        Case(
            "pax-uid-overflow",
            tar_bytes([member("uid", data=b"x", pax_headers={"uid": "4294967296"})]),
            "uid",
        ),
        Case("pax-malformed", _pax_raw(b"99 path=x\n", [member("f")]), "PAX"),
        Case("pax-global-flood", _global_flood(), "global"),
        Case("gnu-long-name-bomb", _long_name_bomb(), "long name"),
        # names
        Case("nul-in-name", tar_bytes([member("a", pax_headers={"path": "a\0b"})]), "NUL"),
        Case("name-over-path-max", tar_bytes([member("d/" * 2100 + "f")]), "too long"),
        Case("component-over-name-max", tar_bytes([member("n" * 256)]), "too long"),
        Case("root-as-file", tar_bytes([member(".", "file")]), "root"),
        Case(
            "duplicate-via-double-slash",
            tar_bytes([member("a", "dir"), member("a/b", data=b"1"), member("a//b", data=b"2")]),
            "a//b",
        ),
        Case(
            "duplicate-via-dot",
            tar_bytes([member("x", "dir"), member("./x/.", "dir")]),
            "./x/.",
        ),
        # symlinks and hard links
        Case(
            "symlink-chain-escape",
            tar_bytes(
                [
                    member("a", "symlink", linkname="b"),
                    member("b", "symlink", linkname="c/../../.."),
                    member("c", "symlink", linkname=target),
                    member("a/pwned", data=b"x"),
                ]
            ),
            "a/pwned",
        ),
        Case(
            "dir-replaced-by-symlink-to-root",
            tar_bytes(
                [member("d", "dir"), member("d", "symlink", linkname="/"), member("d/pwned")]
            ),
            "d",
        ),
        Case(
            "opaque-in-symlink-dir",
            tar_bytes([member("s", "symlink", linkname="/"), member("s/.wh..wh..opq")]),
            "s/.wh..wh..opq",
        ),
        Case(
            "whiteout-in-symlink-dir",
            tar_bytes([member("s", "symlink", linkname=target), member("s/.wh.secret")]),
            "s/.wh.secret",
        ),
        Case(
            "hardlink-through-dotdot",
            tar_bytes([member("f", data=b"x"), member("hl", "hardlink", linkname="ok/../../f")]),
            "hl",
        ),
        Case(
            "hardlink-to-dir",
            tar_bytes([member("d", "dir"), member("hl", "hardlink", linkname="d")]),
            "hl",
        ),
        Case(
            "hardlink-to-itself",
            tar_bytes([member("hl", "hardlink", linkname="hl")]),
            "hl",
        ),
        # xattrs the kernel would refuse half-way
        Case(
            "xattr-too-big",
            tar_bytes([member("f", data=b"x", xattrs={"user.big": "v" * 70000})]),
            "user.big",
        ),
        Case(
            "xattr-nul-in-name",
            tar_bytes([member("f", data=b"x", pax_headers={"SCHILY.xattr.user.a\0b": "v"})]),
            "f",
        ),
        Case(
            "capability-garbage",
            tar_bytes([member("f", data=b"x", xattrs={"security.capability": b"\x01\x02"})]),
            "security.capability",
        ),
        Case(
            "acl-garbage",
            tar_bytes([member("f", data=b"x", xattrs={"system.posix_acl_access": "junk"})]),
            "system.posix_acl_access",
        ),
        Case(
            "zstd-bomb",
            _zstd_bomb(64 << 20),
            "decompression bomb",
            {"limit": 16 << 20},
        ),
        Case("root-not-dir", tar_bytes([member("./", "symlink", linkname=target)]), "root"),
    ]
    return cases


def rich_layer(xattrs: bool = True) -> list[Member]:
    """A layer with every kind of entry and attribute a layer carries (xattrs
    left out for a driver whose clones keep none: Driver.xattrs)."""
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    note = {"user.note": "hi"} if xattrs else {}
    capability = {"security.capability": cap} if xattrs else {}
    return [
        member("bin", "dir"),
        member("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, xattrs=note),
        member("bin/ping", data=b"ELF?", mode=0o755, xattrs=capability),
        member("bin/same", "hardlink", linkname="bin/tool"),
        member("etc", "dir", mode=0o750, uid=0, gid=42),
        member("etc/owned", data=b"mine\n", uid=1234, gid=5678, mode=0o600),
        member("etc/link", "symlink", linkname="../bin/tool"),
        member("etc/abs", "symlink", linkname="/etc/owned"),
        member("dev", "dir"),
        member("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        member("dev/loop9", "block", devmajor=7, devminor=9, mode=0o660),
        member("run", "dir"),
        member("run/pipe", "fifo", mode=0o620),
        member("tmp", "dir", mode=0o1777),
        member("deep/a/b/c", "dir"),
        member("deep/a/b/c/file", data=b"implicit parents\n"),
        member("ünïcode-名前", data=b"utf-8 name\n"),
        member("long/" + "n" * 200 + "/" + "m" * 150, data=b"long name\n"),
        member("empty", data=b""),
        member("big", data=bytes(range(256)) * 4096),
    ]


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(diff_ids: Sequence[str], config: dict[str, Any] | None = None) -> bytes:
    import json

    document = {
        "architecture": "amd64",
        "os": "linux",
        "config": config or {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return json.dumps(document).encode()


def docker_archive(
    layers: Sequence[bytes],
    tags: Sequence[str] = ("test/image:1",),
    config: dict[str, Any] | None = None,
    config_name: str | None = None,
) -> bytes:
    """A `docker save` archive of uncompressed layers (laid out as docker writes it)."""
    import json

    config_bytes = image_config([_digest(layer) for layer in layers], config)
    config_file = config_name or _digest(config_bytes)[7:] + ".json"
    members = [member(config_file, data=config_bytes)]
    paths = []
    for layer in layers:
        directory = _digest(layer)[7:]
        members += [member(directory, "dir"), member(f"{directory}/layer.tar", data=layer)]
        paths.append(f"{directory}/layer.tar")
    manifest = [{"Config": config_file, "RepoTags": list(tags), "Layers": paths}]
    members.append(member("manifest.json", data=json.dumps(manifest).encode()))
    return tar_bytes(members)


def _pack(layer: bytes, compress: str) -> bytes:
    return {"gzip": gzip_bytes, "zstd": zstd_bytes, "none": lambda b: b}[compress](layer)


def oci_image(
    layers: Sequence[bytes], compress: str = "gzip", config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's manifest descriptor (no annotations) and its blobs by digest."""
    import json

    packed = [_pack(layer, compress) for layer in layers]
    config_bytes = image_config([_digest(layer) for layer in layers], config)
    suffix = "" if compress == "none" else "+" + compress
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar" + suffix,
                "digest": _digest(blob),
                "size": len(blob),
            }
            for blob in packed
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    blobs = {_digest(b): b for b in [config_bytes, manifest_bytes, *packed]}
    descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _digest(manifest_bytes),
        "size": len(manifest_bytes),
    }
    return descriptor, blobs


def layout_members(descriptors: Sequence[dict[str, Any]], blobs: dict[str, bytes]) -> list[Member]:
    """An OCI image layout: oci-layout, index.json listing `descriptors`, blobs."""
    import json

    index = {"schemaVersion": 2, "manifests": list(descriptors)}
    members = [
        member("oci-layout", data=b'{"imageLayoutVersion": "1.0.0"}'),
        member("index.json", data=json.dumps(index).encode()),
        member("blobs", "dir"),
        member("blobs/sha256", "dir"),
    ]
    members += [member(f"blobs/sha256/{d[7:]}", data=b) for d, b in sorted(blobs.items())]
    return members


def oci_layout(
    layers: Sequence[bytes], ref: str = "test/oci:1", compress: str = "gzip"
) -> list[Member]:
    """The members of an OCI image layout holding one image."""
    descriptor, blobs = oci_image(layers, compress)
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": ref}
    return layout_members([descriptor], blobs)


def image_index(
    platforms: dict[str, dict[str, Any] | None], blobs: dict[str, bytes]
) -> dict[str, Any]:
    """Add an image index to `blobs` listing a manifest per "os/arch[/variant]"
    (None: a manifest whose blob is absent, as in a partial multi-arch copy);
    returns the index's descriptor."""
    import json

    manifests = []
    for name, descriptor in platforms.items():
        os_, arch, *variant = name.split("/")
        if descriptor is None:
            descriptor = {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(name.encode()),
                "size": 1,
            }
        platform = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        manifests.append({**descriptor, "platform": platform})
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    data = json.dumps(index).encode()
    blobs[_digest(data)] = data
    return {"mediaType": index["mediaType"], "digest": _digest(data), "size": len(data)}


def docker25_archive(
    layers: Sequence[bytes], tag: str = "test/d25:1", compress: str = "none"
) -> bytes:
    """A Docker 25+ `docker save`: an OCI layout plus the legacy manifest.json
    whose paths point into blobs/sha256 (uncompressed layers with the graph
    driver store, the pulled gzip blobs with the containerd store)."""
    import json

    descriptor, blobs = oci_image(layers, compress)
    repo, _, version = tag.rpartition(":")
    descriptor["annotations"] = {
        "io.containerd.image.name": f"docker.io/{repo}:{version}",
        "org.opencontainers.image.ref.name": version,
    }
    manifest = json.loads(blobs[descriptor["digest"]])
    legacy = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
            "RepoTags": [tag],
            "Layers": ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]],
        }
    ]
    members = layout_members([descriptor], blobs)
    members.append(member("manifest.json", data=json.dumps(legacy).encode()))
    repositories = {repo: {version: manifest["config"]["digest"][7:]}}
    members.append(member("repositories", data=json.dumps(repositories).encode()))
    return tar_bytes(members)


def docker_legacy_archive(
    layers: Sequence[bytes], tag: str = "test/legacy:1", layer_links: dict[int, str] | None = None
) -> bytes:
    """A pre-25 `docker save`: `<id>/layer.tar`, `<id>/json`, `<id>/VERSION` per
    layer, `<config hex>.json`, manifest.json and repositories. A layer whose
    content equals an earlier one's is stored once: its `layer.tar` is a symlink
    `../<first id>/layer.tar`, as moby writes it. `layer_links` overrides the
    symlink target of layer N (for hostile cases)."""
    import hashlib
    import json

    config_bytes = image_config([_digest(layer) for layer in layers])
    config_file = _digest(config_bytes)[7:] + ".json"
    members = [member(config_file, data=config_bytes)]
    first_dir: dict[bytes, str] = {}
    ids: list[str] = []
    for number, layer in enumerate(layers):
        parent = ids[-1] if ids else ""
        layer_id = hashlib.sha256(f"{parent} {_digest(layer)}".encode()).hexdigest()
        v1 = {"id": layer_id, "created": "1970-01-01T00:00:00Z", "container_config": {}}
        if parent:
            v1["parent"] = parent
        members += [
            member(layer_id, "dir"),
            member(f"{layer_id}/VERSION", data=b"1.0"),
            member(f"{layer_id}/json", data=json.dumps(v1).encode()),
        ]
        link = (layer_links or {}).get(number)
        if link is None and layer in first_dir:
            link = f"../{first_dir[layer]}/layer.tar"
        if link is None:
            members.append(member(f"{layer_id}/layer.tar", data=layer))
            first_dir[layer] = layer_id
        else:
            members.append(member(f"{layer_id}/layer.tar", "symlink", linkname=link))
        ids.append(layer_id)
    repo, _, version = tag.rpartition(":")
    manifest = [
        {"Config": config_file, "RepoTags": [tag], "Layers": [f"{i}/layer.tar" for i in ids]}
    ]
    members.append(member("manifest.json", data=json.dumps(manifest).encode()))
    members.append(member("repositories", data=json.dumps({repo: {version: ids[-1]}}).encode()))
    return tar_bytes(members)
