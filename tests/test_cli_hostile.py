"""The `minifs` command against input typed wrong on purpose.

Every refusal is one line on stderr starting with "minifs: error:", exit 2
(125 for `minifs run`), no traceback, and nothing created or changed. Ctrl-C
in the middle of a long command leaves what `minifs gc` cleans, and two
commands at once are serialised by the state lock instead of racing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from minifs import linux
from tests.conftest import MINIFS, refused
from tests.test_cli import fingerprint
from tests.test_run import env, minifs, state  # noqa: F401 - the container fixtures

Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def vfs(cli: Cli) -> Cli:
    """The `cli` fixture on the vfs driver (fast to set up, no backend to stop)."""

    def run(*args: str, **kwargs: object):
        return cli(*args, env={"MINIFS_DRIVER": "vfs"}, **kwargs)

    return run


@pytest.fixture
def rootfs_tar(tmp_path: Path) -> Path:
    """A one-file root filesystem tar, the smallest thing `image import` takes."""
    path = tmp_path / "rootfs.tar"
    with tarfile.open(path, "w") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


# -- the parser -------------------------------------------------------------------


PARSER_ERRORS = [
    ((), 2, ("no command given", "'minifs --help'")),
    (("-x",), 2, ("unknown option -x",)),
    (("clon", "a"), 2, ("unknown command 'clon'", "did you mean 'clone'?")),
    (("clone",), 2, ("clone: missing name", "'minifs clone --help'")),
    (("clone", "-x"), 2, ("clone: unknown option -x",)),
    (("clone", "a", "b"), 2, ("clone: unexpected b",)),
    (("run", "--name", "n", "--root", "/x", "busybox"), 125, ("unknown option --root", "image")),
    (("image",), 2, ("image: no command given",)),
    (("image", "nope"), 2, ("image: unknown command 'nope'", "'minifs image --help'")),
    (("image", "ls", "extra"), 2, ("image ls: unexpected extra",)),
    (("stop", "-t", "abc", "x"), 2, ("stop: argument -t/--time",)),
    (("mount", "x", ""), 2, ("empty path",)),
    (("umount", ""), 2, ("empty path",)),
    (("image", "import", ""), 2, ("empty path",)),
    (("run",), 125, ("run: missing IMAGE",)),
    (("run", "--nope", "busybox"), 125, ("run: unknown option --nope",)),
    (("run", "-it", "busybox", "sh"), 125, ("run: unknown option -it",)),
    (("run", "--cpus", "lots", "busybox"), 125, ("--cpus", "'lots'")),
    (("run", "--net", "host", "busybox"), 125, ("--net", "'host'")),
]


@pytest.mark.parametrize(("argv", "code", "words"), PARSER_ERRORS, ids=lambda v: repr(v))
def test_usage_errors_are_one_line(cli: Cli, root: Path, argv, code, words):
    """No five-line usage block; the subcommand that refused is named, and
    `run` keeps 125 for its own errors even when they are usage errors."""
    refused(cli(*argv), *words, code=code)
    assert not root.exists()


def test_long_and_control_characters_stay_on_one_line(vfs: Cli, tmp_path: Path):
    line = refused(vfs("clone", "x" * 10_000), "invalid name", "more)")
    assert len(line) < 600
    vfs("clone", "c", check=True)
    line = refused(vfs("mount", "c", str(tmp_path / "two\nlines")), "does not exist")
    assert "two\\nlines" in line
    vfs("rm", "c", check=True)


# -- the state dir ------------------------------------------------------------------


def test_empty_root_is_not_the_current_directory(vfs: Cli, tmp_path: Path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(
        [MINIFS, "--root", "", "clone", "x"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "MINIFS_DRIVER": "vfs"},
    )
    refused(done, "--root is empty")
    assert list(cwd.iterdir()) == []


DAMAGE = {
    "lock": Path.mkdir,
    "drivers": Path.touch,
    "tmp": Path.touch,
    "content": Path.touch,
    "containers": Path.touch,
}


def test_root_must_be_a_state_dir(vfs: Cli, tmp_path: Path):
    """A file, or a state dir with a file where a directory belongs (or the
    reverse), gets the same one line from every command, not an ENOTDIR from
    whichever path the command touched first."""
    plain = tmp_path / "plain"
    plain.write_text("not a state dir\n")
    commands = (("ls",), ("ps",), ("gc",), ("down",), ("image", "ls"), ("clone", "x"))
    for argv in commands:
        refused(vfs("--root", str(plain), *argv), str(plain), "not a directory")
    assert plain.read_text() == "not a state dir\n"
    refused(vfs("--root", str(plain / "state"), "ps"), "part of its path is a file")
    for entry, damage in DAMAGE.items():
        damaged = tmp_path / f"damaged-{entry}"
        damaged.mkdir()
        damage(damaged / entry)
        for argv in commands:
            refused(vfs("--root", str(damaged), *argv), "damaged", entry)


def test_unreadable_metadata_store_is_left_alone(vfs: Cli, root: Path):
    root.mkdir()
    garbage = os.urandom(8192)
    (root / "metadata.db").write_bytes(garbage)
    for argv in (("ls",), ("clone", "x"), ("image", "ls"), ("inspect", "x")):
        refused(vfs(*argv), "metadata store", "cannot be read", "backup")
    assert (root / "metadata.db").read_bytes() == garbage


def test_driver_from_the_environment_is_named(cli: Cli, root: Path):
    refused(cli("clone", "x", env={"MINIFS_DRIVER": "nope"}), "MINIFS_DRIVER='nope'", "unset")
    refused(cli("run", "busybox", env={"MINIFS_DRIVER": "nope"}), "MINIFS_DRIVER", code=125)
    # Also where the command takes no driver: the typo shows now, not later.
    for argv in (("ls",), ("gc",), ("check",), ("image", "ls"), ("ps",)):
        refused(cli(*argv, env={"MINIFS_DRIVER": "nope"}), "MINIFS_DRIVER='nope'", "unset")
        refused(cli("--storage-opt", "vfs.nope=1", *argv), "vfs has no option 'nope'")
        refused(cli(*argv, "--storage-opt", "bogus"), "--storage-opt 'bogus'")
    assert not root.exists()
    # Empty counts as unset, as for MINIFS_ROOT: the default driver.
    made = json.loads(cli("clone", "x", "--json", env={"MINIFS_DRIVER": ""}, check=True).stdout)
    assert made["driver"] == "overlay2"
    cli("rm", "x", check=True)
    cli("down", check=True)


@pytest.mark.parametrize(
    ("driver", "option", "words"),
    [
        ("vfs", ".=", ("names no driver option",)),
        ("vfs", "overlay2.=x", ("names no driver option",)),
        ("vfs", "nope.x=1", ("no driver 'nope'",)),
        ("vfs", "vfs.colour=red", ("vfs has no option 'colour'",)),
        ("vfs", "overlay2.sise=1G", ("overlay2 has no option 'sise'", "backing, size")),
        ("overlay2", "vfs.colour=red", ("vfs has no option 'colour'", "none")),
        ("overlay2", "overlay2.size=0", ("overlay2.size=0", "at least 1M")),
        ("overlay2", "overlay2.size=99999999T", ("out of range",)),
    ],
)
def test_storage_options_are_checked_for_every_driver(cli: Cli, root: Path, driver, option, words):
    """An option for a driver not in use is still checked: a typo in it must
    not pass because the driver it names is not the one running."""
    done = cli("--storage-opt", option, "clone", "x", env={"MINIFS_DRIVER": driver})
    refused(done, *words)
    assert not root.exists()


@pytest.mark.parametrize("separator", [":", ","])
def test_overlay2_refuses_a_root_it_cannot_mount_before_making_it(cli: Cli, tmp_path, separator):
    where = tmp_path / f"a{separator}b"
    refused(cli("--root", str(where), "clone", "x"), "pick a --root without them")
    assert not where.exists()


def test_overlay2_failed_backing_image_leaves_no_choice_behind(cli: Cli, tmpfs):
    """A loop image that cannot be made (here: its filesystem is full) leaves
    neither a half image nor a config.json that would bind every later start
    to the options that failed."""
    small = tmpfs("small", "size=512k") / "state"
    loop = ("--storage-opt", "overlay2.backing=loop", "--storage-opt", "overlay2.size=200G")
    refused(cli("--root", str(small), *loop, "clone", "x"), "backing image", "overlay2.size")
    assert list((small / "drivers" / "overlay2").iterdir()) == []
    cli("--root", str(small), "clone", "x", check=True)  # direct: tmpfs takes upper dirs
    cli("--root", str(small), "rm", "x", check=True)
    cli("--root", str(small), "down", check=True)


def test_damaged_driver_home_does_not_stop_gc_of_the_others(cli: Cli, root: Path):
    cli("clone", "o", check=True)
    killed = cli("clone", "new", "-d", "vfs", env={"MINIFS_FAILPOINT": "clone:after-intent"})
    assert killed.returncode == -signal.SIGKILL
    config = root / "drivers" / "overlay2" / "config.json"
    saved = config.read_text()
    config.write_text("{not json")
    try:
        refused(cli("clone", "y"), "config.json is damaged")
        done = cli("gc")
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "vfs: roll back clone new" in done.stdout
        assert "overlay2: " in done.stderr and "damaged" in done.stderr
    finally:
        config.write_text(saved)
    assert [i["name"] for i in json.loads(cli("ls", "--json", check=True).stdout)] == ["o"]
    cli("rm", "o", check=True)
    cli("down", check=True)


# -- names, paths, labels, filters -------------------------------------------------------


def test_mount_points_that_would_hide_something(vfs: Cli, root: Path, tmp_path: Path):
    vfs("clone", "c", check=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("mine\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    before = fingerprint(root)
    cases = [
        (tmp_path / "absent", ("does not exist", "create it first")),
        (a_file, ("not a directory",)),
        (full, ("not empty", "pick an empty directory")),
        (root, ("state dir",)),
        (tmp_path, ("would cover the state dir",)),
    ]
    for target, words in cases:
        refused(vfs("mount", "c", str(target)), *words)
        assert not linux.is_mountpoint(target)
    refused(vfs("mount", "nosuch", str(full)), "nosuch")  # the name is checked first
    assert (full / "precious").read_text() == "mine\n"
    assert fingerprint(root) == before
    vfs("rm", "c", check=True)


def test_filters_and_labels(vfs: Cli, root: Path):
    vfs("clone", "c", check=True)
    before = fingerprint(root)
    refused(vfs("ls", "--filter", "kind=bogus"), "clone|view|layer")
    refused(vfs("ls", "--filter", "label.=x"), "label.KEY=VALUE")
    big = "v" * 5000
    refused(vfs("label", "c", f"k={big}"), "4096 bytes")
    refused(vfs("clone", "x", "--label", f"k={big}"), "4096 bytes")
    assert fingerprint(root) == before
    vfs("rm", "c", check=True)


def test_rm_goes_on_past_a_name_it_cannot_remove(vfs: Cli):
    """As `docker rm a b c`: each failure is its own line, the rest still go."""
    vfs("clone", "a", check=True)
    vfs("clone", "b", check=True)
    done = vfs("rm", "a", "nosuch", "b")
    assert done.returncode == 2 and done.stdout.split() == ["a", "b"]
    refused(done, "'nosuch'", "minifs ps -a", "minifs ls")
    assert json.loads(vfs("ls", "--json", check=True).stdout) == []
    done = vfs("image", "rm", "gone1", "gone2")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 2


def test_rm_force_and_stop_go_on(minifs: Cli, state: Path):  # noqa: F811
    """`rm -f` stops a running container first, as docker's does; `stop` goes
    on past a name it does not know."""
    assert minifs("run", "-d", "--name", "forced", "busybox", "sleep", "60").returncode == 0
    try:
        refused(minifs("rm", "forced"), "is running")
        done = minifs("stop", "-t", "0", "nosuch", "forced")
        assert done.returncode == 2 and done.stdout == "forced\n"
        refused(done, "'nosuch'")
        assert minifs("run", "-d", "--name", "forced2", "busybox", "sleep", "60").returncode == 0
        done = minifs("rm", "-f", "forced2", "forced")
        assert done.returncode == 0 and done.stdout.split() == ["forced2", "forced"], done.stderr
    finally:
        minifs("rm", "-f", "forced", "forced2")
    assert json.loads(minifs("ps", "-a", "--json").stdout) == []


def test_json_goes_to_stdout_and_errors_to_stderr(vfs: Cli):
    vfs("clone", "c", check=True)
    for argv in (
        ("ls", "--json"),
        ("inspect", "c", "--json"),
        ("usage", "c", "--json"),
        ("label", "c", "k=v", "--json"),
        ("gc", "--json"),
        ("down", "--json"),
        ("image", "ls", "--json"),
        ("ps", "--json"),
        ("drivers", "--json"),
    ):
        done = vfs(*argv, check=True)
        json.loads(done.stdout)
        assert done.stderr == "", (argv, done.stderr)
    for argv in (("inspect", "nosuch", "--json"), ("ls", "--json", "--filter", "x")):
        done = vfs(*argv)
        assert done.stdout == ""
        refused(done)
    vfs("rm", "c", check=True)


def test_output_that_cannot_be_written(vfs: Cli, root: Path):
    """A reader that goes away (`| head`) ends minifs quietly, as SIGPIPE ends
    a C tool; a full or closed stdout is one line or nothing, and a closed
    descriptor is never reused for the store."""
    from minifs.storage import Storage

    with Storage("vfs", root) as storage:
        for n in range(20):
            storage.clone(f"c{n}", labels={"note": "x" * 4000})  # ~80 KB of JSON
    environ = {**os.environ, "MINIFS_ROOT": str(root)}
    proc = subprocess.Popen(
        [MINIFS, "ls", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ
    )
    assert proc.stdout is not None and proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert proc.stderr is not None and proc.stderr.read() == b""
    proc.stderr.close()

    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [MINIFS, "ls", "--json"], stdout=full, stderr=subprocess.PIPE, text=True, env=environ
        )
    refused(done, "No space left on device")
    done = subprocess.run(
        [MINIFS, "ls", "--json"], stderr=subprocess.PIPE, text=True, env=environ,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == ""
    assert len(json.loads(vfs("ls", "--json", check=True).stdout)) == 20
    vfs("rm", *(f"c{n}" for n in range(20)), check=True)


def test_tables_print_names_as_given(vfs: Cli):
    """rich would turn `:b:` into an emoji and `[x]` into markup."""
    vfs("clone", "a:b:c", check=True)
    vfs("label", "a:b:c", "note=[bold]x", check=True)
    assert "a:b:c" in vfs("ls", check=True).stdout
    vfs("rm", "a:b:c", check=True)


def test_view_takes_an_image_as_clone_does(vfs: Cli, rootfs_tar: Path):
    vfs("image", "import", str(rootfs_tar), "--name", "app:1", check=True)
    made = json.loads(vfs("view", "v", "--from", "app:1", "--json", check=True).stdout)
    assert made["kind"] == "view" and made["parent"].startswith("sha256:")
    vfs("rm", "v", check=True)
    vfs("image", "rm", "app:1", check=True)


def test_image_import_refuses_what_it_cannot_read_once(vfs: Cli, root: Path, tmp_path: Path):
    """A device or a pipe is refused before anything is copied: /dev/zero was
    copied into the state dir until the disk filled."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(vfs("image", "import", "/dev/zero", timeout=30), "not a regular file")
    refused(vfs("image", "import", str(fifo), timeout=30), "not a regular file")
    refused(vfs("image", "import", "-"), "stdin is not supported")
    assert not root.exists()


