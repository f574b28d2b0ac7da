"""The hostile corpus: every archive is refused with one line naming the entry,
the clone is left exactly as it was, and nothing outside it changes.

The corpus (tests/corpus) is built at test time. Each case is applied to a
clone that already sits on a layer, so a refusal must also leave the layer
below alone; a host directory the cases aim at (by absolute path, `..`,
symlinks and hard links) is checked after every case. Symlinks planted by a
lower layer are neutralised rather than refused (replaced, never followed).
Image archives whose JSON names paths outside the archive or digests that do
not match are refused whole; deep and wide layers stay fast and small.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from minifs.errors import MinifsError
from minifs.layers.snapshots import apply_to
from tests import treeinfo
from tests.conftest import driver_params
from tests.corpus import docker_archive, hostile, member, oci_layout, tar_bytes

MARKERS = {"escape", "pwned", "abs", "hidden"}


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch\n")
    return outside


def _strays(tmp_path: Path) -> list[str]:
    """Files a case tried to create, anywhere under the test's directory."""
    return [
        os.path.join(top, name)
        for top, dirs, files in os.walk(tmp_path)
        for name in [*dirs, *files]
        if name in MARKERS
    ]


@pytest.mark.parametrize("driver", driver_params())
def test_hostile_layers_are_refused(driver, open_storage, mount, tmp_path):
    """Every corpus case against one victim clone per driver (one storage for
    all cases keeps this fast); after each, the clone, the host directory the
    cases aim at, and the scratch dir are checked."""
    outside = _outside(tmp_path)
    storage = open_storage(driver)
    storage.clone("base")
    apply_to(storage, "base", io.BytesIO(tar_bytes([member("ok", "dir"), member("ok/f")])))
    storage.snapshot("base", "layer")
    storage.clone("victim", "layer")
    with mount(storage, "victim") as path:
        before = treeinfo.record(path, mtimes=True)
    host_before = treeinfo.record(outside, mtimes=True)
    failures = []
    for case in hostile(outside):
        try:
            apply_to(storage, "victim", io.BytesIO(case.data), **case.options)
            failures.append(f"{case.name}: accepted")
            continue
        except MinifsError as exc:
            message = str(exc)
        if "\n" in message or case.mentions not in message:
            failures.append(f"{case.name}: message {message!r} should name {case.mentions!r}")
        with mount(storage, "victim") as path:
            changed = treeinfo.differences(before, treeinfo.record(path, mtimes=True))
        host = treeinfo.differences(host_before, treeinfo.record(outside, mtimes=True))
        left = list((storage.state.root / "tmp").iterdir())
        if changed or host or _strays(tmp_path) or left:
            failures.append(f"{case.name}: clone {changed} host {host} left {left}")
    assert failures == []


def _no_image_stored(root: Path) -> None:
    blobs = root / "content" / "blobs" / "sha256"
    assert not blobs.exists() or list(blobs.iterdir()) == []


def test_import_refuses_image_with_hostile_layer(cli, root, tmp_path):
    good = tar_bytes([member("etc", "dir"), member("etc/ok", data=b"ok")])
    bad = tar_bytes([member("etc", "dir"), member("etc/../../escape", data=b"x")])
    archive = tmp_path / "bad.tar"
    archive.write_bytes(docker_archive([good, bad]))
    done = cli("image", "import", str(archive))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "etc/../../escape" in done.stderr
    _no_image_stored(root)
    listed = cli("image", "ls", "--json", check=True)
    assert json.loads(listed.stdout) == []
    assert _strays(tmp_path) == []


def test_import_refuses_paths_outside_the_archive(cli, root, tmp_path):
    layer = tar_bytes([member("f", data=b"x")])
    archive = tmp_path / "escape.tar"
    archive.write_bytes(docker_archive([layer], config_name="../../../etc/hostname"))
    done = cli("image", "import", str(archive))
    assert done.returncode == 2 and "outside the archive" in done.stderr
    _no_image_stored(root)


