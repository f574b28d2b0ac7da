"""Record a mounted tree as a plain, comparable dict.

Driver tests compare trees rather than poke at single files: a layer read back
through a clone, a view, another driver or an unpacked OCI layer must give the
same record as the tree that was written. `record(path)` keeps everything a
container image carries (types, modes, owners, content, link targets, device
numbers, xattrs, hard links) and leaves out what legitimately differs between
backends: inode numbers, directory sizes and link counts (hard links are kept
as groups of paths instead), times (optional, and for non-directories only).

`trusted.overlay.*` xattrs are skipped: overlayfs hides them in a merged view,
so keeping them would make an overlay2 diff dir differ from the same tree on
any other driver.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from minifs.layers import safefs

Entry = dict[str, Any]
Tree = dict[str, Entry]

HIDDEN_XATTR_PREFIXES = ("trusted.overlay.",)

_TYPES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISSOCK, "socket"),
)


def file_type(mode: int) -> str:
    """The name of a `st_mode`'s file type, as used in records."""
    for test, name in _TYPES:
        if test(mode):
            return name
    raise ValueError(f"unknown file type in mode {mode:o}")


def xattrs(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every readable xattr of `path` itself (not a symlink's target)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}  # e.g. a filesystem without xattr support
    values = {}
    for name in names:
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            continue
        values[name] = safefs.getxattr(path, name)  # size first: zfs-fuse, values > 128 B
    return dict(sorted(values.items()))


def sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry(path: str | os.PathLike[str], mtimes: bool = False) -> Entry:
    """The record of one path (without its hard-link group)."""
    st = os.lstat(path)
    kind = file_type(st.st_mode)
    record: Entry = {
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "xattrs": xattrs(path),
    }
    if kind == "file":
        record["size"] = st.st_size
        record["sha256"] = sha256(path)
    elif kind == "symlink":
        record["target"] = os.readlink(path)
    elif kind in ("char", "block"):
        record["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if mtimes and kind != "dir":
        # Directory times change whenever a layered filesystem creates its copy
        # of a directory, so only non-directories have a time worth comparing.
        record["mtime_ns"] = st.st_mtime_ns
    return record


def record(root: str | os.PathLike[str], mtimes: bool = False) -> Tree:
    """Every path under `root` (itself as "."), relative, with its entry.

    Paths that share an inode get `"hardlinks": (all paths of the group, sorted)`
    so two records compare equal only if the same paths are linked together.
    Mount points below `root` are not crossed.
    """
    root = Path(root)
    tree: Tree = {".": entry(root, mtimes)}
    root_dev = os.lstat(root).st_dev
    inodes: dict[tuple[int, int], list[str]] = {}
    for top, dirs, files in os.walk(root, onerror=_raise):
        for name in [*dirs, *files]:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root)
            tree[rel] = entry(full, mtimes)
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        # os.walk does not follow symlinks to directories; also stay on this mount.
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == root_dev]
    for paths in inodes.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for rel in paths:
                tree[rel]["hardlinks"] = group
    return dict(sorted(tree.items()))


def _raise(error: OSError) -> None:
    """os.walk skips unreadable directories silently; a record must not."""
    raise error


def hardlink_groups(tree: Tree) -> set[tuple[str, ...]]:
    """The distinct groups of hard-linked paths in a record."""
    return {e["hardlinks"] for e in tree.values() if "hardlinks" in e}


def differences(expected: Tree, actual: Tree) -> list[str]:
    """Human-readable differences, for assertion messages."""
    found = []
    for rel in sorted(expected.keys() | actual.keys()):
        if rel not in actual:
            found.append(f"{rel}: missing")
        elif rel not in expected:
            found.append(f"{rel}: unexpected {actual[rel]['type']}")
        else:
            a, b = expected[rel], actual[rel]
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    found.append(f"{rel}: {key} {a.get(key)!r} != {b.get(key)!r}")
    return found