def test_damaged_image_is_listed_and_can_be_removed(vfs: Cli, root: Path, rootfs_tar: Path):
    """A lost blob made `image ls` fail for every image, and `image rm` of the
    damaged one fail too, though its error said to remove it."""
    vfs("image", "import", str(rootfs_tar), "--name", "good", check=True)
    other = rootfs_tar.with_name("other.tar")
    with tarfile.open(other, "w") as tar:
        tar.addfile(tarfile.TarInfo("empty"), io.BytesIO())
    (bad,) = json.loads(vfs("image", "import", str(other), "--name", "bad", "--json").stdout)
    config = json.loads(vfs("image", "inspect", "bad", "--json", check=True).stdout)
    (root / "content" / "blobs" / "sha256" / config["config_digest"][7:]).unlink()

    done = vfs("image", "ls", "--json", check=True)
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["good:latest"]["layers"] == 1 and "error" not in rows["good:latest"]
    assert rows["bad:latest"]["layers"] is None and "missing" in rows["bad:latest"]["error"]
    assert "image rm bad:latest" in done.stderr and len(done.stderr.splitlines()) == 1
    refused(vfs("image", "inspect", "bad"), "missing")
    blobs = root / "content" / "blobs" / "sha256"
    kept = {bad["digest"][7:], config["layers"][0]["digest"][7:]}
    vfs("image", "rm", "good", check=True)  # collects garbage, but not what bad still names
    assert kept <= set(os.listdir(blobs))
    assert vfs("image", "rm", "bad", check=True).stdout == "bad:latest\n"
    assert json.loads(vfs("image", "ls", "--json").stdout) == []
    assert os.listdir(blobs) == []


