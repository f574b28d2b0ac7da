"""File-backed disk images: the one place minifs makes and formats them.

Used wherever a backend needs a block device of its own: overlay2's loop-backed
store, the benchmark's dedicated disk per driver, and later a zpool or thin
pool on a loop device. Attaching and mounting go through `Resources`, so every
loop device and mount made from an image is recorded and torn down by `down()`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minifs.errors import BackendError, InvalidArgument
from minifs.resources import run

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "--nodiscard"],
}


MAX_IMAGE_SIZE = (1 << 63) - 1
"""The largest file size the kernel's off_t can express."""


def image_size(text: str, option: str, minimum: int, why: str) -> int:
    """The size `option=text` gives an image, refused in one line below
    `minimum` (`why`: what sets that floor) or beyond what a file can hold."""
    size = parse_size(text)
    if not minimum <= size <= MAX_IMAGE_SIZE:
        raise InvalidArgument(
            f"{option}={text} is out of range; give at least {minimum >> 20}M ({why}, "
            "e.g. 10G), and no more than a file can hold"
        )
    return size


def parse_size(text: str) -> int:
    """'512M', '10G', '4096' -> bytes (binary units, as truncate(1) reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidArgument(f"bad size {text!r}; write it like 512M or 10G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


FIT = 0.9
"""Share of the free space of a disk that a sparse image on it may be given.
A sparse image larger than the free space outgrows its disk: the filesystem
inside then meets ENOSPC from its block device (write errors, data lost at
writeback, zfs-fuse writers blocked for good) instead of a clean ENOSPC of
its own."""


def fitting_size(where: Path, wanted: int, minimum: int, what: str) -> int:
    """`wanted` bytes, or less where the disk holding `where` has less to spare;
    refused in one line below `minimum` (what the backend needs to exist)."""
    st = os.statvfs(where)
    fits = int(st.f_bavail * st.f_frsize * FIT) >> 20 << 20
    size = min(wanted, fits)
    if size < minimum:
        raise BackendError(
            f"{what} needs at least {minimum >> 20}M but {where} has {fits >> 20}M to "
            "spare; put the state dir on a larger disk"
        )
    return size


def make_image(path: Path, size: int, fstype: str | None = "ext4") -> None:
    """Create a sparse image of `size` bytes, formatted with `fstype` unless None.

    Built under a temporary name and renamed at the end, so a crash never
    leaves a half-formatted image that looks usable.
    """
    if fstype is not None and fstype not in _MKFS:
        raise InvalidArgument(f"cannot format {fstype}; known: {', '.join(sorted(_MKFS))}")
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.truncate(size)
        if fstype is not None:
            run([*_MKFS[fstype], str(partial)], f"format {path.name} as {fstype}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
