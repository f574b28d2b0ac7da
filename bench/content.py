"""What the bench writes, and the checks that it reads back what it wrote.

Every workload verifies its effect through the same mounts users get, so a
driver cannot look fast by doing nothing: content read back after a remount,
the layer under a clone unchanged, a file really living in the bottom layer.
"""

from __future__ import annotations

import random
from pathlib import Path

from minifs.errors import BackendError

IMAGE_DIRS = 16
IMAGE_FILES_PER_DIR = 16
IMAGE_FILE_SIZE = 4096
TARGET = "bench-target"
"""The file lookups go after; it sits at the image root, in the bottom layer."""
TARGET_SIZE = 4096
MISSING = "bench-absent"
"""A name that exists in no layer: a lookup must search every one of them."""

IMAGE_INODES = IMAGE_DIRS * (IMAGE_FILES_PER_DIR + 1) + 1
IMAGE_BYTES = (IMAGE_DIRS * IMAGE_FILES_PER_DIR + 1) * IMAGE_FILE_SIZE + IMAGE_DIRS * 4096

_PERIOD = 1 << 20


class VerificationFailed(BackendError):
    """A workload's effect is not visible: the driver did not do what it was asked."""


def pattern(seed: int, size: int) -> bytes:
    """`size` deterministic bytes; a 1 MiB random block repeated keeps 64 MiB cheap
    to make while every 4 KiB block within a period differs from its neighbours."""
    block = random.Random(seed).randbytes(min(size, _PERIOD))
    repeats = -(-size // len(block)) if block else 0
    return (block * repeats)[:size]


def _image_file(d: int, f: int) -> tuple[str, bytes]:
    return f"d{d:02}/f{f:02}", pattern(d * IMAGE_FILES_PER_DIR + f, IMAGE_FILE_SIZE)


def target_content() -> bytes:
    return pattern(-1, TARGET_SIZE)


def write_image(root: Path) -> None:
    """A small image of the shape base images have: many small files in a few dirs."""
    for d in range(IMAGE_DIRS):
        (root / f"d{d:02}").mkdir()
        for f in range(IMAGE_FILES_PER_DIR):
            name, data = _image_file(d, f)
            (root / name).write_bytes(data)
    (root / TARGET).write_bytes(target_content())


def check_image(root: Path, what: str) -> None:
    """The image's first, last and lookup files read back intact under `root`."""
    samples = [_image_file(0, 0), _image_file(IMAGE_DIRS - 1, IMAGE_FILES_PER_DIR - 1)]
    for name, data in [*samples, (TARGET, target_content())]:
        check_bytes(root / name, 0, data, what)


def check_bytes(path: Path, offset: int, expected: bytes, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.read(len(expected))
    except OSError as exc:
        raise VerificationFailed(f"{what}: cannot read {path.name}: {exc.strerror}") from None
    if got != expected:
        raise VerificationFailed(
            f"{what}: {path.name} holds other bytes at offset {offset} than were written"
        )


def check(condition: bool, message: str) -> None:
    if not condition:
        raise VerificationFailed(message)