def test_import_refuses_layout_blob_linked_out(cli, root, tmp_path):
    """An OCI layout directory whose blob is a symlink to a host file."""
    layout = tmp_path / "layout"
    for info, data in oci_layout([tar_bytes([member("f", data=b"x")])]):
        path = layout / info.name
        if info.isdir():
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    manifest = layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    secret = _outside(tmp_path) / "secret"
    manifest.unlink()
    manifest.symlink_to(secret)
    done = cli("image", "import", str(layout))
    assert done.returncode == 2 and "outside" in done.stderr
    _no_image_stored(root)


def test_import_refuses_devices_when_asked(cli, root, tmp_path):
    layer = tar_bytes([member("dev", "dir"), member("dev/mem", "char", devmajor=1, devminor=1)])
    archive = tmp_path / "dev.tar"
    archive.write_bytes(docker_archive([layer]))
    done = cli("image", "import", "--no-devices", str(archive))
    assert done.returncode == 2 and "dev/mem" in done.stderr
    _no_image_stored(root)
    cli("image", "import", str(archive), check=True)


# -- neutralised: symlinks left by a lower layer are replaced, never followed --------


@pytest.mark.parametrize("driver", driver_params())
def test_symlinks_of_lower_layers_are_never_followed(driver, open_storage, mount, tmp_path):
    """A lower layer plants symlinks (chains, `..`, the host's own paths); the
    next layer writes, whites out and makes opaque through them. As overlayfs
    shows it, each symlink is replaced by a directory inside the clone: the
    writes land there and the host is untouched."""
    outside = _outside(tmp_path)
    storage = open_storage(driver)
    storage.clone("base")
    planted = [
        member("a", "symlink", linkname="b"),
        member("b", "symlink", linkname="/"),
        member("up", "symlink", linkname="../../../../.."),
        member("host", "symlink", linkname=str(outside)),
        member("lnk", "symlink", linkname=str(outside)),
        member("opq", "symlink", linkname=str(outside)),
    ]
    apply_to(storage, "base", io.BytesIO(tar_bytes(planted)))
    storage.snapshot("base", "layer")
    storage.clone("victim", "layer")
    host_before = treeinfo.record(outside, mtimes=True)
    attack = [
        member("a/pwned", data=b"x"),
        member("up/pwned", data=b"x"),
        member("host/sub/pwned", data=b"x"),
        member("lnk/.wh.secret"),
        member("opq/.wh..wh..opq"),
    ]
    apply_to(storage, "victim", io.BytesIO(tar_bytes(attack)))
    assert treeinfo.differences(host_before, treeinfo.record(outside, mtimes=True)) == []
    assert [s for s in _strays(tmp_path) if not s.startswith(str(storage.state.root))] == []
    with mount(storage, "victim") as path:
        tree = treeinfo.record(path)
    kinds = {p: e["type"] for p, e in tree.items() if p != "."}
    assert kinds == {
        "a": "dir",
        "a/pwned": "file",
        "b": "symlink",
        "up": "dir",
        "up/pwned": "file",
        "host": "dir",
        "host/sub": "dir",
        "host/sub/pwned": "file",
        "lnk": "dir",
        "opq": "dir",
    }


# -- images: names and digests inside the archive's JSON are hostile too ------------


def _stored(root: Path) -> list[str]:
    blobs = root / "content" / "blobs" / "sha256"
    return sorted(os.listdir(blobs)) if blobs.exists() else []


