"""`--size`: one clone capped, its neighbours not; refused where a driver cannot.

Real quotas on real backends (zfs refquota, btrfs qgroups): writing past the
cap fails inside the clone with ENOSPC or EDQUOT, while a clone without a cap
on the same backend writes the same amount.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from minifs.plugins import registered
from tests.conftest import driver_params, refused
from tests.test_cli import on_driver

pytestmark = pytest.mark.parametrize("driver", driver_params())

MiB = 1 << 20


def write_until_full(path: Path, size: int) -> int:
    """Write `size` bytes to `path`; the errno that stopped it early, else 0."""
    chunk = os.urandom(MiB)
    try:
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_size_caps_one_clone(driver, cli, tmp_path):
    run = on_driver(cli, driver)
    listed = {d["name"]: d for d in json.loads(cli("drivers", "--json", check=True).stdout)}
    limit = registered()[driver].driver.size_limit
    assert listed[driver]["size_limit"] == limit
    try:
        if limit is None:
            refused(run("clone", "capped", "--size", "20M"), driver, "cannot cap")
            assert json.loads(run("ls", "--json", check=True).stdout) == []
            return
        refused(run("clone", "bad", "--size", "twenty"), "bad size")
        run("clone", "capped", "--size", "20M", check=True)
        run("clone", "free", check=True)
        for name, expect_full in (("capped", True), ("free", False)):
            where = tmp_path / name
            where.mkdir()
            run("mount", name, str(where), check=True)
            try:
                stopped = write_until_full(where / "data", 40 * MiB)
            finally:
                run("umount", str(where), check=True)
            if expect_full:
                assert stopped in (errno.ENOSPC, errno.EDQUOT), stopped
            else:
                assert stopped == 0, os.strerror(stopped)
        run("rm", "capped", "free", check=True)
    finally:
        cli("down")


def test_run_size_caps_the_container(driver, cli, root, scope):
    """`minifs run --size` (docker's --storage-opt size): the container's own
    writes stop at the cap; refused in one line where the driver cannot."""
    from tests import leaks

    run = on_driver(cli, driver)
    env = {"MINIFS_CGROUP_PARENT": leaks.cgroup_parent(scope)}
    script = "dd if=/dev/zero of=/big bs=1M count=40 && sync /big"
    try:
        run("image", "busybox", check=True)
        done = run("run", "--rm", "--size", "20M", "busybox", "sh", "-c", script, env=env)
        if registered()[driver].driver.size_limit is None:
            refused(done, driver, "cannot cap", code=125)
            return
        assert done.returncode not in (0, 125), done
        assert "quota" in done.stderr.lower() or "space" in done.stderr.lower(), done.stderr
        fine = run("run", "--rm", "busybox", "sh", "-c", script, env=env)
        assert fine.returncode == 0, fine.stderr
    finally:
        cli("down")
