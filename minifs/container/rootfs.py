"""The container's root filesystem, set up by PID 1 inside its own mount namespace.

Each function is one step of the seed's walkthrough and returns what it did in
the seed's words, for `--trace`. They run after `unshare(CLONE_NEWNS)` and in
the new pid namespace (a /proc mount shows the pid namespace of whoever mounts
it), so nothing here is visible on the host and nothing needs unmounting
there: the mounts die with the namespace.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from minifs import linux, mounter
from minifs.model import Mount

OLD_ROOT = ".oldroot"

_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_DEV_LINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
_NOSUID_NODEV_NOEXEC = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def make_private() -> str:
    """Stop our mounts from propagating to the host: every mount of our copy
    becomes a slave (pivot_root refuses a shared root or parent, not a slave).

    A slave, not private: PID 1 makes this copy right after unshare, while the
    monitor is still cloning, and some backends mount the clone only then, in
    the host's namespace (zfs-fuse's daemon, under a shared `<home>/mnt`). A
    slave still receives that mount; a private copy would never see it. Events
    only ever flow host-to-us: nothing mounted in here reaches the host. After
    `drop_old_root` the only host mounts that could still arrive are ones made
    inside the clone's own directory (our root is a bind of it, so a slave of
    it too). runc's default rootfs propagation is rslave for the same reason."""
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_SLAVE)
    return "mount --make-rslave /"


def mount_clone(records: Sequence[Mount], rootfs: Path) -> str:
    """Mount the clone's records on `rootfs`, then bind it on itself so it is a
    mount point of its own whatever the records were (pivot_root needs one)."""
    mounter.mount_all(records, rootfs)
    linux.mount(str(rootfs), rootfs, None, linux.MS_BIND | linux.MS_REC)
    kinds = ", ".join(sorted({r.type for r in records}))
    return f"mount {kinds} {rootfs}"


def pivot_root(rootfs: Path) -> str:
    """The seed's `cd rootfs; mkdir oldroot; pivot_root . oldroot` (never chroot:
    a chrooted process can climb out; a pivoted one has no old root to climb to)."""
    old = rootfs / OLD_ROOT
    old.mkdir(exist_ok=True)
    os.chdir(rootfs)
    linux.pivot_root(".", OLD_ROOT)
    os.chdir("/")
    return f"cd {rootfs}; pivot_root . {OLD_ROOT}"


def mount_proc() -> str:
    """A /proc of the new pid namespace: `ps` inside shows PID 1 and no host pids."""
    os.makedirs("/proc", exist_ok=True)
    linux.mount("proc", "/proc", "proc", _NOSUID_NODEV_NOEXEC)
    return "mount -t proc proc /proc"


def drop_old_root() -> str:
    """`umount -l /oldroot`: after this no path leads to the host's filesystem."""
    linux.umount(f"/{OLD_ROOT}", linux.MNT_DETACH)
    os.rmdir(f"/{OLD_ROOT}")
    return f"umount -l /{OLD_ROOT}; rmdir /{OLD_ROOT}"


def mount_dev() -> str:
    """A minimal /dev on tmpfs: the six character devices programs expect,
    a private devpts instance and /dev/shm, never the host's devices."""
    os.makedirs("/dev", exist_ok=True)
    linux.mount("tmpfs", "/dev", "tmpfs", linux.MS_NOSUID, "mode=755,size=65536k")
    for name, major, minor in _DEVICES:
        path = f"/dev/{name}"
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod applies the umask
    for name, target in _DEV_LINKS:
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/pts")
    linux.mount(
        "devpts",
        "/dev/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.mkdir("/dev/shm")
    linux.mount("shm", "/dev/shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
    return "mount -t tmpfs tmpfs /dev; mknod null zero full random urandom tty; devpts; shm"


def mount_sys() -> str:
    """sysfs read-only: tools may read it, nobody inside may change the host."""
    os.makedirs("/sys", exist_ok=True)
    linux.mount("sysfs", "/sys", "sysfs", _NOSUID_NODEV_NOEXEC | linux.MS_RDONLY)
    return "mount -t sysfs -o ro sysfs /sys"


def mount_sys_writable() -> str:
    """`--privileged`: sysfs read-write, as Docker gives a privileged container."""
    os.makedirs("/sys", exist_ok=True)
    linux.mount("sysfs", "/sys", "sysfs", _NOSUID_NODEV_NOEXEC)
    return "mount -t sysfs sysfs /sys"


def read_only_paths(paths: Sequence[str]) -> str:
    """Bind each path on itself and remount the bind read-only: /proc/sys and
    friends stay readable, but a write fails with EROFS even for root, and
    without CAP_SYS_ADMIN (and with seccomp) nobody inside can undo it."""
    done = []
    for path in paths:
        if not os.path.exists(path):
            continue
        linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _NOSUID_NODEV_NOEXEC
        linux.mount(path, path, None, flags)
        done.append(path)
    return f"mount -o bind,remount,ro {' '.join(done)}"


def mask_paths(paths: Sequence[str]) -> str:
    """runc's masking: /dev/null bound over a file, an empty read-only tmpfs
    over a directory, so both read as empty. Paths this kernel lacks are skipped."""
    done = []
    for path in paths:
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            continue
        if is_dir:
            linux.mount("tmpfs", path, "tmpfs", _NOSUID_NODEV_NOEXEC | linux.MS_RDONLY)
        else:
            linux.mount("/dev/null", path, None, linux.MS_BIND)
        done.append(path)
    return f"mount --bind /dev/null or tmpfs -o ro over {' '.join(done)}"


def mount_tmpfs(paths: Sequence[str]) -> str:
    """`--tmpfs DIR`: a writable tmpfs, Docker's options (nosuid, nodev,
    noexec, 64M), also for a read-only root's /tmp or /run."""
    for path in paths:
        os.makedirs(path, exist_ok=True)
        linux.mount("tmpfs", path, "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
    return f"mount -t tmpfs tmpfs {' '.join(paths)}"


def read_only_root() -> str:
    """`--read-only`: remount the clone's bind at / read-only; /proc, /dev,
    /sys and any --tmpfs are mounts of their own and keep their flags."""
    linux.mount("/", "/", None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    return "mount -o bind,remount,ro /"


def _replace(path: str, text: str) -> None:
    """Write a file the image may hold as a symlink pointing anywhere."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(path):
            os.unlink(path)
    Path(path).write_text(text)


def write_etc(hostname: str, ip: str | None, resolv_conf: str) -> str:
    """/etc/hostname, /etc/hosts and /etc/resolv.conf, as docker writes them."""
    os.makedirs("/etc", exist_ok=True)
    _replace("/etc/hostname", f"{hostname}\n")
    own = f"{ip}\t{hostname}\n" if ip else f"127.0.1.1\t{hostname}\n"
    _replace("/etc/hosts", f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{own}")
    _replace("/etc/resolv.conf", resolv_conf)
    return "write /etc/hostname /etc/hosts /etc/resolv.conf"


def host_resolv_conf() -> str:
    """The host's resolvers minus loopback ones, which mean nothing in another netns."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    kept = [
        line
        for line in lines
        if line.strip()
        and not line.startswith("#")
        and not (line.startswith("nameserver") and _loopback(line.split()[1:2]))
    ]
    return "\n".join(kept) + "\n" if kept else ""


def _loopback(words: list[str]) -> bool:
    return bool(words) and (words[0].startswith("127.") or words[0] == "::1")


def set_hostname(hostname: str) -> str:
    """`hostname tuna`: the uts namespace was copied from the host's, so set ours."""
    linux.sethostname(hostname)
    return f"hostname {hostname}"