def test_image_names_follow_docker(vfs: Cli, rootfs_tar: Path, tmp_path: Path):
    for name in ("", "UPPER", "a:b:c", "x:", ":x", "a@sha256:1234", "a..b"):
        refused(vfs("image", "import", str(rootfs_tar), "--name", name), "invalid image name")
    odd = tmp_path / "My..Image.tar"
    odd.write_bytes(rootfs_tar.read_bytes())
    (made,) = json.loads(vfs("image", "import", str(odd), "--json", check=True).stdout)
    assert made["name"] == "my-image:latest"
    vfs("image", "rm", "my-image", check=True)


# -- Ctrl-C and two commands at once ------------------------------------------------


def _start(root: Path, *argv: str, driver: str = "vfs") -> subprocess.Popen:
    """`minifs argv` in the background with Ctrl-C delivered as a terminal would."""
    return subprocess.Popen(
        [MINIFS, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MINIFS_ROOT": str(root), "MINIFS_DRIVER": driver},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.002)


def _interrupt(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "minifs: interrupted\n"


def test_ctrl_c_during_import_leaves_nothing(vfs: Cli, root: Path, tmp_path: Path):
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("big")
        info.size = 256 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    proc = _start(root, "image", "import", str(archive))
    scratch = root / "tmp"
    _wait_for(lambda: scratch.is_dir() and any(scratch.iterdir()), proc, "staging")
    _interrupt(proc)
    assert list(scratch.iterdir()) == []
    assert json.loads(vfs("image", "ls", "--json", check=True).stdout) == []


def test_ctrl_c_and_rm_during_a_vfs_clone(vfs: Cli, root: Path, tmp_path: Path):
    """A vfs clone copies the whole layer: Ctrl-C in the copy leaves no partial
    copy without a row (or a row without its copy); a `rm` of the layer
    meanwhile waits for the lock and then refuses, the clone it waited for
    being its child."""
    vfs("clone", "base", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vfs("mount", "base", str(mnt), check=True)
    try:
        with open(mnt / "big", "wb") as f:
            for _ in range(256):
                f.write(b"\1" * (1 << 20))  # real data: the copy takes a while
    finally:
        vfs("umount", str(mnt), check=True)
    vfs("snapshot", "base", "layer", check=True)
    dirs = root / "drivers" / "vfs" / "dir"
    before = set(os.listdir(dirs))

    def consistent() -> None:
        """Every row has its directory and every directory its row."""
        rows = json.loads(vfs("ls", "--json", check=True).stdout)
        assert {r["id"] for r in rows} == set(os.listdir(dirs))
        assert all(r["state"] == "ready" for r in rows)

    proc = _start(root, "clone", "c1", "--from", "layer")
    _wait_for(lambda: set(os.listdir(dirs)) != before, proc, "the copy")
    _interrupt(proc)
    consistent()

    settled = set(os.listdir(dirs))
    proc = _start(root, "clone", "c2", "--from", "layer")
    _wait_for(lambda: set(os.listdir(dirs)) != settled, proc, "the copy")
    refused(vfs("rm", "layer"), "layer has", "child", "c2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    consistent()
    vfs("rm", "c1", "c2", "layer")
    assert json.loads(vfs("ls", "--json", check=True).stdout) == []
    assert os.listdir(dirs) == []


def test_an_error_while_unwinding_from_ctrl_c_reports_the_interrupt():
    """A cleanup that fails because the interrupted work still held what it
    cleans (a mount kept busy) is reported as the interruption, not as the
    cleanup's own error; this is how main() tells the two apart."""
    from minifs.cli import _interrupted
    from minifs.errors import BackendError

    def cleanup_during_interrupt() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise BackendError("mount is busy") from None

    with pytest.raises(BackendError) as raised:
        cleanup_during_interrupt()
    assert _interrupted(raised.value)
    assert not _interrupted(BackendError("mount is busy"))
