"""`minifs bench --cli` end to end: two real rounds of every command beside
its real peers (runc, a private containerd and dockerd where installed), the
results file read back, and nothing left running, mounted or written outside
the run dir. Bad input is refused in one line before any work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from minifs.container.cgroups import PARENT_ENV
from tests import leaks
from tests.conftest import MINIFS, refused

MINIFS_COMMANDS = {"minifs_run", "minifs_clone_rm", "minifs_ls_json", "minifs_help"}
BARE = {"unshare", "python_pass"}
PEERS = {"runc_run": "runc", "ctr_prepare_rm": "containerd", "docker_create_rm": "docker"}
ROUNDS = 2


def _mentioning(text: str) -> set[int]:
    """Processes whose command line names `text`: a daemon that slipped out of
    the owner tag the leak check looks for would still show here."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.add(int(entry))
    return found


def test_times_every_command_beside_its_peers_and_leaves_nothing(cli, root, tmp_path, scope):
    etc_docker = sorted(os.listdir("/etc/docker")) if os.path.isdir("/etc/docker") else None
    out = tmp_path / "cli.json"
    done = cli(
        "bench",
        "--cli",
        "--runs",
        str(ROUNDS),
        "--out",
        str(out),
        env={PARENT_ENV: leaks.cgroup_parent(scope)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert (doc["schema"], doc["schema_version"], doc["partial"]) == ("minifs-bench-cli", 1, False)
    assert doc["machine"]["cpus"] and doc["settings"]["rounds"] == ROUNDS

    measured = set(doc["commands"])
    for key, peer in PEERS.items():
        assert (key in measured) != (key in doc["skipped"]), key
        if key in doc["skipped"]:
            assert doc["skipped"][key].startswith(f"{peer}: ")
    assert measured >= MINIFS_COMMANDS | BARE
    for key, entry in doc["commands"].items():
        assert len(entry["samples_ms"]) == ROUNDS, key
        assert all(s > 0 for s in entry["samples_ms"]), key
        for steps, sample in zip(entry["steps_ms"], entry["samples_ms"], strict=True):
            assert len(steps) == len(entry["argv"]) and sum(steps) == pytest.approx(sample)
        assert entry["summary"]["min"] <= entry["summary"]["median"] <= entry["summary"]["max"]

    first, second = doc["rounds"]
    assert sorted(first) == sorted(measured) and second == first[1:] + first[:1]

    targets = {(c["minifs"], c["peer"]): c for c in doc["comparisons"] if c["target"]}
    assert set(targets) == {
        ("minifs_run", "runc_run"),
        ("minifs_clone_rm", "docker_create_rm"),
        ("minifs_ls_json", "python_pass"),
    }
    for (mine, peer), row in targets.items():
        if peer in measured:
            expected = (
                doc["commands"][mine]["summary"]["median"]
                / doc["commands"][peer]["summary"]["median"]
            )
            assert row["ratio_of_medians"] == pytest.approx(expected)
            assert row["met"] == (expected <= row["target"])
            verdict = "met" if row["met"] else "NOT met"
            assert f"target <= {row['target']:.1f}x: {verdict}" in done.stdout
        else:
            assert row["met"] is None and row["reason"] == doc["skipped"][peer]
            assert "not measured" in done.stdout

    assert list((root / "bench").iterdir()) == []  # the run dir went with its contents
    assert _mentioning(str(root)) == set()
    if etc_docker is not None:
        assert sorted(os.listdir("/etc/docker")) == etc_docker


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "--runs 0"),
        (["--layers", "3"], "--layers does not apply to --cli"),
        (["--driver", "vfs"], "--driver does not apply to --cli"),
        (["--out", "{tmp}"], "is a directory"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(cli, root, tmp_path, args, message):
    done = cli("bench", "--cli", *(a.format(tmp=tmp_path) for a in args))
    refused(done, message)
    assert not (root / "bench").exists()


def test_not_root_is_refused(tmp_path):
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", MINIFS, "bench", "--cli"],
        capture_output=True,
        text=True,
        env={"MINIFS_ROOT": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    refused(done, "needs root")
