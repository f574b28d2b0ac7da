"""`minifs bench` end to end on real loop disks: a short run of every driver
whose JSON must show what the seed claims, Ctrl-C that saves a partial result
and leaves nothing, and the sweep that cleans up after a SIGKILLed run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from minifs.plugins import registered
from minifs_bench import results
from minifs_bench.disk import sweep_stale
from tests import leaks
from tests.conftest import MINIFS

MiB = 1 << 20


def _updates(doc: dict, driver: str) -> dict[int, float]:
    workloads = doc["drivers"][driver]["metrics"]["amplification"]["workloads"]
    return {
        w["file_size"]: w["summary"]["device_bytes"]["median"]
        for w in workloads
        if w["workload"] == "update-4b"
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_run_of_every_driver(cli, root, tmp_path):
    """Every built-in driver end to end, each on its own disk (zfs on the raw
    device); about a minute, most of it zfs filling a 64 MiB pool with clones."""
    out = tmp_path / "out" / "r.json"
    done = cli(
        "bench",
        "--driver",
        "overlay2,vfs,btrfs,zfs",
        "--layers",
        "3",
        "--runs",
        "1",
        "--out",
        str(out),
        timeout=840,
    )
    assert done.returncode == 0, done.stderr
    assert f"results: {out}" in done.stdout
    doc = results.load(out)
    assert doc["partial"] is False and doc["errors"] == []
    assert doc["settings"]["depths"] == [1, 2, 3]
    assert doc["machine"]["kernel"] == os.uname().release
    assert len(doc["source"]["git_commit"] or "") == 40, "run from the checkout, it names a commit"
    assert set(doc["drivers"]) == {"overlay2", "vfs", "btrfs", "zfs"}
    for name, entry in doc["drivers"].items():
        assert entry["driver"]["version"]
        assert {m: r["status"] for m, r in entry["metrics"].items()} == {
            "latency": "done",
            "amplification": "done",
            "lookup": "done",
            "footprint": "done",
        }, name
        latency = entry["metrics"]["latency"]
        assert [p["depth"] for p in latency["points"]] == [1, 2, 3]
        assert all(len(p["samples_ms"]["create"]) == 1 for p in latency["points"])
        assert latency["bare"], f"{name} has no bare operation to compare with"
        assert all(p["overhead"]["create"] > 0 for p in latency["points"])
        lookup = entry["metrics"]["lookup"]
        assert all(p["summary"]["stat_cold"]["n"] == 1 for p in lookup["points"])
        assert lookup["not_cold"] == 0, "a cold lookup was served from memory"
        scenario = entry["metrics"]["footprint"]["scenario"]
        assert scenario["clones"] > 0
        assert scenario["disk_size"] >= registered()[name].driver.min_disk_size
        assert scenario["first_exhausted"] in ("inodes", "space")
        # The first clone's cost predicts when the small disk fills: to a tenth
        # where the cost is whole inodes and blocks; on btrfs only roughly, as
        # statvfs counts data space a snapshot's metadata cannot use and the
        # point where metadata runs out moves with btrfs's own reserve.
        predicted = scenario["predicted"]["predicted_clones"]
        share = 4 if name == "btrfs" else 10
        assert abs(predicted - scenario["clones"]) <= max(2, scenario["clones"] // share), name
        assert scenario["predicted"]["predicted_first_exhausted"] == scenario["first_exhausted"]

    # The seed's claims, as measured: overlay2 copies a whole file up on the
    # first write, growing with its size; vfs paid at clone time instead.
    overlay = _updates(doc, "overlay2")
    assert sorted(overlay)[-1] == 64 * MiB
    for size, written in overlay.items():
        assert written >= size, f"a 4-byte update of a {size}-byte file wrote {written}"
    large = [overlay[size] for size in sorted(overlay) if size >= 256 * 1024]
    assert large == sorted(large)
    assert max(_updates(doc, "vfs").values()) < 1 * MiB
    lookups = doc["drivers"]["overlay2"]["metrics"]["lookup"]
    assert lookups["placement"].startswith("checked")
    per_clone = doc["drivers"]["overlay2"]["metrics"]["footprint"]["clone"]["summary"]
    assert per_clone["inodes_mounted"]["median"] < 32
    _block_level_drivers_copy_nothing(doc)
    assert not (root / "bench").exists() or not any((root / "bench").iterdir())


def _block_level_drivers_copy_nothing(doc: dict) -> None:
    """btrfs and zfs copy blocks, not files: a 4-byte update of a 64 MiB file
    writes metadata and a record or two. zfs's forced commit is measured idle
    in the same run, taken off in the net, and both are kept."""
    for name in {"btrfs", "zfs"} & set(doc["drivers"]):
        assert max(_updates(doc, name).values()) < 4 * MiB, name
        record = doc["drivers"][name]["metrics"]["amplification"]
        idle = record["idle_flush"]["summary"]["median"]
        assert (idle > 0) == (name == "zfs"), name
        for w in record["workloads"]:
            s = w["summary"]
            net = s["device_bytes"]["median"] - idle
            assert s["device_bytes_net"]["median"] == pytest.approx(net)
        footprint = doc["drivers"][name]["metrics"]["footprint"]
        assert footprint["clone"]["summary"]["inodes_mounted"] is None, "no inode count there"


def _wait_for_mount_under(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not leaks.mounts_under(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the bench never mounted its disk"
        time.sleep(0.05)


def _start(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [MINIFS, "bench", "--layers", "3", "--runs", "1", "--out", str(out)],
        env={**os.environ, "MINIFS_ROOT": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_saves_partial_results_and_cleans_up(root, tmp_path):
    out = tmp_path / "partial.json"
    proc = _start(root, out)
    _wait_for_mount_under(root, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "partial results saved" in err
    doc = results.load(out)
    assert doc["partial"] is True and doc["interrupted"] is True
    assert leaks.mounts_under(root) == set() and leaks.loops_under(root) == set()
    assert list((root / "bench").iterdir()) == []


def test_next_run_sweeps_what_a_killed_run_left(root, tmp_path):
    proc = _start(root, tmp_path / "killed.json")
    _wait_for_mount_under(root, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert leaks.loops_under(root), "the killed run should have left its disk attached"
    stopped = sweep_stale(root / "bench")
    assert any("loop device" in s for s in stopped)
    assert leaks.mounts_under(root) == set() and leaks.loops_under(root) == set()
    assert list((root / "bench").iterdir()) == []
