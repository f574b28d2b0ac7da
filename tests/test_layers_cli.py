"""`minifs apply`, `minifs diff` and the scratch sweep of `minifs gc`, through the CLI.

Layers here come from GNU tar itself in both its formats, so the reader meets
what a real tool writes: PAX records (long names and link targets, big ids,
nanosecond mtimes, SCHILY xattrs) and GNU's `././@LongLink` entries and
base-256 numbers, plus the sparse forms it refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from minifs import linux
from minifs.layers.scratch import owner_tag
from tests import treeinfo
from tests.conftest import MINIFS, driver_params, keeps_xattrs
from tests.corpus import gzip_bomb, member, rich_layer, tar_bytes

DRIVERS = driver_params()
FIRST = next((p.values[0] for p in DRIVERS if not p.marks), None)
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


def _source(tmp_path: Path, xattrs: bool = True) -> Path:
    """A tree with everything that needs more than a ustar header (xattrs
    left out for a driver whose clones keep none: Driver.xattrs)."""
    src = tmp_path / "src"
    deep = src / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 130)).write_text("long name\n")
    os.symlink("t" * 150 + "/target", src / "longlink")
    (src / "bigid").write_text("big ids\n")
    os.chown(src / "bigid", 3_000_000, 4_000_000)
    (src / "ns").write_text("ns\n")
    os.utime(src / "ns", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (src / "x").write_text("xattrs\n")
    if xattrs:
        os.setxattr(src / "x", "user.note", b"\x00\xffbinary")
        os.setxattr(src / "x", "security.capability", CAPABILITY)
    os.link(src / "x", src / "x-link")
    src.chmod(0o755)
    return src


def _tree(storage, mount, name: str, mtimes: bool = True) -> treeinfo.Tree:
    with mount(storage, name) as path:
        return treeinfo.record(path, mtimes=mtimes)


PROBE_NS = 1_600_000_000_987_654_321


def _mtime_step(path: Path) -> int:
    """The mtime granularity, in ns, of the filesystem at `path`: 1 where it
    keeps nanoseconds, 10**9 where only whole seconds (zfs-fuse). Found by
    setting an mtime and reading it back, so it follows what the filesystem
    does, not a driver's name; a time neither kept nor truncated fails."""
    probe = path / ".mtime-probe"
    probe.write_bytes(b"")
    try:
        os.utime(probe, ns=(PROBE_NS, PROBE_NS), follow_symlinks=False)
        kept = os.stat(probe, follow_symlinks=False).st_mtime_ns
    finally:
        probe.unlink()
    for step in (10**k for k in range(10)):
        if PROBE_NS // step * step == kept:
            return step
    raise AssertionError(f"mtime {PROBE_NS} came back as {kept}: neither kept nor truncated")


