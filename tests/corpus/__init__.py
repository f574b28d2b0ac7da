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
        Case("root-not-dir", tar_bytes([member("./", "symlink", linkname=target)]), "root"),
    ]
    return cases


def rich_layer() -> list[Member]:
    """A layer with every kind of entry and attribute a layer carries."""
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    return [
        member("bin", "dir"),
        member("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, xattrs={"user.note": "hi"}),
        member("bin/ping", data=b"ELF?", mode=0o755, xattrs={"security.capability": cap}),
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


def oci_layout(
    layers: Sequence[bytes], ref: str = "test/oci:1", compress: str = "gzip"
) -> list[Member]:
    """The members of an OCI image layout holding one image."""
    import json

    packed = [
        {"gzip": gzip_bytes, "zstd": zstd_bytes, "none": lambda b: b}[compress](layer)
        for layer in layers
    ]
    config_bytes = image_config([_digest(layer) for layer in layers])
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
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    members = [
        member("oci-layout", data=b'{"imageLayoutVersion": "1.0.0"}'),
        member("index.json", data=json.dumps(index).encode()),
        member("blobs", "dir"),
        member("blobs/sha256", "dir"),
    ]
    for blob in [config_bytes, manifest_bytes, *packed]:
        name = f"blobs/sha256/{_digest(blob)[7:]}"
        if name not in {m[0].name for m in members}:
            members.append(member(name, data=blob))
    return members
