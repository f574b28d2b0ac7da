"""What `minifs bench` was asked to do, checked in full before any work.

Every check that can fail happens here, before a disk is made, so bad input
costs nothing and leaves nothing: unknown or unavailable drivers (with their
probe's reason), a sweep deeper than a driver can stack, a disk too small for
the work, a host without room for the disks, a results file that could not be
written at the end, no root.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minifs.errors import InvalidArgument, MinifsError, NotSupported
from minifs.loopdisk import parse_size
from minifs.plugins import Registered, registered
from minifs.state import resolve_root
from minifs_bench import amplification, footprint, results
from minifs_bench.content import IMAGE_BYTES, IMAGE_INODES
from minifs_bench.options import METRICS
from minifs_bench.stats import depth_sweep

LAYER_CAP = 1000
"""Deepest sweep for a driver without a stacking limit of its own."""
RUNS_CAP = 1000
MiB = 1 << 20
MIN_DISK = 2 << 30
FS_RESERVE = 160 * MiB
"""Journal, metadata and slack of a fresh ext4 on the bench disk."""
EXT4_BYTES_PER_INODE = 16384
"""mke2fs's default inode_ratio: an ext4 disk has one inode per this many bytes."""


@dataclass
class Settings:
    drivers: list[str]
    layers: int
    metrics: list[str]
    runs: int
    disk_sizes: dict[str, int]
    out: Path | None
    root: Path
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def depths(self) -> list[int]:
        return depth_sweep(self.layers)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["depths"] = self.depths
        del data["skipped"]
        return data


def _metrics(text: str) -> list[str]:
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise InvalidArgument(
            f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)}"
        )
    return [m for m in METRICS if m in wanted]


def _drivers(text: str, available: Mapping[str, Registered]) -> tuple[list[str], dict[str, str]]:
    """Driver names to run, and the ones `all` skips with their probe's reason."""
    reasons: dict[str, str] = {}
    for name, reg in sorted(available.items()):
        try:
            reg.driver.probe()
        except MinifsError as exc:
            reasons[name] = str(exc)
    if text.strip() == "all":
        names = [n for n in sorted(available) if n not in reasons]
        if not names:
            raise NotSupported("no driver can run here; see 'minifs drivers' for why")
        return names, reasons
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise InvalidArgument("--driver names no driver; pass one, several, or 'all'")
    for name in names:
        if name not in available:
            known = ", ".join(sorted(available)) or "none are installed"
            raise InvalidArgument(f"unknown driver {name!r}; choose from {known} or 'all'")
        if name in reasons:
            raise NotSupported(f"driver {name} cannot run here: {reasons[name]}")
    return names, {}


def needed_disk(reg: Registered, layers: int, runs: int, metrics: list[str]) -> int:
    """Bytes a driver's bench disk needs for this run (a generous estimate)."""
    copies = reg.driver.kind.value == "copy"
    # Snapshots alive at once: the image, the chain, footprint's layers and clones,
    # a couple in flight; a copying driver pays a full image for each.
    objects = 3 + (layers if {"latency", "lookup"} & set(metrics) else 0)
    objects += 2 * runs if "footprint" in metrics else 0
    per_bytes = IMAGE_BYTES * 5 // 4 + 64 * 1024 if copies else 64 * 1024
    per_inodes = IMAGE_INODES + 16 if copies else 16
    data = objects * per_bytes
    inodes = objects * per_inodes + IMAGE_INODES + 4096
    if "amplification" in metrics:
        data += amplification.estimate_bytes()
        inodes += amplification.SMALL_FILES
    need = data + FS_RESERVE
    if reg.driver.disk_filesystem == "ext4":
        need = max(need, inodes * EXT4_BYTES_PER_INODE)
    return max(need, reg.driver.min_disk_size)


def _round_up(size: int, unit: int = 256 * MiB) -> int:
    return -(-size // unit) * unit


def validate(
    args: argparse.Namespace, available: Mapping[str, Registered] | None = None
) -> Settings:
    """Every check that can fail, before any work; raises a one-line MinifsError."""
    metrics = _metrics(args.metrics)
    if args.layers < 1:
        raise InvalidArgument(f"--layers {args.layers}: a chain needs at least 1 layer")
    if not 1 <= args.runs <= RUNS_CAP:
        raise InvalidArgument(f"--runs {args.runs}: pick 1..{RUNS_CAP}")
    explicit = None if args.disk_size == "auto" else parse_size(args.disk_size)
    if os.geteuid() != 0:
        raise NotSupported(
            "minifs bench makes loop devices and mounts, which needs root; run it as root"
        )
    available = registered() if available is None else available
    names, skipped = _drivers(args.driver, available)
    sizes = {}
    for name in names:
        limit = min(available[name].driver.max_depth or LAYER_CAP, LAYER_CAP)
        if args.layers > limit:
            raise InvalidArgument(
                f"--layers {args.layers} is deeper than {name} can stack ({limit}); pick 1..{limit}"
            )
        need = needed_disk(available[name], args.layers, args.runs, metrics)
        if explicit is not None and explicit < need:
            raise InvalidArgument(
                f"--disk-size {args.disk_size} is too small for {name} at --layers "
                f"{args.layers}; it needs at least {_round_up(need) // MiB} MiB "
                f"(or leave --disk-size at auto)"
            )
        sizes[name] = explicit or max(MIN_DISK, _round_up(need))
    root = resolve_root(args.root)
    _check_host_space(
        root,
        max(needed_disk(available[n], args.layers, args.runs, metrics) for n in names)
        + max(footprint.scenario_disk(available[n].driver) for n in names),
    )
    out = Path(args.out).absolute() if args.out else None
    _check_out(out)
    return Settings(names, args.layers, metrics, args.runs, sizes, out, root, skipped)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_host_space(root: Path, need: int) -> None:
    """The bench images are sparse; what they fill must fit where they live."""
    where = _existing_parent(root)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise InvalidArgument(
            f"{where} has {free // MiB} MiB free but the bench disks need about "
            f"{need // MiB} MiB; free some space or pass --root DIR elsewhere"
        )


def _check_out(out: Path | None) -> None:
    """The results file must be writable when the run ends, or the run is lost."""
    if out is not None and out.is_dir():
        raise InvalidArgument(f"--out {out} is a directory; name a file, e.g. {out}/bench.json")
    directory = out.parent if out is not None else results.DIRECTORY.absolute()
    parent = _existing_parent(directory)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InvalidArgument(f"cannot write results under {directory}; pass --out elsewhere")