def _mtimes_to(tree: treeinfo.Tree, step: int) -> treeinfo.Tree:
    """`tree` as a filesystem keeping mtimes in steps of `step` ns would show it."""
    return {
        p: {**e, "mtime_ns": e["mtime_ns"] // step * step} if "mtime_ns" in e else e
        for p, e in tree.items()
    }


def _seconds(tree: treeinfo.Tree, xattrs: bool = True) -> treeinfo.Tree:
    return {
        p: {
            **{k: v for k, v in e.items() if xattrs or k != "xattrs"},
            **({"mtime_ns": e["mtime_ns"] // 10**9} if "mtime_ns" in e else {}),
        }
        for p, e in tree.items()
    }


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_gnu_tar_formats_apply_exactly(driver, fmt, cli, open_storage, mount, tmp_path):
    src = _source(tmp_path, keeps_xattrs(driver))
    archive = tmp_path / f"{fmt}.tar"
    flags = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    subprocess.run(
        ["tar", f"--format={fmt}", *flags, "-C", str(src), "-cf", str(archive), "."], check=True
    )
    data = archive.read_bytes()
    assert (b"././@LongLink" in data) == (fmt == "gnu")
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    cli("clone", "c", "-d", driver, check=True)
    done = cli("apply", "c", str(archive), "-d", driver, "--diff-id", diff_id, check=True)
    assert done.stdout.strip() == diff_id
    expected = treeinfo.record(src, mtimes=True)
    with mount(open_storage(driver), "c") as path:
        got = treeinfo.record(path, mtimes=True)
        step = _mtime_step(path)
    if fmt == "posix":  # nanosecond mtimes (as far as the clone keeps them), xattrs: all kept
        assert treeinfo.differences(_mtimes_to(expected, step), got) == []
        if keeps_xattrs(driver):
            assert got["x"]["xattrs"]["security.capability"] == CAPABILITY
    else:  # GNU format: whole seconds, no xattrs, base-256 ids
        assert treeinfo.differences(_seconds(expected, False), _seconds(got, False)) == []
    assert got["bigid"]["uid"] == 3_000_000 and got["bigid"]["gid"] == 4_000_000


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_sparse_files_are_refused_by_name(fmt, cli, open_storage, mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes.img", "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"data")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-C", str(src), "-cf", str(archive), "holes.img"],
        check=True,
    )
    cli("clone", "c", "-d", FIRST, check=True)
    before = _tree(open_storage(FIRST), mount, "c")
    done = cli("apply", "c", str(archive), "-d", FIRST)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "holes.img" in done.stderr and "sparse" in done.stderr
    assert treeinfo.differences(before, _tree(open_storage(FIRST), mount, "c")) == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_diff_cli_is_reproducible_and_round_trips(driver, cli, root, open_storage, mount, tmp_path):
    layer = tmp_path / "rich.tar"
    layer.write_bytes(tar_bytes(rich_layer(keeps_xattrs(driver))))
    cli("clone", "base-work", "-d", driver, check=True)
    cli("apply", "base-work", str(layer), "-d", driver, check=True)
    cli("snapshot", "base-work", "base", "-d", driver, check=True)
    cli("clone", "work", "--from", "base", "-d", driver, check=True)
    storage = open_storage(driver)
    with mount(storage, "work") as path:
        (path / "etc" / "owned").write_text("changed\n")
        (path / "bin" / "tool").unlink()
        (path / "added").mkdir()
        (path / "added" / "\udcff-not-utf8").write_bytes(b"raw name")
    first = cli("diff", "work", "-d", driver, "-o", str(tmp_path / "a.tar"), "--json", check=True)
    stats = json.loads(first.stdout)
    data = (tmp_path / "a.tar").read_bytes()
    assert stats["diff_id"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert stats["size"] == len(data)
    piped = _raw(root, "diff", "work", "-d", driver)  # to stdout; the diff_id to stderr
    assert piped.stdout == data and piped.stderr.decode().strip() == stats["diff_id"]
    zst = cli("diff", "work", "-d", driver, "--compress", "zstd", "-o", str(tmp_path / "a.zst"))
    assert zst.returncode == 0 and zst.stdout.strip() == stats["diff_id"]
    listing = ["tar", "-t", "--quoting-style=literal"]
    names = subprocess.run(listing, input=data, capture_output=True, check=True).stdout
    assert b"bin/.wh.tool\n" in names and b"added/\xff-not-utf8\n" in names
    cli("clone", "again", "--from", "base", "-d", driver, check=True)
    applied = cli("apply", "again", str(tmp_path / "a.zst"), "-d", driver, check=True)
    assert applied.stdout.strip() == stats["diff_id"]
    again = cli("diff", "again", "-d", driver, "-o", str(tmp_path / "b.tar"), check=True)
    assert again.stdout.strip() == stats["diff_id"]
    assert (tmp_path / "b.tar").read_bytes() == data
    with mount(storage, "again") as path:
        assert (path / "added" / "\udcff-not-utf8").read_bytes() == b"raw name"
        assert not (path / "bin" / "tool").exists()


def _raw(root: Path, *args: str, data: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    """`minifs ARGS` with bytes in and out (the `cli` fixture speaks text)."""
    return subprocess.run(
        [MINIFS, *args],
        input=data,
        capture_output=True,
        env={**os.environ, "MINIFS_ROOT": str(root), **env},
        timeout=120,
        check=False,
    )


def test_cli_bad_input_is_one_line(cli, root, open_storage, mount, tmp_path):
    cli("clone", "c", "-d", FIRST, check=True)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(tar_bytes([member("ok", data=b"1"), member("../escape", data=b"x")]))
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip_bomb(64 << 20))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(3000))
    before = _tree(open_storage(FIRST), mount, "c")
    cases = [
        (("apply", "c", str(bad)), "../escape"),
        (("apply", "c", str(bomb)), "decompression bomb"),
        (("apply", "c", str(garbage)), "header"),
        (("apply", "c", str(tmp_path / "missing.tar")), "missing.tar"),
        (("apply", "nosuch", str(bad)), "nosuch"),
        (("apply", "c", str(bad), "--diff-id", "sha256:" + "0" * 64), "../escape"),
        (("diff", "nosuch"), "nosuch"),
        (("diff", "c", "-o", str(tmp_path)), "directory"),
    ]
    for args, mention in cases:
        done = cli(*args, "-d", FIRST, env={"MINIFS_LAYER_LIMIT": "16M"})
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and mention in done.stderr, (args, done.stderr)
    assert treeinfo.differences(before, _tree(open_storage(FIRST), mount, "c")) == []
    cli("snapshot", "c", "layer", "-d", FIRST, check=True)
    refused = cli("apply", "layer", str(bad), "-d", FIRST)
    assert refused.returncode == 2 and "only be applied to a clone" in refused.stderr
    assert list((root / "tmp").iterdir()) == []
    assert not list(tmp_path.glob(".*partial*"))


# -- gc reclaims what crashed imports and applies left --------------------------------


def _scratch(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


@pytest.mark.parametrize("driver", DRIVERS)
def test_gc_sweeps_leftovers_of_a_killed_apply(driver, cli, root, open_storage, mount, tmp_path):
    layer = tar_bytes(rich_layer(keeps_xattrs(driver)))
    cli("clone", "c", "-d", driver, check=True)
    # From a pipe, so it is spooled first; then killed.
    killed = _raw(
        root, "apply", "c", "-", "-d", driver, data=layer, MINIFS_FAILPOINT="apply:after-spool"
    )
    assert killed.returncode == -signal.SIGKILL
    left = _scratch(root)
    assert any(n.startswith("layer-") and n.endswith(".spool") for n in left), left
    mounted = [t for t in linux.mount_targets() if t.startswith(str(root / "tmp"))]
    # Full-tree drivers apply through a private mount: the kill left it mounted.
    storage = open_storage(driver)
    assert bool(mounted) == (storage.driver.diff_dir(storage.stat("c").id) is None)
    # Work of a live process (this one) is never touched.
    live = root / "tmp" / f"ingest-{owner_tag()}-live"
    live.mkdir()
    dry = cli("gc", "--dry-run", check=True)
    assert dry.stderr.count("would remove leftover") == len(left)
    assert _scratch(root) == sorted([*left, live.name])
    swept = cli("gc", check=True)
    assert swept.stderr.count("remove leftover") == len(left), swept.stderr
    assert _scratch(root) == [live.name]
    assert not [t for t in linux.mount_targets() if t.startswith(str(root / "tmp"))]
    live.rmdir()
    done = cli("apply", "c", "-", "-d", driver)  # the clone is usable: apply again
    assert done.returncode == 2  # stdin is empty here: refused, one line
    with open(tmp_path / "layer.tar", "wb") as f:
        f.write(layer)
    cli("apply", "c", str(tmp_path / "layer.tar"), "-d", driver, check=True)
    assert _tree(open_storage(driver), mount, "c")["big"]["size"] == 256 * 4096


def test_gc_sweeps_a_killed_import(cli, root, tmp_path):
    archive = tmp_path / "rootfs.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", "/etc", "hostname"], check=True)
    killed = cli("image", "import", str(archive), env={"MINIFS_FAILPOINT": "import:after-staging"})
    assert killed.returncode == -signal.SIGKILL
    (staged,) = _scratch(root)
    assert staged.startswith("ingest-") and os.listdir(root / "tmp" / staged)
    cli("gc", check=True)
    assert _scratch(root) == []
    assert json.loads(cli("image", "ls", "--json", check=True).stdout) == []
    cli("image", "import", str(archive), check=True)
