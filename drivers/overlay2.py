"""overlay2: kernel overlayfs with Docker's on-disk shape.

Each snapshot `<id>/` holds `diff/` (its own files; the upper dir of a clone),
`work/`, `merged/`, `link` (a 26-character short name) and `lower` (the short
names of its parents, nearest first, as `l/NAME:l/NAME`). `l/NAME` is a
symlink to `../<id>/diff`: short lower paths are what keep 500 layers within
reach of the mount options (see minifs.mounter for how they are passed).

When the state dir's filesystem cannot hold an overlay upper dir (overlayfs
itself, NFS, most FUSE filesystems), the store lives on a loop-backed ext4
image that the driver brings up in `start()` and `minifs down` takes down.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from minifs import failpoints, linux
from minifs.driver import AUTO, Driver, tree_usage
from minifs.errors import BackendError, InvalidArgument, MinifsError, NotSupported
from minifs.hookspecs import hookimpl
from minifs.layers.safefs import OPAQUE_XATTR, remove_tree
from minifs.loopdisk import fitting_size, image_size, make_image, parse_size
from minifs.model import DriverKind, Kind, Mount, Usage

KERNEL_MAX_STACK = 500
"""overlayfs's OVL_MAX_STACK: the most lower layers one mount can have."""

DEFAULT_IMAGE_SIZE = "10G"
MIN_IMAGE_SIZE = 1 << 20
"""Below this mkfs.ext4 cannot lay out its own metadata; an image that small
would fail to format with a message about partition tables."""


def _image_size(text: str) -> int:
    return image_size(text, "overlay2.size", MIN_IMAGE_SIZE, "mkfs.ext4's own metadata")


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
"""Docker's `l/` link names: 26 characters of base32."""


def _short_name() -> str:
    return "".join(_B32[byte % 32] for byte in os.urandom(26))  # 256 % 32 == 0: uniform


@functools.cache
def _has_index_param() -> bool:
    return Path("/sys/module/overlay/parameters/index").exists()


