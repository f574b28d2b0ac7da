"""minifs mount records as containerd's `Mount{type, source, options}`.

containerd mounts what a snapshotter returns itself, with its own
`mount.Mount` (1.6): mount(2) with the flags it knows (`bind`/`rbind`, `ro`,
…) split from the data, a read-only bind remounted, `loop` set up by
itself, `fuse.*`/`fuse3.*` types through the mount.fuse helpers. It mounts
every record at the root (1.6 ignores `target`), and its mount(2) takes
overlay options of one page at most: past 3584 bytes it shortens the lower
directories by their common parent (chdir there and name them relatively),
and past a page it gives up. minifs's own mounter passes longer lists
through the new mount API, which containerd 1.6 lacks.

So each record is checked for what containerd can do with it, and refused
in one line (not handed over to fail inside containerd) when it cannot.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

from minifs.errors import BackendError, TooManyLayers
from minifs.model import Mount
from minifs.mounter import split_options

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
COMPACT_AT = PAGE_SIZE - 512
"""containerd 1.6 shortens overlay options from this size on (mount_linux.go)."""


def to_containerd(records: Sequence[Mount]) -> list[tuple[str, str, list[str]]]:
    """`(type, source, options)` for each record, as containerd 1.6 mounts them."""
    below = [r.target for r in records if r.target]
    if below:
        raise BackendError(
            f"this driver mounts below the root too ({', '.join(below)}), and containerd "
            "1.6 mounts every record at the root; it cannot serve containerd"
        )
    out = []
    for record in records:
        if record.type == "overlay":
            _check_overlay_fits(record.options)
        out.append((record.type, record.source, list(record.options)))
    return out


def _check_overlay_fits(options: Sequence[str]) -> None:
    """Refuse an overlay whose options containerd's mount(2) cannot pass."""
    _, data = split_options(_compacted(options))
    if len(",".join(data)) > PAGE_SIZE:
        lowers = _lowerdirs(options)
        raise TooManyLayers(
            f"an overlay of {len(lowers)} layers needs more than one page of mount "
            "options, and containerd 1.6 mounts overlays with mount(2) only; use an "
            "image with fewer layers for containerd (minifs run mounts it)"
        )


def _lowerdirs(options: Sequence[str]) -> list[str]:
    return [d for o in options if o.startswith("lowerdir=") for d in o[9:].split(":")]


def _compacted(options: Sequence[str]) -> list[str]:
    """The options as containerd 1.6 passes them (compactLowerdirOption)."""
    if sum(len(o) for o in options) < COMPACT_AT:
        return list(options)
    dirs = _lowerdirs(options)
    if len(dirs) < 2:
        return list(options)
    # By characters, as containerd's longestCommonPrefix, then its directory.
    common = posixpath.dirname(os.path.commonprefix(dirs))  # noqa: RUF071
    if common in ("", "/"):
        return list(options)
    short = [d[len(common) + 1 :] for d in dirs]
    return [o for o in options if not o.startswith("lowerdir=")] + ["lowerdir=" + ":".join(short)]