def _refused(cli, root: Path, path: Path, mention: str) -> None:
    done = cli("image", "import", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and mention in done.stderr, done.stderr
    assert _stored(root) == [] and json.loads(cli("image", "ls", "--json").stdout) == []


@pytest.mark.parametrize("where", ["../../etc/hostname", "/etc/hostname", "a/../../x"])
def test_manifest_layer_path_outside_the_archive(cli, root, tmp_path, where):
    archive = tmp_path / "bad.tar"
    good = docker_archive([tar_bytes([member("f", data=b"x")])])
    members = _members(good)
    manifest = json.loads(members["manifest.json"])
    manifest[0]["Layers"] = [where]
    members["manifest.json"] = json.dumps(manifest).encode()
    archive.write_bytes(tar_bytes([member(n, data=d) for n, d in members.items()]))
    _refused(cli, root, archive, "outside the archive")


def _members(archive: bytes) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_config_digest_that_does_not_match_its_blob(cli, root, tmp_path):
    """OCI: the manifest names a config digest; the blob under that name is another."""
    layout = tmp_path / "layout"
    for info, data in oci_layout([tar_bytes([member("f", data=b"x")])]):
        (layout / info.name).parent.mkdir(parents=True, exist_ok=True)
        if not info.isdir():
            (layout / info.name).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = blobs / manifest["config"]["digest"][7:]
    config.write_bytes(config.read_bytes().replace(b"/bin/sh", b"/bin/xx"))
    _refused(cli, root, layout, manifest["config"]["digest"])


def test_docker25_config_named_by_another_digest(cli, root, tmp_path):
    from tests.corpus import docker25_archive

    members = _members(docker25_archive([tar_bytes([member("f", data=b"x")])]))
    del members["index.json"]  # read through manifest.json alone
    (config_name,) = [json.loads(members["manifest.json"])[0]["Config"]]
    members[config_name] = members[config_name].replace(b"/bin/sh", b"/bin/xx")
    archive = tmp_path / "d25.tar"
    archive.write_bytes(tar_bytes([member(n, data=d) for n, d in members.items()]))
    _refused(cli, root, archive, config_name[13:])


def test_oversized_json_is_refused_not_parsed(cli, root, tmp_path):
    members = _members(docker_archive([tar_bytes([member("f", data=b"x")])]))
    members["manifest.json"] = b"[" + b" " * (5 << 20) + b"]"
    archive = tmp_path / "big.tar"
    archive.write_bytes(tar_bytes([member(n, data=d) for n, d in members.items()]))
    _refused(cli, root, archive, "larger than")


def test_layout_blobs_dir_linked_outside(cli, root, tmp_path):
    layout = tmp_path / "layout"
    for info, data in oci_layout([tar_bytes([member("f", data=b"x")])]):
        (layout / info.name).parent.mkdir(parents=True, exist_ok=True)
        if not info.isdir():
            (layout / info.name).write_bytes(data)
    (layout / "blobs").rename(tmp_path / "elsewhere")
    (layout / "blobs").symlink_to(tmp_path / "elsewhere")
    _refused(cli, root, layout, "outside")


def test_duplicate_layers_in_a_manifest_are_applied_in_turn(cli, root, open_storage, mount):
    """Docker images repeat a layer (two identical empty layers, or the same
    change twice): each occurrence is its own chain step, stored once."""
    add = tar_bytes([member("count", data=b"1")])
    drop = tar_bytes([member(".wh.count")])
    archive = root.parent / "dup.tar"
    archive.write_bytes(docker_archive([add, drop, add, tar_bytes([]), tar_bytes([])]))
    (image,) = json.loads(cli("image", "import", str(archive), "--json", check=True).stdout)
    assert image["layers"] == 5
    assert len(_stored(root)) == 2 + 3  # manifest, config, and three distinct layers
    driver = next(p.values[0] for p in driver_params() if not p.marks)
    cli("clone", "c", "--from", image["name"], "-d", driver, check=True)
    with mount(open_storage(driver), "c") as path:
        assert (path / "count").read_bytes() == b"1"


# -- size and shape ---------------------------------------------------------------------


def test_path_max_deep_tree_applies_and_diffs_reproducibly(tmp_path):
    """2,000 nested directories (a 4,000-byte name, under PATH_MAX): applied
    and diffed without recursion; a diff applied and diffed again is the same."""
    from minifs.layers import safefs
    from minifs.layers.apply import apply_layer
    from minifs.layers.diff import write_diff

    deep = "/".join(["d"] * 2000)
    layer = tar_bytes([member(deep + "/leaf", data=b"bottom")])
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    try:
        apply_layer(io.BytesIO(layer), first)
        one = io.BytesIO()
        stats = write_diff(one, first)
        apply_layer(io.BytesIO(one.getvalue()), second)
        two = io.BytesIO()
        assert write_diff(two, second).diff_id == stats.diff_id
        assert two.getvalue() == one.getvalue() and stats.entries == 2001
    finally:  # shutil.rmtree (and so pytest's cleanup) recurses: too deep for it
        safefs.remove_tree(first)
        safefs.remove_tree(second)


def test_memory_stays_bounded_for_100k_entries(tmp_path):
    """Pass 1 keeps a record per entry (duplicates, hard link targets, what
    lies below what): 100,000 tiny entries must stay within tens of MiB."""
    import subprocess
    import sys

    script = f"""
def peak_kib():
    # VmHWM is this program's own peak; ru_maxrss also counts the pytest
    # process it was forked from (Linux keeps it across execve).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
from minifs.layers.tarformat import DIR, FILE, Entry, TarWriter
from minifs.layers.apply import validate
path = {str(tmp_path / "many.tar")!r}
with open(path, "wb") as f:
    tar = TarWriter(f)
    for d in range(100):
        tar.add(Entry(name=b"dir-%03d" % d, type=DIR, mode=0o755))
        for i in range(1000):
            tar.add(Entry(name=b"dir-%03d/file-%04d" % (d, i), type=FILE, size=1), iter([b"x"]))
    tar.close()
before = peak_kib()
stats = validate(path)
print(stats.entries, before, peak_kib())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    entries, before_kib, peak_kib = map(int, done.stdout.split())
    print(
        f"\n100k entries: peak RSS {peak_kib >> 10} MiB ({(peak_kib - before_kib) >> 10} MiB more)"
    )
    assert entries == 100_100
    assert peak_kib - before_kib < 64 * 1024, f"{peak_kib - before_kib} KiB for 100k entries"


def test_odd_spellings_land_on_their_normal_path(tmp_path):
    """`//`, `/./`, a trailing `/.` and a leading `./` name the same path as
    their plain form (as in tar and overlayfs): applied there, inside the root."""
    from minifs.layers.apply import apply_layer

    layer = tar_bytes(
        [
            member("./a//b/", "dir"),
            member("a/./b//c", data=b"c"),
            member("d/.", "dir", mode=0o700),
            member("./d/./e", "symlink", linkname="../a/b/c"),
        ]
    )
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(layer), root)
    tree = treeinfo.record(root)
    assert {p: e["type"] for p, e in tree.items()} == {
        ".": "dir",
        "a": "dir",
        "a/b": "dir",
        "a/b/c": "file",
        "d": "dir",
        "d/e": "symlink",
    }
    assert tree["d"]["mode"] == 0o700 and (root / "d" / "e").read_bytes() == b"c"


class _RewrittenOnceRead(io.FileIO):
    """A layer file that someone rewrites (same size, other entries) as soon as
    it has been read to the end once: between the two passes of an apply."""

    def __init__(self, path: Path, replacement: bytes) -> None:
        super().__init__(path, "r")
        self._replacement: bytes | None = replacement

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if not data and self._replacement is not None:
            with open(self.name, "r+b") as other_writer:
                other_writer.write(self._replacement)
            self._replacement = None
        return data


def test_layer_changed_between_passes_adds_no_entry(tmp_path):
    """Pass 2 writes what pass 1 accepted, never what the file says by then: a
    layer rewritten in between can change file bytes, not names or types."""
    from minifs.layers.apply import apply_layer

    accepted = tar_bytes([member("safe", data=b"a" * 100)])
    swapped = tar_bytes([member("evil", data=b"b" * 100)])
    assert len(accepted) == len(swapped)
    path = tmp_path / "layer.tar"
    path.write_bytes(accepted)
    root = tmp_path / "root"
    root.mkdir()
    with _RewrittenOnceRead(path, swapped) as layer:
        stats = apply_layer(layer, root)
    assert path.read_bytes() == swapped  # the rewrite did happen before pass 2
    assert stats.files == 1 and sorted(os.listdir(root)) == ["safe"]
