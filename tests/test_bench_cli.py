"""`minifs bench` through the real CLI: bad input is refused in one line before
any work, and `minifs --help` does not pay for the bench's imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from minifs.driver import Driver
from minifs.errors import NotSupported
from minifs.model import DriverKind
from minifs.plugins import Registered, registered
from minifs_bench.options import add_arguments
from minifs_bench.request import validate
from tests.conftest import MINIFS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "0"], "at least 1 layer"),
        (["--layers", "100000"], "deeper than overlay2 can stack (500)"),
        (["--driver", "vfs", "--layers", "100000"], "deeper than vfs can stack (1000)"),
        (["--driver", "nosuch"], "unknown driver 'nosuch'"),
        (["--driver", ","], "names no driver"),
        (["--metrics", "latency,speed"], "unknown metric speed"),
        (["--runs", "0"], "--runs 0"),
        (["--disk-size", "64M"], "too small for overlay2"),
        (["--disk-size", "lots"], "bad size"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{tmp}/file/r.json"], "cannot write results under"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(cli, root, tmp_path, args, message):
    (tmp_path / "file").write_text("not a directory")
    done = cli("bench", *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minifs: error:"), done.stderr
    assert message in lines[0]
    assert not (root / "bench").exists()


def test_not_root_is_refused(tmp_path):
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", MINIFS, "bench"],
        capture_output=True,
        text=True,
        env={"MINIFS_ROOT": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "needs root" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


class Unprobeable(Driver):
    """A driver whose backend is missing here, to see the probe's reason surface;
    it is only probed, never instantiated, so its snapshot methods stay abstract."""

    name = "unprobeable"
    kind = DriverKind.COPY
    backend = "nothing"

    @classmethod
    def probe(cls) -> None:
        raise NotSupported("the unprobeable module is not loaded")

    @classmethod
    def version(cls) -> str:
        return "0"


def _args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root")
    add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_a_driver_that_cannot_run_is_refused_with_its_reason(tmp_path):
    available = {**registered(), "unprobeable": Registered(Unprobeable, "test", "0")}
    with pytest.raises(NotSupported, match="unprobeable cannot run here: the unprobeable module"):
        validate(_args(driver="unprobeable", root=str(tmp_path)), available)
    settings = validate(_args(driver="all", root=str(tmp_path)), available)
    assert "unprobeable" not in settings.drivers
    assert settings.skipped == {"unprobeable": "the unprobeable module is not loaded"}
    assert {"overlay2", "vfs"} <= set(settings.drivers)


def test_auto_disk_size_grows_with_the_work(tmp_path):
    small = validate(_args(driver="vfs", layers=2, root=str(tmp_path)))
    deep = validate(_args(driver="vfs", layers=900, root=str(tmp_path)))
    assert small.disk_sizes["vfs"] == 2 << 30
    assert deep.disk_sizes["vfs"] > 2 << 30


@pytest.mark.parametrize(
    ("command", "loaded"),
    [
        # The whole help lists plugins' own commands too (`minifs thin`), so it loads them.
        (None, "['pluggy']"),
        ("'ls'", "[]"),
        ("'clone'", "[]"),
    ],
)
def test_help_does_not_import_the_bench(command, loaded):
    code = (
        f"import sys; from minifs.cli import build_parser; build_parser({command or ''}); "
        "print(sorted(m for m in ('rich', 'pluggy', 'minifs_bench.runner', 'matplotlib') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == loaded
    helped = subprocess.run(
        [MINIFS, "bench", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    for option in ("--driver", "--layers", "--metrics", "--runs", "--disk-size", "--out"):
        assert option in helped.stdout
