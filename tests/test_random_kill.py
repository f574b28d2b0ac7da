"""Random SIGKILLs: whatever minifs command dies at whatever moment, `minifs gc`
brings the state dir back, and nothing committed is lost.

Each trial picks an operation (clone, snapshot, rm, apply, image import, run),
starts the real CLI, SIGKILLs it after a random delay within that operation's
own duration, runs `gc`, and checks: every committed layer is there with its
content unchanged (its diff_id), a clone that was being applied to is either
untouched, whole, or known to the store as partly applied, `check` finds
nothing else wrong, and (through the autouse leak check) no mount, loop
device, process or cgroup is left. `MINIFS_KILL_TRIALS` sets the trials per
driver (`make soak` runs many); `MINIFS_KILL_SEED` replays one run.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests import leaks
from tests.conftest import MINIFS, driver_params
from tests.test_never_lose import diff_id, layer_tar, listed

TRIALS = int(os.environ.get("MINIFS_KILL_TRIALS", "6"))
OPERATIONS = ("clone", "snapshot", "rm", "apply", "import", "run")


class Trials:
    """One driver's state dir, its committed layers and their fingerprints."""

    def __init__(self, driver: str, root: Path, scope: Path, tmp: Path) -> None:
        self.driver, self.root, self.tmp = driver, root, tmp
        self.env = {
            **os.environ,
            "MINIFS_ROOT": str(root),
            "MINIFS_DRIVER": driver,
            "MINIFS_CGROUP_PARENT": leaks.cgroup_parent(scope),
        }
        self.layers: dict[str, str] = {}
        self.layer_tar = tmp / "layer.tar"
        files = {f"f{i}": os.urandom(2048) for i in range(50)} | {"big": os.urandom(8 << 20)}
        self.layer_tar.write_bytes(layer_tar(files))
        self.rootfs = tmp / "rootfs.tar"
        self.rootfs.write_bytes(rootfs_tar())

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [MINIFS, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and done.returncode != 0:
            raise AssertionError(f"minifs {' '.join(args)}: {done.stderr}")
        return done

    def setup(self) -> None:
        self.cli("image", "busybox")
        self.cli("clone", "work0", "--from", "busybox")
        self.cli("apply", "work0", str(self.layer_tar))
        self.cli("snapshot", "work0", "base")
        self.layers["base"] = diff_id(self.cli, "base")
        self.work_diff = None

    def argv(self, op: str, n: int) -> list[str]:
        """The command of trial `n`, after making what it needs."""
        if op in ("snapshot", "apply", "rm"):
            self.cli("clone", f"w{n}", "--from", "base")
        if op == "snapshot":
            self.cli("apply", f"w{n}", str(self.layer_tar))
            self.work_diff = diff_id(self.cli, f"w{n}")
            return ["snapshot", f"w{n}", f"s{n}"]
        if op == "apply":
            self.work_diff = diff_id(self.cli, f"w{n}")
            return ["apply", f"w{n}", str(self.layer_tar)]
        if op == "rm":
            return ["rm", f"w{n}"]
        if op == "clone":
            return ["clone", f"c{n}", "--from", "base"]
        if op == "import":
            return ["image", "import", str(self.rootfs), "--name", f"local/t{n}"]
        return ["run", "--rm", "busybox", "sh", "-c", "echo hi > /f; sleep 0.2"]

    def duration(self, argv: list[str]) -> float:
        """How long the operation takes when left alone (then undone)."""
        started = time.monotonic()
        self.cli(*argv)
        return time.monotonic() - started

    def kill_during(self, argv: list[str], delay: float) -> None:
        proc = subprocess.Popen(
            [MINIFS, *argv], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()

    def check(self, op: str, n: int) -> None:
        gc = self.cli("gc", check=False)
        assert gc.returncode in (0, 1), gc.stderr
        assert "Traceback" not in gc.stderr
        rows = listed(self.cli)
        for name, fingerprint in self.layers.items():
            assert rows[name]["state"] == "ready", (name, rows[name])
            assert diff_id(self.cli, name) == fingerprint, f"layer {name} changed"
        if op == "snapshot" and f"s{n}" in rows:
            assert diff_id(self.cli, f"s{n}") == self.work_diff
            self.layers[f"s{n}"] = self.work_diff
        if op == "apply":
            state = rows[f"w{n}"]["state"]
            if state == "ready":  # untouched or whole, never in between unknown
                self._whole_or_untouched(n)
            else:
                assert state == "partial", rows[f"w{n}"]
        found = json.loads(self.cli("check", "--json", check=False).stdout)[self.driver]
        assert not found["damaged"] and not found["orphans"] and not found["unfinished"], found
        assert not found["stale_mounts"], found
        assert gc.returncode == (1 if found["partial"] else 0), (gc.stdout, found)
        self.cli("image", "ls")
        self.cli("ps", "-a")

    def _whole_or_untouched(self, n: int) -> None:
        """A READY clone an apply was killed on holds none or all of the layer."""
        fresh = f"ref{n}"
        self.cli("clone", fresh, "--from", "base")
        self.cli("apply", fresh, str(self.layer_tar))
        whole = diff_id(self.cli, fresh)
        self.cli("rm", fresh)
        assert diff_id(self.cli, f"w{n}") in (self.work_diff, whole)

    def tidy(self, n: int) -> None:
        """Drop what trial `n` made, except committed layers (kept, and checked later)."""
        rows = listed(self.cli)
        for name in (f"c{n}", f"w{n}"):
            if name in rows:
                self.cli("rm", name)
        for ref in json.loads(self.cli("image", "ls", "--json").stdout):
            if ref["name"].startswith("local/t"):
                self.cli("image", "rm", ref["name"])


def rootfs_tar() -> bytes:
    """A small root filesystem tar, as `docker export` would give."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(200):
            data = os.urandom(4096)
            info = tarfile.TarInfo(f"usr/share/t/{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("driver", driver_params())
def test_random_sigkill_then_gc(driver, root, scope, tmp_path):
    seed = int(os.environ.get("MINIFS_KILL_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    trials = Trials(driver, root, scope, tmp_path)
    try:
        trials.setup()
        durations: dict[str, float] = {}
        for n in range(TRIALS):
            op = OPERATIONS[n % len(OPERATIONS)] if n < len(OPERATIONS) else rng.choice(OPERATIONS)
            argv = trials.argv(op, n)
            if op not in durations:  # measured once, on a copy of the same work
                durations[op] = trials.duration(trials.argv(op, n + 10_000))
                trials.check(op, n + 10_000)
                trials.tidy(n + 10_000)
            delay = rng.uniform(0.0, durations[op])
            trials.kill_during(argv, delay)
            try:
                trials.check(op, n)
            except AssertionError as exc:
                raise AssertionError(
                    f"seed {seed}, trial {n}: {op} killed at {delay:.3f}s: {exc}"
                ) from exc
            trials.tidy(n)
    finally:
        trials.cli("gc", check=False)
        trials.cli("down", check=False)
