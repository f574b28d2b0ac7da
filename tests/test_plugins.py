"""Plugins: built-in drivers and a third-party package come in the same way.

`tests/plugin_pkg` is a separate distribution (`minifs-tarcopy`) built and
installed by pip. It is installed with `--target` into this test's own
directory and put on PYTHONPATH for the processes that should see it, rather
than into the shared .venv: entry points are found through sys.path either way,
but a venv install would show `tarcopy` to every other pytest session running
from that venv meanwhile, and a killed test would leave it installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from pathlib import Path

import pytest

from minifs.plugins import GROUP, registered
from tests.conftest import MINIFS

PLUGIN_SRC = Path(__file__).with_name("plugin_pkg")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the pip-installed `minifs-tarcopy` distribution."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"  # build from a copy: pip leaves build/ and *.egg-info behind
    shutil.copytree(PLUGIN_SRC, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = work / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*pip, "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return site


def plugin_env(site: Path | None, **extra: str) -> dict[str, str]:
    """This environment without minifs selectors, with `site` on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MINIFS_LOAD_PLUGINS", "MINIFS_TEST_DRIVERS", "PYTHONPATH")
    }
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return {**env, **extra}


def drivers_json(env: dict[str, str]) -> dict[str, dict]:
    done = subprocess.run(
        [MINIFS, "drivers", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return {entry["name"]: entry for entry in json.loads(done.stdout)}


def test_builtin_drivers_come_through_entry_points():
    points = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name in ("vfs", "overlay2"):
        assert name in points, f"{name} is not in the {GROUP!r} entry-point group"
        assert points[name].dist is not None and points[name].dist.name == "minifs"
        assert points[name].value == f"minifs_drivers.{name}"
        found = registered()[name]
        assert found.plugin == "minifs"
        assert found.driver.__module__ == points[name].value


def test_plugin_is_only_seen_where_installed(plugin_site):
    with pytest.raises(PackageNotFoundError):
        distribution("minifs-tarcopy")  # the venv itself stays as it was
    assert "tarcopy" not in drivers_json(plugin_env(None))


def test_third_party_driver_is_listed(plugin_site):
    listed = drivers_json(plugin_env(plugin_site))
    assert {"vfs", "overlay2", "tarcopy"} <= listed.keys()
    tarcopy = listed["tarcopy"]
    assert tarcopy["kind"] == "copy"
    assert tarcopy["available"] is True and tarcopy["reason"] is None
    assert tarcopy["plugin"] == "minifs-tarcopy" and tarcopy["plugin_version"] == "0.1.0"
    assert tarcopy["backend"] and tarcopy["version"].startswith("tar (GNU tar)")
    assert listed["vfs"]["plugin"] == "minifs"


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ("vfs", {"vfs"}),
        ("", set()),
        ("tarcopy", {"tarcopy"}),
        ("tarcopy, overlay2", {"tarcopy", "overlay2"}),
    ],
)
def test_load_plugins_restricts(plugin_site, allowed, expected):
    env = plugin_env(plugin_site, MINIFS_LOAD_PLUGINS=allowed)
    assert set(drivers_json(env)) == expected


def run_pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The conformance suite in a fresh interpreter, which sees only `env`'s plugins."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=280,
        check=False,
    )


def test_conformance_passes_on_plugin(plugin_site, tmp_path):
    env = plugin_env(plugin_site, MINIFS_TEST_DRIVERS="tarcopy")
    report = tmp_path / "junit.xml"
    done = run_pytest(
        env, f"--basetemp={tmp_path / 'pt'}", f"--junitxml={report}", "tests/test_conformance.py"
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    cases = [str(case.get("name")) for case in suite.iter("testcase")]
    params = [name.partition("[")[2].rstrip("]").split("-") for name in cases]
    assert cases and all("tarcopy" in ids for ids in params), cases
    # The whole suite ran on the plugin: as many cases as a built-in driver gets.
    collected = run_pytest(
        plugin_env(None, MINIFS_TEST_DRIVERS="vfs"),
        "--collect-only",
        f"--basetemp={tmp_path / 'collect'}",
        "tests/test_conformance.py",
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    builtin = [line for line in collected.stdout.splitlines() if "::" in line]
    assert counts == {"tests": len(builtin), "failures": 0, "errors": 0, "skipped": 0}
    assert f"{len(builtin)} passed" in done.stdout.splitlines()[-1]


def test_the_hookimpl_mark_is_pluggys_own():
    """minifs marks hook implementations without importing pluggy; the mark
    must stay exactly what pluggy's own marker sets, or plugins would not load."""
    import pluggy

    from minifs.hookspecs import hookimpl

    def ours() -> None: ...

    def theirs() -> None: ...

    assert hookimpl(ours).minifs_impl == pluggy.HookimplMarker("minifs")(theirs).minifs_impl
