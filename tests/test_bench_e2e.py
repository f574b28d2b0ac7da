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
def test_short_run_of_every_driver(cli, root, tmp_path):
    out = tmp_path / "out" / "r.json"
    done = cli("bench", "--driver", "all", "--layers", "3", "--runs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"results: {out}" in done.stdout
    doc = results.load(out)
    assert doc["partial"] is False and doc["errors"] == []
    assert doc["settings"]["depths"] == [1, 2, 3]
    assert doc["machine"]["kernel"] == os.uname().release
    assert len(doc["source"]["git_commit"] or "") == 40, "run from the checkout, it names a commit"
    assert {"overlay2", "vfs"} <= set(doc["drivers"])
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
        lookup = entry["metrics"]["lookup"]
        assert all(p["summary"]["stat_cold"]["n"] == 1 for p in lookup["points"])
        assert lookup["not_cold"] == 0, "a cold lookup was served from memory"
        scenario = entry["metrics"]["footprint"]["scenario"]
        assert scenario["clones"] > 0
        assert scenario["first_exhausted"] in ("inodes", "space")
        # The first clone's cost predicts when the small disk fills.
        predicted = scenario["predicted"]["predicted_clones"]
        assert abs(predicted - scenario["clones"]) <= max(2, scenario["clones"] // 10), name
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
    assert not (root / "bench").exists() or not any((root / "bench").iterdir())


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