def _copy_root_attributes(source: Path, target: Path) -> None:
    """A merged root shows its upper dir's own mode, owner and xattrs, so a
    clone's fresh upper root must start as a copy of its parent's root."""
    st = os.lstat(source)
    os.chown(target, st.st_uid, st.st_gid)  # before chmod: chown clears setgid
    os.chmod(target, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(source):
        if not name.startswith("trusted.overlay."):
            os.setxattr(target, name, os.getxattr(source, name))


class Overlay2Driver(Driver):
    name = "overlay2"
    kind = DriverKind.COW
    backend = "kernel overlayfs"
    max_depth = KERNEL_MAX_STACK
    _backing = "direct"
    options_help = {
        "backing": "auto (default), direct, or loop: keep layers on a loop-backed ext4 image",
        "size": f"size of the loop-backed image (default {DEFAULT_IMAGE_SIZE})",
    }
    option_defaults = {"backing": "auto", "size": AUTO}

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        # Everything that can be refused is refused here, before the state dir
        # or this home is created.
        if any(c in str(home) for c in ",:"):
            raise InvalidArgument(
                f"overlay2 cannot keep layers under {home}: ',' and ':' separate overlay "
                "mount options; pick a --root without them (or use --driver vfs)"
            )
        super().__init__(home, options)

    def check_options(self, options: Mapping[str, str], settled: bool) -> None:
        backing = options.get("backing", "auto")
        allowed = ("direct", "loop") if settled else ("auto", "direct", "loop")
        if backing not in allowed:
            raise InvalidArgument(f"overlay2.backing={backing} is not one of {', '.join(allowed)}")
        if options.get("size", AUTO) != AUTO:  # settled to a size when an image is made
            _image_size(options["size"])

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("overlay2 mounts overlayfs, which needs root; run as root")
        if "overlay" not in linux.filesystems():
            raise NotSupported(
                "the kernel has no overlayfs (not in /proc/filesystems); "
                "load it with 'modprobe overlay'"
            )

    @classmethod
    def version(cls) -> str:
        return f"kernel {os.uname().release}"

    # -- lifecycle: where the layers live ------------------------------------

    def settle_options(self, options: dict[str, str]) -> dict[str, str]:
        """backing=auto becomes direct where this home's filesystem can hold
        overlay upper dirs, else loop; a loop image's size=auto becomes 10G,
        or what the disk can spare (a sparse image larger than its disk fails
        later, as writeback errors inside the clones)."""
        if options["backing"] == "auto":
            options["backing"] = "direct" if self._upper_works(self.home) else "loop"
        if options["backing"] == "loop" and options["size"] == AUTO:
            wanted = parse_size(DEFAULT_IMAGE_SIZE)
            size = fitting_size(self.home, wanted, MIN_IMAGE_SIZE, "an overlay2 backing image")
            options["size"] = f"{size >> 20}M"
        return options

    @staticmethod
    def _upper_works(where: Path) -> bool:
        """Try a tiny overlay mount with its upper dir on `where`'s filesystem."""
        import shutil  # here only: a home is probed once, at its first start
        import tempfile

        probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=where))
        try:
            for sub in ("lower", "upper", "work", "merged"):
                (probe / sub).mkdir()
            data = f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work"
            try:
                linux.mount("overlay", probe / "merged", "overlay", 0, data)
            except OSError:
                return False
            linux.umount(probe / "merged")
            return True
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    @property
    def data(self) -> Path:
        return self.home / "data" if self._backing == "loop" else self.home

    def bring_up(self) -> None:
        self._backing = self.options["backing"]
        if self._backing == "loop":
            image = self.home / "backing.img"
            size = self.options["size"]
            if not image.exists():
                try:
                    make_image(image, _image_size(size), "ext4")
                except (MinifsError, OSError) as exc:
                    # A fresh home records no options until this succeeds,
                    # so the next start chooses afresh.
                    reason = exc.strerror if isinstance(exc, OSError) else exc
                    raise BackendError(
                        f"cannot make the {size} backing image {image} ({reason}); "
                        "free space there or pick a smaller overlay2.size"
                    ) from None
            device = self.resources.loop("loop", image)
            self.resources.mount("mount", device, self.data, "ext4")
        (self.data / "l").mkdir(parents=True, exist_ok=True)

    # -- snapshots -------------------------------------------------------------

    def dir(self, sid: str) -> Path:
        return self.data / sid

    def _link(self, sid: str) -> str:
        return (self.dir(sid) / "link").read_text().strip()

    def prepare(self, sid: str, parents: Sequence[str]) -> None:
        self.remove(sid)  # a crashed earlier attempt may have left part of it
        root = self.dir(sid)
        root.mkdir(mode=0o710)
        for sub in ("diff", "work", "merged"):
            (root / sub).mkdir(mode=0o755 if sub == "diff" else 0o700)
        failpoints.hit("overlay2:prepare-partial")
        link = _short_name()
        # `link` first: remove() finds the symlink through it, so a crash
        # between the two never leaves a symlink nothing points back to.
        (root / "link").write_text(link)
        (self.data / "l" / link).symlink_to(f"../{sid}/diff")
        if parents:
            # As Docker does: the parent's short name, then the parent's own lower.
            lowers = [f"l/{self._link(parents[0])}", *self._lower(parents[0])]
            (root / "lower").write_text(":".join(lowers))
            _copy_root_attributes(self.dir(parents[0]) / "diff", root / "diff")

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """The upper dir becomes a lower dir as it is; overlay needs no conversion,
        except that a layer whose root is opaque stacks on nothing: overlayfs
        ignores the opaque mark on a layer's root, so the layers it hides must
        leave its lower list (and its children's, which start from it)."""
        if self._opaque_root(sid):
            (self.dir(sid) / "lower").unlink(missing_ok=True)

    def _opaque_root(self, sid: str) -> bool:
        try:
            return os.getxattr(self.dir(sid) / "diff", OPAQUE_XATTR) == b"y"
        except OSError:
            return False

    def remove(self, sid: str) -> None:
        root = self.dir(sid)
        with contextlib.suppress(FileNotFoundError):
            (self.data / "l" / self._link(sid)).unlink(missing_ok=True)
        remove_tree(root)

    def _lower(self, sid: str) -> list[str]:
        """`sid`'s parents as `l/NAME`, nearest first, from its `lower` file."""
        try:
            return (self.dir(sid) / "lower").read_text().split(":")
        except FileNotFoundError:
            return []

    def _lowerdir(self, sid: str, with_self: bool) -> str:
        """One read of `lower` instead of one `link` read per layer."""
        names = [f"l/{self._link(sid)}"] if with_self else []
        return "lowerdir=" + ":".join(f"{self.data}/{n}" for n in [*names, *self._lower(sid)])

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        index = ("index=off",) if _has_index_param() else ()
        if kind is Kind.CLONE:
            diff = str(self.dir(sid) / "diff")
            if not parents:
                return [Mount("bind", diff, ("rbind", "rw"))]
            work = str(self.dir(sid) / "work")
            lowerdir = self._lowerdir(sid, with_self=False)
            if self._opaque_root(sid):
                # Given an opaque root by a layer apply: it hides every parent.
                empty = self.data / "empty"
                empty.mkdir(mode=0o755, exist_ok=True)
                lowerdir = f"lowerdir={empty}"
            options = (
                *index,
                lowerdir,
                f"upperdir={diff}",
                f"workdir={work}",
            )
            return [Mount("overlay", "overlay", options)]
        # A layer shows itself over its parents; a view shows only its parents
        # (as far down as its lower list goes: see commit).
        lowers = [sid, *parents] if kind is Kind.LAYER else list(parents)
        if kind is Kind.LAYER and self._opaque_root(sid):
            lowers = [sid]
        if not lowers:
            return [Mount("bind", str(self.dir(sid) / "diff"), ("rbind", "ro"))]
        if len(lowers) == 1:
            return [Mount("bind", str(self.dir(lowers[0]) / "diff"), ("rbind", "ro"))]
        lowerdir = self._lowerdir(sid, with_self=kind is Kind.LAYER)
        return [Mount("overlay", "overlay", ("ro", *index, lowerdir))]

    def diff_dir(self, sid: str) -> Path | None:
        return self.dir(sid) / "diff"

    def usage(self, sid: str) -> Usage:
        return tree_usage(self.dir(sid) / "diff")

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.data)
        except FileNotFoundError:
            return set()
        # Snapshot dirs are named by 32-hex ids; l/, run/, data/ and files are not.
        return {n for n in names if len(n) == 32 and (self.data / n).is_dir()}

    def damage(self, sid: str) -> str | None:
        """Docker's shape, part by part: the directory, its diff, its short name
        and the `l/` symlink that lower lists reach it by."""
        root = self.dir(sid)
        if not root.is_dir():
            return f"its directory {root} is missing"
        if not (root / "diff").is_dir():
            return f"its diff directory {root / 'diff'} is missing"
        try:
            link = self._link(sid)
        except OSError:
            return f"its link file {root / 'link'} is missing"
        short = self.data / "l" / link
        if not short.is_symlink() or os.readlink(short) != f"../{sid}/diff":
            return f"its short name {short} is missing or points elsewhere"
        return None


@hookimpl
def register_drivers(register) -> None:
    register(Overlay2Driver)
